"""Explanations for AlignLLMRec's recommendations (``recommend --explain``): evidence, then one sentence.

For every recommended item the ``Explainer``
1. gathers the evidence (``Evidence``): the user's history items closest to it by the frozen
   backbone's item vectors (cosine; ``explanation_evidence_items`` of them) and the attributes each
   one shares with it, read from the dataset's ``.item`` file by ``ItemAttributes``: list fields
   (ml-100k genres, Amazon categories), single values (brand, year) and the content words of the
   title and description (a description's words only where some title uses them: "binder", not
   "engineered"). An attribute that more than half of all items carry (Amazon's "Office & School
   Supplies") or a word in more than a tenth of them tells a user nothing and is left out;
2. writes one sentence from it. ``TemplateWriter``: "Because you liked X and Y, also <attribute>."
   ``LLMWriter``: the pretrained LLM at full depth (``explanation_full_depth``: a ranking LLM cut
   to ``llm_layers`` has an LM head that reads a middle layer and writes no readable text)
   answers a plain-text prompt built from the evidence and the item's own attributes
   (``explanation_prompt``, through the tokenizer's chat template when it has one), its answer
   opening on the evidence (``explanation_opening``: "Like <closest history item>, <item>"),
   greedily, all of a user's items in one batch. With ``explanation_no_new_names`` it may start a
   capitalised word or a number only with a token of its own prompt (``NoNewNames``), so it
   invents no title, maker or model number. The soft tokens of the ranking prompt are not part of
   it: they are trained for the cut ranking LLM's last hidden state, not for the full model's
   text, and the earlier explanations written from them were tautologies ("of the movie They'll
   enjoy Dumb & Dumber because they will enjoy it");
3. cleans it (``clean_sentence``): one sentence, capitalised, ending with a full stop, no repeated
   phrase, no echo of the prompt. When nothing is left, the template's sentence stands in.
The checks ``benchmarks/explanations.py`` applies to these sentences are in ``explain_metrics.py``.
"""

from __future__ import annotations

import html
import logging
import re
import unicodedata
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from recbole_llmalign.devices import HOST
from recbole_llmalign.llm.loader import load_causal_lm, resolve_llm_path

logger = logging.getLogger(__name__)

REPETITION_PENALTY = 1.2  # mild: a greedy 135M model otherwise repeats its last phrase
ATTRIBUTE_MAX_SHARE = 0.5  # an attribute on more than this share of items explains nothing
WORD_MAX_SHARE = 0.1  # nor does a word in more than this share of item texts
TITLE_MAX_WORDS = 6  # Amazon titles run to 40 words; explanations name the head of the title
PRODUCT_TITLE_WORDS = 6  # a catalog whose titles average more words has product titles, said shorter (short_title)
FIELD_KINDS = ("list", "value", "text", "ignore")

STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both but
by can could did do does doing down during each few for from further had has have having he her here hers him his how
i if in into is it its itself just me more most my no nor not now of off on once only or other our out over own same she
should so some such than that the their them then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself one two three ones its it's i'm
you'll they'll we'll you're they're don't doesn't isn't can't won't let us per via etc
""".split())
# words that carry no reason in a recommendation: they may fill a sentence, never make it informative
GENERIC_WORDS = frozenset("""
like liked likes love loved loves enjoy enjoyed enjoys enjoying enjoyable recommend recommended recommendation suggest
suggested might may will would also great good nice perfect best better well really very much many lot lots choice pick
item items product products movie movies film films watch watched watching buy bought purchase purchased user users
think sure yes thing things something someone people person favorite favourite new similar same another next because
since another fan fans fit option options type kind sort way make makes made want wants get gets got see seen
""".split())
ARTICLES = ("The", "A", "An", "Le", "La", "Les", "L'", "Il", "El", "Das", "Der", "Die", "Det", "Den")
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "no", "vol", "inc", "co", "ltd", "etc", "e.g", "i.e"})
DANGLING = frozenset("""
and or but because with the a an of to for in on at by as from that which who whose is are was were be its their your
his her so than then like such also very while whereas when if into
""".split())
LEADING_LABELS = re.compile(r"^\s*(?:(?:sure|certainly|of course|okay|ok|absolutely|great)\b[,!.:]?\s*)?"
                            r"(?:here(?:'s| is) (?:why|the reason)\b[:,.]?\s*)?"
                            r"(?:(?:reason|explanation|answer|recommendation|why|response)\s*:\s*)?", re.IGNORECASE)


# ---- words and titles ----
WORD = re.compile(r"[^\W_][\w'&+-]*")


def stem(word: str) -> str:
    """A light stemmer (plural, possessive, then -ing/-ed/-er on long words), enough to match "comedies" with
    "Comedy", "pens" with "Pen" and "printing" with "printer"; every match here compares stems."""
    word = word.lower().strip("'-")
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        word = word[:-2]
    elif len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed", "er"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word


def words_of(text: str) -> list[str]:
    """Word tokens of ``text`` as written (letters and digits, with inner ' & + -)."""
    return WORD.findall(text.replace("\u2019", "'"))


def tokens(text: str) -> list[str]:
    """Lower-case, stemmed word tokens of ``text``."""
    return [stem(w) for w in words_of(text)]


STOP_STEMS = STOPWORDS | {stem(w) for w in STOPWORDS}
GENERIC_STEMS = GENERIC_WORDS | {stem(w) for w in GENERIC_WORDS}


def content_words(text: str) -> set[str]:
    """Stemmed words that can carry a reason: alphabetic, 3+ letters, neither stopwords nor generic."""
    return {w for w in tokens(text) if len(w) >= 3 and w[0].isalpha() and w not in STOP_STEMS and w not in GENERIC_STEMS}


def normalized(text: str) -> str:
    """Stemmed tokens joined by single spaces, padded with a space each side (for whole-word ``in`` tests)."""
    return " " + " ".join(tokens(text)) + " "


class PhraseIndex:
    """Finds phrases (tuples of stemmed words) in a text, longest first at each position, each word used once. A
    phrase stands for every value it was added with (two products may share a short title); a proper phrase (a
    title, a brand) matches only where the text writes it as a name: its first word capitalised, a number, or as
    the name itself writes it ("basyx")."""

    def __init__(self, phrases: Iterable[tuple[tuple[str, ...], Any, str | None]]) -> None:
        """``phrases``: (stems, value, the first word as written for a proper phrase, else None)."""
        grouped: dict[tuple[tuple[str, ...], str | None], set[Any]] = {}
        for phrase, value, written in phrases:
            if phrase:
                grouped.setdefault((phrase, written), set()).add(value)
        self.by_first: dict[str, list[tuple[tuple[str, ...], str | None, frozenset[Any]]]] = {}
        for (phrase, written), values in grouped.items():
            self.by_first.setdefault(phrase[0], []).append((phrase, written, frozenset(values)))
        for entries in self.by_first.values():
            entries.sort(key=lambda entry: (-len(entry[0]), entry[1] is not None))

    def find(self, words: Sequence[str], stems: Sequence[str], used: list[bool]) -> list[frozenset[Any]]:
        """The values of each phrase found, in text order; marks the words it used in ``used``."""
        found = []
        for start, first in enumerate(stems):
            if used[start]:
                continue
            for phrase, written, values in self.by_first.get(first, ()):
                end = start + len(phrase)
                if written is not None and not (words[start][:1].isupper() or words[start][:1].isdigit()
                                                or words[start] == written):
                    continue
                if tuple(stems[start:end]) == phrase and not any(used[start:end]):
                    found.append(values)
                    used[start:end] = [True] * len(phrase)
                    break
        return found


def display_title(title: str) -> str:
    """A title as a person writes it: HTML entities decoded, a trailing "(original title)" dropped and a
    trailing article moved to the front ("Usual Suspects, The" -> "The Usual Suspects")."""
    title = " ".join(html.unescape(title).split())
    title = re.sub(r"\s*\([^()]*\)\s*$", "", title) or title
    for article in ARTICLES:
        suffix = f", {article}"
        if title.endswith(suffix):
            title = f"{article}{'' if article.endswith(chr(39)) else ' '}{title[: -len(suffix)]}"
            break
    return title


def short_title(title: str, max_words: int = TITLE_MAX_WORDS) -> str:
    """A product title as a person would say it ("Kodak 8237216 10XL Ink Cartridge - Black" -> "Kodak 10XL Ink
    Cartridge"): ``display_title`` without trademark signs, cut at the first comma, dash, bracket, bar, "with" or
    "for" after two words, without catalog numbers (tokens of five or more digits), at most ``max_words`` words."""
    title = re.sub(r"\s*(?:\((?:TM|R|C)\)|[®™©])", "", display_title(title))
    for match in re.finditer(r",\s|\s[-–—]\s|\s\(|\s\|\s|\swith\s|\sfor\s", title):
        head = title[: match.start()].strip()
        if len(head.split()) >= 2:
            title = head
            break
    words = [w for w in title.split() if sum(ch.isdigit() for ch in w) < 5] or title.split()
    return " ".join(words[:max_words]).rstrip(",;:-")


# ---- item attributes ----
@dataclass(frozen=True)
class Attribute:
    """One fact about an item, as the metadata states it."""

    field: str  # the .item field it comes from ("class", "categories", "brand"; the text field of a word)
    value: str  # as in the metadata ("Comedy", "Binders & Binding Systems"), or a stemmed content word ("stapler")
    kind: str  # "list" (one of a list field's values), "value" (a single-valued field) or "word"


KIND_ORDER = {"list": 0, "value": 1, "word": 2}


def infer_field_kind(values: Sequence[str], atomic_type: str) -> str:
    """How a ``.item`` field is read when ``explanation_attribute_fields`` does not say:
    ``token`` fields and short names (brands) are one ``value``; comma-separated short pieces in most
    rows (Amazon categories), or space-separated words that are values on their own in other rows
    (ml-100k genres: "Comedy Drama" beside "Comedy"), a ``list``; long free text (descriptions)
    ``text``, read for its content words."""
    filled = [v for v in values if v]
    if not filled or not atomic_type.endswith("_seq"):
        return "value"
    pieces = [p for v in filled for p in v.split(",") if p.strip()]
    if sum("," in v for v in filled) > len(filled) / 2 and sum(len(p.split()) for p in pieces) / len(pieces) <= 4:
        return "list"
    if sum(len(v.split()) for v in filled) / len(filled) > 5:
        return "text"
    singles = {v for v in filled if len(v.split()) == 1}
    several = [v for v in filled if len(v.split()) > 1]  # "Comedy Drama" is a list when "Comedy" and "Drama" are values
    return "list" if several and sum(all(w in singles for w in v.split()) for v in several) > len(several) / 2 else "value"


class ItemAttributes:
    """Titles, attributes and content words of every item (internal ids; 0 = padding), with what is rare enough
    to be a reason, and the lookups the metrics need: which titles and attributes a sentence names."""

    def __init__(self, titles: Sequence[str], fields: dict[str, tuple[str, Sequence[str]]] | None = None) -> None:
        """``titles``: the raw title per internal id; ``fields``: field -> (kind, raw value per internal id), kind one of
        ``list``, ``value``, ``text``, ``ignore``. A ``list`` value is split on commas when the field has any, else on spaces."""
        self.n_items = len(titles)
        self.raw_titles = [html.unescape(t or "") for t in titles]
        filled = [t for t in self.raw_titles if t]
        products = sum(len(t.split()) for t in filled) / max(len(filled), 1) > PRODUCT_TITLE_WORDS
        self.titles = [short_title(t) if products else display_title(t) for t in self.raw_titles]  # as explanations say them
        self.facts: list[set[Attribute]] = [set() for _ in titles]  # every list/value attribute of an item
        self.words: list[set[str]] = [content_words(display_title(t)) for t in self.raw_titles]
        product_words = set().union(*self.words)  # a description's word counts when some title uses it too
        self.text: list[str] = [display_title(t) for t in self.raw_titles]  # everything an item's metadata says
        for name, (kind, values) in (fields or {}).items():
            if kind not in FIELD_KINDS:
                raise ValueError(f"explanation_attribute_fields: {name} has kind {kind!r}; use one of {FIELD_KINDS}.")
            values = [html.unescape(v or "").strip() for v in values]
            comma = any("," in v for v in values)
            for item, value in enumerate(values):
                if not value or kind == "ignore":
                    continue
                self.text[item] += f"; {value}"
                if kind == "text":
                    self.words[item] |= content_words(value) & product_words
                    continue
                parts = [p.strip() for p in value.split("," if comma else None)] if kind == "list" else [value]
                self.facts[item] |= {Attribute(name, p, kind) for p in parts if p and p.lower() != "unknown"}
        real = max(self.n_items - 1, 1)
        fact_counts = Counter(a for facts in self.facts[1:] for a in facts)
        word_counts = Counter(w for words in self.words[1:] for w in words)
        self.fact_share = {a: n / real for a, n in fact_counts.items()}
        self.word_share = {w: n / real for w, n in word_counts.items()}
        self._normalized_text = [normalized(t) for t in self.text]
        self._facts_index = PhraseIndex((tuple(tokens(a.value)), a, words_of(a.value)[0] if a.kind == "value" else None)
                                        for a in fact_counts
                                        if tokens(a.value) and " ".join(tokens(a.value)) not in STOP_STEMS)
        self._build_title_index()

    @classmethod
    def from_dataset(cls, dataset: Any, config: Any) -> ItemAttributes:
        """Read the dataset's ``.item`` file: the first ``item_text_fields`` entry is the title; the other text fields
        are read as ``explanation_attribute_fields`` says, or as ``infer_field_kind`` finds."""
        from recbole_llmalign.data.item_text import _dataset_file, _read_atomic

        fields = list(config["item_text_fields"] or [])
        if not fields:
            return cls([""] * dataset.item_num)
        path = _dataset_file(dataset, "item")
        with open(path, encoding="utf-8") as handle:
            types = dict(h.split(":", 1) for h in handle.readline().rstrip("\n").split("\t"))
        frame = _read_atomic(path, [dataset.iid_field, *fields])
        rows = frame[dataset.iid_field].map(dataset.field2token_id[dataset.iid_field])
        known = rows.notna()
        rows = rows[known].astype(int).tolist()

        def column(name: str) -> list[str]:
            values = [""] * dataset.item_num
            for row, value in zip(rows, frame[name][known]):
                values[row] = value
            return values

        kinds = dict(config["explanation_attribute_fields"] or {})
        unknown = set(kinds) - set(fields[1:])
        if unknown:
            raise ValueError(f"explanation_attribute_fields names {sorted(unknown)}, which are not in item_text_fields "
                             f"after the title ({fields[1:]}).")
        columns = {name: column(name) for name in fields[1:]}
        chosen = {name: (kinds.get(name) or infer_field_kind(values, types.get(name, "token_seq")), values)
                  for name, values in columns.items()}
        return cls(column(fields[0]), chosen)

    def _build_title_index(self) -> None:
        """Every way a title may be written (as displayed, as stored, cut short, without its article); a text names it
        only with a capital first word ("ink cartridges" is no product). One-word titles match only exactly as written
        and from 4 letters on, so "Heat" is found but "heat" and "It" are not."""
        phrases: list[tuple[tuple[str, ...], int, str | None]] = []
        self._one_word_titles: dict[str, set[int]] = {}
        for item in range(1, self.n_items):
            raw = self.raw_titles[item]
            if not raw:
                continue
            display = display_title(raw)
            bare = re.sub(rf"^(?:{'|'.join(re.escape(a) for a in ARTICLES)})\s*", "", display)
            for variant in {display, self.titles[item], bare, raw}:
                words = words_of(variant)
                if len(words) > 1:
                    phrases.append((tuple(stem(w) for w in words), item, words[0]))
                elif words and len(words[0]) >= 4 and words[0][0].isupper():
                    self._one_word_titles.setdefault(words[0], set()).add(item)
        self._title_index = PhraseIndex(phrases)

    # ---- what is a reason ----
    def informative(self, attribute: Attribute) -> bool:
        if attribute.kind == "word":
            return self.word_share.get(attribute.value, 1.0) <= WORD_MAX_SHARE
        return self.fact_share.get(attribute, 1.0) <= ATTRIBUTE_MAX_SHARE

    def shared(self, item: int, other: int) -> list[Attribute]:
        """What ``item`` and ``other`` both are (rare enough to say something): list values first, then single values,
        then content words, the rarest first within each kind."""
        facts = [a for a in self.facts[item] & self.facts[other] if self.informative(a)]
        said = {w for a in facts for w in tokens(a.value)}  # "canon" adds nothing to the brand Canon
        words = [Attribute("text", w, "word") for w in self.words[item] & self.words[other] if w not in said]
        words = [a for a in words if self.informative(a)]
        share = {**{a: self.fact_share.get(a, 1.0) for a in facts}, **{a: self.word_share.get(a.value, 1.0) for a in words}}
        return sorted(facts + words, key=lambda a: (KIND_ORDER[a.kind], share[a], a.value))

    def describe(self, item: int, limit: int = 3) -> list[str]:
        """The item's most specific list/value attributes, for a prompt ("Comedy", "Binders & Binding Systems")."""
        facts = sorted(self.facts[item], key=lambda a: (KIND_ORDER[a.kind], self.fact_share.get(a, 1.0), a.value))
        return [a.value for a in facts if self.informative(a)][:limit]

    # ---- what a sentence names ----
    def mentions(self, text: str) -> Mentions:
        """The titles, attributes and other capitalised names ``text`` names. Titles are matched first, longest first;
        attributes and names only outside them (the brand inside a product's title is part of the title)."""
        found = list(WORD.finditer(text.replace("\u2019", "'")))
        words = [m.group() for m in found]
        stems = [stem(w) for w in words]
        used = [False] * len(words)
        titles = self._title_index.find(words, stems, used)
        for position, word in enumerate(words):
            bare = word[:-2] if word.endswith("'s") else word
            if not used[position] and bare in self._one_word_titles:
                titles.append(frozenset(self._one_word_titles[bare]))
                used[position] = True
        attributes = self._facts_index.find(words, stems, used)
        names, run = [], []
        for position, (match, word) in enumerate(zip(found, words)):
            gap = text[found[position - 1].end():match.start()] if position else ""
            capital = word[:1].isupper() and not used[position] and word not in ("I", "I'm")
            if run and (not capital or re.search(r"[^\w\s&'+]", gap)):  # a name ends at a small word or punctuation
                names.append(run)
                run = []
            if capital and (run or stems[position] not in STOP_STEMS | GENERIC_STEMS):
                run.append(word)
        names.append(run)
        return Mentions(titles, attributes, [" ".join(n) for n in names if len(n) > 1])

    def says(self, item: int, phrase: str) -> bool:
        """Whether the item's own metadata (title and every text field) contains ``phrase`` as whole words."""
        key = normalized(phrase).strip()
        return bool(key) and f" {key} " in self._normalized_text[item]


@dataclass
class Mentions:
    """What a sentence names, each mention as the catalog entries it may be (two products can share a short title)."""

    titles: list[frozenset[int]]
    attributes: list[frozenset[Attribute]]
    names: list[str]  # other runs of two or more capitalised words ("Comical Family")


# ---- evidence ----
@dataclass
class HistoryMatch:
    """A history item close to the recommended one, and what the two share."""

    item_id: str  # external id
    title: str  # as shown in the explanation (``short_title``)
    similarity: float  # cosine of the backbone's item vectors
    shared: list[Attribute] = field(default_factory=list)
    index: int = 0  # internal id

    def render(self) -> str:
        shared = ", ".join(a.value for a in self.shared[:4])
        return f"{self.title} (similarity {self.similarity:.2f}" + (f"; shares {shared})" if shared else ")")


@dataclass
class Evidence:
    """Why an item was recommended, as data: the closest history items and the attributes they share with it."""

    item_id: str
    title: str
    history: list[HistoryMatch] = field(default_factory=list)  # most similar first
    index: int = 0  # internal id
    about: list[str] = field(default_factory=list)  # the item's own most specific attributes

    @property
    def shared(self) -> list[Attribute]:
        """Every attribute shared with an evidence item, in the order of the items, each once."""
        seen: dict[Attribute, None] = {}
        for match in self.history:
            for attribute in match.shared:
                seen.setdefault(attribute, None)
        return list(seen)

    def render(self) -> str:
        return "; ".join(match.render() for match in self.history) or "no history to compare with"


@dataclass
class Explanation:
    """One sentence and the evidence it was written from."""

    text: str
    evidence: Evidence
    writer: str  # "llm" or "template": the writer asked (an LLM sentence empty after cleaning is the template's)


def nearest_history(vectors: torch.Tensor, history: Sequence[int], item: int, k: int) -> list[tuple[int, float]]:
    """(history item, cosine) of the ``k`` history items closest to ``item`` by the rows of ``vectors``, most similar
    first; each item once, never ``item`` itself or the padding id 0."""
    candidates = list(dict.fromkeys(h for h in history if h not in (0, item)))
    if not candidates or k <= 0:
        return []
    rows = torch.nn.functional.normalize(vectors[torch.tensor(candidates, device=vectors.device)].float(), dim=-1)
    target = torch.nn.functional.normalize(vectors[item].float(), dim=-1)
    similarity = (rows @ target).cpu()
    order = torch.argsort(similarity, descending=True, stable=True)[:k]
    return [(candidates[i], float(similarity[i])) for i in order.tolist()]


def gather_evidence(vectors: torch.Tensor, attributes: ItemAttributes, history: Sequence[int], items: Sequence[int],
                    k: int, item_tokens: Sequence[Any] | None = None) -> list[Evidence]:
    """``Evidence`` per recommended item: its ``k`` nearest history items by ``vectors`` and what each shares with it."""
    external = (lambda i: str(item_tokens[i])) if item_tokens is not None else str
    result = []
    for item in items:
        matches = [HistoryMatch(external(h), attributes.titles[h] or f"item {external(h)}", sim, attributes.shared(item, h), h)
                   for h, sim in nearest_history(vectors, history, item, k)]
        result.append(Evidence(external(item), attributes.titles[item] or f"item {external(item)}", matches, item,
                               attributes.describe(item)))
    return result


# ---- sentences ----
def _phrase(attribute: Attribute) -> str:
    if attribute.kind == "list":
        return attribute.value
    if attribute.kind == "value":
        return f"from {attribute.value}"
    return f"about {attribute.value}"


class TemplateWriter:
    """"Because you liked X and Y, also <attribute>.": the simplest honest reason the evidence allows."""

    name = "template"

    def write(self, evidence: Sequence[Evidence]) -> list[str]:
        return [self.sentence(e) for e in evidence]

    @staticmethod
    def sentence(evidence: Evidence) -> str:
        liked = [m.title for m in evidence.history[:2]]
        shared = evidence.shared
        if not liked:
            about = f" in {evidence.about[0]}" if evidence.about else ""
            return f"{evidence.title} is a popular choice{about}."
        lists = [a for a in shared if a.kind == "list"]
        best = lists[0] if lists else (shared[0] if shared else None)
        tail = f", also {_phrase(best)}" if best else ""
        return clean_sentence(f"Because you liked {' and '.join(liked)}{tail}", keep=liked) or f"Because you liked {liked[0]}."


def _protect(text: str, keep: Iterable[str]) -> tuple[str, list[str]]:
    """Replace each ``keep`` string (titles) in ``text`` by a placeholder that no rule below splits or changes."""
    kept = sorted({k for k in keep if k}, key=lambda k: (-len(k), k))  # the same numbering for every text
    for number, phrase in enumerate(kept):
        text = text.replace(phrase, f"\x00{number}\x00")
    return text, kept


def _restore(text: str, kept: list[str]) -> str:
    return re.sub(r"\x00(\d+)\x00", lambda m: kept[int(m.group(1))], text)


def _sentences(text: str) -> list[str]:
    """Split at . ! ? followed by a space (or the end), not after an abbreviation, and at line breaks."""
    parts, start = [], 0
    for match in re.finditer(r"[.!?]+(?=\s|$)|\n+", text):
        before = text[start:match.start()].split()
        if match.group().startswith(".") and before and before[-1].lower().rstrip(".") in ABBREVIATIONS:
            continue
        parts.append(text[start:match.start()].strip())
        start = match.end()
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = [w.lower() for w in re.findall(r"\x00\d+\x00|[\w'&+-]+", text)]
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def repeated_phrase(text: str, n: int = 3) -> bool:
    """Whether a phrase of ``n`` words occurs twice in ``text``."""
    words = [w.lower() for w in re.findall(r"[\w'&+-]+", text)]
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def _cut_repetition(text: str, n: int = 3) -> str:
    """``text`` up to where it starts repeating itself: immediate doubled words go, and the sentence ends before a
    phrase of ``n`` words that occurred earlier."""
    text = re.sub(r"\b(\w+)(\s+\1\b)+", r"\1", text, flags=re.IGNORECASE)
    spans = [(m.start(), m.group().lower()) for m in re.finditer(r"\x00\d+\x00|[\w'&+-]+", text)]
    seen: set[tuple[str, ...]] = set()
    for i in range(len(spans) - n + 1):
        gram = tuple(word for _, word in spans[i:i + n])
        if gram in seen:
            return text[: spans[i][0]].rstrip()
        seen.add(gram)
    return text


def clean_sentence(text: str, prompt: str = "", keep: Sequence[str] = (), min_words: int = 4) -> str:
    """One sentence a person would read, or "" when nothing usable is left.

    Leading labels ("Sure!", "Reason:") and markup go; the first sentence that does not echo ``prompt`` (share a run
    of five words with it, titles counting as one word) is kept; it is cut where it starts to repeat a phrase of three
    words, loses a trailing comma or dangling "and"/"the", gets a capital first letter and a full stop. ``keep``
    strings (the titles in play) are never split or changed.
    """
    text, kept = _protect(" ".join(text.replace("\n", " \n ").split(" ")), keep)
    prompt_grams = _word_ngrams(_protect(prompt, keep)[0], 5) if prompt else set()
    text = "".join(ch for ch in re.sub(r"[*_`#\"“”]+", "", text)
                   if not unicodedata.category(ch).startswith(("So", "Co", "Cn")) and ch not in "\ufe0e\ufe0f\u200d")
    for sentence in _sentences(text):
        sentence = LEADING_LABELS.sub("", sentence).strip(" \t'-–—:;,")
        if not sentence or (prompt_grams and _word_ngrams(sentence, 5) & prompt_grams):
            continue  # an echo of the prompt: try the next sentence
        sentence = _cut_repetition(" ".join(sentence.split()))
        words = sentence.split()
        while words and (words[-1].lower().strip(",;:-–—") in DANGLING or not words[-1].strip(",;:-–—'")):
            words.pop()
        sentence = " ".join(words).rstrip(",;:-–—' ")
        if len(sentence.split()) < min_words:
            continue
        sentence = _restore(sentence, kept)
        first = next((i for i, ch in enumerate(sentence) if ch.isalpha()), None)
        if first is not None:
            sentence = sentence[:first] + sentence[first].upper() + sentence[first + 1:]
        return sentence + "."
    return ""


class SentenceEnd:
    """Generation stopping rule: a row is done once its new text has ended a sentence (the next one has begun, or a
    line break came) after at least ``min_chars`` characters; the rest of the batch goes on."""

    def __init__(self, tokenizer: Any, prompt_length: int, min_chars: int = 12) -> None:
        self.tokenizer, self.prompt_length, self.min_chars = tokenizer, prompt_length, min_chars

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.prompt_length:]:
            text = self.tokenizer.decode(row, skip_special_tokens=True).lstrip()
            done.append(len(text) > self.min_chars and ("\n" in text.rstrip() or len(_sentences(text)) > 1))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class NoNewNames:
    """Generation rule: a row may start a capitalised word or a number only with a token whose text (leading space
    aside) its own prompt holds, so the LLM names what the evidence names (titles, brands, attributes) and invents
    no maker, model number or title."""

    def __init__(self, tokenizer: Any, prompts: torch.Tensor) -> None:
        ids, texts = name_tokens(tokenizer)
        self.name_ids = ids.to(prompts.device)
        self.banned = []
        for row in prompts.tolist():
            said = {tokenizer.convert_tokens_to_string([p]).strip() for p in tokenizer.convert_ids_to_tokens(row)}
            self.banned.append(self.name_ids[torch.tensor([t not in said for t in texts], dtype=torch.bool, device=self.name_ids.device)])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, banned in enumerate(self.banned):
            scores[row, banned] = -torch.inf
        return scores


# keyed by the tokenizer object itself (not its id(), which a later tokenizer may reuse), dropped with it
_name_tokens: weakref.WeakKeyDictionary[Any, tuple[torch.Tensor, list[str]]] = weakref.WeakKeyDictionary()


def name_tokens(tokenizer: Any) -> tuple[torch.Tensor, list[str]]:
    """(ids, texts without leading space) of the tokens that start a capitalised word or a number, once per tokenizer."""
    if tokenizer not in _name_tokens:
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        texts = [tokenizer.convert_tokens_to_string([p]).strip() if p is not None else "" for p in pieces]
        chosen = [i for i, t in enumerate(texts) if t[:1].isupper() or t[:1].isdigit()]
        _name_tokens[tokenizer] = (torch.tensor(chosen, dtype=torch.long, device=HOST), [texts[i] for i in chosen])
    return _name_tokens[tokenizer]


class LLMWriter:
    """The LLM continues a prompt built from the evidence (see module docstring); ``TemplateWriter`` fills in
    where its sentence is empty after cleaning."""

    name = "llm"

    def __init__(self, lm: Any, tokenizer: Any, prompt: str, opening: str, max_tokens: int,
                 system: str | None = None, no_new_names: bool = True) -> None:
        self.lm, self.tokenizer, self.no_new_names = lm, tokenizer, no_new_names
        self.prompt, self.opening, self.system = prompt, opening, system
        self.max_tokens = max_tokens
        self.fallbacks = 0  # sentences the template wrote because nothing usable was left

    @staticmethod
    def fill(template: str, evidence: Evidence) -> str:
        """``template`` with {item}, {about}, {history}, {liked} and {shared} from the evidence; where the closest history
        item has the item's own title, a template naming both calls the item "this one"."""

        def with_facts(match: HistoryMatch) -> str:
            facts = [a.value for a in match.shared if a.kind != "word"][:3]
            return f"{match.title} ({', '.join(facts)})" if facts else match.title

        liked = evidence.history[0].title if evidence.history else evidence.title
        item = evidence.title if liked != evidence.title or "{liked}" not in template else "this one"  # two sizes of one product
        return template.format(item=item, about=", ".join(evidence.about) or "no listed category",
                               history="; ".join(with_facts(m) for m in evidence.history) or "nothing yet", liked=liked,
                               shared=", ".join(a.value for a in evidence.shared[:3]) or "nothing in particular")

    def prompt_text(self, evidence: Evidence) -> tuple[str, str]:
        """(the whole text the LLM continues, the user message alone): chat template when the tokenizer has one."""
        message, opening = self.fill(self.prompt, evidence), self.fill(self.opening, evidence)
        if getattr(self.tokenizer, "chat_template", None):
            turns = ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": message}]
            text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        else:
            text = f"{message}\n"
        return text + opening, message

    def write(self, evidence: Sequence[Evidence]) -> list[str]:
        """One sentence per evidence; an item with no history to compare with gets the template's sentence."""
        compared = [e for e in evidence if e.history]
        generated = iter(self._generate(compared) if compared else [])
        return [next(generated) if e.history else TemplateWriter.sentence(e) for e in evidence]

    def _generate(self, evidence: Sequence[Evidence]) -> list[str]:
        """One cleaned sentence per evidence (each has history), all in one batch; the template's where nothing is left."""
        texts, messages = zip(*(self.prompt_text(e) for e in evidence))
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = next(self.lm.parameters()).device
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        from transformers import LogitsProcessorList, StoppingCriteriaList

        rules = LogitsProcessorList([NoNewNames(self.tokenizer, ids)] if self.no_new_names else [])
        with torch.inference_mode():
            output = self.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_tokens, do_sample=False,
                                      repetition_penalty=REPETITION_PENALTY, pad_token_id=pad, logits_processor=rules,
                                      stopping_criteria=StoppingCriteriaList([SentenceEnd(self.tokenizer, width)]))
        sentences = []
        for e, message, row in zip(evidence, messages, output[:, width:].tolist()):
            written = self.fill(self.opening, e) + self.tokenizer.decode(row, skip_special_tokens=True)
            titles = [e.title] + [m.title for m in e.history]
            sentence = clean_sentence(written, prompt=message, keep=titles)
            if not sentence or sentence.rstrip(".") == clean_sentence(self.fill(self.opening, e), keep=titles).rstrip("."):
                self.fallbacks += 1
                sentence = TemplateWriter.sentence(e)
            sentences.append(sentence)
        return sentences


# ---- the explainer of a model ----
def total_layers(llm_path: str, cache_dir: str) -> int:
    """Decoder layers of the full pretrained LLM at ``llm_path``, read from its config only."""
    from transformers import AutoConfig

    llm_config = AutoConfig.from_pretrained(resolve_llm_path(llm_path, cache_dir))
    return int(getattr(llm_config, "num_hidden_layers", 0) or getattr(llm_config, "num_layers", 0))


class Explainer:
    """Evidence and one sentence per recommended item for a trained AlignLLMRec (see module docstring)."""

    def __init__(self, model: Any, config: Any, dataset: Any) -> None:
        if not hasattr(model, "item_side") or not hasattr(model, "tokenizer"):
            raise ValueError(f"--explain needs a model with an LLM and a frozen backbone (AlignLLMRec); "
                             f"{config['model']} has none.")
        self.model = model
        self.attributes = ItemAttributes.from_dataset(dataset, config)
        self.item_tokens = dataset.field2id_token[dataset.iid_field]
        self.evidence_items = int(config["explanation_evidence_items"])
        self.max_tokens = int(config["explanation_max_tokens"])
        self.prompt, self.opening = config["explanation_prompt"], config["explanation_opening"] or ""
        self.system = config["explanation_system"] or None
        self.no_new_names = bool(config["explanation_no_new_names"])
        self.style = config["explanation_writer"]
        if self.style not in ("llm", "template"):
            raise ValueError(f"explanation_writer must be llm or template, got {self.style!r}.")
        self._settings = (config["llm_path"], config["llm_cache_dir"], config["llm_dtype"])
        cut = model.llm_num_layers < total_layers(config["llm_path"], config["llm_cache_dir"])
        self.full_depth = bool(config["explanation_full_depth"]) and cut
        self._lm: Any = None
        self.template = TemplateWriter()
        self._llm_writer: LLMWriter | None = None

    def lm(self) -> Any:
        """The causal LM that writes: the full-depth pretrained LLM (loaded once, on first use) when the ranking LLM is
        cut and ``explanation_full_depth``, else the ranking LLM itself."""
        if self._lm is None:
            if self.full_depth:
                path, cache_dir, dtype = self._settings
                self._lm = load_causal_lm(path, cache_dir=cache_dir, dtype=dtype, llm_layers=None).model
                self._lm.to(self.model.embed_tokens.weight.device)
            else:
                self._lm = self.model.base_llm
        return self._lm

    def writer(self) -> TemplateWriter | LLMWriter:
        if self.style == "template":
            return self.template
        if self._llm_writer is None:
            self._llm_writer = LLMWriter(self.lm(), self.model.tokenizer, self.prompt, self.opening, self.max_tokens,
                                         self.system, self.no_new_names)
        return self._llm_writer

    def evidence(self, history: Sequence[int], items: Sequence[int]) -> list[Evidence]:
        """``Evidence`` for each of ``items`` (internal ids) given the user's ``history`` (internal ids)."""
        if getattr(self.model, "routes_evaluation", False):  # ranked by per-user fold backbones: similarity from the
            with torch.no_grad():  # backbone trained on every user (item vectors, not a ranking of this user)
                vectors = self.model.fit_backbone._scoring_table().detach()
        else:
            vectors = self.model.item_side().scoring
        return gather_evidence(vectors, self.attributes, list(history), list(items), self.evidence_items, self.item_tokens)

    def explain(self, history: Sequence[int], items: Sequence[int]) -> list[Explanation]:
        """One ``Explanation`` per item in ``items`` for the user whose interactions are ``history`` (oldest first)."""
        evidence = self.evidence(history, items)
        writer = self.writer()
        before = getattr(writer, "fallbacks", 0)
        texts = writer.write(evidence)
        if getattr(writer, "fallbacks", 0) > before:
            logger.info(f"{writer.fallbacks - before} of {len(texts)} LLM explanations were empty after cleaning; "
                        "the template's sentence stands in for them.")
        return [Explanation(text, e, writer.name) for text, e in zip(texts, evidence)]


_explainers: weakref.WeakKeyDictionary[Any, Explainer] = weakref.WeakKeyDictionary()


def explainer_for(model: Any, config: Any, dataset: Any) -> Explainer:
    """The model's Explainer, made once per model object (its attributes read and its full-depth LLM loaded once)."""
    if model not in _explainers:
        _explainers[model] = Explainer(model, config, dataset)
    return _explainers[model]
