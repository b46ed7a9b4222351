"""Model and trainer lookup: the plugin's classes first, RecBole's after.

RecBole's own ``get_model`` imports ``exlib_recommender`` (and with it lightgbm and xgboost) for
any name it does not know, so a typo ends in ``ModuleNotFoundError: lightgbm``. Here names are
resolved from the module files on disk, and an unknown name raises a ``ValueError`` that lists
the plugin's models and RecBole's, with the closest matches first.
"""

from __future__ import annotations

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
# exlib_recommender's __init__ imports both; its models are only offered when they are installed.
EXLIB_REQUIREMENTS = ("lightgbm", "xgboost")


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

    RecBole names its property files after the class (``SASRec.yaml``) and its modules after the
    lower-cased class (``sasrec.py``); joining the two gives the class names.
    """
    recbole_root = Path(importlib.util.find_spec("recbole").origin).parent
    class_names = {p.stem.lower(): p.stem for p in (recbole_root / "properties" / "model").glob("*.yaml")}
    found = {}
    for subpackage in RECBOLE_MODEL_SUBPACKAGES:
        for module in _module_names(f"recbole.model.{subpackage}"):
            if module in class_names:
                found[class_names[module]] = f"recbole.model.{subpackage}.{module}"
    return found


def get_model(model_name: str) -> type:
    """Return the model class called ``model_name``: the plugin's first, then RecBole's."""
    for registry in (plugin_models(), recbole_models()):
        if model_name in registry:
            module_path = registry[model_name]
            if ".exlib_recommender." in module_path:
                missing = [m for m in EXLIB_REQUIREMENTS if importlib.util.find_spec(m) is None]
                if missing:
                    raise ImportError(
                        f"RecBole's {model_name} needs {', '.join(missing)}: "
                        f"run `pip install {' '.join(missing)}`."
                    )
            return getattr(importlib.import_module(module_path), model_name)
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
    """Return ``<model_name>Trainer`` from ``recbole_llmalign.trainer`` if defined, else RecBole's."""
    plugin_trainers = importlib.import_module("recbole_llmalign.trainer")
    trainer = getattr(plugin_trainers, f"{model_name}Trainer", None)
    if trainer is not None:
        return trainer
    return recbole_get_trainer(model_type, model_name)
