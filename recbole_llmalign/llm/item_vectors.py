"""The LLM's own vector of every item's text, computed once and cached (``llm_item_scoring``).

AlignLLMRec's ranking head otherwise scores items only through the frozen backbone's table, so
the LLM can shape the user side of a score but never sees the items it ranks: an item the
backbone knows little about (cold, or new under the new-item protocol) is ranked by the backbone
alone. Here the (frozen, cut) LLM reads each item's prompt text once; the mean of its last hidden
states over the text's tokens is that item's vector. One pass per item, batched, under inference
mode; the result is stored with ``EmbeddingCache`` (atomic write, checksum verified on load),
keyed by the LLM's name, a fingerprint of its weights, its depth and the exact token ids, so a
changed title, a changed model or other weights under the same path (a re-converted or edited
local folder) recomputes it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Sequence

import numpy as np
import torch

from recbole_llmalign.text.cache import EmbeddingCache, cache_key

logger = logging.getLogger(__name__)


def mean_hidden_states(decoder: Any, token_rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64) -> np.ndarray:
    """[N, D] mean of ``decoder``'s last hidden states over each row's tokens (zeros for an empty row).

    Rows are right-padded per batch; the attention mask keeps padding out of both the attention
    and the mean, so a row's vector does not depend on the rows batched with it.
    """
    parameter = next(decoder.parameters())
    hidden = int(decoder.config.hidden_size)
    out = np.zeros((len(token_rows), hidden), dtype=np.float32)
    order = sorted(range(len(token_rows)), key=lambda i: len(token_rows[i]))  # similar lengths together: little padding
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = [i for i in order[start:start + batch_size] if token_rows[i]]
            if not rows:
                continue
            width = max(len(token_rows[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=parameter.device)
            mask = torch.zeros(len(rows), width, dtype=torch.long, device=parameter.device)
            for r, i in enumerate(rows):
                ids[r, :len(token_rows[i])] = torch.tensor(token_rows[i], device=parameter.device)
                mask[r, :len(token_rows[i])] = 1
            states = decoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            weights = mask.unsqueeze(-1).to(states.dtype)
            out[rows] = ((states * weights).sum(1) / weights.sum(1)).cpu().numpy()
    return out


def weights_fingerprint(module: torch.nn.Module, samples: int = 1024) -> str:
    """A short hash of ``module``'s weights: every parameter's name, dtype and shape and ``samples``
    evenly strided values of it, so two LLMs with the same path but other weights get other keys
    (reading every value of a 135M-parameter model would cost more than the cache saves)."""
    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        digest.update(f"{name}|{parameter.dtype}|{tuple(parameter.shape)}".encode())
        if parameter.numel() and not parameter.is_meta:
            flat = parameter.detach().reshape(-1)
            values = flat[::max(1, flat.numel() // samples)].float().cpu().numpy()
            digest.update(values.tobytes())
    return digest.hexdigest()[:16]


def cached_item_vectors(decoder: Any, token_rows: Sequence[Sequence[int]], pad_id: int, cache_dir: str,
                        dataset: str, llm_source: str, llm_layers: int) -> torch.Tensor:
    """[N, D] LLM vectors of the items' text (see module docstring), from the cache when it holds them."""
    started = time.perf_counter()
    key = cache_key(kind="llm_items", dataset=dataset, llm=llm_source, weights=weights_fingerprint(decoder), layers=llm_layers,
                    tokens=[list(r) for r in token_rows])
    arrays, hit = EmbeddingCache(cache_dir).get_or_build(
        f"{dataset}-llm-items", key, lambda: {"embedding": mean_hidden_states(decoder, token_rows, pad_id)})
    logger.info(f"LLM item vectors for {dataset}: {len(token_rows) - 1} items, {llm_layers} layers"
                f"{' (cache hit)' if hit else ' (encoded)'}, {time.perf_counter() - started:.1f} s.")
    return torch.from_numpy(arrays["embedding"]).to(next(decoder.parameters()).device)
