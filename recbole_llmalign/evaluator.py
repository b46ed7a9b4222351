"""UAUC: the user-averaged AUC of the pointwise (labeled) protocol used by CoLLM and SeLLa-Rec.

RecBole's own ``GAUC`` is a ranking metric (full-sort mode, weighted by each user's positives);
labeled-mode runs (``eval_args: {mode: labeled}``) have only value metrics such as ``AUC``. This
adds ``UAUC`` as a RecBole value metric: the AUC of each user's scored pairs, averaged with equal
weight over users who have both a positive and a negative pair. Use it like any RecBole metric:
``metrics: [AUC, UAUC]``. Registration also makes RecBole's collector keep the user ids it needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from recbole.evaluator.base_metric import AbstractMetric
from recbole.utils import EvaluatorType

USER_KEY = "data.uid"


def user_averaged_auc(scores: np.ndarray, labels: np.ndarray, users: np.ndarray) -> tuple[float, int]:
    """(mean per-user AUC, users counted): users whose pairs are all positive or all negative are skipped.

    Ties count one half (the Mann-Whitney form), so the value equals scikit-learn's per-user AUC.
    """
    order = np.argsort(users, kind="stable")
    users, scores, labels = users[order], scores[order], labels[order]
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    aucs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        label, score = labels[start:end] > 0.5, scores[start:end]
        positives, negatives = score[label], score[~label]
        if len(positives) == 0 or len(negatives) == 0:
            continue
        greater = (positives[:, None] > negatives[None, :]).sum()
        ties = (positives[:, None] == negatives[None, :]).sum()
        aucs.append((greater + 0.5 * ties) / (len(positives) * len(negatives)))
    return (float(np.mean(aucs)) if aucs else float("nan")), len(aucs)


class UAUC(AbstractMetric):
    """User-averaged AUC over labeled (user, item) pairs (see module docstring)."""

    metric_type = EvaluatorType.VALUE
    metric_need = ["rec.score", "data.label", USER_KEY]
    smaller = False

    def calculate_metric(self, dataobject: Any) -> dict[str, float]:
        scores = dataobject.get("rec.score").squeeze(-1).numpy()
        labels = dataobject.get("data.label").numpy()
        users = dataobject.get(USER_KEY).numpy()
        value, _ = user_averaged_auc(scores, labels, users)
        return {"uauc": round(value, self.decimal_place)}


def register_metrics() -> None:
    """Add UAUC to RecBole's metric registry and teach the collector to keep user ids. Idempotent."""
    from recbole.evaluator import collector, register

    register.metrics_dict["uauc"] = UAUC
    register.metric_information["uauc"] = UAUC.metric_need
    register.metric_types["uauc"] = UAUC.metric_type
    original = collector.Collector.eval_batch_collect
    if getattr(original, "_collects_users", False):
        return

    def eval_batch_collect(self: Any, scores_tensor: torch.Tensor, interaction: Any, positive_u: torch.Tensor,
                           positive_i: torch.Tensor) -> None:
        original(self, scores_tensor, interaction, positive_u, positive_i)
        if self.register.need(USER_KEY):
            self.data_struct.update_tensor(USER_KEY, interaction[self.config["USER_ID_FIELD"]].to(self.device))

    original_struct = collector.Collector.get_data_struct

    def get_data_struct(self: Any) -> Any:
        returned = original_struct(self)
        if USER_KEY in self.data_struct:  # reset per evaluation, like RecBole's own keys
            del self.data_struct[USER_KEY]
        return returned

    eval_batch_collect._collects_users = True  # type: ignore[attr-defined]
    collector.Collector.eval_batch_collect = eval_batch_collect
    collector.Collector.get_data_struct = get_data_struct
