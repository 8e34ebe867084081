"""How a model turns its head output into logits: scale, soft-cap, temperature (one value, every path).

``LogitTransform(logit_scale, softcap, temperature)`` maps the head's output ``z = h @ W.T + b`` to
the logits the loss sees:

```text
u = softcap * tanh(logit_scale * z / softcap) / temperature     # no tanh when softcap is None
```

Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, Falcon-H1's ``lm_head_multiplier`` are
a ``logit_scale``; Gemma 2/3's ``final_logit_softcapping`` is a ``softcap``. ``dft.dft_loss``
applies it to materialised logits, ``dft.linear_dft_loss`` inside each chunk (in place), and
``dft.causal_lm_loss`` composes the model's own transform with the user's ([`then`][dft.LogitTransform.then]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypedDict

from torch import Tensor

__all__ = ["TRANSFORM_OPTION_NAMES", "LogitTransform", "TransformOptions"]


def _check_positive(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


@dataclass(frozen=True)
class LogitTransform:
    """``u = softcap * tanh(logit_scale * z / softcap) / temperature`` (see the module docstring).

    Args:
        logit_scale: multiplies the head output first.
        softcap: final logit soft-capping; None for no tanh.
        temperature: divides the logits last.
    """

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("logit_scale", self.logit_scale)
        _check_positive("temperature", self.temperature)
        _check_positive("softcap", self.softcap, allow_none=True)
        object.__setattr__(self, "logit_scale", float(self.logit_scale))
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.softcap is not None:
            object.__setattr__(self, "softcap", float(self.softcap))

    @property
    def is_identity(self) -> bool:
        return self.logit_scale == 1.0 and self.softcap is None and self.temperature == 1.0

    @classmethod
    def resolve(cls, transform: LogitTransform | None, options: dict[str, Any]) -> LogitTransform:
        """The ONE place a transform is built from user input: an object or flat keyword options."""
        if transform is not None:
            if not isinstance(transform, LogitTransform):
                raise TypeError(f"transform must be a dft.LogitTransform, got {type(transform).__name__}.")
            if options:
                raise ValueError(f"pass either transform=LogitTransform(...) or {sorted(options)}, not both.")
            return transform
        return cls(**options)

    def then(self, outer: LogitTransform) -> LogitTransform:
        """The transform ``outer(self(z))`` as one value (e.g. a model's softcap, then a user's temperature).

        Raises ``ValueError`` when both soft-cap (two tanh cannot be written as one).
        """
        if outer.is_identity:
            return self
        if self.is_identity:
            return outer
        if outer.softcap is None:  # outer scales: u' = u * s2 / T2
            return LogitTransform(
                self.logit_scale, self.softcap, self.temperature * outer.temperature / outer.logit_scale
            )
        if self.softcap is None:  # inner is linear: u = z * s1 / T1
            scale = self.logit_scale / self.temperature * outer.logit_scale
            return LogitTransform(scale, outer.softcap, outer.temperature)
        raise ValueError(
            f"cannot soft-cap twice: the model already applies softcap={self.softcap}, got softcap={outer.softcap}."
        )

    def apply(self, z: Tensor) -> Tensor:
        """Out of place, differentiable: for materialised logits (``z``: ``[..., V]``)."""
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = (z / self.softcap).tanh() * self.softcap
        if self.temperature != 1.0:
            z = z / self.temperature
        return z

    def forward_(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """In place on a float32/64 chunk ``z [C, V]``; returns ``u`` and ``tanh`` (for the derivative) or None."""
        if self.logit_scale != 1.0:
            z.mul_(self.logit_scale)
        t = None
        if self.softcap is not None:
            t = z.div_(self.softcap).tanh_()
            z = t.mul(self.softcap)
        if self.temperature != 1.0:
            z.div_(self.temperature)
        return z, t

    def backward_(self, du: Tensor, t: Tensor | None) -> Tensor:
        """In place chain rule: ``dz = du / temperature * (1 - tanh^2) * logit_scale``."""
        if self.temperature != 1.0:
            du.div_(self.temperature)
        if t is not None:
            du.mul_(1.0 - t.square_())
        if self.logit_scale != 1.0:
            du.mul_(self.logit_scale)
        return du


class TransformOptions(TypedDict, total=False):
    """The fields of [`LogitTransform`][dft.LogitTransform] as flat keyword arguments
    (``linear_dft_loss(..., softcap=30.0)``)."""

    logit_scale: float
    softcap: float | None
    temperature: float


TRANSFORM_OPTION_NAMES: frozenset[str] = frozenset(TransformOptions.__annotations__)
