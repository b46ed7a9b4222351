"""The new-item protocol (``new_item_ratio``): a seeded share of items that training never sees.

Inductive items as UniSRec and Recformer evaluate them: with ``new_item_ratio: r`` a random share
``r`` of the items that have interactions (drawn with the run's ``seed`` over the items' external
ids, so every model and every model type gets the same set) becomes *new*. Every TRAINING
interaction with a new item is removed, as a target and as an input:

- a sequential training split (one row per prefix, RecBole's augmentation): rows whose target is
  new are dropped, and every history is rebuilt from the user's training sequence with the new
  items taken out, as if those interactions had never happened (a history still reaches back
  ``MAX_ITEM_LIST_LENGTH`` kept items; the length field counts them; every other per-interaction
  list field, e.g. ``timestamp_list``, is rebuilt the same way). A user left with fewer than two
  kept training interactions has no training row;
- any other training split (one row per interaction: general and context-aware models): rows with
  a new item are dropped.

Validation and test are untouched: new items stay targets there and stay in the valid/test
histories. They also stay in the catalogue: full ranking scores them, item features and item text
are kept (that is how a feature- or text-based model can rank them), and losses that score every
item (CE) or draw sampled negatives may still push them down; only interactions are removed.
RecBole builds its samplers and loaders from the filtered training split, so each model, RecBole's
and the plugin's, trains on the same data and is scored on the same test set.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from recbole.data import data_preparation as recbole_data_preparation
from recbole.data.interaction import Interaction

logger = logging.getLogger(__name__)


def _column(feat: Any, field: str) -> np.ndarray:
    """A field as numpy, from a pandas frame (before RecBole's build) or an Interaction (after)."""
    values = feat[field]
    return values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def choose_new_items(dataset: Any, ratio: float, seed: int) -> np.ndarray:
    """Sorted internal ids of the ``round(ratio x items with interactions)`` new items.

    Drawn over the items' external ids in sorted order, so the set depends only on the data, the
    ratio and the seed (not on RecBole's id remapping, which can differ between model types).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"Config key 'new_item_ratio' must be in [0, 1) (documented in properties/overall.yaml), got {ratio!r}.")
    iid_field = dataset.iid_field
    interacted = np.unique(_column(dataset.inter_feat, iid_field))
    interacted = interacted[interacted > 0]
    tokens = np.asarray(dataset.field2id_token[iid_field])[interacted].astype(str)
    ordered = interacted[np.argsort(tokens, kind="stable")]
    count = int(round(ratio * len(ordered)))
    picked = np.random.default_rng(seed).choice(len(ordered), size=count, replace=False)
    return np.sort(ordered[picked])


def _prefix_chain_starts(users: np.ndarray, lengths: np.ndarray, window: int) -> np.ndarray:
    """First row of each user; checks the rows are RecBole's prefix chain (contiguous, growing by one)."""
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    if len(np.unique(users[starts])) != len(starts):
        raise ValueError("new_item_ratio: a user's training rows are not contiguous; expected RecBole's leave-one-out split.")
    position = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
    first = np.repeat(lengths[starts], np.diff(np.r_[starts, len(users)]))
    if not np.array_equal(lengths, np.minimum(first + position, window)):
        raise ValueError("new_item_ratio: the training rows are not prefix-augmented histories (RecBole's sequential "
                         "augmentation); the new-item protocol cannot rebuild them.")
    return starts


def _without_new_items_sequential(train: Any, is_new: np.ndarray) -> Interaction:
    """The training rows rebuilt from each user's training sequence minus the new items (see module docstring)."""
    inter = train.inter_feat
    uid_field, length_field = train.uid_field, train.item_list_length_field
    window = int(train.max_item_list_len)
    users = inter[uid_field].numpy()
    lengths = inter[length_field].numpy().astype(np.int64)
    n_rows = len(users)
    fields = [f for f in inter.columns if f not in (uid_field, length_field) and hasattr(train, f"{f}_list_field")]
    list_fields = {f: getattr(train, f"{f}_list_field") for f in fields}
    starts = _prefix_chain_starts(users, lengths, window)
    ends = np.r_[starts[1:], n_rows]
    # Source index of each element of a user's training sequence in [history cells of all rows ; targets of all rows]:
    # the first row's history, then every row's target.
    sources, owners = [], []
    for start, end in zip(starts, ends):
        head = start * window + np.arange(lengths[start])
        sources.append(np.r_[head, n_rows * window + np.arange(start, end)])
        owners.append(np.full(len(sources[-1]), users[start]))
    source, owner = np.concatenate(sources), np.concatenate(owners)
    flat = {f: torch.cat([inter[list_fields[f]].reshape(n_rows * window, *inter[list_fields[f]].shape[2:]),
                          inter[f].reshape(n_rows, *inter[list_fields[f]].shape[2:])]) for f in fields}
    keep = ~is_new[flat[train.iid_field][torch.from_numpy(source)].numpy()]
    source, owner = source[keep], owner[keep]
    # RecBole's augmentation on the kept sequences: position p >= 1 of a user is a target, its history the
    # min(p, window) kept elements before it.
    is_first = np.r_[True, owner[1:] != owner[:-1]]
    first_index = np.maximum.accumulate(np.where(is_first, np.arange(len(owner)), 0))
    position = np.arange(len(owner)) - first_index
    targets = np.flatnonzero(position >= 1)
    history_len = np.minimum(position[targets], window)
    offsets = np.arange(window)
    cells = targets[:, None] - history_len[:, None] + offsets[None, :]
    filled = offsets[None, :] < history_len[:, None]
    history_source = torch.from_numpy(source[np.where(filled, cells, targets[:, None])])
    filled_t = torch.from_numpy(filled)
    target_source = torch.from_numpy(source[targets])
    rebuilt = {uid_field: torch.from_numpy(owner[targets]).to(inter[uid_field].dtype),
               length_field: torch.from_numpy(history_len).to(inter[length_field].dtype)}
    for f in fields:
        values = flat[f]
        rebuilt[f] = values[target_source]
        history = values[history_source]
        mask = filled_t.reshape(*filled_t.shape, *([1] * (history.dim() - 2)))
        rebuilt[list_fields[f]] = torch.where(mask, history, torch.zeros((), dtype=history.dtype))
    return Interaction(rebuilt)


def remove_new_items(train: Any, new_items: np.ndarray) -> Any:
    """A copy of the training split without any interaction with ``new_items`` (see module docstring)."""
    is_new = np.zeros(train.item_num, dtype=bool)
    is_new[new_items] = True
    if getattr(train, "item_id_list_field", None) in train.inter_feat.columns:
        inter = _without_new_items_sequential(train, is_new)
    else:
        inter = train.inter_feat[np.flatnonzero(~is_new[train.inter_feat[train.iid_field].numpy()])]
    logger.info(f"new_item_ratio: {len(new_items)} new items; training rows {len(train.inter_feat)} -> {len(inter)} "
                "(every training interaction with a new item removed, as target and as input).")
    return train.copy(inter)


def data_preparation(config: Any, dataset: Any) -> tuple[Any, Any, Any]:
    """RecBole's ``data_preparation``, with the new-item protocol applied to the training split when
    ``new_item_ratio`` is set.

    The split RecBole builds is filtered before RecBole creates its samplers and loaders, so every
    model type gets the same filtered data through RecBole's own code. The new items' internal ids
    are on ``dataset.new_item_ids`` and on every split (``None`` when the protocol is off).
    """
    ratio = config["new_item_ratio"] if "new_item_ratio" in config else None
    if not ratio:
        dataset.new_item_ids = None
        return recbole_data_preparation(config, dataset)
    new_items = choose_new_items(dataset, float(ratio), int(config["seed"]))
    dataset.new_item_ids = new_items  # set before build: every split RecBole copies from the dataset carries it
    build = dataset.build

    def build_without_new_items() -> list[Any]:
        splits = build()
        for split in splits:  # RecBole's splits are shallow copies: drop this hook from them (it cannot be pickled)
            split.__dict__.pop("build", None)
        train, *others = splits
        return [remove_new_items(train, new_items), *others]

    dataset.build = build_without_new_items  # this one object only, for this one call
    try:
        return recbole_data_preparation(config, dataset)
    finally:
        del dataset.build
