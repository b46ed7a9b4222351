"""Cross-attention fusion of an item's metadata embedding with its review embeddings.

The metadata vector (projected) is the query; the metadata vector and up to R review vectors are
the keys/values, so the attention weight on slot 0 says how much the item leans on its metadata
and the rest how much on its reviews. Absent reviews are masked; an item with no text at all gets
a learned fallback vector instead of an undefined (NaN) attention output.
"""

from __future__ import annotations

import torch
from torch import nn


class CrossAttentionFusion(nn.Module):
    """Fuse ``meta [N, Dt]`` and ``reviews [N, R, Dr]`` into one text vector per item ``[N, H]``."""

    def __init__(self, meta_dim: int, review_dim: int, hidden_size: int, n_heads: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.meta_proj = nn.Linear(meta_dim, hidden_size)
        self.review_proj = nn.Linear(review_dim, hidden_size)
        self.query_without_meta = nn.Parameter(torch.zeros(hidden_size))  # query for items with reviews only
        self.fallback = nn.Parameter(torch.zeros(hidden_size))  # items with no text at all
        self.attention = nn.MultiheadAttention(hidden_size, n_heads, dropout=dropout, batch_first=True)
        nn.init.normal_(self.query_without_meta, std=0.02)
        nn.init.normal_(self.fallback, std=0.02)

    def forward(self, meta: torch.Tensor, has_meta: torch.Tensor, reviews: torch.Tensor,
                review_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (fused [N, H], attention weights [N, 1 + R]: slot 0 = metadata, 1.. = reviews).

        ``has_meta`` [N] bool; ``review_mask`` [N, R] bool, True where a review exists.
        """
        meta_h = self.meta_proj(meta)  # [N, H]
        query = torch.where(has_meta.unsqueeze(-1), meta_h, self.query_without_meta.expand_as(meta_h))
        if reviews.size(1) > 0:
            keys = torch.cat([meta_h.unsqueeze(1), self.review_proj(reviews)], dim=1)  # [N, 1+R, H]
            present = torch.cat([has_meta.unsqueeze(1), review_mask], dim=1)
        else:
            keys, present = meta_h.unsqueeze(1), has_meta.unsqueeze(1)
        has_text = present.any(dim=1)
        # Rows with nothing to attend to get one dummy visible slot (output replaced below) so the
        # softmax never sees an all-masked row.
        safe_present = present.clone()
        safe_present[~has_text, 0] = True
        fused, weights = self.attention(query.unsqueeze(1), keys, keys, key_padding_mask=~safe_present,
                                        need_weights=True, average_attn_weights=True)
        # No output normalisation: the fused vector keeps the scale of the projections, so summed
        # with an ID embedding (id+text) neither side swamps the other at initialisation.
        fused = fused.squeeze(1) + query
        fused = torch.where(has_text.unsqueeze(-1), fused, self.fallback.expand_as(fused))
        weights = weights.squeeze(1) * has_text.unsqueeze(-1)
        return fused, weights


def fuse_in_chunks(fusion: CrossAttentionFusion, meta: torch.Tensor, has_meta: torch.Tensor, reviews: torch.Tensor,
                   review_mask: torch.Tensor, chunk: int, base: torch.Tensor | None = None) -> torch.Tensor:
    """``fusion``'s output for every item (plus ``base`` [N, H] when given), ``chunk`` items at a time.

    Fusion is per item, so slices compose; peak memory is the [N, H] result plus one chunk's
    intermediates instead of the whole catalog's. Runs without gradients (evaluation tables).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of items, got {chunk}.")
    n_items = meta.size(0)
    hidden = fusion.fallback.numel()
    table = torch.empty(n_items, hidden, device=meta.device)
    with torch.no_grad():
        for start in range(0, n_items, chunk):
            rows = slice(start, start + chunk)
            fused = fusion(meta[rows], has_meta[rows], reviews[rows], review_mask[rows])[0]
            table[rows] = fused if base is None else base[rows] + fused
    return table
