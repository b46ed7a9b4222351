"""Building blocks of a soft-prompted LLM recommender (used by ``model/align_llmrec.py``).

- ``CFProjector``: collaborative vectors -> LLM input embeddings (the soft tokens).
- ``LayerPrefixEncoder``: per-layer key/value prefixes reparameterised from the user's CF vector.
- ``InstructionPrefix``: learnable per-layer key/value prefixes shared by every user.
- ``PromptBuilder``: a hard-text template with soft-token placeholders, pre-tokenised once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from recbole_llmalign.devices import HOST

# Placeholder ids in assembled prompts (negative, so they can never clash with a real token).
USER_SLOT, HISTORY_SLOT, SEMANTIC_SLOT = -1, -2, -3
PROMPT_MODES = ("hybrid", "soft", "titles")


class CFProjector(nn.Module):
    """Two-layer MLP from a CF vector to the LLM's input embedding size."""

    def __init__(self, cf_dim: int, llm_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cf_dim, llm_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(llm_dim, llm_dim))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.net(vectors)


class LayerPrefixEncoder(nn.Module):
    """User CF vector [B, C] -> per-layer (key, value) prefixes [B, kv_heads, P, head_dim] for each layer.

    A shared bottleneck followed by one output projection per layer (RA-Rec's layer-specific
    reparameterisation): each layer gets its own view of the user.
    """

    def __init__(self, cf_dim: int, n_layers: int, kv_heads: int, head_dim: int, length: int, bottleneck: int = 128) -> None:
        super().__init__()
        self.n_layers, self.kv_heads, self.head_dim, self.length = n_layers, kv_heads, head_dim, length
        self.shared = nn.Sequential(nn.Linear(cf_dim, bottleneck), nn.Tanh())
        self.per_layer = nn.ModuleList(nn.Linear(bottleneck, 2 * length * kv_heads * head_dim) for _ in range(n_layers))

    def forward(self, user: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        hidden = self.shared(user)
        batch = user.size(0)
        prefixes = []
        for layer in self.per_layer:
            kv = layer(hidden).view(batch, 2, self.kv_heads, self.length, self.head_dim)
            prefixes.append((kv[:, 0], kv[:, 1]))
        return prefixes


class InstructionPrefix(nn.Module):
    """Learnable per-layer key/value vectors: a contextual instruction every prompt starts from."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, length: int) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.randn(n_layers, kv_heads, length, head_dim) * 0.02)
        self.values = nn.Parameter(torch.randn(n_layers, kv_heads, length, head_dim) * 0.02)

    def forward(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.keys[i].expand(batch, -1, -1, -1), self.values[i].expand(batch, -1, -1, -1))
                for i in range(self.keys.size(0))]


class PromptPoolingReader(nn.Module):
    """The LLM ablation (``prompt_reader: mlp``): an MLP reads the same prompt embeddings instead of the LLM.

    Input per user: the user soft token, the mean of the history ID tokens, the mean of the
    history semantic tokens and the mean of the remaining (text) token embeddings, concatenated
    [B, 4 D]; output [B, D], the place of the LLM's last hidden state, so the ranking head and
    losses are unchanged. What it cannot do is what the LLM is claimed to add: read order, words
    in context and the pretrained knowledge behind them. ``width`` is chosen by the model so the
    trainable size matches the LLM-only trainables it replaces (prefixes, LoRA).

    With ``candidate`` (prompts that end by naming one candidate item, ``rerank_top_n``), the
    candidate's own ID and semantic tokens (the last of each in the prompt) are two more inputs
    [B, 6 D] and leave the history means, so the MLP can tell the candidate from the history.
    """

    def __init__(self, dim: int, width: int, dropout: float = 0.1, candidate: bool = False) -> None:
        super().__init__()
        self.candidate = candidate
        self.net = nn.Sequential(nn.Linear(self.inputs(candidate) * dim, width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(width, dim))

    @staticmethod
    def inputs(candidate: bool) -> int:
        return 6 if candidate else 4

    @staticmethod
    def width_for(dim: int, parameters: int, candidate: bool = False) -> int:
        """Hidden width whose two layers hold about ``parameters`` weights (at least 64)."""
        return max(64, round((parameters - dim) / ((PromptPoolingReader.inputs(candidate) + 1) * dim + 1)))

    def forward(self, embeds: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        real = mask.bool()

        def mean_of(where: torch.Tensor) -> torch.Tensor:
            weights = (where & real).unsqueeze(-1).to(embeds.dtype)
            return (embeds * weights).sum(1) / weights.sum(1).clamp(min=1.0)

        history, semantic = token_ids == HISTORY_SLOT, token_ids == SEMANTIC_SLOT
        soft = (token_ids == USER_SLOT) | history | semantic
        own: list[torch.Tensor] = []
        if self.candidate:  # the candidate's piece comes last: its slots are the last of each kind
            positions = torch.arange(token_ids.size(1), device=token_ids.device).expand_as(token_ids)
            for where in (history, semantic):
                found = where & real
                last = torch.where(found, positions, torch.full_like(positions, -1)).max(1).values  # [B], -1: none
                is_last = (positions == last.unsqueeze(1)) & found
                own.append(mean_of(is_last))
                where &= ~is_last  # out of the history mean (history and semantic are fresh tensors, not token_ids)
        pooled = [mean_of(token_ids == USER_SLOT), mean_of(history), mean_of(semantic), mean_of(~soft)] + own
        return self.net(torch.cat(pooled, dim=-1))


@dataclass
class AssembledPrompts:
    """Left-padded token ids with placeholders, the item id behind each item placeholder, and the mask."""

    token_ids: torch.Tensor  # [B, T] real ids >= 0, placeholders < 0, padding = pad id
    slot_items: torch.Tensor  # [B, T] item id at HISTORY/SEMANTIC placeholders, else 0
    attention_mask: torch.Tensor  # [B, T]


class PromptBuilder:
    """A template such as ``"A user {user} watched {history}. Next:"`` with soft tokens placed in it.

    ``{user}`` becomes the user soft token; ``{history}`` the last ``history_items`` items, each
    rendered by ``prompt_mode``: ``hybrid`` = title + item ID token + item semantic token,
    ``soft`` = the two soft tokens only, ``titles`` = title only. Static text and every item title
    are tokenised once, so assembling a batch is list concatenation.
    """

    def __init__(self, tokenizer: Any, template: str, titles: Sequence[str], mode: str = "hybrid",
                 history_items: int = 5, title_max_tokens: int = 12, separator: str = ", ") -> None:
        if mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got '{mode}'.")
        if "{user}" not in template or "{history}" not in template:
            raise ValueError(f"prompt_template must contain {{user}} and {{history}}; got {template!r}.")
        self.mode, self.history_items = mode, history_items
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        head, rest = template.split("{user}", 1)
        middle, tail = rest.split("{history}", 1)
        self.head, self.middle, self.tail = encode(head), encode(middle), encode(tail)
        self.separator = encode(separator)
        self.title_ids = [encode(" " + title)[:title_max_tokens] if title else [] for title in titles]
        self.candidate_head: list[int] = []
        self.candidate_tail: list[int] = []
        self.mark_ids: tuple[list[int], list[int]] | None = None

    def set_history_marks(self, words: Sequence[str], tokenizer: Any) -> None:
        """Words placed after each history item by the user's label on it, e.g. ``[" (liked)", " (disliked)"]``.

        In the labeled protocol the history holds disliked items too; without a mark the LLM reads
        them as things the user enjoyed (CoLLM and TALLRec list liked and disliked items apart).
        """
        if len(words) != 2:
            raise ValueError(f"history_label_words must be two words (liked, disliked), got {list(words)}.")
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.mark_ids = (encode(words[0]), encode(words[1]))

    def set_candidate_template(self, template: str, tokenizer: Any) -> None:
        """Text after the prompt that names a candidate item, e.g. ``" Will they enjoy {candidate}? Answer:"``."""
        if "{candidate}" not in template:
            raise ValueError(f"candidate_template must contain {{candidate}}; got {template!r}.")
        head, tail = template.split("{candidate}", 1)
        self.candidate_head = tokenizer(head, add_special_tokens=False)["input_ids"]
        self.candidate_tail = tokenizer(tail, add_special_tokens=False)["input_ids"]

    def _item_piece(self, item: int) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        if self.mode in ("hybrid", "titles"):
            ids += self.title_ids[item]
        if self.mode in ("hybrid", "soft"):
            ids += [HISTORY_SLOT, SEMANTIC_SLOT]
        return ids, [item if i < 0 else 0 for i in ids]

    def _mark(self, label: float | None) -> list[int]:
        if self.mark_ids is None or label is None:
            return []
        return self.mark_ids[0] if label >= 0.5 else self.mark_ids[1]

    def prompt_lengths(self, history: torch.Tensor, lengths: torch.Tensor,
                       history_labels: torch.Tensor | None = None) -> list[int]:
        """Token count of each user's prompt, without assembling it (for length-bucketed batches)."""
        static = len(self.head) + 1 + len(self.middle) + len(self.tail)
        labels = history_labels.tolist() if history_labels is not None else [None] * len(lengths)
        out = []
        for sequence, length, row_labels in zip(history.tolist(), lengths.tolist(), labels):
            start = max(0, length - self.history_items)
            recent = sequence[start:length]
            marks = [None] * len(recent) if row_labels is None else row_labels[start:length]
            items = sum(len(self._item_piece(item)[0]) + len(self._mark(mark)) for item, mark in zip(recent, marks))
            out.append(static + items + len(self.separator) * max(len(recent) - 1, 0))
        return out

    def assemble(self, history: torch.Tensor, lengths: torch.Tensor, candidates: torch.Tensor | None = None,
                 history_labels: torch.Tensor | None = None) -> AssembledPrompts:
        """Prompts for RecBole item sequences ``history`` [B, L] (right-padded) with ``lengths`` [B].

        With ``candidates`` [B] (item ids), each prompt ends with the candidate template naming
        that item (title and/or soft tokens, as ``prompt_mode`` renders history items). With
        ``history_labels`` [B, L] and marks set (``set_history_marks``), each history item is
        followed by its liked / disliked word.
        """
        if candidates is not None and not (self.candidate_head or self.candidate_tail):
            raise ValueError("Prompts with candidates need set_candidate_template() first.")
        rows, row_items = [], []
        candidate_list = candidates.tolist() if candidates is not None else [None] * len(lengths)
        label_list = history_labels.tolist() if history_labels is not None else [None] * len(lengths)
        for sequence, length, candidate, row_labels in zip(history.tolist(), lengths.tolist(), candidate_list, label_list):
            start = max(0, length - self.history_items)
            recent = sequence[start:length]
            marks = [None] * len(recent) if row_labels is None else row_labels[start:length]
            ids = self.head + [USER_SLOT] + self.middle
            items = [0] * len(ids)
            for position, (item, mark) in enumerate(zip(recent, marks)):
                if position:
                    ids += self.separator
                    items += [0] * len(self.separator)
                piece, piece_items = self._item_piece(item)
                mark_ids = self._mark(mark)
                ids += piece + mark_ids
                items += piece_items + [0] * len(mark_ids)
            ids += self.tail
            items += [0] * len(self.tail)
            if candidate is not None:
                piece, piece_items = self._item_piece(candidate)
                ids += self.candidate_head + piece + self.candidate_tail
                items += [0] * len(self.candidate_head) + piece_items + [0] * len(self.candidate_tail)
            rows.append(ids)
            row_items.append(items)
        width = max(len(r) for r in rows)  # built on the host from lists; the model moves them once per batch
        token_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=HOST)
        slot_items = torch.zeros((len(rows), width), dtype=torch.long, device=HOST)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=HOST)
        for i, (ids, items) in enumerate(zip(rows, row_items)):
            token_ids[i, width - len(ids):] = torch.tensor(ids, device=HOST)
            slot_items[i, width - len(ids):] = torch.tensor(items, device=HOST)
            mask[i, width - len(ids):] = 1
        return AssembledPrompts(token_ids, slot_items, mask)


def resolve_answer_tokens(tokenizer: Any, words: Sequence[str], token_ids: Sequence[int] | None = None) -> tuple[int, int]:
    """Token ids of the (yes, no) answer words for the tokenizer in use.

    Each word must be ONE token (its probability is then one softmax entry); otherwise give the
    ids yourself with ``answer_token_ids``.
    """
    if token_ids:
        if len(token_ids) != 2 or not all(0 <= int(t) < len(tokenizer) for t in token_ids):
            raise ValueError(f"answer_token_ids must be two ids inside the vocabulary (size {len(tokenizer)}), got {token_ids}.")
        return int(token_ids[0]), int(token_ids[1])
    if len(words) != 2:
        raise ValueError(f"answer_words must be two words (yes, no), got {list(words)}.")
    resolved = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(
                f"Answer word {word!r} is {len(ids)} tokens {pieces} for this tokenizer, not one known token. "
                "Choose answer_words that are single tokens (try with or without a leading space), or set "
                "answer_token_ids: [yes_id, no_id]."
            )
        resolved.append(ids[0])
    if resolved[0] == resolved[1]:
        raise ValueError(f"answer_words {list(words)} map to the same token id {resolved[0]}.")
    return resolved[0], resolved[1]
