"""Items the training split never shows (new under ``new_item_ratio``, or seen only in valid/test).

Their backbone ID rows never learned anything, so the models read them from text: the trained items
whose text is closest lend them an ID half (``text_only_item_vectors``). Shared by AlignSASRec (its
scoring table) and AlignGenRec (its item tokenizer).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from recbole_llmalign.data.sampling import distance_to_user_end
from recbole_llmalign.devices import HOST


def training_items(train_dataset: Any, n_items: int, holdout: int = 0, exclude_user_fold: tuple[int, int] | None = None
                   ) -> torch.Tensor:
    """[N] bool: the items the training split shows, as a target or in a history (whose backbone ID row was trained).

    ``holdout`` > 0 (``holdout_last_targets``): the rows of each user's last ``holdout`` targets
    are left out, as the backbone's loss leaves them out (neither target nor input of any window
    it trains on), so an item seen only there counts as untrained. ``exclude_user_fold`` (i, K):
    the rows of the users in fold i of K are left out too (a cross-fitting fold backbone).
    """
    from recbole_llmalign.data.sampling import rows_outside_user_fold

    inter = train_dataset.inter_feat
    rows = slice(None)
    keep = rows_outside_user_fold(train_dataset, exclude_user_fold)
    if holdout > 0:
        users = inter[train_dataset.uid_field].numpy()
        held = distance_to_user_end(users) >= holdout
        keep = held if keep is None else keep & held
    if keep is not None:
        rows = torch.from_numpy(np.flatnonzero(keep))
    found = [inter[train_dataset.iid_field][rows]]
    list_field = getattr(train_dataset, "item_id_list_field", None)
    if list_field is not None and list_field in inter:
        found.append(inter[list_field][rows].reshape(-1))
    seen = torch.zeros(n_items, dtype=torch.bool, device=HOST)
    seen[torch.cat([f.to(HOST) for f in found]).unique()] = True
    seen[0] = False  # padding (history slots): not an item
    return seen


def text_only_item_vectors(ids: torch.Tensor, fused: torch.Tensor, trained: torch.Tensor, neighbours: int) -> torch.Tensor:
    """``ids`` [N, C] with every untrained row (``trained`` [N] False) replaced by the mean of the
    (unit) ID rows of its ``neighbours`` trained items closest by cosine of ``fused`` text [N, C'].

    An item the training split never shows keeps its random initial ID row in the backbone; coding
    that noise would give it an arbitrary code. Its text is all that is known about it, so its ID
    half is read off the trained items whose text is most like its own.
    """
    untrained = torch.nonzero(~trained).squeeze(1)
    known = torch.nonzero(trained).squeeze(1)
    if len(untrained) == 0 or len(known) == 0 or neighbours <= 0:
        return ids
    text = F.normalize(fused, dim=-1)
    similarity = text[untrained] @ text[known].T  # [U, K]
    nearest = known[similarity.topk(min(neighbours, len(known)), dim=1).indices]  # [U, k]
    out = ids.clone()
    out[untrained] = F.normalize(F.normalize(ids, dim=-1)[nearest].mean(1), dim=-1) * ids[known].norm(dim=-1).mean()
    return out
