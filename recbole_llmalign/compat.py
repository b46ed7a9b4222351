"""The one place that adapts RecBole 1.2.1 to today's numpy, torch and ray.

RecBole 1.2.1 was released against numpy 1.x and torch < 2.6. Each adapter below fixes one
breakage seen on the current stack; :func:`apply` runs them all once and is called by
``recbole_llmalign/__init__.py`` before any RecBole module is imported. The remaining breakages
are handled by pins in ``setup.cfg`` (``pandas<3``: copy-on-write makes RecBole's
``fillna(inplace=True)`` a no-op; ``setuptools<81``: ray 2.6.3 imports ``pkg_resources``).
Every adapter is covered by a test in ``tests/test_compat.py`` that fails without it.

This module is the only library code allowed to touch process-wide state, and it only undoes
or aliases; it never changes threads, dtype defaults or anomaly mode beyond restoring them.
"""

from __future__ import annotations

import functools
import importlib
import os
import types
from typing import Any

import numpy as np
import torch

# numpy 2 removed these aliases; RecBole's Config.compatibility_settings() reads np.float_,
# np.complex_ and np.unicode_, and ray 2.6.3's tune loggers read np.bool8 at import time.
# RecBole's metrics (NDCG, MAP, ...) use np.float and friends, which only that Config method
# restores: a checkpoint's unpickled Config never runs it, so evaluating a loaded model would fail.
NUMPY_ALIASES: dict[str, Any] = {
    "float_": np.float64,
    "complex_": np.complex128,
    "unicode_": np.str_,
    "bool8": np.bool_,
    "float": np.float64,
    "int": np.int_,
    "complex": np.complex128,
    "object": np.object_,
    "str": np.str_,
    "unicode": np.str_,
}

# RecBole modules that call torch.load on checkpoints RecBole itself wrote (they pickle the Config).
MODULES_LOADING_OWN_CHECKPOINTS = (
    "recbole.trainer.trainer",
    "recbole.quick_start.quick_start",
)

_applied = False
_torch_load = torch.load  # the real one, kept before any scoped replacement


def add_numpy_aliases() -> None:
    """Restore the numpy 1.x aliases RecBole and ray still use (no-op on numpy 1.x)."""
    for name, value in NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)


def load_checkpoint(path: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.load`` for checkpoints written by RecBole or this plugin.

    torch >= 2.6 defaults to ``weights_only=True``, which refuses RecBole's checkpoints because
    they pickle the run's Config. Only files we wrote are loaded this way; user-supplied
    weights keep torch's safe default.
    """
    import pickle
    import zipfile

    kwargs.setdefault("weights_only", False)
    try:
        return _torch_load(path, *args, **kwargs)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        unreadable = not isinstance(error, RuntimeError) or "PytorchStreamReader" in str(error) or "zip" in str(error)
        if not isinstance(path, (str, os.PathLike)) or not unreadable:
            raise
        raise ValueError(
            f"Checkpoint {path} is corrupt or truncated ({type(error).__name__}: {str(error)[:120]}). "
            "It was probably cut off while being written: retrain to write it again, or use an earlier checkpoint."
        ) from error


class _TorchWithCheckpointLoad(types.ModuleType):
    """A view of the ``torch`` module whose ``load`` is :func:`load_checkpoint`.

    Installed as the ``torch`` global of the few RecBole modules listed in
    ``MODULES_LOADING_OWN_CHECKPOINTS``, so the change is scoped to them and torch itself is
    left untouched for every other caller.
    """

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    load = staticmethod(load_checkpoint)


def scope_checkpoint_loading() -> None:
    """Make RecBole's own checkpoint loading (best model, resume, load_data_and_model) work."""
    for module_name in MODULES_LOADING_OWN_CHECKPOINTS:
        module = importlib.import_module(module_name)
        if isinstance(module.__dict__.get("torch"), _TorchWithCheckpointLoad):
            continue
        module.torch = _TorchWithCheckpointLoad()
    # load_data_and_model() does ``import torch`` inside the function body, which binds the
    # real module; wrap that function instead.
    quick_start = importlib.import_module("recbole.quick_start.quick_start")
    original = quick_start.load_data_and_model
    if not getattr(original, "_loads_own_checkpoints", False):

        @functools.wraps(original)
        def load_data_and_model(model_file: str):  # type: ignore[no-untyped-def]
            torch.load = load_checkpoint  # type: ignore[assignment]
            try:
                return original(model_file)
            finally:
                torch.load = _torch_load  # type: ignore[assignment]

        load_data_and_model._loads_own_checkpoints = True  # type: ignore[attr-defined]
        quick_start.load_data_and_model = load_data_and_model
        importlib.import_module("recbole.quick_start").load_data_and_model = load_data_and_model


def import_sequential_models_without_anomaly_mode() -> None:
    """Import RecBole's sequential models while keeping torch's anomaly detection as it was.

    ``recbole/model/sequential_recommender/sine.py`` calls
    ``torch.autograd.set_detect_anomaly(True)`` at import, slowing every later backward pass in
    the process (SASRec on ml-100k: 211-390 s per epoch instead of 144-177 s). Importing the
    package here, once, and restoring the previous mode undoes that for good.
    """
    was_enabled = torch.is_anomaly_enabled()
    importlib.import_module("recbole.model.sequential_recommender")
    importlib.import_module("recbole.model.sequential_recommender.sine")
    torch.autograd.set_detect_anomaly(was_enabled)


def ddp_on_cpu() -> None:
    """RecBole wraps models in ``DistributedDataParallel(model, device_ids=[local_rank])``, which
    torch refuses for CPU modules; give CPU modules ``device_ids=None`` (RecBole's trainer module only)."""
    trainer_module = importlib.import_module("recbole.trainer.trainer")
    original = trainer_module.DistributedDataParallel
    if getattr(original, "_cpu_aware", False):
        return

    def distributed_data_parallel(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if all(p.device.type == "cpu" for p in module.parameters()):
            kwargs["device_ids"] = None
        return original(module, *args, **kwargs)

    distributed_data_parallel._cpu_aware = True  # type: ignore[attr-defined]
    trainer_module.DistributedDataParallel = distributed_data_parallel


def apply() -> None:
    """Run every adapter once. Idempotent."""
    global _applied
    if _applied:
        return
    add_numpy_aliases()
    import_sequential_models_without_anomaly_mode()
    scope_checkpoint_loading()
    ddp_on_cpu()
    _applied = True
