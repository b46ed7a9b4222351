"""Random-user subsamples of RecBole atomic datasets, so LLM benchmarks fit a CPU budget.

Every model of a benchmark reads the same subsample (all interactions of the kept users, and the
.item rows of their items), so the comparison stays on one split.
"""

from __future__ import annotations

import random
from pathlib import Path


def subsample_users(source: Path, source_name: str, users: int, seed: int, target_root: Path,
                    name: str | None = None) -> str:
    """Copy ``users`` random users of ``source/<source_name>.inter`` (and their items' .item rows)
    into ``target_root/<name>/``; returns ``name`` (default ``<source_name>-u<users>``)."""
    name = name or f"{source_name}-u{users}"
    folder = target_root / name
    inter_lines = (source / f"{source_name}.inter").read_text(encoding="utf-8").splitlines()
    header, rows = inter_lines[0], inter_lines[1:]
    all_users = sorted({row.split("\t", 1)[0] for row in rows})
    keep = set(random.Random(seed).sample(all_users, min(users, len(all_users))))
    kept_rows = [row for row in rows if row.split("\t", 1)[0] in keep]
    items = {row.split("\t")[1] for row in kept_rows}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.inter").write_text("\n".join([header] + kept_rows) + "\n", encoding="utf-8")
    item_file = source / f"{source_name}.item"
    if item_file.is_file():
        item_lines = item_file.read_text(encoding="utf-8").splitlines()
        kept_items = [line for line in item_lines[1:] if line.split("\t", 1)[0] in items]
        (folder / f"{name}.item").write_text("\n".join([item_lines[0]] + kept_items) + "\n", encoding="utf-8")
    return name


def user_count(root: Path, name: str) -> int:
    lines = (root / name / f"{name}.inter").read_text(encoding="utf-8").splitlines()[1:]
    return len({line.split("\t", 1)[0] for line in lines})
