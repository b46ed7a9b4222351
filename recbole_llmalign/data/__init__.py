"""Dataset materialization (ml-1m, Amazon files), item text assembly and the new-item protocol."""

from recbole_llmalign.data.amazon import convert_amazon
from recbole_llmalign.data.datasets import OFFLINE_DATASETS, prepare_dataset
from recbole_llmalign.data.item_text import item_reviews, item_texts, training_pairs
from recbole_llmalign.data.new_items import choose_new_items, data_preparation, remove_new_items

__all__ = ["OFFLINE_DATASETS", "choose_new_items", "convert_amazon", "data_preparation", "item_reviews", "item_texts",
           "prepare_dataset", "remove_new_items", "training_pairs"]
