"""Data-efficient training sets for LLM recommenders (RA-Rec's data construction).

A fixed budget of training samples is filled evenly from diversity buckets (history length x
target popularity), so short and long histories, head and tail targets are all represented; an
optional denoising filter first drops samples whose target text shares no word with the history's
text (likely noise for a text-reading model).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

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


def distance_to_user_end(user_ids: np.ndarray) -> np.ndarray:
    """For each row of a prefix-augmented training set (users' rows contiguous, in time order):
    how many rows of the same user follow it (0 = the user's last training target)."""
    n_rows = len(user_ids)
    is_last = np.r_[user_ids[1:] != user_ids[:-1], True]
    ends = np.flatnonzero(is_last)
    return ends[np.searchsorted(ends, np.arange(n_rows))] - np.arange(n_rows)


def all_positions_index(user_ids: np.ndarray, window: int, holdout: int = 0) -> np.ndarray:
    """Rows of a prefix-augmented training set that tile each user's history without overlap.

    RecBole's sequential training set has one row per prefix (history -> next item), users'
    rows contiguous and in time order. Keeping the user's last row and every ``window``-th row
    before it gives windows whose targets cover every training interaction exactly once; with a
    loss at every position, one pass over them is one pass over the data. ``holdout`` > 0 leaves
    each user's last ``holdout`` targets out of every window, as targets and as inputs (each user's
    last window ends before them).
    """
    distance = distance_to_user_end(user_ids) - holdout
    return np.flatnonzero((distance >= 0) & (distance % window == 0))


def user_folds(dataset: Any, folds: int) -> np.ndarray:
    """[n users] the cross-fitting fold (0 .. folds-1) of every internal user id, by a CRC32 of the
    user's token: the same user is in the same fold in every run, split and process (``hash()`` is
    salted per process), whatever the seed, so a fold backbone and the LLM model agree on it."""
    import zlib

    tokens = dataset.field2id_token[dataset.uid_field]
    return np.array([zlib.crc32(str(token).encode("utf-8")) % folds for token in tokens], dtype=np.int64)


def parse_user_fold(value: Any) -> tuple[int, int] | None:
    """``exclude_user_fold`` ([i, K]: fold i of K is left out; "i/K" in a YAML string too) as (i, K); None when unset."""
    if value is None or value == "":
        return None
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value) if isinstance(value, str) else None
    parts = (int(found.group(1)), int(found.group(2))) if found else value
    try:
        index, count = parts
    except (TypeError, ValueError):
        index, count = -1, 0
    if not all(isinstance(part, int) and not isinstance(part, bool) for part in (index, count)):
        index, count = -1, 0
    if count < 2 or not 0 <= index < count:
        raise ValueError(f"exclude_user_fold must be [i, K] with K >= 2 and 0 <= i < K (the users of fold i of K are left "
                         f"out), got {value!r}.")
    return index, count


def rows_outside_user_fold(dataset: Any, fold: tuple[int, int] | None) -> np.ndarray | None:
    """[rows] bool: the training rows whose user is not in the left-out fold (None: no fold left out)."""
    if fold is None:
        return None
    index, count = fold
    return user_folds(dataset, count)[dataset.inter_feat[dataset.uid_field].numpy()] != index


def sample_budget_rows(budget: float, n_rows: int) -> int:
    """``train_sample_budget``: a fraction of the training rows (<= 1) or a count (> 1)."""
    return int(round(budget * n_rows)) if budget <= 1 else int(budget)


def select_training_rows(histories: np.ndarray, lengths: np.ndarray, targets: np.ndarray, users: np.ndarray, *,
                         budget_rows: int, buckets: int, seed: int, item_words: Sequence[set[str]] | None = None,
                         holdout: int = 0) -> tuple[np.ndarray, list[str]]:
    """Rows an LLM recommender trains on, and a log line per filter that ran.

    Candidates: every row, less those the denoising filter drops (``item_words`` given), restricted
    to each user's last ``holdout`` targets when stacking (``holdout`` > 0); then ``budget_rows``
    of them spread evenly over history-length x target-popularity buckets.
    """
    notes: list[str] = []
    candidates = None
    if item_words is not None:
        candidates = denoise_mask(histories, targets, item_words)
        notes.append(f"denoising kept {int(candidates.sum())} of {len(targets)} samples.")
    if holdout > 0:  # stacking: train on the targets the backbone never saw as targets
        held = distance_to_user_end(users) < holdout
        candidates = held if candidates is None else candidates & held
        notes.append(f"holdout_last_targets={holdout}: {int(held.sum())} held-out samples are the candidates.")
    return diversity_sample(lengths, targets, budget_rows, buckets, buckets, seed=seed, candidates=candidates), notes
