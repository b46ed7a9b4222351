"""Data-efficient training sets for LLM recommenders (RA-Rec's data construction).

A fixed budget of training samples is filled evenly from diversity buckets (history length x
target popularity), so short and long histories, head and tail targets are all represented; an
optional denoising filter first drops samples whose target text shares no word with the history's
text (likely noise for a text-reading model).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

STOPWORDS = frozenset(
    "a an and the of in on at to for with from by is are was were be it its this that or as vs "
    "de la le el part ii iii".split()
)


def content_words(text: str) -> set[str]:
    """Lower-cased words of 3+ letters that are not stopwords or field labels."""
    return {w for w in re.findall(r"[a-z][a-z']{2,}", text.lower()) if w not in STOPWORDS}


def denoise_mask(histories: np.ndarray, targets: np.ndarray, item_words: Sequence[set[str]]) -> np.ndarray:
    """True where the target's words meet the history's words, or either side has no text."""
    keep = np.ones(len(targets), dtype=bool)
    for row, (history, target) in enumerate(zip(histories, targets)):
        target_words = item_words[target]
        if not target_words:
            continue
        history_words = set().union(*(item_words[i] for i in history if i > 0))
        if history_words and not (target_words & history_words):
            keep[row] = False
    return keep


def diversity_sample(lengths: np.ndarray, targets: np.ndarray, budget: int, length_buckets: int = 4,
                     popularity_buckets: int = 4, seed: int = 0, candidates: np.ndarray | None = None) -> np.ndarray:
    """Up to ``budget`` row indices spread evenly over (length quantile x target-popularity quantile) buckets.

    Each non-empty bucket gets an equal share; a bucket smaller than its share gives the rest
    to the others. Rows are drawn at random (seeded) inside a bucket. Returns sorted indices.
    """
    rng = np.random.default_rng(seed)
    rows = np.arange(len(targets)) if candidates is None else np.flatnonzero(candidates)
    if budget >= len(rows):
        return rows
    popularity = np.bincount(targets, minlength=int(targets.max()) + 1)[targets]

    def quantile_bucket(values: np.ndarray, n: int) -> np.ndarray:
        edges = np.unique(np.quantile(values, np.linspace(0, 1, n + 1)[1:-1]))
        return np.searchsorted(edges, values, side="right")

    bucket = quantile_bucket(lengths[rows], length_buckets) * popularity_buckets + quantile_bucket(np.log1p(popularity[rows]), popularity_buckets)
    groups = [rng.permutation(rows[bucket == b]) for b in np.unique(bucket)]
    groups.sort(key=len)
    chosen, remaining = [], budget
    for position, group in enumerate(groups):
        share = remaining // (len(groups) - position)
        take = group[:share]
        chosen.append(take)
        remaining -= len(take)
    return np.sort(np.concatenate(chosen))
