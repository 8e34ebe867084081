"""Negative-aware Fine-Tuning (NFT; Chen et al. 2025, arXiv 2505.18116): learn from the samples a verifier rejected.

Per supervised token ``t`` of a sample of prompt ``q`` (``pi_old``: the policy that sampled; ``r`` = the fraction
of ``q``'s samples the verifier accepted, clamped to ``[rhat_min, rhat_max]``):

```text
log R_t = min(log pi(a_t) - log pi_old(a_t), max_log_ratio)            # R_t: the token's likelihood ratio
accepted:  l_t = -(1 - r) * log R_t                                     # gradient: (1 - r) * CE's
rejected:  l_t = -(1 - r) * neg_weight * log st((1 - r R_t) / (1 - r))  # st(x): max(x, eps) in value, x in gradient
```

with ``eps = clamp_negative`` (the official code's defaults, NVlabs/NFT: ``neg_weight`` 1, ``clamp_negative`` 1,
``max_log_ratio`` 10, ``r`` in ``[0.02, 0.98]``). Each token's gradient is a detached, signed weight times
``-grad log p_t`` (the fused head's own shape):

```text
accepted:  w_t = (1 - r) * [log ratio <= max_log_ratio]          (x sg(p_t) with dft_positive)
rejected:  w_t = -neg_weight * r * R_t / max(x_t, eps) * [log ratio <= max_log_ratio]
```

At the first step (``pi = pi_old``) an accepted token weighs ``1 - r`` and a rejected one ``-r``: Dr. GRPO's
advantages. The official code divides its token sum by a constant; here the token values are reduced like every
other loss of the library (a mean over the step's supervised tokens, accepted and rejected, exact under
accumulation and ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["NFTInputs", "NFTTally", "NFTWeight", "nft_terms"]


def _check(name: str, value: object, low: float, high: float | None = None, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"NFTWeight.{name} must be a finite number, got {value!r}.")
    if value < low or (open_low and value == low) or (high is not None and value > high):
        bound = f"> {low}" if open_low else f">= {low}"
        raise ValueError(f"NFTWeight.{name} must be {bound}{'' if high is None else f' and <= {high}'}, got {value!r}.")


@dataclass(frozen=True)
class NFTWeight:
    """NFT's options (the official training script's defaults).

    Args:
        neg_weight: Weight of the rejected samples' term.
        clamp_negative: ``eps`` of ``st(x) = max(x, eps)``: the rejected term's value is clamped from below (its
            gradient is not).
        max_log_ratio: The log-ratio ``log pi - log pi_old`` is clamped to this from above (no gradient beyond).
        rhat_min: Lower clamp of a prompt's acceptance rate ``r``.
        rhat_max: Upper clamp of ``r``.
        dft_positive: Also weight the accepted term by DFT's ``sg(p_t)``: ``w_t = sg(p_t) (1 - r)``.
    """

    neg_weight: float = 1.0
    clamp_negative: float = 1.0
    max_log_ratio: float = 10.0
    rhat_min: float = 0.02
    rhat_max: float = 0.98
    dft_positive: bool = False

    def __post_init__(self) -> None:
        _check("neg_weight", self.neg_weight, 0.0)
        _check("clamp_negative", self.clamp_negative, 0.0, open_low=True)
        _check("max_log_ratio", self.max_log_ratio, 0.0)
        _check("rhat_min", self.rhat_min, 0.0, 1.0, open_low=True)
        _check("rhat_max", self.rhat_max, self.rhat_min, 1.0)
        if self.rhat_max >= 1.0:
            raise ValueError(
                f"NFTWeight.rhat_max must be < 1 (the rejected term divides by 1 - r), got {self.rhat_max}."
            )
        if not isinstance(self.dft_positive, bool):
            raise TypeError(f"NFTWeight.dft_positive must be a bool, got {type(self.dft_positive).__name__}.")


@dataclass
class NFTTally:
    """Sums over the supervised tokens of one call (detached 0-dim float64), for logging: the positive and negative
    parts of the loss (token values, not normalised), the ratio ``R``, and how many tokens each clamp touched."""

    positive_sum: Tensor | float = 0.0
    negative_sum: Tensor | float = 0.0
    ratio_sum: Tensor | float = 0.0
    positive_tokens: Tensor | float = 0.0
    negative_tokens: Tensor | float = 0.0
    ratio_clipped: Tensor | float = 0.0
    negative_clamped: Tensor | float = 0.0

    def add_(self, other: NFTTally) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def reset_(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0.0)

    def as_dict(self, prefix: str = "nft/") -> dict[str, float]:
        """Means for a logger: ``positive`` / ``negative`` (the parts' mean token value), ``ratio`` (mean ``R``),
        ``ratio_clipped`` / ``negative_clamped`` (fractions of the tokens each clamp touched), ``rejected_tokens``."""
        total = float(self.positive_tokens) + float(self.negative_tokens)
        return {
            f"{prefix}positive": float(self.positive_sum) / max(float(self.positive_tokens), 1.0),
            f"{prefix}negative": float(self.negative_sum) / max(float(self.negative_tokens), 1.0),
            f"{prefix}ratio": float(self.ratio_sum) / max(total, 1.0),
            f"{prefix}ratio_clipped": float(self.ratio_clipped) / max(total, 1.0),
            f"{prefix}negative_clamped": float(self.negative_clamped) / max(float(self.negative_tokens), 1.0),
            f"{prefix}rejected_tokens": float(self.negative_tokens) / max(total, 1.0),
        }

    def pack(self) -> Tensor:
        return torch.tensor([float(getattr(self, n)) for n in self.__dataclass_fields__], dtype=torch.float64)

    @classmethod
    def unpack(cls, packed: Tensor) -> NFTTally:
        return cls(*(float(x) for x in packed.tolist()))


def nft_terms(
    logp: Tensor, old_logp: Tensor, rhat: Tensor, accepted: Tensor, options: NFTWeight
) -> tuple[Tensor, Tensor, NFTTally]:
    """NFT's per-token weight and value (the module docstring's formulas), elementwise.

    Args:
        logp: ``[...]`` the policy's target log-probabilities (detached inside).
        old_logp: ``[...]`` ``pi_old``'s target log-probabilities of the same tokens.
        rhat: ``[...]`` the acceptance rate of each token's prompt (clamped here).
        accepted: ``[...]`` 1/True for a token of an accepted sample, 0/False for a rejected one.
        options: [`NFTWeight`][dft.NFTWeight].

    Returns:
        ``(w, value, tally)``: the signed weight ``w [...]`` (so that ``grad l_t = -w_t grad log p_t``), the token
        value ``l_t [...]``, both in ``logp``'s dtype, and the [`NFTTally`][dft.nft.NFTTally] of these tokens.
    """
    logp = logp.detach()
    dtype = logp.dtype
    delta = logp - old_logp.detach().to(dtype)
    log_ratio = delta.clamp(max=options.max_log_ratio)
    live = (delta <= options.max_log_ratio).to(dtype)  # torch.clamp's gradient: 1 up to the bound, 0 beyond
    ratio = log_ratio.exp()
    r = rhat.detach().to(dtype).clamp(options.rhat_min, options.rhat_max)
    pos = accepted.detach().to(torch.bool)
    x = (1.0 - r * ratio) / (1.0 - r)
    st = x.clamp(min=options.clamp_negative)
    w_pos = (1.0 - r) * live
    value_pos = -(1.0 - r) * log_ratio
    if options.dft_positive:
        p = logp.exp()
        w_pos, value_pos = w_pos * p, value_pos * p
    w_neg = -options.neg_weight * r * ratio / st * live
    value_neg = -(1.0 - r) * options.neg_weight * st.log()
    w = torch.where(pos, w_pos, w_neg)
    value = torch.where(pos, value_pos, value_neg)
    with torch.no_grad():
        neg = ~pos
        tally = NFTTally(
            positive_sum=torch.where(pos, value, 0.0).sum().double(),
            negative_sum=torch.where(neg, value, 0.0).sum().double(),
            ratio_sum=ratio.sum().double(),
            positive_tokens=pos.sum().double(),
            negative_tokens=neg.sum().double(),
            ratio_clipped=(live == 0).sum().double(),
            negative_clamped=(neg & (x < options.clamp_negative)).sum().double(),
        )
    return w, value, tally


@dataclass
class NFTInputs:
    """One call's NFT inputs, each ``[...]`` of the labels' shape (any value where a label is not supervised).

    Attributes:
        old_logp: ``pi_old``'s target log-probabilities (at the sampling temperature).
        rhat: each token's prompt's acceptance rate.
        accepted: 1 for tokens of accepted samples, 0 for rejected ones.
        options: [`NFTWeight`][dft.NFTWeight].
        tally: filled by the loss call (sums over the supervised tokens).
    """

    old_logp: Tensor
    rhat: Tensor
    accepted: Tensor
    options: NFTWeight = field(default_factory=NFTWeight)
    tally: NFTTally = field(default_factory=NFTTally)

    def check(self, shape: torch.Size) -> None:
        for name in ("old_logp", "rhat", "accepted"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.shape != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"NFT's {name} must have the labels' shape {tuple(shape)}, got {got}.")

    def rows(self, index: Tensor | None) -> NFTInputs:
        """The supervised rows (``index`` into the flattened tokens; None: all), flattened; shares the tally."""

        def pick(t: Tensor) -> Tensor:
            t = t.reshape(-1)
            return t if index is None else t.index_select(0, index)

        return NFTInputs(pick(self.old_logp), pick(self.rhat), pick(self.accepted), self.options, self.tally)

    def terms(self, logp: Tensor, rows: slice | Tensor) -> tuple[Tensor, Tensor]:
        """``(w, value)`` of the tokens ``rows`` of these (already compacted) inputs; their sums go to the tally."""
        w, value, tally = nft_terms(logp, self.old_logp[rows], self.rhat[rows], self.accepted[rows], self.options)
        self.tally.add_(tally)
        return w, value
