"""The leaderboard's run list (``benchmarks/leaderboard.py``): every ``no_llm`` row must be the exact ablation of its LLM
row, or a table's "the LLM's part" compares two recipes instead of LLM on / off."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from leaderboard import ALL_RUNS  # noqa: E402


def test_run_ids_and_rows_are_unique():
    ids = [run for run, *_ in ALL_RUNS]
    rows = [(model, setting) for _, model, setting, _ in ALL_RUNS]
    assert len(set(ids)) == len(ids) and len(set(rows)) == len(rows)


def test_every_no_llm_row_differs_from_its_llm_row_only_by_the_prompt_reader():
    runs = {(model, setting): overrides for _, model, setting, overrides in ALL_RUNS}
    def llm_row(twin: str) -> str:  # no_llm -> default, no_llm_refit_5 -> refit_5, no_llm_items -> llm_items
        rest = twin.removeprefix("no_llm").removeprefix("_")
        return "default" if not rest else rest if ("AlignLLMRec", rest) in runs else f"llm_{rest}"

    pairs = [(setting, llm_row(setting)) for model, setting in runs if model == "AlignLLMRec" and setting.startswith("no_llm")]
    assert len(pairs) >= 8  # the default's ablation and the levers' twins
    for twin, llm in pairs:
        assert ("AlignLLMRec", llm) in runs, f"{twin} has no LLM row named {llm}"
        twin_overrides = dict(runs[("AlignLLMRec", twin)])
        assert twin_overrides.pop("prompt_reader") == "mlp"
        assert twin_overrides == runs[("AlignLLMRec", llm)], f"{twin} and {llm} differ beyond the prompt reader"
