"""Which dtype each part of a loss runs in (one place for the mixed-precision rules).

* Softmax statistics, weights, reductions and gradient accumulators: float32 (float64 stays float64).
* Matmuls of the fused head: the autocast dtype inside ``torch.autocast`` (as ``F.linear`` would),
  else the inputs' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_dtype", "matmul_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would compute in here (the autocast dtype when enabled)."""
    if torch.is_autocast_enabled(hidden.device.type) and hidden.dtype != torch.float64:
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype
