"""Every RecBole 1.2.1 model trains one epoch through ``run_recbole_llmalign``.

The README says every RecBole built-in runs through the plugin's entry point; this file holds it
to that. The plugin's own list (``utils.recbole_models()``) drives the test, so a model RecBole
adds, or one the registry fails to find, shows up here. Per-model settings follow RecBole's own
``tests/model/test_model_auto.py`` (context-aware models get a rating threshold, knowledge models
a .kg/.link pair, CE-loss models no negative sampling); sizes are cut so each run takes seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from recbole_llmalign.utils import get_model, missing_requirements, recbole_models
from tests.conftest import ENTITY_DIM

# Models that cannot train through the plugin, and why; the README lists the same ones. Each is
# checked to still fail that way, so a fix shows up here as a failure that asks to update the list.
# RecBole's CPR models `assert False` in predict() (no sampled scoring); RecBole's FLOPs counter
# calls predict() before training, and the plugin skips the count when it fails, so they train
# and evaluate with full ranking. No RecBole model refuses by design through the plugin.
REFUSED_BY_RECBOLE: dict[str, tuple[type[BaseException], str]] = {}
# Models that need a package RecBole does not install (utils.MODEL_REQUIREMENTS); they must train
# where it is installed and otherwise stop before loading data with an "install X" error.
NEEDS_OPTIONAL_PACKAGE = {"KGAT": "dgl", "KGIN": "torch-scatter", "MCCLK": "torch-scatter", "NCL": "faiss-gpu",
                          "XGBoost": "xgboost", "LightGBM": "lightgbm"}

# What RecBole's own test_model_auto.py (or the model's data) needs beyond the shared settings.
PER_MODEL: dict[str, dict] = {
    "NCL": {"num_clusters": 4},  # k-means needs fewer prototypes than the fixture's 40 users
    "SASRecCPR": {"reranker_CAN_NUM": "20", "train_neg_sample_args": None},  # candidates < 30 items
    "GRU4RecCPR": {"reranker_CAN_NUM": "20", "train_neg_sample_args": None},
    "MultiDAE": {"train_neg_sample_args": None},
    "MultiVAE": {"train_neg_sample_args": None},
    "MacridVAE": {"train_neg_sample_args": None},
    "RecVAE": {"train_neg_sample_args": None},
    "CDAE": {"train_neg_sample_args": None},
    "ENMF": {"train_neg_sample_args": None},
    "SRGNN": {"MAX_ITEM_LIST_LENGTH": 3},
    "GCSAN": {"MAX_ITEM_LIST_LENGTH": 3},
    "Caser": {"reproducibility": False},
    "NextItNet": {"reproducibility": False},
    "SHAN": {"transform": "inverse_itemseq"},
    "BERT4Rec": {"transform": "mask_itemseq"},
    "KTUP": {"train_rec_step": 1, "train_kg_step": 1},
    "S3Rec": {"pretrain_epochs": 1, "save_step": 1},
    "XGBoost": {"xgb_params": {"booster": "gbtree", "objective": "binary:logistic", "eval_metric": ["auc", "logloss"]},
                "xgb_num_boost_round": 1},
    "LightGBM": {"lgb_params": {"boosting": "gbdt", "objective": "binary", "metric": ["auc", "binary_logloss"]},
                 "lgb_num_boost_round": 1},
}
# GRU4RecKG and KSR read pretrained entity (and relation) vectors from .ent/.rel files, and
# RecBole gives them no sequential split of their own (its sequential.yaml is skipped for them).
SEQUENTIAL_SPLIT = {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"}
PRELOADED_KG = {
    "GRU4RecKG": {"additional_feat_suffix": ["ent"], "preload_weight": {"ent_id": "ent_emb"},
                  "alias_of_entity_id": ["ent_id"], "embedding_size": ENTITY_DIM, "eval_args": SEQUENTIAL_SPLIT},
    "KSR": {"additional_feat_suffix": ["ent", "rel"], "preload_weight": {"ent_id": "ent_emb", "rel_id": "rel_emb"},
            "alias_of_entity_id": ["ent_id"], "alias_of_relation_id": ["rel_id"], "kg_embedding_size": ENTITY_DIM,
            "eval_args": SEQUENTIAL_SPLIT},
}
CONTEXT_TYPES = {"CONTEXT", "DECISIONTREE"}


def model_config(model: str, data_path: str) -> dict:
    """The shared tiny settings, RecBole's per-family data needs, then the model's own."""
    model_type = get_model(model).type.name
    config: dict = {
        "data_path": data_path, "epochs": 1, "state": "ERROR", "show_progress": False, "seed": 2020,
        "train_batch_size": 256, "eval_batch_size": 4096, "MAX_ITEM_LIST_LENGTH": 10,
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"], "item": ["item_id", "class", "release_year", "price"],
                     "user": ["user_id", "age", "gender"], "kg": ["head_id", "relation_id", "tail_id"],
                     "link": ["item_id", "entity_id"]},
    }
    if model_type in CONTEXT_TYPES:  # a labeled split, as RecBole's own tests give them
        config["threshold"] = {"rating": 4}
        config["numerical_features"] = ["price"]  # RecBole 1.2.1 embeds only the float fields listed here
    if model in PRELOADED_KG:
        config["load_col"] = dict(config["load_col"], ent=["ent_id", "ent_emb"], rel=["rel_id", "rel_emb"])
        config.update(PRELOADED_KG[model])
    config.update(PER_MODEL.get(model, {}))
    return config


def test_registry_has_recbole_class_names():
    """RecBole's get_model resolves class names (Random, XGBoost); module names (xgboost) it does not."""
    models = recbole_models()
    assert {"Random", "XGBoost", "LightGBM", "LightGCN", "SASRec", "KGAT"} <= set(models)
    assert not {"xgboost", "lightgbm", "random"} & set(models)
    for name, module_path in models.items():
        assert module_path.rsplit(".", 1)[1] == name.lower()


def test_every_name_resolves_to_the_class_recbole_resolves():
    """The registry returns what RecBole's own get_model returns under each name."""
    from recbole.utils import get_model as recbole_get_model

    checked = 0
    for name, module_path in recbole_models().items():
        if missing_requirements(name) or ".exlib_recommender." in module_path:
            continue  # RecBole's lookup of exlib names imports xgboost and lightgbm
        assert get_model(name) is recbole_get_model(name), name
        checked += 1
    assert checked >= 80


@pytest.mark.parametrize("model", sorted(NEEDS_OPTIONAL_PACKAGE))
def test_missing_optional_package_says_what_to_install(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without its optional package a model stops at lookup with the pip command, not mid-run."""
    import importlib.util

    from recbole_llmalign import utils

    hidden = set(utils.MODEL_REQUIREMENTS.get(model, ())) | set(utils.EXLIB_REQUIREMENTS)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in hidden else real_find_spec(name, *args))
    with pytest.raises(ImportError, match=f"RecBole's {model} needs .*pip install .*{NEEDS_OPTIONAL_PACKAGE[model]}"):
        get_model(model)


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(recbole_models()))
def test_recbole_model_trains_one_epoch_through_the_plugin(model: str, recbole_tiny: str) -> None:
    from recbole_llmalign.quick_start import run_recbole_llmalign

    if model in NEEDS_OPTIONAL_PACKAGE and missing_requirements(model):
        with pytest.raises(ImportError, match=f"pip install .*{NEEDS_OPTIONAL_PACKAGE[model]}"):
            run_recbole_llmalign(model=model, dataset="rbtiny", config_dict={"data_path": recbole_tiny})
        assert not list(Path(".").glob("log/**/*.log")), "the install error must come before any run starts"
        return
    config = model_config(model, recbole_tiny)
    if model in REFUSED_BY_RECBOLE:
        error, where = REFUSED_BY_RECBOLE[model]
        with pytest.raises(error) as refused:
            run_recbole_llmalign(model=model, dataset="rbtiny", config_dict=config, saved=False)
        assert refused.traceback[-1].name == where
        return
    result = run_recbole_llmalign(model=model, dataset="rbtiny", config_dict=config, saved=False)
    scores = [float(v) for v in result["test_result"].values()]
    assert scores and all(math.isfinite(v) for v in scores), result["test_result"]
