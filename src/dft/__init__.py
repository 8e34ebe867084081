"""dft: Dynamic Fine-Tuning (DFT) as a drop-in replacement for SFT's cross-entropy.

``loss_t = -sg(p_t ** alpha) * log p_t`` averaged over supervised tokens (Wu et al. 2025).
"""

from .fused import LinearDFTLoss, linear_dft_loss
from .losses import DFTLoss, causal_dft_loss, compute_loss_func, dft_loss, shift_causal_labels, token_stats
from .stats import TokenStats
from .weights import DFTWeight

__version__ = "0.1.0"

__all__ = [
    "DFTLoss",
    "DFTWeight",
    "LinearDFTLoss",
    "TokenStats",
    "causal_dft_loss",
    "compute_loss_func",
    "dft_loss",
    "linear_dft_loss",
    "shift_causal_labels",
    "token_stats",
]
