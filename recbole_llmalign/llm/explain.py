"""Generated reasons for AlignLLMRec's recommendations (``recommend --explain``).

The LLM reads the same hybrid prompt that ranked the items (instruction, soft tokens, history
titles; plus the learned prefixes when the ranking LLM itself writes), then
``explanation_template`` with the item's title, and continues greedily with a mild repetition
penalty for up to ``explanation_max_tokens``. A ranking LLM cut to its first ``llm_layers`` has a
language-model head that reads a middle layer and writes no readable text, so with
``explanation_full_depth`` the full pretrained model (loaded once, frozen) writes instead: it
reads the same prompt embeddings, as hard text and projected soft tokens share its input table.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from recbole_llmalign.llm.loader import load_causal_lm, resolve_llm_path

REPETITION_PENALTY = 1.3  # mild: a greedy 135M model otherwise repeats its last phrase


def total_layers(llm_path: str, cache_dir: str) -> int:
    """Decoder layers of the full pretrained LLM at ``llm_path``, read from its config only."""
    from transformers import AutoConfig

    llm_config = AutoConfig.from_pretrained(resolve_llm_path(llm_path, cache_dir))
    return int(getattr(llm_config, "num_hidden_layers", 0) or getattr(llm_config, "num_layers", 0))


class Explainer:
    """Writes one short reason per recommended item for a trained AlignLLMRec (see module docstring)."""

    def __init__(self, model: Any, config: Any) -> None:
        if not hasattr(model, "prompt_embeddings"):
            raise ValueError(f"--explain needs a model with an LLM (AlignLLMRec); {config['model']} has none.")
        self.model = model
        self.template = config["explanation_template"]
        self.max_tokens = int(config["explanation_max_tokens"])
        self._settings = (config["llm_path"], config["llm_cache_dir"], config["llm_dtype"])
        cut = model.llm_num_layers < total_layers(config["llm_path"], config["llm_cache_dir"])
        self.full_depth = bool(config["explanation_full_depth"]) and cut
        self._writer: Any = None

    def writer(self) -> Any:
        """The full-depth LLM (loaded on first use) when it writes, else None (the ranking LLM writes)."""
        if not self.full_depth:
            return None
        if self._writer is None:
            path, cache_dir, dtype = self._settings
            self._writer = load_causal_lm(path, cache_dir=cache_dir, dtype=dtype, llm_layers=None).model
            self._writer.to(self.model.embed_tokens.weight.device)
        return self._writer

    def explain(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, items: torch.Tensor) -> list[str]:
        """One reason per item in ``items`` for the user ``item_seq[0]`` (one line each)."""
        model, writer = self.model, self.writer()
        reasons = []
        with torch.inference_mode():
            item_seq, item_seq_len = item_seq[:1], item_seq_len[:1]
            user = model.user_vectors(item_seq, item_seq_len)
            prompt, mask = model.prompt_embeddings(item_seq, item_seq_len, user)
            prompt = prompt[:, mask[0].bool()]  # one user: drop padding
            if writer is not None and model.instruction_ids.numel() > 0:  # no cached key/values here: the text goes inline
                prompt = torch.cat([model.embed_tokens(model.instruction_ids.to(prompt.device)), prompt], dim=1)
            for item in items.tolist():
                tail = model.tokenizer(self.template.format(item=model.titles[item] or f"item {item}"),
                                       add_special_tokens=False, return_tensors="pt")["input_ids"].to(prompt.device)
                embeds = torch.cat([prompt, model.embed_tokens(tail)], dim=1)
                if writer is not None:
                    attention = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
                    generated = writer.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=self.max_tokens,
                                                do_sample=False, repetition_penalty=REPETITION_PENALTY,
                                                pad_token_id=model.eos_id)[0].tolist()
                else:
                    generated = self._greedy_with_prefixes(embeds, user)
                text = model.tokenizer.decode(generated, skip_special_tokens=True).strip()
                reasons.append(text.split("\n", 1)[0].strip())  # one line: the model may go on to a new paragraph
        return reasons

    def _greedy_with_prefixes(self, embeds: torch.Tensor, user: torch.Tensor) -> list[int]:
        """Greedy continuation by the ranking LLM itself, behind the instruction key/values and learned prefixes."""
        model = self.model
        cache, prefix_length = model.prefix_cache(user)
        positions = torch.arange(embeds.size(1), device=embeds.device).unsqueeze(0) + prefix_length
        attention = torch.ones(1, prefix_length + embeds.size(1), dtype=torch.long, device=embeds.device)
        output = model.decoder(inputs_embeds=embeds, attention_mask=attention, position_ids=positions,
                               past_key_values=cache, use_cache=True)
        generated: list[int] = []
        for _ in range(self.max_tokens):
            logits = model.lm_head(output.last_hidden_state[:, -1])[0]
            if generated:
                seen = torch.tensor(sorted(set(generated)), device=logits.device)
                logits[seen] = torch.where(logits[seen] > 0, logits[seen] / REPETITION_PENALTY,
                                           logits[seen] * REPETITION_PENALTY)
            token = int(logits.argmax())
            if token == model.eos_id:
                break
            generated.append(token)
            positions = positions[:, -1:] + 1
            attention = torch.cat([attention, attention.new_ones(1, 1)], dim=1)
            output = model.decoder(inputs_embeds=model.embed_tokens(torch.tensor([[token]], device=logits.device)),
                                   attention_mask=attention, position_ids=positions,
                                   past_key_values=output.past_key_values, use_cache=True)
        return generated


_explainers: weakref.WeakKeyDictionary[Any, Explainer] = weakref.WeakKeyDictionary()


def explainer_for(model: Any, config: Any) -> Explainer:
    """The model's Explainer, made once per model object (its full-depth LLM is loaded once)."""
    if model not in _explainers:
        _explainers[model] = Explainer(model, config)
    return _explainers[model]
