"""Entry points a RecBole user knows: ``run_recbole_llmalign`` (same result dict as RecBole's
``run_recbole``) and ``compare`` (several models, one shared config and seed, one table)."""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from logging import getLogger
from pathlib import Path
from typing import Any

import torch
from recbole.data import create_dataset, data_preparation
from recbole.data.transform import construct_transform
from recbole.utils import get_environment, get_flops, init_logger, init_seed, set_color

from recbole_llmalign.config import Config
from recbole_llmalign.data import prepare_dataset
from recbole_llmalign.trainer import stacking_holdout, with_run_controls
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
    try:  # RecBole's counter is informational and trips over shared submodules (e.g. LoRA adapters)
        flops = get_flops(model_obj, dataset_obj, config["device"], logger, transform)
        logger.info(set_color("FLOPs", "blue") + f": {flops}")
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
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
    test_cold_result = evaluate_cold_slice(config, trainer, train_data, test_data)
    mode = config["eval_args"]["mode"]  # RecBole turns it into {"valid": ..., "test": ...}
    labeled = (mode.get("test") if isinstance(mode, dict) else mode) == "labeled"
    test_warm_result = evaluate_cold_slice(config, trainer, train_data, test_data, warm=True) if labeled else None

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
    if test_warm_result is not None:  # labeled protocol: AUC on warm candidates beside cold ones (SeLLa-Rec's columns)
        logger.info(set_color("test result, warm items", "yellow") + f": {test_warm_result}")
        result["test_warm_result"] = test_warm_result
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
        valid_curve=list(getattr(trainer, "valid_curve", [])),
        extra={"text_sec": float(getattr(model_obj, "text_seconds", 0.0)),
               "train_samples": float(getattr(trainer, "training_samples", len(train_data._dataset))),
               **{k: float(v) for k, v in getattr(model_obj, "cost_report", {}).items()}},
    )
    if not config["single_spec"]:
        torch.distributed.destroy_process_group()
    return result, cost


def ensure_backbone(config: Any, config_file_list: list[str] | None = None) -> None:
    """Train and cache the collaborative backbone a model needs when no checkpoint is given.

    Models that declare ``backbone_model`` (AlignLLMRec: AlignSASRec) read ``backbone_checkpoint``.
    When it is empty, the backbone is trained once with the same dataset settings and stored
    under ``<checkpoint_dir>/backbones/`` keyed by those settings; later runs reuse it.
    """
    import hashlib
    import json
    import shutil

    model_class = get_model(config["model"])
    backbone_model = getattr(model_class, "backbone_model", None)
    if backbone_model is None or config["backbone_checkpoint"]:
        return
    own_keys = set(Config(model=config["model"], dataset=config["dataset"], config_dict={"data_path": config["data_path"]})
                   .internal_config_dict) - set(Config(model=backbone_model, dataset=config["dataset"],
                                                       config_dict={"data_path": config["data_path"]}).internal_config_dict)
    shared = {k: v for k, v in config.external_config_dict.items() if k not in own_keys | {"model"}}
    shared.update(data_path=str(Path(config["data_path"]).parent), epochs=int(config["backbone_epochs"]), show_progress=False)
    holdout = stacking_holdout(config)
    if holdout:  # stacking (a YAML default, so not among the user's own keys): the backbone holds the same targets out
        shared["holdout_last_targets"] = holdout
    key = hashlib.sha256(json.dumps({"dataset": config["dataset"], **shared}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    target = Path(config["checkpoint_dir"]) / "backbones" / f"{backbone_model}-{config['dataset']}-{key}.pth"
    if not target.is_file():
        logger = getLogger()
        logger.info(f"No backbone_checkpoint given: training {backbone_model} on {config['dataset']} once -> {target}")
        _, cost = run_with_cost(backbone_model, config["dataset"], config_file_list, dict(shared), saved=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_suffix(".tmp")
        shutil.copyfile(cost.checkpoint, temp)
        os.replace(temp, target)
        init_logger(config)  # the backbone run replaced the log handlers
    config["backbone_checkpoint"] = str(target)


def evaluate_cold_slice(config: Any, trainer: Any, train_data: Any, test_data: Any,
                        warm: bool = False) -> dict[str, float] | None:
    """Test metrics on the rows whose test item had at most ``cold_item_threshold`` training interactions
    (with ``warm=True``: more than that).

    Returns None when the threshold is unset or the slice is empty. Works for any model: the same
    evaluator runs on a copy of the test loader restricted to those rows (one row per user under
    leave-one-out; one per (user, item) pair in labeled mode).
    """
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
    rows = np.flatnonzero(~is_cold if warm else is_cold)
    if len(rows) == 0:
        return None
    loader = type(test_data)(config, test_dataset.copy(test_dataset.inter_feat[rows]), test_data._sampler, shuffle=False)
    result = trainer.evaluate(loader, load_best_model=False, show_progress=False)
    result["n_users"] = float(len(rows))
    return result


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
    most ``cold_item_threshold`` training interactions) when that slice is not empty.
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
    if "backbone_checkpoint" in parent and parent["backbone_checkpoint"]:
        config_dict["backbone_checkpoint"] = parent["backbone_checkpoint"]
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
    result, cost = run_with_cost(*args)
    return result, asdict(cost)


def compare(
    models: list[str | tuple[str, str, dict[str, Any]]],
    dataset: str,
    config_file_list: list[str] | None = None,
    config_dict: dict[str, Any] | None = None,
    output_dir: str | Path = "saved/compare",
    name: str | None = None,
    saved: bool = True,
) -> list[dict[str, Any]]:
    """Run every model with one shared config and seed; write a Markdown table, CSV and PNG.

    ``models`` holds names, or ``(name, setting, overrides)`` for an ablation: ``overrides`` are
    applied on top of the shared config for that run only. Each model runs in a fresh process so its peak memory is its own and no state leaks from one
    run to the next. Returns one record per model (see ``report.records_from_run``).
    """
    from tqdm import tqdm

    from recbole_llmalign import report

    name = name or f"compare-{dataset}"
    runs = [(m, "default", {}) if isinstance(m, str) else m for m in models]
    config_dict = shared_protocol([model for model, _, _ in runs], dataset, config_file_list, config_dict)
    records = []
    context = multiprocessing.get_context("spawn")
    progress = tqdm(runs, desc=f"compare on {dataset}", unit="run")
    for model, setting, overrides in progress:
        progress.set_postfix_str(f"{model} ({setting})")
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            result, cost = pool.submit(
                _run_in_child, (model, dataset, config_file_list, {**config_dict, **overrides}, saved)
            ).result()
        records.append({"model": model, "setting": setting, "result": result, "cost": cost})
        report.write_comparison(records, dataset, Path(output_dir), name)  # partial results survive a crash
    logging.getLogger(__name__).info(f"comparison written to {Path(output_dir) / name}.md/.csv/.png")
    return records


def load_data_and_model(model_file: str | Path) -> tuple[Any, Any, Any, Any, Any, Any]:
    """RecBole's ``load_data_and_model`` for plugin and RecBole checkpoints alike.

    Returns ``(config, model, dataset, train_data, valid_data, test_data)``, the model in eval
    mode on the config's device. The checkpoint is read on the CPU first, so a GPU-trained file
    loads on a CPU-only machine.
    """
    from recbole_llmalign.compat import load_checkpoint

    if not Path(model_file).is_file():
        raise FileNotFoundError(f"Checkpoint {model_file} does not exist; pass a file from the run's checkpoint_dir (default saved/).")
    checkpoint = load_checkpoint(model_file, map_location="cpu")
    config = checkpoint["config"]
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
