"""The entry point behaves like RecBole's: same metrics, clear errors, budget, comparison output."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

import recbole_llmalign  # noqa: F401
from recbole_llmalign.quick_start import compare, run_recbole_llmalign, run_with_cost
from recbole_llmalign.utils import get_model
from tests.conftest import TINY_SEQUENTIAL, cyclic_config

RESULT_KEYS = {"best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"}


def test_sasrec_metrics_equal_recboles_own_run_recbole():
    """Same config and seed through both entry points -> exactly the same metrics."""
    from recbole.quick_start import run_recbole

    config = dict(TINY_SEQUENTIAL, train_neg_sample_args=None,
                  load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]})
    ours = run_recbole_llmalign("SASRec", "ml-100k", config_dict=dict(config), saved=True)
    theirs = run_recbole(model="SASRec", dataset="ml-100k", config_dict=dict(config), saved=True)
    assert set(theirs) == RESULT_KEYS and RESULT_KEYS <= set(ours)
    assert ours["test_result"] == theirs["test_result"]
    assert ours["best_valid_result"] == theirs["best_valid_result"]
    assert ours["test_result"]["ndcg@10"] > 0


def test_unknown_model_lists_both_registries_instead_of_lightgbm_error():
    with pytest.raises(ValueError) as error:
        get_model("SASRecc")
    message = str(error.value)
    assert "Unknown model 'SASRecc'" in message and "Did you mean SASRec" in message
    assert "RecBole models:" in message and "GRU4Rec" in message and "recbole_llmalign models:" in message


def test_unknown_model_through_cli_is_a_clear_error(capsys):
    from recbole_llmalign.cli import main

    assert main(["--model=NoSuchModel", "--dataset=ml-100k"]) == 2
    assert "error: Unknown model 'NoSuchModel'" in capsys.readouterr().err


def test_time_budget_stops_after_first_epoch_and_still_evaluates(cyclic_dataset):
    data_path, name = cyclic_dataset
    result, cost = run_with_cost("GRU4Rec", name, config_dict=cyclic_config(data_path, epochs=50, train_time_budget=1e-9))
    assert (cost.epochs, cost.stopped_by) == (1, "budget")
    assert RESULT_KEYS <= set(result) and Path(cost.checkpoint).is_file()  # its one epoch was kept and evaluated on test
    assert {"ndcg@5", "hit@5"} <= set(result["test_result"]) and math.isfinite(result["test_result"]["ndcg@5"])


def test_sequential_model_beats_pop_on_a_cyclic_fixture(cyclic_dataset):
    """The pipeline really trains: next = current + 1 is learnable, popularity is flat."""
    data_path, name = cyclic_dataset
    pop, _ = run_with_cost("Pop", name, config_dict=cyclic_config(data_path))
    gru, cost = run_with_cost("GRU4Rec", name, config_dict=cyclic_config(data_path, epochs=25))
    assert gru["test_result"]["ndcg@5"] > 0.5
    assert gru["test_result"]["ndcg@5"] > 3 * pop["test_result"]["ndcg@5"]
    # one (seconds, valid score) point per validated epoch, in time order, ending at or below the best score
    times, scores = zip(*cost.valid_curve)
    assert len(cost.valid_curve) == cost.epochs and list(times) == sorted(times)
    assert max(scores) == pytest.approx(gru["best_valid_result"]["ndcg@5"])


def test_compare_writes_table_csv_and_chart_on_one_protocol(cyclic_dataset, tmp_path):
    data_path, name = cyclic_dataset
    config = cyclic_config(data_path)
    del config["eval_args"]  # compare must choose the shared leave-one-out protocol itself
    records = compare(["Pop", "GRU4Rec"], name, config_dict=config, output_dir=tmp_path / "out", name="cmp")
    assert [r["model"] for r in records] == ["Pop", "GRU4Rec"]
    with open(tmp_path / "out" / "cmp.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["dataset", "model", "setting", "split", "metric", "value"]
    metrics = {(r["model"], r["split"], r["metric"]) for r in rows}
    for model in ("Pop", "GRU4Rec"):
        for key in (("test", "ndcg@5"), ("valid", "ndcg@5"), ("train", "sec_per_epoch"),
                    ("test", "eval_sec"), ("train", "peak_mem_mb")):
            assert (model, *key) in metrics
    from recbole_llmalign import report

    dataset, rebuilt = report.records_from_csv(tmp_path / "out" / "cmp.csv")
    assert dataset == name and report.markdown_table(rebuilt) == report.markdown_table(records)
    gru = records[1]["cost"]["valid_curve"]  # the valid curve survives the CSV (seconds to 0.1 s)
    assert len(gru) == records[1]["cost"]["epochs"] >= 1
    assert [score for _, score in rebuilt[1]["cost"]["valid_curve"]] == pytest.approx([score for _, score in gru])
    assert [t for t, _ in rebuilt[1]["cost"]["valid_curve"]] == pytest.approx([t for t, _ in gru], abs=0.06)
    table = (tmp_path / "out" / "cmp.md").read_text()
    assert "| Pop |" in table and "| GRU4Rec |" in table
    assert (tmp_path / "out" / "cmp.png").stat().st_size > 5000
    # Leave-one-out for both: each of the 120 users contributes exactly one test item, so recall
    # equals hit for both models (under an 80/10/10 random split Pop would see several per user).
    for record in records:
        assert record["result"]["test_result"]["recall@5"] == record["result"]["test_result"]["hit@5"]


def test_cold_slice_holds_exactly_the_users_whose_test_item_is_rare(tmp_path):
    """Users 0-4 end on an item nobody trained on; the others end on a popular item they have not seen."""
    from tests.conftest import write_atomic

    rows = []
    for user in range(20):
        history = [f"p{(user + step) % 12}" for step in range(6)]
        last = f"rare{user}" if user < 5 else f"p{(user + 6) % 12}"
        for step, item in enumerate(history + [last]):
            rows.append([f"u{user}", item, step])
    write_atomic(tmp_path / "d" / "coldslice" / "coldslice.inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    # No negative sampling: RecBole's Pop would otherwise count sampled negatives as interactions.
    config = cyclic_config(str(tmp_path / "d"), cold_item_threshold=0, train_neg_sample_args=None)
    result, _ = run_with_cost("Pop", "coldslice", config_dict=config)
    assert result["test_cold_result"]["n_users"] == 5
    # Six unseen popular items outrank a never-trained item in Pop's top 5.
    assert result["test_cold_result"]["hit@5"] == 0.0
    assert result["test_result"]["hit@5"] > 0.5


def test_exclude_history_items_ranks_every_input_item_last_for_any_sequential_model(cyclic_dataset):
    """A scorer that puts the user's own history first and the true next item right after: under
    RecBole's protocol the history fills the top 5 (NDCG@5 = 0); with exclude_history_items the
    next item is first (NDCG@5 = 1)."""
    import torch
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer

    from recbole_llmalign.config import Config
    from recbole_llmalign.trainer import with_run_controls

    data_path, name = cyclic_dataset
    config = Config(model="SASRec", dataset=name, config_dict=cyclic_config(data_path, exclude_history_items=True))
    train, _, test = data_preparation(config, create_dataset(config))
    model = get_model("SASRec")(config, train._dataset)
    history_field, target_field = model.ITEM_SEQ, model.POS_ITEM_ID

    def history_first(interaction):
        scores = torch.zeros(len(interaction), model.n_items)
        scores.scatter_(1, interaction[history_field], 5.0)
        scores[torch.arange(len(interaction)), interaction[target_field]] = 1.0
        return scores

    model.full_sort_predict = history_first
    trainer = with_run_controls(Trainer)(config, model)
    excluded = trainer.evaluate(test, load_best_model=False, show_progress=False)
    config["exclude_history_items"] = False
    plain = trainer.evaluate(test, load_best_model=False, show_progress=False)
    assert excluded["ndcg@5"] == pytest.approx(1.0) and plain["ndcg@5"] == pytest.approx(0.0)
