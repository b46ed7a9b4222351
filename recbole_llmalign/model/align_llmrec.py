"""AlignLLMRec: a frozen pretrained LLM reads a hybrid prompt of text and collaborative soft tokens.

Follows RA-Rec (ID embeddings as soft prompts, layer-specific reparameterisation, contextual
instruction prefixes, hybrid prompt), SeLLa-Rec (special tokens carrying aligned collaborative
knowledge, optional LoRA) and Align-LLMRec (MLP projection of CF latents into a frozen LLM); the
ranking head scores every item from one LLM pass per user, as E4SRec does.

Collaborative side: a trained, frozen AlignSASRec (``backbone_checkpoint``), loaded by
``FrozenBackboneLLMRecommender`` with the LLM. Trainable here: three projectors (user, history
item IDs, item semantics), the per-layer prefix encoder, the instruction prefix and the ranking
head (plus LoRA adapters when ``lora_r > 0``). The pointwise yes/no variant is
``AlignLLMRecCTR`` (``align_llmrec_ctr.py``); explanations are written by ``llm/explain.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recbole_llmalign.devices import HOST
from recbole_llmalign.llm.item_vectors import cached_item_vectors
from recbole_llmalign.llm.soft_prompt import (
    HISTORY_SLOT,
    SEMANTIC_SLOT,
    USER_SLOT,
    CFProjector,
    InstructionPrefix,
    LayerPrefixEncoder,
    PromptBuilder,
    PromptPoolingReader,
)
from recbole_llmalign.model.abstract_recommender import FrozenBackboneLLMRecommender
from recbole_llmalign.model.layers import info_nce
from recbole_llmalign.model.unseen_items import training_items

logger = logging.getLogger(__name__)

# what reads the prompt: the LLM, the no_llm ablation's MLP, both added, or the MLP plus a constant LLM state (llm+mlp's control)
PROMPT_READERS = ("llm", "mlp", "llm+mlp", "const+mlp")


class ItemSide:
    """The frozen backbone's item vectors, computed once per train/eval switch."""

    def __init__(self, scoring: torch.Tensor, ids: torch.Tensor, fused_text: torch.Tensor) -> None:
        self.scoring = scoring  # [N, C] the table the backbone ranks with
        self.ids = ids  # [N, C] item ID embeddings (an unseen item's borrowed from its text neighbours, as scored)
        self.fused_text = fused_text  # [N, C] fused item text (the scoring table for an ID-only backbone)


class AlignLLMRec(FrozenBackboneLLMRecommender):
    """Soft-prompt LLM recommender with full ranking (see module docstring)."""

    supports_backbone_refit = True
    supports_cross_fitting = True

    def __init__(self, config: Any, dataset: Any) -> None:
        super().__init__(config, dataset)
        if config["task"] == "labeled":  # the key of checkpoints and configs from before AlignLLMRecCTR
            raise ValueError("task: labeled is now its own model: run --model=AlignLLMRecCTR (same keys, no task key).")
        self.cf_dim = self.scoring_backbone.hidden_size
        for key, actual in (("backbone_hidden_size", self.cf_dim), ("llm_hidden_size", self.llm_hidden_size)):
            if config[key] is not None and int(config[key]) != actual:
                raise ValueError(f"{key} is {config[key]} but the loaded model ({self.llm_source} / backbone) has "
                                 f"{actual}; remove {key} or choose a matching model.")
        self._build_soft_prompt(config)
        self._build_head(config, dataset)
        self.align_weight = float(config["llm_align_weight"])
        self.align_temperature = float(config["align_temperature"])
        # items no training target or history shows: left out of the CE when the backbone leaves them
        # out (unseen_items: text). Its own, not the backbone's: the held-out targets are this model's.
        unseen = ~training_items(dataset, self.n_items)
        self.register_buffer("unseen_item_mask", unseen, persistent=False)
        self._item_side: dict[int, ItemSide] = {}  # per backbone read (the fold backbones under cross-fitting differ)
        self.cost_report: dict[str, float] = {}  # rows for the run's CSV (rerank_top_n: training samples seen and used)
        self._instruction_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _build_soft_prompt(self, config: Any) -> None:
        """Projectors into the LLM's input space, per-layer prefixes, the prompt template, the instruction."""
        text_config = self.decoder.config
        kv_heads = int(getattr(text_config, "num_key_value_heads", text_config.num_attention_heads))
        head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads)
        self.user_projector = CFProjector(self.cf_dim, self.llm_hidden_size)
        self.history_projector = CFProjector(self.cf_dim, self.llm_hidden_size)
        self.semantic_projector = CFProjector(self.cf_dim, self.llm_hidden_size)
        self.use_layer_prefix = bool(config["use_layer_prefix"])
        self.use_instruction_prefix = bool(config["use_instruction_prefix"])
        if self.use_layer_prefix:
            self.layer_prefix = LayerPrefixEncoder(self.cf_dim, self.llm_num_layers, kv_heads, head_dim,
                                                   int(config["layer_prefix_length"]))
        if self.use_instruction_prefix:
            self.instruction_prefix = InstructionPrefix(self.llm_num_layers, kv_heads, head_dim,
                                                        int(config["instruction_prefix_length"]))
        self.prompt_reader = str(config["prompt_reader"])
        if self.prompt_reader not in PROMPT_READERS:
            raise ValueError(f"prompt_reader must be one of {PROMPT_READERS}, got '{self.prompt_reader}'.")
        if self.prompt_reader in ("mlp", "llm+mlp", "const+mlp"):  # the LLM ablation's MLP; llm+mlp: the very same MLP (size
            # and initial weights: built at the same point), its output added to the LLM's state, so LLM on/off is the only change
            replaced = sum(p.numel() for name, p in self.named_parameters()
                           if p.requires_grad and name.split(".")[0] in ("layer_prefix", "instruction_prefix", "llm"))
            candidate = int(config["rerank_top_n"] or 0) > 0  # prompts that end with a candidate: pooled on its own
            self.pooling_reader = PromptPoolingReader(
                self.llm_hidden_size, PromptPoolingReader.width_for(self.llm_hidden_size, replaced, candidate), candidate=candidate)
        if self.prompt_reader == "mlp":  # the LLM ablation: same inputs and head, the LLM-only trainables traded for an MLP
            self.use_layer_prefix = self.use_instruction_prefix = False  # they only act inside the LLM's attention
            for name in ("layer_prefix", "instruction_prefix"):
                if hasattr(self, name):
                    delattr(self, name)
            self.llm.requires_grad_(False)  # LoRA adapters too: nothing runs the LLM
        if self.prompt_reader == "const+mlp":  # llm+mlp with the LLM's state frozen to one vector: the prefixes and LoRA
            # stay as built (the constant is what llm+mlp's LLM gives at the start) but never train; the LLM runs once
            for name in ("layer_prefix", "instruction_prefix", "llm"):
                if hasattr(self, name):
                    getattr(self, name).requires_grad_(False)
            self.register_buffer("constant_llm_state", torch.zeros(self.llm_hidden_size))
            self.register_buffer("constant_llm_state_ready", torch.tensor(False))
        self.prompts = PromptBuilder(self.tokenizer, config["prompt_template"], self.titles, mode=config["prompt_mode"],
                                     history_items=int(config["prompt_history_items"]),
                                     title_max_tokens=int(config["title_max_tokens"]))
        instruction = config["instruction_text"] or ""  # ~ or "" = no instruction text
        self.instruction_ids = self.tokenizer(instruction, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def _build_head(self, config: Any, dataset: Any) -> None:
        """The ranking head: LLM state -> item space, zero at the start (the model then ranks as its backbone)."""
        self.ranking_head = nn.Linear(self.llm_hidden_size, self.cf_dim)
        nn.init.zeros_(self.ranking_head.weight)
        nn.init.zeros_(self.ranking_head.bias)
        self.residual_backbone = bool(config["rank_with_backbone_residual"])
        self.llm_item_scoring = bool(config["llm_item_scoring"])
        self.rerank_top_n = int(config["rerank_top_n"] or 0)
        if self.rerank_top_n:  # the backbone ranks every item; the LLM re-scores its top N, one prompt per candidate
            if self.llm_item_scoring:
                raise ValueError("rerank_top_n re-scores the backbone's top N with candidate prompts; it does not combine "
                                 "with llm_item_scoring (set one of them off).")
            if self.rerank_top_n > self.n_items - 1:
                raise ValueError(f"rerank_top_n is {self.rerank_top_n} but the dataset has {self.n_items - 1} items.")
            self.prompts.set_candidate_template(config["rerank_candidate_template"], self.tokenizer)
            # candidates skip the history only when the evaluation does (exclude_history_items): never a private advantage
            self.rerank_skips_history = bool(config["exclude_history_items"])
            del self.ranking_head  # not used: the full ranking is the backbone's
            self.rerank_head = nn.Linear(self.llm_hidden_size, 1)  # zero at the start: the top N keep the backbone's order
            nn.init.zeros_(self.rerank_head.weight)
            nn.init.zeros_(self.rerank_head.bias)
        self._item_text_settings = (config["llm_cache_dir"], config["dataset"], str(config["llm_dtype"]))
        self._llm_item_vectors: torch.Tensor | None = None  # computed on first use, on the device the model runs on
        if self.llm_item_scoring:
            self.item_text_key = nn.Linear(self.llm_hidden_size, self.cf_dim)
            self.item_text_query = nn.Linear(self.llm_hidden_size, self.cf_dim)
            nn.init.zeros_(self.item_text_query.weight)  # zero at the start: the ranking stays the backbone's
            nn.init.zeros_(self.item_text_query.bias)

    def item_text_vectors(self) -> torch.Tensor:
        """[N, D] the items' text vectors for ``llm_item_scoring``, computed once, on first use: by then
        the model sits on its run device (a GPU pass, not a CPU pass in the constructor)."""
        device = self.embed_tokens.weight.device
        if self._llm_item_vectors is None or self._llm_item_vectors.device != device:
            # a normal tensor even when first asked for under evaluation's inference mode: training reuses it
            with torch.inference_mode(False), torch.no_grad():
                vectors = self._item_text_vectors() if self._llm_item_vectors is None else self._llm_item_vectors
                self._llm_item_vectors = vectors.to(device).clone()
        return self._llm_item_vectors

    def _item_text_vectors(self) -> torch.Tensor:
        """[N, D] standardised vectors of the items' prompt text: the LLM's (``llm/item_vectors.py``, cached),
        or, in the no_llm ablation (and const+mlp), the mean of the same tokens' input embeddings (no LLM layers)."""
        if self.prompt_reader not in ("mlp", "const+mlp"):
            cache_dir, dataset, dtype = self._item_text_settings
            with self.llm_autocast():
                vectors = cached_item_vectors(self.decoder, self.prompts.title_ids, self.pad_id, cache_dir, dataset,
                                              f"{self.llm_source} ({dtype})", self.llm_num_layers)
        else:
            with torch.no_grad():
                vectors = torch.stack([self.embed_tokens.weight[ids].mean(0) if ids else self.embed_tokens.weight.new_zeros(
                    self.llm_hidden_size) for ids in self.prompts.title_ids]).float()
        present = vectors.abs().sum(1) > 0
        if present.any():
            mean, std = vectors[present].mean(0), vectors[present].std(0).clamp(min=1e-6)
            vectors = torch.where(present.unsqueeze(1), (vectors - mean) / std, vectors)
        return vectors

    def train(self, mode: bool = True) -> AlignLLMRec:
        super().train(mode)
        self._item_side = {}
        if self.llm_trained:
            self._instruction_kv = None  # adapters (or, from scratch, all LLM weights) may have moved
        return self

    def item_side(self) -> ItemSide:
        """Scoring table, item ID embeddings and fused text of the frozen backbone (cached)."""
        backbone = self.backbone
        if id(backbone) not in self._item_side:
            with torch.no_grad():
                table = backbone._scoring_table().detach()
                fused = backbone.fused_text()[0].detach() if backbone.uses_text else table
                ids = backbone.item_embedding.weight.detach()
                if backbone.uses_text and backbone.item_representation == "id+text":
                    ids = table - fused  # the ID half it scores with: an unseen item's borrowed row, not its untrained one
                self._item_side[id(backbone)] = ItemSide(table, ids, fused)
        return self._item_side[id(backbone)]

    # ---- LLM pass ----
    def instruction_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer key/values of the fixed ``instruction_text`` [1, kv_heads, n, head_dim].

        Computed once and reused by every prompt (recomputed per batch, still once rather than per
        user, when LoRA adapters change the projections during training).
        """
        if self._instruction_kv is not None and not (self.llm_trained and self.training):
            return self._instruction_kv
        from transformers import DynamicCache

        with torch.no_grad(), self.llm_autocast():
            cache = DynamicCache(config=self.decoder.config)
            self.decoder(input_ids=self.instruction_ids.to(self.embed_tokens.weight.device), past_key_values=cache, use_cache=True)
        self._instruction_kv = [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers]
        return self._instruction_kv

    def prefix_cache(self, user: torch.Tensor) -> tuple[Any, int]:
        """(key/value cache of instruction text + instruction prefix + user prefix, its length) for a batch of users."""
        from transformers import DynamicCache

        parts = []
        if self.instruction_ids.numel() > 0:
            parts.append([(k.expand(user.size(0), -1, -1, -1), v.expand(user.size(0), -1, -1, -1))
                          for k, v in self.instruction_kv()])
        if self.use_instruction_prefix:
            parts.append(self.instruction_prefix(user.size(0)))
        if self.use_layer_prefix:
            parts.append(self.layer_prefix(user))
        if not parts:
            return None, 0
        layers = [(torch.cat([p[i][0] for p in parts], dim=2), torch.cat([p[i][1] for p in parts], dim=2))
                  for i in range(len(parts[0]))]
        return DynamicCache(layers, config=self.decoder.config), layers[0][0].size(2)

    def prompt_embeddings(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, user: torch.Tensor,
                          candidates: torch.Tensor | None = None,
                          history_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input embeddings [B, T, D] with the soft tokens placed, attention mask [B, T])."""
        embeds, mask, _ = self.prompt_parts(item_seq, item_seq_len, user, candidates, history_labels)
        return embeds, mask

    def prompt_parts(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, user: torch.Tensor,
                     candidates: torch.Tensor | None = None,
                     history_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input embeddings [B, T, D], attention mask [B, T], token ids with the soft-token placeholders [B, T])."""
        side = self.item_side()
        prompts = self.prompts.assemble(item_seq.cpu(), item_seq_len.cpu(), None if candidates is None else candidates.cpu(),
                                        None if history_labels is None else history_labels.cpu())
        token_ids, slot_items = prompts.token_ids.to(item_seq.device), prompts.slot_items.to(item_seq.device)
        embeds = self.embed_tokens(token_ids.clamp(min=0))
        user_vec = self.user_projector(user).unsqueeze(1).expand_as(embeds)
        embeds = torch.where((token_ids == USER_SLOT).unsqueeze(-1), user_vec, embeds)
        embeds = torch.where((token_ids == HISTORY_SLOT).unsqueeze(-1), self.history_projector(side.ids[slot_items]), embeds)
        embeds = torch.where((token_ids == SEMANTIC_SLOT).unsqueeze(-1),
                             self.semantic_projector(side.fused_text[slot_items]), embeds)
        return embeds, prompts.attention_mask.to(item_seq.device), token_ids

    def llm_states(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, candidates: torch.Tensor | None = None,
                   history_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden state of the prompt [B, D_llm], backbone user vector [B, C]); no vocabulary head."""
        user = self.user_vectors(item_seq, item_seq_len)
        embeds, mask, token_ids = self.prompt_parts(item_seq, item_seq_len, user, candidates, history_labels)
        if self.prompt_reader == "mlp":
            return self.pooling_reader(embeds.float(), token_ids, mask), user
        if self.prompt_reader == "const+mlp":
            if not bool(self.constant_llm_state_ready):
                self._set_constant_llm_state(embeds, mask, user)
            return self.constant_llm_state + self.pooling_reader(embeds.float(), token_ids, mask), user
        state = self._last_llm_state(embeds, mask, user)
        if self.prompt_reader == "llm+mlp":  # the MLP's reading of the same prompt, plus what the LLM adds to it
            state = state + self.pooling_reader(embeds.float(), token_ids, mask)
        return state, user

    def _last_llm_state(self, embeds: torch.Tensor, mask: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """[B, D_llm] the LLM's last hidden state of each prompt, after the layer and instruction prefixes."""
        cache, prefix_length = self.prefix_cache(user)
        full_mask = torch.cat([mask.new_ones(mask.size(0), prefix_length), mask], dim=1)
        with self.llm_autocast():
            output = self.decoder(inputs_embeds=embeds, attention_mask=full_mask, position_ids=self.positions(mask, prefix_length),
                                  past_key_values=cache, use_cache=cache is not None)
        return output.last_hidden_state[:, -1].float()  # left padding: the last position is real; heads in float32

    def kept_names(self) -> set[str]:
        """The checkpoint's keys; under const+mlp also its constant, so a reloaded model never runs the LLM again."""
        names = super().kept_names()
        return names | {"constant_llm_state", "constant_llm_state_ready"} if self.prompt_reader == "const+mlp" else names

    def _set_constant_llm_state(self, embeds: torch.Tensor, mask: torch.Tensor, user: torch.Tensor) -> None:
        """const+mlp: the mean LLM state of the first micro-batch (llm_micro_batch prompts) the model reads: validation's
        first when the untrained model is validated before training (the default), else training's first; kept in the
        checkpoint. It carries llm+mlp's scale and offset into the head but nothing about the user, so llm+mlp's gain
        over this control is what the LLM reads per user, not a change of the head's step size."""
        with torch.inference_mode(False), torch.no_grad():
            state = self._last_llm_state(embeds.detach().clone(), mask.clone(), user.detach().clone()).mean(0)
            self.constant_llm_state.copy_(state)
            self.constant_llm_state_ready.fill_(True)
        logger.info("const+mlp: the LLM's state fixed to the mean of %d prompts (norm %.2f)", embeds.size(0), float(state.norm()))

    def scores_and_query(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores of every item [B, N], the query vector in item space [B, C])."""
        state, user = self.llm_states(item_seq, item_seq_len)
        query = self.ranking_head(state)
        if self.residual_backbone:
            query = query + user
        scores = query @ self.item_side().scoring.T
        if self.llm_item_scoring:  # the LLM state matched with the LLM's own vector of each item's text
            scores = scores + self.item_text_query(state) @ self.item_text_key(self.item_text_vectors()).T
        return scores, query

    # ---- re-ranking the backbone's top N (rerank_top_n > 0) ----
    def rerank_candidates(self, scores: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        """[B, n] the backbone's top ``rerank_top_n`` items per row of ``scores`` [B, N], padding excluded, and
        the history's items too when the evaluation ranks them last (``exclude_history_items``), so the
        candidates are the backbone's own evaluated top n, in training as in evaluation."""
        masked = scores.detach().clone()
        masked[:, 0] = float("-inf")
        if self.rerank_skips_history:
            masked.scatter_(1, item_seq, float("-inf"))
        return masked.topk(self.rerank_top_n, dim=1).indices

    def candidate_residuals(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[B, n] what the LLM adds to each candidate's backbone score: one prompt per (user, candidate),
        ending with ``rerank_candidate_template`` naming the candidate (its title and soft tokens)."""
        batch, n = candidates.shape
        state, _ = self.llm_states(item_seq.repeat_interleave(n, 0), item_seq_len.repeat_interleave(n, 0), candidates.reshape(-1))
        return self.rerank_head(state).squeeze(-1).view(batch, n)

    def rerank_loss(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Listwise cross-entropy over the backbone's top n (backbone score + residual), on the samples whose
        answer the backbone put there: the only ones a re-ranker can change, and candidates exactly as in
        evaluation (inserting a missed answer would teach the residual to lift low-scored items).
        The samples seen and used are counted in ``cost_report`` (the run's CSV)."""
        scores = self.user_vectors(item_seq, item_seq_len) @ self.item_side().scoring.T
        candidates = self.rerank_candidates(scores, item_seq)
        hit = candidates == target.unsqueeze(1)
        inside = hit.any(1)
        seen = self.cost_report.get("rerank_train_samples", 0.0) + float(len(target))
        used = self.cost_report.get("rerank_train_samples_used", 0.0) + float(inside.sum())
        self.cost_report.update(rerank_train_samples=seen, rerank_train_samples_used=used)
        if not inside.any():  # no answer among any candidates: nothing to learn from this batch
            return self.rerank_head.weight.sum() * 0.0
        rows = inside.nonzero().squeeze(1)
        logits = scores[rows].gather(1, candidates[rows]) + self.candidate_residuals(item_seq[rows], item_seq_len[rows],
                                                                                    candidates[rows])
        return F.cross_entropy(logits, hit[rows].float().argmax(1))

    def reranked_scores(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """[B, N] the backbone's scores, its top n re-scored (backbone score + LLM residual) and kept above the rest."""
        scores = self.user_vectors(item_seq, item_seq_len) @ self.item_side().scoring.T
        candidates = self.rerank_candidates(scores, item_seq)
        rescored = scores.gather(1, candidates) + self.candidate_residuals(item_seq, item_seq_len, candidates)
        above = (scores.max(1, keepdim=True).values - rescored.min(1, keepdim=True).values).clamp(min=0) + 1
        return scores.scatter(1, candidates, rescored + above)

    # ---- RecBole interface ----
    def calculate_loss(self, interaction: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The training loss; under cross-fitting computed per fold of users with that fold's backbone."""
        return self.cross_fitted(interaction, self._loss)

    def _loss(self, interaction: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.rerank_top_n:
            return self.rerank_loss(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], interaction[self.POS_ITEM_ID])
        scores, query = self.scores_and_query(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        target = interaction[self.POS_ITEM_ID]
        if getattr(self.backbone, "unseen_items", "negatives") == "text":  # as its backbone trained: not negatives
            scores = scores.masked_fill(self.unseen_item_mask, float("-inf"))
        loss = F.cross_entropy(scores, target)
        if self.align_weight > 0:
            fused = self.item_side().fused_text
            return loss, self.align_weight * info_nce(query, fused[target], self.align_temperature, target)
        return loss

    def predict(self, interaction: Any) -> torch.Tensor:
        scores = self.full_sort_predict(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)

    def full_sort_predict(self, interaction: Any) -> torch.Tensor:
        """Scores of every item; under ``cross_fit_evaluation: folds`` each user's with the fold backbone that
        never saw them (``fold_routed``)."""
        return self.fold_routed(interaction, self._full_sort_predict)

    def _full_sort_predict(self, interaction: Any) -> torch.Tensor:
        """One LLM pass per user, in length-bucketed micro-batches of ``llm_micro_batch`` users.

        Users are sorted by prompt length so each micro-batch pads little, and scored under
        inference mode; the result is returned in the input order, cloned outside inference mode
        because RecBole's evaluator edits scores in place.
        """
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        order = torch.tensor(self.prompts.prompt_lengths(item_seq.cpu(), item_seq_len.cpu()), device=HOST).argsort(stable=True)
        order = order.to(item_seq.device)
        users = max(1, self.micro_batch // self.rerank_top_n) if self.rerank_top_n else self.micro_batch  # prompts per pass
        with torch.inference_mode():
            scores = torch.empty(item_seq.size(0), self.n_items, device=item_seq.device)
            for start in self.micro_batch_starts(len(order), "LLM scoring", step=users):
                rows = order[start:start + users]
                scores[rows] = (self.reranked_scores(item_seq[rows], item_seq_len[rows]) if self.rerank_top_n
                                else self.scores_and_query(item_seq[rows], item_seq_len[rows])[0])
        return scores.clone()
