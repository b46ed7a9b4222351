"""The frozen-LLM probe's residual head (``benchmarks/llm_probe.py``): rows scored against their own fold
backbone's item table under cross-fitting, and a head that learns a feature carrying the answer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from llm_probe import train_head  # noqa: E402

N_ITEMS, DIM = 40, 8


def _split(rows: int, seed: int, tables: list[torch.Tensor], vector_of_target: bool) -> dict[str, np.ndarray]:
    """``rows`` samples with random targets (item 0 is padding), alternating folds; the user vector is the target's row
    of its fold's table (a backbone that is right only when read in its own coordinates) or noise."""
    generator = np.random.default_rng(seed)
    target = generator.integers(1, N_ITEMS, size=rows)
    fold = np.arange(rows) % len(tables)
    vectors = np.stack([tables[f][t].numpy() * 4 for f, t in zip(fold, target)]) if vector_of_target \
        else generator.normal(size=(rows, DIM))
    return {"user": np.arange(rows), "target": target.astype(np.int64), "fold": fold.astype(np.int64),
            "user_vector": vectors.astype(np.float32), "answer": np.eye(N_ITEMS, dtype=np.float32)[target]}


def test_each_row_is_scored_against_its_own_fold_table():
    torch.manual_seed(0)
    tables = [torch.randn(N_ITEMS, DIM), torch.randn(N_ITEMS, DIM)]
    data = {split: _split(200, seed, tables, vector_of_target=True) for seed, split in enumerate(("train", "valid", "test"))}
    routed, _ = train_head(tables, None, data, None, 0.0, 0.0, seed=0)
    swapped, _ = train_head(tables[::-1], None, data, None, 0.0, 0.0, seed=0)  # every row read in the other fold's table
    single, _ = train_head(tables[:1], None, data, None, 0.0, 0.0, seed=0)  # one table for all: half the rows wrong
    assert routed > 0.8  # the target's own row wins most rankings (0.86 here)
    assert swapped < 0.2 and single < routed - 0.25  # 0.07 and 0.49: only the rows of fold 0 ranked right


def test_head_learns_a_feature_that_carries_the_answer_and_starts_at_the_backbone():
    torch.manual_seed(0)
    table = torch.randn(N_ITEMS, DIM)
    data = {split: _split(400, seed, [table], vector_of_target=False) for seed, split in enumerate(("train", "valid", "test"))}
    backbone, _ = train_head([table], None, data, None, 0.0, 0.0, seed=0)
    learned, metrics = train_head([table], None, data, "answer", 3e-2, 0.0, seed=0, max_epochs=60)
    assert backbone < 0.25  # noise ranks at chance: NDCG@10 about 0.12 over 39 items
    assert learned > 0.8 and float(metrics["test"]["ndcg@10"].mean()) > 0.8  # 0.96 and 0.95 here
