"""What RecBole's Trainer cannot do on its own: a wall-clock budget, per-epoch cost records,
crash-safe checkpoints and resuming an interrupted run.

``with_run_controls(TrainerClass)`` returns a subclass of any RecBole trainer that
- records the seconds of every training epoch and validation pass;
- stops training cleanly once ``train_time_budget`` seconds have passed (the best checkpoint so
  far is kept and evaluated);
- writes checkpoints atomically (a kill mid-write leaves the previous file intact);
- with ``save_latest_state``, writes the state at every epoch boundary (model, optimizer, RNG
  and data-order state, best score so far) to ``<checkpoint_dir>/latest/``, keyed by the run's
  config; with ``resume_from_latest``, a rerun of the same config continues from it and ends
  with the same metrics as an uninterrupted run.
Metrics are otherwise exactly those of the wrapped trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from recbole.trainer import Trainer


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
        self.valid_curve: list[tuple[float, float]] = []  # (seconds since fit start, valid score) per validation
        self.time_to_best: float = 0.0  # seconds from fit start to the end of the best validation
        self.best_epoch: int = 0
        self._fit_started: float | None = None
        self._first_epoch = 0

    def _train_epoch(self, train_data: Any, epoch_idx: int, *args: Any, **kwargs: Any) -> Any:
        now = time.perf_counter()
        if epoch_idx > self._first_epoch:
            self._save_latest_state(train_data, epoch_idx)
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
        now = time.perf_counter()
        self.valid_seconds.append(now - start)
        score, best = result[0], self.best_valid_score  # type: ignore[attr-defined]
        improved = score >= best if self.valid_metric_bigger else score <= best  # type: ignore[attr-defined]
        if self._fit_started is not None:
            self.valid_curve.append((now - self._fit_started, float(score)))
        if improved and self._fit_started is not None:
            self.time_to_best = now - self._fit_started
            self.best_epoch = len(self.epoch_train_seconds)
        return result

    def fit(self, train_data: Any, valid_data: Any = None, *args: Any, **kwargs: Any) -> Any:
        """RecBole's fit; on a spent budget, return the best result reached so far."""
        self._fit_started = None
        self._first_epoch = self.start_epoch  # type: ignore[attr-defined]
        if self.config["resume_from_latest"]:
            self._resume_latest_state(train_data)
        try:
            result = super().fit(train_data, valid_data, *args, **kwargs)  # type: ignore[misc]
        except TimeBudgetReached as stop:
            self.logger.info(f"Stopping: {stop}; evaluating the best checkpoint so far.")
            result = self.best_valid_score, self.best_valid_result  # type: ignore[attr-defined]
        self._save_latest_state(train_data, self.epochs, finished=True)  # type: ignore[attr-defined]
        return result

    def _full_sort_batch_eval(self, batched_data: Any) -> Any:
        """RecBole's full-ranking batch; with ``exclude_history_items`` the items of each user's input
        history score -inf (RecBole masks training items only for general models, whose loaders
        carry a history index; sequential loaders carry none)."""
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)  # type: ignore[misc]
        history_field = f"{self.config['ITEM_ID_FIELD']}{self.config['LIST_SUFFIX']}"
        if self.config["exclude_history_items"] and history_field in interaction:
            scores.scatter_(1, interaction[history_field].to(scores.device), float("-inf"))  # pad id 0 is -inf already
        return interaction, scores, positive_u, positive_i

    # ---- crash safety ----
    def _save_checkpoint(self, epoch: int, verbose: bool = True, **kwargs: Any) -> None:
        """RecBole's checkpoint, written to a temporary file and moved into place."""
        target = kwargs.pop("saved_model_file", self.saved_model_file)  # type: ignore[attr-defined]
        temp = f"{target}.tmp-{os.getpid()}"
        super()._save_checkpoint(epoch, verbose=False, saved_model_file=temp, **kwargs)  # type: ignore[misc]
        if os.path.isfile(temp):  # other ranks write nothing
            os.replace(temp, target)
            if verbose:
                self.logger.info(f"Saving current: {target}")

    def latest_state_file(self) -> Path:
        """``<checkpoint_dir>/latest/<model>-<dataset>-<config hash>.pth``: one per run config."""
        config = self.config
        settings = {k: v for k, v in config.external_config_dict.items()
                    if k not in ("resume_from_latest", "save_latest_state", "local_rank")}  # one file for all ranks
        digest = hashlib.sha256(json.dumps({"model": config["model"], "dataset": config["dataset"], **settings},
                                           sort_keys=True, default=str).encode()).hexdigest()[:16]
        return Path(config["checkpoint_dir"]) / "latest" / f"{config['model']}-{config['dataset']}-{digest}.pth"

    def _save_latest_state(self, train_data: Any, next_epoch: int, finished: bool = False) -> None:
        if not self.config["save_latest_state"] or (not self.config["single_spec"] and self.config["local_rank"] != 0):
            return
        import numpy as np
        import torch

        state = {
            "next_epoch": next_epoch, "finished": finished, "cur_step": self.cur_step,  # type: ignore[attr-defined]
            "best_valid_score": self.best_valid_score, "best_valid_result": self.best_valid_result,  # type: ignore[attr-defined]
            "best_epoch": self.best_epoch, "saved_model_file": self.saved_model_file,  # type: ignore[attr-defined]
            "state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),  # type: ignore[attr-defined]
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "data_order": train_data.generator.get_state() if hasattr(train_data, "generator") else None},
        }
        path = self.latest_state_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(state, temp)
        os.replace(temp, path)

    def _resume_latest_state(self, train_data: Any) -> None:
        import numpy as np

        from recbole_llmalign.compat import load_checkpoint

        path = self.latest_state_file()
        if not path.is_file():
            self.logger.info(f"resume_from_latest: no saved state at {path}; training from the start.")
            return
        try:
            state = load_checkpoint(path, map_location="cpu")
            if state["finished"]:
                self.logger.info(f"resume_from_latest: the run saved at {path} had finished; training from the start.")
                return
            self.model.load_state_dict(state["state_dict"])  # type: ignore[attr-defined]
            self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[attr-defined]
        except (ValueError, KeyError, RuntimeError) as error:
            self.logger.warning(f"resume_from_latest: {path} is unusable ({error}); training from the start.")
            return
        import torch

        self.start_epoch = self._first_epoch = int(state["next_epoch"])  # type: ignore[attr-defined]
        self.cur_step = state["cur_step"]  # type: ignore[attr-defined]
        self.best_valid_score, self.best_valid_result = state["best_valid_score"], state["best_valid_result"]  # type: ignore[attr-defined]
        self.best_epoch = state["best_epoch"]
        if state["saved_model_file"] and os.path.isfile(state["saved_model_file"]):
            self.saved_model_file = state["saved_model_file"]  # type: ignore[attr-defined]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["data_order"] is not None and hasattr(train_data, "generator"):
            train_data.generator.set_state(state["rng"]["data_order"])
        self.logger.info(f"resume_from_latest: continuing at epoch {self.start_epoch} from {path}.")  # type: ignore[attr-defined]


_wrapped: dict[type, type] = {}


def with_run_controls(trainer_class: type) -> type:
    """Subclass ``trainer_class`` with :class:`RunControlsMixin` (cached per class)."""
    if issubclass(trainer_class, RunControlsMixin):
        return trainer_class
    if trainer_class not in _wrapped:
        _wrapped[trainer_class] = type(trainer_class.__name__, (RunControlsMixin, trainer_class), {})
    return _wrapped[trainer_class]


def distance_to_user_end(user_ids: np.ndarray) -> np.ndarray:
    """For each row of a prefix-augmented training set (users' rows contiguous, in time order):
    how many rows of the same user follow it (0 = the user's last training target)."""
    n_rows = len(user_ids)
    is_last = np.r_[user_ids[1:] != user_ids[:-1], True]
    ends = np.flatnonzero(is_last)
    return ends[np.searchsorted(ends, np.arange(n_rows))] - np.arange(n_rows)


def all_positions_index(user_ids: np.ndarray, window: int, holdout: int = 0) -> np.ndarray:
    """Rows of a prefix-augmented training set that tile each user's history without overlap.

    RecBole's sequential training set has one row per prefix (history -> next item), users'
    rows contiguous and in time order. Keeping the user's last row and every ``window``-th row
    before it gives windows whose targets cover every training interaction exactly once; with a
    loss at every position, one pass over them is one pass over the data. ``holdout`` > 0 leaves
    each user's last ``holdout`` targets out of every window (they stay visible as inputs only).
    """
    distance = distance_to_user_end(user_ids) - holdout
    return np.flatnonzero((distance >= 0) & (distance % window == 0))


def stacking_holdout(config: Any) -> int:
    """Last training targets per user that AlignLLMRec's backbone holds out and AlignLLMRec trains on.

    Stacking is a ranking recipe: labeled pairs (``task: labeled``) carry negatives and labels, and
    their backbone scores them as features, so there it is always 0.
    """
    if (config["task"] or "ranking") != "ranking":
        return 0
    return int(config["holdout_last_targets"] or 0)


class AlignSASRecTrainer(RunControlsMixin, Trainer):
    """RecBole's Trainer; in ``all_positions`` mode it trains on one window per user span."""

    def fit(self, train_data: Any, valid_data: Any = None, *args: Any, **kwargs: Any) -> Any:
        holdout = int(self.config["holdout_last_targets"] or 0)
        if getattr(self.model, "train_mode", "prefix") == "all_positions":
            train_data = self._all_positions_loader(train_data, holdout)
        elif holdout > 0:
            users = train_data._dataset.inter_feat[train_data._dataset.uid_field].numpy()
            index = np.flatnonzero(distance_to_user_end(users) >= holdout)
            train_data = subset_loader(self.config, train_data, index, int(self.config["train_batch_size"]))
        return super().fit(train_data, valid_data, *args, **kwargs)

    def _all_positions_loader(self, train_data: Any, holdout: int = 0) -> Any:
        dataset = train_data._dataset
        index = all_positions_index(dataset.inter_feat[dataset.uid_field].numpy(), self.config["MAX_ITEM_LIST_LENGTH"], holdout)
        held = f", each user's last {holdout} targets held out" if holdout else ""
        self.logger.info(f"all_positions: {len(index)} windows instead of {len(dataset)} prefixes per epoch{held}.")
        return subset_loader(self.config, train_data, index, int(self.config["all_positions_batch_size"]))


def subset_loader(config: Any, train_data: Any, index: np.ndarray, batch_size: int) -> Any:
    """A RecBole training loader over the rows ``index`` of ``train_data``'s dataset, ``batch_size`` rows a batch."""
    from recbole.data.dataloader import TrainDataLoader

    dataset = train_data._dataset
    subset = dataset.copy(dataset.inter_feat[index])

    class SubsetLoader(TrainDataLoader):
        def _init_batch_size_and_step(self) -> None:
            self.step = batch_size  # RecBole divides it by world_size under multi-process training
            self.set_batch_size(batch_size)

    return SubsetLoader(config, subset, train_data._sampler, shuffle=config["shuffle"])


class AlignLLMRecTrainer(RunControlsMixin, Trainer):
    """RecBole's Trainer on a data-efficient subset: a sample budget filled by diversity buckets,
    after an optional denoising filter (``train_sample_budget``, ``diversity_buckets``, ``denoise_samples``)."""

    def fit(self, train_data: Any, valid_data: Any = None, *args: Any, **kwargs: Any) -> Any:
        index = self.select_samples(train_data._dataset)
        self.training_samples = len(index)
        self.logger.info(f"{self.config['model']} trains on {len(index)} of {len(train_data._dataset)} training samples.")
        loader = subset_loader(self.config, train_data, index, int(self.config["train_batch_size"]))
        if valid_data is not None and self.config["validate_before_training"]:
            self._validate_start(valid_data, saved=kwargs.get("saved", args[1] if len(args) > 1 else True))
        return super().fit(loader, valid_data, *args, **kwargs)

    def _validate_start(self, valid_data: Any, saved: bool) -> None:
        """Score the untrained model and make it the best so far.

        With the zero-initialised residual head the untrained model ranks exactly as the frozen
        backbone, so model selection on valid can never end below the backbone: an epoch that
        does not beat it on valid is not kept.
        """
        score, result = self._valid_epoch(valid_data, show_progress=False)
        self.best_valid_score, self.best_valid_result = score, result
        self.logger.info(f"before training (backbone ranking): valid {self.config['valid_metric']} = {score:.4f}")
        if saved:
            self._save_checkpoint(-1, verbose=False)

    def select_samples(self, dataset: Any) -> np.ndarray:
        from recbole_llmalign.data.item_text import item_texts
        from recbole_llmalign.data.sampling import content_words, denoise_mask, diversity_sample

        config = self.config
        targets = dataset.inter_feat[dataset.iid_field].numpy()
        lengths = dataset.inter_feat[config["ITEM_LIST_LENGTH_FIELD"]].numpy()
        budget = float(config["train_sample_budget"])
        budget_rows = int(round(budget * len(targets))) if budget <= 1 else int(budget)
        candidates = None
        if config["denoise_samples"] and config["item_text_fields"]:
            words = [content_words(t) for t in item_texts(dataset, config["item_text_fields"])]
            histories = dataset.inter_feat[dataset.iid_field + config["LIST_SUFFIX"]].numpy()
            candidates = denoise_mask(histories, targets, words)
            self.logger.info(f"denoising kept {int(candidates.sum())} of {len(targets)} samples.")
        holdout = stacking_holdout(config)
        if holdout > 0:  # stacking: train on the targets the backbone never saw as targets
            users = dataset.inter_feat[dataset.uid_field].numpy()
            held = distance_to_user_end(users) < holdout
            candidates = held if candidates is None else candidates & held
            self.logger.info(f"holdout_last_targets={holdout}: {int(held.sum())} held-out samples are the candidates.")
            trained_holdout = getattr(getattr(self.model, "backbone", None), "trained_holdout", holdout)
            if trained_holdout < holdout:
                self.logger.warning(
                    f"backbone_checkpoint was trained with holdout_last_targets={trained_holdout}, so it has fit the "
                    f"{holdout} held-out target(s) per user this model trains on, and stacking loses its point. Train the "
                    f"backbone with --holdout_last_targets={holdout}, or leave backbone_checkpoint empty to have it trained so.")
        buckets = int(config["diversity_buckets"])
        return diversity_sample(lengths, targets, budget_rows, buckets, buckets, seed=int(config["seed"]),
                                candidates=candidates)


class AlignGenRecTrainer(AlignLLMRecTrainer):
    """The same sample budget (diversity buckets, optional denoising) for the generative tasks."""
