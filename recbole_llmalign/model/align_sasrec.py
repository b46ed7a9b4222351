"""AlignSASRec: SASRec whose items are fused with their text and aligned to it contrastively.

Follows Align-LLMRec (text fusion on a contrastive CF backbone) and SeLLa-Rec's contrastive
alignment. RecBole's SASRec supplies the transformer encoder; this class adds
- item text: metadata through a sentence encoder, reviews (training interactions only) through a
  BERT-family encoder, merged per item by cross-attention (``text/fusion.py``);
- an item table that is ``id``, ``text`` or ``id+text`` (cold items score through their text);
- next-item loss (CE over all items, or BPR with sampled negatives) plus InfoNCE between
  (a) the sequence representation and the target's fused text, (b) item IDs and their text;
- ``train_mode: all_positions``: each user window once with a causal mask and a loss at every
  position (the original SASRec recipe), beside RecBole's ``prefix`` augmentation;
- ``unseen_items: text``: an item the training split never shows (new under ``new_item_ratio``)
  is left out of the CE softmax, since it did not exist when training ran (plain SASRec makes it
  a negative of every step, which teaches even a text-aware model never to rank it), and its
  untrained ID row is replaced in scoring by the mean ID row of its nearest trained items by text;
- ``init_checkpoint``: start from another AlignSASRec's weights (a warm start: AlignLLMRec's
  backbone refit continues its holdout backbone on every training target, so the refit keeps the
  vector space the LLM learned to read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_llmalign.data.sampling import parse_user_fold
from recbole_llmalign.model.layers import info_nce
from recbole_llmalign.model.unseen_items import text_only_item_vectors, training_items
from recbole_llmalign.text.features import item_text_features
from recbole_llmalign.text.fusion import CrossAttentionFusion, fuse_in_chunks

ITEM_REPRESENTATIONS = ("id", "text", "id+text")
UNSEEN_ITEM_MODES = ("text", "negatives")
TRAIN_MODES = ("prefix", "all_positions")


class AlignSASRec(SASRec):
    """SASRec + text fusion + contrastive alignment (see module docstring)."""

    def __init__(self, config: Any, dataset: Any) -> None:
        super().__init__(config, dataset)
        self.item_representation = config["item_representation"]
        self.train_mode = config["train_mode"]
        if self.item_representation not in ITEM_REPRESENTATIONS:
            raise ValueError(f"item_representation must be one of {ITEM_REPRESENTATIONS}, got '{self.item_representation}'.")
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got '{self.train_mode}'.")
        self.uses_text = self.item_representation != "id"
        self.seq_text_align_weight = float(config["seq_text_align_weight"]) if self.uses_text else 0.0
        self.id_text_align_weight = float(config["id_text_align_weight"]) if self.item_representation == "id+text" else 0.0
        self.align_temperature = float(config["align_temperature"])
        self.align_max_rows = int(config["align_max_rows"])
        chunk = config["eval_item_chunk"]
        self.eval_item_chunk = 65536 if chunk is None else int(chunk)  # None: a checkpoint older than the key
        if self.eval_item_chunk < 1:
            raise ValueError(f"eval_item_chunk must be a positive number of items, got {self.eval_item_chunk}.")
        self.text_seconds = 0.0
        if self.uses_text:
            features = item_text_features(config, dataset)
            self.text_seconds = float(features["seconds"])
            # Buffers, not parameters: frozen encoder outputs, rebuilt from the cache on load.
            self.register_buffer("text_meta", features["meta"], persistent=False)
            self.register_buffer("text_has_meta", features["has_meta"], persistent=False)
            self.register_buffer("text_reviews", features["reviews"], persistent=False)
            self.register_buffer("text_review_mask", features["review_mask"], persistent=False)
            review_dim = max(int(features["reviews"].size(-1)), 1)
            self.fusion = CrossAttentionFusion(features["meta"].size(-1), review_dim, self.hidden_size,
                                               n_heads=int(config["fusion_heads"]), dropout=self.hidden_dropout_prob)
            self.fusion.apply(self._init_weights)
        # items the training split never shows (new under new_item_ratio, or seen only in valid/test)
        mode = config["unseen_items"] or "negatives"  # None: a checkpoint older than the key trained them as negatives
        if mode not in UNSEEN_ITEM_MODES:
            raise ValueError(f"unseen_items must be one of {UNSEEN_ITEM_MODES}, got '{mode}'.")
        self.unseen_items = mode if self.uses_text else "negatives"  # ids only: plain SASRec, nothing to read them from
        self.unseen_item_neighbours = int(config["unseen_item_neighbours"] or 0)
        unseen = ~training_items(dataset, self.n_items, int(config["holdout_last_targets"] or 0),
                                 parse_user_fold(config["exclude_user_fold"]))  # as the loss sees them
        unseen[0] = False  # padding: RecBole's CE keeps its column; only real items are left out
        self.register_buffer("unseen_item_mask", unseen, persistent=False)
        self._eval_table: torch.Tensor | None = None
        if config["init_checkpoint"]:
            self.warm_start(config["init_checkpoint"], trust=bool(config["trust_checkpoint"]))

    def warm_start(self, checkpoint_path: str, trust: bool = False) -> None:
        """Load every weight of another AlignSASRec checkpoint of the same sizes (``init_checkpoint``).

        All or nothing: a checkpoint of another model, dataset or size is refused with what differs,
        never loaded in part (a partial start would train a model nobody asked for)."""
        from recbole_llmalign.compat import load_checkpoint

        if not Path(checkpoint_path).is_file():
            raise FileNotFoundError(f"init_checkpoint {checkpoint_path} does not exist; point it at an AlignSASRec .pth file "
                                    "or set init_checkpoint to ~ for a fresh start.")
        checkpoint = load_checkpoint(checkpoint_path, map_location="cpu", trust=trust)
        source = checkpoint["config"]["model"]
        if source != "AlignSASRec":
            raise ValueError(f"init_checkpoint {checkpoint_path} holds a {source}, not an AlignSASRec.")
        state, own = checkpoint["state_dict"], self.state_dict()
        differs = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if differs or missing or unexpected:
            detail = "; ".join(f"{what}: {names[:4]}" for what, names in (
                ("other shapes", differs), ("missing", missing), ("unexpected", unexpected)) if names)
            raise ValueError(f"init_checkpoint {checkpoint_path} does not fit this AlignSASRec ({detail}). Warm-start from "
                             "a checkpoint of the same dataset config, hidden_size, n_layers, item_representation and text fields.")
        self.load_state_dict(state)

    # ---- item side ----
    def fused_text(self, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused text vector per item [N, H], attention weights [N, 1+R]: slot 0 metadata, then reviews).

        ``rows`` restricts it to a slice of items (fusion is per item, so slices compose).
        """
        return self.fusion(self.text_meta[rows], self.text_has_meta[rows], self.text_reviews[rows],
                           self.text_review_mask[rows])

    def _item_table(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(item vectors used for input and scoring [N, H], fused text [N, H] or None)."""
        if not self.uses_text:
            return self.item_embedding.weight, None
        fused, _ = self.fused_text()
        if self.item_representation == "text":
            return fused, fused
        return self.item_embedding.weight + fused, fused

    def _scoring_table(self) -> torch.Tensor:
        """Item table, computed once per evaluation (cached until the model trains again).

        In evaluation it is built ``eval_item_chunk`` items at a time, so the fusion's
        intermediates stay bounded however large the catalog; only the [N, H] table is kept.
        """
        if self.training:
            return self._item_table()[0]
        if self._eval_table is None:
            with torch.no_grad():
                self._eval_table = self._with_unseen_items_from_text(self._chunked_item_table())
        return self._eval_table

    def _with_unseen_items_from_text(self, table: torch.Tensor) -> torch.Tensor:
        """``unseen_items: text``, ids + text: an unseen item's untrained ID row is replaced by the
        mean ID row of the ``unseen_item_neighbours`` trained items closest to it by fused text
        (its fused text stays), so it is scored like the items its text resembles."""
        if self.unseen_items != "text" or self.item_representation != "id+text" or not bool(self.unseen_item_mask.any()):
            return table
        ids = self.item_embedding.weight.detach()
        fused = table - ids  # the table is ID row + fused text
        trained = ~self.unseen_item_mask
        trained[0] = False
        borrowed = text_only_item_vectors(ids[1:], fused[1:], trained[1:], self.unseen_item_neighbours)
        return torch.cat([table[:1], borrowed + fused[1:]])

    def _chunked_item_table(self) -> torch.Tensor:
        if not self.uses_text:
            return self.item_embedding.weight.detach()
        base = None if self.item_representation == "text" else self.item_embedding.weight
        return fuse_in_chunks(self.fusion, self.text_meta, self.text_has_meta, self.text_reviews, self.text_review_mask,
                              self.eval_item_chunk, base=base)

    def train(self, mode: bool = True) -> AlignSASRec:
        self._eval_table = None
        return super().train(mode)

    # ---- sequence side ----
    def _encode(self, item_seq: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Transformer output at every position [B, L, H] (causal mask, as SASRec).

        Rows of a trainable table are looked up with ``F.embedding`` throughout: the gradient of
        plain indexing (``table[item_seq]``) accumulates repeated ids in thread order on CPUs, so
        two runs of one seed trained apart; the embedding gradient sums in a fixed order.
        """
        positions = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0).expand_as(item_seq)
        items = F.embedding(item_seq, table) * (item_seq > 0).unsqueeze(-1)  # not table[...]: see the docstring
        hidden = self.dropout(self.LayerNorm(items + self.position_embedding(positions)))
        return self.trm_encoder(hidden, self.get_attention_mask(item_seq), output_all_encoded_layers=True)[-1]

    @staticmethod
    def _trim(item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """Drop the padding columns no sequence of the batch reaches.

        RecBole pads every history to MAX_ITEM_LIST_LENGTH on the right; with the causal mask no
        real position attends to them, so cutting them changes no output but saves their cost
        (on amazon-games the mean window is 7 items long, padded to 50)."""
        return item_seq[:, : max(int(seq_len.max()), 1)]

    def _user_vectors(self, interaction: Any, table: torch.Tensor) -> torch.Tensor:
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], table)

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        table = self._scoring_table() if table is None else table
        return self.gather_indexes(self._encode(self._trim(item_seq, item_seq_len), table), item_seq_len - 1)

    # ---- training ----
    def _training_pairs(self, interaction: Any, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence vectors, their target item ids): last position only, or every position."""
        seq_len, target = interaction[self.ITEM_SEQ_LEN], interaction[self.POS_ITEM_ID]
        item_seq = self._trim(interaction[self.ITEM_SEQ], seq_len)
        output = self._encode(item_seq, table)
        if self.train_mode == "prefix":
            return self.gather_indexes(output, seq_len - 1), target
        targets = torch.zeros_like(item_seq)
        targets[:, :-1] = item_seq[:, 1:]
        targets.scatter_(1, (seq_len - 1).unsqueeze(1), target.unsqueeze(1))
        valid = targets > 0
        return output[valid], targets[valid]

    def calculate_loss(self, interaction: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        table, fused = self._item_table()
        vectors, targets = self._training_pairs(interaction, table)
        if self.loss_type == "CE":
            logits = vectors @ table.T
            if self.unseen_items == "text":  # they did not exist at training time: not negatives of every step
                logits = logits.masked_fill(self.unseen_item_mask, float("-inf"))
            next_item_loss = F.cross_entropy(logits, targets)
        else:  # BPR against one uniformly sampled negative per target
            negatives = torch.randint(1, self.n_items, targets.shape, device=targets.device)
            next_item_loss = self.loss_fct((vectors * F.embedding(targets, table)).sum(-1),
                                           (vectors * F.embedding(negatives, table)).sum(-1))
        if fused is None or (self.seq_text_align_weight == 0 and self.id_text_align_weight == 0):
            return next_item_loss
        rows = torch.randperm(targets.numel(), device=targets.device)[: self.align_max_rows]
        align = self.seq_text_align_weight * info_nce(vectors[rows], F.embedding(targets[rows], fused), self.align_temperature,
                                                      targets[rows])
        if self.id_text_align_weight > 0:
            items = torch.unique(torch.cat([targets, interaction[self.ITEM_SEQ].flatten()]))
            items = items[items > 0][: self.align_max_rows]
            align = align + self.id_text_align_weight * info_nce(self.item_embedding(items), fused[items], self.align_temperature)
        return next_item_loss, align

    # ---- scoring ----
    def predict(self, interaction: Any) -> torch.Tensor:
        table = self._scoring_table()
        return (self._user_vectors(interaction, table) * table[interaction[self.ITEM_ID]]).sum(-1)

    def full_sort_predict(self, interaction: Any) -> torch.Tensor:
        table = self._scoring_table()
        return self._user_vectors(interaction, table) @ table.T
