"""dft: Dynamic Fine-Tuning (DFT) as a drop-in replacement for SFT's cross-entropy.

``loss_t = -sg(p_t ** alpha) * log p_t`` averaged over supervised tokens (Wu et al. 2025).

The Trainer adapter (``DFTConfig``, ``DFTTrainer``, ``DFTSFTTrainer``) imports ``transformers``
lazily, on first access.
"""

from typing import Any

from ._version import __version__
from .causal import CausalLMLossOutput, causal_lm_loss
from .fused import LinearDFTLoss, Reference, linear_dft_loss
from .labels import causal_targets, shift_causal_labels
from .losses import DFTLoss, causal_dft_loss, compute_loss_func, dft_loss, token_stats
from .nft import NFTWeight
from .prior import PriorReport, inspect_prior
from .stats import TokenStats
from .transform import LogitTransform
from .vocab_parallel import VocabShard
from .weights import DFTWeight, beta_schedule

_LAZY = {
    "DFTConfig": "trainer",
    "DFTTrainer": "trainer",
    "DFTTrainerMixin": "trainer",
    "DFTArguments": "arguments",
    "DFTSFTConfig": "trl_compat",
    "DFTSFTTrainer": "trl_compat",
    "global_num_items": "distributed",
}

__all__ = [
    "__version__",
    "CausalLMLossOutput",
    "DFTArguments",
    "DFTConfig",
    "DFTLoss",
    "DFTSFTConfig",
    "DFTSFTTrainer",
    "DFTTrainer",
    "DFTTrainerMixin",
    "DFTWeight",
    "LinearDFTLoss",
    "LogitTransform",
    "NFTWeight",
    "PriorReport",
    "Reference",
    "TokenStats",
    "VocabShard",
    "beta_schedule",
    "causal_dft_loss",
    "causal_lm_loss",
    "causal_targets",
    "compute_loss_func",
    "dft_loss",
    "global_num_items",
    "inspect_prior",
    "linear_dft_loss",
    "shift_causal_labels",
    "token_stats",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dft' has no attribute {name!r}")
