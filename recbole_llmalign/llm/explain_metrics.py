"""Checks of an explanation against the catalog's metadata, as ``benchmarks/explanations.py`` reports them.

- ``grounded``: the sentence names a history item of the user, or an attribute that the recommended
  item and one of the user's history items really share (a genre, category, brand or year of both,
  or a content word of both texts; one carried by more than half the catalog, or a word by more
  than a tenth of it, does not count);
- ``hallucinated``: it names a catalog title that is neither in the history nor the item itself, a
  catalog attribute that neither the item nor any history item has and no text of theirs says, or
  another name (two or more capitalised words outside the titles and attributes it names) that
  none of those texts says: an invented title or maker;
- ``tautology``: once the fixed ``TAUTOLOGY_PATTERNS`` ("they will enjoy it") are removed, no
  content word is left outside the recommended item's own title;
- ``distinct_2``: distinct word bigrams over all bigrams of all sentences;
- ``perplexity``: per-token perplexity of the sentences alone under a causal LM (the full-depth LLM),
  pooled over every token of every sentence.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import torch

from recbole_llmalign.llm.explain import WORD_MAX_SHARE, ItemAttributes, content_words, display_title, normalized, words_of

TAUTOLOGY_PATTERNS = (  # phrases that give no reason, whatever else a sentence says
    r"\b(?:you|they|he|she|we|i|the user|users)(?:'ll|'d| will| would| might| may| should| could| can| are sure to)?"
    r"(?: really| surely| definitely| also| probably)? (?:enjoy|like|love|appreciate)(?: it| this| that| them| one)?\b",
    r"\b(?:it|this|that)(?:'s| is| was) (?:a |an )?(?:really |very )?(?:great|good|nice|perfect|fun|wonderful|excellent|"
    r"popular|top) (?:choice|pick|fit|option|recommendation|one|item|movie|film|product)\b",
    r"\bwe (?:think|believe|recommend|suggest)(?: that)?\b",
    r"\bbecause (?:you|they) (?:will|would|might|may) (?:enjoy|like|love)\b",
    r"\byou(?:'ll| will)? (?:want|need) (?:it|this)\b",
    r"\b(?:is|are) (?:a )?(?:must[- ]see|must[- ]have)\b",
)


def _history_shares(attributes: ItemAttributes, item: int, history: Iterable[int]) -> tuple[set[Any], set[str]]:
    """(informative attributes, informative content words) the item shares with at least one history item."""
    facts, words = set(), set()
    for h in set(history) - {0, item}:
        facts |= {a for a in attributes.facts[item] & attributes.facts[h] if attributes.informative(a)}
        words |= {w for w in attributes.words[item] & attributes.words[h] if attributes.word_share.get(w, 1.0) <= WORD_MAX_SHARE}
    return facts, words


def grounded(text: str, item: int, history: Sequence[int], attributes: ItemAttributes) -> bool:
    """Whether ``text`` names a history item of the user, or an attribute the item and a history item share."""
    known = set(history) - {0, item}
    mentions = attributes.mentions(text)
    if any(options & known for options in mentions.titles):
        return True
    facts, words = _history_shares(attributes, item, known)
    if any(options & facts for options in mentions.attributes):
        return True
    return bool(content_words(text) & words)


def hallucinated(text: str, item: int, history: Sequence[int], attributes: ItemAttributes) -> bool:
    """Whether ``text`` names a title or attribute that is neither in the user's history nor in the item's text."""
    allowed = (set(history) | {item}) - {0}
    mentions = attributes.mentions(text)
    if any(not options & allowed for options in mentions.titles):
        return True
    for options in mentions.attributes:
        if any(a in attributes.facts[i] for a in options for i in allowed):
            continue
        if not any(attributes.says(i, a.value) for a in options for i in allowed):
            return True
    said = [normalized(attributes.text[i]) for i in allowed]
    return any(not any(normalized(name) in s for s in said) for name in mentions.names)


def tautology(text: str, title: str) -> bool:
    """Whether ``text`` only restates the item's ``title`` or says "they will enjoy it" (see ``TAUTOLOGY_PATTERNS``)."""
    rest = text
    for pattern in TAUTOLOGY_PATTERNS:
        rest = re.sub(pattern, " ", rest, flags=re.IGNORECASE)
    return not (content_words(rest) - content_words(display_title(title)))


def distinct_2(texts: Iterable[str]) -> float:
    """Distinct word bigrams over all word bigrams of ``texts`` (bigrams never span two texts); 0 with none."""
    bigrams = []
    for text in texts:
        words = [w.lower() for w in words_of(text)]
        bigrams += list(zip(words, words[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def perplexity(lm: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood per token) of ``texts`` under ``lm``, each read alone after the BOS token
    (EOS when the tokenizer has none), pooled over every token of every text."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = [[start] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts if t]
    total, count = 0.0, 0
    device = next(lm.parameters()).device
    with torch.inference_mode():
        for begin in range(0, len(rows), batch_size):
            batch = rows[begin:begin + batch_size]
            width = max(len(r) for r in batch)
            ids = torch.tensor([r + [start] * (width - len(r)) for r in batch], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch], device=device)
            logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            total += float((nll * mask[:, 1:]).sum())
            count += int(mask[:, 1:].sum())
    return math.exp(total / count) if count else float("nan")
