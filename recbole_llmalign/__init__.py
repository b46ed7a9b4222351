"""recbole-llmalign: a RecBole plugin that aligns collaborative filtering with language models."""

from recbole_llmalign import compat

compat.apply()

__version__ = "0.1.0"
