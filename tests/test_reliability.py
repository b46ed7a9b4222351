"""Determinism and crash recovery: same seed, same metrics; a run killed mid-epoch resumes to the
same final metrics as an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cyclic_config

REPO = Path(__file__).resolve().parents[1]


def _config(data_path: str, **overrides) -> dict:
    return cyclic_config(data_path, item_representation="id", seq_text_align_weight=0.0, id_text_align_weight=0.0,
                         epochs=4, all_positions_batch_size=64, stopping_step=100, **overrides)


def test_same_seed_gives_the_same_metrics_twice(cyclic_dataset, tmp_path):
    from recbole_llmalign.quick_start import run_with_cost

    data_path, name = cyclic_dataset
    config = cyclic_config(data_path, item_text_fields=["title", "genre"], epochs=2)
    first, _ = run_with_cost("AlignSASRec", name, config_dict=config)
    second, _ = run_with_cost("AlignSASRec", name, config_dict=config)
    assert first["test_result"] == second["test_result"] and first["best_valid_result"] == second["best_valid_result"]


KILLED_RUN = """
import os, signal, sys
sys.argv = ["child"]
from recbole_llmalign.model.align_sasrec import AlignSASRec
from recbole_llmalign.quick_start import run_with_cost
calls = {"n": 0}
original = AlignSASRec.calculate_loss
def dying_loss(self, interaction):
    calls["n"] += 1
    if calls["n"] == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: like a node failure
    return original(self, interaction)
AlignSASRec.calculate_loss = dying_loss
run_with_cost("AlignSASRec", NAME, config_dict=CONFIG)
"""


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_metrics(cyclic_dataset, tmp_path):
    from recbole_llmalign.quick_start import run_with_cost

    data_path, name = cyclic_dataset
    config = _config(data_path)
    uninterrupted, _ = run_with_cost("AlignSASRec", name, config_dict=config)  # in tmp_path (the test's cwd)

    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    # 4 batches per epoch: call 10 is the second batch of epoch 2 (0-based), i.e. mid-epoch.
    script = KILLED_RUN.replace("KILL_AT", "10").replace("NAME", repr(name)).replace("CONFIG", repr(config))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-c", script], cwd=killed_dir, env=env, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    latest = list((killed_dir / "saved" / "latest").glob("AlignSASRec-*.pth"))
    assert len(latest) == 1 and not list((killed_dir / "saved").glob("*.tmp-*"))

    os.chdir(killed_dir)
    resumed, cost = run_with_cost("AlignSASRec", name, config_dict={**config, "resume_from_latest": True})
    assert cost.epochs == 2  # epochs 2 and 3 only: 0 and 1 came from the saved state
    assert resumed["test_result"] == pytest.approx(uninterrupted["test_result"], abs=1e-9)
    assert resumed["best_valid_result"] == pytest.approx(uninterrupted["best_valid_result"], abs=1e-9)
