"""RecBole Config that also reads this plugin's ``properties/`` and finds its models.

Precedence, lowest first: RecBole's internal defaults, this plugin's ``properties/overall.yaml``,
the model's property files, ``properties/dataset/<dataset>.yaml``, then the user's config files,
config dict and command line (exactly RecBole's order for the external sources).

A model's property files follow its class hierarchy, base first (as RecBole-GNN's
``quick_start_config/*_base.yaml``): ``properties/base/<Class>.yaml`` for a shared base class
(``FrozenBackboneLLMRecommender``: the keys every LLM model shares), then
``properties/model/<Class>.yaml`` for each model class down to the one asked for (AlignLLMRecCTR
reads AlignLLMRec.yaml, then its own). Each key thus has one default, in one file.

A device profile (``device_profile: gpu``) adds one layer after the model's files and before the
dataset's: ``properties/profile/<profile>/<Class>.yaml`` for the same classes (batch sizes, LLM
depth and epochs for that hardware). Anything the user sets still wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import recbole
from recbole.config import Config as RecBoleConfig

from recbole_llmalign.utils import get_model

PROPERTIES_DIR = Path(__file__).resolve().parent / "properties"
RECBOLE_DIR = Path(recbole.__file__).resolve().parent

# RecBole keys whose default's type is not the only one RecBole accepts.
RECBOLE_KEYS_OF_SEVERAL_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "metrics": ((list, tuple, str), "a list or a string"),  # RecBole wraps one name in a list
    "topk": ((list, tuple, int), "a list or an integer"),
    "additional_feat_suffix": ((list, tuple, str), "a list or a string"),
    "gpu_id": ((str, int), "a string or an integer"),  # --gpu_id=0 arrives as an int
    "reranker_CAN_NUM": ((int, str), "an integer or a string like '500,100,20'"),  # CPR models
    "use_proj_bias": ((int, bool), "true, false, 0 or 1"),  # CPR models: default 1, documented bool
    "xgb_verbose_eval": ((int, bool), "true, false or an integer"),
    # documented as floats, written as 0 or 1 in RecBole's YAML
    "global_ratio": ((int, float), "a number"),  # FEARec
    "spatial_ratio": ((int, float), "a number"),  # FEARec
    "resolution": ((int, float), "a number"),  # NNCF
    "dropout_prob": ((int, float), "a number"),  # GRU4RecCPR
    "hidden_dropout_prob": ((int, float), "a number"),  # SASRecCPR
}


class ConfigError(ValueError):
    """A config RecBole or the plugin refuses; the message names the key and what to change."""


def expected_type(default: Any, value: Any) -> str | None:
    """What ``value`` must be, judged by the type of its ``default``; None when it fits."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if is_number and isinstance(value, int) else "an integer"
    if isinstance(default, float):
        return None if is_number else "a number"
    if isinstance(default, str):
        return None if isinstance(value, (str, os.PathLike)) else "a string"
    if isinstance(default, (list, tuple)):
        return None if isinstance(value, (list, tuple)) else "a list"
    if isinstance(default, dict):
        return None if isinstance(value, dict) else "a mapping"
    return None


def key_type_error(key: str, expected: str, default: Any, file_name: str, value: Any) -> ConfigError:
    """One message for every key-type error, plugin or RecBole key alike."""
    return ConfigError(
        f"Config key '{key}' must be {expected} (default {default!r}, documented in "
        f"{file_name}), got {value!r} ({type(value).__name__}). "
        "Fix it in your config file, config dict or command line."
    )


def model_property_files(model_class: type) -> list[Path]:
    """The plugin's YAML files for ``model_class`` and its plugin base classes, base first."""
    files = []
    for cls in reversed(model_class.__mro__):
        for folder in ("base", "model"):
            path = PROPERTIES_DIR / folder / f"{cls.__name__}.yaml"
            if path.is_file() and cls.__module__.startswith("recbole_llmalign."):
                files.append(path)
    return files


def device_profiles() -> list[str]:
    """Names of the shipped device profiles (folders of ``properties/profile/``)."""
    return sorted(p.name for p in (PROPERTIES_DIR / "profile").iterdir() if p.is_dir())


def profile_property_files(profile: str, model_class: type) -> list[Path]:
    """The profile's YAML files for ``model_class`` and its plugin base classes, base first
    (a model the profile has no file for keeps its own defaults)."""
    if profile not in device_profiles():
        raise ConfigError(f"device_profile '{profile}' is not a shipped profile; choose one of {device_profiles()} "
                          f"(recbole_llmalign/properties/profile/) or ~ for none.")
    files = []
    for cls in reversed(model_class.__mro__):
        path = PROPERTIES_DIR / "profile" / profile / f"{cls.__name__}.yaml"
        if path.is_file() and cls.__module__.startswith("recbole_llmalign."):
            files.append(path)
    return files


class Config(RecBoleConfig):
    """RecBole's Config plus the plugin's YAML property files and model registry.

    Errors RecBole's own config checks raise (``NotImplementedError`` for an unknown metric,
    ``TypeError`` for a bad ``topk``, ...) come out as :class:`ConfigError`, a ``ValueError``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(*args, **kwargs)
        except (KeyError, NotImplementedError, RuntimeError, TypeError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
            raise ConfigError(message) from error

    def _get_model_and_dataset(self, model: Any, dataset: str | None):
        if isinstance(model, str) or model is None:
            model_name = model if model is not None else self.external_config_dict.get("model")
            if model_name is None:
                raise ConfigError(
                    "No model given: pass --model=<Name> on the command line, `model` in a config "
                    "file or dict, or the model argument."
                )
            model = get_model(model_name)
        return super()._get_model_and_dataset(model, dataset)

    def _update_internal_config_dict(self, file: str) -> dict | None:
        loaded = super()._update_internal_config_dict(file)
        path = Path(file).resolve()
        if loaded and path.is_relative_to(RECBOLE_DIR):  # RecBole's own defaults, for the key-type check
            where = str(path.relative_to(RECBOLE_DIR.parent))
            self.recbole_defaults.update({key: (value, where) for key, value in loaded.items()})
        return loaded

    def _load_internal_config_dict(self, model: str, model_class: type, dataset: str) -> None:
        self.recbole_defaults: dict[str, tuple[Any, str]] = {}
        super()._load_internal_config_dict(model, model_class, dataset)
        profile = self.external_config_dict.get("device_profile")
        profile_files = profile_property_files(str(profile), model_class) if profile else []
        plugin_files = [PROPERTIES_DIR / "overall.yaml", *model_property_files(model_class), *profile_files,
                        PROPERTIES_DIR / "dataset" / f"{dataset}.yaml"]
        self.plugin_defaults: dict[str, tuple[Any, str]] = {}
        for file in plugin_files:
            if file.is_file():
                loaded = self._update_internal_config_dict(str(file)) or {}
                if file.parent.name != "dataset" and file not in profile_files:  # overall, base and model files: typed plugin defaults
                    where = str(file.relative_to(PROPERTIES_DIR.parents[1]))
                    self.plugin_defaults.update({key: (value, where) for key, value in loaded.items()})
                if file.parent.name == "dataset":
                    self.parameters["Dataset"] += [
                        key for key in loaded if key not in self.parameters["Dataset"]
                    ]

    def _init_device(self) -> None:
        """RecBole's device set-up, plus multi-process runs on CPUs (gloo backend).

        RecBole 1.2.1 always starts NCCL on ``cuda:<local_rank>`` when ``local_rank`` is set; on a
        machine without GPUs (or with ``gpu_id: ''``) the ranks use gloo on the CPU instead.
        """
        import torch

        gpu_id = str(self.final_config_dict.get("gpu_id", ""))
        on_cpu = not torch.cuda.is_available() or gpu_id in ("", "cpu")
        if "local_rank" not in self.final_config_dict or not on_cpu:
            return super()._init_device()
        config = self.final_config_dict
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                backend="gloo", rank=config["local_rank"] + config["offset"], world_size=config["world_size"],
                init_method=f"tcp://{config['ip']}:{config['port']}",
            )
        config["device"] = torch.device("cpu")
        config["single_spec"] = False
        if config["local_rank"] != 0:
            config["state"] = "error"
            config["show_progress"] = False
            config["verbose"] = False

    def _set_default_parameters(self) -> None:
        self._check_recbole_key_types()  # before RecBole reads them (--epochs=abc fails in its trainer)
        # RecBole 1.2.1 refuses its own default negative sampling for CE-loss models (SASRec,
        # GRU4Rec, ...) unless the user passes train_neg_sample_args=None; CE needs no negatives,
        # so drop them here unless the user set them explicitly (then RecBole's check applies).
        if (
            self.final_config_dict.get("loss_type") == "CE"
            and "train_neg_sample_args" not in self.external_config_dict
        ):
            self.final_config_dict["train_neg_sample_args"] = None
        super()._set_default_parameters()
        # RecBole points data_path at its shipped copy whenever the dataset is named ml-100k,
        # even when the user set data_path; honour an explicit user choice.
        user_data_path = self.external_config_dict.get("data_path")
        if self.dataset == "ml-100k" and user_data_path:
            self.final_config_dict["data_path"] = os.path.join(user_data_path, self.dataset)
        self._check_plugin_key_types()

    def _check_plugin_key_types(self) -> None:
        """A plugin key set to the wrong type (``--llm_layers=eight``) fails here, naming the key and its YAML."""
        for key, (default, file_name) in self.plugin_defaults.items():
            value = self.final_config_dict.get(key)
            if default is None or value is None or isinstance(default, dict):
                continue
            expected = expected_type(default, value)
            if expected is not None:
                raise key_type_error(key, expected, default, file_name, value)

    def _check_recbole_key_types(self) -> None:
        """A RecBole key the user set to the wrong type (``--epochs=abc``) fails here, with the same
        message as a plugin key, instead of deep inside RecBole's trainer."""
        for key, value in self.external_config_dict.items():
            if key not in self.recbole_defaults or key in self.plugin_defaults or value is None:
                continue
            default, file_name = self.recbole_defaults[key]
            if default is None:
                continue
            if key in RECBOLE_KEYS_OF_SEVERAL_TYPES:
                types, described = RECBOLE_KEYS_OF_SEVERAL_TYPES[key]
                expected = None if isinstance(value, types) else described
            else:
                expected = expected_type(default, value)
            if expected is not None:
                raise key_type_error(key, expected, default, file_name, value)


# Keys a checkpoint written before them was trained without: the value that matches how it trained.
UPGRADED_AS_TRAINED: dict[str, dict[str, Any]] = {
    "AlignSASRec": {"unseen_items": "negatives"},  # before the key every unseen item was a CE negative
}


def upgrade_config(config: Any) -> Any:
    """Bring the Config pickled in an older checkpoint up to this version, in place, and return it.

    - ``AlignLLMRec`` with ``task: labeled`` became its own model, ``AlignLLMRecCTR``.
    - Keys added to the plugin's YAML files since the checkpoint was written get their defaults
      (values the checkpoint holds are never changed), except a key whose default changed the
      training rule: it gets the rule the checkpoint was trained by (``UPGRADED_AS_TRAINED``).
    """
    import yaml

    values = config.final_config_dict
    if values.get("model") == "AlignLLMRec" and values.get("task") == "labeled":
        values["model"] = "AlignLLMRecCTR"
        config.model = "AlignLLMRecCTR"
        del values["task"]
    for key, as_trained in UPGRADED_AS_TRAINED.get(values["model"], {}).items():
        values.setdefault(key, as_trained)
    files = [PROPERTIES_DIR / "overall.yaml", *model_property_files(get_model(values["model"]))]
    for file in files:
        for key, value in (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).items():
            values.setdefault(key, value)
    return config
