"""The one place that adapts RecBole 1.2.1 to today's numpy, scipy, torch and ray.

RecBole 1.2.1 was released against numpy 1.x and torch < 2.6. Each adapter below fixes one
breakage seen on the current stack; :func:`apply` runs them all once and is called by
``recbole_llmalign/__init__.py`` before any RecBole module is imported. The remaining breakages
are handled by pins in ``setup.cfg`` (``pandas<3``: copy-on-write makes RecBole's
``fillna(inplace=True)`` a no-op; ``setuptools``: RecBole's FLOPs counter, thop, imports
``distutils``, gone from Python 3.12's standard library). RecBole itself is installed with
``--no-deps`` because it pins ``ray<=2.6.3`` (no wheels for Python 3.12+); ray is optional here.
Every adapter is covered by a test in ``tests/test_compat.py`` that fails without it.

This module is the only library code allowed to touch process-wide state. Besides undoing and
aliasing, it registers the plugin's one RecBole extension, the UAUC metric (``register_uauc``:
RecBole's metric registry and its collector, which must keep user ids). It never changes
threads, dtype defaults or anomaly mode beyond restoring them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types
from typing import Any

import numpy as np
import scipy.sparse
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

# What recbole/quick_start/quick_start.py imports besides ray (RecBole 1.2.1).
QUICK_START_IMPORTS = ("torch.distributed", "recbole.config", "recbole.data", "recbole.data.transform", "recbole.utils")

# RecBole modules that fill a graph adjacency with ``dok_matrix._update(dict)``, a private bulk
# update that current scipy removed (DOK entries now live in a private ``_dict``).
MODULES_FILLING_DOK_MATRICES = (
    "recbole.model.general_recommender.gcmc",
    "recbole.model.general_recommender.lightgcn",
    "recbole.model.general_recommender.ncl",
    "recbole.model.general_recommender.ngcf",
    "recbole.model.general_recommender.spectralcf",
    "recbole.model.knowledge_aware_recommender.kgin",
    "recbole.model.knowledge_aware_recommender.mcclk",
)

# Where RecBole 1.2.1 comes from: it is not in install_requires (its metadata pins ray<=2.6.3).
RECBOLE_INSTALL = "pip install --no-deps recbole==1.2.1"

# RecBole 1.2.1's objective_function reports with the ray<=2.6.3 API (tune.report(**metrics); later
# ray takes one metrics dict), and ray 2.6.3 has wheels up to Python 3.11 only.
RAY_TUNING_HELP = (
    "RecBole 1.2.1 reports to ray with the ray<=2.6.3 API, which installs on Python 3.11 or older: "
    'there run pip install "ray>=1.13.0,<=2.6.3" "setuptools<81" (the `ray` extra of '
    "recbole-llmalign). On Python 3.12+ tune with hyperopt instead: pip install -e \".[hyper]\", then "
    "run_recbole_llmalign.py hyper (RecBole's HyperTuning)."
)

_applied = False
_torch_load = torch.load  # the real one, kept before any scoped replacement


def require_recbole() -> None:
    """Fail with the install command when RecBole is missing (it is installed on its own)."""
    if importlib.util.find_spec("recbole") is None:
        raise ImportError(
            "recbole-llmalign needs RecBole 1.2.1, installed without its dependencies (its ray<=2.6.3 "
            f"pin has no wheels for Python 3.12+; its other requirements came with this package): {RECBOLE_INSTALL}"
        )


def add_numpy_aliases() -> None:
    """Restore the numpy 1.x aliases RecBole and ray still use (no-op on numpy 1.x)."""
    for name, value in NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)


# Checkpoints this process wrote itself (path -> sha256 when written): RecBole's trainer reloads its
# best checkpoint for testing, and some RecBole models (SASRecF, FDSA) pickle a whole feature layer,
# with the dataset inside, into it. A file this process wrote and nobody changed since is loaded in full.
_WRITTEN_HERE: dict[str, str] = {}


def remember_own_checkpoint(path: Any) -> None:
    """Record a checkpoint this process has just written (see ``_WRITTEN_HERE``)."""
    from recbole_llmalign.io import file_sha256

    _WRITTEN_HERE[os.path.realpath(path)] = file_sha256(path)


def _written_here(path: Any) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    from recbole_llmalign.io import file_sha256

    real = os.path.realpath(path)
    return real in _WRITTEN_HERE and os.path.isfile(real) and file_sha256(real) == _WRITTEN_HERE[real]


def load_checkpoint(path: Any, *args: Any, trust: bool = False, **kwargs: Any) -> Any:
    """``torch.load`` for checkpoints, latest-state files and caches written by RecBole or this plugin.

    torch >= 2.6's ``weights_only=True`` refuses RecBole's checkpoints (they pickle the run's
    Config). They are loaded by :func:`recbole_llmalign.safe_load.load` instead, which admits
    only the globals such files need and raises ``UnsafeCheckpointError`` for anything else;
    ``trust=True`` (``trust_checkpoint``) unpickles a file the user trusts in full.
    """
    import pickle
    import zipfile

    from recbole_llmalign import safe_load

    try:
        return safe_load.load(path, *args, trust=trust or _written_here(path), **kwargs)
    except safe_load.UnsafeCheckpointError:
        raise
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


class RayTuneUnavailable:
    """Stands in for ``ray.tune`` in ``recbole.quick_start.quick_start`` when ray cannot be imported.

    ``report`` does nothing, as ray's own ``tune.report`` does outside a tuning session: RecBole's
    ``objective_function`` calls it after every run, under hyperopt (``HyperTuning``) too, where
    there is no ray session. Every other use raises an ImportError that says which ray to install.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def report(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(
            f"ray.tune.{name}: ray-based tuning needs ray, which cannot be imported here ({self.reason}). "
            + RAY_TUNING_HELP
        )

    def __repr__(self) -> str:
        return f"<ray.tune unavailable: {self.reason}>"


def import_quick_start_without_ray() -> None:
    """Let ``recbole.quick_start`` import where ray cannot be imported.

    RecBole 1.2.1 imports ray in one module, ``recbole/quick_start/quick_start.py``
    (``from ray import tune``, used by ``objective_function`` for ray-based tuning only). When
    that import fails, the module is imported with a stand-in ``ray`` that is in ``sys.modules``
    only while it imports, so its ``tune`` is a :class:`RayTuneUnavailable` and ``import ray``
    anywhere else still fails as before. Where ray imports, nothing changes.
    """
    if "recbole.quick_start.quick_start" in sys.modules:
        return
    try:
        from ray import tune  # noqa: F401
        return
    except Exception as error:  # ImportError, or a ray too old for this numpy/setuptools
        reason = f"{type(error).__name__}: {error}"
    # Everything else quick_start.py imports comes first, so that only it sees the stand-in.
    for name in QUICK_START_IMPORTS:
        importlib.import_module(name)
    stand_in = types.ModuleType("ray")
    stand_in.tune = RayTuneUnavailable(reason)  # type: ignore[attr-defined]
    had_ray, previous = "ray" in sys.modules, sys.modules.get("ray")
    sys.modules["ray"] = stand_in
    try:
        importlib.import_module("recbole.quick_start.quick_start")
    finally:
        if had_ray:
            sys.modules["ray"] = previous  # type: ignore[assignment]
        else:
            sys.modules.pop("ray", None)


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


class _DokMatrixWithUpdate(scipy.sparse.dok_matrix):
    """scipy's ``dok_matrix`` plus the ``_update`` older scipy had: an unchecked bulk update.

    RecBole passes a dict of ``(row, col) -> 1`` built from a valid COO matrix, so the per-key
    checks of the public ``update`` would only cost time (250x slower: 1.7 s for 200k entries).
    """

    def _update(self, data: dict) -> None:
        storage = getattr(self, "_dict", None)
        if storage is None:  # a scipy whose DOK keeps no separate dict: the checked public path
            self.update(data)
        else:
            storage.update(data)


class _SparseWithDokUpdate(types.ModuleType):
    """A view of ``scipy.sparse`` whose ``dok_matrix`` has ``_update``.

    Installed as the ``sp`` global of the RecBole modules in ``MODULES_FILLING_DOK_MATRICES``
    only, so scipy itself is left untouched for every other caller.
    """

    def __init__(self) -> None:
        super().__init__("scipy.sparse")

    def __getattr__(self, name: str) -> Any:
        return getattr(scipy.sparse, name)

    dok_matrix = _DokMatrixWithUpdate


def dok_matrix_update() -> None:
    """Let RecBole's graph models (LightGCN, NGCF, NCL, GCMC, SpectralCF, KGIN, MCCLK) build
    their adjacency on a scipy without ``dok_matrix._update`` (no-op on a scipy that has it)."""
    if hasattr(scipy.sparse.dok_matrix, "_update"):
        return
    for module_name in MODULES_FILLING_DOK_MATRICES:
        module = importlib.import_module(module_name)
        if not isinstance(module.__dict__.get("sp"), _SparseWithDokUpdate):
            module.sp = _SparseWithDokUpdate()


def register_uauc() -> None:
    """Add the plugin's UAUC to RecBole's metric registry and teach RecBole's collector to keep the
    user ids it needs (RecBole collects them for no value metric). Idempotent."""
    from recbole.evaluator import collector, register

    from recbole_llmalign.evaluator import UAUC, USER_KEY

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


def ksr_float_relations() -> None:
    """RecBole's KSR keeps its preloaded relation vectors as float64 (``np.zeros`` in the dataset)
    and multiplies them with float32 states, so every KSR run fails with ``expected m1 and m2 to
    have the same dtype``; cast them to the model's dtype once it is built (KSR only)."""
    ksr = importlib.import_module("recbole.model.sequential_recommender.ksr").KSR
    original = ksr.__init__
    if getattr(original, "_float_relations", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, config: Any, dataset: Any) -> None:
        original(self, config, dataset)
        self.relation_Matrix = self.relation_Matrix.to(self.entity_embedding.weight.dtype)

    __init__._float_relations = True  # type: ignore[attr-defined]
    ksr.__init__ = __init__


def apply() -> None:
    """Run every adapter once. Idempotent."""
    global _applied
    if _applied:
        return
    require_recbole()
    add_numpy_aliases()
    import_sequential_models_without_anomaly_mode()
    import_quick_start_without_ray()
    scope_checkpoint_loading()
    ddp_on_cpu()
    dok_matrix_update()
    ksr_float_relations()
    register_uauc()
    _applied = True
