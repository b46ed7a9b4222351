"""Top-K recommendations for one user from a saved checkpoint, with titles, and explanations with their evidence.

    python run_recbole_llmalign.py recommend --model_file saved/AlignLLMRec-<time>.pth --user 196 --topk 10 [--explain]
    python run_recbole_llmalign.py recommend --model_file saved/AlignGenRec-<time>.pth --user 196 --topk_cache saved/topk.pth

Works for any RecBole or plugin model saved by a run (sequential models read the user's whole
known history, time-ordered; general models score by user id). Items the user already has are
not recommended. ``--explain`` (AlignLLMRec) gives each item one sentence and the evidence it was
written from: the history items closest to it by the backbone's item vectors and the attributes
they share (``llm/explain.py``); ``recommend(...).items[k].evidence`` holds it as data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from recbole_llmalign.llm.explain import Evidence


@dataclass
class RecommendedItem:
    """One ranked item; ``explanation`` and ``evidence`` are set by ``--explain``."""

    title: str
    item_id: str  # external id
    score: float
    explanation: str | None = None
    evidence: Evidence | None = None


@dataclass
class Recommendation:
    """What ``recommend`` returns: the user's recent history and the ranked items."""

    user: str
    model: str
    history: list[str]  # titles, oldest first (the last ``show_history`` items)
    items: list[RecommendedItem] = field(default_factory=list)  # best first

    @property
    def titles(self) -> list[str]:
        return [item.title for item in self.items]

    @property
    def item_ids(self) -> list[str]:
        return [item.item_id for item in self.items]

    @property
    def scores(self) -> list[float]:
        return [item.score for item in self.items]

    @property
    def explanations(self) -> list[str]:
        return [item.explanation for item in self.items if item.explanation is not None]

    def render(self) -> str:
        lines = [f"User {self.user}: recent history (oldest first)"]
        lines += [f"  - {title}" for title in self.history] or ["  (no interactions)"]
        lines.append(f"Top-{len(self.items)} by {self.model}:")
        for rank, item in enumerate(self.items, start=1):
            lines.append(f"  {rank:2d}. {item.title}  [item {item.item_id}]  score {item.score:.3f}")
            if item.explanation is not None:
                lines.append(f"      why: {item.explanation}")
            if item.evidence is not None:
                lines.append(f"      evidence: {item.evidence.render()}")
        return "\n".join(lines)


def _titles(config: Any, dataset: Any) -> list[str]:
    from recbole_llmalign.data.item_text import item_texts

    fields = (config["item_text_fields"] if "item_text_fields" in config else None) or []
    texts = item_texts(dataset, fields[:1]) if fields else [""] * dataset.item_num
    tokens = dataset.field2id_token[dataset.iid_field]
    return [text or f"item {tokens[i]}" for i, text in enumerate(texts)]


def user_history(dataset: Any, internal_user: int) -> torch.Tensor:
    """Internal item ids of every interaction of the user, time-ordered when a time field exists."""
    inter = dataset.inter_feat
    rows = (inter[dataset.uid_field] == internal_user).nonzero().flatten()
    items = inter[dataset.iid_field][rows]
    if dataset.time_field and dataset.time_field in inter:
        items = items[torch.argsort(inter[dataset.time_field][rows], stable=True)]
    return items


def _internal_user(config: Any, dataset: Any, user: str) -> int:
    uid_tokens = dataset.field2token_id[dataset.uid_field]
    if str(user) not in uid_tokens:
        examples = [t for t in list(uid_tokens)[1:4]]
        raise ValueError(f"User '{user}' is not in {config['dataset']} (external ids look like {examples}); "
                         "pass an id from the dataset's .inter file.")
    return uid_tokens[str(user)]


def recommend_from_cache(model_file: str, topk_cache: str, user: str, topk: int = 10, show_history: int = 5,
                         trust: bool = False) -> Recommendation:
    """Top-``topk`` from a pre-computed top-K file (``serving.precompute_topk``), without loading the model.

    The cache is refused when it was built from another checkpoint or other data. Both files are
    read under the allowlist of ``safe_load`` unless ``trust`` (``--trust_checkpoint``).
    """
    from recbole.data import create_dataset

    from recbole_llmalign.compat import load_checkpoint
    from recbole_llmalign.config import upgrade_config
    from recbole_llmalign.serving import TopKCache

    config = upgrade_config(load_checkpoint(model_file, map_location="cpu", trust=trust)["config"])
    dataset = create_dataset(config)
    dataset.build()  # RecBole turns its feature tables into tensors while building the splits
    cache = TopKCache(topk_cache, model_file=model_file, dataset=dataset, trust=trust)
    history = user_history(dataset, _internal_user(config, dataset, user))
    rows = cache.lookup(str(user), topk)
    titles = _titles(config, dataset)
    token_ids = dataset.field2token_id[dataset.iid_field]
    return Recommendation(
        user=str(user), model=f"{config['model']} (cached top-{cache.topk})",
        history=[titles[i] for i in history[-show_history:].tolist()],
        items=[RecommendedItem(titles[token_ids[item]], item, score) for item, score in rows],
    )


def rank_items(model: Any, config: Any, dataset: Any, history: torch.Tensor, topk: int,
               internal_user: int | None = None) -> tuple[list[int], list[float]]:
    """(internal ids, scores) of the ``topk`` best items the model gives a user whose interactions are ``history``
    (internal ids, oldest first), never one of them: sequential models read the last ``MAX_ITEM_LIST_LENGTH`` of
    ``history``, general models ``internal_user``."""
    from recbole.data.interaction import Interaction
    from recbole.utils import ModelType

    if model.type == ModelType.SEQUENTIAL:
        window = history[-int(config["MAX_ITEM_LIST_LENGTH"]):]
        item_seq = torch.zeros(1, int(config["MAX_ITEM_LIST_LENGTH"]), dtype=torch.long)
        item_seq[0, :len(window)] = window
        interaction = {model.ITEM_SEQ: item_seq, model.ITEM_SEQ_LEN: torch.tensor([len(window)])}
        if internal_user is not None:  # a cross-fitted model (cross_fit_evaluation: folds) routes by user
            interaction[model.USER_ID] = torch.tensor([internal_user])
    else:
        interaction = {dataset.uid_field: torch.tensor([internal_user])}
    with torch.no_grad():
        scores = model.full_sort_predict(Interaction(interaction).to(config["device"])).view(-1).cpu().clone()
    scores[0] = -torch.inf  # padding item
    scores[history] = -torch.inf  # already interacted
    top = torch.topk(scores, min(topk, int(torch.isfinite(scores).sum())))
    return top.indices.tolist(), top.values.tolist()


def recommend(model_file: str, user: str, topk: int = 10, explain: bool = False, show_history: int = 5,
              loaded: tuple | None = None, trust: bool = False) -> Recommendation:
    """Top-``topk`` items for external user id ``user`` from the checkpoint ``model_file``.

    ``loaded`` = the tuple of ``quick_start.load_data_and_model`` to reuse across calls;
    ``trust`` = load ``model_file`` with full unpickling (``--trust_checkpoint``).
    """
    from recbole_llmalign.quick_start import load_data_and_model

    config, model, dataset, _, _, _ = loaded or load_data_and_model(model_file, trust=trust)
    internal_user = _internal_user(config, dataset, user)
    history = user_history(dataset, internal_user)
    explainer = None
    if explain:  # refused before any ranking when the model cannot explain
        from recbole_llmalign.llm.explain import explainer_for

        explainer = explainer_for(model, config, dataset)
    indices, scores = rank_items(model, config, dataset, history, topk, internal_user)
    titles = _titles(config, dataset)
    item_tokens = dataset.field2id_token[dataset.iid_field]
    result = Recommendation(
        user=str(user), model=config["model"], history=[titles[i] for i in history[-show_history:].tolist()],
        items=[RecommendedItem(titles[i], str(item_tokens[i]), score) for i, score in zip(indices, scores)],
    )
    if explainer is not None:
        for item, explanation in zip(result.items, explainer.explain(history.tolist(), indices)):
            item.explanation, item.evidence = explanation.text, explanation.evidence
    return result
