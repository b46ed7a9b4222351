"""Write RecBole atomic files so a crash never leaves a half-written dataset behind.

A dataset folder is built in a temporary sibling folder and moved into place with one
``os.replace``; a ``manifest.json`` records each file's size and sha256 so a later run can
verify the folder before trusting it (a truncated or edited copy is rebuilt).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from recbole_llmalign.io import atomic_directory, file_sha256

MANIFEST = "manifest.json"


def atomic_header(frame: pd.DataFrame, types: dict[str, str]) -> list[str]:
    """RecBole column headers ``name:type`` for ``frame``'s columns."""
    missing = [c for c in frame.columns if c not in types]
    if missing:
        raise ValueError(f"No RecBole type given for columns {missing}.")
    return [f"{column}:{types[column]}" for column in frame.columns]


def clean_text(series: pd.Series) -> pd.Series:
    """Make free text safe for a tab-separated atomic file (no tabs, newlines or NaN)."""
    return (
        series.fillna("")
        .astype(str)
        .str.replace(r"[\t\r\n]+", " ", regex=True)
        .str.strip()
    )


def write_dataset_dir(
    target_dir: Path,
    files: dict[str, tuple[pd.DataFrame, dict[str, str]]],
    source_note: str,
) -> Path:
    """Write ``{file name: (frame, column types)}`` into ``target_dir`` atomically, with a manifest."""
    target_dir = Path(target_dir)
    with atomic_directory(target_dir) as staging:
        manifest: dict[str, object] = {"source": source_note, "files": {}}
        for name, (frame, types) in files.items():
            path = staging / name
            header = atomic_header(frame, types)
            with open(path, "w", encoding="utf-8", newline="") as handle:
                handle.write("\t".join(header) + "\n")
                frame.to_csv(handle, sep="\t", header=False, index=False, lineterminator="\n")
            manifest["files"][name] = {  # type: ignore[index]
                "rows": int(len(frame)),
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return target_dir


def verify_dataset_dir(target_dir: Path) -> bool:
    """True when ``target_dir`` holds every file its manifest lists, byte for byte."""
    manifest_path = Path(target_dir) / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        for name, expected in manifest["files"].items():
            path = Path(target_dir) / name
            if not path.is_file() or path.stat().st_size != expected["bytes"]:
                return False
            if file_sha256(path) != expected["sha256"]:
                return False
    except (ValueError, KeyError, TypeError, OSError):
        return False
    return True
