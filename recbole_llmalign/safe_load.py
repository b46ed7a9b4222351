"""Loading checkpoints without running code from them: an allowlist of globals, nothing else.

Unpickling a file can call any function the file names, so a checkpoint someone shared could run
code on ``recommend --model_file=...``. Every checkpoint, latest-state (resume) file, backbone
and top-K cache the plugin reads goes through :func:`load`, which admits torch's own
``weights_only`` set plus :data:`SAFE_GLOBALS`, the few globals RecBole 1.2.1's and this plugin's
files need, each found by loading real files (``tests/test_safe_loading.py``). A file that needs
anything else raises :class:`UnsafeCheckpointError`, naming the globals, before any of them is
imported or called; ``trust=True`` (config key ``trust_checkpoint``, CLI ``--trust_checkpoint``)
loads it with full unpickling.

Two readers enforce the same allowlist:

- ``torch.load(weights_only=True)`` under ``torch.serialization.safe_globals``, for zip files
  pickled with protocol 2 (``torch.save``'s default: the plugin's latest-state files and top-K
  caches), after torch's static scan (``get_unsafe_globals_in_checkpoint``) has listed every
  global the file names;
- RecBole's trainer writes its best-model checkpoints with ``pickle_protocol=4``, whose opcodes
  torch's safe unpickler and scan cannot parse at all (``Unsupported operand 149``), so those (and
  torch's pre-zip format) are read by ``torch.load`` with Python's own unpickler restricted the
  way torch restricts its one: ``find_class`` admits only allowlisted names (checked before
  anything is imported) and BUILD only sets the state of allowlisted types.

Model classes are the one open-ended family: RecBole's Config keeps ``model_class``, so every
model's checkpoint names its class. They are admitted by place (a class under ``recbole.model.``
or ``recbole_llmalign.model.``) as an inert :class:`ModelClassReference` that cannot be called
while unpickling (a model's constructor loads files named by its arguments), and swapped for the
real class once the file is loaded.
"""

from __future__ import annotations

import collections
import importlib
import logging
import os
import pickle
import re
import types
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

# Globals RecBole 1.2.1's and this plugin's files need beyond torch's own weights_only set.
SAFE_GLOBALS: tuple[str, ...] = (
    # Best-model checkpoints of RecBole's trainer (run_recbole, load_data_and_model, --model=SASRec ...):
    # the run's Config is pickled under "config".
    "recbole.config.configurator.Config",
    # The plugin's best-model checkpoints (AlignSASRec, AlignLLMRec, AlignGenRec, and RecBole models
    # run through the plugin) and the AlignSASRec backbone an LLM model loads: the plugin's Config.
    "recbole_llmalign.config.Config",
    # Values of every pickled Config: MODEL_TYPE, MODEL_INPUT_TYPE and eval_type.
    "recbole.utils.enum_type.ModelType",
    "recbole.utils.enum_type.InputType",
    "recbole.utils.enum_type.EvaluatorType",
    # Config.yaml_loader of every pickled Config: the class (not an instance) RecBole parses YAML with.
    "yaml.loader.FullLoader",
    # numpy float64 scalars in every best-model checkpoint (best_valid_score, metric values) and in
    # latest-state files; spelled numpy.core under numpy 1.x and numpy._core under numpy 2.
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    # numpy arrays: numpy's RNG state (np.random.get_state(), a uint32 array) in latest-state files.
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
)

# numpy dtypes whose state a file sets (they are never named in a file: torch's BUILD check needs
# their classes): float64 of the scalars above, uint32 of the RNG state in latest-state files.
SAFE_NUMPY_DTYPES: tuple[str, ...] = ("float64", "uint32")

# Where a Config's model_class may come from: RecBole's model families and this plugin's models.
MODEL_CLASS_NAME = re.compile(r"^(recbole\.model\.\w+\.\w+|recbole_llmalign\.model\.\w+)\.[A-Za-z_]\w*$")

TRUST_HINT = (
    "If you trust the file (you or someone you trust wrote it), load it with `trust_checkpoint: True` "
    "(config key), `--trust_checkpoint` (recommend, precompute) or load_checkpoint(path, trust=True)."
)

logger = logging.getLogger(__name__)
# The real loader: compat swaps ``torch.load`` for the safe one while RecBole's load_data_and_model runs.
_torch_load = torch.serialization.load


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A file needs globals outside the allowlist; none of them was imported or called."""

    def __init__(self, path: Any, needs: Iterable[str], reason: str = "") -> None:
        self.path, self.needs, self.reason = path, sorted(set(needs)), reason
        what = f"needs {', '.join(self.needs)}" if self.needs else f"was refused by torch's safe unpickler ({reason})"
        super().__init__(
            f"Checkpoint {_describe(path)} was not loaded: it {what}, outside the globals a RecBole or "
            f"recbole-llmalign file needs (recbole_llmalign.safe_load.SAFE_GLOBALS); unpickling it could "
            f"run code. {TRUST_HINT}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuilt from its arguments, so it crosses process boundaries (``compare`` runs each model in a child)."""
        return type(self), (self.path, self.needs, self.reason)


@dataclass(frozen=True)
class ModelClassReference:
    """Stands in for the model class a Config names while a file is unpickled; calling it is refused."""

    name: str

    @property
    def __name__(self) -> str:  # torch's pre-zip format reads a module class's name while loading
        return self.name.rpartition(".")[2]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Disallowed([f"{self.name} (called)"])


def _describe(path: Any) -> str:
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else f"<{type(path).__name__}>"


def _resolve(name: str) -> Any:
    """The object a dotted name points at (only ever called on allowlisted names)."""
    module, _, attr = name.rpartition(".")
    if module.startswith("numpy.core.") or module.startswith("numpy._core."):
        # Either spelling means the numpy installed here (numpy 2 warns on numpy.core).
        inner = module.split(".", 2)[2]
        try:
            return getattr(importlib.import_module(f"numpy._core.{inner}"), attr)
        except ImportError:
            return getattr(importlib.import_module(f"numpy.core.{inner}"), attr)
    return getattr(importlib.import_module(module), attr)


def allowlist() -> dict[str, Any]:
    """``SAFE_GLOBALS`` resolved: dotted name (as written in a file) -> object."""
    return {name: _resolve(name) for name in SAFE_GLOBALS}


def _buildable_types(allowed: dict[str, Any]) -> set[type]:
    """Types whose state a file may set, as torch's safe unpickler decides (plus ours)."""
    numpy_dtypes = {type(np.dtype(name)) for name in SAFE_NUMPY_DTYPES}
    ours = {value for value in allowed.values() if isinstance(value, type)}
    return {torch.Tensor, torch.nn.Parameter, collections.OrderedDict} | numpy_dtypes | ours


def _torch_entries(allowed: dict[str, Any], references: Iterable[str] = ()) -> list[Any]:
    entries: list[Any] = [(value, name) for name, value in allowed.items()]
    entries += [type(np.dtype(name)) for name in SAFE_NUMPY_DTYPES]
    entries += [(ModelClassReference(name), name) for name in references]
    return entries


def _rewind(f: Any, position: int | None) -> None:
    if position is not None:
        f.seek(position)


def _static_unlisted_globals(f: Any, allowed: dict[str, Any]) -> list[str] | None:
    """Globals a file names outside the allowlist, read by torch without unpickling anything.

    None when torch cannot scan the file: pickle protocol > 2 (RecBole's best-model checkpoints),
    torch's pre-zip format, or a truncated file (whose load then says so).
    """
    position = f.tell() if hasattr(f, "seek") else None
    try:
        with torch.serialization.safe_globals(_torch_entries(allowed)):
            return torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception:
        return None
    finally:
        _rewind(f, position)


class _Disallowed(Exception):
    """Raised inside an unpickler when a file does what the allowlist does not admit."""

    def __init__(self, needs: list[str]) -> None:
        super().__init__(", ".join(needs))
        self.needs = needs


class _Refused:
    """Takes a refused global's place so unpickling can go on to name every other one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _AllowlistUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its BUILD can be checked
    """Python's unpickler admitting the allowlist only, for pickle protocols torch's cannot read.

    Each load makes a subclass holding the allowlist and a list of the globals it refused.
    """

    allowed: dict[str, Any] = {}
    buildable: set[type] = set()
    refused: list[str] = []
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self.allowed:
            return self.allowed[full]
        if MODEL_CLASS_NAME.match(full):
            return ModelClassReference(full)
        self.refused.append(full)
        return type(name, (_Refused,), {})

    def load_build(self) -> None:
        target = type(self.stack[-2])  # BUILD sets the state (top of the stack) of the object below it
        if target not in self.buildable and not issubclass(target, _Refused):
            raise _Disallowed([f"{target.__module__}.{target.__qualname__} (its state set)"])
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def load(self) -> Any:
        try:
            result = super().load()
        except Exception as error:
            if self.refused:
                raise _Disallowed(list(self.refused)) from error
            raise
        if self.refused:
            raise _Disallowed(list(self.refused))
        return result


def _restricted_pickle_module(allowed: dict[str, Any]) -> types.ModuleType:
    """A module torch.load accepts as ``pickle_module`` whose Unpickler admits the allowlist only."""
    unpickler = type("AllowlistUnpickler", (_AllowlistUnpickler,), {
        "allowed": {**torch._weights_only_unpickler._get_allowed_globals(), **allowed},  # torch's own set, then ours
        "buildable": _buildable_types(allowed), "refused": [],
    })
    module = types.ModuleType("recbole_llmalign_allowlist_pickle")
    module.Unpickler = unpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    return module


def _refusal_from_torch(f: Any, error: pickle.UnpicklingError) -> UnsafeCheckpointError:
    """torch's "Weights only load failed" error as ours, naming the global or type it met."""
    message = str(error)
    named = re.search(r"GLOBAL ([\w.]+) was not an allowed global", message)
    if named:
        return UnsafeCheckpointError(f, [named.group(1)])
    built = re.search(r"but got <class '([\w.]+)'>", message)
    if built:
        name = built.group(1) if "." in built.group(1) else f"builtins.{built.group(1)}"
        return UnsafeCheckpointError(f, [f"{name} (its state set)"])
    detail = message.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    return UnsafeCheckpointError(f, [], detail[0][:200] if detail else "no detail")


def _restore_model_class(config: Any) -> None:
    """Put the real class back where a loaded Config holds a :class:`ModelClassReference`."""
    reference = getattr(config, "model_class", None)
    if not isinstance(reference, ModelClassReference):
        return
    from recbole.model.abstract_recommender import AbstractRecommender

    try:
        cls = _resolve(reference.name)
    except Exception as error:  # a model this install lacks; nothing reads model_class after loading
        logger.debug(f"model_class {reference.name} left as a name: {error}")
        return
    if isinstance(cls, type) and issubclass(cls, AbstractRecommender):
        config.model_class = cls


def _finish(result: Any, trust: bool) -> Any:
    """Restore model classes, and set a loaded Config's ``trust_checkpoint`` to the trust it was loaded
    with: the file's own value is never honoured, or a shared checkpoint could make the model it
    builds load its backbone with full unpickling."""
    config = result.get("config") if isinstance(result, dict) else None
    if config is not None and hasattr(config, "final_config_dict"):
        _restore_model_class(config)
        config["trust_checkpoint"] = trust
    elif isinstance(config, dict):
        config["trust_checkpoint"] = trust
    return result


def load(f: Any, *args: Any, trust: bool = False, **kwargs: Any) -> Any:
    """``torch.load`` admitting only the allowlist; ``trust=True`` unpickles everything.

    ``weights_only`` and ``pickle_module`` are decided here, not by the caller.
    """
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)
    if trust:
        logger.info(f"loading {_describe(f)} with full unpickling (trusted file)")
        return _finish(_torch_load(f, *args, weights_only=False, **kwargs), trust=True)
    allowed = allowlist()
    try:
        unlisted = _static_unlisted_globals(f, allowed)
        if unlisted is None:  # torch's safe unpickler cannot read it: Python's, restricted alike
            module = _restricted_pickle_module(allowed)
            return _finish(_torch_load(f, *args, weights_only=False, pickle_module=module, **kwargs), trust=False)
        references = [name for name in unlisted if MODEL_CLASS_NAME.match(name)]
        refused = [name for name in unlisted if name not in references]
        if refused:
            raise UnsafeCheckpointError(f, refused)
        try:
            with torch.serialization.safe_globals(_torch_entries(allowed, references)):
                result = _torch_load(f, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as error:
            if "Weights only load failed" in str(error):
                raise _refusal_from_torch(f, error) from error
            raise
    except _Disallowed as disallowed:
        raise UnsafeCheckpointError(f, disallowed.needs) from None
    return _finish(result, trust=False)
