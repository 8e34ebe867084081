"""TRL interop: ``DFTSFTTrainer`` gives ``trl.SFTTrainer`` users every DFT variant on the fused head.

Requires the optional extra ``pip install dft[trl]``. Everything SFTTrainer does to the data
(chat templates, completion-only loss, packing, padding-free) is kept; only ``compute_loss`` and the
logged diagnostics come from :class:`dft.DFTTrainerMixin`::

    from dft import DFTSFTConfig, DFTSFTTrainer
    args = DFTSFTConfig(output_dir="out", loss_type="dft", dft_alpha=1.0, dft_min_weight=0.01)
    DFTSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok).train()

``loss_type`` keeps TRL's values: ``"dft"`` (default here) or ``"nll"`` (cross-entropy).
"""

from __future__ import annotations

from dataclasses import dataclass

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("dft.DFTSFTTrainer needs TRL: pip install 'dft[trl]'.") from e

from .trainer import DFTArguments, DFTTrainerMixin

__all__ = ["DFTSFTConfig", "DFTSFTTrainer"]


@dataclass
class DFTSFTConfig(DFTArguments, SFTConfig):
    """``trl.SFTConfig`` plus the DFT loss options of :class:`dft.DFTArguments` (``loss_type`` defaults to "dft")."""

    def __post_init__(self) -> None:
        self.validate_dft_arguments()
        if self.bf16 is None and not self.fp16:  # TRL turns bf16 on, which fails where there is none (CPU)
            self.bf16 = _bf16_available()
        super().__post_init__()


def _bf16_available() -> bool:
    """What TRL's ``bf16=None`` default should mean: on where a GPU supports it, off elsewhere (CPU)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class DFTSFTTrainer(DFTTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` whose loss is :func:`dft.causal_lm_loss` (fused head, exact normalisation)."""
