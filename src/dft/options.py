"""Flat keyword options -> option objects, in one place.

The public losses take their options either as values (``weighting=dft.DFTWeight(...)``,
``transform=dft.LogitTransform(...)``) or as flat keywords (``alpha=0.5, softcap=30.0``), as users
of ``F.cross_entropy``-style functions expect. ``resolve_options`` is the only code that turns
the flat form into the objects; below it every layer passes the objects through unchanged.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .nft import NFTInputs
from .transform import TRANSFORM_OPTION_NAMES, LogitTransform, TransformOptions
from .weights import WEIGHT_OPTION_NAMES, DFTWeight, WeightOptions

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - Python 3.10
    from typing_extensions import Unpack

__all__ = ["LossCall", "LossOptions", "Unpack", "resolve_options"]


class LossOptions(WeightOptions, TransformOptions, total=False):
    """Every flat option of the loss functions: the [`dft.DFTWeight`][dft.DFTWeight] and
    [`dft.LogitTransform`][dft.LogitTransform] fields."""


def resolve_options(
    weighting: DFTWeight | None, transform: LogitTransform | None, options: dict[str, Any], nft: object = None
) -> tuple[DFTWeight, LogitTransform]:
    """``(DFTWeight, LogitTransform)`` from objects and/or flat options; unknown names raise ``TypeError``.

    With ``nft`` given and no weight option, the weighting is cross-entropy's (NFT's own weights apply alone)."""
    unknown = set(options) - WEIGHT_OPTION_NAMES - TRANSFORM_OPTION_NAMES
    if unknown:
        raise TypeError(
            f"unknown option(s) {sorted(unknown)}; weight options are {sorted(WEIGHT_OPTION_NAMES)}, "
            f"logit options are {sorted(TRANSFORM_OPTION_NAMES)}."
        )
    weight_options = {k: v for k, v in options.items() if k in WEIGHT_OPTION_NAMES}
    if nft is not None and weighting is None and not weight_options:
        weighting = DFTWeight(alpha=0.0)
    transform_options = {k: v for k, v in options.items() if k in TRANSFORM_OPTION_NAMES}
    return DFTWeight.resolve(weighting, weight_options), LogitTransform.resolve(transform, transform_options)


@dataclass(frozen=True)
class LossCall:
    """One loss call's options, resolved and checked once by the public function and handed down as one value.

    Both paths take it: [`dft.dft_loss`][dft.dft_loss] (logits) and [`dft.linear_dft_loss`][dft.linear_dft_loss]
    (fused head); each field is the public keyword of the same name.
    """

    weighting: DFTWeight
    transform: LogitTransform
    ignore_index: int = -100
    reduction: str = "mean"
    num_items_in_batch: int | Tensor | None = None
    validate: bool = True
    return_stats: bool = False
    kl_coef: float = 0.0
    sequence_ids: Tensor | None = None
    token_weights: Tensor | None = None
    nft: NFTInputs | None = None

    @property
    def signed(self) -> bool:
        """Whether a token's weight may be negative (a ``weight_fn``, NFT's rejected tokens)."""
        return self.nft is not None or not self.weighting.is_nonnegative
