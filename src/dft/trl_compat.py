"""TRL interop: ``DFTSFTTrainer`` gives ``trl.SFTTrainer`` users every DFT variant on the fused head.

Requires the optional extra ``pip install 'dft-loss[trl]'``. Everything SFTTrainer does to the data
(chat templates, completion-only loss, packing, padding-free) is kept; only ``compute_loss`` and the
logged diagnostics come from [`dft.DFTTrainerMixin`][dft.trainer.DFTTrainerMixin]:

```python
from dft import DFTSFTConfig, DFTSFTTrainer
args = DFTSFTConfig(output_dir="out", loss_type="dft", dft_alpha=1.0, dft_min_weight=0.01)
DFTSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok).train()
```

``loss_type``: ``"dft"`` (default here), ``"sft"`` / TRL's ``"nll"`` (cross-entropy), ``"asft"`` (DFT + a KL
anchor: pass ``ref_model=`` or train a PEFT model) or ``"eaft"``; TRL's own check of the field only ever
sees ``"nll"``, since its loss is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("dft.DFTSFTTrainer needs TRL: pip install 'dft-loss[trl]'.") from e

from .trainer import DFTArguments, DFTTrainerMixin

__all__ = ["DFTSFTConfig", "DFTSFTTrainer"]


@dataclass
class DFTSFTConfig(DFTArguments, SFTConfig):
    """``trl.SFTConfig`` plus the DFT loss options of [`dft.DFTArguments`][dft.arguments.DFTArguments] (``loss_type``
    defaults to "dft")."""

    def __post_init__(self) -> None:
        self.validate_dft_arguments()
        if self.loss_type == "nft":
            raise ValueError(
                "loss_type='nft' runs in dft.DFTTrainer with dft.DFTConfig (pre-tokenised rows with accepted / "
                "prompt_index, or dft sample's rows): TRL's SFTTrainer prepares the data and drops those columns."
            )
        if self.bf16 is None and not self.fp16:  # TRL turns bf16 on, which fails where there is none (CPU)
            self.bf16 = _bf16_available()
        super().__post_init__()


def _bf16_available() -> bool:
    """What TRL's ``bf16=None`` default should mean: on where a GPU supports it, off elsewhere (CPU)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class _TrlSeesItsOwnLoss(SFTTrainer):
    """``SFTTrainer.__init__`` with ``args.loss_type`` shown as TRL's ``"nll"``: TRL refuses values it does not
    know (``"sft"``, ``"asft"``, ``"eaft"``) and ``"dft"`` under DeepSpeed sequence parallelism, although its own
    loss is never used here (``compute_loss`` is [`dft.DFTTrainerMixin`][dft.trainer.DFTTrainerMixin]'s). Restored right
    after."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        loss_type = getattr(config, "loss_type", None) if isinstance(config, DFTArguments) else None
        if loss_type is not None:
            config.loss_type = "nll"
        try:
            super().__init__(*args, **kwargs)
        finally:
            if loss_type is not None:
                config.loss_type = loss_type


class DFTSFTTrainer(DFTTrainerMixin, _TrlSeesItsOwnLoss):
    """``trl.SFTTrainer`` whose loss is [`dft.causal_lm_loss`][dft.causal_lm_loss] (fused head, exact normalisation);
    every ``loss_type`` of [`dft.DFTArguments`][dft.arguments.DFTArguments] (``"dft"``, ``"sft"``/``"nll"``, ``"asft"``,
    ``"eaft"``).

    TRL's data handling is kept as it is, its masking defaults included, so the supervised tokens can differ
    from `dft train`'s on the same file:

    | rows | `DFTSFTTrainer` (TRL's defaults) | `dft train`, `dft.data.prepare_dataset` + `DFTTrainer` |
    |---|---|---|
    | prompt / completion | the completion (`completion_only_loss=None`) | the completion |
    | `messages` | **every token** (`assistant_only_loss=False`) | **the assistant turns** |
    | `text` | every token | every token |

    To supervise only the assistant turns here, set `DFTSFTConfig(assistant_only_loss=True)`: TRL then needs
    `{% generation %}` ... `{% endgeneration %}` markers around the assistant content in the chat template,
    which most templates lack. Or prepare the rows with [`dft.data.prepare_dataset`][dft.data.prepare_dataset]
    and train with [`DFTTrainer`][dft.trainer.DFTTrainer].
    """
