"""What RecBole's Trainer cannot do on its own, and the plugin's small per-model trainers.

``with_run_controls(TrainerClass)`` returns a subclass of any RecBole trainer that
- records the seconds of every training epoch and validation pass, why training stopped
  (``stopped_by``: ``early_stop``, ``budget`` or ``epochs``) and the last full-ranking evaluation's
  per-user metrics (``evaluator.PerUserMetricsMixin``);
- stops training cleanly once ``train_time_budget`` seconds have passed (the best checkpoint so
  far is kept and evaluated);
- writes checkpoints atomically (a kill mid-write leaves the previous file intact);
- with ``save_latest_state``, writes the state at every epoch boundary (model, optimizer, RNG
  and data-order state, best score so far) to ``<checkpoint_dir>/latest/``, keyed by the run's
  config; with ``resume_from_latest``, a rerun of the same config continues from it and ends
  with the same metrics as an uninterrupted run;
- evaluates under the plugin's protocol switches (``evaluator.HistoryExclusionMixin``).
Metrics are otherwise exactly those of the wrapped trainer.

Per-model trainers, in the style of RecBole-GNN's ``trainer.py``, each override one step:
``AlignSASRecTrainer`` (all-positions windows, held-out targets), ``SampleBudgetTrainer`` (a
data-efficient subset from ``data/sampling.py``), ``AlignLLMRecTrainer`` (stacking candidates,
validation of the untrained model; also AlignLLMRecCTR's, found through the model's class) and
``AlignGenRecTrainer`` (fits the item tokenizer once, before the optimizer is built).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from recbole.trainer import Trainer

from recbole_llmalign.compat import remember_own_checkpoint
from recbole_llmalign.data.sampling import (
    all_positions_index,
    distance_to_user_end,
    parse_user_fold,
    rows_outside_user_fold,
    sample_budget_rows,
    select_training_rows,
)
from recbole_llmalign.evaluator import HistoryExclusionMixin, PerUserMetricsMixin
from recbole_llmalign.io import atomic_write_with, config_key, torch_save_atomic


def peft_adapter_dir(checkpoint: str | Path) -> Path:
    """``<checkpoint without .pth>-lora/``: where a LoRA model's adapter is saved in peft's format."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}-lora")


class TimeBudgetReached(Exception):
    """Raised between epochs when ``train_time_budget`` is used up; caught by quick_start."""


class RunControlsMixin(PerUserMetricsMixin):
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
        self.stopped_by: str = ""  # once fit returns: "early_stop", "budget" or "epochs" (report.STOP_REASONS)
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
            # RecBole's early_stopping ends its loop once cur_step (validations without improvement) passes stopping_step
            self.stopped_by = "early_stop" if self.cur_step > self.stopping_step else "epochs"  # type: ignore[attr-defined]
        except TimeBudgetReached as stop:
            self.stopped_by = "budget"
            self.logger.info(f"Stopping: {stop}; evaluating the best checkpoint so far.")
            result = self.best_valid_score, self.best_valid_result  # type: ignore[attr-defined]
        self._save_latest_state(train_data, self.epochs, finished=True)  # type: ignore[attr-defined]
        return result

    # ---- crash safety ----
    def _save_checkpoint(self, epoch: int, verbose: bool = True, **kwargs: Any) -> None:
        """RecBole's checkpoint, written to a temporary file and moved into place."""
        target = kwargs.pop("saved_model_file", self.saved_model_file)  # type: ignore[attr-defined]
        save = super()._save_checkpoint  # type: ignore[misc]
        written = atomic_write_with(target, lambda temp: save(epoch, verbose=False, saved_model_file=temp, **kwargs))
        if written:  # other ranks write nothing
            remember_own_checkpoint(target)  # RecBole reloads it for testing: a file this run wrote is trusted
            if verbose:
                self.logger.info(f"Saving current: {target}")
        if written and hasattr(self.model, "save_peft_adapter"):  # LLM models with LoRA: peft's own format beside it
            self.model.save_peft_adapter(peft_adapter_dir(target))

    def latest_state_file(self) -> Path:
        """``<checkpoint_dir>/latest/<model>-<dataset>-<config hash>.pth``: one per run config."""
        config = self.config
        settings = {k: v for k, v in config.external_config_dict.items()
                    if k not in ("resume_from_latest", "save_latest_state", "trust_checkpoint", "local_rank")}  # one file for all ranks
        digest = config_key({"model": config["model"], "dataset": config["dataset"], **settings})
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
                    "data_order": train_data.generator.get_state() if hasattr(train_data, "generator") else None,
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},  # GPU dropout draws
        }
        torch_save_atomic(state, self.latest_state_file())

    def _resume_latest_state(self, train_data: Any) -> None:
        import numpy as np

        from recbole_llmalign.compat import load_checkpoint

        path = self.latest_state_file()
        if not path.is_file():
            self.logger.info(f"resume_from_latest: no saved state at {path}; training from the start.")
            return
        try:
            state = load_checkpoint(path, map_location="cpu", trust=bool(self.config["trust_checkpoint"]))
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
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():  # absent in states saved before the key
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if state["rng"]["data_order"] is not None and hasattr(train_data, "generator"):
            train_data.generator.set_state(state["rng"]["data_order"])
        self.logger.info(f"resume_from_latest: continuing at epoch {self.start_epoch} from {path}.")  # type: ignore[attr-defined]


_wrapped: dict[type, type] = {}


def with_run_controls(trainer_class: type) -> type:
    """Subclass ``trainer_class`` with :class:`RunControlsMixin` and the evaluation protocol (cached per class)."""
    if issubclass(trainer_class, RunControlsMixin):
        return trainer_class
    if trainer_class not in _wrapped:
        _wrapped[trainer_class] = type(trainer_class.__name__, (RunControlsMixin, HistoryExclusionMixin, trainer_class), {})
    return _wrapped[trainer_class]


def stacking_holdout(config: Any) -> int:
    """Last training targets per user that the backbone holds out and the LLM model trains on
    (``holdout_last_targets`` of the model's YAML; 0 for models without stacking, and under
    cross-fitting, whose fold backbones leave whole users out: every training target is then an
    honest sample)."""
    if cross_fit_folds(config):
        return 0
    return int(config["holdout_last_targets"]) if "holdout_last_targets" in config else 0


def cross_fit_folds(config: Any) -> int:
    """``cross_fit_folds`` of an LLM model (0 = off, also for models without the key); refused below 2."""
    folds = int(config["cross_fit_folds"] or 0) if "cross_fit_folds" in config else 0
    if folds == 1 or folds < 0:
        raise ValueError(f"cross_fit_folds must be 0 (off) or >= 2 (fold backbones, each leaving one fold of users out), got {folds}.")
    return folds


class AlignSASRecTrainer(RunControlsMixin, HistoryExclusionMixin, Trainer):
    """RecBole's Trainer; in ``all_positions`` mode it trains on one window per user span. A warm start
    (``init_checkpoint``) is validated before its first epoch and is the best so far, so continuing it
    (AlignLLMRec's backbone refit) can never end below where it started on valid."""

    def fit(self, train_data: Any, valid_data: Any = None, *args: Any, **kwargs: Any) -> Any:
        holdout = int(self.config["holdout_last_targets"])
        fold = parse_user_fold(self.config["exclude_user_fold"])
        outside = rows_outside_user_fold(train_data._dataset, fold)  # cross-fitting: the fold's users are never seen
        if fold is not None:
            self.logger.info(f"exclude_user_fold={list(fold)}: {int((~outside).sum())} rows of fold {fold[0]} of {fold[1]}'s "
                             "users left out.")
        if self.model.train_mode == "all_positions":
            train_data = self._all_positions_loader(train_data, holdout, outside)
        elif holdout > 0 or outside is not None:
            users = train_data._dataset.inter_feat[train_data._dataset.uid_field].numpy()
            keep = (distance_to_user_end(users) >= holdout) & (True if outside is None else outside)
            train_data = subset_loader(self.config, train_data, np.flatnonzero(keep), int(self.config["train_batch_size"]))
        if self.config["init_checkpoint"] and valid_data is not None:
            score, result = self._valid_epoch(valid_data, show_progress=bool(kwargs.get("show_progress", False)))
            self.best_valid_score, self.best_valid_result = score, result
            self.logger.info(f"init_checkpoint: the warm start scores valid {self.config['valid_metric']} = {score:.4f} "
                             "before training; an epoch must reach it to replace it.")
            if kwargs.get("saved", True):
                self._save_checkpoint(-1, verbose=False)
        return super().fit(train_data, valid_data, *args, **kwargs)

    def _all_positions_loader(self, train_data: Any, holdout: int = 0, outside: np.ndarray | None = None) -> Any:
        dataset = train_data._dataset
        index = all_positions_index(dataset.inter_feat[dataset.uid_field].numpy(), self.config["MAX_ITEM_LIST_LENGTH"], holdout)
        if outside is not None:  # a window is one user's: keep those of users outside the left-out fold
            index = index[outside[index]]
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


class SampleBudgetTrainer(RunControlsMixin, HistoryExclusionMixin, Trainer):
    """RecBole's Trainer on a data-efficient subset (RA-Rec): ``train_sample_budget`` rows filled by
    ``diversity_buckets`` after an optional denoising filter (``denoise_samples``)."""

    holdout = 0  # stacking: subclasses train on each user's last N targets only

    def fit(self, train_data: Any, valid_data: Any = None, verbose: bool = True, saved: bool = True,
            show_progress: bool = False, callback_fn: Any = None) -> Any:
        self._all_training_rows = train_data
        self.drawn_samples: set[int] = set()  # distinct training rows trained on over all draws
        self._draws_counted: set[int] = set()
        loader = self._draw_loader(0)
        self.before_training(valid_data, saved)
        return super().fit(loader, valid_data, verbose, saved, show_progress, callback_fn)

    def _draw_loader(self, draw: int) -> Any:
        """The loader of draw ``draw`` (0 = the first epoch's; each later draw is one epoch's when
        ``resample_each_epoch`` is on): a budgeted subset seeded by ``seed + draw``."""
        train_data = self._all_training_rows
        index = self.select_samples(train_data._dataset, draw=draw)
        self.training_samples = len(index)
        self.drawn_samples.update(index.tolist())
        self._draws_counted.add(draw)
        again = f" (draw {draw}; {len(self.drawn_samples)} distinct so far)" if draw else ""
        self.logger.info(f"{self.config['model']} trains on {len(index)} of {len(train_data._dataset)} training samples{again}.")
        return subset_loader(self.config, train_data, index, int(self.config["train_batch_size"]))

    def _train_epoch(self, train_data: Any, epoch_idx: int, *args: Any, **kwargs: Any) -> Any:
        drawing = time.perf_counter()
        if epoch_idx > 0 and self.config["resample_each_epoch"]:
            for earlier in range(1, epoch_idx):  # a resumed run: count the draws its earlier epochs trained on
                if earlier not in self._draws_counted:
                    self.drawn_samples.update(self.select_samples(self._all_training_rows._dataset, draw=earlier).tolist())
                    self._draws_counted.add(earlier)
            train_data = self._draw_loader(epoch_idx)  # a fresh subset per epoch, reproducible from the epoch number
        drawn = time.perf_counter() - drawing
        result = super()._train_epoch(train_data, epoch_idx, *args, **kwargs)
        if drawn and self.epoch_train_seconds:
            self.epoch_train_seconds[-1] += drawn  # s/epoch counts the draw its epoch trained on
        return result

    def before_training(self, valid_data: Any, saved: bool) -> None:
        """Hook run after the samples are chosen and before the first epoch."""

    def select_samples(self, dataset: Any, draw: int = 0) -> np.ndarray:
        from recbole_llmalign.data.item_text import item_texts
        from recbole_llmalign.data.sampling import content_words

        config, inter = self.config, dataset.inter_feat
        item_words = None
        if config["denoise_samples"] and config["item_text_fields"]:
            item_words = [content_words(t) for t in item_texts(dataset, config["item_text_fields"])]
        targets = inter[dataset.iid_field].numpy()
        index, notes = select_training_rows(
            inter[dataset.iid_field + config["LIST_SUFFIX"]].numpy(), inter[config["ITEM_LIST_LENGTH_FIELD"]].numpy(),
            targets, inter[dataset.uid_field].numpy(), budget_rows=sample_budget_rows(float(config["train_sample_budget"]),
                                                                                       len(targets)),
            buckets=int(config["diversity_buckets"]), seed=int(config["seed"]) + draw, item_words=item_words,
            holdout=self.holdout)
        for note in notes:
            self.logger.info(note)
        return index


class AlignLLMRecTrainer(SampleBudgetTrainer):
    """Stacking samples (each user's last ``holdout_last_targets`` targets, which the backbone never
    fit) and, with ``validate_before_training``, the untrained model validated first."""

    def __init__(self, config: Any, model: Any) -> None:
        super().__init__(config, model)
        self.holdout = stacking_holdout(config)
        trained = model.backbone_holdout
        if self.holdout > trained:
            self.logger.warning(
                f"backbone_checkpoint was trained with holdout_last_targets={trained}, so it has fit the "
                f"{self.holdout} held-out target(s) per user this model trains on, and stacking loses its point. Train the "
                f"backbone with --holdout_last_targets={self.holdout}, or leave backbone_checkpoint empty to have it trained so.")

    def before_training(self, valid_data: Any, saved: bool) -> None:
        """Score the untrained model and make it the best so far.

        With the zero-initialised residual head the untrained model ranks exactly as the frozen
        backbone, so model selection on valid can never end below the backbone: an epoch that
        does not beat it on valid is not kept.
        """
        if valid_data is None or not self.config["validate_before_training"]:
            return
        score, result = self._valid_epoch(valid_data, show_progress=bool(self.config["show_progress"]))
        self.best_valid_score, self.best_valid_result = score, result
        self.logger.info(f"before training (backbone ranking): valid {self.config['valid_metric']} = {score:.4f}")
        if saved:
            self._save_checkpoint(-1, verbose=False)


class AlignGenRecTrainer(SampleBudgetTrainer):
    """Fits AlignGenRec's item tokenizer once, before RecBole builds the optimizer (the code rows it
    creates are trainable), unless the model already holds codes (a loaded checkpoint)."""

    def __init__(self, config: Any, model: Any) -> None:
        if not model.has_item_codes:
            model.fit_item_tokenizer(config)
        super().__init__(config, model)
