"""The GPU path on a CPU machine: no hard-coded device, every runtime tensor on the module's or the
input's device (or named HOST on purpose), checkpoints loaded with map_location, and the GPU profile.

Two checks, each shown to fail on a planted hard-coded device:
- a static walk over ``recbole_llmalign/`` (:func:`check_source`);
- the tiny models run under a default device no real tensor is on (``meta``): a tensor created
  without naming its device lands there, and the first operation mixing it with real tensors fails.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import recbole_llmalign
from tests.conftest import cyclic_config

PACKAGE = Path(recbole_llmalign.__file__).resolve().parent

# Code that runs per batch (forward, losses, scoring, generation). Every tensor it creates names its
# device: the module's or an input's (``device=x.device``), or ``HOST`` for Python-side bookkeeping.
# Outside it, and why: data/ and text/features.py prepare datasets and cached features on the host
# before RecBole moves each batch; recommend.py, serving.py and cli.py build request batches on the
# host and move each once (``Interaction(...).to(device)``, ``seq.to(device)``); quick_start.py,
# trainer.py, hyper.py and report.py orchestrate runs and create no model tensors.
RUNTIME_SCOPE = ("model/", "llm/", "text/fusion.py", "evaluator.py")
# Functions whose tensors become parameters or buffers: they move with the module (``model.to(device)``).
CONSTRUCTION = re.compile(r"^(__init__|_build\w*|_init\w*)$")
FACTORIES = frozenset({"zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor", "randn", "rand", "randint",
                       "randperm", "eye", "linspace", "logspace", "empty_strided", "sparse_coo_tensor"})
DEVICE_LITERAL = re.compile(r"^(cpu|cuda|mps|xpu|meta)(:\d+)?$")
# Literal device names that are not hard-coded placements, by (file, function), each with its reason.
ALLOWED_LITERALS = {
    ("devices.py", "<module>"): "HOST, the one name of the host device every bookkeeping tensor uses",
    ("config.py", "Config._init_device"): "RecBole's device set-up: multi-process runs on a machine without GPUs use the CPU (gloo)",
}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str
    code: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.code}"


def _is_device_literal(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(DEVICE_LITERAL.match(node.value))


def _mentions_cuda_availability(node: ast.AST) -> bool:
    """``torch.cuda.is_available()`` (or ``is_bf16_supported()``) in a condition: a device chosen by
    what the machine has, the device-agnostic idiom, not a hard-code."""
    return any(isinstance(n, ast.Attribute) and n.attr in ("is_available", "is_bf16_supported") for n in ast.walk(node))


class _Checker(ast.NodeVisitor):
    def __init__(self, path: str, source: str, runtime: bool) -> None:
        self.path, self.lines, self.runtime = path, source.splitlines(), runtime
        self.functions: list[str] = []
        self.conditions: list[ast.AST] = []
        self.findings: list[Finding] = []

    # ---- context ----
    def _function(self) -> str:
        return ".".join(self.functions) or "<module>"

    def _flag(self, node: ast.AST, rule: str) -> None:
        self.findings.append(Finding(self.path, node.lineno, rule, self.lines[node.lineno - 1].strip()))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        self.conditions.append(node.test)
        for child in node.body + node.orelse:
            self.visit(child)
        self.conditions.pop()

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self.visit(node.test)
        self.conditions.append(node.test)
        self.visit(node.body)
        self.visit(node.orelse)
        self.conditions.pop()

    # ---- rules ----
    def _literal_allowed(self) -> bool:
        if any(_mentions_cuda_availability(test) for test in self.conditions):
            return True
        return (self.path, self._function()) in ALLOWED_LITERALS

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        literal_places = [keywords.get("device"), keywords.get("device_type")]
        if name == "device" and owner == "torch" and node.args:
            literal_places.append(node.args[0])
        if name == "to" and isinstance(func, ast.Attribute) and node.args:
            literal_places.append(node.args[0])
        if any(_is_device_literal(place) for place in literal_places) and not self._literal_allowed():
            self._flag(node, "hard-coded device")
        if name == "cuda" and isinstance(func, ast.Attribute) and not self._literal_allowed():
            self._flag(node, "hard-coded device (.cuda())")
        if name in ("load", "load_checkpoint") and (owner == "torch" or name == "load_checkpoint") and "map_location" not in keywords:
            self._flag(node, "checkpoint loaded without map_location")
        if (self.runtime and owner == "torch" and name in FACTORIES and "device" not in keywords
                and not any(CONSTRUCTION.match(f) for f in self.functions)):
            self._flag(node, f"torch.{name} without device= in per-batch code")
        self.generic_visit(node)


def check_source(source: str, path: str, runtime: bool = True) -> list[Finding]:
    """Findings of one file's source (``path`` as reported; ``runtime``: the factory rule applies)."""
    checker = _Checker(path, source, runtime)
    checker.visit(ast.parse(source))
    return checker.findings


def check_package() -> list[Finding]:
    findings = []
    for file in sorted(PACKAGE.rglob("*.py")):
        relative = file.relative_to(PACKAGE).as_posix()
        findings += check_source(file.read_text(encoding="utf-8"), relative, runtime=relative.startswith(RUNTIME_SCOPE))
    return findings


def test_the_package_hard_codes_no_device_and_places_every_runtime_tensor():
    findings = check_package()
    assert not findings, "device findings (fix: device=<module or input>.device, or device=HOST for host bookkeeping " \
                         "from recbole_llmalign.devices; map_location= for loads):\n" + "\n".join(map(str, findings))


PLANTED = '''
import torch

class Model(torch.nn.Module):
    def __init__(self):
        self.table = torch.zeros(4, 2)                       # construction: moves with the module
        self.host = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # chosen by the machine

    def forward(self, x):
        ok = torch.zeros(3, device=x.device)
        on_gpu = x.device.type == "cuda"                      # a comparison, not a placement
        state = torch.load("f.pth", map_location="cpu")
        a = torch.zeros(3)                                    # line 13
        b = x.to("cuda")                                      # line 14
        c = torch.ones(2, device="cuda:0")                    # line 15
        d = x.cuda()                                          # line 16
        e = torch.load("f.pth")                               # line 17
        f = torch.device("cpu")                               # line 18
        with torch.autocast(device_type="cuda"):              # line 19
            pass
'''


def test_the_static_check_flags_every_planted_hard_coded_device():
    found = {(f.line, f.rule) for f in check_source(PLANTED, "planted.py")}
    assert found == {
        (13, "torch.zeros without device= in per-batch code"),
        (14, "hard-coded device"), (15, "hard-coded device"), (16, "hard-coded device (.cuda())"),
        (17, "checkpoint loaded without map_location"), (18, "hard-coded device"), (19, "hard-coded device"),
    }


def test_the_static_check_catches_a_device_removed_from_real_model_code():
    """The same check on the real AlignGenRec source with one ``device=`` planted away: flagged at that line."""
    path = PACKAGE / "model" / "align_genrec.py"
    source = path.read_text(encoding="utf-8")
    assert not check_source(source, "model/align_genrec.py")
    planted_line = "scores = torch.zeros(batch, 1, device=device)"
    assert source.count(planted_line) == 1
    line = source[:source.index(planted_line)].count("\n") + 1
    findings = check_source(source.replace(planted_line, "scores = torch.zeros(batch, 1)"), "model/align_genrec.py")
    assert [(f.line, f.rule) for f in findings] == [(line, "torch.zeros without device= in per-batch code")]
    findings = check_source(source.replace(planted_line, 'scores = torch.zeros(batch, 1, device="cuda")'), "model/align_genrec.py")
    assert [(f.line, f.rule) for f in findings] == [(line, "hard-coded device")]


# ---- behaviour: the tiny models under a default device no real tensor is on ----

def _data(config):
    from recbole.data import create_dataset, data_preparation

    return data_preparation(config, create_dataset(config))


def _model(name, trained_backbone, tiny_llama_dir, **overrides):
    from recbole_llmalign.config import Config
    from recbole_llmalign.utils import get_model

    data_path, dataset, checkpoint = trained_backbone
    settings = dict(item_text_fields=["title", "genre"], backbone_checkpoint=checkpoint, llm_path=str(tiny_llama_dir),
                    llm_layers=2, train_batch_size=8, llm_micro_batch=4)
    if name == "AlignGenRec":
        settings.update(codebook_levels=2, codebook_size=8, codebook_steps=20, beam_size=5, topk=[5])
    settings.update(overrides)
    config = Config(model=name, dataset=dataset, config_dict=cyclic_config(data_path, **settings))
    train, _, test = _data(config)
    model = get_model(name)(config, train._dataset)
    if name == "AlignGenRec":
        model.fit_item_tokenizer(config)
    return model, next(iter(train)), next(iter(test))[0]


def run_on_an_unused_device(model, train_batch, test_batch) -> torch.Tensor:
    """One training step and one full ranking while every tensor created without a device goes to
    ``meta``; returns the scores (on the inputs' device when nothing was misplaced)."""
    model.train()
    with torch.device("meta"):
        losses = model.calculate_loss(train_batch)
        loss = sum(losses) if isinstance(losses, tuple) else losses
        loss.backward()
        model.eval()
        scores = model.full_sort_predict(test_batch)
    assert loss.device.type == "cpu" and torch.isfinite(loss)
    assert scores.device.type == "cpu"
    return scores


@pytest.mark.parametrize("name", ["AlignLLMRec", "AlignGenRec"])
def test_models_create_no_tensor_off_their_inputs_device(name, trained_backbone, tiny_llama_dir):
    model, train_batch, test_batch = _model(name, trained_backbone, tiny_llama_dir)
    scores = run_on_an_unused_device(model, train_batch, test_batch)
    assert scores.shape == (test_batch[model.ITEM_SEQ].size(0), model.n_items)
    assert model.backbone.item_embedding.weight.device.type == "cpu"


def test_the_backbone_creates_no_tensor_off_its_inputs_device(trained_backbone):
    from recbole_llmalign.compat import load_checkpoint
    from recbole_llmalign.config import Config
    from recbole_llmalign.model.align_sasrec import AlignSASRec

    data_path, dataset, checkpoint = trained_backbone
    config = Config(model="AlignSASRec", dataset=dataset, config_dict=cyclic_config(data_path, item_text_fields=["title", "genre"]))
    train, _, test = _data(config)
    model = AlignSASRec(config, train._dataset)
    model.load_state_dict(load_checkpoint(checkpoint, map_location="cpu")["state_dict"])
    scores = run_on_an_unused_device(model, next(iter(train)), next(iter(test))[0])
    assert torch.isfinite(scores[:, 1:]).all()


def test_the_behavioural_check_fails_on_a_planted_implicit_device(trained_backbone, tiny_llama_dir, monkeypatch):
    """The same run with position ids built without a device (as a hard-coded CPU tensor would be on a GPU) fails."""
    from recbole_llmalign.model.abstract_recommender import FrozenBackboneLLMRecommender

    model, train_batch, test_batch = _model("AlignGenRec", trained_backbone, tiny_llama_dir)
    monkeypatch.setattr(FrozenBackboneLLMRecommender, "positions",
                        staticmethod(lambda mask, offset=0: torch.arange(mask.size(1)).expand_as(mask) + offset))
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        run_on_an_unused_device(model, train_batch, test_batch)


# ---- the GPU profile ----

def test_the_gpu_profile_reaches_the_config_below_the_users_keys(cyclic_dataset):
    import yaml

    from recbole_llmalign.config import PROPERTIES_DIR, Config, ConfigError

    data_path, name = cyclic_dataset
    profile = yaml.safe_load((PROPERTIES_DIR / "profile" / "gpu" / "FrozenBackboneLLMRecommender.yaml").read_text())
    assert profile["llm_layers"] is None and profile["llm_micro_batch"] > 32
    plain = Config(model="AlignLLMRec", dataset=name, config_dict=cyclic_config(data_path))
    mine = cyclic_config(data_path, device_profile="gpu")
    gpu = Config(model="AlignLLMRec", dataset=name, config_dict=mine)
    assert set(profile) - set(mine), "the profile sets nothing the test's own config leaves open"
    for key, value in profile.items():
        assert gpu[key] == mine.get(key, value), key  # the profile's value, or the user's where they set the key
    assert plain["llm_layers"] == 8 and plain["llm_micro_batch"] == 32  # no profile: the CPU defaults
    mine = Config(model="AlignGenRec", dataset=name, config_dict=cyclic_config(data_path, device_profile="gpu", llm_micro_batch=7))
    assert mine["llm_micro_batch"] == 7 and mine["llm_layers"] is None  # the user's key wins; the rest of the profile holds
    backbone = Config(model="AlignSASRec", dataset=name, config_dict=cyclic_config(data_path, device_profile="gpu"))
    assert backbone["all_positions_batch_size"] == plain_value("AlignSASRec", "all_positions_batch_size")
    with pytest.raises(ConfigError, match="device_profile 'tpu' is not a shipped profile.*gpu"):
        Config(model="AlignLLMRec", dataset=name, config_dict=cyclic_config(data_path, device_profile="tpu"))


def plain_value(model: str, key: str):
    import yaml

    from recbole_llmalign.config import PROPERTIES_DIR

    return yaml.safe_load((PROPERTIES_DIR / "model" / f"{model}.yaml").read_text())[key]


def test_every_property_key_is_documented_where_it_lives():
    """Each top-level key of every shipped YAML file has its comment on its line (type and meaning)."""
    from recbole_llmalign.config import PROPERTIES_DIR

    bare = []
    for file in sorted(PROPERTIES_DIR.rglob("*.yaml")):
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if re.match(r"^[A-Za-z_][\w-]*:", line) and "#" not in line:
                bare.append(f"{file.relative_to(PROPERTIES_DIR)}:{number}: {line}")
    assert not bare, "\n".join(bare)
