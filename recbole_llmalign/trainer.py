"""What RecBole's Trainer cannot do on its own: a wall-clock budget and per-epoch cost records.

``with_run_controls(TrainerClass)`` returns a subclass of any RecBole trainer that records the
seconds of every training epoch and validation pass, and stops training cleanly once
``train_time_budget`` seconds have passed (the best checkpoint so far is kept and evaluated).
It changes nothing else, so metrics are exactly those of the wrapped trainer.
"""

from __future__ import annotations

import time
from typing import Any


class TimeBudgetReached(Exception):
    """Raised between epochs when ``train_time_budget`` is used up; caught by quick_start."""


class RunControlsMixin:
    """Epoch timing and a wall-clock training budget for any RecBole trainer."""

    config: Any
    logger: Any

    def __init__(self, config: Any, model: Any) -> None:
        super().__init__(config, model)  # type: ignore[call-arg]
        budget = config["train_time_budget"] if "train_time_budget" in config else None
        self.train_time_budget: float | None = float(budget) if budget else None
        self.epoch_train_seconds: list[float] = []
        self.valid_seconds: list[float] = []
        self._fit_started: float | None = None

    def _train_epoch(self, train_data: Any, epoch_idx: int, *args: Any, **kwargs: Any) -> Any:
        now = time.perf_counter()
        if self._fit_started is None:
            self._fit_started = now
        elif self.train_time_budget is not None and now - self._fit_started >= self.train_time_budget:
            raise TimeBudgetReached(
                f"train_time_budget of {self.train_time_budget:.0f} s reached after "
                f"{len(self.epoch_train_seconds)} epochs"
            )
        result = super()._train_epoch(train_data, epoch_idx, *args, **kwargs)  # type: ignore[misc]
        self.epoch_train_seconds.append(time.perf_counter() - now)
        return result

    def _valid_epoch(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = super()._valid_epoch(*args, **kwargs)  # type: ignore[misc]
        self.valid_seconds.append(time.perf_counter() - start)
        return result

    def fit(self, train_data: Any, valid_data: Any = None, *args: Any, **kwargs: Any) -> Any:
        """RecBole's fit; on a spent budget, return the best result reached so far."""
        self._fit_started = None
        try:
            return super().fit(train_data, valid_data, *args, **kwargs)  # type: ignore[misc]
        except TimeBudgetReached as stop:
            self.logger.info(f"Stopping: {stop}; evaluating the best checkpoint so far.")
            return self.best_valid_score, self.best_valid_result  # type: ignore[attr-defined]


_wrapped: dict[type, type] = {}


def with_run_controls(trainer_class: type) -> type:
    """Subclass ``trainer_class`` with :class:`RunControlsMixin` (cached per class)."""
    if issubclass(trainer_class, RunControlsMixin):
        return trainer_class
    if trainer_class not in _wrapped:
        _wrapped[trainer_class] = type(trainer_class.__name__, (RunControlsMixin, trainer_class), {})
    return _wrapped[trainer_class]
