"""AlignLLMRec with a tiny random Llama: prompts, soft tokens, prefixes, frozen weights, checkpoints, errors."""

from __future__ import annotations

import io

import pytest
import torch

import recbole_llmalign  # noqa: F401
from recbole_llmalign.llm.soft_prompt import HISTORY_SLOT, SEMANTIC_SLOT, USER_SLOT, PromptBuilder
from tests.conftest import cyclic_config, newest_file


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_prompt_assembly_places_soft_tokens_and_left_pads(tiny_llama_dir):
    tokenizer = _tokenizer(tiny_llama_dir)
    titles = ["", "the movie", "next movie", "item"]
    history = torch.tensor([[1, 2, 3, 0], [2, 0, 0, 0]])
    lengths = torch.tensor([3, 1])
    hybrid = PromptBuilder(tokenizer, "user {user} watched {history} recommend", titles, "hybrid", history_items=2).assemble(history, lengths)
    ids, items, mask = hybrid.token_ids, hybrid.slot_items, hybrid.attention_mask
    for row, recent in ((0, [2, 3]), (1, [2])):
        real = ids[row][mask[row].bool()]
        assert (real == USER_SLOT).sum() == 1
        assert (real == HISTORY_SLOT).sum() == len(recent) == (real == SEMANTIC_SLOT).sum()
        assert items[row][ids[row] == HISTORY_SLOT].tolist() == recent
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # left padding
    assert tokenizer.convert_tokens_to_ids("movie") in ids[0].tolist()  # titles present in hybrid

    soft = PromptBuilder(tokenizer, "user {user} watched {history}", titles, "soft").assemble(history, lengths)
    assert tokenizer.convert_tokens_to_ids("movie") not in soft.token_ids[0].tolist()
    titles_only = PromptBuilder(tokenizer, "user {user} watched {history}", titles, "titles").assemble(history, lengths)
    assert not (titles_only.token_ids == HISTORY_SLOT).any()
    empty = PromptBuilder(tokenizer, "user {user} watched {history}", titles, "hybrid").assemble(history, torch.tensor([0, 1]))
    assert not (empty.token_ids[0] == HISTORY_SLOT).any() and (empty.token_ids[0] == USER_SLOT).sum() == 1


def test_bad_template_and_mode_are_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="must contain"):
        PromptBuilder(_tokenizer(tiny_llama_dir), "no placeholders", ["", "a"])
    with pytest.raises(ValueError, match="prompt_mode must be one of"):
        PromptBuilder(_tokenizer(tiny_llama_dir), "{user} {history}", ["", "a"], mode="both")


def _build(trained_backbone, tiny_llama_dir, **overrides):
    from recbole.data import create_dataset, data_preparation

    from recbole_llmalign.config import Config
    from recbole_llmalign.utils import get_model

    data_path, name, checkpoint = trained_backbone
    config = Config(model="AlignLLMRec", dataset=name, config_dict=cyclic_config(
        data_path, item_text_fields=["title", "genre"], backbone_checkpoint=checkpoint, llm_path=str(tiny_llama_dir),
        llm_layers=2, train_batch_size=16, llm_micro_batch=8, **overrides))
    train, valid, test = data_preparation(config, create_dataset(config))
    return config, get_model("AlignLLMRec")(config, train._dataset), (train, valid, test)


def test_alignllmrec_masks_its_own_unseen_items_not_those_of_its_holdout_backbone(trained_backbone, tiny_llama_dir):
    """Its targets are the backbone's held-out ones, which a holdout backbone counts as unseen."""
    from recbole_llmalign.model.unseen_items import training_items

    _, model, (train, _, _) = _build(trained_backbone, tiny_llama_dir, denoise_samples=False)
    assert torch.equal(model.unseen_item_mask, ~training_items(train._dataset, model.n_items))
    batch = next(iter(train))
    model.backbone.unseen_items = "text"
    model.backbone.unseen_item_mask[batch[model.POS_ITEM_ID]] = True  # items seen only as held-out targets
    loss = model.calculate_loss(batch)
    assert bool(torch.isfinite(sum(loss) if isinstance(loss, tuple) else loss))


def test_history_tokens_of_unseen_items_carry_the_id_rows_their_backbone_scores_with(trained_backbone, tiny_llama_dir):
    _, model, _ = _build(trained_backbone, tiny_llama_dir)
    backbone = model.backbone
    unseen = torch.tensor([3, 7])
    backbone.unseen_items, backbone.unseen_item_mask[unseen] = "text", True
    backbone._eval_table, model._item_side = None, {}
    side = model.item_side()
    raw = backbone.item_embedding.weight.detach()
    trained = ~backbone.unseen_item_mask
    assert torch.allclose(side.ids[trained], raw[trained], atol=1e-5)
    assert not torch.allclose(side.ids[unseen], raw[unseen], atol=1e-3)  # borrowed from text neighbours, not untrained
    assert torch.allclose(side.ids[unseen] + side.fused_text[unseen], side.scoring[unseen], atol=1e-5)


def test_soft_tokens_carry_projected_cf_vectors_and_prefixes_have_layer_shapes(trained_backbone, tiny_llama_dir):
    _, model, (train, _, _) = _build(trained_backbone, tiny_llama_dir)
    model.eval()  # projector dropout off, so the same inputs give the same soft tokens
    batch = next(iter(train))
    seq, lengths = batch[model.ITEM_SEQ][:4], batch[model.ITEM_SEQ_LEN][:4]
    user = model.user_vectors(seq, lengths)
    embeds, mask = model.prompt_embeddings(seq, lengths, user)
    ids = model.prompts.assemble(seq, lengths).token_ids
    row, position = (ids == USER_SLOT).nonzero()[0].tolist()
    assert torch.allclose(embeds[row, position], model.user_projector(user)[row])
    fused = model.item_side().fused_text
    slot = (ids == SEMANTIC_SLOT).nonzero()[0].tolist()
    item = model.prompts.assemble(seq, lengths).slot_items[slot[0], slot[1]]
    assert torch.allclose(embeds[slot[0], slot[1]], model.semantic_projector(fused[item]))
    cache, length = model.prefix_cache(user)
    instruction_tokens = model.instruction_ids.size(1)
    assert instruction_tokens > 0
    assert length == instruction_tokens + 4 + 2  # fixed instruction text + instruction prefix + layer prefix
    assert len(cache.layers) == 2
    keys = cache.layers[0].keys
    assert keys.shape == (4, 2, length, 8)  # [batch, kv heads, prefix, head dim] of the tiny Llama
    first = model.instruction_kv()
    assert model.instruction_kv() is first  # computed once, reused


def test_a_training_step_moves_trainables_only_and_the_checkpoint_round_trips(trained_backbone, tiny_llama_dir, tmp_path):
    config, model, (train, _, test) = _build(trained_backbone, tiny_llama_dir)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable_before
    assert not any(n.startswith(("llm.", "fit_backbone.")) for n in trainable_before)
    assert any(n.startswith("fit_backbone.") for n in frozen)  # the prefix checked above is the backbone's
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = next(iter(train))
    for _ in range(2):
        loss = sum(model.calculate_loss(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, trainable_before[n]) for n, p in model.named_parameters() if n in trainable_before)

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    trainable_bytes = sum(t.numel() * t.element_size() for t in trainable_before.values())
    assert set(model.state_dict()) == set(trainable_before)  # no llm.* or backbone.* weights
    assert buffer.tell() < trainable_bytes + 64_000  # the trainables plus pickle overhead, nothing else
    buffer.seek(0)
    _, reloaded, _ = _build(trained_backbone, tiny_llama_dir)
    reloaded.load_state_dict(torch.load(buffer))
    model.eval()
    reloaded.eval()
    interaction = next(iter(test))[0]
    assert torch.allclose(model.full_sort_predict(interaction), reloaded.full_sort_predict(interaction), atol=1e-5)


def test_scores_rank_all_items_and_empty_history_is_defined(trained_backbone, tiny_llama_dir):
    _, model, (_, _, test) = _build(trained_backbone, tiny_llama_dir)
    model.eval()
    interaction = next(iter(test))[0]
    scores = model.full_sort_predict(interaction)
    assert scores.shape == (len(interaction), model.n_items)
    empty = {model.ITEM_SEQ: torch.zeros(2, 10, dtype=torch.long), model.ITEM_SEQ_LEN: torch.zeros(2, dtype=torch.long)}
    assert torch.isfinite(model.full_sort_predict(empty)).all()


def test_length_bucketed_evaluation_returns_scores_in_input_order(trained_backbone, tiny_llama_dir):
    _, model, (_, _, test) = _build(trained_backbone, tiny_llama_dir, prompt_history_items=3)
    model.eval()
    interaction = next(iter(test))[0]
    seq, lengths = interaction[model.ITEM_SEQ][:12].clone(), interaction[model.ITEM_SEQ_LEN][:12].clone()
    lengths[::3] = 1  # short histories mixed in, so sorting by prompt length reorders the users
    predicted = model.prompts.prompt_lengths(seq, lengths)
    assert predicted == model.prompts.assemble(seq, lengths).attention_mask.sum(dim=1).tolist()
    assert len(set(predicted)) > 1
    scores = model.full_sort_predict({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths})
    with torch.no_grad():
        one_by_one = torch.cat([model.scores_and_query(seq[i:i + 1], lengths[i:i + 1])[0]
                                for i in range(len(seq))])
    assert torch.allclose(scores, one_by_one, atol=1e-4)


def test_ablation_switches_build_and_run(trained_backbone, tiny_llama_dir):
    _, model, (_, _, test) = _build(trained_backbone, tiny_llama_dir, use_layer_prefix=False, use_instruction_prefix=False,
                                    prompt_mode="titles", lora_r=2)
    assert not hasattr(model, "layer_prefix") and not hasattr(model, "instruction_prefix")
    assert model.prefix_cache(torch.zeros(1, 16))[1] == model.instruction_ids.size(1)  # fixed text only
    assert any("lora_" in n for n in model.state_dict())
    model.eval()
    assert torch.isfinite(model.full_sort_predict(next(iter(test))[0])).all()


def _train_steps(model, batch, steps: int) -> list[float]:
    """Adam steps (lr 1e-2) on one batch in training mode; the loss after each."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model.calculate_loss(batch)
        loss = sum(loss) if isinstance(loss, tuple) else loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_no_llm_ablation_reads_the_same_prompt_with_an_mlp_of_similar_size_and_never_runs_the_llm(trained_backbone,
                                                                                                   tiny_llama_dir):
    """prompt_reader: mlp is the LLM ablation: same prompt embeddings, samples and head; the LLM-only
    trainables (prefixes) are traded for an MLP of about their size, and the decoder never runs."""
    _, with_llm, _ = _build(trained_backbone, tiny_llama_dir)
    _, model, (train, _, test) = _build(trained_backbone, tiny_llama_dir, prompt_reader="mlp")

    def trainable(m, prefixes=()):
        return sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and n.startswith(prefixes))

    assert not hasattr(model, "layer_prefix") and not hasattr(model, "instruction_prefix")
    replaced = trainable(with_llm, ("layer_prefix", "instruction_prefix"))
    assert abs(trainable(model, ("pooling_reader",)) - replaced) < 0.1 * replaced
    shared = ("user_projector", "history_projector", "semantic_projector", "ranking_head")
    assert trainable(model, shared) == trainable(with_llm, shared)  # the same projectors and head

    def no_llm(*args, **kwargs):
        raise AssertionError("the no_llm ablation ran the LLM")

    model.decoder.forward = no_llm
    losses = _train_steps(model, next(iter(train)), 15)
    assert losses[-1] < losses[0] - 0.1  # the MLP reader learns from the same samples
    model.eval()
    interaction = next(iter(test))[0]
    scores = model.full_sort_predict(interaction)
    assert scores.shape == (len(interaction), model.n_items) and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="prompt_reader must be one of"):
        _build(trained_backbone, tiny_llama_dir, prompt_reader="gru")
    _, with_lora, _ = _build(trained_backbone, tiny_llama_dir, prompt_reader="mlp", lora_r=2)
    assert not [n for n, p in with_lora.named_parameters() if p.requires_grad and n.startswith("llm.")]  # no LLM trainables
    assert set(with_lora.state_dict()) == set(model.state_dict())  # LoRA off: the same checkpoint keys as without it


def test_llm_plus_mlp_reader_is_the_no_llm_mlp_with_the_llm_state_added(trained_backbone, tiny_llama_dir):
    """prompt_reader: llm+mlp keeps the LLM and its prefixes and adds the no_llm twin's very MLP (same size and
    initial weights) to the LLM's last state, so the twin differs from it by the LLM alone."""
    torch.manual_seed(0)
    _, twin, _ = _build(trained_backbone, tiny_llama_dir, prompt_reader="mlp")
    torch.manual_seed(0)
    _, model, (train, _, test) = _build(trained_backbone, tiny_llama_dir, prompt_reader="llm+mlp")
    assert hasattr(model, "layer_prefix") and hasattr(model, "instruction_prefix")  # the LLM path is whole
    mine, theirs = model.pooling_reader.state_dict(), twin.pooling_reader.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    model.eval()
    interaction = next(iter(test))[0]
    seq, length = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
    with torch.no_grad():
        both, user = model.llm_states(seq, length)
        embeds, mask, token_ids = model.prompt_parts(seq, length, user)
        pooled = model.pooling_reader(embeds.float(), token_ids, mask)
        for parameter in model.pooling_reader.net[-1].parameters():
            parameter.zero_()  # the MLP's output now zero: what is left is the LLM's state
        llm_only, _ = model.llm_states(seq, length)
    assert torch.allclose(both - llm_only, pooled, atol=1e-5) and not torch.allclose(llm_only, torch.zeros_like(llm_only))
    torch.manual_seed(0)
    _, model, _ = _build(trained_backbone, tiny_llama_dir, prompt_reader="llm+mlp")
    losses = _train_steps(model, next(iter(train)), 15)
    assert losses[-1] < losses[0] - 0.1


def test_const_plus_mlp_control_is_llm_plus_mlp_with_the_llm_state_frozen_to_its_first_batch_mean(trained_backbone,
                                                                                                   tiny_llama_dir):
    """prompt_reader: const+mlp, llm+mlp's control: the same MLP (size and initial weights) plus one constant, the
    initial LLM's mean state over the first batch; nothing of the LLM trains and the LLM never runs again."""
    torch.manual_seed(0)
    _, twin, (train, _, test) = _build(trained_backbone, tiny_llama_dir, prompt_reader="mlp")
    torch.manual_seed(0)
    _, reference, _ = _build(trained_backbone, tiny_llama_dir, prompt_reader="llm+mlp")
    torch.manual_seed(0)
    _, model, _ = _build(trained_backbone, tiny_llama_dir, prompt_reader="const+mlp")
    mine, theirs = model.pooling_reader.state_dict(), twin.pooling_reader.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)  # the very MLP of the no_llm twin

    def trainable(m):
        return {n for n, p in m.named_parameters() if p.requires_grad}

    assert trainable(model) == trainable(twin)  # prefixes and LoRA kept as built, frozen: the twin's trainables exactly
    for m in (model, reference):
        m.eval()
    interaction = next(iter(test))[0]
    seq, length = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
    with torch.no_grad():
        for parameter in reference.pooling_reader.net[-1].parameters():
            parameter.zero_()
        llm_only, _ = reference.llm_states(seq, length)  # the initial LLM's state of every prompt
        assert not bool(model.constant_llm_state_ready)
        state, user = model.llm_states(seq, length)  # the first batch fixes the constant
        assert torch.allclose(model.constant_llm_state, llm_only.mean(0), atol=1e-5)
        assert llm_only.std(0).max() > 1e-3  # the LLM's states differ per user: the constant removes something

        def no_llm(*args, **kwargs):
            raise AssertionError("const+mlp ran the LLM after its first batch")

        model.decoder.forward = no_llm
        embeds, mask, token_ids = model.prompt_parts(seq, length, user)
        again, _ = model.llm_states(seq, length)
        assert torch.allclose(again - model.pooling_reader(embeds.float(), token_ids, mask),
                              model.constant_llm_state.expand_as(again), atol=1e-5)
    losses = _train_steps(model, next(iter(train)), 15)
    assert losses[-1] < losses[0] - 0.1  # the MLP learns; the constant stays
    assert torch.allclose(model.constant_llm_state, llm_only.mean(0), atol=1e-5)
    torch.manual_seed(0)
    _, reloaded, _ = _build(trained_backbone, tiny_llama_dir, prompt_reader="const+mlp")
    reloaded.load_state_dict(model.state_dict())  # the constant travels in the checkpoint: no LLM pass after loading
    reloaded.decoder.forward = no_llm
    for m in (model, reloaded):
        m.eval()  # training left model in train mode: dropout would differ
    with torch.no_grad():
        assert torch.allclose(reloaded.llm_states(seq, length)[0], model.llm_states(seq, length)[0], atol=1e-5)


def test_llm_item_scoring_starts_at_the_backbone_ranking_learns_and_caches_the_item_vectors(trained_backbone, tiny_llama_dir,
                                                                                           tmp_path, caplog):
    """llm_item_scoring: the LLM reads every item's text once (cached, keyed by the tokens); the extra
    score term starts at zero, so the untrained model ranks exactly as without it, and it trains."""
    import logging

    from recbole_llmalign.llm.item_vectors import cached_item_vectors, mean_hidden_states

    cache = str(tmp_path / "llm_cache")
    _, plain, (train, _, test) = _build(trained_backbone, tiny_llama_dir)
    _, model, _ = _build(trained_backbone, tiny_llama_dir, llm_item_scoring=True, llm_cache_dir=cache)
    _, again, _ = _build(trained_backbone, tiny_llama_dir, llm_item_scoring=True, llm_cache_dir=cache)
    with caplog.at_level(logging.INFO):
        vectors, cached = model.item_text_vectors(), again.item_text_vectors()  # first use: computed, then read
    messages = [r.getMessage() for r in caplog.records if "LLM item vectors" in r.getMessage()]
    assert "(encoded)" in messages[0] and "(cache hit)" in messages[1]
    assert torch.equal(vectors, cached) and model.item_text_vectors() is vectors  # once per model
    known = [[], [5, 6], [9, 11], [7]]  # words the tiny tokenizer knows

    def read(decoder: torch.nn.Module) -> tuple[torch.Tensor, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            found = cached_item_vectors(decoder, known, model.pad_id, cache, "fixture", "same/path (float32)", 3)
        return found, next(r.getMessage() for r in caplog.records if "LLM item vectors" in r.getMessage())

    first, _ = read(again.decoder)
    with torch.no_grad():  # other weights under the same LLM path and name: the key changes, the vectors are recomputed
        again.decoder.layers[0].mlp.down_proj.weight.add_(0.05)
    changed, message = read(again.decoder)
    assert "(encoded)" in message and not torch.allclose(changed, first)
    assert "(cache hit)" in read(again.decoder)[1]
    assert vectors.shape == (model.n_items, model.llm_hidden_size)
    assert not vectors[0].any() and vectors[1:].abs().sum(1).gt(0).all()  # padding row only
    interaction = next(iter(test))[0]
    plain.eval(), model.eval()
    assert torch.allclose(model.full_sort_predict(interaction), plain.full_sort_predict(interaction), atol=1e-5)

    rows = model.prompts.title_ids[1:6]
    alone = mean_hidden_states(model.decoder, rows[:1], model.pad_id)
    batched = mean_hidden_states(model.decoder, rows, model.pad_id, batch_size=5)
    assert torch.allclose(torch.from_numpy(alone[0]), torch.from_numpy(batched[0]), atol=1e-5)  # padding does not leak

    fresh = _build(trained_backbone, tiny_llama_dir, llm_item_scoring=True, llm_cache_dir=cache)[1].eval()
    fresh.full_sort_predict(interaction)  # first asked for under inference mode (validation before training) ...
    fresh.train()
    sum(fresh.calculate_loss(next(iter(train)))).backward()  # ... and training still backpropagates through the term
    assert fresh.item_text_query.weight.grad is not None

    before = model.item_text_query.weight.detach().clone()
    losses = _train_steps(model, next(iter(train)), 10)
    assert not torch.equal(model.item_text_query.weight, before) and losses[-1] < losses[0]
    assert not [k for k in model.state_dict() if "vectors" in k]  # rebuilt from the cache, not stored in checkpoints
    # the vectors on titles the tiny tokenizer knows (the fixture's titles are all unknown words to it)
    _, ablation, _ = _build(trained_backbone, tiny_llama_dir, llm_item_scoring=True, prompt_reader="mlp", llm_cache_dir=cache)
    titles = [[], [5, 6], [9, 11], [7], [8, 10, 6], [3]]
    for built in (model, ablation):
        built.prompts.title_ids = titles
    raw = {"llm": torch.from_numpy(mean_hidden_states(model.decoder, titles, model.pad_id)),
           "mlp": torch.stack([ablation.embed_tokens.weight[ids].mean(0) if ids else torch.zeros(32) for ids in titles])}
    for built, reader in ((model, "llm"), (ablation, "mlp")):
        vectors, expected = built._item_text_vectors(), raw[reader][1:]
        assert torch.allclose(vectors[1:], (expected - expected.mean(0)) / expected.std(0), atol=1e-4)  # standardised
        assert not vectors[0].any()
    assert not torch.allclose(raw["llm"][1:], raw["mlp"][1:])  # the LLM's layers, not its input table alone


def test_mismatched_sizes_and_missing_backbone_are_clear_errors(trained_backbone, tiny_llama_dir):
    with pytest.raises(ValueError, match="llm_hidden_size is 64 but"):
        _build(trained_backbone, tiny_llama_dir, llm_hidden_size=64)
    with pytest.raises(ValueError, match="backbone_hidden_size is 32 but"):
        _build(trained_backbone, tiny_llama_dir, backbone_hidden_size=32)
    with pytest.raises(FileNotFoundError, match="backbone_checkpoint .* does not exist"):
        _build((trained_backbone[0], trained_backbone[1], "missing.pth"), tiny_llama_dir)
    with pytest.raises(ValueError, match="needs a trained AlignSASRec"):  # building the model directly
        _build((trained_backbone[0], trained_backbone[1], None), tiny_llama_dir)


def test_runs_through_recbole_trainer_and_reloads_its_small_best_checkpoint(trained_backbone, tiny_llama_dir):
    from pathlib import Path

    from recbole_llmalign.quick_start import run_with_cost

    data_path, name, checkpoint = trained_backbone
    config = cyclic_config(data_path, item_text_fields=["title", "genre"], backbone_checkpoint=checkpoint,
                           llm_path=str(tiny_llama_dir), llm_layers=2, train_batch_size=64, epochs=2, holdout_last_targets=0)
    result, cost = run_with_cost("AlignLLMRec", name, config_dict=config)
    assert cost.epochs == 2
    assert cost.extra["train_samples"] == 132  # without stacking: 10% of the 1,320 prefix samples the backbone trains on
    saved = newest_file("saved", "AlignLLMRec-*.pth")
    backbone_size = Path(checkpoint).stat().st_size
    assert saved.stat().st_size < backbone_size + 200_000  # trainables + config, no LLM copy
    from recbole_llmalign.quick_start import load_data_and_model
    from recbole_llmalign.trainer import AlignLLMRecTrainer

    loaded_config, loaded, _, _, _, test = load_data_and_model(saved)  # the small file alone rebuilds the model
    reloaded = AlignLLMRecTrainer(loaded_config, loaded).evaluate(test, load_best_model=False)["ndcg@5"]
    assert reloaded == pytest.approx(result["test_result"]["ndcg@5"], abs=1e-4)
    # starting from the backbone's ranking (zero head) and validated before training, it ends no worse than the backbone
    assert result["test_result"]["ndcg@5"] >= result["backbone_test_result"]["ndcg@5"] - 0.02


def test_validation_before_training_keeps_the_backbone_ranking_when_training_only_hurts(trained_backbone, tiny_llama_dir):
    """A huge learning rate wrecks the head; model selection must then fall back to the untrained
    (= backbone) ranking, and without the start validation it cannot."""
    from recbole_llmalign.quick_start import run_with_cost

    data_path, name, checkpoint = trained_backbone
    config = cyclic_config(data_path, item_text_fields=["title", "genre"], backbone_checkpoint=checkpoint,
                           llm_path=str(tiny_llama_dir), llm_layers=2, train_batch_size=64, epochs=1,
                           learning_rate=30.0, llm_align_weight=0.0)
    guarded, guarded_cost = run_with_cost("AlignLLMRec", name, config_dict=config)
    unguarded, unguarded_cost = run_with_cost("AlignLLMRec", name, config_dict={**config, "validate_before_training": False})
    from recbole_llmalign.trainer import AlignLLMRecTrainer

    untrained_config, untrained, (_, _, test) = _build(trained_backbone, tiny_llama_dir)  # ranks as the backbone
    backbone_ndcg = AlignLLMRecTrainer(untrained_config, untrained.eval()).evaluate(test, load_best_model=False)["ndcg@5"]
    assert guarded_cost.best_epoch == 0 and unguarded_cost.best_epoch == 1
    assert guarded["test_result"]["ndcg@5"] == pytest.approx(backbone_ndcg, abs=1e-4)
    assert unguarded["test_result"]["ndcg@5"] < backbone_ndcg


def test_cached_instruction_equals_running_the_instruction_inline(trained_backbone, tiny_llama_dir):
    """The reused key/values of the fixed text give the same final state as feeding the text every time."""
    _, model, (_, _, test) = _build(trained_backbone, tiny_llama_dir, use_layer_prefix=False, use_instruction_prefix=False)
    model.eval()
    interaction = next(iter(test))[0]
    seq, lengths = interaction[model.ITEM_SEQ][:1], interaction[model.ITEM_SEQ_LEN][:1]
    with torch.no_grad():
        cached_state, user = model.llm_states(seq, lengths)
        embeds, mask = model.prompt_embeddings(seq, lengths, user)
        instruction = model.decoder.embed_tokens(model.instruction_ids)
        inline = model.decoder(inputs_embeds=torch.cat([instruction, embeds], dim=1)).last_hidden_state[:, -1]
    assert torch.allclose(cached_state, inline, atol=1e-5)


def test_backbone_is_trained_once_and_reused_when_no_checkpoint_is_given(cyclic_dataset, tiny_llama_dir):
    from pathlib import Path

    from recbole_llmalign.quick_start import run_with_cost

    data_path, name = cyclic_dataset
    config = cyclic_config(data_path, item_text_fields=["title", "genre"], llm_path=str(tiny_llama_dir), llm_layers=1,
                           train_batch_size=64, backbone_epochs=2)
    first, _ = run_with_cost("AlignLLMRec", name, config_dict=dict(config))
    backbones = list(Path("saved/backbones").glob("AlignSASRec-cyclic-*.pth"))
    assert len(backbones) == 1
    stamp = backbones[0].stat().st_mtime_ns
    result, _ = run_with_cost("AlignLLMRec", name, config_dict=dict(config))
    assert backbones[0].stat().st_mtime_ns == stamp  # reused, not retrained
    assert result["test_result"] == first["test_result"]  # training the backbone first does not shift the seed


def test_backbone_cache_key_changes_with_the_backbones_yaml_defaults(cyclic_dataset, tiny_llama_dir, monkeypatch):
    """A cached backbone trained under other defaults (e.g. before ``unseen_items``) is not reused;
    an LLM-only key (the prompt) does not retrain it."""
    from recbole_llmalign import quick_start

    data_path, name = cyclic_dataset
    config = quick_start.Config(model="AlignLLMRec", dataset=name, config_dict=cyclic_config(
        data_path, item_text_fields=["title"], llm_path=str(tiny_llama_dir)))
    tuned = quick_start.Config(model="AlignLLMRec", dataset=name, config_dict=cyclic_config(
        data_path, item_text_fields=["title"], llm_path=str(tiny_llama_dir), eval_step=3, learning_rate=1e-3, stopping_step=4))
    tuned_shared, _ = quick_start.backbone_settings_and_key(tuned, "AlignSASRec")
    # the LLM training's schedule (keys its YAML sets) stays the LLM's; a key it does not set is shared
    assert "eval_step" not in tuned_shared and "learning_rate" not in tuned_shared and tuned_shared["stopping_step"] == 4
    keyed: dict = {}
    monkeypatch.setattr(quick_start, "config_key", lambda values: keyed.update(values) or "key")
    quick_start.backbone_settings_and_key(config, "AlignSASRec")
    # keys both models have (learning_rate, epochs: RecBole's) stay the backbone's; the LLM's own do not
    assert {"learning_rate", "epochs", "unseen_items"} <= set(keyed["backbone_defaults"])
    assert not {"prompt_template", "llm_path"} & set(keyed["backbone_defaults"])
    assert "init_checkpoint" not in keyed["backbone_defaults"]  # its fresh default trains as versions before it did
    monkeypatch.undo()
    shared, key = quick_start.backbone_settings_and_key(config, "AlignSASRec")
    assert quick_start.backbone_settings_and_key(config, "AlignSASRec") == (shared, key)  # stable
    real = quick_start.Config

    class OlderDefaults(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if kwargs.get("model") == "AlignSASRec":
                self.internal_config_dict["unseen_items"] = "negatives"

    class DatasetWordsThePrompt(real):  # a dataset YAML setting an LLM-only key, as the Amazon ones do
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.internal_config_dict["prompt_template"] = "User {user} recently bought {history}. Next:"

    monkeypatch.setattr(quick_start, "Config", DatasetWordsThePrompt)
    assert quick_start.backbone_settings_and_key(config, "AlignSASRec") == (shared, key)  # no weight changes
    monkeypatch.setattr(quick_start, "Config", OlderDefaults)
    older_shared, older_key = quick_start.backbone_settings_and_key(config, "AlignSASRec")
    assert older_shared == shared and older_key != key


def test_by_default_the_automatic_backbone_holds_out_last_targets_and_alignllmrec_trains_on_them(cyclic_dataset, tiny_llama_dir):
    from pathlib import Path

    from recbole_llmalign.compat import load_checkpoint
    from recbole_llmalign.quick_start import run_with_cost

    data_path, name = cyclic_dataset
    config = cyclic_config(data_path, item_text_fields=["title", "genre"], llm_path=str(tiny_llama_dir), llm_layers=1,
                           train_batch_size=64, backbone_epochs=2, denoise_samples=False)
    _, cost = run_with_cost("AlignLLMRec", name, config_dict=config)  # holdout_last_targets: 1 is the YAML default
    backbone = next(Path("saved/backbones").glob("AlignSASRec-cyclic-*.pth"))
    assert load_checkpoint(backbone, map_location="cpu")["config"]["holdout_last_targets"] == 1
    assert cost.extra["train_samples"] == 120  # one held-out sample (the last training target) per user


def test_stacking_is_a_ranking_recipe_and_labeled_pairs_ignore_it():
    import yaml

    from recbole_llmalign.config import model_property_files
    from recbole_llmalign.trainer import stacking_holdout
    from recbole_llmalign.utils import get_model

    assert stacking_holdout({"holdout_last_targets": 2}) == 2
    assert stacking_holdout({}) == 0  # AlignGenRec has no such key

    def default(model: str) -> int:
        values: dict = {}
        for file in model_property_files(get_model(model)):
            values.update(yaml.safe_load(file.read_text()))
        return stacking_holdout(values)

    assert default("AlignLLMRec") == 1 and default("AlignLLMRecCTR") == 0 and default("AlignGenRec") == 0


def test_stacking_on_a_backbone_that_fit_the_held_out_targets_warns_and_names_the_fix(trained_backbone, tiny_llama_dir,
                                                                                      caplog):
    import logging

    from recbole_llmalign.trainer import AlignLLMRecTrainer

    config, model, (train, _, _) = _build(trained_backbone, tiny_llama_dir, holdout_last_targets=1, denoise_samples=False)
    assert model.backbone_holdout == 0  # the fixture's backbone trained on every target
    with caplog.at_level(logging.WARNING):
        trainer = AlignLLMRecTrainer(config, model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "backbone_checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and "holdout_last_targets=0" in warnings[0] and "--holdout_last_targets=1" in warnings[0]
    assert len(trainer.select_samples(train._dataset)) == 120  # still one held-out sample per user: defined, not an error
    caplog.clear()
    model.backbone_holdout = 1  # a backbone trained the stacking way: no warning
    with caplog.at_level(logging.WARNING):
        AlignLLMRecTrainer(config, model)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and "backbone_checkpoint" in r.getMessage()]


@pytest.mark.slow
def test_real_smollm2_trains_and_ranks_on_the_fixture(trained_backbone, smollm2_available):
    from recbole_llmalign.quick_start import run_with_cost

    data_path, name, checkpoint = trained_backbone
    config = cyclic_config(data_path, item_text_fields=["title", "genre"], backbone_checkpoint=checkpoint,
                           llm_layers=2, train_batch_size=32, epochs=1)
    result, cost = run_with_cost("AlignLLMRec", name, config_dict=config)
    assert cost.epochs == 1
    # starting from the backbone's ranking (zero head) and validated before training, it ends no worse than the backbone
    assert result["test_result"]["ndcg@5"] >= result["backbone_test_result"]["ndcg@5"] - 0.02


@pytest.fixture
def tiny_t5_dir(tmp_path):
    """A randomly initialised 2-layer T5 (d_model 32) with a word-level tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = ["<pad>", "</s>", "<unk>", "yes", "no", "user", "item", "watched", "recommend", "the", "next", "movie"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    folder = tmp_path / "tiny-t5"
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_encoder_decoder_llm_is_refused_with_the_reason(trained_backbone, tiny_t5_dir):
    """Soft tokens, per-layer key/value prefixes and cached instruction key/values are decoder mechanisms."""
    with pytest.raises(ValueError, match="holds an encoder-decoder model, not a decoder-only causal LM"):
        _build(trained_backbone, tiny_t5_dir, use_layer_prefix=False, use_instruction_prefix=False)


def test_lora_adapter_is_saved_in_peft_format_and_loads_with_peft(trained_backbone, tiny_llama_dir, tmp_path):
    from peft import PeftModel

    from recbole_llmalign.llm.loader import load_causal_lm
    from recbole_llmalign.trainer import peft_adapter_dir

    _, model, _ = _build(trained_backbone, tiny_llama_dir, lora_r=2)
    with torch.no_grad():  # LoRA's B starts at zero; make the adapter change the output
        for name, parameter in model.llm.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    folder = peft_adapter_dir(tmp_path / "AlignLLMRec-test.pth")
    assert folder.name == "AlignLLMRec-test-lora"
    assert model.save_peft_adapter(folder)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    base = load_causal_lm(str(tiny_llama_dir), llm_layers=2).model
    reloaded = PeftModel.from_pretrained(base, folder).eval()
    ids = torch.tensor([[5, 6, 7, 9]])
    model.llm.eval()
    with torch.no_grad():
        ours, theirs = model.llm(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    with reloaded.disable_adapter(), torch.no_grad():
        assert not torch.allclose(reloaded(input_ids=ids).logits, ours, atol=1e-3)  # the adapter is what differs
    _, frozen, _ = _build(trained_backbone, tiny_llama_dir)
    assert not frozen.save_peft_adapter(tmp_path / "none") and not (tmp_path / "none").exists()


def test_rerank_top_n_rescores_only_the_backbones_top_n_from_its_order_and_learns(trained_backbone, tiny_llama_dir,
                                                                                   monkeypatch):
    """rerank_top_n: the backbone ranks every item, the LLM re-scores its top n (one candidate prompt each),
    starting from the backbone's order; nothing outside the top n moves; the listwise loss falls."""
    _, model, (train, _, test) = _build(trained_backbone, tiny_llama_dir, rerank_top_n=5)
    assert not hasattr(model, "ranking_head") and not model.rerank_head.weight.any()
    batch, train_batch = next(iter(test))[0], next(iter(train))
    seq, lengths = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]

    def backbone_order() -> tuple[torch.Tensor, torch.Tensor]:
        backbone = model.user_vectors(seq, lengths) @ model.item_side().scoring.T
        return backbone, model.rerank_candidates(backbone, seq)

    model.eval()
    backbone, top = backbone_order()
    assert torch.equal(top, backbone.scatter(1, torch.zeros_like(top[:, :1]), float("-inf")).topk(5).indices)  # its own top 5
    assert (top.unsqueeze(2) == seq.unsqueeze(1)).any()  # RecBole's protocol ranks history items too: so do the candidates
    _, skipping, _ = _build(trained_backbone, tiny_llama_dir, rerank_top_n=5, exclude_history_items=True)
    skipped = skipping.rerank_candidates(backbone, seq)
    assert not (skipped.unsqueeze(2) == seq.unsqueeze(1)).any()  # ... unless the evaluation ranks them last
    scores = model.full_sort_predict(batch)
    assert torch.equal(scores.gather(1, top).argsort(1, descending=True), torch.arange(5).expand_as(top))  # backbone order
    assert (scores.gather(1, top).min(1).values > scores.scatter(1, top, float("-inf")).max(1).values).all()  # top n first
    train_seq, train_lengths, targets = (train_batch[model.ITEM_SEQ], train_batch[model.ITEM_SEQ_LEN],
                                         train_batch[model.POS_ITEM_ID])
    picked = model.rerank_candidates(model.user_vectors(train_seq, train_lengths) @ model.item_side().scoring.T, train_seq)
    inside = (picked == targets.unsqueeze(1)).any(1)
    assert 0 < int(inside.sum()) < len(targets)  # the fixture has samples of both kinds
    # trained on the samples whose answer the backbone put in its top n, candidates exactly as in evaluation
    other = torch.where(inside, picked[:, 0], targets)  # every answer moved into the top n ...
    assert model.rerank_loss(train_seq, train_lengths, other).item() > 0
    model.cost_report.clear()
    misses = torch.where(inside, torch.zeros_like(targets), targets)[~inside]  # ... or none of them
    assert model.rerank_loss(train_seq[~inside], train_lengths[~inside], misses).item() == 0.0
    assert model.cost_report == {"rerank_train_samples": float((~inside).sum()), "rerank_train_samples_used": 0.0}

    losses = _train_steps(model, train_batch, 30)
    assert sum(losses[-5:]) / 5 < losses[0] and model.rerank_head.weight.any()
    model.eval()
    scores = model.full_sort_predict(batch)
    outside = torch.ones_like(scores, dtype=torch.bool).scatter(1, top, False)
    assert torch.allclose(scores[outside], backbone_order()[0][outside], atol=1e-5)  # the rest keeps the backbone's scores
    assert (scores.gather(1, top).min(1).values > scores.masked_fill(~outside, float("-inf")).max(1).values).all()

    _, twin, _ = _build(trained_backbone, tiny_llama_dir, rerank_top_n=5, prompt_reader="mlp")  # the no_llm twin

    def no_llm(*args, **kwargs):
        raise AssertionError("the no_llm re-ranker ran the LLM")

    monkeypatch.setattr(twin.decoder, "forward", no_llm)
    assert twin.pooling_reader.net[0].in_features == 6 * twin.llm_hidden_size  # the candidate pooled on its own
    twin_losses = _train_steps(twin, train_batch, 30)
    assert sum(twin_losses[-5:]) / 5 < twin_losses[0], twin_losses  # its MLP has dropout: the loss falls on average
    with pytest.raises(ValueError, match="does not combine with llm_item_scoring"):
        _build(trained_backbone, tiny_llama_dir, rerank_top_n=5, llm_item_scoring=True)
    with pytest.raises(ValueError, match="rerank_top_n is 500 but the dataset has"):
        _build(trained_backbone, tiny_llama_dir, rerank_top_n=500)
