"""recbole-llmalign: a RecBole plugin that aligns collaborative filtering with language models."""

from recbole_llmalign import compat, logs

with logs.third_party_warnings_quieted():  # RecBole's import of ray warns about pkg_resources (see logs.py)
    compat.apply()

__version__ = "0.1.0"
