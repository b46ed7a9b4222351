"""recbole-llmalign: a RecBole plugin that aligns collaborative filtering with language models."""

from recbole_llmalign import compat

compat.apply()

from recbole_llmalign.evaluator import register_metrics  # noqa: E402

register_metrics()

__version__ = "0.1.0"
