"""Where the plugin's tensors live and at what precision: the one place a device is named.

Model code places every tensor it creates on the device of the module or of its inputs, with
one exception: Python-side bookkeeping (prompt token ids assembled from lists, trie prefixes,
draws from the seeded CPU generator) lives on :data:`HOST` on purpose and moves to the model's
device once per batch. ``tests/test_device.py`` checks both rules, statically and by running the
models with a default device that no real tensor is on.

:func:`llm_autocast` is the precision policy of the frozen LLM's forward: autocast in the LLM's
own low-precision dtype when its weights are bfloat16 or float16 (``llm_dtype: auto`` gives
that on CUDA only), nothing otherwise. Heads and losses run outside it, in float32.
This module sits on the lowest floor of the import graph: it imports nothing of the plugin.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

HOST = torch.device("cpu")  # Python-side bookkeeping; moved to the model's device once per batch
LOW_PRECISION = (torch.bfloat16, torch.float16)


def llm_autocast(weight: torch.Tensor) -> ContextManager[object]:
    """Autocast on ``weight``'s device in its dtype when that dtype is low precision, else a no-op.

    With bf16/fp16 LLM weights, the soft tokens and prefixes (float32 trainables) meet bf16
    matrices; autocast runs each matmul in the LLM's dtype instead of failing on the mix, while
    reductions (softmax, norms) keep float32 where autocast's policy says so.
    """
    if weight.dtype not in LOW_PRECISION:
        return contextlib.nullcontext()
    return torch.autocast(device_type=weight.device.type, dtype=weight.dtype)
