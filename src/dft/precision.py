"""Which dtype each part of a loss runs in (one place for the mixed-precision rules).

* Softmax statistics, weights, reductions and gradient accumulators: float32 (float64 stays float64).
* Matmuls of the fused head: the autocast dtype inside ``torch.autocast`` (as ``F.linear`` would),
  else the inputs' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_dtype", "matmul_dtype", "real_execution"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would compute in here (the autocast dtype when enabled)."""
    if torch.is_autocast_enabled(hidden.device.type) and hidden.dtype != torch.float64:
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


def real_execution(device: torch.device | None = None) -> bool:
    """False while tensors are not real: under a ``TorchDispatchMode`` (``FakeTensorMode`` in non-strict
    export, FSDP's memory tracker, FLOP counters), while ``torch.compile`` traces, or during CUDA-graph
    capture on ``device``. Process-wide caches are filled only when this is True."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None or torch.compiler.is_compiling():
        return False
    if device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True
