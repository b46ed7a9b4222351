"""Small building blocks shared by the plugin's models."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float,
             positive_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric in-batch InfoNCE between row-aligned ``anchors`` and ``positives`` [B, D].

    Row i's positive is positives[i]; the other rows are negatives. When ``positive_ids`` is
    given, rows that share an id (the same target item twice in a batch) are not counted as
    negatives of each other.
    """
    anchors = F.normalize(anchors, dim=-1)
    positives = F.normalize(positives, dim=-1)
    logits = anchors @ positives.T / temperature  # [B, B]
    if positive_ids is not None:
        same = positive_ids.unsqueeze(0) == positive_ids.unsqueeze(1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(anchors.size(0), device=anchors.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
