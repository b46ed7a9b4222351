"""The plugin's evaluation protocol: UAUC for the labeled protocol, history exclusion for full ranking.

UAUC: the user-averaged AUC of the pointwise (labeled) protocol used by CoLLM and SeLLa-Rec.

RecBole's own ``GAUC`` is a ranking metric (full-sort mode, weighted by each user's positives);
labeled-mode runs (``eval_args: {mode: labeled}``) have only value metrics such as ``AUC``. This
adds ``UAUC`` as a RecBole value metric: the AUC of each user's scored pairs, averaged with equal
weight over users who have both a positive and a negative pair. Use it like any RecBole metric:
``metrics: [AUC, UAUC]``. ``compat.register_uauc`` registers it with RecBole and makes RecBole's
collector keep the user ids it needs.

History exclusion (``exclude_history_items``): ``HistoryExclusionMixin`` ranks each user's input
history last in full ranking, for every sequential model alike.

Per-user metrics: ``PerUserMetricsMixin`` keeps, after each full-ranking evaluation, every test
user's value of each top-k metric (RecBole keeps only their mean), computed by RecBole's own metric
classes from the same collected top-k; paired significance tests between models need them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from recbole.evaluator import Evaluator
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


class HistoryExclusionMixin:
    """Full ranking with ``exclude_history_items``: the items of each user's input history score -inf.

    RecBole masks training items only for general models, whose loaders carry a history index;
    sequential loaders carry none, so sequential models keep scores for items the user already has.
    """

    config: Any

    def _full_sort_batch_eval(self, batched_data: Any) -> Any:
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)  # type: ignore[misc]
        history_field = f"{self.config['ITEM_ID_FIELD']}{self.config['LIST_SUFFIX']}"
        if self.config["exclude_history_items"] and history_field in interaction:
            scores.scatter_(1, interaction[history_field].to(scores.device), float("-inf"))  # pad id 0 is -inf already
        return interaction, scores, positive_u, positive_i


# RecBole top-k metrics whose ``metric_info`` gives one row per user: name -> whether it also takes pos_len.
PER_USER_TOPK_METRICS = {"hit": False, "mrr": False, "precision": False, "ndcg": True, "recall": True}


class PerUserEvaluator(Evaluator):
    """RecBole's Evaluator that also keeps each evaluated row's top-k metric values in ``per_row``."""

    def evaluate(self, dataobject: Any) -> Any:
        self.per_row: dict[str, np.ndarray] = {}
        if "rec.topk" in dataobject:
            for name, metric in self.metric_class.items():
                if name not in PER_USER_TOPK_METRICS:
                    continue
                pos_index, pos_len = metric.used_info(dataobject)
                values = metric.metric_info(pos_index, pos_len) if PER_USER_TOPK_METRICS[name] else metric.metric_info(pos_index)
                for k in metric.topk:
                    self.per_row[f"{name}@{k}"] = np.asarray(values[:, k - 1], dtype=np.float64)
        return super().evaluate(dataobject)


class PerUserMetricsMixin:
    """After each full-ranking ``evaluate``, ``last_per_user`` holds ``{"user": internal ids, "<metric>@<k>": values}``
    (one entry per scored row, in the loader's order; None for other evaluation modes or multi-process runs).

    Their means are exactly RecBole's reported metrics (before its rounding).
    """

    config: Any

    def __init__(self, config: Any, model: Any) -> None:
        super().__init__(config, model)  # type: ignore[call-arg]
        self.evaluator = PerUserEvaluator(config)
        self.last_per_user: dict[str, np.ndarray] | None = None
        self._scored_users: list[torch.Tensor] = []

    def _full_sort_batch_eval(self, batched_data: Any) -> Any:
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)  # type: ignore[misc]
        self._scored_users.append(interaction[self.config["USER_ID_FIELD"]].detach().cpu())
        return interaction, scores, positive_u, positive_i

    def evaluate(self, eval_data: Any, *args: Any, **kwargs: Any) -> Any:
        self._scored_users = []
        result = super().evaluate(eval_data, *args, **kwargs)  # type: ignore[misc]
        per_row = getattr(self.evaluator, "per_row", {})
        users = torch.cat(self._scored_users).numpy() if self._scored_users else np.zeros(0, dtype=np.int64)
        rows = len(next(iter(per_row.values()))) if per_row else -1
        self.last_per_user = {"user": users, **per_row} if rows == len(users) and self.config["single_spec"] else None
        return result
