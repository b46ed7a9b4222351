"""Pre-computed top-K per user for serving a generative recommender without running the LLM.

``precompute_topk`` runs a model's beam search (AlignGenRec's ``generate``; any other model's
``full_sort_predict``) once for every user, on each user's whole known history, and writes one
file keyed by the checkpoint's SHA-256 and a signature of the data. ``TopKCache`` opens it,
refuses it when it belongs to another checkpoint or other data (stale), and answers lookups from
a dict in microseconds.

    python run_recbole_llmalign.py precompute --model_file saved/AlignGenRec-<time>.pth --topk 10 --output saved/topk.pth
    python run_recbole_llmalign.py recommend --model_file saved/AlignGenRec-<time>.pth --user 196 --topk_cache saved/topk.pth
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from recbole_llmalign.io import file_sha256, torch_save_atomic

# Bumped whenever the lists a checkpoint yields change without the checkpoint changing
# (2: AlignGenRec's default beam_scoring became "model"), so older caches are refused.
FORMAT_VERSION = 2


def data_signature(dataset: Any) -> str:
    """Name, sizes and a hash of the interactions: changes when the data a cache was built on changes."""
    inter = dataset.inter_feat
    digest = hashlib.sha256()
    for field in (dataset.uid_field, dataset.iid_field):
        digest.update(inter[field].numpy().tobytes())
    return f"{dataset.dataset_name}:{dataset.user_num}:{dataset.item_num}:{len(inter)}:{digest.hexdigest()[:16]}"


def user_windows(dataset: Any, window: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(internal user ids, last ``window`` items of each user's time-ordered history [U, window], lengths [U])."""
    inter = dataset.inter_feat
    users, items = inter[dataset.uid_field].numpy(), inter[dataset.iid_field].numpy()
    timed = bool(dataset.time_field) and dataset.time_field in inter
    order = np.lexsort((inter[dataset.time_field].numpy(), users)) if timed else np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    ids, starts, counts = np.unique(users, return_index=True, return_counts=True)
    sequences = torch.zeros(len(ids), window, dtype=torch.long)
    lengths = torch.zeros(len(ids), dtype=torch.long)
    for row, (start, count) in enumerate(zip(starts, counts)):
        recent = items[start + max(0, count - window):start + count]
        sequences[row, :len(recent)] = torch.from_numpy(recent)
        lengths[row] = len(recent)
    return ids, sequences, lengths


def precompute_topk(model_file: str | Path, output: str | Path, topk: int = 10, batch_size: int = 64,
                    loaded: tuple | None = None, show_progress: bool = True, trust: bool = False) -> Path:
    """Write every user's top-``topk`` (external item ids, scores) to ``output``; returns its path.

    ``trust`` = load ``model_file`` with full unpickling (``--trust_checkpoint``).
    """
    from recbole_llmalign.quick_start import load_data_and_model

    config, model, dataset, _, _, _ = loaded or load_data_and_model(str(model_file), trust=trust)
    window = int(config["MAX_ITEM_LIST_LENGTH"])
    users, sequences, lengths = user_windows(dataset, window)
    device = config["device"]
    all_items, all_scores = [], []
    model.eval()
    for start in tqdm(range(0, len(users), batch_size), desc="top-K per user", disable=not show_progress):
        seq, seq_len = sequences[start:start + batch_size].to(device), lengths[start:start + batch_size].to(device)
        with torch.no_grad():
            if hasattr(model, "generate"):
                items, scores = model.generate(seq, seq_len, beam_size=max(topk, getattr(model, "beam_size", topk)))
                items, scores = items[:, :topk], scores[:, :topk]
            else:
                from recbole.data.interaction import Interaction

                user = torch.from_numpy(users[start:start + batch_size]).to(device)  # a cross-fitted model routes by user
                full = model.full_sort_predict(Interaction({model.USER_ID: user, model.ITEM_SEQ: seq,
                                                            model.ITEM_SEQ_LEN: seq_len})).view(len(seq), -1)
                full[:, 0] = -torch.inf
                scores, items = full.topk(topk, dim=1)
        all_items.append(items.cpu())
        all_scores.append(scores.float().cpu())
    item_tokens = np.asarray(dataset.field2id_token[dataset.iid_field], dtype=object)
    items = torch.cat(all_items).numpy()
    payload = {
        "format": FORMAT_VERSION,
        "model": config["model"],
        "model_sha256": file_sha256(model_file),
        "data_signature": data_signature(dataset),
        "topk": topk,
        "generation": generation_settings(model),
        "users": [str(u) for u in np.asarray(dataset.field2id_token[dataset.uid_field], dtype=object)[users]],
        "items": [[str(item_tokens[i]) if i > 0 else "" for i in row] for row in items],
        "scores": torch.cat(all_scores),
    }
    payload["payload_sha256"] = _payload_hash(payload)
    path = Path(output)
    torch_save_atomic(payload, path)
    return path


def generation_settings(model: Any) -> str:
    """The inference settings that shape a generative model's lists (recorded in the cache)."""
    keys = ("beam_size", "beam_scoring", "floor")
    return ",".join(f"{key}={getattr(model, key)}" for key in keys if hasattr(model, key))


def _payload_hash(payload: dict) -> str:
    digest = hashlib.sha256()
    for key in ("format", "model", "model_sha256", "data_signature", "topk", "generation"):
        digest.update(str(payload[key]).encode())
    digest.update("\x1f".join(payload["users"]).encode())
    digest.update("\x1f".join("\x1e".join(row) for row in payload["items"]).encode())
    digest.update(payload["scores"].numpy().tobytes())
    return digest.hexdigest()


class TopKCache:
    """A verified top-K file: ``lookup(user)`` -> [(external item id, score), ...], best first."""

    def __init__(self, path: str | Path, model_file: str | Path | None = None, dataset: Any = None,
                 trust: bool = False) -> None:
        from recbole_llmalign.compat import load_checkpoint
        from recbole_llmalign.safe_load import UnsafeCheckpointError

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Top-K cache {path} does not exist; build it with `precompute --model_file ... --output {path}`.")
        try:
            payload = load_checkpoint(path, map_location="cpu", trust=trust)  # plain data: nothing outside the allowlist
        except UnsafeCheckpointError:
            raise
        except Exception as error:  # truncated or not a torch file
            raise ValueError(f"Top-K cache {path} is unreadable ({type(error).__name__}); delete it and run precompute again.") from error
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION or payload.get("payload_sha256") != _payload_hash(payload):
            raise ValueError(f"Top-K cache {path} is corrupt or of another format; delete it and run precompute again.")
        if model_file is not None and payload["model_sha256"] != file_sha256(model_file):
            raise ValueError(f"Top-K cache {path} is stale: it was built from another checkpoint than {model_file}. "
                             "Run precompute again for this checkpoint.")
        if dataset is not None and payload["data_signature"] != data_signature(dataset):
            raise ValueError(f"Top-K cache {path} is stale: it was built on other data ({payload['data_signature']}, now "
                             f"{data_signature(dataset)}). Run precompute again.")
        self.model, self.topk, self.model_sha256 = payload["model"], int(payload["topk"]), payload["model_sha256"]
        scores = payload["scores"].tolist()
        self._rows = {user: list(zip(items, row_scores)) for user, items, row_scores
                      in zip(payload["users"], payload["items"], scores)}

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, user: str, k: int | None = None) -> list[tuple[str, float]]:
        row = self._rows.get(str(user))
        if row is None:
            raise KeyError(f"User '{user}' has no cached top-K (the cache holds {len(self)} users of the data it was built on).")
        return [(item, score) for item, score in row[:k or self.topk] if item]
