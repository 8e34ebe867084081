"""The DFT weight family: one map from detached target log-probabilities to token weights.

Every loss path in ``dft`` (materialised logits in [`dft.losses`][dft.losses], the fused head in
[`dft.fused`][dft.fused]) calls [`DFTWeight.__call__`][dft.DFTWeight.__call__]; nothing else derives a weight.

For a token with target probability ``p`` (``logp = log p``, already detached), the weight is built
in this order:

```text
w = p ** alpha                      # alpha=0: cross-entropy, alpha=1: DFT (Wu et al. 2025)
w = max(w, min_weight)              # floor (authors' pre-release code used 0.01)
w = beta * w + (1 - beta)           # mix: beta=0 is CE, beta=1 is the weight above
w = w * (H_k / ln k) ** eaft_alpha  # EAFT: entropy of the model's top-k distribution (k = eaft_top_k)
w = w * [p >= p_min] * [p <= p_max] # thresholds: tokens outside get weight 0
                                    # (they still count in the mean's denominator)
w = 1 where y in ce_token_ids       # tokens kept on cross-entropy (e.g. EOS and the special tokens)
```

A user callable ``weight_fn(logp) -> w`` replaces the first three steps (EAFT and thresholds still
apply). EAFT (Entropy-Adaptive Fine-Tuning, arXiv 2601.02151) needs the token's whole detached
distribution: ``H_k`` is the entropy of ``softmax`` over the ``k`` largest logits, in ``[0, ln k]``,
so the factor lies in ``[0, 1]`` (confident tokens, small entropy: small weight).
The token loss is then ``-w * log p`` with ``w`` treated as a constant (stop-gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, TypedDict

import torch
from torch import Tensor

from .precision import real_execution

__all__ = ["DFTWeight", "WeightFn", "WeightOptions", "beta_schedule", "topk_entropy_ratio"]

WeightFn = Callable[[Tensor], Tensor]
"""A user weight: detached float32/64 log-probabilities ``[N]`` -> non-negative weights ``[N]``."""


def _check_number(name: str, value: object, *, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r}).")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}.")


@dataclass(frozen=True)
class DFTWeight:
    """Token weights of the DFT family, from detached log-probabilities.

    Args:
        alpha: Power of the target probability, ``w = p ** alpha``. ``0`` gives cross-entropy exactly, ``1`` the paper's
            DFT; values in between follow "Beyond Log Likelihood" (arXiv 2510.00526).
        min_weight: Floor ``w = max(w, min_weight)``, in ``[0, 1]``.
        beta: Mix ``w = beta * w + (1 - beta)`` in ``[0, 1]``: ``0`` is cross-entropy, ``1`` the pure weight. Ramp it
            from 0 to 1 for a CE -> DFT warm-up.
        p_min: Only tokens with ``p >= p_min`` get a weight; the others get ``0``.
        p_max: Only tokens with ``p <= p_max`` get a weight; the others get ``0``.
        weight_fn: Replaces power, floor and mix: ``weight_fn(logp)`` with ``logp`` of shape ``[N]`` (detached, float32
            or float64) returns weights of shape ``[N]``.
        eaft_alpha: EAFT: multiply by ``(H_k / ln k) ** eaft_alpha`` with ``H_k`` the entropy of the model's top-``k``
            distribution (detached). ``0`` disables it; EAFT proper is ``alpha=0, eaft_alpha=1``.
        eaft_top_k: ``k`` of the EAFT entropy (LLaMA-Factory's default).
        ce_token_ids: Target ids trained with cross-entropy (weight exactly 1, whatever the other options say), e.g. the
            tokenizer's special tokens: a stop token the base never produced has ``p ~ 1/V``, so DFT alone would give it
            almost no gradient and generation would not stop.

    Examples:
        >>> w = DFTWeight(alpha=1.0, min_weight=0.01)
        >>> w(torch.log(torch.tensor([0.5, 0.001])))
        tensor([0.5000, 0.0100])
    """

    alpha: float = 1.0
    min_weight: float | None = None
    beta: float = 1.0
    p_min: float | None = None
    p_max: float | None = None
    weight_fn: WeightFn | None = None
    eaft_alpha: float = 0.0
    eaft_top_k: int = 20
    ce_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.ce_token_ids is not None:
            ids = self.ce_token_ids
            if isinstance(ids, Tensor):
                ids = ids.reshape(-1).tolist()
            if isinstance(ids, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
            ):
                raise TypeError(f"ce_token_ids must be token ids (ints >= 0), got {self.ce_token_ids!r}.")
            object.__setattr__(self, "ce_token_ids", tuple(sorted(set(ids))) or None)
        _check_number("alpha", self.alpha, low=0.0)
        _check_number("beta", self.beta, low=0.0, high=1.0)
        for name in ("min_weight", "p_min", "p_max"):
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value, low=0.0, high=1.0)
        if self.p_min is not None and self.p_max is not None and self.p_min > self.p_max:
            raise ValueError(f"p_min ({self.p_min}) must be <= p_max ({self.p_max}).")
        if self.weight_fn is not None and not callable(self.weight_fn):
            raise TypeError(f"weight_fn must be callable, got {type(self.weight_fn).__name__}.")
        _check_number("eaft_alpha", self.eaft_alpha, low=0.0)
        if isinstance(self.eaft_top_k, bool) or not isinstance(self.eaft_top_k, int) or self.eaft_top_k < 2:
            raise ValueError(f"eaft_top_k must be an int >= 2, got {self.eaft_top_k!r}.")

    @property
    def needs_logits(self) -> bool:
        """True when the weight depends on the whole distribution (EAFT), not only on ``log p``."""
        return self.eaft_alpha != 0.0

    @property
    def is_constant_one(self) -> bool:
        """True when every weight is exactly 1 (plain cross-entropy)."""
        return (
            self.weight_fn is None
            and (self.alpha == 0.0 or self.beta == 0.0)
            and self.p_min is None
            and self.p_max is None
            and not self.needs_logits
        )

    @property
    def is_nonnegative(self) -> bool:
        """True when every weight is known to be >= 0 (all built-in weights; a ``weight_fn`` may not be)."""
        return self.weight_fn is None

    @property
    def needs_labels(self) -> bool:
        """True when the weight depends on the target id (``ce_token_ids``)."""
        return self.ce_token_ids is not None

    def __call__(self, logp: Tensor, logits: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """Weights for detached target log-probabilities.

        Args:
            logp: ``[...]`` log-probabilities of the targets, float32 or float64 (detached inside).
            logits: ``[..., V]`` the (transformed) logits of the same tokens; needed only when
                [`needs_logits`][dft.DFTWeight.needs_logits] (EAFT), read without a gradient.
            labels: ``[...]`` the target ids; needed only when [`needs_labels`][dft.DFTWeight.needs_labels]
                (``ce_token_ids``).

        Returns:
            ``[...]`` weights, same shape and dtype as ``logp``, no graph attached.
        """
        logp = logp.detach()
        if self.weight_fn is not None:
            w = self.weight_fn(logp)
            if not isinstance(w, Tensor) or w.shape != logp.shape:
                got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
                raise ValueError(
                    f"weight_fn must return a tensor of the log-probs' shape {tuple(logp.shape)}, got {got}."
                )
            w = w.detach().to(logp.dtype)
        else:
            if self.alpha == 0.0:
                w = torch.ones_like(logp)
            elif self.alpha == 1.0:
                w = logp.exp()
            else:
                w = (logp * self.alpha).exp()
            if self.min_weight is not None:
                w = w.clamp_min(self.min_weight)
            if self.beta != 1.0:
                w = w * self.beta + (1.0 - self.beta)
        if self.needs_logits:
            if logits is None or logits.shape[:-1] != logp.shape:
                raise ValueError("EAFT weights (eaft_alpha > 0) need the logits [..., V] of the same tokens.")
            w = w * topk_entropy_ratio(logits, self.eaft_top_k).to(w.dtype).pow(self.eaft_alpha)
        if self.p_min is not None or self.p_max is not None:
            p = logp.exp()
            if self.p_min is not None:
                w = w * (p >= self.p_min)
            if self.p_max is not None:
                w = w * (p <= self.p_max)
        if self.ce_token_ids is not None:
            if labels is None or labels.shape != logp.shape:
                raise ValueError("ce_token_ids weights need the target ids (labels) of the same tokens.")
            w = torch.where(torch.isin(labels, _id_tensor(self.ce_token_ids, labels.device)), torch.ones_like(w), w)
        return w

    @classmethod
    def resolve(cls, weighting: DFTWeight | None, options: dict[str, Any]) -> DFTWeight:
        """The ONE place a weight is built from user input: a [`DFTWeight`][dft.DFTWeight] or flat keyword options.

        ``options`` holds only weight options (``alpha``, ``min_weight``, ...); giving both a
        ``weighting`` object and flat options is ambiguous and raises ``ValueError``.
        """
        if weighting is not None:
            if not isinstance(weighting, DFTWeight):
                raise TypeError(f"weighting must be a dft.DFTWeight, got {type(weighting).__name__}.")
            if options:
                raise ValueError(
                    f"pass either weighting=DFTWeight(...) or the flat options {sorted(options)}, not both; "
                    "use dataclasses.replace(weighting, ...) to change a field."
                )
            return weighting
        return cls(**options)

    def with_beta(self, beta: float) -> DFTWeight:
        """A copy with another ``beta`` (the CE -> DFT warm-up changes it every step)."""
        return replace(self, beta=beta)


_ID_TENSORS: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}


def _id_tensor(ids: tuple[int, ...], device: torch.device) -> Tensor:
    """``ids`` as a tensor on ``device``, built once (no host-to-device copy per call)."""
    if not real_execution(device):  # fake / traced / captured: neither read nor fill the cache
        return torch.tensor(ids, dtype=torch.long, device=device)
    key = (ids, device)
    if key not in _ID_TENSORS:
        _ID_TENSORS[key] = torch.tensor(ids, dtype=torch.long, device=device)
    return _ID_TENSORS[key]


@torch.no_grad()
def topk_entropy_ratio(logits: Tensor, k: int) -> Tensor:
    """``H_k / ln k``: entropy of ``softmax`` over the ``k`` largest logits of each row, in ``[0, 1]``.

    ``logits``: ``[..., V]`` (float32/64); returns ``[...]``. With ``V < k`` the ``V`` logits are used
    (and ``ln V``).
    """
    k = min(k, logits.shape[-1])
    if k < 2:
        return torch.zeros(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
    top = torch.topk(logits.detach(), k, dim=-1, sorted=False).values
    logq = torch.log_softmax(top, dim=-1)
    return -(logq.exp() * logq).sum(-1) / math.log(k)


class WeightOptions(TypedDict, total=False):
    """The fields of [`DFTWeight`][dft.DFTWeight] as flat keyword arguments (``dft_loss(..., alpha=0.5)``)."""

    alpha: float
    min_weight: float | None
    beta: float
    p_min: float | None
    p_max: float | None
    weight_fn: WeightFn | None
    eaft_alpha: float
    eaft_top_k: int
    ce_token_ids: tuple[int, ...] | None


WEIGHT_OPTION_NAMES: frozenset[str] = frozenset(f.name for f in fields(DFTWeight))


def beta_schedule(step: int, final_beta: float, warmup_steps: int) -> float:
    """CE -> DFT warm-up: ``beta`` ramps linearly from 0 at step 0 to ``final_beta`` at ``warmup_steps``."""
    if warmup_steps <= 0:
        return final_beta
    return final_beta * min(1.0, step / warmup_steps)
