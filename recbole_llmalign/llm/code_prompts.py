"""Task templates of AlignGenRec: text tokenised once, split around its placeholders, rendered by concatenation.

Each generation task (sequential, negative, title_to_code, code_to_title, query) has a template in
AlignGenRec.yaml whose placeholders (``{history}``, ``{negatives}``, ``{title}``, ``{codes}``,
``{query}``) are filled with token ids at training and generation time.
"""

from __future__ import annotations

import re
from typing import Callable

GENERATION_TASKS = ("sequential", "title_to_code", "code_to_title", "query", "negative")
TEMPLATE_SLOTS = {
    "sequential": ("{history}",),
    "negative": ("{history}", "{negatives}"),
    "title_to_code": ("{title}",),
    "code_to_title": ("{codes}",),
    "query": ("{query}",),
}

Pieces = list[list[int] | str]  # token ids of the fixed text, and placeholder names between them


def compile_template(task: str, template: str, encode: Callable[[str], list[int]]) -> Pieces:
    """``template`` tokenised once, split around the placeholders ``task`` needs (all must be present)."""
    if not template:
        raise ValueError(f"{task}_template is empty.")
    for slot in TEMPLATE_SLOTS[task]:
        if slot not in template:
            raise ValueError(f"{task}_template must contain {slot}; got {template!r}.")
    pieces: Pieces = []
    for part in re.split(r"(\{[a-z]+\})", template):
        if part in TEMPLATE_SLOTS[task]:
            pieces.append(part)
        elif part:
            pieces.append(encode(part))
    return pieces


def render(pieces: Pieces, values: dict[str, list[int]]) -> list[int]:
    """Token ids of a compiled template with each placeholder replaced by ``values[placeholder]``."""
    ids: list[int] = []
    for piece in pieces:
        ids += values[piece] if isinstance(piece, str) else piece
    return ids
