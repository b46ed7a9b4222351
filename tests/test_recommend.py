"""The recommend command and API: titles, masking of known items, ranking order, explanations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import cyclic_config


def test_recommend_lists_unseen_items_best_first_with_explanations(trained_backbone, tiny_llama_dir, capsys):
    from recbole_llmalign.cli import main
    from recbole_llmalign.quick_start import load_data_and_model, run_with_cost
    from recbole_llmalign.recommend import recommend, user_history

    data_path, name, checkpoint = trained_backbone
    run_with_cost("AlignLLMRec", name, config_dict=cyclic_config(
        data_path, item_text_fields=["title", "genre"], backbone_checkpoint=checkpoint, llm_path=str(tiny_llama_dir),
        llm_layers=2, train_batch_size=64, epochs=1, explanation_max_tokens=5))
    model_file = str(sorted(Path("saved").glob("AlignLLMRec-*.pth"))[-1])
    loaded = load_data_and_model(model_file)
    dataset = loaded[2]

    result = recommend(model_file, "u5", topk=5, explain=True, loaded=loaded)
    assert len(result.items) == len(result.scores) == len(result.explanations) == 5
    assert result.scores == sorted(result.scores, reverse=True)
    history = user_history(dataset, dataset.field2token_id["user_id"]["u5"]).tolist()
    known = {str(dataset.field2id_token[dataset.iid_field][i]) for i in history}
    assert known and not known & set(result.item_ids)  # nothing the user already has
    assert all(title.startswith("Item number") for title in result.titles + result.history)
    assert len(result.history) == 5
    assert all(reason[0].isupper() and reason.endswith(".") for reason in result.explanations)
    # the evidence: the user's 2 history items closest to each item by the frozen backbone's item vectors
    model = loaded[1]
    vectors = torch.nn.functional.normalize(model.item_side().scoring, dim=-1)
    seen = sorted(set(history))
    for item in result.items:
        internal = dataset.field2token_id["item_id"][item.item_id]
        closest = [seen[i] for i in torch.argsort(vectors[seen] @ vectors[internal], descending=True)[:2].tolist()]
        assert [match.index for match in item.evidence.history] == closest and item.evidence.item_id == item.item_id
    rendered = result.render()
    assert rendered.count("why: ") == 5 and rendered.count("evidence: ") == 5
    # the ranking LLM keeps 2 of 3 layers; explanations come from the full-depth model, loaded once
    from recbole_llmalign.llm.explain import explainer_for

    explainer = explainer_for(model, loaded[0], dataset)
    assert len(model.decoder.layers) == 2 and len(explainer.lm().model.layers) == 3 and explainer.lm() is explainer.lm()

    with pytest.raises(ValueError, match="User 'nobody' is not in cyclic"):
        recommend(model_file, "nobody", loaded=loaded)

    assert main(["recommend", "--model_file", model_file, "--user", "u5", "--topk", "3"]) == 0
    printed = capsys.readouterr().out
    assert "User u5: recent history" in printed and " 3. Item number" in printed and "why:" not in printed


def test_explain_needs_an_llm_model(cyclic_dataset):
    from recbole_llmalign.quick_start import run_with_cost
    from recbole_llmalign.recommend import recommend

    data_path, name = cyclic_dataset
    run_with_cost("AlignSASRec", name, config_dict=cyclic_config(data_path, item_representation="id",
                                                                   seq_text_align_weight=0.0, id_text_align_weight=0.0))
    model_file = str(sorted(Path("saved").glob("AlignSASRec-*.pth"))[-1])
    assert len(recommend(model_file, "u3", topk=4).items) == 4
    with pytest.raises(ValueError, match="--explain needs a model with an LLM"):
        recommend(model_file, "u3", explain=True)
