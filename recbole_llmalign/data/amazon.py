"""Convert Amazon review dumps (2014, 2018, 2023 formats) into RecBole atomic files.

Reads reviews as CSV (with or without the 2014 header) or JSON lines (optionally gzipped, strict
JSON or the Python-literal lines of some 2014 dumps) and writes ``<name>.inter`` with
``user_id, item_id, rating, timestamp, review, summary``; with a metadata file it also writes
``<name>.item`` with ``title, description, categories``. Free text is kept whole (tabs and
newlines become spaces) so the item-text helper can read it back from the atomic file.
"""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from recbole_llmalign.data.atomic import clean_text, write_dataset_dir

# Column order of the header-less 2014 CSV exports.
REVIEW_CSV_2014_COLUMNS = [
    "reviewerID", "asin", "reviewerName", "helpful", "reviewText",
    "overall", "summary", "unixReviewTime", "reviewTime",
]
# Source field names per release -> our column. The first name present wins.
REVIEW_FIELDS = {
    "user_id": ["reviewerID", "user_id"],
    "item_id": ["asin", "parent_asin"],
    "rating": ["overall", "rating"],
    "timestamp": ["unixReviewTime", "timestamp"],
    "review": ["reviewText", "text"],
    "summary": ["summary", "title"],
}
META_FIELDS = {
    "item_id": ["asin", "parent_asin"],
    "title": ["title"],
    "description": ["description"],
    "categories": ["categories", "category", "main_category"],
}
INTER_TYPES = {
    "user_id": "token", "item_id": "token", "rating": "float",
    "timestamp": "float", "review": "token_seq", "summary": "token_seq",
}
ITEM_TYPES = {"item_id": "token", "title": "token_seq", "description": "token_seq", "categories": "token_seq"}
# 2023 timestamps are milliseconds; anything above this is taken as ms (year 2286 in seconds).
MILLISECOND_THRESHOLD = 10_000_000_000


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _iter_json_lines(path: Path) -> Iterator[dict[str, Any]]:
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                try:
                    yield ast.literal_eval(line)
                except (ValueError, SyntaxError) as error:
                    raise ValueError(f"{path}:{line_number} is neither JSON nor a Python dict literal: {error}") from None


def _read_records(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"Amazon file not found: {path}. Check the path you passed to the converter.")
    name = path.name.lower()
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        with _open_text(path) as handle:
            first = handle.readline()
        has_header = "reviewerID" in first or "user_id" in first
        return pd.read_csv(
            path, header=0 if has_header else None,
            names=None if has_header else REVIEW_CSV_2014_COLUMNS, dtype=str, keep_default_na=False,
        )
    return pd.DataFrame.from_records(list(_iter_json_lines(path)))


def _pick(frame: pd.DataFrame, fields: dict[str, list[str]], required: list[str], path: Path) -> pd.DataFrame:
    picked = {}
    for ours, candidates in fields.items():
        source = next((c for c in candidates if c in frame.columns), None)
        if source is not None:
            picked[ours] = frame[source]
        elif ours in required:
            raise ValueError(
                f"{path} has no column for '{ours}' (looked for {candidates}; found {list(frame.columns)}). "
                "Is this an Amazon review/metadata file of the 2014, 2018 or 2023 release?"
            )
    return pd.DataFrame(picked)


def _flatten_text(value: Any) -> str:
    """Lists (2018/2023 descriptions, nested 2014 categories) become one space-joined string."""
    if isinstance(value, (list, tuple)):
        return " ".join(_flatten_text(v) for v in value if v is not None)
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(value)


def read_reviews(path: str | Path) -> pd.DataFrame:
    """Reviews as a frame with our column names, sorted by user then time."""
    path = Path(path)
    frame = _pick(_read_records(path), REVIEW_FIELDS, ["user_id", "item_id", "rating", "timestamp"], path)
    frame["rating"] = pd.to_numeric(frame["rating"], errors="coerce")
    frame["timestamp"] = pd.to_numeric(frame["timestamp"], errors="coerce")
    bad = frame["rating"].isna() | frame["timestamp"].isna()
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} rows have a non-numeric rating or timestamp (first at row {int(bad.idxmax())}).")
    if (frame["timestamp"] > MILLISECOND_THRESHOLD).any():
        frame["timestamp"] = frame["timestamp"] // 1000
    for column in ("review", "summary"):
        frame[column] = clean_text(frame[column].map(_flatten_text)) if column in frame else ""
    frame["user_id"] = frame["user_id"].astype(str)
    frame["item_id"] = frame["item_id"].astype(str)
    return frame.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)


def read_metadata(path: str | Path) -> pd.DataFrame:
    """Item metadata as a frame with ``item_id, title, description, categories``."""
    path = Path(path)
    frame = _pick(_read_records(path), META_FIELDS, ["item_id"], path)
    for column in ("title", "description", "categories"):
        frame[column] = clean_text(frame[column].map(_flatten_text)) if column in frame else ""
    frame["item_id"] = frame["item_id"].astype(str)
    return frame.drop_duplicates("item_id").reset_index(drop=True)


def convert_amazon(
    reviews_path: str | Path,
    output_dir: str | Path,
    dataset_name: str,
    metadata_path: str | Path | None = None,
) -> Path:
    """Write ``<output_dir>/<dataset_name>/<dataset_name>.inter`` (and ``.item``) atomically."""
    reviews = read_reviews(reviews_path)
    files = {f"{dataset_name}.inter": (reviews[list(INTER_TYPES)], INTER_TYPES)}
    if metadata_path is not None:
        metadata = read_metadata(metadata_path)
        metadata = metadata[metadata["item_id"].isin(set(reviews["item_id"]))]
        files[f"{dataset_name}.item"] = (metadata[list(ITEM_TYPES)], ITEM_TYPES)
    source = f"Amazon reviews {Path(reviews_path).name}" + (f" + {Path(metadata_path).name}" if metadata_path else "")
    return write_dataset_dir(Path(output_dir) / dataset_name, files, source)
