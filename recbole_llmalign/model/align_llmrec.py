"""AlignLLMRec: a frozen pretrained LLM reads a hybrid prompt of text and collaborative soft tokens.

Follows RA-Rec (ID embeddings as soft prompts, layer-specific reparameterisation, contextual
instruction prefixes, hybrid prompt), SeLLa-Rec (special tokens carrying aligned collaborative
knowledge, optional LoRA) and Align-LLMRec (MLP projection of CF latents into a frozen LLM); the
ranking head scores every item from one LLM pass per user, as E4SRec does.

Collaborative side: a trained, frozen AlignSASRec (``backbone_checkpoint``). Trainable: three
projectors (user, history item IDs, item semantics), the per-layer prefix encoder, the
instruction prefix, the ranking head, and LoRA adapters when ``lora_r > 0``. Checkpoints hold
only those (``state_dict`` is filtered), never the LLM or the backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from recbole_llmalign.data.item_text import item_texts
from recbole_llmalign.llm.loader import load_causal_lm
from recbole_llmalign.llm.soft_prompt import (
    HISTORY_SLOT,
    SEMANTIC_SLOT,
    USER_SLOT,
    CFProjector,
    InstructionPrefix,
    LayerPrefixEncoder,
    PromptBuilder,
    resolve_answer_tokens,
)
from recbole_llmalign.model.layers import info_nce


def load_backbone(checkpoint_path: str | None, dataset: Any) -> nn.Module:
    """A trained AlignSASRec from its RecBole checkpoint, frozen, checked against ``dataset``."""
    from recbole_llmalign.compat import load_checkpoint
    from recbole_llmalign.model.align_sasrec import AlignSASRec

    if not checkpoint_path:
        raise ValueError(
            "AlignLLMRec needs a trained AlignSASRec: run it through run_recbole_llmalign (which trains and caches "
            "one) or pass --backbone_checkpoint=saved/AlignSASRec-<time>.pth from `--model=AlignSASRec` on the same dataset."
        )
    if not Path(checkpoint_path).is_file():
        raise FileNotFoundError(f"backbone_checkpoint {checkpoint_path} does not exist; point it at an AlignSASRec .pth file.")
    checkpoint = load_checkpoint(checkpoint_path, map_location="cpu")
    backbone_config = checkpoint["config"]
    if backbone_config["model"] != "AlignSASRec":
        raise ValueError(f"backbone_checkpoint holds a {backbone_config['model']}, not an AlignSASRec.")
    rows = checkpoint["state_dict"]["item_embedding.weight"].shape[0]
    if rows != dataset.item_num:
        raise ValueError(
            f"backbone_checkpoint has {rows} item rows but this dataset has {dataset.item_num}: it was trained on "
            "another dataset or filtering. Train AlignSASRec on the same dataset config."
        )
    backbone = AlignSASRec(backbone_config, dataset)
    backbone.load_state_dict(checkpoint["state_dict"])
    backbone.requires_grad_(False)
    backbone.trained_holdout = int(backbone_config["holdout_last_targets"] or 0)  # stacking checks it against its own N
    return backbone.eval()


TASKS = ("ranking", "labeled")


class AlignLLMRec(SequentialRecommender):
    """Soft-prompt LLM recommender with full ranking (see module docstring)."""

    backbone_model = "AlignSASRec"  # trained and cached by quick_start when backbone_checkpoint is empty

    def __init__(self, config: Any, dataset: Any) -> None:
        super().__init__(config, dataset)
        self.backbone = load_backbone(config["backbone_checkpoint"], dataset)
        cf_dim = self.backbone.hidden_size
        expected_cf = config["backbone_hidden_size"]
        if expected_cf is not None and int(expected_cf) != cf_dim:
            raise ValueError(f"backbone_hidden_size is {expected_cf} but the backbone checkpoint has hidden size {cf_dim}.")

        llm = load_causal_lm(config["llm_path"], cache_dir=config["llm_cache_dir"], dtype=config["llm_dtype"],
                             llm_layers=config["llm_layers"], lora_r=int(config["lora_r"]),
                             lora_alpha=int(config["lora_alpha"]), lora_target_modules=config["lora_target_modules"])
        expected_llm = config["llm_hidden_size"]
        if expected_llm is not None and int(expected_llm) != llm.hidden_size:
            raise ValueError(
                f"llm_hidden_size is {expected_llm} but {llm.source} has hidden size {llm.hidden_size}; "
                "remove llm_hidden_size or choose a matching LLM."
            )
        self.llm, self.tokenizer = llm.model, llm.tokenizer
        base = self.llm.get_base_model() if int(config["lora_r"]) > 0 else self.llm
        self.is_encoder_decoder = llm.is_encoder_decoder
        self.embed_tokens = base.get_input_embeddings()
        if self.is_encoder_decoder:
            # Encoder-decoder LLMs (Flan-T5 style): soft tokens and the instruction text go into the
            # encoder input; the ranking state is the decoder's first position.
            if config["use_layer_prefix"] or config["use_instruction_prefix"]:
                raise ValueError(
                    f"{llm.source} is an encoder-decoder LLM: it takes the soft tokens in its encoder input, while the "
                    "per-layer key/value prefixes are for decoder-only LLMs. Set use_layer_prefix: False and "
                    "use_instruction_prefix: False, or use a decoder-only llm_path."
                )
            self.decoder = base
            n_layers = kv_heads = head_dim = 0
        else:
            self.decoder = base.model
            text_config = self.decoder.config
            n_layers = llm.num_layers
            kv_heads = int(getattr(text_config, "num_key_value_heads", text_config.num_attention_heads))
            head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads)

        self.user_projector = CFProjector(cf_dim, llm.hidden_size)
        self.history_projector = CFProjector(cf_dim, llm.hidden_size)
        self.semantic_projector = CFProjector(cf_dim, llm.hidden_size)
        self.use_layer_prefix = bool(config["use_layer_prefix"])
        self.use_instruction_prefix = bool(config["use_instruction_prefix"])
        if self.use_layer_prefix:
            self.layer_prefix = LayerPrefixEncoder(cf_dim, n_layers, kv_heads, head_dim, int(config["layer_prefix_length"]))
        if self.use_instruction_prefix:
            self.instruction_prefix = InstructionPrefix(n_layers, kv_heads, head_dim, int(config["instruction_prefix_length"]))
        self.ranking_head = nn.Linear(llm.hidden_size, cf_dim)
        nn.init.zeros_(self.ranking_head.weight)  # starts as the backbone's ranking, learns a correction
        nn.init.zeros_(self.ranking_head.bias)
        self.residual_backbone = bool(config["rank_with_backbone_residual"])
        self.align_weight = float(config["llm_align_weight"])
        self.align_temperature = float(config["align_temperature"])
        self.micro_batch = int(config["llm_micro_batch"])

        title_field = (config["item_text_fields"] or [None])[0]
        titles = item_texts(dataset, [title_field]) if title_field else [""] * dataset.item_num
        self.titles = titles
        self.explanation_template = config["explanation_template"] or " They will enjoy {item} because"
        self.explanation_tokens = int(config["explanation_max_tokens"] or 24)
        self.explanation_full_depth = config["explanation_full_depth"] is not False and llm.num_layers < self._total_layers(config)
        self._llm_settings = (config["llm_path"], config["llm_cache_dir"], config["llm_dtype"])
        self._explainer: Any = None
        self.prompts = PromptBuilder(self.tokenizer, config["prompt_template"], titles, mode=config["prompt_mode"],
                                     history_items=int(config["prompt_history_items"]),
                                     title_max_tokens=int(config["title_max_tokens"]))
        self.task = config["task"] or "ranking"
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got '{self.task}'.")
        if self.task == "labeled":
            # Pointwise protocol (CoLLM / SeLLa-Rec): P(yes) vs P(no) after a prompt naming the candidate.
            self.LABEL = config["LABEL_FIELD"]
            self.prompts.set_candidate_template(config["candidate_template"], self.tokenizer)
            self.answer_ids = resolve_answer_tokens(self.tokenizer, config["answer_words"], config["answer_token_ids"])
            self.backbone_score_weight = nn.Parameter(torch.zeros(1))  # learns how much the CF dot product adds
            self.label_bias = nn.Parameter(torch.zeros(1))
            self.answer_head = nn.Linear(llm.hidden_size, 1)  # learned correction of the yes/no margin
            nn.init.zeros_(self.answer_head.weight)
            nn.init.zeros_(self.answer_head.bias)
            self.HISTORY_LABELS = self.LABEL + config["LIST_SUFFIX"]
            marks = config["history_label_words"]
            self.use_history_labels = bool(marks) or bool(config["label_rate_features"])
            if self.use_history_labels and self.HISTORY_LABELS not in dataset.field2type:
                raise ValueError(
                    f"history_label_words / label_rate_features read the labels of the user's history from the field "
                    f"'{self.HISTORY_LABELS}', which this dataset does not have (is '{self.LABEL}' an interaction field? "
                    "set threshold or LABEL_FIELD in the dataset YAML), or set both keys to ~ / False."
                )
            if marks:
                self.prompts.set_history_marks(marks, self.tokenizer)
            self.rate_features = bool(config["label_rate_features"])
            self.answer_from_llm = config["answer_from_llm"] is not False
            if not self.answer_from_llm and not self.rate_features:
                raise ValueError("answer_from_llm: False scores with the like rates only; it needs label_rate_features: True.")
            if self.rate_features:
                self._init_rate_features(dataset, float(config["rate_prior_strength"]))
        self._eval_item_side: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        instruction = config["instruction_text"] or ""
        self.instruction_ids = self.tokenizer(instruction, add_special_tokens=False, return_tensors="pt")["input_ids"]
        self._instruction_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._lora = int(config["lora_r"]) > 0

    def _init_rate_features(self, dataset: Any, prior: float) -> None:
        """Smoothed like rates: the candidate's among training interactions, the user's in their history.

        Labels lean heavily on who rates (some users like nearly everything) and on what is rated;
        RecBole's LR and FM learn that as user and item biases from many epochs over every pair,
        which a few thousand LLM samples cannot. Here both rates enter the logit as
        ``w_user * logit(user rate) + w_item * logit(item rate) + bias``, with the weights starting
        at 1 and the bias at -logit(global rate) (the naive-Bayes combination), so training starts
        from a sensible score and the LLM learns what the rates miss.
        """
        items = dataset.inter_feat[self.ITEM_ID].long()
        labels = (dataset.inter_feat[self.LABEL].float() >= 0.5).float()
        global_rate = float(labels.mean().clamp(0.01, 0.99)) if labels.numel() else 0.5
        likes = torch.bincount(items, weights=labels, minlength=self.n_items)
        counts = torch.bincount(items, minlength=self.n_items).float()
        self.rate_prior, self.global_rate = prior, global_rate
        self.register_buffer("item_likes", likes, persistent=False)
        self.register_buffer("item_counts", counts, persistent=False)
        self.rate_weights = nn.Parameter(torch.ones(2))  # (user, item)
        with torch.no_grad():
            self.label_bias.fill_(-torch.logit(torch.tensor(global_rate)).item())

    def _rate_logit(self, item_seq_len: torch.Tensor, history_labels: torch.Tensor, candidates: torch.Tensor,
                    own_labels: torch.Tensor | None = None) -> torch.Tensor:
        """With ``own_labels`` (training pairs) each pair's own label is left out of its item's rate,
        so the weight is fitted on the rate a new pair will see, not one that contains its answer."""
        positions = torch.arange(history_labels.size(1), device=history_labels.device).unsqueeze(0)
        real = (positions < item_seq_len.unsqueeze(1)).float()
        liked = ((history_labels >= 0.5).float() * real).sum(1)
        user_rate = (liked + self.rate_prior * self.global_rate) / (real.sum(1) + self.rate_prior)
        likes, counts = self.item_likes[candidates], self.item_counts[candidates]
        if own_labels is not None:
            likes, counts = likes - (own_labels >= 0.5).float(), (counts - 1).clamp(min=0)
        item_rate = (likes.clamp(min=0) + self.rate_prior * self.global_rate) / (counts + self.rate_prior)
        logits = torch.stack([torch.logit(user_rate, eps=1e-4), torch.logit(item_rate, eps=1e-4)], dim=-1)
        return logits @ self.rate_weights

    # ---- frozen collaborative side ----
    def train(self, mode: bool = True) -> "AlignLLMRec":
        super().train(mode)
        self.backbone.eval()  # frozen: dropout off, item table cached
        self.llm.eval()  # frozen base: no dropout (LoRA dropout off too: adapters are small)
        self._eval_item_side = None
        if self._lora:
            self._instruction_kv = None  # adapters may have moved
        return self

    def _item_side(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scoring table [N, C], item ID embeddings [N, C], fused text [N, C]) from the frozen backbone."""
        if self._eval_item_side is None:
            with torch.no_grad():
                table = self.backbone._scoring_table()
                ids = self.backbone.item_embedding.weight
                fused = self.backbone.fused_text()[0] if self.backbone.uses_text else table
            self._eval_item_side = (table.detach(), ids.detach(), fused.detach())
        return self._eval_item_side

    # ---- LLM pass ----
    def instruction_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer key/values of the fixed ``instruction_text`` [1, kv_heads, n, head_dim].

        Computed once and reused by every prompt (recomputed per batch, still once rather than per
        user, when LoRA adapters change the projections during training).
        """
        if self._instruction_kv is not None and not (self._lora and self.training):
            return self._instruction_kv
        from transformers import DynamicCache

        ids = self.instruction_ids.to(self.ranking_head.weight.device)
        with torch.no_grad():
            cache = DynamicCache(config=self.decoder.config)
            self.decoder(input_ids=ids, past_key_values=cache, use_cache=True)
        kv = [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers]
        self._instruction_kv = kv
        return kv

    def _prefix_cache(self, user: torch.Tensor) -> tuple[Any, int]:
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

    def _user_vectors(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """Backbone sequence vectors [B, C]; a user with an empty history gets the zero vector."""
        with torch.no_grad():
            user = self.backbone.forward(item_seq, item_seq_len.clamp(min=1))
        return user * (item_seq_len > 0).unsqueeze(-1)

    def prompt_embeddings(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, user: torch.Tensor,
                          candidates: torch.Tensor | None = None,
                          history_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input embeddings [B, T, D] with soft tokens placed, attention mask [B, T], token ids with placeholders)."""
        _, item_ids, fused = self._item_side()
        prompts = self.prompts.assemble(item_seq.cpu(), item_seq_len.cpu(), None if candidates is None else candidates.cpu(),
                                        None if history_labels is None else history_labels.cpu())
        token_ids = prompts.token_ids.to(item_seq.device)
        slot_items = prompts.slot_items.to(item_seq.device)
        embeds = self.embed_tokens(token_ids.clamp(min=0))
        user_vec = self.user_projector(user).unsqueeze(1).expand_as(embeds)
        embeds = torch.where((token_ids == USER_SLOT).unsqueeze(-1), user_vec, embeds)
        embeds = torch.where((token_ids == HISTORY_SLOT).unsqueeze(-1), self.history_projector(item_ids[slot_items]), embeds)
        embeds = torch.where((token_ids == SEMANTIC_SLOT).unsqueeze(-1), self.semantic_projector(fused[slot_items]), embeds)
        return embeds, prompts.attention_mask.to(item_seq.device), token_ids

    def _llm_states(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, candidates: torch.Tensor | None = None,
                    history_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden state of the prompt [B, D_llm], backbone user vector [B, C]); no vocabulary head."""
        user = self._user_vectors(item_seq, item_seq_len)
        embeds, mask, _ = self.prompt_embeddings(item_seq, item_seq_len, user, candidates, history_labels)
        if self.is_encoder_decoder:
            return self._encoder_decoder_state(embeds, mask), user
        cache, prefix_length = self._prefix_cache(user)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0) + prefix_length
        full_mask = torch.cat([mask.new_ones(mask.size(0), prefix_length), mask], dim=1)
        output = self.decoder(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions,
                              past_key_values=cache, use_cache=cache is not None)
        return output.last_hidden_state[:, -1], user  # left padding: the last position is real

    def _encoder_decoder_state(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder reads [instruction text; prompt with soft tokens]; returns the decoder's first state [B, D]."""
        ids = self.instruction_ids.to(embeds.device)
        if ids.numel() > 0:
            instruction = self.embed_tokens(ids).expand(embeds.size(0), -1, -1)
            embeds = torch.cat([instruction, embeds], dim=1)
            mask = torch.cat([mask.new_ones(mask.size(0), ids.size(1)), mask], dim=1)
        encoded = self.decoder.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        start = torch.full((embeds.size(0), 1), int(self.decoder.config.decoder_start_token_id), device=embeds.device)
        decoded = self.decoder.get_decoder()(input_ids=start, encoder_hidden_states=encoded, encoder_attention_mask=mask)
        return decoded.last_hidden_state[:, 0]

    def _scores_and_query(self, interaction: Any) -> tuple[torch.Tensor, torch.Tensor]:
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        table = self._item_side()[0]
        state, user = self._llm_states(item_seq, item_seq_len)
        query = self.ranking_head(state)
        if self.residual_backbone:
            query = query + user
        return query @ table.T, query

    def answer_logits(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, candidates: torch.Tensor,
                      history_labels: torch.Tensor | None = None, own_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Labeled task: logit of "yes" minus "no" for each (history, candidate) [B], from two rows of
        the LM head only (plus a learned linear correction of that margin from the same state), plus
        a learned share of the backbone's dot-product score and, with ``label_rate_features``, the
        user's and the candidate's smoothed like rates."""
        if self.use_history_labels and history_labels is None:
            raise ValueError(f"This model reads the labels of the history ('{self.HISTORY_LABELS}'); pass history_labels.")
        if self.answer_from_llm:
            state, user = self._llm_states(item_seq, item_seq_len, candidates, history_labels)
            base = self.llm.get_base_model() if self._lora else self.llm
            answer_rows = base.get_output_embeddings().weight[list(self.answer_ids)]  # [2, D]
            yes_no = state @ answer_rows.T
            margin = yes_no[:, 0] - yes_no[:, 1] + self.answer_head(state).squeeze(-1)
        else:  # ablation: the collaborative terms alone, no LLM pass
            user = self._user_vectors(item_seq, item_seq_len)
            margin = torch.zeros_like(user[:, 0])
        backbone_score = (user * self._item_side()[0][candidates]).sum(-1)
        logits = margin + self.backbone_score_weight * backbone_score + self.label_bias
        if self.rate_features:
            logits = logits + self._rate_logit(item_seq_len, history_labels, candidates, own_labels)
        return logits

    def _history_labels(self, interaction: Any) -> torch.Tensor | None:
        return interaction[self.HISTORY_LABELS] if self.use_history_labels else None

    # ---- RecBole interface ----
    def calculate_loss(self, interaction: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.task == "labeled":
            labels = interaction[self.LABEL].float()
            logits = self.answer_logits(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], interaction[self.ITEM_ID],
                                        self._history_labels(interaction), own_labels=labels)
            return F.binary_cross_entropy_with_logits(logits, labels)
        scores, query = self._scores_and_query(interaction)
        target = interaction[self.POS_ITEM_ID]
        loss = F.cross_entropy(scores, target)
        if self.align_weight > 0:
            fused = self._item_side()[2]
            return loss, self.align_weight * info_nce(query, fused[target], self.align_temperature, target)
        return loss

    def predict(self, interaction: Any) -> torch.Tensor:
        if self.task == "labeled":  # P(yes), in micro-batches of llm_micro_batch pairs
            item_seq, lengths, items = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], interaction[self.ITEM_ID]
            labels = self._history_labels(interaction)
            step = self.micro_batch
            with torch.inference_mode():
                scores = torch.cat([torch.sigmoid(self.answer_logits(item_seq[i:i + step], lengths[i:i + step], items[i:i + step],
                                                                     None if labels is None else labels[i:i + step]))
                                    for i in range(0, item_seq.size(0), step)])
            return scores.clone()
        scores = self.full_sort_predict(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)

    def full_sort_predict(self, interaction: Any) -> torch.Tensor:
        """One LLM pass per user, in length-bucketed micro-batches of ``llm_micro_batch`` users.

        Users are sorted by prompt length so each micro-batch pads little, and scored under
        inference mode; the result is returned in the input order, cloned outside inference mode
        because RecBole's evaluator edits scores in place.
        """
        if self.task == "labeled":
            raise ValueError("AlignLLMRec with task: labeled scores (history, candidate) pairs: evaluate with "
                             "eval_args mode: labeled (metrics AUC, UAUC), or set task: ranking for full ranking.")
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        order = torch.tensor(self.prompts.prompt_lengths(item_seq.cpu(), item_seq_len.cpu())).argsort(stable=True)
        order = order.to(item_seq.device)
        with torch.inference_mode():
            scores = torch.empty(item_seq.size(0), self.n_items, device=item_seq.device)
            for start in range(0, len(order), self.micro_batch):
                rows = order[start:start + self.micro_batch]
                part = {self.ITEM_SEQ: item_seq[rows], self.ITEM_SEQ_LEN: item_seq_len[rows]}
                scores[rows] = self._scores_and_query(part)[0]
        return scores.clone()

    # ---- explanations ----
    @staticmethod
    def _total_layers(config: Any) -> int:
        from transformers import AutoConfig

        from recbole_llmalign.llm.loader import resolve_llm_path

        llm_config = AutoConfig.from_pretrained(resolve_llm_path(config["llm_path"], config["llm_cache_dir"]))
        return int(getattr(llm_config, "num_hidden_layers", 0) or getattr(llm_config, "num_layers", 0))

    def explanation_llm(self) -> Any:
        """The LLM that writes explanations: the full-depth pretrained model (loaded once, frozen) when
        ``explanation_full_depth`` is on and the ranking LLM keeps fewer layers; else the ranking LLM.

        A cut LLM's language-model head reads a middle layer and writes no readable text; the full
        model reads the same prompt embeddings (hard text and projected soft tokens share its input
        embedding table) and writes English.
        """
        if not self.explanation_full_depth:
            return None
        if self._explainer is None:
            path, cache_dir, dtype = self._llm_settings
            self._explainer = load_causal_lm(path, cache_dir=cache_dir, dtype=dtype, llm_layers=None).model
            self._explainer.to(self.ranking_head.weight.device)
        return self._explainer

    def explain(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, items: torch.Tensor) -> list[str]:
        """One short generated reason per item in ``items`` for the user ``item_seq[0]``.

        The LLM reads the same hybrid prompt that ranked the items (instruction, soft tokens,
        history titles; plus the learned prefixes when the ranking LLM itself writes), then
        ``explanation_template`` with the item's title, and continues greedily (a mild repetition
        penalty) for up to ``explanation_max_tokens``.
        """
        if self.is_encoder_decoder:
            raise ValueError("Explanations are generated with decoder-only LLMs; this model uses an encoder-decoder one.")
        writer = self.explanation_llm()
        base = self.llm.get_base_model() if self._lora else self.llm
        eos = self.tokenizer.eos_token_id
        reasons = []
        with torch.inference_mode():
            item_seq, item_seq_len = item_seq[:1], item_seq_len[:1]
            user = self._user_vectors(item_seq, item_seq_len)
            prompt, mask, _ = self.prompt_embeddings(item_seq, item_seq_len, user)
            prompt = prompt[:, mask[0].bool()]  # one user: drop padding
            if writer is not None and self.instruction_ids.numel() > 0:  # no cached key/values here: the text goes inline
                prompt = torch.cat([self.embed_tokens(self.instruction_ids.to(prompt.device)), prompt], dim=1)
            for item in items.tolist():
                tail = self.tokenizer(self.explanation_template.format(item=self.titles[item] or f"item {item}"),
                                      add_special_tokens=False, return_tensors="pt")["input_ids"].to(prompt.device)
                embeds = torch.cat([prompt, self.embed_tokens(tail)], dim=1)
                if writer is not None:
                    generated = writer.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                                                device=embeds.device),
                                                max_new_tokens=self.explanation_tokens, do_sample=False, repetition_penalty=1.3,
                                                pad_token_id=eos)[0].tolist()
                else:
                    generated = self._greedy_with_prefixes(base.get_output_embeddings(), embeds, user, eos)
                text = self.tokenizer.decode(generated, skip_special_tokens=True).strip()
                reasons.append(text.split("\n", 1)[0].strip())  # one line: the model may go on to a new paragraph
        return reasons

    def _greedy_with_prefixes(self, lm_head: nn.Module, embeds: torch.Tensor, user: torch.Tensor, eos: int) -> list[int]:
        """Greedy continuation by the ranking LLM itself, behind the instruction key/values and learned prefixes."""
        cache, prefix_length = self._prefix_cache(user)
        positions = torch.arange(embeds.size(1), device=embeds.device).unsqueeze(0) + prefix_length
        attention = torch.ones(1, prefix_length + embeds.size(1), dtype=torch.long, device=embeds.device)
        output = self.decoder(inputs_embeds=embeds, attention_mask=attention, position_ids=positions,
                              past_key_values=cache, use_cache=True)
        generated: list[int] = []
        for _ in range(self.explanation_tokens):
            logits = lm_head(output.last_hidden_state[:, -1])[0]
            if generated:
                seen = torch.tensor(sorted(set(generated)), device=logits.device)
                logits[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.3, logits[seen] * 1.3)
            token = int(logits.argmax())
            if token == eos:
                break
            generated.append(token)
            positions = positions[:, -1:] + 1
            attention = torch.cat([attention, attention.new_ones(1, 1)], dim=1)
            output = self.decoder(inputs_embeds=self.embed_tokens(torch.tensor([[token]], device=logits.device)),
                                  attention_mask=attention, position_ids=positions,
                                  past_key_values=output.past_key_values, use_cache=True)
        return generated

    # ---- trainable-only checkpoints ----
    def trainable_names(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Only trainable parameters: the LLM and backbone are rebuilt from their own files."""
        keep = self.trainable_names()
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if k in keep}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        missing = self.trainable_names() - set(state_dict)
        unexpected = set(state_dict) - self.trainable_names()
        if strict and (missing or unexpected):
            raise RuntimeError(f"AlignLLMRec checkpoint does not match this config: missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}. Was it saved with other prefix/LoRA settings?")
        return super().load_state_dict(state_dict, strict=False, assign=assign)
