"""Evaluation you can trust: item-text truncation, the amazon-office dataset, the new-item protocol,
why training stopped, per-user metrics, and seeds with aggregates and a paired bootstrap."""

from __future__ import annotations

import csv
import math
import os
import pickle
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import recbole_llmalign  # noqa: F401
from recbole_llmalign import report
from recbole_llmalign.config import Config
from recbole_llmalign.data import choose_new_items, data_preparation, item_texts, prepare_dataset
from recbole_llmalign.data.atomic import verify_dataset_dir
from recbole_llmalign.quick_start import compare, run_with_cost
from tests.conftest import SHARED_DATA, cyclic_config, write_atomic


def _load(model: str, name: str, config_dict: dict, plugin_split: bool = True):
    from recbole.data import create_dataset
    from recbole.data import data_preparation as recbole_data_preparation

    config = Config(model=model, dataset=name, config_dict=config_dict)
    prepare_dataset(config)
    dataset = create_dataset(config)
    split = (data_preparation if plugin_split else recbole_data_preparation)(config, dataset)
    return config, dataset, split


# ---- item text truncation ----

def test_item_text_field_words_cuts_only_the_named_field(tmp_path):
    write_atomic(tmp_path / "d" / "texty" / "texty.inter", ["user_id:token", "item_id:token", "timestamp:float"],
                 [[f"u{u}", f"i{(u + i) % 6}", i] for u in range(6) for i in range(3)])
    write_atomic(tmp_path / "d" / "texty" / "texty.item", ["item_id:token", "title:token_seq", "description:token_seq"],
                 [[f"i{i}", f"Long title number {i} with many words", f"one two three four five six item{i}"] for i in range(6)])
    base = cyclic_config(str(tmp_path / "d"))
    _, dataset, _ = _load("Pop", "texty", dict(base, item_text_field_words={"description": 3}))
    texts = item_texts(dataset, ["title", "description"])
    assert texts[dataset.token2id("item_id", "i1")] == "Long title number 1 with many words; description: one two three"
    _, whole, _ = _load("Pop", "texty", base)
    assert item_texts(whole, ["title", "description"])[whole.token2id("item_id", "i1")].endswith("four five six item1")
    _, bad, _ = _load("Pop", "texty", dict(base, item_text_field_words={"description": 0}))
    with pytest.raises(ValueError, match="item_text_field_words"):
        item_texts(bad, ["title", "description"])


# ---- amazon-office ----

@pytest.mark.parametrize("dataset, verb", [("amazon-office", "bought"), ("amazon-games", "bought"), ("ml-100k", "watched")])
def test_the_llm_prompt_speaks_of_what_the_dataset_records(tmp_path, dataset, verb):
    """Amazon data records purchases, MovieLens viewings: the prompt and instruction say so."""
    config = Config(model="AlignLLMRec", dataset=dataset, config_dict={"data_path": str(tmp_path), "state": "ERROR"})
    assert f"recently {verb} {{history}}" in config["prompt_template"]
    assert f"what a user {verb}" in config["instruction_text"]


def test_amazon_office_is_found_like_amazon_games_with_its_item_text(tmp_path):
    if not (SHARED_DATA / "amazon-office" / "amazon-office.inter").is_file():
        pytest.skip(f"shared amazon-office data not found under {SHARED_DATA}")
    from recbole.data import create_dataset
    from recbole.utils import FeatureType

    config = Config(model="SASRecF", dataset="amazon-office", config_dict={"data_path": str(tmp_path), "state": "ERROR"})
    prepare_dataset(config)  # converted once from the shared copy, quoted so RecBole's reader parses every field
    assert verify_dataset_dir(tmp_path / "amazon-office") and Path(config["data_path"]) == tmp_path / "amazon-office"
    dataset = create_dataset(config)
    assert (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num) == (4_905, 2_420, 53_258)
    assert config["selected_features"] == ["brand", "categories"]
    assert all(dataset.field2type[f] == FeatureType.TOKEN_SEQ for f in config["selected_features"])
    texts = item_texts(dataset, config["item_text_fields"])
    first = texts[dataset.token2id("item_id", "1")]
    assert first.startswith("Northwestern Bell Big-Button Corded Phone") and "; brand: Northwestern Bell; categories: Office" in first
    with open(SHARED_DATA / "amazon-office" / "amazon-office.item", encoding="utf-8") as handle:
        raw = {row[0]: row[4] for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)}
    longest = max(raw, key=lambda item: len(raw[item].split()))  # 3,538 words in the source
    assert texts[dataset.token2id("item_id", longest)].endswith("; description: " + " ".join(raw[longest].split()[:50]))
    assert all(texts[1:])
    opening_quote = texts[dataset.token2id("item_id", "2234")]  # the field RecBole's reader chokes on in the raw file
    assert opening_quote.endswith('description: "TWIN DRAFT GUARD" EXTREME DOOR GUARD As Seen On TV item. Blocks drafts '
                                  'for extra large doors. 2" diameter tube blocks extra large gaps. Fits doors up to 36" wide.')


# ---- new-item protocol ----

def _physically_filtered_copy(data_path: str, name: str, new_tokens: set[str], target: Path) -> None:
    """The fixture with every interaction with a new item removed except each user's last two (valid, test)."""
    with open(Path(data_path) / name / f"{name}.inter", encoding="utf-8") as handle:
        header, *lines = handle.read().splitlines()
    by_user: dict[str, list[list[str]]] = {}
    for line in lines:
        row = line.split("\t")
        by_user.setdefault(row[0], []).append(row)
    kept = []
    for rows in by_user.values():
        rows.sort(key=lambda r: float(r[2]))
        kept += [r for r in rows[:-2] if r[1] not in new_tokens] + rows[-2:]
    write_atomic(target / "filtered" / "filtered.inter", header.split("\t"), kept)


def _training_samples(train_dataset) -> list[tuple[str, tuple[str, ...], str]]:
    """Every training (user, history, target) in external ids; history empty for non-sequential splits."""
    inter = train_dataset.inter_feat
    users = train_dataset.field2id_token["user_id"][inter["user_id"].numpy()]
    items = train_dataset.field2id_token["item_id"]
    targets = items[inter["item_id"].numpy()]
    if "item_id_list" not in inter.columns:
        return sorted((u, (), t) for u, t in zip(users, targets))
    histories = inter["item_id_list"].numpy()
    lengths = inter["item_length"].numpy()
    return sorted((u, tuple(items[h[:n]]), t) for u, h, n, t in zip(users, histories, lengths, targets))


@pytest.mark.parametrize("model", ["SASRec", "Pop"])
def test_new_items_are_removed_from_training_exactly_and_stay_test_targets(cyclic_dataset, tmp_path, model):
    data_path, name = cyclic_dataset
    config, dataset, (train, valid, test) = _load(model, name, cyclic_config(data_path, new_item_ratio=0.2))
    new = dataset.new_item_ids
    assert len(new) == 6 and train._dataset.new_item_ids is new  # 20% of 30 items, carried by every split
    for split in (train, valid, test):  # checkpoints of feature models pickle the dataset: nothing unpicklable is left on it
        pickle.dumps(split._dataset)
    inter = train._dataset.inter_feat
    assert not np.isin(inter["item_id"].numpy(), new).any()  # never a training target
    if model == "SASRec":
        histories, lengths = inter["item_id_list"].numpy(), inter["item_length"].numpy()
        assert not np.isin(histories, new).any()  # never a training input
        assert ((histories > 0).sum(axis=1) == lengths).all()  # lengths count the kept items
    test_targets = test._dataset.inter_feat["item_id"].numpy()
    assert np.isin(test_targets, new).sum() == 24  # each item is the test item of 4 of the 120 users
    if model == "SASRec":  # valid/test histories keep them
        assert np.isin(test._dataset.inter_feat["item_id_list"].numpy(), new).any()
    # Exactly the training split of the same data with those interactions deleted, read by plain RecBole.
    new_tokens = set(dataset.field2id_token["item_id"][new])
    _physically_filtered_copy(data_path, name, new_tokens, tmp_path / "f")
    _, _, (plain_train, _, _) = _load(model, "filtered", cyclic_config(str(tmp_path / "f")), plugin_split=False)
    assert _training_samples(train._dataset) == _training_samples(plain_train._dataset)
    # The same new items for every model type and the same seed; another seed draws another set.
    _, other_type, _ = _load("Pop" if model == "SASRec" else "SASRec", name, cyclic_config(data_path, new_item_ratio=0.2))
    assert set(other_type.field2id_token["item_id"][other_type.new_item_ids]) == new_tokens
    assert set(dataset.field2id_token["item_id"][choose_new_items(dataset, 0.2, 2021)]) != new_tokens


def test_id_only_model_scores_new_items_at_chance_and_per_user_metrics_add_up(cyclic_dataset):
    """SASRec learns next = current + 1 for items it trained on, and can do no better than chance
    on items it never saw: their embeddings carry no signal."""
    data_path, name = cyclic_dataset
    result, cost = run_with_cost("SASRec", name, config_dict=cyclic_config(data_path, epochs=20, new_item_ratio=0.2))
    new = result["test_new_result"]
    assert new["n_users"] == 24
    # NDCG@5 of a uniformly random ranking of the 30 items, and its standard error over 24 users
    gains = [1 / math.log2(rank + 1) for rank in range(1, 6)]
    chance = sum(gains) / 30
    spread = math.sqrt(sum(g * g for g in gains) / 30 - chance ** 2) / math.sqrt(new["n_users"])
    assert new["ndcg@5"] <= chance + 3 * spread
    warm = (result["test_result"]["ndcg@5"] * 120 - new["ndcg@5"] * 24) / 96
    assert warm > 0.5 > 2 * (chance + 3 * spread)  # the same model ranks the items it trained on well
    # per-user file: one row per test user, columns averaging to RecBole's metrics, slice flags
    with open(cost.per_user_file, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 120 and len({r["user"] for r in rows}) == 120
    for metric in ("ndcg@5", "hit@5", "recall@5"):
        assert statistics.mean(float(r[metric]) for r in rows) == pytest.approx(result["test_result"][metric], abs=5e-5)
    flagged = [r for r in rows if r["test_new"] == "1"]
    assert len(flagged) == 24
    assert statistics.mean(float(r["ndcg@5"]) for r in flagged) == pytest.approx(new["ndcg@5"], abs=5e-5)
    assert cost.stopped_by == "epochs" and cost.seed == 2020


@pytest.mark.parametrize("model", ["SASRec", "Pop"])
def test_slices_averaged_from_per_user_metrics_equal_evaluating_the_slice_again(cyclic_dataset, model):
    from recbole_llmalign.quick_start import cold_rows, evaluate_rows, new_rows, slice_from_per_user
    from recbole_llmalign.trainer import with_run_controls
    from recbole_llmalign.utils import get_model, get_trainer

    data_path, name = cyclic_dataset
    config, _, (train, valid, test) = _load(model, name, cyclic_config(data_path, epochs=3, new_item_ratio=0.2,
                                                                      train_neg_sample_args=None, cold_item_threshold=40))
    trainer = with_run_controls(get_trainer(config["MODEL_TYPE"], config["model"]))(config, get_model(model)(config, train._dataset))
    trainer.fit(train, valid, saved=False)
    full = trainer.evaluate(test, load_best_model=False)
    per_user = trainer.last_per_user
    assert {k: round(per_user[k].mean(), 4) for k in full} == full
    for rows in (new_rows(test), cold_rows(config, train, test), np.arange(0, 120, 7)):
        evaluated = evaluate_rows(config, trainer, test, rows)  # a loader of those rows, scored again
        assert slice_from_per_user(config, test, rows, per_user) == {k: v for k, v in evaluated.items() if k != "n_users"}
        assert evaluate_rows(config, trainer, test, rows, per_user) == evaluated and evaluated["n_users"] == len(rows)


# ---- why training stopped ----

def test_stopped_by_names_early_stopping_the_budget_and_the_last_epoch(cyclic_dataset, monkeypatch):
    from recbole.trainer import Trainer

    data_path, name = cyclic_dataset
    _, by_epochs = run_with_cost("GRU4Rec", name, config_dict=cyclic_config(data_path, epochs=2))
    _, by_budget = run_with_cost("GRU4Rec", name, config_dict=cyclic_config(data_path, epochs=50, train_time_budget=1e-9))
    calls = []

    def worse_every_time(self, valid_data, show_progress=False):  # RecBole's real early-stopping loop sees only losses
        calls.append(1)
        score = 1.0 / len(calls)
        return score, {"ndcg@5": score}

    monkeypatch.setattr(Trainer, "_valid_epoch", worse_every_time)
    _, by_stopping = run_with_cost("GRU4Rec", name, config_dict=cyclic_config(data_path, epochs=50, stopping_step=1))
    assert (by_epochs.stopped_by, by_epochs.epochs) == ("epochs", 2)
    assert (by_budget.stopped_by, by_budget.epochs, by_budget.train_time_budget) == ("budget", 1, 1e-9)
    assert (by_stopping.stopped_by, by_stopping.epochs) == ("early_stop", 3)  # best, then 2 validations without gain
    assert by_epochs.cpu_threads == torch.get_num_threads() >= 1  # what s/epoch was measured with
    rows = report.long_rows({"model": "GRU4Rec", "result": {}, "cost": {"stopped_by": "budget"}}, name)
    assert {r[4]: r[5] for r in rows} == {"stopped_by_early_stop": 0.0, "stopped_by_budget": 1.0, "stopped_by_epochs": 0.0}


# ---- seeds: aggregates and the paired bootstrap ----

def _record(model: str, setting: str, seed: int, ndcg: float, epochs: int, stopped: str = "early_stop") -> dict:
    return {"model": model, "setting": setting, "seed": seed,
            "result": {"test_result": {"ndcg@10": ndcg}, "test_new_result": {"ndcg@10": ndcg / 2, "n_users": 3.0}},
            "cost": {"sec_per_epoch": 2.0, "epochs": epochs, "best_epoch": epochs, "train_sec": 2.0 * epochs,
                     "time_to_best_sec": 1.0, "peak_mem_mb": 100.0, "eval_sec": 0.5, "seed": seed,
                     "stopped_by": stopped, "train_time_budget": 0.0, "extra": {}}}


def test_aggregate_rows_match_a_hand_computation(tmp_path):
    values = {2020: 0.30, 2021: 0.36, 2022: 0.27}
    records = [_record("SASRec", "default", s, v, 10 + i) for i, (s, v) in enumerate(values.items())]
    records += [_record("AlignSASRec", "id_only", s, v + 0.05, 5, "budget" if s == 2022 else "early_stop") for s, v in values.items()]
    rows = [row for r in records for row in report.long_rows(r, "toy")]
    assert {row[2] for row in rows} == {f"{s}/seed_{n}" for s in ("default", "id_only") for n in values}
    aggregates = {(r[1], r[2], r[3], r[4]): r[5] for r in report.aggregate_rows(rows)}
    assert aggregates[("SASRec", "mean", "test", "ndcg@10")] == pytest.approx(statistics.mean(values.values()))
    assert aggregates[("SASRec", "std", "test", "ndcg@10")] == pytest.approx(statistics.stdev(values.values()))
    assert aggregates[("SASRec", "mean", "train", "epochs")] == pytest.approx(11.0)
    assert aggregates[("SASRec", "mean", "test_new", "ndcg@10")] == pytest.approx(statistics.mean(values.values()) / 2)
    assert aggregates[("AlignSASRec", "id_only/mean", "test", "ndcg@10")] == pytest.approx(statistics.mean(values.values()) + 0.05)
    assert aggregates[("AlignSASRec", "id_only/mean", "train", "stopped_by_budget")] == pytest.approx(1 / 3)
    assert ("SASRec", "mean", "train", "seed") not in aggregates
    report.write_comparison(records, "toy", tmp_path, "agg")
    header, *written = (tmp_path / "agg.csv").read_text().splitlines()
    assert header == "dataset,model,setting,split,metric,value"
    assert "toy,SASRec,std,test,ndcg@10,0.0458258" in written
    _, rebuilt = report.records_from_csv(tmp_path / "agg.csv")  # runs back, aggregates recomputed not read
    assert [(r["model"], r["setting"], r["seed"], r["cost"]["stopped_by"]) for r in rebuilt] == \
        [(r["model"], r["setting"], r["seed"], r["cost"]["stopped_by"]) for r in records]
    table = (tmp_path / "agg.md").read_text()
    assert "| SASRec | default | 3 | 0.3100 ± 0.0458 |" in table
    assert "early_stop x2, budget (0 s) x1" in table


def test_thread_counts_are_kept_and_a_table_shows_them_only_where_runs_differ(tmp_path):
    """s/epoch compares CPU runs only at equal thread counts: a resumed table may mix runs from several calls."""
    same = [_record("SASRec", "default", s, 0.30, 5) for s in (2020, 2021)] + [_record("GRU4Rec", "default", 2020, 0.2, 5)]
    for record in same:
        record["cost"]["cpu_threads"] = 2
    report.write_comparison(same, "toy", tmp_path, "same")
    assert "threads" not in (tmp_path / "same.md").read_text()
    assert "toy,SASRec,default/seed_2021,train,cpu_threads,2" in (tmp_path / "same.csv").read_text().splitlines()
    _, rebuilt = report.records_from_csv(tmp_path / "same.csv")
    assert [r["cost"]["cpu_threads"] for r in rebuilt] == [2, 2, 2]
    mixed = same + [_record("SASRec", "default", 2022, 0.31, 5)]  # a run from before the count was recorded
    mixed[2]["cost"]["cpu_threads"] = 1
    report.write_comparison(mixed, "toy", tmp_path, "mixed")
    lines = (tmp_path / "mixed.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| model |")).split(" | ")
    column = header.index("threads")
    rows = [line.split(" | ") for line in lines[lines.index(" | ".join(header)):]]
    cells = {row[0].strip("| "): row[column] for row in rows[2:] if len(row) == len(header)}  # the main table only
    assert cells == {"SASRec": "2, -", "GRU4Rec": "1"}
    assert "| threads |" in report.markdown_table([same[0], mixed[2]])
    assert "threads" not in report.markdown_table(same[:2])


def test_llm_rows_report_their_own_backbone_and_the_ratio_in_csv_and_tables(tmp_path):
    """A frozen-backbone model's backbone test metrics become split test_backbone and a ratio column."""
    records = [_record("AlignSASRec", "default", s, 0.30, 5) for s in (2020, 2021)]
    records += [_record("AlignLLMRec", "no_llm", s, v, 3) for s, v in ((2020, 0.33), (2021, 0.31))]
    for record, backbone, new in zip(records[2:], (0.30, 0.29), (0.10, 0.12)):
        record["result"]["backbone_test_result"] = {"ndcg@10": backbone}
        record["result"]["backbone_test_new_result"] = {"ndcg@10": new}  # the new-item slice (the model's: half its test)
    report.write_comparison(records, "toy", tmp_path, "own")
    written = (tmp_path / "own.csv").read_text().splitlines()
    assert "toy,AlignLLMRec,no_llm/seed_2021,test_backbone,ndcg@10,0.29" in written
    assert "toy,AlignLLMRec,no_llm/mean,test_backbone,ndcg@10,0.295" in written
    assert "toy,AlignLLMRec,no_llm/mean,test_backbone_new,ndcg@10,0.11" in written
    table = (tmp_path / "own.md").read_text()
    assert "own backbone test ndcg@10 (ratio)" in table and "own backbone new ndcg@10 (ratio)" in table
    assert "own backbone cold" not in table  # no record has that slice's backbone value
    assert "0.2950 (1.085x)" in table  # mean 0.32 over mean 0.295
    assert "0.1100 (1.455x)" in table  # new: mean 0.16 over mean 0.11
    _, rebuilt = report.records_from_csv(tmp_path / "own.csv")
    assert rebuilt[3]["result"]["backbone_test_new_result"] == {"ndcg@10": 0.12}
    assert table.count("| - |") >= 1  # AlignSASRec has no own backbone
    single = report.markdown_table(records[2:3])
    assert "0.3000 (1.100x)" in single


def test_paired_bootstrap_matches_a_hand_computation():
    users = np.array(["c", "a", "b", "d", "a", "b", "c", "e"])  # two seeds; "d" and "e" scored in one only
    differences = np.array([0.5, 1.0, -0.2, 0.0, 0.6, 0.2, 0.1, 1.5])
    mean, low, high, n = report.paired_bootstrap(users, differences, n_boot=500, seed=7)
    # by hand: users sorted a..e, each with the sum and count of their differences over seeds
    sums = {"a": 1.6, "b": 0.0, "c": 0.6, "d": 0.0, "e": 1.5}
    counts = {"a": 2, "b": 2, "c": 2, "d": 1, "e": 1}
    keys = sorted(sums)
    rng = np.random.default_rng(7)
    estimates = []
    for _ in range(500):
        drawn = [keys[i] for i in rng.integers(0, 5, size=5)]
        estimates.append(sum(sums[u] for u in drawn) / sum(counts[u] for u in drawn))
    assert n == 5 and mean == pytest.approx(sum(differences) / len(differences))
    assert (low, high) == pytest.approx(tuple(np.quantile(estimates, [0.025, 0.975])))
    same, *interval, _ = report.paired_bootstrap(np.arange(50), np.full(50, 0.25))
    assert same == pytest.approx(0.25) and interval == pytest.approx([0.25, 0.25])
    noisy = np.random.default_rng(0).normal(0.1, 1.0, 4000)  # interval ~ mean +- 1.96 sd / sqrt(n)
    mean, low, high, _ = report.paired_bootstrap(np.arange(4000), noisy)
    assert (high - low) == pytest.approx(2 * 1.96 / math.sqrt(4000), rel=0.1) and low < mean < high


def _per_user_files(per_user: Path, scores: dict[tuple[str, str, int], dict[str, tuple[float, int]]]) -> list[dict]:
    """Per-user files of ``(model, setting, seed) -> {user: (ndcg@10, test_new flag)}`` and a record per run."""
    per_user.mkdir(exist_ok=True)
    for (model, setting, seed), table in scores.items():
        lines = ["user,ndcg@10,test_cold,test_new"] + [f"{u},{v},0,{flag}" for u, (v, flag) in table.items()]
        report.per_user_path(per_user, model, setting, seed).write_text("\n".join(lines) + "\n")
    return [_record(m, st, s, 0.0, 1) for m, st, s in scores]


def test_significance_rows_pair_users_per_seed_and_restrict_slices(tmp_path):
    per_user = tmp_path / "per_user"
    records = _per_user_files(per_user, {
        ("SASRec", "default", 1): {"u1": (0.5, 0), "u2": (0.0, 1), "u3": (1.0, 1)},
        ("SASRecF", "default", 1): {"u1": (0.6, 0), "u2": (0.3, 1), "u3": (1.0, 1), "u9": (1.0, 0)},  # u9: not paired
        ("SASRec", "default", 2): {"u1": (0.4, 1), "u2": (0.2, 0), "u3": (0.8, 0)},
        ("SASRecF", "default", 2): {"u1": (0.4, 1), "u2": (0.5, 0), "u3": (0.9, 0)},
    })
    rows = report.significance_rows(records, "toy", "SASRec", per_user, n_boot=300)
    found = {(r[1], r[2], r[3], r[4]): r[5] for r in rows}
    test_users = ["u1", "u2", "u3", "u1", "u2", "u3"]
    test_diffs = [0.1, 0.3, 0.0, 0.0, 0.3, 0.1]
    expected = report.paired_bootstrap(np.array(test_users), np.array(test_diffs), n_boot=300)
    assert [found[("SASRecF", "mean", "test", f"ndcg@10{s}")] for s in report.DIFF_SUFFIXES] == pytest.approx(expected[:3])
    new = report.paired_bootstrap(np.array(["u2", "u3", "u1"]), np.array([0.3, 0.0, 0.0]), n_boot=300)
    assert found[("SASRecF", "mean", "test_new", "ndcg@10_diff")] == pytest.approx(new[0])
    assert found[("SASRecF", "mean", "test", "ndcg@10" + report.SEEDS_SUFFIX)] == 2  # both seeds pooled
    del records[0]  # seed 1's SASRec run gone (no per-user file on this machine): only seed 2 pairs
    os.remove(report.per_user_path(per_user, "SASRec", "default", 1))
    fewer = {(r[1], r[2], r[3], r[4]): r[5] for r in report.significance_rows(records, "toy", "SASRec", per_user, n_boot=300)}
    assert fewer[("SASRecF", "mean", "test", "ndcg@10_diff_seeds")] == 1
    assert fewer[("SASRecF", "mean", "test", "ndcg@10_diff")] == pytest.approx(np.mean([0.0, 0.3, 0.1]))
    table = report.significance_table([["toy", *key, value] for key, value in fewer.items()], "SASRec")
    assert "| SASRecF | mean | test | +0.1333 |" in table and table.splitlines()[4].endswith("| 1 |")
    assert ("SASRecF", "mean", "test_cold", "ndcg@10_diff") not in found  # nobody in that slice
    assert not any(key[0] == "SASRec" for key in found)  # the reference is not tested against itself


def _three_models(per_user: Path) -> list[dict]:
    """SASRec, SASRecF (varied gains) and AlignSASRec:id_only (SASRec minus exactly 0.1 for every user), two seeds."""
    base = {1: [0.5, 0.2, 0.9, 0.6, 0.3, 0.7], 2: [0.4, 0.8, 0.3, 0.5, 0.6, 0.2]}
    gain = [0.2, -0.1, 0.0, 0.3, 0.1, -0.2]
    scores = {}
    for seed, values in base.items():
        flags = [(i + seed) % 2 for i in range(len(values))]  # a test_new slice of half the users
        scores[("SASRec", "default", seed)] = {f"u{i}": (v, f) for i, (v, f) in enumerate(zip(values, flags))}
        scores[("SASRecF", "default", seed)] = {f"u{i}": (v + g, f) for i, (v, g, f) in enumerate(zip(values, gain, flags))}
        scores[("AlignSASRec", "id_only", seed)] = {f"u{i}": (round(v - 0.1, 4), f) for i, (v, f) in enumerate(zip(values, flags))}
    return _per_user_files(per_user, scores)


def _seeds_columns(markdown: str) -> dict[tuple[str, str], dict[str, str]]:
    """The first table of a comparison's Markdown (the seeds table) as (model, setting) -> {header: cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        if line.startswith("|---"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        table[(cells["model"], cells["setting"])] = cells
    return table


def test_further_references_add_vs_rows_equal_to_their_own_primary_run(tmp_path):
    per_user = tmp_path / "per_user"
    records = _three_models(per_user)
    out = {}
    for label, reference in (("multi", "SASRec, AlignSASRec:id_only,Nope"), ("listed", ["SASRec", "AlignSASRec:id_only", "Nope"]),
                             ("sasrec", "SASRec"), ("id_only", "AlignSASRec:id_only")):
        report.write_comparison(records, "toy", tmp_path / label, "cmp", reference=reference, per_user_dir=per_user)
        out[label] = ((tmp_path / label / "cmp.csv").read_text().splitlines(), (tmp_path / label / "cmp.md").read_text())
    multi, markdown = out["multi"]
    assert out["listed"] == out["multi"]  # a list is the same as a comma string
    vs = "_vs_AlignSASRec:id_only"
    # the primary rows, and everything else, are exactly the one-reference file; the further reference adds only _vs_ rows
    assert [line for line in multi if vs not in line] == out["sasrec"][0]
    assert not any("_vs_Nope" in line or "Nope" in line for line in multi)  # unknown: no rows, no crash
    # the _vs_ rows are the rows of a run with AlignSASRec:id_only as its one (primary) reference
    assert [line.replace(vs, "") for line in multi if vs in line] == [line for line in out["id_only"][0] if "_diff" in line]
    value = {tuple(line.split(",")[1:5]): float(line.split(",")[5]) for line in multi[1:]}
    assert [value[("SASRec", "mean", "test", f"ndcg@10{s}{vs}")] for s in report.DIFF_SUFFIXES] == pytest.approx([0.1] * 3)
    assert ("AlignSASRec", "id_only/mean", "test", f"ndcg@10_diff{vs}") not in value  # not against itself
    assert value[("SASRecF", "mean", "test_new", f"ndcg@10_diff{vs}")] == pytest.approx(0.1 + np.mean([0.2, 0.3, -0.2, -0.1, 0.0, 0.1]))
    # one seeds-table column per reference, primary first, and no other column; a reference's own row shows "-"
    table = _seeds_columns(markdown)
    header = list(_seeds_columns(out["sasrec"][1])[("SASRec", "default")])
    diff_columns = ["test ndcg@10 - SASRec [95%]", "test ndcg@10 - AlignSASRec:id_only [95%]"]
    at = header.index(diff_columns[0]) + 1
    assert list(table[("SASRec", "default")]) == header[:at] + diff_columns[1:] + header[at:]
    assert table[("SASRec", "default")][diff_columns[0]] == "-" and table[("AlignSASRec", "id_only")][diff_columns[1]] == "-"
    assert table[("SASRec", "default")][diff_columns[1]] == "+0.1000 [+0.1000, +0.1000] significant"
    assert table[("AlignSASRec", "id_only")][diff_columns[0]] == "-0.1000 [-0.1000, -0.1000] significant"
    assert [c for c in _seeds_columns(out["sasrec"][1])[("SASRec", "default")] if c.startswith("test ndcg@10 - ")] == diff_columns[:1]
    # a significance table per reference that has rows; the primary's is the one-reference table
    assert markdown.count("Paired bootstrap over test users") == 2 and "difference to Nope" not in markdown
    primary = out["sasrec"][1].split("Paired bootstrap over test users")[1]
    assert "Paired bootstrap over test users" + primary in markdown
    assert "difference to AlignSASRec:id_only (95% interval), pooled over the seeds" in out["id_only"][1].split("Test ndcg@10 per seed")[1]
    assert out["id_only"][1].split("Paired bootstrap over test users")[1] == markdown.split("Paired bootstrap over test users")[2]
    # without seeds the rows sit under the runs' own settings: resume still reads back only the runs
    for record in records:
        if record["seed"] == 1:
            source = report.per_user_path(per_user, record["model"], record["setting"], 1)
            report.per_user_path(per_user, record["model"], record["setting"], None).write_text(source.read_text())
    single = [{**r, "seed": None, "cost": {**r["cost"], "seed": None}} for r in records if r["seed"] == 1]
    for label, reference in (("plain_multi", "SASRec,AlignSASRec:id_only"), ("plain", "SASRec")):
        report.write_comparison(single, "toy", tmp_path / label, "cmp", reference=reference, per_user_dir=per_user)
    assert f"toy,SASRec,default,test,ndcg@10_diff{vs},0.1" in (tmp_path / "plain_multi" / "cmp.csv").read_text().splitlines()
    assert report.records_from_csv(tmp_path / "plain_multi" / "cmp.csv") == report.records_from_csv(tmp_path / "plain" / "cmp.csv")


def test_bootstrap_rows_survive_lost_per_user_files_until_their_runs_train_again(tmp_path):
    per_user = tmp_path / "per_user"
    records = _three_models(per_user)
    for label, reference in (("before", "SASRec,AlignSASRec:id_only"), ("swapped", "AlignSASRec:id_only,SASRec"),
                             ("id_only", "AlignSASRec:id_only")):
        report.write_comparison(records, "toy", tmp_path / label, "cmp", reference=reference, per_user_dir=per_user)
    before = report.read_csv(tmp_path / "before" / "cmp.csv")
    for path in per_user.iterdir():  # another machine: the results file, no per-user metrics
        path.unlink()
    everything = {("SASRec", "default"), ("SASRecF", "default"), ("AlignSASRec", "id_only")}

    def resumed(reference: str, unchanged: set) -> list[str]:
        kept = report.kept_significance_rows(before, reference, unchanged)
        report.write_comparison(records, "toy", tmp_path / "after", "cmp", reference=reference, per_user_dir=per_user,
                                kept_significance=kept)
        return (tmp_path / "after" / "cmp.csv").read_text().splitlines()

    assert resumed("SASRec,AlignSASRec:id_only", everything) == (tmp_path / "before" / "cmp.csv").read_text().splitlines()
    # the references in another order: the rows are renamed, as if computed in that order
    assert sorted(resumed("AlignSASRec:id_only,SASRec", everything)) == sorted(
        (tmp_path / "swapped" / "cmp.csv").read_text().splitlines())
    assert sorted(resumed("AlignSASRec:id_only", everything)) == sorted((tmp_path / "id_only" / "cmp.csv").read_text().splitlines())
    # a run that trained again, or whose reference did, loses its earlier rows: they described other runs
    lines = resumed("SASRec,AlignSASRec:id_only", everything - {("SASRecF", "default")})
    assert not any(",SASRecF," in line and "_diff" in line for line in lines)
    assert any(",AlignSASRec,id_only/mean,test,ndcg@10_diff," in line for line in lines)
    lines = resumed("SASRec,AlignSASRec:id_only", everything - {("SASRec", "default")})
    assert [line for line in lines if "_diff" in line] and all("_vs_AlignSASRec:id_only" in line for line in lines if "_diff" in line)
    assert not any("_diff" in line for line in resumed("SASRecF", everything))  # never a reference before: nothing to keep
    # the file names its primary reference, so a run left without primary rows (retrained elsewhere) cannot make it
    # ambiguous; a file from before that row, where two runs have none, keeps no primary row
    assert "toy,SASRec,mean,test,primary_reference,1" in (tmp_path / "before" / "cmp.csv").read_text().splitlines()
    ambiguous = [row for row in before if not (row["model"] == "SASRecF" and "_diff" in row["metric"] and "_vs_" not in row["metric"])]
    kept = report.kept_significance_rows(ambiguous, "SASRec,AlignSASRec:id_only", everything)
    assert any(row[1] == "AlignSASRec" and report.split_diff_metric(row[4])[2] is None for row in kept)
    unmarked = [row for row in ambiguous if row["metric"] != report.PRIMARY_REFERENCE_METRIC]
    assert not any(report.split_diff_metric(row[4])[2] is None
                   for row in report.kept_significance_rows(unmarked, "SASRec,AlignSASRec:id_only", everything))


def test_compare_runs_every_seed_writes_aggregates_and_bootstrap_and_resumes(cyclic_dataset, tmp_path):
    data_path, name = cyclic_dataset
    config = cyclic_config(data_path, new_item_ratio=0.2, train_neg_sample_args=None)
    out, per_user = tmp_path / "out", tmp_path / "per_user"
    records = compare(["Pop", "GRU4Rec"], name, config_dict=config, output_dir=out, name="seeded", seeds=[2020, 2021],
                      reference="Pop", per_user_dir=per_user)
    assert [(r["model"], r["seed"]) for r in records] == [("Pop", 2020), ("GRU4Rec", 2020), ("Pop", 2021), ("GRU4Rec", 2021)]
    assert {p.name for p in per_user.iterdir()} == {f"{m}__default__seed{s}.csv" for m in ("Pop", "GRU4Rec") for s in (2020, 2021)}
    with open(out / "seeded.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    settings = {(r["model"], r["setting"]) for r in rows}
    assert settings == {(m, s) for m in ("Pop", "GRU4Rec") for s in ("default/seed_2020", "default/seed_2021", "mean", "std")}
    value = {(r["model"], r["setting"], r["split"], r["metric"]): float(r["value"]) for r in rows}
    per_seed = [value[("GRU4Rec", f"default/seed_{s}", "test", "ndcg@5")] for s in (2020, 2021)]
    assert value[("GRU4Rec", "mean", "test", "ndcg@5")] == pytest.approx(statistics.mean(per_seed), abs=1e-5)
    assert value[("GRU4Rec", "default/seed_2021", "test_new", "n_users")] == 24
    low, high = value[("GRU4Rec", "mean", "test", "ndcg@5_diff_lo")], value[("GRU4Rec", "mean", "test", "ndcg@5_diff_hi")]
    assert low <= value[("GRU4Rec", "mean", "test", "ndcg@5_diff")] <= high
    assert ("Pop", "mean", "test", "ndcg@5_diff") not in value
    first = (out / "seeded.csv").read_text()
    again = compare(["Pop", "GRU4Rec"], name, config_dict=config, output_dir=out, name="seeded", seeds=[2020, 2021],
                    reference="Pop", per_user_dir=per_user, resume=True)  # nothing left to run
    assert (out / "seeded.csv").read_text() == first and len(again) == 4
    moved = tmp_path / "per_user_elsewhere"
    per_user.rename(moved)  # resumed where the per-user files are not: the bootstrap rows are kept, not lost
    compare(["Pop", "GRU4Rec"], name, config_dict=config, output_dir=out, name="seeded", seeds=[2020, 2021],
            reference="Pop", per_user_dir=per_user, resume=True)
    assert (out / "seeded.csv").read_text() == first
    moved.rename(per_user)
    assert "| GRU4Rec | default | 2 |" in (out / "seeded.md").read_text()
    # a new run planned before finished ones: the finished ones after it are still written
    compare([("Pop", "again", {}), "Pop", "GRU4Rec"], name, config_dict=config, output_dir=out, name="seeded", seeds=[2020],
            reference="Pop", per_user_dir=per_user, resume=True)
    written = {(r["model"], r["setting"]) for r in csv.DictReader(open(out / "seeded.csv", encoding="utf-8"))}
    assert {("Pop", "again/seed_2020"), ("GRU4Rec", "default/seed_2020"), ("GRU4Rec", "default/seed_2021")} <= written
    # re-rendered with only a later row named (nothing runs): the rows keep the file's order
    compare(["GRU4Rec"], name, config_dict=config, output_dir=out, name="seeded", seeds=[2020, 2021],
            reference="Pop", per_user_dir=per_user, resume=True)
    table = (out / "seeded.md").read_text()
    assert table.index("| Pop | default |") < table.index("| GRU4Rec | default |") < table.index("| Pop | again |")
    # rerun: the named (model, setting) trains again, every other finished run is kept as it was
    stamps = {p.name: p.stat().st_mtime_ns for p in per_user.iterdir()}
    compare(["Pop", "GRU4Rec"], name, config_dict=config, output_dir=out, name="seeded", seeds=[2020],
            reference="Pop", per_user_dir=per_user, resume=True, rerun=[("Pop", "default")])
    changed = {p.name for p in per_user.iterdir() if p.stat().st_mtime_ns != stamps.get(p.name)}
    assert changed == {"Pop__default__seed2020.csv"}
    written = {(r["model"], r["setting"]) for r in csv.DictReader(open(out / "seeded.csv", encoding="utf-8"))}
    assert {("Pop", "default/seed_2020"), ("Pop", "default/seed_2021")} <= written  # the seed not rerun is kept
    assert "| Pop | default | 2 |" in (out / "seeded.md").read_text()
    # a rerun that fails keeps the earlier result and is listed as failed
    compare([("Pop", "default", {"epochs": "abc"})], name, config_dict=config, output_dir=out, name="seeded", seeds=[2020],
            reference="Pop", per_user_dir=per_user, resume=True, rerun=[("Pop", "default")], keep_going=True)
    written = {(r["model"], r["setting"]) for r in csv.DictReader(open(out / "seeded.csv", encoding="utf-8"))}
    assert {("Pop", "default/seed_2020"), ("Pop", "default/seed_2021")} <= written
    assert "Pop (default, seed 2020) failed" in (out / "seeded.md").read_text()
    # per-user files lost, then a run retrained only to recreate them: a rerun that reproduces every recorded metric
    # is the same run and keeps its bootstrap rows; one that changed (another config) loses them
    compare(["Pop", "GRU4Rec"], name, config_dict=config, output_dir=out, name="seeded", seeds=[2020, 2021],
            reference="Pop", per_user_dir=per_user, resume=True)  # a clean write after the failure above
    with_rows = [line for line in (out / "seeded.csv").read_text().splitlines() if ",GRU4Rec," in line and "_diff" in line]
    assert with_rows
    for path in per_user.iterdir():
        path.unlink()
    compare(["Pop", "GRU4Rec"], name, config_dict=config, output_dir=out, name="seeded", seeds=[2020],
            reference="Pop", per_user_dir=per_user, resume=True, rerun=[("GRU4Rec", "default")])
    assert (per_user / "GRU4Rec__default__seed2020.csv").is_file()
    assert [line for line in (out / "seeded.csv").read_text().splitlines() if ",GRU4Rec," in line and "_diff" in line] == with_rows
    compare([("GRU4Rec", "default", {"learning_rate": 0.001})], name, config_dict=config, output_dir=out, name="seeded", seeds=[2020],
            reference="Pop", per_user_dir=per_user, resume=True, rerun=[("GRU4Rec", "default")])
    assert not any(",GRU4Rec," in line and "_diff" in line for line in (out / "seeded.csv").read_text().splitlines())


def test_cli_passes_seeds_and_reference_to_compare(monkeypatch):
    from recbole_llmalign import cli, quick_start

    seen = {}
    monkeypatch.setattr(quick_start, "compare", lambda models, dataset, files, **kwargs: seen.update(models=models, **kwargs))
    argv = ["--compare=Pop,SASRec", "--dataset=ml-100k", "--seeds=2020,2021,2022", "--reference=SASRec"]
    monkeypatch.setattr(sys, "argv", ["run_recbole_llmalign.py", *argv])
    assert cli.main(argv) == 0
    assert seen["models"] == ["Pop", "SASRec"] and seen["seeds"] == [2020, 2021, 2022] and seen["reference"] == "SASRec"
    with pytest.raises(ValueError, match="comma-separated integers"):
        cli.parse_seeds("2020,x", [])
    with pytest.raises(ValueError, match="--seed would override"):
        cli.parse_seeds("2020,2021", ["--seed=1"])
