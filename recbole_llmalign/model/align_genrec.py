"""AlignGenRec: an LLM that generates items as short code sequences, under a trie of valid codes.

Follows "Semantic Convergence" (arXiv 2412.13771; behavioural-semantic item tokenisation aligned
to the LLM, then mixed-task fine-tuning), with TIGER (residual codes, generative retrieval) and
LC-Rec (sequential, alignment and query tasks over item indices) as references.

1. Item tokenizer: every item's frozen AlignSASRec ID embedding joined with its fused text is
   quantized by L residual codebooks aligned to the LLM's embedding of the item title
   (``llm/codebook.py``); codes are unique and saved in the checkpoint (``item_codes``,
   ``code_level_sizes``). The tokenizer is fitted once by ``AlignGenRecTrainer`` before training
   (``fit_item_tokenizer``); a loaded checkpoint installs its own codes and never refits. An item
   the training split never shows (new under ``new_item_ratio``, or only in valid/test) has an
   untrained, random ID row, so its ID half is replaced by the mean ID vector of the
   ``codebook_text_neighbours`` trained items closest to it by fused text: its code then follows
   from its text alone (``text_only_item_vectors``), and the trie lets it be generated.
2. The L x K code tokens are added to the tokenizer and get their own trainable embedding rows
   (the LLM's vocabulary extended without copying or touching its frozen rows), initialised at
   the LLM embedding centroid of the items carrying each code. The code rows also act as the
   output head for codes (tied, as SmolLM2 ties its own), so the vocabulary head is only computed
   for the few title tokens of the code -> title task.
3. Training: LoRA plus the code rows on a YAML-weighted mixture of four tasks: sequential
   (history codes -> next codes), text alignment (title -> codes, codes -> title), query (words of
   the item's text -> codes), negatives (history and items the user skipped -> next codes).
4. Inference: beam search where each step may only pick codes that continue a real item
   (``CodeTrie``); ``full_sort_predict`` gives generated items their beam log-probability and
   every other item ``generation_floor``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recbole_llmalign.data.item_text import item_texts
from recbole_llmalign.devices import HOST
from recbole_llmalign.llm.code_prompts import GENERATION_TASKS, compile_template, render
from recbole_llmalign.llm.codebook import CodeTrie, code_rows_at_title_centroids, fit_codebook, legacy_level_sizes
from recbole_llmalign.llm.soft_prompt import CFProjector
from recbole_llmalign.model.abstract_recommender import FrozenBackboneLLMRecommender
from recbole_llmalign.model.unseen_items import text_only_item_vectors, training_items

USER_TOKEN = -1  # placeholder id: its input embedding is the projected AlignSASRec sequence vector


class AlignGenRec(FrozenBackboneLLMRecommender):
    """Codebook-tokenized generative recommender (see module docstring)."""

    kept_buffers = ("item_codes", "code_level_sizes")  # the fitted item tokenizer travels with the checkpoint

    def __init__(self, config: Any, dataset: Any) -> None:
        super().__init__(config, dataset)
        self.beam_size = int(config["beam_size"])
        largest_topk = max(config["topk"]) if config["topk"] else 0
        if self.beam_size < largest_topk:
            raise ValueError(f"beam_size {self.beam_size} is smaller than topk {largest_topk}: only beam_size items are "
                             "generated per user. Raise beam_size to at least the largest topk.")
        self.floor = float(config["generation_floor"])
        self.beam_scoring = config["beam_scoring"]
        if self.beam_scoring not in ("model", "renormalized"):
            raise ValueError(f"beam_scoring must be 'model' or 'renormalized', got {self.beam_scoring!r}.")
        self.history_items = int(config["prompt_history_items"])
        self.negative_items = int(config["negative_items"])
        self.query_words = int(config["query_words"])
        self.use_user_token = bool(config["use_user_token"])
        if self.use_user_token:
            self.user_projector = CFProjector(self.backbone.hidden_size, self.llm_hidden_size)
        self._build_item_texts(config, dataset)
        self._build_tasks(config)
        # the item tokenizer: empty until fit_item_tokenizer() or a checkpoint installs codes
        self.register_buffer("item_codes", torch.zeros(self.n_items, 0, dtype=torch.long))
        self.register_buffer("code_level_sizes", torch.zeros(0, dtype=torch.long))
        self.register_buffer("code_level", torch.zeros(0, dtype=torch.long), persistent=False)  # level of each code row
        self.codebook_size = int(config["codebook_size"])
        self.text_neighbours = int(config["codebook_text_neighbours"])
        self.register_buffer("trained_items", training_items(dataset, self.n_items, self.backbone_holdout),
                             persistent=False)  # the items whose backbone ID rows trained
        self.register_parameter("code_embeddings", None)  # [total codes, H], made by install_codes
        # rows for the run's CSV: the tokenizer report (set when fitted) and how many generated beams were real items
        self.cost_report: dict[str, float] = {}

    def _build_item_texts(self, config: Any, dataset: Any) -> None:
        """Title tokens for the text tasks, words of the other fields for queries."""
        fields = list(config["item_text_fields"] or [])  # the dataset may have no text fields
        query_parts = [item_texts(dataset, [f]) for f in fields[1:]]
        self.query_texts = [" ".join(part[i] for part in query_parts).split() or self.titles[i].split()
                            for i in range(self.n_items)]
        title_max = int(config["title_max_tokens"])
        self.title_ids = [self._encode(" " + t)[:title_max] if t else [] for t in self.titles]

    def _build_tasks(self, config: Any) -> None:
        """The task mixture and its templates, tokenised once."""
        weights = dict(config["task_weights"])
        unknown = set(weights) - set(GENERATION_TASKS)
        if unknown:
            raise ValueError(f"task_weights has unknown tasks {sorted(unknown)}; use {list(GENERATION_TASKS)}.")
        self.task_names = [t for t in GENERATION_TASKS if float(weights.get(t, 0)) > 0]
        if not self.task_names:
            raise ValueError("task_weights gives no task a positive weight; set e.g. {sequential: 1.0}.")
        self.task_probs = torch.tensor([float(weights[t]) for t in self.task_names])
        self.templates = {task: compile_template(task, config[f"{task}_template"], self._encode) for task in GENERATION_TASKS}
        self.separator = self._encode(config["item_separator"])

    # ---- item tokenizer ----
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def has_item_codes(self) -> bool:
        return self.item_codes.size(1) > 0

    def _title_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean LLM input embedding of each item's title tokens [N, H], and which items have a title [N], on the
        host (the tokenizer is fitted there): the embedding table is copied once, not once per item."""
        weight = self.embed_tokens.weight.detach().cpu()
        rows = torch.zeros(self.n_items, weight.size(1), device=HOST)
        has = torch.zeros(self.n_items, dtype=torch.bool, device=HOST)
        for item, ids in enumerate(self.title_ids):
            if ids and item > 0:
                rows[item], has[item] = weight[ids].float().mean(0), True
        return rows, has

    def fit_item_tokenizer(self, config: Any) -> dict[str, Any]:
        """Stage 1, run once by the trainer: fit the residual codebooks on the frozen backbone's item
        vectors, install the unique codes and start each code row at its items' mean title embedding."""
        with torch.no_grad():
            ids = self.backbone.item_embedding.weight.detach()
            fused = self.backbone.fused_text()[0].detach() if self.backbone.uses_text else ids
            trained = self.trained_items[1:].to(ids.device)  # row 0 is padding: never coded, never a neighbour
            if self.backbone.uses_text:  # untrained items: the ID half from their text (see text_only_item_vectors)
                ids = torch.cat([ids[:1], text_only_item_vectors(ids[1:], fused[1:], trained, self.text_neighbours)])
        vectors = torch.cat([F.normalize(ids, dim=-1), F.normalize(fused, dim=-1)], dim=1)[1:].cpu()
        title_rows, has_title = self._title_embeddings()
        result = fit_codebook(
            vectors, title_rows[1:], has_title[1:], levels=int(config["codebook_levels"]),
            codes_per_level=int(config["codebook_size"]), latent_dim=int(config["codebook_dim"]),
            steps=int(config["codebook_steps"]), learning_rate=float(config["codebook_learning_rate"]),
            commitment_weight=float(config["commitment_weight"]), llm_align_weight=float(config["codebook_llm_align_weight"]),
            seed=int(config["seed"]), show_progress=bool(config["show_progress"]))
        report = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.report.items())
        self.logger.info(f"AlignGenRec item tokenizer: {report}")
        self.cost_report.update({f"tokenizer_{k}": float(v) for k, v in result.report.items()})
        self.cost_report["tokenizer_text_only_items"] = float((~trained).sum()) if self.backbone.uses_text else 0.0
        codes = torch.zeros(self.n_items, len(result.codes_per_level), dtype=torch.long, device=HOST)
        codes[1:] = result.codes
        self.install_codes(codes, result.codes_per_level)
        with torch.no_grad():
            rows = code_rows_at_title_centroids(self.embed_tokens.weight.detach().float().cpu(), self.item_codes.cpu(),
                                                self.codes_per_level, title_rows, has_title)
            self.code_embeddings.copy_(rows)
        return result.report

    def install_codes(self, codes: torch.Tensor, codes_per_level: Sequence[int]) -> None:
        """Make ``codes`` [N, L'] (``codes_per_level`` codes at each level) the item tokenizer: buffers,
        code tokens in the tokenizer, a code-embedding table of the right shape, the trie."""
        device = self.embed_tokens.weight.device
        self.item_codes = codes.to(device=device, dtype=torch.long)
        self.code_level_sizes = torch.tensor(list(codes_per_level), dtype=torch.long, device=device)
        self.codes_per_level = [int(k) for k in codes_per_level]
        offsets = torch.tensor([0] + self.codes_per_level, device=HOST).cumsum(0)
        self.level_offsets = offsets[:-1].tolist()
        strings = [f"<{chr(97 + level)}_{code}>" for level, k in enumerate(self.codes_per_level) for code in range(k)]
        self.tokenizer.add_tokens(strings)
        self.first_code_id = self.tokenizer.convert_tokens_to_ids(strings[0])
        if self.tokenizer.convert_tokens_to_ids(strings[-1]) != self.first_code_id + len(strings) - 1:
            raise RuntimeError("AlignGenRec's code tokens are not contiguous in the tokenizer (codes of another layout "
                               "were installed first); build a new model to load this checkpoint.")
        self.code_level = torch.cat([torch.full((k,), level, device=device) for level, k in enumerate(self.codes_per_level)])
        total = int(offsets[-1])
        if self.code_embeddings is None or self.code_embeddings.shape[0] != total:
            self.code_embeddings = nn.Parameter(torch.zeros(total, self.llm_hidden_size, device=device))
        self.trie = CodeTrie(self.item_codes[1:].cpu(), torch.arange(1, self.n_items, device=HOST), self.codes_per_level)
        self.item_token_ids = (self.item_codes.cpu() + torch.tensor(self.level_offsets, device=HOST)).tolist()  # flat code index per level

    def _require_codes(self) -> None:
        if not self.has_item_codes:
            raise RuntimeError("AlignGenRec's item tokenizer is not fitted: train the model through run_recbole_llmalign "
                               "(AlignGenRecTrainer fits it first), call fit_item_tokenizer(config), or load a checkpoint.")

    def item_code_tokens(self, item: int) -> list[int]:
        """Token ids of an item's code sequence (ids from the extended tokenizer)."""
        return [self.first_code_id + c for c in self.item_token_ids[item]]

    def code_string(self, item: int) -> str:
        return "".join(self.tokenizer.convert_ids_to_tokens(self.item_code_tokens(item)))

    # ---- prompts ----
    def _render(self, task: str, values: dict[str, list[int]]) -> list[int]:
        return render(self.templates[task], values)

    def _items_ids(self, items: Sequence[int]) -> list[int]:
        ids: list[int] = []
        for position, item in enumerate(items):
            if position:
                ids += self.separator
            ids += self.item_code_tokens(item)
        return ids

    def _history(self, sequence: list[int], length: int) -> list[int]:
        """The last items' codes, after the user's collaborative soft token when ``use_user_token`` is on."""
        items = self._items_ids(sequence[max(0, length - self.history_items):length])
        return ([USER_TOKEN] if self.use_user_token else []) + items

    def training_sample(self, task: str, sequence: list[int], length: int, target: int,
                        generator: torch.Generator) -> tuple[list[int], list[int]]:
        """(prompt ids, target ids) of one training row under ``task``."""
        codes = self.item_code_tokens(target)
        if task == "code_to_title" and self.title_ids[target]:
            return self._render(task, {"{codes}": codes}), self.title_ids[target] + [self.eos_id]
        if task == "title_to_code" and self.title_ids[target]:
            return self._render(task, {"{title}": self.title_ids[target]}), codes
        if task == "query" and self.query_texts[target]:
            words = self.query_texts[target]
            picks = torch.randperm(len(words), generator=generator, device=HOST)[:self.query_words].sort().values.tolist()
            return self._render(task, {"{query}": self._encode(" " + " ".join(words[i] for i in picks))}), codes
        history = self._history(sequence, length)
        if task == "negative":
            negatives = torch.randint(1, self.n_items, (self.negative_items,), generator=generator, device=HOST).tolist()
            negatives = [n for n in negatives if n != target] or [1 + target % (self.n_items - 1)]
            return self._render(task, {"{history}": history, "{negatives}": self._items_ids(negatives)}), codes
        return self._render("sequential", {"{history}": history}), codes

    def embed(self, ids: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings: the LLM's rows for its own tokens, the trainable code rows for code tokens,
        and the projected sequence vector of row i's user (``users`` [B, C]) at ``USER_TOKEN``."""
        is_code = ids >= self.first_code_id
        text = self.embed_tokens(torch.where(is_code | (ids < 0), torch.zeros_like(ids), ids))
        codes = F.embedding((ids - self.first_code_id).clamp(min=0), self.code_embeddings)  # a fixed-order gradient, unlike indexing
        embeds = torch.where(is_code.unsqueeze(-1), codes.to(text.dtype), text)
        if users is not None and self.use_user_token:
            user_rows = self.user_projector(users).to(text.dtype).unsqueeze(1).expand_as(embeds)
            embeds = torch.where((ids == USER_TOKEN).unsqueeze(-1), user_rows, embeds)
        return embeds

    def _users(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor | None:
        """Backbone sequence vectors for the user token, or None without it."""
        return self.user_vectors(item_seq, item_seq_len) if self.use_user_token else None

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any = None, users: torch.Tensor | None = None) -> Any:
        embeds = self.embed(ids, users)
        with self.llm_autocast():
            return self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=self.positions(mask),
                                past_key_values=cache, use_cache=cache is not None)

    # ---- RecBole interface ----
    def calculate_loss(self, interaction: Any) -> torch.Tensor:
        """Mean token cross-entropy of the targets of a batch whose rows each draw a task."""
        self._require_codes()
        sequences = interaction[self.ITEM_SEQ].tolist()
        lengths = interaction[self.ITEM_SEQ_LEN].tolist()
        targets = interaction[self.POS_ITEM_ID].tolist()
        generator = torch.Generator(device=HOST).manual_seed(int(torch.randint(0, 2**31 - 1, (1,), device=HOST)))
        tasks = torch.multinomial(self.task_probs, len(targets), replacement=True, generator=generator).tolist()
        rows, labels = [], []
        for row, task in enumerate(tasks):
            prompt, target = self.training_sample(self.task_names[task], sequences[row], lengths[row], targets[row], generator)
            rows.append(prompt + target)
            labels.append([-100] * (len(prompt) - 1) + target + [-100])  # label at position p = token p + 1
        ids, mask = self.left_pad(rows)
        label_ids, _ = self.left_pad(labels)
        label_ids[mask == 0] = -100
        device = self.code_embeddings.device
        ids, mask, label_ids = ids.to(device), mask.to(device), label_ids.to(device)  # one copy each per batch
        users = self._users(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        hidden = self._run(ids, mask, users=users).last_hidden_state
        picked = label_ids != -100
        states, gold = hidden[picked], label_ids[picked]
        is_code = gold >= self.first_code_id
        loss = hidden.new_zeros((), dtype=torch.float32)
        if is_code.any():
            code_gold = gold[is_code] - self.first_code_id
            logits = states[is_code].float() @ self.code_embeddings.T  # every code row, then keep the gold's level
            level = self.code_level
            logits = logits.masked_fill(level.unsqueeze(0) != level[code_gold].unsqueeze(1), float("-inf"))
            loss = loss + F.cross_entropy(logits, code_gold, reduction="sum")
        if (~is_code).any():
            text_states = states[~is_code].to(self.lm_head.weight.dtype)  # the frozen head in the LLM's dtype, its logits in float32
            loss = loss + F.cross_entropy(self.lm_head(text_states).float(), gold[~is_code], reduction="sum")
        return loss / max(int(picked.sum()), 1)

    @torch.inference_mode()
    def generate(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, beam_size: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Trie-constrained beam search: (item ids [B, W], log-probabilities [B, W]); -1 / -inf where no item."""
        self._require_codes()
        from transformers import DynamicCache

        width = beam_size or self.beam_size
        device = self.code_embeddings.device
        prompts = [self._render("sequential", {"{history}": self._history(s, n)})
                   for s, n in zip(item_seq.tolist(), item_seq_len.tolist())]
        ids, mask = self.left_pad(prompts, device)
        batch = ids.size(0)
        cache = DynamicCache(config=self.decoder.config)
        state = self._run(ids, mask, cache, users=self._users(item_seq, item_seq_len)).last_hidden_state[:, -1]
        positions = (mask.sum(1, keepdim=True) - 1)
        prefix = torch.zeros(batch, 0, dtype=torch.long, device=HOST)  # the trie walks code prefixes on the host
        scores = torch.zeros(batch, 1, device=device)
        for level, offset in enumerate(self.level_offsets):
            if level > 0:  # feed the code just chosen by each beam
                mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
                positions = positions + 1
                tokens = self.code_embeddings[self.level_offsets[level - 1] + prefix[:, -1].to(device)]
                tokens = tokens.to(self.embed_tokens.weight.dtype)
                with self.llm_autocast():
                    state = self.decoder(inputs_embeds=tokens.unsqueeze(1), attention_mask=mask, position_ids=positions,
                                         past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
            k = self.codes_per_level[level]
            logits = state.float() @ self.code_embeddings[offset:offset + k].T.float()
            allowed = self.trie.allowed(prefix).to(device)
            if self.beam_scoring == "renormalized":  # a softmax over the valid continuations only
                logits = logits.masked_fill(~allowed, float("-inf"))
            log_probs = torch.log_softmax(logits, dim=-1)  # "model": the probability training gave each code
            log_probs = torch.where(allowed, log_probs, torch.full_like(log_probs, float("-inf")))
            beams = scores.size(1)
            total = (scores.reshape(-1, 1) + log_probs).view(batch, beams * k)
            keep = min(width, beams * k)
            scores, index = total.topk(keep, dim=1)
            parent = (torch.arange(batch, device=device).unsqueeze(1) * beams + index // k).view(-1)
            prefix = torch.cat([prefix[parent.cpu()], (index % k).view(-1, 1).cpu()], dim=1)
            cache.batch_select_indices(parent)
            mask, positions = mask[parent], positions[parent]
        items = self.trie.items(prefix).view(batch, -1).to(device)
        finite = torch.isfinite(scores)  # a beam with a finite score is a generated code sequence
        generated = self.cost_report.get("beams_generated", 0.0) + float(finite.sum())
        real = self.cost_report.get("beams_real", 0.0) + float((finite & (items >= 1)).sum())
        self.cost_report.update(beams_generated=generated, beams_real=real, beams_real_share=real / max(generated, 1.0))
        items = torch.where(finite, items, torch.full_like(items, -1))
        return items, scores

    def full_sort_predict(self, interaction: Any) -> torch.Tensor:
        """Beam log-probabilities for the generated items, ``generation_floor`` for the rest [B, N]."""
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        scores = torch.full((item_seq.size(0), self.n_items), self.floor, device=item_seq.device)
        for start in self.micro_batch_starts(item_seq.size(0), "beam search"):
            rows = slice(start, start + self.micro_batch)
            items, beam_scores = self.generate(item_seq[rows], item_seq_len[rows])
            found = items >= 0
            block = scores[rows]
            block.scatter_(1, items.clamp(min=0), torch.where(found, beam_scores, torch.full_like(beam_scores, self.floor)))
            block[:, 0] = self.floor
        return scores.clone()

    @torch.inference_mode()
    def code_log_likelihood(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """log P(codes of ``items[i]`` | user i's sequential prompt) [B], teacher forced in one pass.

        This is exactly the score beam search ranks by (under the same ``beam_scoring``), computed
        for given items instead of searched for: the prompt followed by the item's first L - 1 codes,
        so the last L states predict its L codes.
        """
        self._require_codes()
        device = self.code_embeddings.device
        levels = len(self.level_offsets)
        codes = self.item_codes[items.to(self.item_codes.device)].cpu()  # [B, L] per-level code indices
        rows = [self._render("sequential", {"{history}": self._history(s, n)}) + self.item_code_tokens(item)[:-1]
                for s, n, item in zip(item_seq.tolist(), item_seq_len.tolist(), items.tolist())]
        ids, mask = self.left_pad(rows, device)
        states = self._run(ids, mask, users=self._users(item_seq, item_seq_len)).last_hidden_state[:, -levels:].float()
        total = torch.zeros(len(rows), device=device)
        for level, offset in enumerate(self.level_offsets):
            logits = states[:, level] @ self.code_embeddings[offset:offset + self.codes_per_level[level]].T.float()
            if self.beam_scoring == "renormalized":
                logits = logits.masked_fill(~self.trie.allowed(codes[:, :level]).to(device), float("-inf"))
            gold = codes[:, level].to(device)
            total = total + torch.log_softmax(logits, dim=-1).gather(1, gold.unsqueeze(1)).squeeze(1)
        return total

    def predict(self, interaction: Any) -> torch.Tensor:
        """Scores of (history, candidate) pairs, as sampled evaluation (e.g. uni100) asks: each candidate's
        exact code log-likelihood (``code_log_likelihood``), one teacher-forced pass per pair in
        micro-batches, never a beam search per pair."""
        item_seq, item_seq_len, items = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], interaction[self.ITEM_ID]
        parts = [self.code_log_likelihood(item_seq[start:start + self.micro_batch], item_seq_len[start:start + self.micro_batch],
                                          items[start:start + self.micro_batch])
                 for start in self.micro_batch_starts(item_seq.size(0), "code likelihood")]
        return torch.cat(parts).clone()

    # ---- checkpoints: trainable parameters and the item codes ----
    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        """Install the checkpoint's codes (never refit), then load the trainables."""
        codes = state_dict.get("item_codes")
        if codes is not None:
            if codes.size(0) != self.n_items:
                raise RuntimeError(f"AlignGenRec checkpoint has codes for {codes.size(0)} items, this dataset has "
                                   f"{self.n_items}: it was trained on other data.")
            sizes = state_dict.get("code_level_sizes")
            if sizes is None:  # checkpoints from before code_level_sizes: L levels of K, plus a disambiguation level
                sizes = legacy_level_sizes(codes, state_dict["code_embeddings"].shape[0], int(self.codebook_size))
                state_dict = {**state_dict, "code_level_sizes": sizes}
            self.install_codes(codes, sizes.tolist())
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

