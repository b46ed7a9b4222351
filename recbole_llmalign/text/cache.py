"""On-disk cache of text embeddings: keyed by what produced them, written atomically, verified on load.

The key hashes (dataset, encoder, fields, split, the texts themselves), so changed data or a
different encoder never reuses a stale file. Each file stores its key and a sha256 of its array
bytes; a file that fails either check is treated as a miss and rebuilt. Looking a key up never
loads an encoder model.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from recbole_llmalign.io import atomic_open, config_key

logger = logging.getLogger(__name__)


def cache_key(**parts: Any) -> str:
    """A stable hex key from JSON-serialisable parts (lists of texts included)."""
    return config_key(parts, length=None)


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """A folder of ``<label>-<key>.npz`` files, each holding named arrays plus key and checksum."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, label: str, key: str) -> Path:
        return self.folder / f"{label}-{key[:20]}.npz"

    def load(self, label: str, key: str) -> dict[str, np.ndarray] | None:
        """The cached arrays, or None when absent, corrupt or made for another key."""
        path = self.path(label, key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {name: stored[name] for name in stored.files}
            stored_key = str(arrays.pop("__key__"))
            stored_sum = str(arrays.pop("__checksum__"))
        except Exception as error:  # truncated zip, bad header, missing members...
            logger.warning(f"Text cache {path} is unreadable ({error}); rebuilding it.")
            return None
        if stored_key != key or stored_sum != _checksum(arrays):
            logger.warning(f"Text cache {path} does not match its key or checksum; rebuilding it.")
            return None
        return arrays

    def save(self, label: str, key: str, arrays: dict[str, np.ndarray]) -> Path:
        """Write atomically: a temp file in the same folder, then one rename."""
        path = self.path(label, key)
        with atomic_open(path, "wb") as out:
            np.savez(out, __key__=np.array(key), __checksum__=np.array(_checksum(arrays)), **arrays)
        return path

    def get_or_build(self, label: str, key: str, build: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], bool]:
        """(arrays, hit): load when valid, else build, save and return. ``build`` runs only on a miss."""
        cached = self.load(label, key)
        if cached is not None:
            return cached, True
        arrays = build()
        self.save(label, key, arrays)
        return arrays, False
