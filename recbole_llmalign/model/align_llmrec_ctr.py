"""AlignLLMRecCTR: AlignLLMRec under the pointwise (labeled) protocol: does the user like this item?

Follows CoLLM and SeLLa-Rec: the hybrid prompt of AlignLLMRec (soft tokens, prefixes, history
titles) ends with a text naming one candidate, and the score is the LLM's "Yes" minus "No" logit
at the last position (two rows of the LM head, never the whole vocabulary), trained with BCE on
RecBole's label and evaluated with ``eval_args: {mode: labeled}`` (metrics AUC and UAUC).

What it adds to AlignLLMRec: history items marked liked/disliked (``history_label_words``), the
user's and the candidate's smoothed like rates in the logit (``label_rate_features``), a learned
share of the backbone's dot product, and a linear correction of the yes/no margin. It does not
train by stacking: labeled pairs carry their own negatives and labels.

The AlignSASRec backbone learns what a user watches next, not what they like (as a pair scorer its
UAUC on ml-1m-ctr is near chance). CoLLM's collaborative side is a model trained on the labels
themselves; ``ctr_scorer_checkpoint`` plays that part: a RecBole context-aware model (LR, FM,
DeepFM, ...) trained on the same labeled dataset, frozen, whose logit for each pair is added with a
weight starting at 1 (the like-rate weights and the bias then start at 0), so training starts from
that model's score and the LLM learns what it misses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from recbole_llmalign.llm.soft_prompt import resolve_answer_tokens
from recbole_llmalign.model.align_llmrec import AlignLLMRec

if TYPE_CHECKING:
    from recbole.data.interaction import Interaction

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
        self.ctr_scorer: nn.Module | None = None
        if config["ctr_scorer_checkpoint"]:
            self._build_ctr_scorer(str(config["ctr_scorer_checkpoint"]), dataset, bool(config["trust_checkpoint"]))

    def _build_ctr_scorer(self, path: str, dataset: Any, trust: bool) -> None:
        """The frozen CTR model of ``ctr_scorer_checkpoint``, rebuilt on its own dataset (its fields and token ids
        are its own), with this dataset's user and item ids mapped to its ids by token."""
        from pathlib import Path

        from recbole.data import create_dataset
        from recbole.utils import ModelType

        from recbole_llmalign.compat import load_checkpoint
        from recbole_llmalign.utils import get_model

        if not Path(path).is_file():
            raise FileNotFoundError(f"ctr_scorer_checkpoint {path} does not exist; point it at the .pth of a RecBole "
                                    "context-aware model (e.g. --model=FM) trained on this labeled dataset.")
        checkpoint = load_checkpoint(path, map_location="cpu", trust=trust)
        scorer_config = checkpoint["config"]
        scorer_class = get_model(scorer_config["model"])
        if scorer_class.type != ModelType.CONTEXT:
            raise ValueError(f"ctr_scorer_checkpoint holds a {scorer_config['model']} ({scorer_class.type.name} model); it "
                             "must be a RecBole context-aware model (LR, FM, DeepFM, ...) trained on this labeled dataset.")
        if scorer_config["dataset"] != dataset.dataset_name:
            raise ValueError(f"ctr_scorer_checkpoint was trained on {scorer_config['dataset']}, this run is on "
                             f"{dataset.dataset_name}: train the CTR model on the same dataset.")
        scorer_dataset = create_dataset(scorer_config)
        scorer_dataset.build()  # turns its user/item features into the Interaction tables join() reads; splits unused
        scorer = scorer_class(scorer_config, scorer_dataset)
        scorer.load_state_dict(checkpoint["state_dict"])
        self.ctr_scorer = scorer.eval().requires_grad_(False)
        self.ctr_dataset = scorer_dataset
        for field, name in ((self.USER_ID, "ctr_user_ids"), (self.ITEM_ID, "ctr_item_ids")):
            tokens = dataset.field2id_token[field]
            known = scorer_dataset.field2token_id[field]
            missing = [str(token) for token in tokens[1:] if token not in known]
            if missing:
                raise ValueError(f"ctr_scorer_checkpoint's dataset lacks {len(missing)} {field} values of this one (e.g. "
                                 f"{missing[:3]}): train the CTR model on the same dataset and filters.")
            ids = torch.tensor([0] + [known[token] for token in tokens[1:]], dtype=torch.long)
            self.register_buffer(name, ids, persistent=False)
        self.ctr_scorer_weight = nn.Parameter(torch.ones(1))  # training starts from the CTR model's score ...
        with torch.no_grad():  # ... alone: it has its own user and item biases, so the like rates start at 0
            self.label_bias.zero_()
            if self.rate_features:
                self.rate_weights.zero_()

    def train(self, mode: bool = True) -> AlignLLMRecCTR:
        super().train(mode)
        if getattr(self, "ctr_scorer", None) is not None:
            self.ctr_scorer.eval()  # frozen: no dropout (DeepFM's MLP has some)
        return self

    def ctr_scorer_logits(self, interaction: Interaction) -> torch.Tensor | None:
        """The frozen CTR model's logit per pair [B], or None without ``ctr_scorer_checkpoint``."""
        if self.ctr_scorer is None:
            return None
        from recbole.data.interaction import Interaction

        users = self.ctr_user_ids[interaction[self.USER_ID]].cpu()
        items = self.ctr_item_ids[interaction[self.ITEM_ID]].cpu()
        pairs = self.ctr_dataset.join(Interaction({self.USER_ID: users, self.ITEM_ID: items}))  # its item/user features
        with torch.no_grad():
            probability = self.ctr_scorer.predict(pairs.to(self.ctr_user_ids.device))
        return torch.logit(probability.float(), eps=1e-6)

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
                      history_labels: torch.Tensor | None = None, own_labels: torch.Tensor | None = None,
                      ctr_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Logit of "yes" minus "no" for each (history, candidate) [B], from two rows of the LM head
        only (plus a learned linear correction of that margin from the same state), plus a learned
        share of the backbone's dot-product score, with ``label_rate_features`` the user's and the
        candidate's smoothed like rates, and with ``ctr_scorer_checkpoint`` a learned share of that
        model's logit (``ctr_logits``, from :meth:`ctr_scorer_logits`)."""
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
        if self.ctr_scorer is not None:
            if ctr_logits is None:
                raise ValueError("This model adds its CTR scorer's logit (ctr_scorer_checkpoint); pass ctr_logits.")
            logits = logits + self.ctr_scorer_weight * ctr_logits
        return logits

    def _history_labels(self, interaction: Any) -> torch.Tensor | None:
        return interaction[self.HISTORY_LABELS] if self.use_history_labels else None

    # ---- RecBole interface ----
    def calculate_loss(self, interaction: Any) -> torch.Tensor:
        labels = interaction[self.LABEL].float()
        logits = self.answer_logits(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], interaction[self.ITEM_ID],
                                    self._history_labels(interaction), own_labels=labels,
                                    ctr_logits=self.ctr_scorer_logits(interaction))
        return F.binary_cross_entropy_with_logits(logits, labels)

    def predict(self, interaction: Any) -> torch.Tensor:
        """P(yes) per pair, in micro-batches of ``llm_micro_batch`` pairs."""
        item_seq, lengths, items = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], interaction[self.ITEM_ID]
        labels, ctr = self._history_labels(interaction), self.ctr_scorer_logits(interaction)
        part = lambda values, i: None if values is None else values[i:i + step]  # noqa: E731
        step = self.micro_batch
        with torch.inference_mode():
            scores = torch.cat([torch.sigmoid(self.answer_logits(item_seq[i:i + step], lengths[i:i + step], items[i:i + step],
                                                                 part(labels, i), ctr_logits=part(ctr, i)))
                                for i in self.micro_batch_starts(item_seq.size(0), "LLM yes/no")])
        return scores.clone()

    def full_sort_predict(self, interaction: Any) -> torch.Tensor:
        raise ValueError("AlignLLMRecCTR scores (history, candidate) pairs: evaluate with eval_args mode: labeled "
                         "(metrics AUC, UAUC), or use --model=AlignLLMRec for full ranking.")

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        state_dict = {k: v for k, v in state_dict.items() if k not in LEGACY_RANKING_KEYS}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
