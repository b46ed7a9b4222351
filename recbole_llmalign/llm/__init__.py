"""LLM side: loading causal LMs (local folder, hub id, or the shipped SmolLM2 GGUF), layer cuts, LoRA."""

from recbole_llmalign.llm.loader import LoadedLLM, load_causal_lm, resolve_llm_dtype, smollm2_gguf_path

__all__ = ["LoadedLLM", "load_causal_lm", "resolve_llm_dtype", "smollm2_gguf_path"]
