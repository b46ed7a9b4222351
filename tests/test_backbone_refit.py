"""The refit backbone (``backbone_refit_epochs``): AlignSASRec warm starts, the refit trained from
the stacking backbone and cached, and AlignLLMRec training on one backbone and evaluating with the other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import recbole_llmalign  # noqa: F401
from tests.conftest import cyclic_config


def _sasrec(data_path: str, name: str, **overrides):
    from recbole.data import create_dataset, data_preparation

    from recbole_llmalign.config import Config
    from recbole_llmalign.model.align_sasrec import AlignSASRec

    config = Config(model="AlignSASRec", dataset=name, config_dict=cyclic_config(
        data_path, item_text_fields=["title", "genre"], **overrides))
    train, _, _ = data_preparation(config, create_dataset(config))
    return AlignSASRec(config, train._dataset)


def test_init_checkpoint_starts_from_every_weight_of_the_checkpoint_and_refuses_a_misfit(trained_backbone):
    from recbole_llmalign.compat import load_checkpoint

    data_path, name, checkpoint = trained_backbone
    saved = load_checkpoint(checkpoint, map_location="cpu")["state_dict"]
    fresh = _sasrec(data_path, name)
    warm = _sasrec(data_path, name, init_checkpoint=checkpoint)
    assert all(torch.equal(warm.state_dict()[k], v) for k, v in saved.items())
    assert not torch.equal(fresh.item_embedding.weight, warm.item_embedding.weight)
    with pytest.raises(ValueError, match="does not fit this AlignSASRec.*other shapes"):
        _sasrec(data_path, name, init_checkpoint=checkpoint, hidden_size=8, embedding_size=8, inner_size=16)
    with pytest.raises(FileNotFoundError, match="init_checkpoint .* does not exist"):
        _sasrec(data_path, name, init_checkpoint=str(Path(checkpoint).with_name("missing.pth")))


def test_a_warm_start_is_validated_first_so_a_worse_continuation_keeps_it(trained_backbone):
    from recbole_llmalign.compat import load_checkpoint
    from recbole_llmalign.quick_start import run_with_cost

    data_path, name, checkpoint = trained_backbone
    start = load_checkpoint(checkpoint, map_location="cpu")["state_dict"]
    # a step size that wrecks the model in one epoch: the warm start stays the best, and is what the run returns
    result, cost = run_with_cost("AlignSASRec", name, config_dict=cyclic_config(
        data_path, item_text_fields=["title", "genre"], init_checkpoint=checkpoint, epochs=1, learning_rate=50.0))
    kept = load_checkpoint(cost.checkpoint, map_location="cpu")["state_dict"]
    assert all(torch.equal(kept[k], v) for k, v in start.items())
    again, _ = run_with_cost("AlignSASRec", name, config_dict=cyclic_config(data_path, item_text_fields=["title", "genre"],
                                                                           epochs=1, learning_rate=50.0))
    assert result["best_valid_score"] > again["best_valid_score"]  # a fresh start at that step size is worse


def _llm_config(data_path: str, tiny_llama_dir: Path, **overrides) -> dict:
    return cyclic_config(data_path, item_text_fields=["title", "genre"], llm_path=str(tiny_llama_dir), llm_layers=1,
                         train_batch_size=64, backbone_epochs=2, denoise_samples=False, **overrides)


def test_refit_backbone_continues_the_holdout_backbone_on_every_target_is_cached_and_ranks_evaluation(cyclic_dataset,
                                                                                                        tiny_llama_dir,
                                                                                                        monkeypatch):
    from recbole.data import create_dataset, data_preparation

    from recbole_llmalign.compat import load_checkpoint
    from recbole_llmalign.config import Config
    from recbole_llmalign.logs import evaluate_backbone
    from recbole_llmalign.model.align_sasrec import AlignSASRec
    from recbole_llmalign.quick_start import run_with_cost
    from recbole_llmalign.utils import get_model

    data_path, name = cyclic_dataset
    result, cost = run_with_cost("AlignLLMRec", name, config_dict=_llm_config(data_path, tiny_llama_dir,
                                                                              backbone_refit_epochs=2))
    assert cost.extra["train_samples"] == 120  # the LLM still trains on the held-out targets only
    (holdout_file,) = [p for p in Path("saved/backbones").glob("AlignSASRec-cyclic-*.pth") if "-refit-" not in p.name]
    (refit_file,) = Path("saved/backbones").glob("AlignSASRec-cyclic-refit-*.pth")
    holdout, refit = (load_checkpoint(p, map_location="cpu") for p in (holdout_file, refit_file))
    assert holdout["config"]["holdout_last_targets"] == 1
    assert refit["config"]["holdout_last_targets"] == 0 and refit["config"]["init_checkpoint"] == str(holdout_file)
    assert not torch.equal(holdout["state_dict"]["item_embedding.weight"], refit["state_dict"]["item_embedding.weight"])

    config = Config(model="AlignLLMRec", dataset=name, config_dict=_llm_config(
        data_path, tiny_llama_dir, backbone_checkpoint=str(holdout_file), refit_backbone_checkpoint=str(refit_file)))
    train, _, test = data_preparation(config, create_dataset(config))
    with monkeypatch.context() as patch:  # the refit file holds every weight: loading it warm-starts nothing again
        patch.setattr(AlignSASRec, "warm_start", lambda *_, **__: pytest.fail("the refit's warm start ran again on load"))
        model = get_model("AlignLLMRec")(config, train._dataset)
    model.train()
    assert model.backbone is model.fit_backbone
    training_side = model.item_side().scoring.clone()  # cached in training: evaluation must not reuse it
    model.eval()
    assert not torch.allclose(model.item_side().scoring, training_side, atol=1e-3)
    assert model.backbone is model.refit_backbone is model.scoring_backbone
    batch = next(iter(test))[0]
    with torch.no_grad():  # the head starts at zero: evaluation ranks exactly as the refit backbone
        assert torch.allclose(model.full_sort_predict(batch), model.refit_backbone.full_sort_predict(batch), atol=1e-5)
        assert not torch.allclose(model.full_sort_predict(batch), model.fit_backbone.full_sort_predict(batch), atol=1e-3)
    # the run reports the backbone it ranks with as its own (the refit), whatever mode the model is left in
    class Recorder:
        def __init__(self, model):
            self.model = model

        def evaluate(self, data, **_):
            return {"evaluated": id(self.model)}

    model.train()
    assert evaluate_backbone(Recorder(model), model, test) == {"evaluated": id(model.refit_backbone)}
    assert set(result["backbone_test_result"]) == set(result["test_result"])

    with pytest.raises(ValueError, match="was trained with holdout_last_targets=1"):  # a refit fits every target
        get_model("AlignLLMRec")(Config(model="AlignLLMRec", dataset=name, config_dict=_llm_config(
            data_path, tiny_llama_dir, backbone_checkpoint=str(holdout_file), refit_backbone_checkpoint=str(holdout_file))),
            train._dataset)

    mtime = refit_file.stat().st_mtime_ns
    run_with_cost("AlignLLMRec", name, config_dict=_llm_config(data_path, tiny_llama_dir, backbone_refit_epochs=2))
    assert refit_file.stat().st_mtime_ns == mtime  # cached: the second run trains no refit
    assert len(list(Path("saved/backbones").glob("*refit*.pth"))) == 1


def test_refit_needs_a_holdout_backbone_and_a_model_that_evaluates_with_it(trained_backbone, cyclic_dataset, tiny_llama_dir):
    from recbole.data import create_dataset, data_preparation

    from recbole_llmalign.config import Config
    from recbole_llmalign.quick_start import run_with_cost
    from recbole_llmalign.utils import get_model

    data_path, name, checkpoint = trained_backbone  # trained on every target (holdout 0)
    with pytest.raises(ValueError, match="holdout_last_targets is 0"):
        run_with_cost("AlignLLMRec", name, config_dict=_llm_config(data_path, tiny_llama_dir, backbone_refit_epochs=2,
                                                                   holdout_last_targets=0))
    assert not Path("saved/backbones").exists()  # refused before any backbone trained
    with pytest.raises(ValueError, match="train its refit yourself"):  # a user's backbone: its settings are not this run's
        run_with_cost("AlignLLMRec", name, config_dict=_llm_config(data_path, tiny_llama_dir, backbone_refit_epochs=2,
                                                                   backbone_checkpoint=checkpoint))

    def build(model: str, **overrides):
        config = Config(model=model, dataset=name, config_dict=_llm_config(data_path, tiny_llama_dir, **overrides))
        train, _, _ = data_preparation(config, create_dataset(config))
        return get_model(model)(config, train._dataset)

    with pytest.raises(ValueError, match="holds out no training targets"):
        build("AlignLLMRec", backbone_checkpoint=checkpoint, refit_backbone_checkpoint=checkpoint)
    with pytest.raises(ValueError, match="AlignGenRec does not evaluate with a refit backbone"):
        build("AlignGenRec", backbone_checkpoint=checkpoint, refit_backbone_checkpoint=checkpoint)
