"""The labeled (pointwise) protocol: UAUC, yes/no answer tokens, AlignLLMRec scoring (history, candidate) pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import recbole_llmalign  # noqa: F401
from tests.conftest import TINY_SEQUENTIAL, newest_file, write_atomic


def test_uauc_equals_a_hand_computation():
    from recbole_llmalign.evaluator import user_averaged_auc

    users = np.array([1, 1, 1, 2, 2, 2, 2, 3, 3])
    labels = np.array([1, 0, 0, 1, 1, 0, 0, 1, 1])  # user 3 has no negative: skipped
    scores = np.array([0.9, 0.5, 0.95, 0.2, 0.6, 0.6, 0.1, 0.3, 0.4])
    # user 1: positive 0.9 beats 0.5, loses to 0.95 -> 1/2
    # user 2: positives {0.2, 0.6} vs negatives {0.6, 0.1}: 0.2>0.1 (1), 0.6=0.6 (1/2), 0.6>0.1 (1) -> 2.5/4
    value, counted = user_averaged_auc(scores, labels, users)
    assert counted == 2 and value == pytest.approx((0.5 + 0.625) / 2)


def test_answer_words_must_be_single_tokens(tiny_llama_dir):
    from transformers import AutoTokenizer

    from recbole_llmalign.llm.soft_prompt import resolve_answer_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert resolve_answer_tokens(tokenizer, ["yes", "no"]) == (3, 4)
    with pytest.raises(ValueError, match="(?s)'maybe' is 1 tokens.*not one known token.*answer_token_ids"):
        resolve_answer_tokens(tokenizer, ["maybe", "no"])
    assert resolve_answer_tokens(tokenizer, ["maybe", "no"], [5, 6]) == (5, 6)
    with pytest.raises(ValueError, match="inside the vocabulary"):
        resolve_answer_tokens(tokenizer, ["yes", "no"], [3, 999])


@pytest.fixture
def labeled_dataset(tmp_path) -> tuple[str, str]:
    """Users walk a cycle of 30 items; they like (rating 5) the odd items and dislike (1) the even ones,
    so the label is a property of the candidate the collaborative item vectors can carry."""
    rows = []
    for user in range(1, 121):
        start = (user * 7) % 30
        rows += [[f"u{user}", f"i{(start + step) % 30 + 1}", 5.0 if ((start + step) % 30 + 1) % 2 else 1.0, 1000 * user + step]
                 for step in range(14)]
    root = tmp_path / "data"
    write_atomic(root / "cyc" / "cyc.inter", ["user_id:token", "item_id:token", "rating:float", "timestamp:float"], rows)
    write_atomic(root / "cyc" / "cyc.item", ["item_id:token", "title:token_seq"], [[f"i{i}", f"Item number {i}"] for i in range(1, 31)])
    return str(root), "cyc"


def _labeled_config(data_path: str, **overrides) -> dict:
    config = dict(TINY_SEQUENTIAL, data_path=data_path, load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]},
                  threshold={"rating": 4}, eval_args={"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": None,
                                                      "mode": "labeled"},
                  metrics=["AUC", "UAUC"], valid_metric="AUC", learning_rate=0.01, item_text_fields=["title"])
    config.update(overrides)
    return config


def test_alignllmrec_labeled_task_learns_the_label_and_reports_auc_and_uauc(labeled_dataset, tiny_llama_dir):
    from recbole_llmalign.quick_start import run_with_cost

    data_path, name = labeled_dataset
    config = _labeled_config(data_path, llm_path=str(tiny_llama_dir), llm_layers=2, answer_words=["yes", "no"],
                             train_batch_size=64, train_sample_budget=1.0, epochs=12, backbone_epochs=3, eval_batch_size=256)
    result, _ = run_with_cost("AlignLLMRecCTR", name, config_dict=config)
    assert set(result["test_result"]) >= {"auc", "uauc"}
    assert result["test_result"]["auc"] > 0.9  # chance is 0.5
    assert result["test_result"]["uauc"] > 0.8  # per-user ranking of the pairs, chance 0.5
    # every item has ~45 training interactions: no cold candidate, so the warm slice is the whole test set
    assert "test_cold_result" not in result
    assert result["test_warm_result"]["auc"] == pytest.approx(result["test_result"]["auc"])
    checkpoint = newest_file("saved", "AlignLLMRecCTR-*.pth")
    saved = torch.load(checkpoint, weights_only=False)
    assert {"backbone_score_weight", "label_bias"} <= set(saved["state_dict"])

    # a checkpoint written before AlignLLMRecCTR existed: AlignLLMRec with task: labeled, an unused
    # ranking head, and no keys added since; it loads as AlignLLMRecCTR and scores the same
    from recbole_llmalign.quick_start import load_data_and_model

    legacy = saved["config"]
    legacy.final_config_dict.update(model="AlignLLMRec", task="labeled")
    legacy.final_config_dict.pop("explanation_max_tokens")
    legacy.model = "AlignLLMRec"
    saved["state_dict"].update({"ranking_head.weight": torch.zeros(16, 32), "ranking_head.bias": torch.zeros(16)})
    torch.save(saved, "legacy.pth")
    config, model, _, _, _, test = load_data_and_model("legacy.pth")
    assert type(model).__name__ == "AlignLLMRecCTR" and config["explanation_max_tokens"] == 24
    _, current, _, _, _, _ = load_data_and_model(str(checkpoint))
    batch = next(iter(test))[0]
    assert torch.allclose(model.predict(batch), current.predict(batch))


def test_labeled_model_refuses_full_ranking_and_the_old_task_key_names_the_new_model(trained_backbone, tiny_llama_dir):
    from recbole.data import create_dataset, data_preparation

    from recbole_llmalign.config import Config
    from recbole_llmalign.utils import get_model
    from tests.conftest import cyclic_config

    data_path, name, checkpoint = trained_backbone
    settings = dict(item_text_fields=["title"], backbone_checkpoint=checkpoint, llm_path=str(tiny_llama_dir), llm_layers=2,
                    answer_words=["yes", "no"])
    config = Config(model="AlignLLMRecCTR", dataset=name, config_dict=cyclic_config(data_path, **settings))
    train, _, test = data_preparation(config, create_dataset(config))
    with pytest.raises(ValueError, match="'label_list', which this dataset does not have"):  # no label field at all
        get_model("AlignLLMRecCTR")(config, train._dataset)
    config = Config(model="AlignLLMRecCTR", dataset=name, config_dict=cyclic_config(
        data_path, history_label_words=None, label_rate_features=False, **settings))
    model = get_model("AlignLLMRecCTR")(config, train._dataset).eval()
    with pytest.raises(ValueError, match="AlignLLMRecCTR scores .* pairs"):
        model.full_sort_predict(next(iter(test))[0])
    with pytest.raises(ValueError, match="task: labeled is now its own model: run --model=AlignLLMRecCTR"):
        get_model("AlignLLMRec")(Config(model="AlignLLMRec", dataset=name, config_dict=cyclic_config(
            data_path, task="labeled", **settings)), train._dataset)


def test_history_items_carry_their_liked_or_disliked_word(tiny_llama_dir):
    from transformers import AutoTokenizer

    from recbole_llmalign.llm.soft_prompt import PromptBuilder

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    vocab = tokenizer.get_vocab()
    builder = PromptBuilder(tokenizer, "user {user} watched {history}", ["", "movie", "item"], "titles", history_items=2)
    builder.set_history_marks(["yes", "no"], tokenizer)  # single tokens of the tiny vocabulary: liked, disliked
    history = torch.tensor([[1, 2, 1], [2, 0, 0]])
    lengths = torch.tensor([3, 1])
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    prompts = builder.assemble(history, lengths, history_labels=labels)
    first = [t for t in prompts.token_ids[0].tolist() if t >= 0]
    # the last two items of row 0 are item 2 (liked) then item 1 (disliked)
    expected = [vocab["item"], vocab["yes"]] + builder.separator + [vocab["movie"], vocab["no"]]
    assert first[-len(expected):] == expected
    second = prompts.token_ids[1][prompts.attention_mask[1].bool()].tolist()
    assert second[-2:] == [vocab["item"], vocab["yes"]]
    assert builder.prompt_lengths(history, lengths, labels) == prompts.attention_mask.sum(1).tolist()
    unmarked = builder.assemble(history, lengths)  # no labels given: no marks
    assert vocab["no"] not in unmarked.token_ids[0].tolist()
    with pytest.raises(ValueError, match="two words"):
        builder.set_history_marks(["yes"], tokenizer)


@pytest.fixture
def tendency_dataset(tmp_path) -> tuple[str, str]:
    """The label is a property of the USER: odd users like (5) everything they rate, even users
    nothing (1); what they rate is random. Only the labels of a user's history can tell them apart."""
    generator = np.random.default_rng(0)
    rows = []
    for user in range(1, 121):
        for step, item in enumerate(generator.choice(30, size=14, replace=False) + 1):
            rows.append([f"u{user}", f"i{item}", 5.0 if user % 2 else 1.0, 1000 * step + user])  # users interleaved in time
    root = tmp_path / "data"
    write_atomic(root / "tend" / "tend.inter", ["user_id:token", "item_id:token", "rating:float", "timestamp:float"], rows)
    write_atomic(root / "tend" / "tend.item", ["item_id:token", "title:token_seq"], [[f"i{i}", f"Item number {i}"] for i in range(1, 31)])
    return str(root), "tend"


def test_history_labels_and_rate_features_capture_user_tendency(tendency_dataset, tiny_llama_dir):
    from recbole_llmalign.quick_start import run_with_cost

    data_path, name = tendency_dataset
    common = dict(llm_path=str(tiny_llama_dir), llm_layers=2, answer_words=["yes", "no"], train_batch_size=64,
                  train_sample_budget=1.0, epochs=1, backbone_epochs=2, eval_batch_size=256, learning_rate=1e-3)
    blind, _ = run_with_cost("AlignLLMRecCTR", name, config_dict=_labeled_config(
        data_path, history_label_words=None, label_rate_features=False, **common))
    informed, _ = run_with_cost("AlignLLMRecCTR", name, config_dict=_labeled_config(
        data_path, history_label_words=["yes", "no"], label_rate_features=True, **common))
    rates_only, _ = run_with_cost("AlignLLMRecCTR", name, config_dict=_labeled_config(data_path, answer_from_llm=False, **common))
    assert informed["test_result"]["auc"] > 0.95  # the user's like rate separates the two groups at once
    assert rates_only["test_result"]["auc"] > 0.95  # ... with or without the LLM pass
    assert blind["test_result"]["auc"] < 0.75  # item choice is random: nothing to learn from without labels
    checkpoint = newest_file("saved", "AlignLLMRecCTR-*.pth")
    assert "rate_weights" in torch.load(checkpoint, weights_only=False)["state_dict"]


def test_like_rates_are_smoothed_and_a_training_pair_does_not_see_its_own_label():
    from types import SimpleNamespace

    from recbole_llmalign.model.align_llmrec_ctr import AlignLLMRecCTR

    # item 1: 3 likes of 4 training ratings; prior 2 pseudo-ratings at the global rate 0.5
    state = SimpleNamespace(item_likes=torch.tensor([0.0, 3.0]), item_counts=torch.tensor([0.0, 4.0]), rate_prior=2.0,
                            global_rate=0.5, rate_weights=torch.tensor([0.0, 1.0]))  # item term only
    lengths, history, candidates = torch.tensor([2]), torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([1])
    logit = lambda rate: float(torch.logit(torch.tensor(rate)))  # noqa: E731
    unseen = AlignLLMRecCTR._rate_logit(state, lengths, history, candidates)
    assert float(unseen) == pytest.approx(logit((3 + 1) / (4 + 2)))
    own_like = AlignLLMRecCTR._rate_logit(state, lengths, history, candidates, own_labels=torch.tensor([1.0]))
    assert float(own_like) == pytest.approx(logit((2 + 1) / (3 + 2)))  # its own like removed
    own_dislike = AlignLLMRecCTR._rate_logit(state, lengths, history, candidates, own_labels=torch.tensor([0.0]))
    assert float(own_dislike) == pytest.approx(logit((3 + 1) / (3 + 2)))
    state.rate_weights = torch.tensor([1.0, 0.0])  # user term: 1 like in a 2-item history (the padding is ignored)
    assert float(AlignLLMRecCTR._rate_logit(state, lengths, history, candidates)) == pytest.approx(logit((1 + 1) / (2 + 2)))


def test_a_ctr_scorer_checkpoint_starts_the_model_at_that_models_score(labeled_dataset, tiny_llama_dir):
    """With ``ctr_scorer_checkpoint`` the untrained model scores every test pair as the frozen FM does: at learning
    rate 0 its test AUC is FM's own (to the few pairs without a history, which a sequential model cannot score), which
    only holds when its users and items are mapped to FM's ids (one item off flips the parity label: AUC near 0)."""
    from recbole_llmalign.quick_start import run_with_cost

    data_path, name = labeled_dataset
    with_titles = {"load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"], "item": ["item_id", "title"]}}
    fm_result, fm_cost = run_with_cost("FM", name, config_dict=_labeled_config(data_path, epochs=10, train_neg_sample_args=None,
                                                                               **with_titles))  # FM reads item features too
    assert fm_result["test_result"]["auc"] > 0.9  # the label is the item's parity: FM's item bias learns it
    common = dict(llm_path=str(tiny_llama_dir), llm_layers=2, answer_words=["yes", "no"], train_batch_size=64,
                  train_sample_budget=1.0, epochs=1, backbone_epochs=2, eval_batch_size=256, answer_from_llm=False)
    still, _ = run_with_cost("AlignLLMRecCTR", name, config_dict=_labeled_config(
        data_path, ctr_scorer_checkpoint=fm_cost.checkpoint, **with_titles, **{**common, "learning_rate": 0.0}))
    assert still["test_result"]["auc"] == pytest.approx(fm_result["test_result"]["auc"], abs=0.005)
    assert still["test_result"]["uauc"] == pytest.approx(fm_result["test_result"]["uauc"], abs=0.005)
    state = torch.load(newest_file("saved", "AlignLLMRecCTR-*.pth"), weights_only=False)["state_dict"]
    assert "ctr_scorer_weight" in state and not any(key.startswith("ctr_scorer.") for key in state)  # FM is its own file

    backbone = str(newest_file("saved", "AlignSASRec-*.pth"))
    with pytest.raises(ValueError, match="holds a AlignSASRec .*must be a RecBole context-aware model"):
        run_with_cost("AlignLLMRecCTR", name, config_dict=_labeled_config(data_path, ctr_scorer_checkpoint=backbone, **common))
    with pytest.raises(FileNotFoundError, match="ctr_scorer_checkpoint missing.pth does not exist"):
        run_with_cost("AlignLLMRecCTR", name, config_dict=_labeled_config(data_path, ctr_scorer_checkpoint="missing.pth", **common))
