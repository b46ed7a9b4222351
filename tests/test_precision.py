"""Precision of the LLM path: ``llm_dtype: auto`` per device, autocast only for low-precision weights,
heads and losses in float32, and the same results when the LLM runs in another dtype than the heads.

A CPU has no bf16 units, so the GPU's bfloat16 is stood in for twice: float64 LLM weights (the same
code path, a dtype other than the heads', exact enough to compare tightly with float32) and
bfloat16 weights under CPU autocast (the GPU's dtype plumbing, compared loosely).
"""

from __future__ import annotations

import logging

import pytest
import torch

import recbole_llmalign  # noqa: F401
from recbole_llmalign.llm.loader import load_causal_lm, resolve_llm_dtype
from tests.conftest import cyclic_config


def _cuda(monkeypatch, available: bool, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


def test_auto_is_float32_on_a_cpu(monkeypatch):
    _cuda(monkeypatch, available=False, bf16=False)
    assert resolve_llm_dtype("auto") is torch.float32
    assert resolve_llm_dtype("auto", torch.device("cpu")) is torch.float32


def test_auto_is_bfloat16_on_a_cuda_device_with_bf16_and_the_run_device_decides(monkeypatch):
    _cuda(monkeypatch, available=True, bf16=True)
    assert resolve_llm_dtype("auto") is torch.bfloat16
    assert resolve_llm_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert resolve_llm_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_llm_dtype("auto", torch.device("cpu")) is torch.float32  # gpu_id '' on a GPU machine runs on the CPU


def test_auto_on_a_cuda_device_without_bf16_is_float32_and_says_so(monkeypatch, caplog):
    _cuda(monkeypatch, available=True, bf16=False)
    with caplog.at_level(logging.WARNING, logger="recbole_llmalign.llm.loader"):
        assert resolve_llm_dtype("auto", "cuda") is torch.float32
    assert "no bfloat16 support" in caplog.text and "float16" in caplog.text


def test_named_dtypes_pass_and_a_bad_name_is_refused():
    assert resolve_llm_dtype("bfloat16") is torch.bfloat16
    assert resolve_llm_dtype("float16") is torch.float16
    assert resolve_llm_dtype("float32", "cuda") is torch.float32  # a named dtype is never changed
    assert resolve_llm_dtype(torch.float64) is torch.float64
    for bad in ("fp32", "int8", "bool"):
        with pytest.raises(ValueError, match="llm_dtype must be auto or a floating torch dtype"):
            resolve_llm_dtype(bad)


def test_the_loader_resolves_auto_for_the_device_it_is_given(tiny_llama_dir, monkeypatch):
    def dtypes(loaded) -> set[torch.dtype]:
        return {p.dtype for p in loaded.model.parameters()}

    assert dtypes(load_causal_lm(str(tiny_llama_dir))) == {torch.float32}  # this CPU machine
    _cuda(monkeypatch, available=True, bf16=True)
    assert dtypes(load_causal_lm(str(tiny_llama_dir))) == {torch.bfloat16}  # a bf16 GPU machine
    assert dtypes(load_causal_lm(str(tiny_llama_dir), device="cpu")) == {torch.float32}
    assert dtypes(load_causal_lm(str(tiny_llama_dir), dtype="float32")) == {torch.float32}


# ---- the models ----

def _model(name: str, trained_backbone, tiny_llama_dir, llm_dtype: str, **overrides):
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_llmalign.config import Config
    from recbole_llmalign.utils import get_model

    data_path, dataset, checkpoint = trained_backbone
    settings = dict(item_text_fields=["title", "genre"], backbone_checkpoint=checkpoint, llm_path=str(tiny_llama_dir),
                    llm_layers=2, train_batch_size=16, llm_micro_batch=8, llm_dtype=llm_dtype)
    if name == "AlignGenRec":
        settings.update(codebook_levels=2, codebook_size=8, codebook_steps=30, beam_size=5, topk=[5])
    settings.update(overrides)
    config = Config(model=name, dataset=dataset, config_dict=cyclic_config(data_path, **settings))
    train, _, test = data_preparation(config, create_dataset(config))
    init_seed(2020, True)  # the same trainable initialisation for every dtype
    model = get_model(name)(config, train._dataset)
    if name == "AlignGenRec":
        model.fit_item_tokenizer(config)
    return model, next(iter(train)), next(iter(test))[0]


def _loss(model, batch) -> torch.Tensor:
    losses = model.calculate_loss(batch)
    return sum(losses) if isinstance(losses, tuple) else losses


def _ndcg_at_5(scores: torch.Tensor, targets: torch.Tensor) -> float:
    scores = scores.clone()
    scores[:, 0] = -torch.inf
    rank = (scores > scores.gather(1, targets.unsqueeze(1))).sum(1)
    return float(torch.where(rank < 5, 1 / torch.log2(rank.float() + 2), torch.zeros_like(rank, dtype=torch.float)).mean())


def test_float32_weights_run_without_autocast_and_bf16_weights_under_it(trained_backbone, tiny_llama_dir):
    for llm_dtype, autocast in (("auto", False), ("float32", False), ("bfloat16", True)):
        model, _, _ = _model("AlignGenRec", trained_backbone, tiny_llama_dir, llm_dtype)
        assert model.embed_tokens.weight.dtype == (torch.bfloat16 if autocast else torch.float32)
        with model.llm_autocast():
            assert torch.is_autocast_enabled("cpu") is autocast
            if autocast:
                assert torch.get_autocast_dtype("cpu") is torch.bfloat16
        assert model.code_embeddings.dtype is torch.float32  # trainables stay float32 whatever the LLM's dtype


@pytest.mark.parametrize("name", ["AlignLLMRec", "AlignGenRec"])
def test_an_llm_in_float64_gives_the_float32_results(name, trained_backbone, tiny_llama_dir):
    """The stand-in for bf16 on a GPU: the LLM in a dtype other than the heads', here exact enough to
    compare tightly: the same losses, scores and NDCG@5, before and after one Adam step."""
    runs = {}
    for llm_dtype in ("float32", "float64"):
        model, train_batch, test_batch = _model(name, trained_backbone, tiny_llama_dir, llm_dtype)
        assert model.embed_tokens.weight.dtype == getattr(torch, llm_dtype)
        model.eval()  # no dropout: the two runs see the same computation
        loss = _loss(model, train_batch)
        assert loss.dtype is torch.float32  # the loss is float32 whatever dtype the LLM ran in
        before = model.full_sort_predict(test_batch)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        optimizer.zero_grad()
        loss.backward()
        heads = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("llm.")]  # LoRA follows peft's dtype
        assert heads and all(p.dtype is torch.float32 and (p.grad is None or p.grad.dtype is torch.float32) for p in heads)
        optimizer.step()
        with torch.no_grad():
            after_loss = _loss(model, train_batch)
        runs[llm_dtype] = (loss.detach(), after_loss, before, model.full_sort_predict(test_batch), test_batch[model.POS_ITEM_ID])
    (loss32, step32, before32, after32, targets), (loss64, step64, before64, after64, _) = runs["float32"], runs["float64"]
    assert before32.dtype is torch.float32 and before64.dtype is torch.float32
    assert torch.allclose(loss32, loss64, rtol=1e-5) and torch.allclose(step32, step64, rtol=1e-4)
    assert not torch.allclose(loss32, step32)  # the step changed the model: the comparison is not vacuous
    assert torch.allclose(before32, before64, rtol=1e-4, atol=1e-4)
    if name == "AlignGenRec":  # beam search cuts at the beam width: items tied at the cut may fall either side, nothing else moves
        generated32, generated64 = after32 > model.floor, after64 > model.floor
        assert (generated32.sum(1) == generated64.sum(1)).all()  # the same number of beams per user
        kept32 = after32.masked_fill(~generated32, -torch.inf).sort(1, descending=True).values[:, :int(generated32.sum(1).max())]
        kept64 = after64.masked_fill(~generated64, -torch.inf).sort(1, descending=True).values[:, :int(generated64.sum(1).max())]
        assert torch.allclose(kept32, kept64, rtol=1e-4, atol=1e-4)  # the same beam scores, rank by rank
        cut32 = kept32.masked_fill(kept32.isinf(), torch.inf).min(1, keepdim=True).values
        cut = cut32.expand_as(after32)  # an item kept by one run only must sit at that user's cut, tied with what the other kept
        only32, only64 = generated32 & ~generated64, generated64 & ~generated32
        assert torch.allclose(after32[only32], cut[only32], rtol=1e-4, atol=1e-4)
        assert torch.allclose(after64[only64], cut[only64], rtol=1e-4, atol=1e-4)
        both = generated32 & generated64
        assert both.sum() >= 0.9 * generated32.sum()  # the comparison covers most beams
        assert torch.allclose(after32[both], after64[both], rtol=1e-4, atol=1e-4)
    else:
        assert torch.allclose(after32, after64, rtol=1e-4, atol=1e-4)
        assert _ndcg_at_5(after32, targets) == pytest.approx(_ndcg_at_5(after64, targets), abs=1e-6)


@pytest.mark.parametrize("name", ["AlignLLMRec", "AlignGenRec"])
def test_bfloat16_weights_under_autocast_train_in_float32_and_stay_close(name, trained_backbone, tiny_llama_dir):
    """The GPU's dtype plumbing on a CPU: bf16 weights, autocast, float32 trainables, heads and loss."""
    model32, train_batch, test_batch = _model(name, trained_backbone, tiny_llama_dir, "float32")
    model16, _, _ = _model(name, trained_backbone, tiny_llama_dir, "bfloat16")
    for model in (model32, model16):
        model.eval()
    loss32, loss16 = _loss(model32, train_batch), _loss(model16, train_batch)
    assert loss16.dtype is torch.float32 and torch.isfinite(loss16)
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.05)
    loss16.backward()
    heads = {n: p for n, p in model16.named_parameters() if p.requires_grad and not n.startswith("llm.")}
    assert heads and all(p.dtype is torch.float32 for p in heads.values())
    grads = {n: p.grad for n, p in model16.named_parameters() if p.requires_grad and p.grad is not None}
    assert all(g.dtype is p.dtype and torch.isfinite(g).all() for g, p in zip(grads.values(), (dict(model16.named_parameters())[n] for n in grads)))
    assert sum(float(g.abs().sum()) for n, g in grads.items() if not n.startswith("llm.")) > 0
    if name == "AlignGenRec":
        assert any("lora_" in n for n in grads) and grads["code_embeddings"].dtype is torch.float32
    scores = model16.full_sort_predict(test_batch)
    assert scores.dtype is torch.float32 and torch.isfinite(scores).all()
