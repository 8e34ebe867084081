"""Per-batch diagnostics: cross-entropy, mean target probability, token accuracy, entropy.

DFT loss values are much smaller than cross-entropy (each token is scaled by its own ``p``), so a
DFT run must log the CE next to its loss to be readable. [`TokenStats`][dft.TokenStats] holds *sums* over the
supervised tokens so that micro-batches, accumulation steps and ranks add up exactly; the
properties turn them into means for logging.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["TokenStats", "token_stats_from_probs", "token_stats_from_rows"]

LOW_P_LOG = -4.605170185988091  # log(0.01): the threshold of TokenStats.low_p


@dataclass
class TokenStats:
    """Sums over supervised tokens (detached 0-dim float tensors) and their count.

    Attributes:
        ce_sum: sum of ``-log p_t``.
        p_sum: sum of ``p_t``.
        correct: number of tokens with ``argmax(logits_t) == y_t``.
        entropy_sum: sum of the predictive entropies ``H(softmax(logits_t))``.
        kl_sum: sum of ``KL(q_ref || p)`` to a reference model (ASFT); 0 without a reference.
        num_tokens: number of supervised tokens.
        low_p: number of supervised tokens with ``p_t < 0.01`` (those DFT barely trains; ``dft.prior``).
    """

    ce_sum: Tensor
    p_sum: Tensor
    correct: Tensor
    entropy_sum: Tensor
    kl_sum: Tensor
    num_tokens: Tensor
    low_p: Tensor

    def __add__(self, other: TokenStats) -> TokenStats:
        return TokenStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def _mean(self, total: Tensor) -> Tensor:
        return total / self.num_tokens.clamp_min(1)

    @property
    def ce(self) -> Tensor:
        """Mean token cross-entropy ``-log p``."""
        return self._mean(self.ce_sum)

    @property
    def mean_p(self) -> Tensor:
        """Mean target probability."""
        return self._mean(self.p_sum)

    @property
    def accuracy(self) -> Tensor:
        """Fraction of supervised tokens whose argmax is the label."""
        return self._mean(self.correct)

    @property
    def entropy(self) -> Tensor:
        """Mean predictive entropy (nats)."""
        return self._mean(self.entropy_sum)

    @property
    def frac_low_p(self) -> Tensor:
        """Share of supervised tokens with ``p < 0.01``."""
        return self._mean(self.low_p)

    @property
    def kl(self) -> Tensor:
        """Mean ``KL(q_ref || p)`` to the reference model (ASFT), nats."""
        return self._mean(self.kl_sum)

    def as_dict(self, prefix: str = "", kl: bool | None = None) -> dict[str, float]:
        """Means as Python floats, ready for a logger: ``ce``, ``mean_p``, ``token_accuracy``, ``entropy``,
        and ``kl`` when ``kl=True`` (None: when it is non-zero)."""
        out = {
            f"{prefix}ce": self.ce.item(),
            f"{prefix}mean_p": self.mean_p.item(),
            f"{prefix}token_accuracy": self.accuracy.item(),
            f"{prefix}entropy": self.entropy.item(),
        }
        if kl or (kl is None and bool(self.kl_sum != 0)):
            out[f"{prefix}kl"] = self.kl.item()
        return out

    def pack(self) -> Tensor:
        """All sums in one float32 vector ``[num_fields]`` (one collective instead of one per field)."""
        return torch.stack([getattr(self, f.name).float() for f in fields(self)])

    @classmethod
    def unpack(cls, packed: Tensor) -> TokenStats:
        """Inverse of [`pack`][dft.TokenStats.pack]."""
        return cls(*packed.unbind())

    @staticmethod
    def accumulate(total: TokenStats | None, new: TokenStats | None) -> TokenStats | None:
        """``total + new`` where either may be None (nothing accumulated yet)."""
        if total is None:
            return new
        return total if new is None else total + new

    def all_reduce(self) -> TokenStats:
        """Sum over the ranks of the default process group (a no-op when not distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        packed = self.pack()
        torch.distributed.all_reduce(packed)
        return TokenStats.unpack(packed)

    @staticmethod
    def zeros(device: torch.device | str | None = None) -> TokenStats:
        return TokenStats(*(torch.zeros((), device=device) for _ in fields(TokenStats)))


@torch.no_grad()
def token_stats_from_probs(
    probs: Tensor, target_logp: Tensor, labels: Tensor, valid: Tensor, kl: Tensor | None = None
) -> TokenStats:
    """Stats from a softmax that is already computed (no second pass over the logits).

    Args:
        probs: ``[N, V]`` ``softmax(logits)`` in float32/64 (argmax of probs == argmax of logits).
        target_logp: ``[N]`` ``log p`` of the labels.
        labels: ``[N]`` labels with ignored positions replaced by any valid index.
        valid: ``[N]`` bool mask of supervised tokens.
        kl: ``[N]`` per-token ``KL(q_ref || p)`` (ASFT), or None.
    """
    entropy = torch.special.entr(probs).sum(-1)
    return token_stats_from_rows(target_logp, probs.argmax(-1) == labels, entropy, kl, valid)


@torch.no_grad()
def token_stats_from_rows(
    target_logp: Tensor, correct: Tensor, entropy: Tensor, kl: Tensor | None = None, valid: Tensor | None = None
) -> TokenStats:
    """The sums of [`TokenStats`][dft.TokenStats] from per-token values (the one place they are summed).

    Args:
        target_logp: ``[N]`` ``log p`` of the labels; correct: ``[N]`` bool, argmax == label;
        entropy: ``[N]`` predictive entropies; kl: ``[N]`` ``KL(q_ref || p)`` (ASFT) or None;
        valid: ``[N]`` bool mask of supervised tokens (None: every token).
    """
    target_logp = target_logp.detach()
    if valid is None:
        valid = torch.ones_like(correct, dtype=torch.bool)
    zero = torch.zeros((), dtype=target_logp.dtype, device=target_logp.device)
    return TokenStats(
        ce_sum=torch.where(valid, -target_logp, zero).sum().float(),
        p_sum=torch.where(valid, target_logp.exp(), zero).sum().float(),
        correct=(correct & valid).sum().float(),
        entropy_sum=torch.where(valid, entropy, zero).sum().float(),
        kl_sum=zero.float() if kl is None else torch.where(valid, kl.detach(), zero).sum().float(),
        num_tokens=valid.sum().float(),
        low_p=(valid & (target_logp < LOW_P_LOG)).sum().float(),
    )
