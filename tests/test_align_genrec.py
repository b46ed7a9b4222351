"""AlignGenRec: unique item codes, the trie, task prompts, learning a fixed next item, checkpoints, top-K cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import recbole_llmalign  # noqa: F401
from recbole_llmalign.llm.codebook import CodeTrie, collision_rate, fit_codebook, resolve_collisions
from tests.conftest import cyclic_config

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_codebook_codes_are_unique_and_report_collisions():
    torch.manual_seed(0)
    centers = torch.randn(6, 16)
    vectors = centers.repeat_interleave(20, dim=0) + 0.01 * torch.randn(120, 16)  # 6 tight clusters of 20
    result = fit_codebook(vectors, None, None, levels=2, codes_per_level=8, latent_dim=8, steps=50, show_progress=False)
    assert result.codes.shape[0] == 120
    assert collision_rate(result.codes) == 0.0 and result.report["collision_rate_after"] == 0.0
    assert result.report["collision_rate_before"] > 0  # 8 x 8 codes for near-duplicate items must collide first
    for level in range(result.codes.size(1)):
        assert result.codes[:, level].max() < result.codes_per_level[level]
    assert result.report["level0_usage"] >= 4 / 8  # the first level tells most of the 6 clusters apart
    assert result.report["reconstruction_mse"] < vectors.var(0).mean().item()  # better than predicting the mean item


def test_the_same_fit_gives_the_same_codes_on_two_threads():
    """Indexing's gradient accumulated in thread order: two runs of one config coded items differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(0)
        vectors, targets = torch.randn(2420, 128, generator=generator), torch.randn(2420, 96, generator=generator)
        has_text = torch.ones(2420, dtype=torch.bool)
        first, second = (fit_codebook(vectors, targets, has_text, steps=100, show_progress=False) for _ in range(2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first.codes, second.codes) and first.report == second.report


def test_resolution_uses_distinct_last_codes_before_adding_a_level():
    codes = torch.tensor([[1, 2], [1, 2], [1, 2], [0, 0]])
    residual, book = torch.randn(4, 3), torch.randn(4, 3)
    unique, per_level, moved = resolve_collisions(codes, residual, book)
    assert unique.shape == (4, 2) and per_level == [4, 4] and moved >= 2  # a group of 3 fits into 4 last-level codes
    assert collision_rate(unique) == 0 and (unique[:, 0] == codes[:, 0]).all()
    crowded = torch.zeros(6, 2, dtype=torch.long)  # 6 items, one group, only 4 last-level codes
    unique, per_level, _ = resolve_collisions(crowded, torch.randn(6, 3), torch.randn(4, 3))
    assert unique.shape == (6, 3) and per_level == [4, 4, 2] and collision_rate(unique) == 0  # ceil(6 / 4) chunks
    single, per_level, _ = resolve_collisions(torch.zeros(5, 1, dtype=torch.long), torch.randn(5, 3), torch.randn(4, 3))
    assert per_level == [4, 2] and collision_rate(single) == 0  # one level: the whole catalog is one group


def test_trie_allows_only_prefixes_of_real_items():
    codes = torch.tensor([[0, 1, 2], [0, 1, 3], [2, 0, 0], [3, 3, 1]])
    trie = CodeTrie(codes, torch.tensor([10, 11, 12, 13]), [4, 4, 4])
    assert trie.allowed(torch.zeros(1, 0, dtype=torch.long))[0].tolist() == [True, False, True, True]
    assert trie.allowed(torch.tensor([[0, 1], [2, 0], [1, 1]])).tolist() == [
        [False, False, True, True], [True, False, False, False], [False, False, False, False]]
    assert trie.items(torch.tensor([[0, 1, 3], [3, 3, 1], [0, 1, 0]])).tolist() == [11, 13, -1]
    # exhaustive walk: every path the trie allows ends at an item
    for a in trie.allowed(torch.zeros(1, 0, dtype=torch.long))[0].nonzero().flatten().tolist():
        for b in trie.allowed(torch.tensor([[a]]))[0].nonzero().flatten().tolist():
            for c in trie.allowed(torch.tensor([[a, b]]))[0].nonzero().flatten().tolist():
                assert trie.items(torch.tensor([[a, b, c]])).item() >= 10
    with pytest.raises(ValueError, match="not unique"):
        CodeTrie(torch.tensor([[0, 1], [0, 1]]), torch.tensor([1, 2]), [2, 2])


def _config(trained_backbone, tiny_llama_dir, **overrides):
    data_path, name, checkpoint = trained_backbone
    settings = dict(item_text_fields=["title", "genre"], backbone_checkpoint=checkpoint, llm_path=str(tiny_llama_dir),
                    llm_layers=2, codebook_levels=3, codebook_size=4, train_batch_size=32, beam_size=10, topk=[1, 5],
                    metrics=["Hit", "NDCG"], valid_metric="Hit@1", lora_target_modules=ALL_LINEAR, train_sample_budget=1.0,
                    learning_rate=0.003)
    settings.update(overrides)
    return name, cyclic_config(data_path, **settings)


def _build(trained_backbone, tiny_llama_dir, fit: bool = True, **overrides):
    """The model as the trainer receives it, with its item tokenizer fitted (as the trainer does) when ``fit``."""
    from recbole.data import create_dataset, data_preparation

    from recbole_llmalign.config import Config
    from recbole_llmalign.utils import get_model

    name, settings = _config(trained_backbone, tiny_llama_dir, **overrides)
    config = Config(model="AlignGenRec", dataset=name, config_dict=settings)
    data = data_preparation(config, create_dataset(config))
    model = get_model("AlignGenRec")(config, data[0]._dataset)
    if fit:
        model.fit_item_tokenizer(config)
    return config, model, data


def test_task_prompts_carry_codes_titles_and_negatives(trained_backbone, tiny_llama_dir):
    _, model, _ = _build(trained_backbone, tiny_llama_dir)
    generator = torch.Generator().manual_seed(0)
    sequence, target = [3, 4, 5, 0], 6
    prompt, answer = model.training_sample("sequential", sequence, 3, target, generator)
    assert answer == model.item_code_tokens(target)
    history = [t for item in (3, 4, 5) for t in model.item_code_tokens(item)]
    assert all(token in prompt for token in history)
    assert all(t >= model.first_code_id for t in answer) and len(answer) == model.item_codes.size(1)
    prompt, answer = model.training_sample("code_to_title", sequence, 3, target, generator)
    assert answer[:-1] == model.title_ids[target] and answer[-1] == model.eos_id
    assert model.item_code_tokens(target)[0] in prompt
    prompt, answer = model.training_sample("title_to_code", sequence, 3, target, generator)
    assert model.title_ids[target][0] in prompt and answer == model.item_code_tokens(target)
    prompt, _ = model.training_sample("negative", sequence, 3, target, generator)
    assert len([t for t in prompt if t >= model.first_code_id]) == (3 + model.negative_items) * model.item_codes.size(1)
    # the user's collaborative soft token opens the history and carries the projected backbone vector
    from recbole_llmalign.model.align_genrec import USER_TOKEN

    prompt, _ = model.training_sample("sequential", sequence, 3, target, generator)
    assert prompt.count(USER_TOKEN) == 1
    model.eval()
    users = model.user_vectors(torch.tensor([sequence]), torch.tensor([3]))
    embeds = model.embed(torch.tensor([prompt]), users)
    assert torch.allclose(embeds[0, prompt.index(USER_TOKEN)], model.user_projector(users)[0])
    # every code token renders as one added tokenizer token
    assert model.tokenizer.convert_tokens_to_ids(model.code_string(target)[:5]) >= model.first_code_id


def test_generation_only_yields_real_items_and_learns_a_fixed_next_item(trained_backbone, tiny_llama_dir):
    from recbole_llmalign.quick_start import run_with_cost

    name, settings = _config(trained_backbone, tiny_llama_dir, epochs=10, task_weights={"sequential": 1.0})
    result, cost = run_with_cost("AlignGenRec", name, config_dict=settings)
    # cyclic fixture: the next item is always the last one + 1; chance HR@1 is 1/30
    assert result["test_result"]["hit@1"] >= 0.9, result["test_result"]

    from recbole_llmalign.quick_start import load_data_and_model
    from recbole_llmalign.trainer import peft_adapter_dir

    assert (peft_adapter_dir(cost.checkpoint) / "adapter_model.safetensors").is_file()  # LoRA r=8: peft's format beside it
    config, model, dataset, _, _, test = load_data_and_model(cost.checkpoint)
    batch = next(iter(test))[0]
    items, scores = model.generate(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    assert ((items >= 1) & (items < dataset.item_num)).all()  # 30 items fill 10 beams: no empty beam
    assert model.cost_report["beams_real_share"] == 1.0 and model.cost_report["beams_generated"] == items.numel()
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    codes = model.item_codes[items.flatten()]
    assert len(torch.unique(codes, dim=0)) == len(torch.unique(items.flatten()))
    full = model.full_sort_predict(batch)
    assert (full > model.floor).sum(1).eq(items.size(1)).all()
    # "model" scoring keeps the probability mass training gave invalid codes; renormalizing over the
    # trie's valid continuations can only raise an item's score
    assert model.beam_scoring == "model"
    model.beam_scoring = "renormalized"
    renormalized = model.full_sort_predict(batch)
    both = (full > model.floor) & (renormalized > model.floor)
    assert both.any()
    assert (renormalized[both] >= full[both] - 1e-5).all()
    assert (renormalized[both] > full[both] + 1e-5).any()

    # sampled evaluation: predict gives each candidate its exact code log-likelihood, the score the
    # beam ranked it by, without searching (generate must not run)
    seq, lengths = batch[model.ITEM_SEQ][:6], batch[model.ITEM_SEQ_LEN][:6]
    for scoring in ("model", "renormalized"):
        model.beam_scoring = scoring
        items, scores = model.generate(seq, lengths)
        for column in (0, 3, items.size(1) - 1):
            exact = model.code_log_likelihood(seq, lengths, items[:, column])
            assert torch.allclose(exact, scores[:, column], atol=1e-4)
    model.generate = lambda *args, **kwargs: pytest.fail("predict ran a beam search")
    candidates = torch.tensor([items[0, 0].item(), items[0, -1].item(), 1, 2, 3])
    pairs = {model.ITEM_SEQ: seq[:1].expand(5, -1), model.ITEM_SEQ_LEN: lengths[:1].expand(5), model.ITEM_ID: candidates}
    paired = model.predict(pairs)
    assert paired.shape == (5,) and paired[0] == paired.max() and paired[0] > paired[1]  # the beam's best first


def test_checkpoint_holds_trainables_and_codes_and_loading_never_refits(trained_backbone, tiny_llama_dir, tmp_path,
                                                                          monkeypatch):
    config, model, (_, _, test) = _build(trained_backbone, tiny_llama_dir)
    state = model.state_dict()
    assert {"item_codes", "code_level_sizes", "code_embeddings"} <= set(state)
    assert not any(k.startswith(("fit_backbone.", "refit_backbone.")) for k in state)
    assert any(n.startswith("fit_backbone.") for n, _ in model.named_parameters())  # the backbone's prefix
    assert not any("lora" not in k for k in state if k.startswith("llm."))  # no frozen LLM weight
    torch.save(state, tmp_path / "genrec.pth")
    assert (tmp_path / "genrec.pth").stat().st_size < 2_000_000

    import recbole_llmalign.model.align_genrec as module

    def refit(*args, **kwargs):
        raise AssertionError("the item tokenizer was refitted")

    monkeypatch.setattr(module, "fit_codebook", refit)
    # built with another codebook layout and never fitted: the checkpoint's codes define the layout
    _, loaded, _ = _build(trained_backbone, tiny_llama_dir, fit=False, codebook_levels=2)
    assert not loaded.has_item_codes  # the constructor fits nothing
    with pytest.raises(RuntimeError, match="item tokenizer is not fitted"):
        loaded.generate(torch.tensor([[1, 2, 0]]), torch.tensor([2]))
    loaded.load_state_dict(torch.load(tmp_path / "genrec.pth"))
    assert torch.equal(loaded.item_codes, model.item_codes) and loaded.codes_per_level == model.codes_per_level
    model.eval()
    loaded.eval()
    batch = next(iter(test))[0]
    assert torch.allclose(model.full_sort_predict(batch), loaded.full_sort_predict(batch), atol=1e-5)
    # a checkpoint from before code_level_sizes was stored loads too (L levels of codebook_size codes)
    _, legacy, _ = _build(trained_backbone, tiny_llama_dir, fit=False)
    legacy.load_state_dict({k: v for k, v in state.items() if k != "code_level_sizes"})
    assert legacy.codes_per_level == model.codes_per_level
    wrong_items = {**state, "item_codes": state["item_codes"][:-1]}
    with pytest.raises(RuntimeError, match="codes for 30 items, this dataset has 31"):
        legacy.load_state_dict(wrong_items)


def test_bad_settings_are_refused(trained_backbone, tiny_llama_dir):
    with pytest.raises(ValueError, match="beam_size"):
        _build(trained_backbone, tiny_llama_dir, beam_size=3, topk=[5])
    with pytest.raises(ValueError, match="unknown tasks"):
        _build(trained_backbone, tiny_llama_dir, task_weights={"sequentail": 1.0})
    with pytest.raises(ValueError, match="must contain"):
        _build(trained_backbone, tiny_llama_dir, sequential_template="no slot here")
    with pytest.raises(ValueError, match="beam_scoring"):
        _build(trained_backbone, tiny_llama_dir, beam_scoring="length_normalized")


def test_topk_cache_round_trip_and_stale_cache_refused(trained_backbone, tiny_llama_dir, tmp_path):
    from recbole_llmalign.quick_start import load_data_and_model, run_with_cost
    from recbole_llmalign.recommend import recommend_from_cache
    from recbole_llmalign.serving import TopKCache, precompute_topk

    name, settings = _config(trained_backbone, tiny_llama_dir, epochs=1)
    _, cost = run_with_cost("AlignGenRec", name, config_dict=settings)
    loaded = load_data_and_model(cost.checkpoint)
    dataset = loaded[2]
    path = precompute_topk(cost.checkpoint, tmp_path / "topk.pth", topk=5, loaded=loaded, show_progress=False)
    cache = TopKCache(path, model_file=cost.checkpoint, dataset=dataset)
    assert len(cache) == dataset.user_num - 1
    row = cache.lookup("u1")
    assert len(row) == 5 and all(item in dataset.field2token_id["item_id"] for item, _ in row)
    assert [s for _, s in row] == sorted((s for _, s in row), reverse=True)
    shown = recommend_from_cache(cost.checkpoint, str(path), "u1", topk=3)
    assert shown.item_ids == [item for item, _ in row[:3]]

    other = tmp_path / "other.pth"  # another checkpoint: same model class, different weights
    checkpoint = torch.load(cost.checkpoint, weights_only=False)
    checkpoint["state_dict"]["code_embeddings"] = checkpoint["state_dict"]["code_embeddings"] + 1
    torch.save(checkpoint, other)
    with pytest.raises(ValueError, match="stale"):
        TopKCache(path, model_file=other)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable|corrupt"):
        TopKCache(broken)
    with pytest.raises(KeyError, match="no cached top-K"):
        cache.lookup("nobody")
    # a cache from an older format (lists made under other inference rules) is refused, not trusted
    from recbole_llmalign.serving import FORMAT_VERSION, _payload_hash

    payload = torch.load(path, weights_only=True)
    assert "beam_scoring=model" in payload["generation"]
    payload["format"] = FORMAT_VERSION - 1
    payload["payload_sha256"] = _payload_hash(payload)
    older = tmp_path / "older.pth"
    torch.save(payload, older)
    with pytest.raises(ValueError, match="another format"):
        TopKCache(older, model_file=cost.checkpoint)
    assert not list(Path(tmp_path).glob("*.tmp"))


def test_items_the_training_split_never_shows_are_coded_from_their_text(trained_backbone, tiny_llama_dir):
    """An untrained item's random ID row never reaches the tokenizer: its ID half is read off the trained
    items with the closest text, so its code is the same whatever that row holds, and it can be generated."""
    import torch.nn.functional as F

    from recbole_llmalign.data.item_text import training_pairs
    from recbole_llmalign.model.align_genrec import text_only_item_vectors

    ids = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [5.0, 5.0]])
    fused = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.1, 1.0]])  # item 3 reads like item 1, then item 0
    trained = torch.tensor([True, True, True, False])
    out = text_only_item_vectors(ids, fused, trained, neighbours=1)
    assert torch.equal(out[:3], ids[:3])  # trained rows untouched
    assert torch.allclose(out[3], torch.tensor([0.0, 2.0]))  # item 1's direction, at the trained rows' mean norm
    noisy = ids.clone()
    noisy[3] = torch.tensor([-7.0, 3.0])
    assert torch.equal(text_only_item_vectors(noisy, fused, trained, neighbours=1), out)
    assert torch.allclose(text_only_item_vectors(ids, fused, trained, neighbours=2)[3],
                          F.normalize(torch.tensor([1.0, 1.0]), dim=0) * 2)  # the mean of the two nearest

    rows = [torch.randn(16, generator=torch.Generator().manual_seed(s)) * 5 for s in (1, 2)]  # two random ID rows
    built = []
    for row in rows:
        config, model, (train, _, _) = _build(trained_backbone, tiny_llama_dir, fit=False)
        seen = {item for _, item in training_pairs(train._dataset)}
        assert model.trained_items.nonzero().squeeze(1).tolist() == sorted(seen - {0})
        model.trained_items[7] = False  # as if the training split never showed item 7
        with torch.no_grad():
            model.backbone.item_embedding.weight[7] = row
        model.fit_item_tokenizer(config)
        built.append(model)
    assert built[0].cost_report["tokenizer_text_only_items"] == 1
    assert torch.equal(built[0].item_codes[7], built[1].item_codes[7])  # its code follows from its text alone
    assert built[0].trie.items(built[0].item_codes[7:8]).tolist() == [7]  # a full code of the trie: it can be generated


def test_from_scratch_baseline_trains_every_llm_weight_and_keeps_them_in_its_checkpoint(trained_backbone, tiny_llama_dir):
    """llm_init: scratch (the TIGER-style baseline): the same code model with fresh weights, all trained."""
    _, model, (train, _, _) = _build(trained_backbone, tiny_llama_dir, llm_init="scratch", lora_r=0)
    llm_weights = {n for n, p in model.named_parameters() if n.startswith("llm.")}
    assert llm_weights and all(p.requires_grad for n, p in model.named_parameters() if n in llm_weights)
    assert llm_weights <= set(model.state_dict())  # rebuilt at random on load: the checkpoint must carry them
    weight = dict(model.named_parameters())["llm.model.layers.0.mlp.down_proj.weight"]
    before = weight.detach().clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    loss = model.calculate_loss(next(iter(train)))
    sum(loss).backward() if isinstance(loss, tuple) else loss.backward()
    optimizer.step()
    assert not torch.equal(weight, before)
