"""RecBole Config that also reads this plugin's ``properties/`` and finds its models.

Precedence, lowest first: RecBole's internal defaults, this plugin's ``properties/overall.yaml``,
``properties/model/<Model>.yaml``, ``properties/dataset/<dataset>.yaml``, then the user's config
files, config dict and command line (exactly RecBole's order for the external sources).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from recbole.config import Config as RecBoleConfig

from recbole_llmalign.utils import get_model

PROPERTIES_DIR = Path(__file__).resolve().parent / "properties"


class Config(RecBoleConfig):
    """RecBole's Config plus the plugin's YAML property files and model registry."""

    def _get_model_and_dataset(self, model: Any, dataset: str | None):
        if isinstance(model, str) or model is None:
            model_name = model if model is not None else self.external_config_dict.get("model")
            if model_name is None:
                raise KeyError(
                    "No model given: pass --model=<Name> on the command line, `model` in a config "
                    "file or dict, or the model argument."
                )
            model = get_model(model_name)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model: str, model_class: type, dataset: str) -> None:
        super()._load_internal_config_dict(model, model_class, dataset)
        plugin_files = [
            PROPERTIES_DIR / "overall.yaml",
            PROPERTIES_DIR / "model" / f"{model}.yaml",
            PROPERTIES_DIR / "dataset" / f"{dataset}.yaml",
        ]
        self.plugin_defaults: dict[str, tuple[Any, str]] = {}
        for file in plugin_files:
            if file.is_file():
                loaded = self._update_internal_config_dict(str(file)) or {}
                if file.parent.name != "dataset":
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
            if default is None or value is None:
                continue
            if isinstance(default, bool):
                ok, expected = isinstance(value, bool), "true or false"
            elif isinstance(default, int):
                ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
            elif isinstance(default, float):
                ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            elif isinstance(default, str):
                ok, expected = isinstance(value, str), "a string"
            elif isinstance(default, (list, tuple)):
                ok, expected = isinstance(value, (list, tuple)), "a list"
            else:
                continue
            if not ok:
                raise ValueError(
                    f"Config key '{key}' must be {expected} (default {default!r}, documented in "
                    f"{file_name}), got {value!r} ({type(value).__name__}). "
                    "Fix it in your config file, config dict or command line."
                )
