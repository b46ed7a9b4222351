"""One text per item, and per-item review texts from TRAINING interactions only.

Text is read back from the atomic files rather than from RecBole's ``token_seq`` vocabularies,
which lose spacing and truncate at ``seq_len``. Results are lists indexed by RecBole's internal
item id (index 0 is the padding item and gets an empty text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd


def _read_atomic(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
    names = [h.split(":", 1)[0] for h in header]
    absent = [c for c in columns if c not in names]
    if absent:
        raise ValueError(
            f"Fields {absent} are not in {path} (it has {names}). Fix item_text_fields / "
            "review_field in your config, or add the columns to the atomic file."
        )
    frame = pd.read_csv(
        path, sep="\t", header=0, names=names, usecols=list(columns), dtype=str,
        keep_default_na=False, encoding="utf-8",
    )
    return frame


def _dataset_file(dataset: Any, suffix: str) -> Path:
    return Path(dataset.config["data_path"]) / f"{dataset.dataset_name}.{suffix}"


def truncate_words(text: str, max_words: int | None) -> str:
    """The first ``max_words`` whitespace-separated words of ``text`` (all of it when None)."""
    if max_words is None:
        return text
    words = text.split()
    return " ".join(words[:max_words]) if len(words) > max_words else text


def field_word_limits(config: Any, fields: Sequence[str]) -> dict[str, int]:
    """``item_text_field_words`` (field -> max words) checked against the fields in use."""
    limits = (config["item_text_field_words"] if "item_text_field_words" in config else None) or {}
    if not isinstance(limits, dict) or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in limits.values()):
        raise ValueError(f"Config key 'item_text_field_words' must map field names to positive word counts "
                         f"(default {{}}, documented in properties/overall.yaml), got {limits!r}.")
    return {field: int(limits[field]) for field in fields if field in limits}


def item_texts(dataset: Any, fields: Sequence[str]) -> list[str]:
    """Text per internal item id: the first field as is, the others as ``field: value``.

    Example for ml-100k with ``[movie_title, release_year, class]``:
    ``"Toy Story; release_year: 1995; class: Animation Children's Comedy"``. A field named in
    ``item_text_field_words`` keeps only its first N words (long descriptions would otherwise
    crowd out the title within a sentence encoder's or an LLM prompt's token limit).
    """
    if not fields:
        raise ValueError("item_texts needs at least one field; set item_text_fields in the dataset YAML.")
    path = _dataset_file(dataset, "item")
    if not path.is_file():
        raise FileNotFoundError(
            f"Item text needs {path}, which does not exist. Provide a .item file with {list(fields)} "
            "or use a model setting that needs no item text."
        )
    iid_field = dataset.iid_field
    frame = _read_atomic(path, [iid_field, *fields])
    token_to_id = dataset.field2token_id[iid_field]
    texts = [""] * dataset.item_num
    limits = field_word_limits(dataset.config, fields)
    for token, *values in zip(frame[iid_field], *(frame[f] for f in fields)):
        internal_id = token_to_id.get(token)
        if internal_id is None:
            continue  # filtered out of this dataset
        values = [truncate_words(str(v).strip(), limits.get(f)) for f, v in zip(fields, values)]
        parts = [values[0]] + [f"{f}: {v}" for f, v in zip(fields[1:], values[1:]) if v]
        texts[internal_id] = "; ".join(p for p in parts if p)
    return texts


def training_pairs(train_dataset: Any) -> set[tuple[int, int]]:
    """(user id, item id) pairs of the training split, with or without sequence augmentation.

    A sequential training split holds (history, target) samples: its interactions are the
    targets plus every item of every history (histories only reach back into training data).
    """
    uid = train_dataset.inter_feat[train_dataset.uid_field].numpy()
    iid = train_dataset.inter_feat[train_dataset.iid_field].numpy()
    users, items = [uid], [iid]
    list_field = getattr(train_dataset, "item_id_list_field", None)
    if list_field is not None and list_field in train_dataset.inter_feat:
        history = train_dataset.inter_feat[list_field].numpy()
        rows, cols = np.nonzero(history)
        users.append(uid[rows])
        items.append(history[rows, cols])
    return set(zip(np.concatenate(users).tolist(), np.concatenate(items).tolist()))


def item_reviews(train_dataset: Any, review_field: str = "review", max_per_item: int = 8) -> list[list[str]]:
    """Up to ``max_per_item`` non-empty review texts per internal item id, from training data only.

    Reviews are read from the ``.inter`` atomic file and kept only when their (user, item) pair
    is in the training split, so validation and test reviews never leak into item text. Longer
    reviews are preferred when an item has more than ``max_per_item``.
    """
    path = _dataset_file(train_dataset, "inter")
    uid_field, iid_field = train_dataset.uid_field, train_dataset.iid_field
    frame = _read_atomic(path, [uid_field, iid_field, review_field])
    user_ids = frame[uid_field].map(train_dataset.field2token_id[uid_field])
    item_ids = frame[iid_field].map(train_dataset.field2token_id[iid_field])
    known = user_ids.notna() & item_ids.notna() & (frame[review_field].str.strip() != "")
    allowed = training_pairs(train_dataset)
    reviews: list[list[str]] = [[] for _ in range(train_dataset.item_num)]
    for user, item, text in zip(user_ids[known].astype(int), item_ids[known].astype(int), frame[review_field][known]):
        if (user, item) in allowed:
            reviews[item].append(text.strip())
    return [sorted(texts, key=len, reverse=True)[:max_per_item] for texts in reviews]
