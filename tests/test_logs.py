"""Quiet, useful logs: only third-party warnings about their own calls are hidden (and can be shown
again), and every run ends with a summary whose backbone numbers come from the same test data."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from recbole_llmalign import logs
from tests.conftest import cyclic_config

SCRIPT = Path(__file__).resolve().parents[1] / "run_recbole_llmalign.py"
FILLNA = "A value is trying to be set on a copy of a DataFrame or Series through chained assignment"


def _shown(message: str, category: type[Warning], module: str) -> bool:
    """Whether a warning attributed to ``module`` gets through the current filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(message, category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module,
                               registry={})
    return bool(caught)


@pytest.fixture
def clean_filters(monkeypatch):
    """Every warning shown (pytest's own config ignores FutureWarning), the plugin's filters off afterwards."""
    monkeypatch.delenv(logs.SHOW_ENV, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield
        logs.quiet_third_party_warnings(False)


def test_only_listed_third_party_warnings_are_hidden_and_they_come_back_when_switched_off(clean_filters, monkeypatch):
    third_party = [(FILLNA, FutureWarning, "recbole.data.dataset.dataset"),
                   ("`torch.cuda.amp.GradScaler(args...)` is deprecated.", FutureWarning, "recbole.trainer.trainer"),
                   ("`past_key_values` is deprecated and will be removed", FutureWarning, "torch.nn.modules.module"),
                   ("`is_gradient_checkpointing` is deprecated", FutureWarning, "transformers.modeling_utils"),
                   ("pkg_resources is deprecated as an API.", UserWarning, "ray._private.parameter"),
                   ("torch.sparse.SparseTensor(indices, values, shape, *, device=) is deprecated.", UserWarning,
                    "recbole.model.general_recommender.lightgcn")]
    kept = [(FILLNA, FutureWarning, "my_project.features"),  # the user's own code, same message
            ("'evaluation' has been deprecated", UserWarning, "recbole.data.utils"),  # RecBole speaking to its user
            ("some other deprecation", FutureWarning, "torch.nn.modules.module"),
            ("pkg_resources is deprecated as an API.", UserWarning, "my_project.plugins"),
            ("my own warning", UserWarning, "__main__")]
    assert all(_shown(*w) for w in third_party + kept)  # nothing hides them before the switch

    assert logs.quiet_third_party_warnings() is True
    assert logs.quiet_third_party_warnings() is True  # idempotent
    assert not any(_shown(*w) for w in third_party)
    assert all(_shown(*w) for w in kept)

    assert logs.quiet_third_party_warnings(False) is False
    assert all(_shown(*w) for w in third_party)

    monkeypatch.setenv(logs.SHOW_ENV, "show")  # the environment wins over the key
    assert logs.quiet_third_party_warnings(True) is False
    assert all(_shown(*w) for w in third_party)


def test_load_report_of_layers_cut_by_llm_layers_is_dropped_but_other_reports_kept(clean_filters, tiny_llama_dir):
    from recbole_llmalign.llm.loader import load_causal_lm

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    library = logging.getLogger("transformers")  # transformers does not propagate to the root logger
    library.addHandler(handler)
    try:
        load_causal_lm(str(tiny_llama_dir), llm_layers=1)  # 3-layer checkpoint: layers 1 and 2 are UNEXPECTED
        assert any("LOAD REPORT" in r.getMessage() for r in records)  # transformers reports the cut ...
        records.clear()
        logs.quiet_third_party_warnings()
        load_causal_lm(str(tiny_llama_dir), llm_layers=1)
        assert not any("LOAD REPORT" in r.getMessage() for r in records)  # ... which is not news once filtered
        missing = ("LlamaForCausalLM LOAD REPORT from: x\nKey | Status | \n----+----\n"
                   "model.layers.{1, 2}.mlp.up_proj.weight | UNEXPECTED | \nlm_head.weight | MISSING | \n")
        logging.getLogger("transformers.modeling_utils").warning(missing)
        assert [r.getMessage() for r in records] == [missing]  # a missing weight is always reported
    finally:
        library.removeHandler(handler)


def _run_script(config_file: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != logs.SHOW_ENV}
    environment["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, str(SCRIPT), "--model=Pop", "--dataset=cyclic", f"--config_files={config_file}", *args],
                          capture_output=True,
                          text=True, timeout=300, env=environment, cwd=config_file.parent)


def test_a_cli_run_prints_no_third_party_warnings_unless_asked_and_ends_with_its_summary(cyclic_dataset, tmp_path):
    data_path, name = cyclic_dataset
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(cyclic_config(data_path, model="Pop", dataset=name, state="INFO")))

    quiet = _run_script(config_file)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "Warning:" not in quiet.stderr and "Warning:" not in quiet.stdout
    last = quiet.stderr.strip().splitlines()[-1]
    assert "Pop test ndcg@5 " in last  # the headline closes the run
    assert "Run summary: Pop on cyclic" in quiet.stderr

    loud = _run_script(config_file, "--quiet_third_party_warnings=False")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "FutureWarning" in loud.stderr  # RecBole's pandas/torch deprecations are back


def test_llm_model_summary_scores_the_frozen_backbone_on_the_same_test_data(cyclic_dataset, tiny_llama_dir, capsys):
    from recbole_llmalign.quick_start import run_with_cost

    data_path, name = cyclic_dataset
    protocol = {"new_item_ratio": 0.2, "cold_item_threshold": 3}  # the slices a new-item claim is read from
    backbone_result, backbone_cost = run_with_cost("AlignSASRec", name, config_dict=cyclic_config(
        data_path, item_text_fields=["title", "genre"], epochs=2, **protocol))
    assert "backbone_test_result" not in backbone_result  # a model without a backbone
    config = cyclic_config(data_path, item_text_fields=["title", "genre"], backbone_checkpoint=backbone_cost.checkpoint,
                           llm_path=str(tiny_llama_dir), llm_layers=1, llm_micro_batch=16, show_progress=True, **protocol)
    result, cost = run_with_cost("AlignLLMRec", name, config_dict=config)

    scored = result["backbone_test_result"]
    assert scored.keys() == backbone_result["test_result"].keys()
    for metric, value in backbone_result["test_result"].items():  # the backbone's own run, same split and protocol
        assert scored[metric] == pytest.approx(float(value), abs=1e-9)
    for split in ("cold", "new"):  # and on the same slices, so a slice's ratio model / own backbone can be read
        own, backbone_own = result[f"backbone_test_{split}_result"], backbone_result[f"test_{split}_result"]
        assert own["n_users"] == backbone_own["n_users"] > 0 and own["n_users"] == result[f"test_{split}_result"]["n_users"]
        for metric, value in backbone_own.items():
            assert own[metric] == pytest.approx(float(value), abs=1e-6)
    assert "LLM scoring" in capsys.readouterr().err  # the micro-batch bar of the LLM evaluation

    from dataclasses import asdict

    text = logs.format_run_summary("AlignLLMRec", name, result, asdict(cost), 12.0, "AlignSASRec", "NDCG@5")
    model, backbone = float(result["test_result"]["ndcg@5"]), float(scored["ndcg@5"])
    assert text.splitlines()[-1] == (f"AlignLLMRec test ndcg@5 {model:.4f}; backbone AlignSASRec {backbone:.4f}; "
                                     f"ratio {model / backbone:.3f}x")
    assert any(line.startswith("test, backbone AlignSASRec") for line in text.splitlines())


def test_summary_rows_cover_valid_test_and_slices_and_name_the_headline_metric():
    result = {"best_valid_result": {"recall@10": 0.2, "ndcg@10": 0.12},
              "test_result": {"recall@10": 0.18, "ndcg@10": 0.1},
              "test_cold_result": {"recall@10": 0.05, "ndcg@10": 0.02, "n_users": 31.0},
              "test_new_result": {"recall@10": 0.01, "ndcg@10": 0.004, "n_users": 7.0}}
    cost = {"epochs": 3, "best_epoch": 2, "train_sec": 30.0, "eval_sec": 1.5, "peak_mem_mb": 812.0}
    lines = logs.format_run_summary("SASRec", "ml-100k", result, cost, 40.0).splitlines()
    assert lines[0] == "Run summary: SASRec on ml-100k"
    assert lines[1].split() == ["recall@10", "ndcg@10"]
    rows = {match[1]: [match[2], match[3]] for match in (re.match(r"(.*?)\s{2,}(\S+)\s+(\S+)$", line) for line in lines[2:6])}
    assert rows == {"valid (best)": ["0.2000", "0.1200"], "test": ["0.1800", "0.1000"],
                    "test, cold items (31 users)": ["0.0500", "0.0200"], "test, new items (7 users)": ["0.0100", "0.0040"]}
    assert "40.0 s in all" in lines[6] and "3 epochs, best valid after 2" in lines[6] and "812 MB" in lines[6]
    assert lines[-1] == "SASRec test ndcg@10 0.1000"  # no backbone: no ratio
