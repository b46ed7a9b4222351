"""Dataset materialization (ml-1m, Amazon files) and item text assembly."""

from recbole_llmalign.data.amazon import convert_amazon
from recbole_llmalign.data.datasets import OFFLINE_DATASETS, prepare_dataset
from recbole_llmalign.data.item_text import item_reviews, item_texts, training_pairs

__all__ = ["OFFLINE_DATASETS", "convert_amazon", "item_reviews", "item_texts", "prepare_dataset", "training_pairs"]
