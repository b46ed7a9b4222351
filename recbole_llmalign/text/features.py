"""Per-item text features for a RecBole dataset: metadata and review embeddings, cached.

``item_text_features(config, train_dataset)`` returns tensors indexed by internal item id:
``meta [N, Dm]``, ``has_meta [N]``, ``reviews [N, R, Dr]``, ``review_mask [N, R]``. Reviews come
from training interactions only. Encoding runs once per (dataset, encoder, fields, split, texts);
later runs load the cache in milliseconds without loading any encoder.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from recbole_llmalign.data.item_text import item_reviews, item_texts
from recbole_llmalign.text.cache import EmbeddingCache, cache_key
from recbole_llmalign.text.encoders import (
    encode_mean_pooled,
    encode_sentences,
    resolve_review_encoder,
    resolve_sentence_encoder,
)

logger = logging.getLogger(__name__)


def item_text_features(config: Any, train_dataset: Any) -> dict[str, torch.Tensor]:
    """Metadata and review embeddings for every item (see module docstring). Logs timing and cache hits.

    Under multi-process training rank 0 encodes and writes the cache while the other ranks wait,
    then read it: the text is encoded once, not once per process.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()  # rank 0 has written the cache
        return _item_text_features(config, train_dataset)
    features = _item_text_features(config, train_dataset)
    if distributed:
        torch.distributed.barrier()
    return features


def _item_text_features(config: Any, train_dataset: Any) -> dict[str, torch.Tensor]:
    cache = EmbeddingCache(config["text_cache_dir"])
    dataset_name = config["dataset"]
    fields = list(config["item_text_fields"] or [])  # a dataset may have no item text
    review_field = config["review_field"]
    max_reviews = int(config["max_reviews_per_item"])
    if not fields and not (review_field and max_reviews > 0):
        raise ValueError(
            f"Dataset '{dataset_name}' has no item_text_fields and no review_field: set either in its YAML or "
            "config (e.g. item_text_fields: [title]), or use item_representation: id."
        )
    show_progress = bool(config["show_progress"])
    start = time.perf_counter()

    meta_hit: bool | None = None  # None: no metadata fields configured
    if fields:
        texts = item_texts(train_dataset, fields)
        encoder = resolve_sentence_encoder(config["text_encoder"])
        key = cache_key(kind="meta", dataset=dataset_name, encoder=encoder, fields=fields, texts=texts)
        meta_arrays, meta_hit = cache.get_or_build(
            f"{dataset_name}-meta", key,
            lambda: {"embedding": encode_sentences(texts, encoder, show_progress=show_progress)},
        )
        meta = torch.from_numpy(meta_arrays["embedding"])
        has_meta = torch.tensor([bool(t) for t in texts])
    else:  # reviews only: no metadata slot is ever attended to
        meta = torch.zeros(train_dataset.item_num, 1)
        has_meta = torch.zeros(train_dataset.item_num, dtype=torch.bool)
    n_items = train_dataset.item_num

    reviews = torch.zeros(n_items, 0, 1)
    review_mask = torch.zeros(n_items, 0, dtype=torch.bool)
    review_hit = None
    if review_field and max_reviews > 0:
        per_item = item_reviews(train_dataset, review_field, max_reviews)
        flat = [text for texts_of_item in per_item for text in texts_of_item]
        review_encoder = resolve_review_encoder(config["review_encoder"])
        review_key = cache_key(kind="reviews", dataset=dataset_name, split="train", field=review_field,
                               encoder=review_encoder,
                               reviews=per_item)
        arrays, review_hit = cache.get_or_build(
            f"{dataset_name}-reviews", review_key,
            lambda: {"embedding": encode_mean_pooled(flat, review_encoder, show_progress=show_progress)
                     if flat else np.zeros((0, 1), dtype=np.float32)},
        )
        embedding = torch.from_numpy(arrays["embedding"])
        reviews = torch.zeros(n_items, max_reviews, embedding.size(-1))
        review_mask = torch.zeros(n_items, max_reviews, dtype=torch.bool)
        offset = 0
        for item, texts_of_item in enumerate(per_item):
            count = len(texts_of_item)
            reviews[item, :count] = embedding[offset:offset + count]
            review_mask[item, :count] = True
            offset += count
    elapsed = time.perf_counter() - start
    logger.info(
        f"Item text features for {dataset_name}: {int(has_meta.sum())}/{n_items - 1} items with metadata"
        f"{'' if meta_hit is None else (' (cache hit)' if meta_hit else ' (encoded)')}, "
        f"{int(review_mask.any(1).sum())} with reviews"
        f"{'' if review_hit is None else (' (cache hit)' if review_hit else ' (encoded)')}, {elapsed:.2f} s."
    )
    return {"meta": meta, "has_meta": has_meta, "reviews": reviews, "review_mask": review_mask,
            "seconds": torch.tensor(elapsed)}
