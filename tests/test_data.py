"""Offline datasets, the Amazon converter, the item text helper and bad-input errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import recbole_llmalign  # noqa: F401
from recbole_llmalign.config import Config
from recbole_llmalign.data import convert_amazon, item_reviews, item_texts, prepare_dataset
from recbole_llmalign.data.atomic import verify_dataset_dir
from recbole_llmalign.data.datasets import SHARED_DATA_ENV, materialize_ml1m
from tests.conftest import SHARED_DATA, cyclic_config, write_atomic


def _build(model: str, dataset: str, config_dict: dict):
    from recbole.data import create_dataset, data_preparation

    config = Config(model=model, dataset=dataset, config_dict=config_dict)
    prepare_dataset(config)
    data = create_dataset(config)
    return config, data, data_preparation(config, data)


def test_ml1m_benchmark_protocol_matches_recboles_published_statistics(tmp_path):
    """834,449 interactions, 6,033 users and 3,123 items (RecBole prints +1 for padding)."""
    from recbole.data import create_dataset

    config = Config(model="SASRec", dataset="ml-1m", config_dict={"data_path": str(tmp_path), "state": "ERROR"})
    prepare_dataset(config)
    assert verify_dataset_dir(tmp_path / "ml-1m")
    header = (tmp_path / "ml-1m" / "ml-1m.inter").read_text(encoding="utf-8").split("\n", 1)[0]
    assert header == "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    with open(tmp_path / "ml-1m" / "ml-1m.inter", encoding="utf-8") as handle:
        assert sum(1 for _ in handle) - 1 == 1_000_209
    dataset = create_dataset(config)
    assert dataset.inter_num == 834_449
    assert (dataset.user_num, dataset.item_num) == (6_034, 3_124)
    texts = item_texts(dataset, config["item_text_fields"])
    toy_story = texts[dataset.token2id("item_id", "1")]
    assert toy_story.startswith("Toy Story; release_year: 1995; genre: Animation")


def test_ml1m_materialization_is_verified_and_rebuilt_when_corrupt(tmp_path):
    target = materialize_ml1m(tmp_path / "ml-1m")
    item_file = target / "ml-1m.item"
    item_file.write_text(item_file.read_text(encoding="utf-8")[:1000], encoding="utf-8")
    assert not verify_dataset_dir(target)
    config = Config(model="Pop", dataset="ml-1m", config_dict={"data_path": str(tmp_path), "state": "ERROR"})
    prepare_dataset(config)
    assert verify_dataset_dir(target)
    assert not any(p.name.startswith(".ml-1m") for p in tmp_path.iterdir())  # no staging left behind


def test_ml100k_item_text_from_the_shipped_item_file():
    _, dataset, _ = _build("Pop", "ml-100k", {"state": "ERROR"})
    texts = item_texts(dataset, ["movie_title", "release_year", "class"])
    assert texts[0] == ""
    assert texts[dataset.token2id("item_id", "1")] == "Toy Story; release_year: 1995; class: Animation Children's Comedy"
    assert all(texts[1:])


def _review_fixture(root: Path) -> None:
    """5 users x 4 items in time order; every review names its user and position."""
    rows = []
    for user in range(1, 6):
        for step in range(4):
            item = (user + step) % 6 + 1
            rows.append([f"u{user}", f"i{item}", 1000 + step, f"review by u{user} at step {step}"])
    write_atomic(root / "rev" / "rev.inter", ["user_id:token", "item_id:token", "timestamp:float", "review:token_seq"], rows)


def test_item_reviews_come_from_training_interactions_only(tmp_path):
    _review_fixture(tmp_path)
    config = cyclic_config(str(tmp_path), load_col={"inter": ["user_id", "item_id", "timestamp"]})
    _, _, (train, _, _) = _build("GRU4Rec", "rev", config)
    reviews = item_reviews(train._dataset, "review", max_per_item=10)
    everything = [text for texts in reviews for text in texts]
    # Leave-one-out: steps 0-1 train, step 2 valid, step 3 test.
    assert sorted(everything) == sorted(f"review by u{u} at step {s}" for u in range(1, 6) for s in (0, 1))
    for user in range(1, 6):
        item = train._dataset.token2id("item_id", f"i{(user + 0) % 6 + 1}")
        assert f"review by u{user} at step 0" in reviews[item]


def test_amazon_converter_on_real_2014_reviews(tmp_path):
    source = SHARED_DATA / "amazon-mi-reviews" / "Musical_Instruments_reviews_2014_partial.csv"
    if not source.is_file():
        pytest.skip(f"shared review data not present at {source}; nothing to convert")
    folder = convert_amazon(source, tmp_path, "amazon-mi")
    lines = (folder / "amazon-mi.inter").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "user_id:token\titem_id:token\trating:float\ttimestamp:float\treview:token_seq\tsummary:token_seq"
    assert len(lines) - 1 == 5050
    assert verify_dataset_dir(folder)
    config = cyclic_config(str(tmp_path), load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]})
    _, dataset, (train, _, _) = _build("GRU4Rec", "amazon-mi", config)
    assert (dataset.user_num - 1, dataset.item_num - 1) == (1381, 392)
    reviews = item_reviews(train._dataset)
    assert sum(1 for texts in reviews if texts) > 300
    assert "pop filter" in " ".join(reviews[dataset.token2id("item_id", "1384719342")]).lower()


def test_amazon_converter_reads_2018_and_2023_json_lines_with_metadata(tmp_path):
    reviews_2018 = [{"reviewerID": "A1", "asin": "B1", "overall": 5.0, "unixReviewTime": 1500000000,
                     "reviewText": "Great\tgame\nloved it", "summary": "fun"},
                    {"reviewerID": "A1", "asin": "B2", "overall": 2.0, "unixReviewTime": 1400000000}]
    meta_2018 = [{"asin": "B1", "title": "Game One", "description": ["Line a", "Line b"], "category": ["Games", "PC"]},
                 {"asin": "B9", "title": "Never reviewed"}]
    with gzip.open(tmp_path / "r18.json.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(r) for r in reviews_2018))
    (tmp_path / "m18.json").write_text("\n".join(json.dumps(m) for m in meta_2018), encoding="utf-8")
    folder = convert_amazon(tmp_path / "r18.json.gz", tmp_path / "out", "g18", tmp_path / "m18.json")
    inter = (folder / "g18.inter").read_text(encoding="utf-8").splitlines()
    assert inter[1].split("\t") == ["A1", "B2", "2.0", "1400000000", "", ""]  # sorted by time
    assert inter[2].split("\t")[4] == "Great game loved it"
    item = (folder / "g18.item").read_text(encoding="utf-8").splitlines()
    assert item[1:] == ["B1\tGame One\tLine a Line b\tGames PC"]

    reviews_2023 = [{"user_id": "U1", "parent_asin": "P1", "rating": 4.0, "timestamp": 1600000000123,
                     "text": "Nice", "title": "ok"}]
    (tmp_path / "r23.jsonl").write_text(json.dumps(reviews_2023[0]), encoding="utf-8")
    folder = convert_amazon(tmp_path / "r23.jsonl", tmp_path / "out", "g23")
    assert (folder / "g23.inter").read_text(encoding="utf-8").splitlines()[1] == "U1\tP1\t4.0\t1600000000\tNice\tok"


def test_amazon_converter_names_missing_columns(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"who": "x", "what": "y"}), encoding="utf-8")
    with pytest.raises(ValueError, match="no column for 'user_id'"):
        convert_amazon(tmp_path / "bad.jsonl", tmp_path / "out", "bad")


# ---- bad input: each a clear error naming the fix ----

def test_unknown_dataset_names_offline_datasets(tmp_path):
    config = Config(model="Pop", dataset="no-such-data", config_dict={"data_path": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="Unknown dataset 'no-such-data'.*ml-100k, ml-1m, ml-1m-ctr, amazon-games"):
        prepare_dataset(config)


def test_missing_atomic_file_named_by_load_col(cyclic_dataset):
    data_path, name = cyclic_dataset
    config = Config(model="Pop", dataset=name, config_dict=cyclic_config(
        data_path, load_col={"inter": ["user_id", "item_id", "timestamp"], "user": ["user_id", "age"]}))
    with pytest.raises(FileNotFoundError, match=r"Missing atomic file .*cyclic\.user.*remove 'user' from load_col"):
        prepare_dataset(config)


def test_missing_inter_file(tmp_path):
    (tmp_path / "half").mkdir()
    config = Config(model="Pop", dataset="half", config_dict={"data_path": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"Missing atomic file .*half\.inter"):
        prepare_dataset(config)


def test_missing_shared_amazon_data_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "nowhere"))
    config = Config(model="Pop", dataset="amazon-games", config_dict={"data_path": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=f"Dataset 'amazon-games' not found.*{SHARED_DATA_ENV}"):
        prepare_dataset(config)


def test_amazon_games_found_in_shared_data():
    if not (SHARED_DATA / "amazon-games" / "amazon-games.inter").is_file():
        pytest.skip(f"shared data not present at {SHARED_DATA}")
    config = Config(model="Pop", dataset="amazon-games", config_dict={"state": "ERROR"})
    prepare_dataset(config)
    assert Path(config["data_path"]) == SHARED_DATA / "amazon-games"


def test_text_field_absent_from_data_is_a_clear_error(cyclic_dataset):
    data_path, name = cyclic_dataset
    config = Config(model="Pop", dataset=name, config_dict=cyclic_config(data_path, item_text_fields=["title", "plot"]))
    with pytest.raises(ValueError, match=r"item_text_fields names \['plot'\].*Remove them from item_text_fields"):
        prepare_dataset(config)
