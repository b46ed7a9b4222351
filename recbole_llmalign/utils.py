"""Model and trainer lookup: the plugin's classes first, RecBole's after.

RecBole's own ``get_model`` imports ``exlib_recommender`` (and with it lightgbm and xgboost) for
any name it does not know, so a typo ends in ``ModuleNotFoundError: lightgbm``. Here names are
resolved from the module files on disk (every name RecBole's ``get_model`` resolves, and no
other), and an unknown name raises a ``ValueError`` that lists the plugin's models and
RecBole's, with the closest matches first. A RecBole model whose optional package is missing
(KGAT: dgl; KGIN, MCCLK: torch-scatter; NCL: faiss; XGBoost, LightGBM: xgboost and lightgbm)
raises an ``ImportError`` that says what to install, before any data is loaded.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import pkgutil
from functools import lru_cache
from pathlib import Path

from recbole.utils import ModelType
from recbole.utils import get_trainer as recbole_get_trainer

PLUGIN_MODEL_PACKAGE = "recbole_llmalign.model"
RECBOLE_MODEL_SUBPACKAGES = (
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
    "exlib_recommender",
)
# exlib_recommender's __init__ imports both, so each of its models needs both installed.
EXLIB_REQUIREMENTS = ("lightgbm", "xgboost")
# Packages RecBole does not install but a model imports when it is built or in its first epoch.
MODEL_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "KGAT": ("dgl",),  # dataset.ckg_graph(form="dgl") in KGAT.__init__
    "KGIN": ("torch_scatter",),  # scatter_mean in its aggregator's __init__
    "MCCLK": ("torch_scatter",),  # scatter_softmax, scatter_mean likewise
    "NCL": ("faiss",),  # faiss.Kmeans(..., gpu=True) in the E-step NCLTrainer runs from epoch 0
}
# pip names that differ from the import names above.
PIP_NAMES = {"torch_scatter": "torch-scatter", "faiss": "faiss-gpu"}


def _module_names(package: str) -> list[str]:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [info.name for info in pkgutil.iter_modules(spec.submodule_search_locations)]


@lru_cache(maxsize=1)
def plugin_models() -> dict[str, str]:
    """Map of plugin model class name -> module path, read from file names and our YAML files."""
    properties = Path(__file__).resolve().parent / "properties" / "model"
    modules = {name.replace("_", ""): name for name in _module_names(PLUGIN_MODEL_PACKAGE)}
    found = {}
    for yaml_file in sorted(properties.glob("*.yaml")):
        module = modules.get(yaml_file.stem.lower())
        if module is not None:
            found[yaml_file.stem] = f"{PLUGIN_MODEL_PACKAGE}.{module}"
    return found


@lru_cache(maxsize=1)
def recbole_models() -> dict[str, str]:
    """Map of RecBole model class name -> module path, without importing any model module.

    RecBole's ``get_model(name)`` imports ``recbole.model.<subpackage>.<name.lower()>`` and takes
    the attribute ``name`` from it, so a model is a class defined in a module named after its
    lower-cased name (``sasrec.py``: ``SASRec``; ``xgboost.py``: ``XGBoost``). Reading the class
    names from the source finds those without importing optional packages (xgboost, dgl); the
    property files are no guide (``Random`` has none, ``xgboost.yaml`` is lower-case).
    """
    found = {}
    for subpackage in RECBOLE_MODEL_SUBPACKAGES:
        spec = importlib.util.find_spec(f"recbole.model.{subpackage}")
        if spec is None or spec.submodule_search_locations is None:
            continue
        folder = Path(list(spec.submodule_search_locations)[0])
        for module in _module_names(f"recbole.model.{subpackage}"):
            source = folder / f"{module}.py"
            if not source.is_file():
                continue
            for node in ast.parse(source.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.ClassDef) and node.name.lower() == module:
                    found[node.name] = f"recbole.model.{subpackage}.{module}"
    return found


def missing_requirements(model_name: str) -> list[str]:
    """The optional packages RecBole's ``model_name`` needs that are not installed (pip names)."""
    needed = list(MODEL_REQUIREMENTS.get(model_name, ()))
    if ".exlib_recommender." in recbole_models().get(model_name, ""):
        needed += EXLIB_REQUIREMENTS
    return [PIP_NAMES.get(module, module) for module in needed if importlib.util.find_spec(module) is None]


def get_model(model_name: str) -> type:
    """Return the model class called ``model_name``: the plugin's first, then RecBole's."""
    if model_name in plugin_models():
        return getattr(importlib.import_module(plugin_models()[model_name]), model_name)
    if model_name in recbole_models():
        missing = missing_requirements(model_name)
        if missing:
            raise ImportError(
                f"RecBole's {model_name} needs {' and '.join(missing)}, not installed: "
                f"run `pip install {' '.join(missing)}`."
            )
        return getattr(importlib.import_module(recbole_models()[model_name]), model_name)
    raise ValueError(_unknown_model_message(model_name))


def _unknown_model_message(model_name: str) -> str:
    ours, theirs = sorted(plugin_models()), sorted(recbole_models())
    by_lower = {name.lower(): name for name in ours + theirs}
    close = difflib.get_close_matches(model_name.lower(), list(by_lower), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(by_lower[c] for c in close)}?" if close else ""
    return (
        f"Unknown model '{model_name}'.{hint} Model names are case-sensitive. "
        f"recbole_llmalign models: {', '.join(ours) or '(none)'}. "
        f"RecBole models: {', '.join(theirs)}."
    )


def get_trainer(model_type: ModelType, model_name: str) -> type:
    """Return ``<Class>Trainer`` from ``recbole_llmalign.trainer`` for the plugin model or its nearest
    base class that has one (AlignLLMRecCTR trains with AlignLLMRecTrainer), else RecBole's."""
    plugin_trainers = importlib.import_module("recbole_llmalign.trainer")
    if model_name in plugin_models():
        for cls in get_model(model_name).__mro__:
            trainer = getattr(plugin_trainers, f"{cls.__name__}Trainer", None)
            if trainer is not None:
                return trainer
    return recbole_get_trainer(model_type, model_name)
