"""Cross-fitting (``cross_fit_folds``): fold backbones that each leave one fold of users out, and
AlignLLMRec training on every target with, for each sample, the backbone that never saw its user."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import recbole_llmalign  # noqa: F401
from tests.conftest import cyclic_config


def _prepared(model: str, data_path: str, name: str, **overrides):
    from recbole.data import create_dataset, data_preparation

    from recbole_llmalign.config import Config

    config = Config(model=model, dataset=name, config_dict=cyclic_config(data_path, item_text_fields=["title", "genre"],
                                                                         **overrides))
    train, valid, test = data_preparation(config, create_dataset(config))
    return config, train, valid, test


def test_user_folds_are_stable_partitions_and_bad_folds_are_refused(cyclic_dataset):
    from recbole_llmalign.data.sampling import parse_user_fold, user_folds

    data_path, name = cyclic_dataset
    _, train, _, _ = _prepared("AlignSASRec", data_path, name)
    folds = user_folds(train._dataset, 2)
    again = user_folds(_prepared("AlignSASRec", data_path, name, seed=7)[1]._dataset, 2)
    assert np.array_equal(folds, again)  # the user's token decides, not the seed or the process
    assert set(folds[1:].tolist()) == {0, 1} and 0.2 < folds[1:].mean() < 0.8  # both folds hold users
    assert parse_user_fold([1, 3]) == (1, 3) and parse_user_fold("0/2") == (0, 2) and parse_user_fold(None) is None
    for bad in ([2, 2], [0, 1], "half", 0.0):
        with pytest.raises(ValueError, match="exclude_user_fold must be"):
            parse_user_fold(bad)


@pytest.mark.parametrize("train_mode", ["all_positions", "prefix"])
def test_a_fold_backbone_never_trains_on_a_row_of_its_fold_users(cyclic_dataset, monkeypatch, train_mode):
    from recbole.trainer import Trainer

    from recbole_llmalign.data.sampling import user_folds
    from recbole_llmalign.model.align_sasrec import AlignSASRec
    from recbole_llmalign.model.unseen_items import training_items
    from recbole_llmalign.trainer import AlignSASRecTrainer

    data_path, name = cyclic_dataset
    config, train, valid, _ = _prepared("AlignSASRec", data_path, name, exclude_user_fold=[0, 2], train_mode=train_mode)
    seen = {}
    monkeypatch.setattr(Trainer, "fit", lambda self, data, *a, **k: seen.setdefault("data", data) and (0.0, {}))
    model = AlignSASRec(config, train._dataset)
    AlignSASRecTrainer(config, model).fit(train, valid, saved=False)
    dataset = seen["data"]._dataset
    folds = user_folds(train._dataset, 2)
    trained_users = dataset.inter_feat[dataset.uid_field].numpy()
    all_users = train._dataset.inter_feat[train._dataset.uid_field].numpy()
    assert len(trained_users) and not (folds[trained_users] == 0).any()  # no row of a fold-0 user, as target or window
    assert set(trained_users.tolist()) == set(all_users[folds[all_users] == 1].tolist())  # every fold-1 user trains
    # items only fold-0 users show are unseen for this backbone (their ID rows never train)
    outside = training_items(train._dataset, model.n_items, exclude_user_fold=(0, 2))
    assert torch.equal(~model.unseen_item_mask[1:], outside[1:])
    assert outside.sum() <= training_items(train._dataset, model.n_items).sum()


def test_cross_fitted_training_reads_for_each_sample_the_backbone_that_never_saw_its_user(cyclic_dataset, tiny_llama_dir,
                                                                                          monkeypatch):
    from recbole_llmalign.compat import load_checkpoint
    from recbole_llmalign.model.align_llmrec import AlignLLMRec
    from recbole_llmalign.quick_start import run_with_cost
    from recbole_llmalign.utils import get_model

    data_path, name = cyclic_dataset
    llm = dict(llm_path=str(tiny_llama_dir), llm_layers=1, train_batch_size=64, backbone_epochs=2, denoise_samples=False,
               epochs=1, train_sample_budget=1.0)
    scored: list[tuple[int, torch.Tensor]] = []
    original = AlignLLMRec._loss

    def recording(self, interaction):
        scored.append((self.active_fold, interaction[self.USER_ID].clone()))
        return original(self, interaction)

    monkeypatch.setattr(AlignLLMRec, "_loss", recording)
    result, cost = run_with_cost("AlignLLMRec", name, config_dict=cyclic_config(
        data_path, item_text_fields=["title", "genre"], cross_fit_folds=2, **llm))
    files = sorted(Path("saved/backbones").glob("AlignSASRec-cyclic-*.pth"))
    fold_files = [p for p in files if "-fold" in p.name]
    (full_file,) = [p for p in files if "-fold" not in p.name]
    assert [p.name.split("-")[2] for p in fold_files] == ["fold0of2", "fold1of2"]
    for index, path in enumerate(fold_files):
        saved = load_checkpoint(path, map_location="cpu")["config"]
        assert list(saved["exclude_user_fold"]) == [index, 2] and saved["holdout_last_targets"] == 0
    assert load_checkpoint(full_file, map_location="cpu")["config"]["holdout_last_targets"] == 0  # scores valid/test
    config, train, _, test = _prepared("AlignLLMRec", data_path, name, cross_fit_folds=2, **llm)
    assert cost.extra["train_samples"] == len(train._dataset)  # every training target is an honest sample
    from recbole_llmalign.data.sampling import user_folds

    folds = torch.from_numpy(user_folds(train._dataset, 2))
    assert scored and {fold for fold, _ in scored} == {0, 1}
    for fold, users in scored:  # each sample scored by the fold backbone trained without its user
        assert (folds[users] == fold).all()
    assert sum(len(users) for _, users in scored) == len(train._dataset)

    model = get_model("AlignLLMRec")(_prepared("AlignLLMRec", data_path, name, backbone_checkpoint=str(full_file),
                                               cross_fit_folds=2, **llm,  # a comma string, as the command line gives it
                                               cross_fit_backbone_checkpoints=",".join(str(p) for p in fold_files))[0],
                                     train._dataset)
    assert len(model.fold_backbones) == 2
    model.train()
    with pytest.raises(RuntimeError, match="must go through cross_fitted"):
        _ = model.backbone
    model.eval()  # evaluation: the backbone trained on every user; the zero head ranks exactly as it does
    assert model.backbone is model.fit_backbone
    batch = next(iter(test))[0]
    with torch.no_grad():
        assert torch.allclose(model.full_sort_predict(batch), model.fit_backbone.full_sort_predict(batch), atol=1e-5)
        assert not torch.allclose(model.fit_backbone.full_sort_predict(batch),
                                  model.fold_backbones[0].full_sort_predict(batch), atol=1e-3)
    assert not any(k.startswith("fold_backbones.") for k in model.state_dict())  # frozen: not in checkpoints

    def build(**overrides):
        config = _prepared("AlignLLMRec", data_path, name, **{**llm, "cross_fit_folds": 2, **overrides})[0]
        return get_model(config["model"])(config, train._dataset)

    with pytest.raises(ValueError, match="cross_fit_folds is 3 but cross_fit_backbone_checkpoints lists 2"):
        build(backbone_checkpoint=str(full_file), cross_fit_backbone_checkpoints=[str(p) for p in fold_files], cross_fit_folds=3)
    with pytest.raises(ValueError, match="leaves out user fold"):  # the evaluation backbone must have seen every user
        build(backbone_checkpoint=str(fold_files[0]), cross_fit_backbone_checkpoints=[str(p) for p in fold_files])
    with pytest.raises(FileNotFoundError, match=r"cross_fit_backbone_checkpoints\[1\] .* does not exist"):
        build(backbone_checkpoint=str(full_file), cross_fit_backbone_checkpoints=[str(fold_files[0]), "missing.pth"])

    with pytest.raises(ValueError, match="entry i of K must leave out fold i of K"):
        build(backbone_checkpoint=str(full_file), cross_fit_backbone_checkpoints=[str(p) for p in reversed(fold_files)])
    with pytest.raises(ValueError, match="nothing to refit"):  # cross-fitting evaluates with a backbone that fit everything
        build(backbone_checkpoint=str(full_file), cross_fit_backbone_checkpoints=[str(p) for p in fold_files],
              refit_backbone_checkpoint=str(full_file))
    with pytest.raises(ValueError, match="AlignGenRec does not train with cross-fitting"):
        config = _prepared("AlignGenRec", data_path, name, backbone_checkpoint=str(full_file), cross_fit_folds=2,
                           cross_fit_backbone_checkpoints=[str(p) for p in fold_files], **llm)[0]
        get_model("AlignGenRec")(config, train._dataset)
    with pytest.raises(ValueError, match="cross_fit_folds must be 0"):
        run_with_cost("AlignLLMRec", name, config_dict=cyclic_config(data_path, item_text_fields=["title", "genre"],
                                                                     cross_fit_folds=1, **llm))
    with pytest.raises(ValueError, match="nothing to refit"):
        run_with_cost("AlignLLMRec", name, config_dict=cyclic_config(data_path, item_text_fields=["title", "genre"],
                                                                     cross_fit_folds=2, backbone_refit_epochs=2, **llm))
    with pytest.raises(ValueError, match="train them yourself"):
        run_with_cost("AlignLLMRec", name, config_dict=cyclic_config(data_path, item_text_fields=["title", "genre"],
                                                                     cross_fit_folds=2, backbone_checkpoint=str(full_file), **llm))


def test_a_cross_fitted_checkpoint_loads_without_its_fold_backbones(cyclic_dataset, tiny_llama_dir):
    from recbole_llmalign.quick_start import load_data_and_model, run_with_cost

    data_path, name = cyclic_dataset
    _, cost = run_with_cost("AlignLLMRec", name, config_dict=cyclic_config(
        data_path, item_text_fields=["title", "genre"], llm_path=str(tiny_llama_dir), llm_layers=1, train_batch_size=64,
        backbone_epochs=1, denoise_samples=False, epochs=1, cross_fit_folds=2))
    for path in Path("saved/backbones").glob("*-fold*.pth"):  # another machine: only the model and its backbone
        path.unlink()
    _, model, *_ = load_data_and_model(cost.checkpoint)
    assert model.fold_backbones is None and model.backbone is model.fit_backbone


def test_cross_fitting_is_refused_before_any_backbone_trains_for_a_model_without_it(cyclic_dataset, tiny_llama_dir):
    from recbole_llmalign.quick_start import run_with_cost

    data_path, name = cyclic_dataset
    with pytest.raises(ValueError, match="AlignGenRec does not train with cross-fitting"):
        run_with_cost("AlignGenRec", name, config_dict=cyclic_config(
            data_path, item_text_fields=["title", "genre"], llm_path=str(tiny_llama_dir), llm_layers=1, cross_fit_folds=2))
    assert not Path("saved/backbones").exists()


def test_fold_evaluation_ranks_each_user_with_the_fold_backbone_that_never_saw_them(cyclic_dataset, tiny_llama_dir, tmp_path):
    from recbole.data.interaction import Interaction

    from recbole_llmalign.data.sampling import user_folds
    from recbole_llmalign.model.abstract_recommender import FoldRoutedBackbone
    from recbole_llmalign.quick_start import load_data_and_model, run_with_cost
    from recbole_llmalign.utils import get_model

    data_path, name = cyclic_dataset
    llm = dict(llm_path=str(tiny_llama_dir), llm_layers=1, train_batch_size=64, backbone_epochs=2, denoise_samples=False,
               epochs=1, cross_fit_folds=2, explanation_max_tokens=5)
    result, cost = run_with_cost("AlignLLMRec", name, config_dict=cyclic_config(
        data_path, item_text_fields=["title", "genre"], cross_fit_evaluation="folds", **llm))
    files = sorted(Path("saved/backbones").glob("AlignSASRec-cyclic-*.pth"))
    fold_files = [str(p) for p in files if "-fold" in p.name]
    (full_file,) = [str(p) for p in files if "-fold" not in p.name]
    config, train, _, test = _prepared("AlignLLMRec", data_path, name, **llm, backbone_checkpoint=full_file,
                                       cross_fit_backbone_checkpoints=fold_files, cross_fit_evaluation="folds")
    model = get_model("AlignLLMRec")(config, train._dataset).eval()  # zero head: ranks exactly as its backbone
    folds = torch.from_numpy(user_folds(train._dataset, 2))
    batch = next(iter(test))[0]
    users = batch[model.USER_ID]
    assert set(folds[users].tolist()) == {0, 1}
    with torch.no_grad():
        scores = model.full_sort_predict(batch)
        routed = model.scoring_backbone
        assert isinstance(routed, FoldRoutedBackbone)
        assert torch.allclose(routed.full_sort_predict(batch), scores, atol=1e-5)
        for fold in (0, 1):
            rows = torch.nonzero(folds[users] == fold).squeeze(1)
            assert torch.allclose(scores[rows], model.fold_backbones[fold].full_sort_predict(batch[rows]), atol=1e-5)
        assert not torch.allclose(scores, model.fit_backbone.full_sort_predict(batch), atol=1e-3)  # not the full one
        # a history without a known user (serving a new user): fold 0's backbone, which no user of it trained
        anonymous = Interaction({model.ITEM_SEQ: batch[model.ITEM_SEQ], model.ITEM_SEQ_LEN: batch[model.ITEM_SEQ_LEN]})
        assert torch.allclose(model.full_sort_predict(anonymous), model.fold_backbones[0].full_sort_predict(batch), atol=1e-5)
    with pytest.raises(RuntimeError, match="must go through cross_fitted"):  # evaluation outside the routing
        _ = model.backbone
    assert "backbone_test_result" in result  # the run's own backbone is the routed fold backbones
    everything = load_data_and_model(cost.checkpoint)  # its checkpoint ranks with the folds again
    loaded = everything[1]
    assert loaded.routes_evaluation and len(loaded.fold_backbones) == 2
    with torch.no_grad():
        trained = loaded.full_sort_predict(batch)
    assert trained.shape == scores.shape and torch.isfinite(trained).all()
    # recommending with explanations and precomputing every user's top-K work on such a model
    from recbole_llmalign.recommend import recommend
    from recbole_llmalign.serving import precompute_topk

    picked = recommend(cost.checkpoint, "u5", topk=3, explain=True, loaded=everything)
    assert len(picked.items) == len(picked.explanations) == 3
    assert precompute_topk(cost.checkpoint, tmp_path / "top.cache", topk=3, loaded=everything, show_progress=False).is_file()

    def build(**overrides):
        built = _prepared("AlignLLMRec", data_path, name, **{**llm, **overrides})[0]
        return get_model("AlignLLMRec")(built, train._dataset)

    with pytest.raises(ValueError, match="cross_fit_evaluation must be one of"):
        build(backbone_checkpoint=full_file, cross_fit_backbone_checkpoints=fold_files, cross_fit_evaluation="both")
    with pytest.raises(ValueError, match="and this AlignLLMRec has none"):
        build(backbone_checkpoint=full_file, cross_fit_folds=0, cross_fit_evaluation="folds")
    for path in Path("saved/backbones").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match="cross_fit_folds is 0: set cross_fit_folds >= 2"):  # before any backbone trains
        run_with_cost("AlignLLMRec", name, config_dict=cyclic_config(
            data_path, item_text_fields=["title", "genre"], **{**llm, "cross_fit_folds": 0}, cross_fit_evaluation="folds"))
    assert not any(Path("saved/backbones").iterdir())
