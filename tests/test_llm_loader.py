"""LLM loading: local folders, layer cuts, frozen base, LoRA, clear errors; the shipped GGUF (slow)."""

from __future__ import annotations

import time

import pytest
import torch

from recbole_llmalign.llm import load_causal_lm
from recbole_llmalign.llm.loader import CONVERTED_NAME, _folder_is_valid


def test_loads_local_folder_cut_to_first_layers_and_frozen(tiny_llama_dir):
    loaded = load_causal_lm(str(tiny_llama_dir), llm_layers=2)
    assert (loaded.hidden_size, loaded.num_layers) == (32, 2)
    assert loaded.trainable_names == []
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.padding_side == "left"
    ids = loaded.tokenizer(["user watched the movie"], return_tensors="pt")
    hidden = loaded.model(**ids, output_hidden_states=True).hidden_states
    assert len(hidden) == 3 and hidden[-1].shape == (1, 4, 32)


def test_lora_adds_trainable_adapters_only(tiny_llama_dir):
    loaded = load_causal_lm(str(tiny_llama_dir), lora_r=4, lora_target_modules=("q_proj", "v_proj"))
    assert loaded.trainable_names and all("lora_" in name for name in loaded.trainable_names)
    base = [p for n, p in loaded.model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in base)


def test_scratch_init_is_the_same_architecture_with_fresh_trainable_weights(tiny_llama_dir):
    pretrained = load_causal_lm(str(tiny_llama_dir), llm_layers=2)
    torch.manual_seed(1)
    scratch = load_causal_lm(str(tiny_llama_dir), llm_layers=2, init="scratch")
    torch.manual_seed(1)
    again = load_causal_lm(str(tiny_llama_dir), llm_layers=2, init="scratch")
    shapes = {n: p.shape for n, p in pretrained.model.named_parameters()}
    assert {n: p.shape for n, p in scratch.model.named_parameters()} == shapes and scratch.num_layers == 2
    assert all(p.requires_grad for p in scratch.model.parameters()) and len(scratch.trainable_names) == len(shapes)
    weight = "model.layers.0.self_attn.q_proj.weight"
    trained = dict(pretrained.model.named_parameters())[weight]
    assert not torch.allclose(dict(scratch.model.named_parameters())[weight], trained)  # not the folder's weights
    assert torch.equal(dict(scratch.model.named_parameters())[weight], dict(again.model.named_parameters())[weight])  # seeded
    assert scratch.tokenizer.get_vocab() == pretrained.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="set lora_r=0"):
        load_causal_lm(str(tiny_llama_dir), init="scratch", lora_r=4)
    with pytest.raises(ValueError, match="llm_init must be one of"):
        load_causal_lm(str(tiny_llama_dir), init="random")


def test_missing_llm_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a model folder"):
        load_causal_lm(str(tmp_path / "nowhere"))


def test_non_causal_model_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a decoder-only causal LM"):
        load_causal_lm(str(tmp_path / "bert"))


def test_too_many_layers_requested(tiny_llama_dir):
    with pytest.raises(ValueError, match="has only 3 layers"):
        load_causal_lm(str(tiny_llama_dir), llm_layers=5)


@pytest.mark.slow
def test_shipped_smollm2_converts_once_and_reloads_from_the_verified_cache(tmp_path, smollm2_available):
    start = time.perf_counter()
    first = load_causal_lm("default", cache_dir=tmp_path, llm_layers=4)
    converted = time.perf_counter() - start
    assert (first.hidden_size, first.num_layers) == (576, 4)
    assert _folder_is_valid(tmp_path / CONVERTED_NAME)
    start = time.perf_counter()
    second = load_causal_lm("default", cache_dir=tmp_path)
    assert second.num_layers == 30 and time.perf_counter() - start < converted
    prompt = second.tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = second.model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    # A damaged conversion is detected and redone.
    weights = next((tmp_path / CONVERTED_NAME).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    assert not _folder_is_valid(tmp_path / CONVERTED_NAME)
    load_causal_lm("default", cache_dir=tmp_path, llm_layers=1)
    assert _folder_is_valid(tmp_path / CONVERTED_NAME)
