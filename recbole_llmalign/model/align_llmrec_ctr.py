"""AlignLLMRecCTR: AlignLLMRec under the pointwise (labeled) protocol: does the user like this item?

Follows CoLLM and SeLLa-Rec: the hybrid prompt of AlignLLMRec (soft tokens, prefixes, history
titles) ends with a text naming one candidate, and the score is the LLM's "Yes" minus "No" logit
at the last position (two rows of the LM head, never the whole vocabulary), trained with BCE on
RecBole's label and evaluated with ``eval_args: {mode: labeled}`` (metrics AUC and UAUC).

What it adds to AlignLLMRec: history items marked liked/disliked (``history_label_words``), the
user's and the candidate's smoothed like rates in the logit (``label_rate_features``), a learned
share of the backbone's dot product, and a linear correction of the yes/no margin. It does not
train by stacking: labeled pairs carry their own negatives and labels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recbole_llmalign.llm.soft_prompt import resolve_answer_tokens
from recbole_llmalign.model.align_llmrec import AlignLLMRec

# Trainables of the ranking head that checkpoints of AlignLLMRec with ``task: labeled`` (before this
# class) carry but never used; dropped when such a checkpoint is loaded.
LEGACY_RANKING_KEYS = ("ranking_head.weight", "ranking_head.bias")


class AlignLLMRecCTR(AlignLLMRec):
    """Yes/no scoring of (history, candidate) pairs with AlignLLMRec's prompt (see module docstring)."""

    supports_cross_fitting = False  # its own loss (yes/no labels) does not go through cross_fitted

    def _build_head(self, config: Any, dataset: Any) -> None:
        """Answer tokens, the margin correction, the backbone-score weight and the like-rate features."""
        self.LABEL = config["LABEL_FIELD"]
        self.prompts.set_candidate_template(config["candidate_template"], self.tokenizer)
        self.answer_ids = resolve_answer_tokens(self.tokenizer, config["answer_words"], config["answer_token_ids"])
        self.backbone_score_weight = nn.Parameter(torch.zeros(1))  # learns how much the CF dot product adds
        self.label_bias = nn.Parameter(torch.zeros(1))
        self.answer_head = nn.Linear(self.llm_hidden_size, 1)  # learned correction of the yes/no margin
        nn.init.zeros_(self.answer_head.weight)
        nn.init.zeros_(self.answer_head.bias)
        self.HISTORY_LABELS = self.LABEL + config["LIST_SUFFIX"]
        marks = config["history_label_words"]
        self.rate_features = bool(config["label_rate_features"])
        self.use_history_labels = bool(marks) or self.rate_features
        if self.use_history_labels and self.HISTORY_LABELS not in dataset.field2type:
            raise ValueError(
                f"history_label_words / label_rate_features read the labels of the user's history from the field "
                f"'{self.HISTORY_LABELS}', which this dataset does not have (is '{self.LABEL}' an interaction field? "
                "set threshold or LABEL_FIELD in the dataset YAML), or set both keys to ~ / False."
            )
        if marks:
            self.prompts.set_history_marks(marks, self.tokenizer)
        self.answer_from_llm = bool(config["answer_from_llm"])
        if not self.answer_from_llm and not self.rate_features:
            raise ValueError("answer_from_llm: False scores with the like rates only; it needs label_rate_features: True.")
        if self.rate_features:
            self._init_rate_features(dataset.inter_feat, float(config["rate_prior_strength"]))

    def _init_rate_features(self, inter_feat: Any, prior: float) -> None:
        """Smoothed like rates: the candidate's among training interactions, the user's in their history.

        Labels lean heavily on who rates (some users like nearly everything) and on what is rated;
        RecBole's LR and FM learn that as user and item biases from many epochs over every pair,
        which a few thousand LLM samples cannot. Here both rates enter the logit as
        ``w_user * logit(user rate) + w_item * logit(item rate) + bias``, with the weights starting
        at 1 and the bias at -logit(global rate) (the naive-Bayes combination), so training starts
        from a sensible score and the LLM learns what the rates miss.
        """
        items = inter_feat[self.ITEM_ID].long()
        labels = (inter_feat[self.LABEL].float() >= 0.5).float()
        global_rate = float(labels.mean().clamp(0.01, 0.99)) if labels.numel() else 0.5
        self.rate_prior, self.global_rate = prior, global_rate
        self.register_buffer("item_likes", torch.bincount(items, weights=labels, minlength=self.n_items), persistent=False)
        self.register_buffer("item_counts", torch.bincount(items, minlength=self.n_items).float(), persistent=False)
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

    def answer_logits(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, candidates: torch.Tensor,
                      history_labels: torch.Tensor | None = None, own_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logit of "yes" minus "no" for each (history, candidate) [B], from two rows of the LM head
        only (plus a learned linear correction of that margin from the same state), plus a learned
        share of the backbone's dot-product score and, with ``label_rate_features``, the user's and
        the candidate's smoothed like rates."""
        if self.use_history_labels and history_labels is None:
            raise ValueError(f"This model reads the labels of the history ('{self.HISTORY_LABELS}'); pass history_labels.")
        if self.answer_from_llm:
            state, user = self.llm_states(item_seq, item_seq_len, candidates, history_labels)
            state = state.float()  # the head in float32, whatever dtype the LLM ran in
            yes_no = state @ self.lm_head.weight[list(self.answer_ids)].float().T  # [B, 2]
            margin = yes_no[:, 0] - yes_no[:, 1] + self.answer_head(state).squeeze(-1)
        else:  # ablation: the collaborative terms alone, no LLM pass
            user = self.user_vectors(item_seq, item_seq_len)
            margin = torch.zeros_like(user[:, 0])
        backbone_score = (user * self.item_side().scoring[candidates]).sum(-1)
        logits = margin + self.backbone_score_weight * backbone_score + self.label_bias
        if self.rate_features:
            logits = logits + self._rate_logit(item_seq_len, history_labels, candidates, own_labels)
        return logits

    def _history_labels(self, interaction: Any) -> torch.Tensor | None:
        return interaction[self.HISTORY_LABELS] if self.use_history_labels else None

    # ---- RecBole interface ----
    def calculate_loss(self, interaction: Any) -> torch.Tensor:
        labels = interaction[self.LABEL].float()
        logits = self.answer_logits(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], interaction[self.ITEM_ID],
                                    self._history_labels(interaction), own_labels=labels)
        return F.binary_cross_entropy_with_logits(logits, labels)

    def predict(self, interaction: Any) -> torch.Tensor:
        """P(yes) per pair, in micro-batches of ``llm_micro_batch`` pairs."""
        item_seq, lengths, items = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], interaction[self.ITEM_ID]
        labels = self._history_labels(interaction)
        step = self.micro_batch
        with torch.inference_mode():
            scores = torch.cat([torch.sigmoid(self.answer_logits(item_seq[i:i + step], lengths[i:i + step], items[i:i + step],
                                                                 None if labels is None else labels[i:i + step]))
                                for i in self.micro_batch_starts(item_seq.size(0), "LLM yes/no")])
        return scores.clone()

    def full_sort_predict(self, interaction: Any) -> torch.Tensor:
        raise ValueError("AlignLLMRecCTR scores (history, candidate) pairs: evaluate with eval_args mode: labeled "
                         "(metrics AUC, UAUC), or use --model=AlignLLMRec for full ranking.")

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        state_dict = {k: v for k, v in state_dict.items() if k not in LEGACY_RANKING_KEYS}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
