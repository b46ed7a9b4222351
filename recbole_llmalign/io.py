"""Crash-safe files, hashes and config keys: the one implementation every module uses.

A file is written to a temporary sibling, flushed and fsynced, then moved into place with one
``os.replace``, so a run killed mid-write leaves the previous file intact (never half a file).
This module sits on the lowest floor of the import graph: it imports nothing of the plugin.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit fsync it and move it onto ``path``.

    On an error the temporary file is removed and ``path`` is untouched. The file is made readable
    by others (0644), as results and caches are meant to be shared.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        newline = "" if "b" not in mode else None
        with os.fdopen(handle, mode, encoding=encoding, newline=newline) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)  # mkstemp creates 0600
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling; on a clean exit it replaces ``path`` (an old folder is
    moved aside first and removed after), so readers see the old folder or the new one, never a mix."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
            os.replace(staging, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as out:
        out.write(text)


def atomic_write_with(path: str | Path, write: Callable[[str], Any]) -> bool:
    """Atomically produce ``path`` with a writer that only accepts a file name (``torch.save`` in
    RecBole's trainer, ``shutil.copyfile``, ``figure.savefig``): it writes a temporary name, which is
    then moved into place. Returns False (``path`` untouched) when the writer wrote nothing, as
    RecBole's non-zero ranks do."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(handle)
    try:
        write(temp)
        if os.path.getsize(temp) == 0:
            Path(temp).unlink()
            return False
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, target)
        return True
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_open(path, "wb") as out:
        torch.save(obj, out)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_key(parts: dict[str, Any], length: int | None = 16) -> str:
    """A stable hex key of JSON-serialisable settings (sorted keys; non-JSON values by ``str``).

    Used wherever a file is keyed by the settings that made it (backbone cache, latest training
    state, text embeddings), so the same settings always find the same file.
    """
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    digest = hashlib.sha256(blob).hexdigest()
    return digest if length is None else digest[:length]
