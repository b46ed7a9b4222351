"""Entry points a RecBole user knows: ``run_recbole_llmalign`` (same result dict as RecBole's
``run_recbole``) and ``compare`` (several models, one shared config and seed, one table)."""

from __future__ import annotations

import concurrent.futures
import csv
import io
import logging
import multiprocessing
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from logging import getLogger
from pathlib import Path
from typing import Any, Sequence

import torch
from recbole.data import create_dataset
from recbole.data.transform import construct_transform
from recbole.utils import get_environment, get_flops, init_logger, init_seed, set_color

from recbole_llmalign.config import Config, upgrade_config
from recbole_llmalign.data import data_preparation, prepare_dataset
from recbole_llmalign.io import atomic_write_text, atomic_write_with, config_key
from recbole_llmalign.logs import evaluate_backbone, log_run_summary, quiet_third_party_warnings
from recbole_llmalign.trainer import cross_fit_folds, stacking_holdout, with_run_controls
from recbole_llmalign.utils import get_model, get_trainer


@dataclass
class RunCost:
    """What a run cost: per-epoch training seconds, evaluation seconds, peak memory."""

    epochs: int = 0
    best_epoch: int = 0
    time_to_best_sec: float = 0.0
    train_sec: float = 0.0
    sec_per_epoch: float = 0.0
    valid_sec: float = 0.0
    eval_sec: float = 0.0
    peak_mem_mb: float = 0.0
    checkpoint: str = ""
    stopped_by: str = ""  # why training ended: early_stop (stopping_step), budget (train_time_budget) or epochs
    train_time_budget: float = 0.0  # the run's train_time_budget in seconds; 0 = none
    seed: int = 0
    cpu_threads: int = 0  # torch's intra-op threads during the run: s/epoch on a CPU is only comparable at equal counts
    per_user_file: str = ""  # CSV of each test user's metrics, beside the checkpoint (see save_per_user_metrics)
    extra: dict[str, float] = field(default_factory=dict)
    valid_curve: list[tuple[float, float]] = field(default_factory=list)  # (seconds since training start, valid score)


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MB."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_with_cost(
    model: str | None = None,
    dataset: str | None = None,
    config_file_list: list[str] | None = None,
    config_dict: dict[str, Any] | None = None,
    saved: bool = True,
) -> tuple[dict[str, Any], RunCost]:
    """Train and evaluate exactly as RecBole's ``run_recbole`` does, and also return the cost."""
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    quiet_third_party_warnings(config["quiet_third_party_warnings"])
    started = time.perf_counter()
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    prepare_dataset(config)
    ensure_backbone(config, config_file_list)
    init_seed(config["seed"], config["reproducibility"])  # a backbone run just now must not shift this run's RNG
    dataset_obj = create_dataset(config)
    logger.info(dataset_obj)
    train_data, valid_data, test_data = data_preparation(config, dataset_obj)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model_obj = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model_obj)
    transform = construct_transform(config)
    try:  # RecBole's counter is informational: it trips over shared submodules (e.g. LoRA adapters), over
        # AlignGenRec before its tokenizer is fitted, and over RecBole's CPR models (predict() asserts False)
        flops = get_flops(model_obj, dataset_obj, config["device"], logger, transform)
        logger.info(set_color("FLOPs", "blue") + f": {flops}")
    except (KeyError, RuntimeError, ValueError, TypeError, AssertionError) as error:
        logger.info(f"FLOPs not counted ({type(error).__name__}: {error}); training is unaffected.")

    trainer = with_run_controls(get_trainer(config["MODEL_TYPE"], config["model"]))(config, model_obj)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    if not config["single_spec"]:
        torch.distributed.barrier()  # rank 0 has finished writing the best checkpoint every rank loads
    has_best_checkpoint = saved and os.path.isfile(trainer.saved_model_file)
    eval_start = time.perf_counter()
    test_result = trainer.evaluate(
        test_data, load_best_model=has_best_checkpoint, show_progress=config["show_progress"]
    )
    eval_sec = time.perf_counter() - eval_start
    test_per_user = trainer.last_per_user  # the slices are averaged from it (or evaluated again, which replaces it)
    test_cold_result = evaluate_cold_slice(config, trainer, train_data, test_data, per_user=test_per_user)
    test_new_result = evaluate_new_slice(config, trainer, test_data, per_user=test_per_user)
    mode = config["eval_args"]["mode"]  # RecBole turns it into {"valid": ..., "test": ...}
    labeled = (mode.get("test") if isinstance(mode, dict) else mode) == "labeled"
    test_warm_result = evaluate_cold_slice(config, trainer, train_data, test_data, warm=True) if labeled else None
    backbone_test_result = evaluate_backbone(trainer, model_obj, test_data)  # models with a frozen backbone: same test data
    backbone_slices = backbone_slice_results(config, train_data, test_data, trainer.last_per_user) if backbone_test_result else {}

    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")

    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }
    if test_cold_result is not None:
        logger.info(set_color("test result, cold items", "yellow") + f": {test_cold_result}")
        result["test_cold_result"] = test_cold_result
    if test_new_result is not None:
        logger.info(set_color("test result, new items", "yellow") + f": {test_new_result}")
        result["test_new_result"] = test_new_result
    if test_warm_result is not None:  # labeled protocol: AUC on warm candidates beside cold ones (SeLLa-Rec's columns)
        logger.info(set_color("test result, warm items", "yellow") + f": {test_warm_result}")
        result["test_warm_result"] = test_warm_result
    if backbone_test_result is not None:
        logger.info(set_color("test result, backbone", "yellow") + f": {backbone_test_result}")
        result["backbone_test_result"] = backbone_test_result
    for key, slice_result in backbone_slices.items():
        logger.info(set_color(f"test result, backbone, {key.split('_')[2]} items", "yellow") + f": {slice_result}")
        result[key] = slice_result
    epochs = len(trainer.epoch_train_seconds)
    cost = RunCost(
        epochs=epochs,
        best_epoch=trainer.best_epoch,
        time_to_best_sec=trainer.time_to_best,
        train_sec=sum(trainer.epoch_train_seconds),
        sec_per_epoch=sum(trainer.epoch_train_seconds) / max(epochs, 1),
        valid_sec=sum(trainer.valid_seconds) / max(len(trainer.valid_seconds), 1),
        eval_sec=eval_sec,
        peak_mem_mb=peak_memory_mb(config["device"]),
        checkpoint=trainer.saved_model_file if has_best_checkpoint else "",
        stopped_by=trainer.stopped_by,
        train_time_budget=float(trainer.train_time_budget or 0.0),
        seed=int(config["seed"]),
        cpu_threads=torch.get_num_threads(),
        per_user_file=save_per_user_metrics(config, trainer.saved_model_file, test_per_user, train_data, test_data),
        valid_curve=list(getattr(trainer, "valid_curve", [])),
        extra={"text_sec": float(getattr(model_obj, "text_seconds", 0.0)),
               "train_samples": float(getattr(trainer, "training_samples", len(train_data._dataset))),
               "train_samples_distinct": float(len(getattr(trainer, "drawn_samples", ())) or
                                               getattr(trainer, "training_samples", len(train_data._dataset))),
               **{k: float(v) for k, v in getattr(model_obj, "cost_report", {}).items()}},
    )
    log_run_summary(config, result, asdict(cost), time.perf_counter() - started, getattr(type(model_obj), "backbone_model", None))
    if not config["single_spec"]:
        torch.distributed.destroy_process_group()
    return result, cost


# Backbone keys added later whose default trains exactly what versions before them trained (a
# fresh start): they stay out of the cache key, so the backbones those versions cached stay valid.
DEFAULTS_AS_OLDER_VERSIONS_TRAINED = frozenset({"init_checkpoint", "exclude_user_fold"})


def backbone_settings_and_key(config: Any, backbone_model: str) -> tuple[dict[str, Any], str]:
    """(settings the automatic backbone trains with, its cache key).

    The settings are the user's own except the keys the LLM model's YAML files declare (its
    schedule: ``epochs``, ``eval_step``, ``learning_rate``, ``train_batch_size``, ... and its own
    keys), plus the stacking holdout; a user who tunes the backbone trains it and passes
    ``backbone_checkpoint``. The key also covers every default the backbone's YAML files give, so
    a cached backbone from a version whose defaults differ (a new training rule) is not reused.
    """
    own = Config(model=config["model"], dataset=config["dataset"], config_dict={"data_path": config["data_path"]})
    backbone = Config(model=backbone_model, dataset=config["dataset"], config_dict={"data_path": config["data_path"]})
    # Keys only the LLM model has: a dataset YAML may set some (the Amazon prompt wording); they
    # change no backbone weight, so they stay out of its defaults and its key.
    backbone_declared = set(backbone.plugin_defaults) | set(backbone.recbole_defaults)
    own_keys = (set(own.internal_config_dict) - set(backbone.internal_config_dict)) | (
        set(own.plugin_defaults) - backbone_declared)
    backbone_defaults = {k: v for k, v in backbone.internal_config_dict.items()
                         if k not in own_keys and not (k in DEFAULTS_AS_OLDER_VERSIONS_TRAINED and v is None)}
    # Keys the LLM model's own YAML files set (not the plugin-wide overall.yaml): a user setting
    # one means the LLM training (--eval_step=3 for 3 LLM epochs), not the backbone's.
    llm_schedule = {k for k, (_, where) in own.plugin_defaults.items() if Path(where).name != "overall.yaml"}
    shared = {k: v for k, v in config.external_config_dict.items()
              if k not in own_keys | llm_schedule | {"model", "exclude_user_fold"}}  # folds: cross_fit_folds' own backbones
    shared.update(data_path=str(Path(config["data_path"]).parent), epochs=int(config["backbone_epochs"]), show_progress=False)
    holdout = stacking_holdout(config)
    if holdout:  # stacking (a YAML default, so not among the user's own keys): the backbone holds the same targets out
        shared["holdout_last_targets"] = holdout
    return shared, config_key({"dataset": config["dataset"], **shared, "backbone_defaults": backbone_defaults})


def ensure_backbone(config: Any, config_file_list: list[str] | None = None) -> None:
    """Train and cache the collaborative backbone a model needs when no checkpoint is given.

    Models that declare ``backbone_model`` (AlignLLMRec: AlignSASRec) read ``backbone_checkpoint``.
    When it is empty, the backbone is trained once with the same dataset settings and stored
    under ``<checkpoint_dir>/backbones/`` keyed by those settings; later runs reuse it. With
    ``backbone_refit_epochs`` (AlignLLMRec) its refit is ensured too (``ensure_refit_backbone``); with
    ``cross_fit_folds`` the backbone holds nothing out and the fold backbones are ensured beside it.
    """
    model_class = get_model(config["model"])
    backbone_model = getattr(model_class, "backbone_model", None)
    if backbone_model is None:
        return
    folds = cross_fit_folds(config)
    if folds and not getattr(model_class, "supports_cross_fitting", False):  # before any backbone trains
        raise ValueError(f"{config['model']} does not train with cross-fitting fold backbones; set cross_fit_folds to 0 "
                         "(AlignLLMRec has it).")
    if not folds and str(config["cross_fit_evaluation"] or "full") == "folds":
        raise ValueError(f"cross_fit_evaluation: folds ranks valid/test with the cross-fitting fold backbones, and "
                         f"cross_fit_folds is {config['cross_fit_folds'] or 0}: set cross_fit_folds >= 2, or "
                         "cross_fit_evaluation: full.")
    if folds and int(config["backbone_refit_epochs"] or 0) > 0:
        raise ValueError("cross_fit_folds evaluates with a backbone trained on every user and target, so there is nothing "
                         "to refit: set backbone_refit_epochs to 0 (or cross_fit_folds to 0).")
    if folds and config["backbone_checkpoint"] and not config["cross_fit_backbone_checkpoints"]:
        raise ValueError(
            "cross_fit_folds trains the fold backbones of the automatic backbone; for your backbone_checkpoint, train them "
            "yourself (--model=AlignSASRec --exclude_user_fold=[i,K] --holdout_last_targets=0 with its settings, for i = 0 "
            "..K-1) and pass them as cross_fit_backbone_checkpoints, or set cross_fit_folds to 0.")
    refit_epochs = 0 if config["refit_backbone_checkpoint"] else int(config["backbone_refit_epochs"] or 0)
    if refit_epochs > 0 and stacking_holdout(config) <= 0:
        raise ValueError("backbone_refit_epochs refits a backbone that held out the stacking targets, but "
                         "holdout_last_targets is 0: set holdout_last_targets > 0 or backbone_refit_epochs to 0.")
    if refit_epochs > 0 and config["backbone_checkpoint"]:  # its own settings are the user's, not this run's
        raise ValueError(
            "backbone_refit_epochs trains the refit of the automatic backbone; for your backbone_checkpoint, train its refit "
            "yourself (--model=AlignSASRec --init_checkpoint=<that checkpoint> --holdout_last_targets=0 with its settings) "
            "and pass it as refit_backbone_checkpoint, or set backbone_refit_epochs to 0.")
    if config["backbone_checkpoint"]:
        return
    shared, key = backbone_settings_and_key(config, backbone_model)
    target = Path(config["checkpoint_dir"]) / "backbones" / f"{backbone_model}-{config['dataset']}-{key}.pth"
    if not target.is_file():
        getLogger().info(f"No backbone_checkpoint given: training {backbone_model} on {config['dataset']} once -> {target}")
        _train_and_cache(backbone_model, config, config_file_list, shared, target)
    config["backbone_checkpoint"] = str(target)
    if folds and not config["cross_fit_backbone_checkpoints"]:
        config["cross_fit_backbone_checkpoints"] = [
            str(ensure_fold_backbone(config, config_file_list, backbone_model, shared, key, (index, folds))) for index in range(folds)]
    if refit_epochs > 0:
        config["refit_backbone_checkpoint"] = str(ensure_refit_backbone(config, config_file_list, backbone_model, shared,
                                                                        key, refit_epochs))


def _train_and_cache(backbone_model: str, config: Any, config_file_list: list[str] | None, settings: dict[str, Any],
                     target: Path) -> None:
    """Train ``backbone_model`` with ``settings`` and copy its best checkpoint to ``target`` atomically."""
    import shutil

    # show_progress stays out of the cache keys (it changes no weights): the bar follows this run. RecBole's Config
    # reads --key=value from the command line over config_dict: the LLM run's flags (--epochs=3) must not train it.
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        _, cost = run_with_cost(backbone_model, config["dataset"], config_file_list,
                                {**settings, "show_progress": config["show_progress"]}, saved=True)
    finally:
        sys.argv = argv
    atomic_write_with(target, lambda temp: shutil.copyfile(cost.checkpoint, temp))
    init_logger(config)  # the backbone run replaced the log handlers


def ensure_fold_backbone(config: Any, config_file_list: list[str] | None, backbone_model: str, shared: dict[str, Any],
                         backbone_key: str, fold: tuple[int, int]) -> Path:
    """Cross-fitting fold ``fold`` = (i, K): the automatic backbone's settings, trained without the users of fold i
    (``exclude_user_fold``), cached under its own key like the backbone."""
    settings = {**shared, "exclude_user_fold": list(fold)}
    key = config_key({"dataset": config["dataset"], **settings, "fold_of": backbone_key})
    target = Path(config["checkpoint_dir"]) / "backbones" / f"{backbone_model}-{config['dataset']}-fold{fold[0]}of{fold[1]}-{key}.pth"
    if not target.is_file():
        getLogger().info(f"cross_fit_folds={fold[1]}: training {backbone_model} without fold {fold[0]}'s users -> {target}")
        _train_and_cache(backbone_model, config, config_file_list, settings, target)
    return target


def ensure_refit_backbone(config: Any, config_file_list: list[str] | None, backbone_model: str, shared: dict[str, Any],
                          backbone_key: str, epochs: int) -> Path:
    """The refit backbone of ``backbone_refit_epochs``, trained once and cached: a copy of the
    backbone (``init_checkpoint``) trained up to ``epochs`` more epochs, early stopping on valid,
    on every training target, the stacking holdout included. It is keyed by the backbone file's
    content and the settings, so another backbone or schedule trains another refit."""
    import hashlib

    source = Path(config["backbone_checkpoint"])
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    settings = {**shared, "holdout_last_targets": 0, "epochs": epochs, "init_checkpoint": str(source)}
    key = config_key({"dataset": config["dataset"], "init_sha256": digest, "backbone_key": backbone_key,
                      "start_validated": True,  # refits from before the warm start was validated first are not reused
                      **{k: v for k, v in settings.items() if k != "init_checkpoint"}})
    target = Path(config["checkpoint_dir"]) / "backbones" / f"{backbone_model}-{config['dataset']}-refit-{key}.pth"
    if not target.is_file():
        getLogger().info(f"backbone_refit_epochs={epochs}: continuing {source.name} on every training target -> {target}")
        _train_and_cache(backbone_model, config, config_file_list, settings, target)
    return target


def cold_rows(config: Any, train_data: Any, test_data: Any, warm: bool = False) -> Any:
    """Test rows whose item had at most ``cold_item_threshold`` training interactions (``warm``: more);
    None when the threshold is unset."""
    import numpy as np

    from recbole_llmalign.data import training_pairs

    threshold = config["cold_item_threshold"] if "cold_item_threshold" in config else None
    if threshold is None:
        return None
    train_dataset, test_dataset = train_data._dataset, test_data._dataset
    items = np.fromiter((item for _, item in training_pairs(train_dataset)), dtype=np.int64)
    counts = np.bincount(items, minlength=train_dataset.item_num)
    targets = test_dataset.inter_feat[test_dataset.iid_field].numpy()
    is_cold = counts[targets] <= int(threshold)
    return np.flatnonzero(~is_cold if warm else is_cold)


def new_rows(test_data: Any) -> Any:
    """Test rows whose item is new under ``new_item_ratio``; None when the protocol is off."""
    import numpy as np

    test_dataset = test_data._dataset
    new_items = getattr(test_dataset, "new_item_ids", None)
    if new_items is None:
        return None
    return np.flatnonzero(np.isin(test_dataset.inter_feat[test_dataset.iid_field].numpy(), new_items))


def slice_from_per_user(config: Any, test_data: Any, rows: Any, per_user: dict[str, Any] | None) -> dict[str, Any] | None:
    """RecBole's metrics on ``rows`` averaged from the full test evaluation's per-user values, without
    scoring again (a beam-search model would otherwise search those users twice).

    Only when every test row is its own user (leave-one-out full ranking) and every configured metric
    has per-user values; None otherwise. Same numbers as evaluating a loader of those rows: each
    row's scores do not depend on the other rows of its batch.
    """
    import numpy as np

    from recbole_llmalign.evaluator import PER_USER_TOPK_METRICS

    metrics = [m.lower() for m in config["metrics"]]
    if per_user is None or any(m not in PER_USER_TOPK_METRICS for m in metrics):
        return None
    test_dataset = test_data._dataset
    row_users = test_dataset.inter_feat[test_dataset.uid_field].numpy()
    if len(np.unique(row_users)) != len(row_users) or len(per_user["user"]) != len(row_users):
        return None
    order = np.argsort(per_user["user"])
    index = order[np.searchsorted(per_user["user"], row_users[rows], sorter=order)]
    return {f"{m}@{k}": round(per_user[f"{m}@{k}"][index].mean(), config["metric_decimal_place"])
            for m in metrics for k in config["topk"]}


def evaluate_rows(config: Any, trainer: Any, test_data: Any, rows: Any,
                  per_user: dict[str, Any] | None = None) -> dict[str, float] | None:
    """Test metrics on ``rows`` of the test split (None when there are none), plus ``n_users``.

    Works for any model: the same evaluator runs on a copy of the test loader restricted to those
    rows (one row per user under leave-one-out; one per (user, item) pair in labeled mode), unless
    ``per_user`` (the full test evaluation's per-user values) already holds them (``slice_from_per_user``).
    """
    if rows is None or len(rows) == 0:
        return None
    averaged = slice_from_per_user(config, test_data, rows, per_user)
    if averaged is not None:
        return {**averaged, "n_users": float(len(rows))}
    test_dataset = test_data._dataset
    loader = type(test_data)(config, test_dataset.copy(test_dataset.inter_feat[rows]), test_data._sampler, shuffle=False)
    result = trainer.evaluate(loader, load_best_model=False, show_progress=False)
    result["n_users"] = float(len(rows))
    return result


def evaluate_cold_slice(config: Any, trainer: Any, train_data: Any, test_data: Any, warm: bool = False,
                        per_user: dict[str, Any] | None = None) -> dict[str, float] | None:
    """Test metrics on the rows whose test item had at most ``cold_item_threshold`` training interactions
    (with ``warm=True``: more than that); None when the threshold is unset or the slice is empty."""
    return evaluate_rows(config, trainer, test_data, cold_rows(config, train_data, test_data, warm), per_user)


def evaluate_new_slice(config: Any, trainer: Any, test_data: Any,
                       per_user: dict[str, Any] | None = None) -> dict[str, float] | None:
    """Test metrics on the rows whose test item is new (``new_item_ratio``: never in training, as target
    or input); None when the protocol is off or the slice is empty."""
    return evaluate_rows(config, trainer, test_data, new_rows(test_data), per_user)


def backbone_slice_results(config: Any, train_data: Any, test_data: Any,
                           per_user: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """The own backbone's cold and new slices (``backbone_test_cold_result`` / ``backbone_test_new_result``),
    averaged from its per-user test metrics (``per_user``, the backbone's evaluation): the ratio a new-item
    claim is judged on. Only from per-user values, never by evaluating again (the trainer holds the LLM
    model by then); none without them (distributed runs, labeled mode)."""
    if per_user is None:
        return {}
    found = {"backbone_test_cold_result": cold_rows(config, train_data, test_data), "backbone_test_new_result": new_rows(test_data)}
    results = {}
    for key, rows in found.items():
        averaged = slice_from_per_user(config, test_data, rows, per_user) if rows is not None and len(rows) else None
        if averaged is not None:
            results[key] = {**averaged, "n_users": float(len(rows))}
    return results


def save_per_user_metrics(config: Any, checkpoint: str, per_user: dict[str, Any] | None, train_data: Any,
                          test_data: Any) -> str:
    """Write each test user's metrics to ``<checkpoint without .pth>.test_per_user.csv``; returns the path ("" if none).

    Columns: ``user`` (external id), one per top-k metric (``ndcg@10``, ...), then ``test_cold`` and
    ``test_new`` (1 when the user's test item is in that slice). Paired significance tests between
    models (``report.significance_rows``) read these; the mean of a column is RecBole's test metric.
    """
    import numpy as np

    if per_user is None or (not config["single_spec"] and config["local_rank"] != 0):
        return ""
    test_dataset = test_data._dataset
    row_users = test_dataset.inter_feat[test_dataset.uid_field].numpy()
    users = per_user["user"]
    columns = {"user": np.asarray(test_dataset.field2id_token[test_dataset.uid_field])[users]}
    columns.update({k: v for k, v in per_user.items() if k != "user"})
    for split, rows in (("test_cold", cold_rows(config, train_data, test_data)), ("test_new", new_rows(test_data))):
        columns[split] = np.isin(users, row_users[rows]).astype(int) if rows is not None else np.zeros(len(users), dtype=int)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*((v if k == "user" else [f"{x:.6g}" for x in v]) for k, v in columns.items())))
    path = Path(checkpoint).with_suffix("").as_posix() + ".test_per_user.csv"
    atomic_write_text(path, buffer.getvalue())
    return path


def run_recbole_llmalign(
    model: str | None = None,
    dataset: str | None = None,
    config_file_list: list[str] | None = None,
    config_dict: dict[str, Any] | None = None,
    saved: bool = True,
    nproc: int = 1,
    world_size: int = -1,
    ip: str = "localhost",
    port: str = "5678",
    group_offset: int = 0,
) -> dict[str, Any]:
    """RecBole's ``run_recbole`` (and ``run`` for several processes) with the plugin's models,
    properties and compatibility fixes.

    Returns the same dict: ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``,
    ``test_result``; plus ``test_cold_result`` (metrics on test users whose target item had at
    most ``cold_item_threshold`` training interactions) when that slice is not empty, and
    ``test_new_result`` (users whose test item is new under ``new_item_ratio``) when that is on.
    ``nproc``/``world_size``/``ip``/``port``/``group_offset`` are RecBole's multi-process
    arguments; on CPUs the ranks use the gloo backend.
    """
    if nproc == 1 and world_size <= 0:
        result, _ = run_with_cost(model, dataset, config_file_list, config_dict, saved)
        return result
    result, _ = run_distributed(model, dataset, config_file_list, config_dict, saved, nproc, world_size, ip, port, group_offset)
    return result


def _run_rank(rank: int, model: str | None, dataset: str | None, config_file_list: list[str] | None,
              config_dict: dict[str, Any], saved: bool, queue: Any) -> None:
    result, cost = run_with_cost(model, dataset, config_file_list, {**config_dict, "local_rank": rank}, saved)
    if rank == 0:
        queue.put((result, asdict(cost)))


def run_distributed(model: str | None, dataset: str | None, config_file_list: list[str] | None,
                    config_dict: dict[str, Any] | None, saved: bool = True, nproc: int = 2, world_size: int = -1,
                    ip: str = "localhost", port: str = "5678", group_offset: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Spawn ``nproc`` ranks of ``run_with_cost`` on this node; returns rank 0's (result, cost).

    Whatever must exist exactly once is made first, in this process: the dataset files and,
    for AlignLLMRec, the cached backbone (its checkpoint path is handed to every rank).
    """
    import torch.multiprocessing as mp

    config_dict = dict(config_dict or {})
    parent = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_logger(parent)
    prepare_dataset(parent)
    ensure_backbone(parent, config_file_list)
    for key in ("backbone_checkpoint", "refit_backbone_checkpoint", "cross_fit_backbone_checkpoints"):  # the ranks load what the parent trained
        if key in parent and parent[key]:
            config_dict[key] = parent[key]
    config_dict.update(world_size=world_size if world_size > 0 else nproc, ip=ip, port=port, nproc=nproc, offset=group_offset)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_run_rank, args=(model, dataset, config_file_list, config_dict, saved, queue), nprocs=nproc, join=True)
    if queue.empty():
        raise RuntimeError("Rank 0 returned no result; see the ranks' logs above.")
    return queue.get()


SEQUENTIAL_PROTOCOL = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}


def shared_protocol(
    models: list[str], dataset: str, config_file_list: list[str] | None, config_dict: dict[str, Any] | None
) -> dict[str, Any]:
    """One evaluation protocol for every compared model.

    RecBole gives general models a random 80/10/10 split and sequential models a time-ordered
    leave-one-out split, so Pop and SASRec would not be scored on the same test set. When the user
    sets no ``eval_args`` and any model is sequential, every model gets the leave-one-out split
    (the only one sequential models accept); otherwise the dataset's or RecBole's default applies.
    """
    from recbole.utils import ModelType

    shared = dict(config_dict or {})
    files = Config(model=models[0], dataset=dataset, config_file_list=config_file_list,
                   config_dict=shared).external_config_dict
    if "eval_args" in files or "eval_args" in shared:
        return shared
    if any(get_model(m).type == ModelType.SEQUENTIAL for m in models):
        shared["eval_args"] = SEQUENTIAL_PROTOCOL
    return shared


def _run_in_child(args: tuple) -> tuple[dict[str, Any], dict[str, Any]]:
    import pickle

    try:
        result, cost = run_with_cost(*args)
    except Exception as error:  # an exception that cannot cross the process boundary would hide its own message
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            raise RuntimeError(f"{type(error).__name__}: {error}") from None
        raise
    return result, asdict(cost)


def compare(
    models: list[str | tuple[str, str, dict[str, Any]]],
    dataset: str,
    config_file_list: list[str] | None = None,
    config_dict: dict[str, Any] | None = None,
    output_dir: str | Path = "saved/compare",
    name: str | None = None,
    saved: bool = True,
    seeds: list[int] | None = None,
    reference: str | list[str] | None = None,
    per_user_dir: str | Path | None = None,
    resume: bool = False,
    rerun: Sequence[tuple[str, str]] = (),
    table: dict[str, Any] | None = None,
    keep_going: bool = False,
) -> list[dict[str, Any]]:
    """Run every model with one shared config and seed; write a Markdown table, CSV and PNG.

    ``models`` holds names, or ``(name, setting, overrides)`` for an ablation: ``overrides`` are
    applied on top of the shared config for that run only. Each model runs in a fresh process so
    its peak memory is its own and no state leaks from one run to the next. Returns one record
    per run (``{model, setting, seed, result, cost}``).

    ``seeds``: every model runs once per seed (all models for the first seed, then the next), and
    the outputs gain per-seed rows and mean/std rows (``report`` module docstring). ``reference``
    (a model name, or ``Model:setting``): every other model gets a paired bootstrap over test users
    of its NDCG@10 difference to it, pooled over seeds; each run's per-user test metrics are kept
    for it in ``per_user_dir`` (default ``<checkpoint_dir>/per_user/<name>``, outside the results).
    Several references (a comma list or a list): the first is the primary one (rows ``ndcg@10_diff``
    etc., as with one), each further ``R`` adds ``ndcg@10_diff_vs_R`` etc. and its own column and
    table; a reference that is not among the compared models is skipped with a warning.
    ``resume``: runs already in ``<output_dir>/<name>.csv`` (same model, setting and seed) are not
    rerun but merged, as are that file's other runs, except the (model, setting) pairs in ``rerun``,
    which train again for this call's seeds (e.g. after a fix that changes them; their other seeds'
    rows are kept, and a rerun that fails keeps its earlier row; a rerun that reproduces every recorded
    valid and test metric, ``report.reproduces``, counts as the same run). A kept run's bootstrap rows are
    recomputed from the per-user files, or, where those are gone (another machine, a fresh
    checkout), taken from the file while neither the run nor its reference trained again
    (``report.kept_significance_rows``). ``table``: keyword arguments for
    ``report.write_comparison`` (``preface``, ``metrics``, ``slice_metrics``, ``notes``).
    ``keep_going``: a run that fails is logged, listed under the table and skipped (a resumed
    comparison retries it) instead of ending the comparison.
    """
    import shutil

    from tqdm import tqdm

    from recbole_llmalign import report

    quiet_third_party_warnings()  # each run then applies its own config's quiet_third_party_warnings
    name = name or f"compare-{dataset}"
    runs = [(m, "default", {}) if isinstance(m, str) else m for m in models]
    config_dict = shared_protocol([model for model, _, _ in runs], dataset, config_file_list, config_dict)
    output_dir = Path(output_dir)
    per_user_dir = Path(per_user_dir) if per_user_dir else Path(config_dict.get("checkpoint_dir", "saved")) / "per_user" / name
    earlier: dict[tuple[str, str, int | None], dict[str, Any]] = {}
    earlier_rows: list[dict[str, str]] = []  # for its bootstrap rows: the per-user files they came from may be gone
    if resume and (output_dir / f"{name}.csv").is_file():
        earlier_rows = report.read_csv(output_dir / f"{name}.csv")
        found = report.records_from_rows(earlier_rows)
        earlier = {(r["model"], r["setting"], r["seed"]): r for r in found}
    plan = [(model, setting, overrides, seed) for seed in (seeds or [None]) for model, setting, overrides in runs]
    planned = {(model, setting, seed) for model, setting, _, seed in plan}
    records = [r for key, r in earlier.items() if key not in planned]  # merged from an earlier, different invocation
    failures: list[str] = []
    trained: set[tuple[str, str]] = set()  # (model, setting) with a run trained in this call: its earlier bootstrap rows are stale
    row_order: dict[tuple[str, str], int] = {}  # table rows: the earlier file's order, then this plan's new rows
    for model, setting, *_ in [*earlier, *plan]:
        row_order.setdefault((model, setting), len(row_order))

    def write() -> None:
        options = dict(table or {})
        if failures:
            options["preface"] = options.get("preface", "") + "Runs that failed (rerun to retry them):\n\n" + "".join(failures) + "\n"
        rows = sorted(records, key=lambda r: row_order[(r["model"], r["setting"])])  # stable: seeds keep their order
        unchanged = {(r["model"], r["setting"]) for r in records} - trained
        kept = report.kept_significance_rows(earlier_rows, reference, unchanged)
        report.write_comparison(rows, dataset, output_dir, name, reference=reference, per_user_dir=per_user_dir,
                                kept_significance=kept, **options)

    context = multiprocessing.get_context("spawn")
    progress = tqdm(plan, desc=f"compare on {dataset}", unit="run")
    for model, setting, overrides, seed in progress:
        if (model, setting, seed) in earlier and (model, setting) not in set(rerun):
            records.append(earlier[(model, setting, seed)])
            continue
        progress.set_postfix_str(f"{model} ({setting}{'' if seed is None else f', seed {seed}'})")
        run_config = {**config_dict, **overrides, **({} if seed is None else {"seed": seed})}
        try:
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                result, cost = pool.submit(_run_in_child, (model, dataset, config_file_list, run_config, saved)).result()
        except Exception as error:
            if not keep_going:
                raise
            message = " ".join(f"{type(error).__name__}: {error}".split())
            logging.getLogger(__name__).error(f"compare: {model} ({setting}, seed {seed}) failed and is skipped: {message}")
            failures.append(f"- {model} ({setting}{'' if seed is None else f', seed {seed}'}) failed: {message[:500]}\n")
            if (model, setting, seed) in earlier:  # a failed rerun keeps the earlier result rather than lose it
                records.append(earlier[(model, setting, seed)])
            continue
        record = {"model": model, "setting": setting, "seed": seed, "result": result, "cost": cost}
        previous = earlier.get((model, setting, seed))
        if previous is not None and report.reproduces(record, previous):  # e.g. rerun only to recreate per-user files
            logging.getLogger(__name__).info(f"compare: {model} ({setting}, seed {seed}) reproduced its recorded valid and "
                                             "test metrics; its earlier bootstrap rows still hold")
        else:
            trained.add((model, setting))
        if cost.get("per_user_file"):
            atomic_write_with(report.per_user_path(per_user_dir, model, setting, report.record_seed(record)),
                              lambda temp, source=cost["per_user_file"]: shutil.copyfile(source, temp))
        records.append(record)
        write()  # partial results survive a crash
    if records:  # always: runs kept from the earlier file after the last new run are in no write yet
        write()
    for ref in report.parse_references(reference):
        if not any(r["model"] == ref.partition(":")[0] for r in records):
            logging.getLogger(__name__).warning(f"reference {ref!r} is not among the compared models; no significance rows.")
    logging.getLogger(__name__).info(f"comparison written to {output_dir / name}.md/.csv/.png")
    return records


def load_data_and_model(model_file: str | Path, trust: bool = False) -> tuple[Any, Any, Any, Any, Any, Any]:
    """RecBole's ``load_data_and_model`` for plugin and RecBole checkpoints alike.

    Returns ``(config, model, dataset, train_data, valid_data, test_data)``, the model in eval
    mode on the config's device. The checkpoint is read on the CPU first, so a GPU-trained file
    loads on a CPU-only machine. It is read under the allowlist of ``safe_load`` unless ``trust``
    (``--trust_checkpoint``), which also becomes the loaded config's ``trust_checkpoint``, the
    trust the model's own loads (an LLM model's backbone) use.
    """
    from recbole_llmalign.compat import load_checkpoint

    if not Path(model_file).is_file():
        raise FileNotFoundError(f"Checkpoint {model_file} does not exist; pass a file from the run's checkpoint_dir (default saved/).")
    checkpoint = load_checkpoint(model_file, map_location="cpu", trust=trust)
    config = upgrade_config(checkpoint["config"])  # checkpoints from earlier versions
    if "cross_fit_backbone_checkpoints" in config and (config["cross_fit_evaluation"] or "full") == "full":
        config["cross_fit_backbone_checkpoints"] = None  # training-only backbones: this trained model never reads them
        config["cross_fit_folds"] = 0
    if not torch.cuda.is_available():
        config["device"] = torch.device("cpu")
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    prepare_dataset(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    model.eval()
    return config, model, dataset, train_data, valid_data, test_data


from recbole_llmalign.hyper import objective_function  # noqa: E402,F401  RecBole's tuning entry point (HyperTuning)
