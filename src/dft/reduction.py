"""Reductions of per-token losses, shared by every loss path (one place, one contract).

A scalar reduction is written as per-token coefficients ``c``: ``loss = sum_t c_t * loss_t``.
The materialised path multiplies and sums; the fused head uses the same ``c`` to form its
gradients during the forward pass. Contract (transformers' ``fixed_cross_entropy``):

* ``"mean"``: ``c_t = 1 / n`` with ``n = num_items_in_batch`` when given (any positive value: a global
  count divided by the ranks may be below 1), else the number of supervised tokens (at least 1, so an
  all-masked batch gives 0, never NaN).
* ``"sum"``: ``c_t = 1``.
* ``"sequence"``: mean within each sequence (last label dimension, or ``sequence_ids`` for packed rows),
  then mean over sequences with at least one supervised token; ``num_items_in_batch`` then replaces that
  number of sequences.
* ``"none"``: no reduction; the per-token losses come back in the labels' shape, 0 where ignored.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["REDUCTIONS", "Reduction", "check_reduction", "reduction_coefficients"]

Reduction = Literal["mean", "sum", "none", "sequence"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none", "sequence")


def check_reduction(reduction: str, labels_shape: torch.Size, num_items_in_batch: int | Tensor | None) -> None:
    """Raise a clear error for an unknown reduction or a bad ``num_items_in_batch``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if reduction == "sequence" and len(labels_shape) < 2:
        raise ValueError(f"reduction='sequence' needs labels of shape [batch, seq_len], got {tuple(labels_shape)}.")
    if num_items_in_batch is None:
        return
    if reduction not in ("mean", "sequence"):
        raise ValueError(
            f"num_items_in_batch only applies to reduction='mean' or 'sequence', got reduction={reduction!r}."
        )
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a scalar, got a tensor of shape {tuple(num_items_in_batch.shape)}."
            )
    elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise TypeError(f"num_items_in_batch must be an int or a tensor, got {type(num_items_in_batch).__name__}.")
    elif num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}.")


def weighted_labels(labels: Tensor, token_weights: object, ignore_index: int, validate: bool = True) -> Tensor:
    """Check per-token data weights and return ``labels`` with ``ignore_index`` where the weight is 0.

    ``token_weights``: ``[...]`` floats of the labels' shape, finite and ``>= 0`` (checked when ``validate``: one
    host sync). A token of weight 0 is not supervised and not counted; ``w > 0`` multiplies its loss.
    """
    if not isinstance(token_weights, Tensor) or not token_weights.is_floating_point():
        got = f"{token_weights.dtype} tensor" if isinstance(token_weights, Tensor) else type(token_weights).__name__
        raise TypeError(f"token_weights must be a float tensor of the labels' shape, got {got}.")
    if token_weights.shape != labels.shape:
        raise ValueError(
            f"token_weights must have the labels' shape {tuple(labels.shape)}, got {tuple(token_weights.shape)}."
        )
    if validate and bool(((token_weights < 0) | ~token_weights.isfinite()).any()):
        raise ValueError("token_weights must be finite and >= 0 (0: not supervised, w > 0: multiplies the loss).")
    return labels.masked_fill(token_weights.to(labels.device) == 0, ignore_index)


def _denominator(count: Tensor, num_items_in_batch: int | Tensor | None, dtype: torch.dtype) -> Tensor | float:
    if num_items_in_batch is None:
        n = count.to(dtype)
    elif isinstance(num_items_in_batch, Tensor):
        n = num_items_in_batch.detach().to(device=count.device, dtype=dtype).reshape(())
        return torch.where(n > 0, n, torch.ones_like(n))  # a fractional count (N / ranks < 1) is kept as is
    else:  # a Python number: divide by it as a scalar (no host-to-device copy, no stream sync)
        n = float(num_items_in_batch)
        return n if n > 0 else 1.0
    return n.clamp_min(1.0)  # a local count: 0 only when nothing is supervised (the loss is 0 then)


def reduction_coefficients(
    valid: Tensor,
    reduction: str,
    num_items_in_batch: int | Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    sequence_ids: Tensor | None = None,
    token_weights: Tensor | None = None,
) -> Tensor:
    """Per-token coefficients of a scalar reduction.

    Args:
        valid: ``[..., T]`` bool, True where the label is supervised.
        reduction: ``"mean"``, ``"sum"`` or ``"sequence"``.
        num_items_in_batch: replaces the mean's denominator (tokens for ``"mean"``, sequences for
            ``"sequence"``), e.g. the global count over accumulation steps and ranks.
        dtype: dtype of the coefficients (float32 or float64).
        sequence_ids: ``[..., T]`` for ``"sequence"`` on padding-free packed rows: the id of the sequence
            each position belongs to (unique over the batch, e.g. [`dft.labels.sequence_ids`][dft.labels.sequence_ids]);
            None: each row (last dimension) is one sequence.
        token_weights: ``[..., T]`` per-token data weights multiplying the coefficients (the counts are of the
            valid tokens, whatever their weight; see [`weighted_labels`][dft.reduction.weighted_labels]).

    Returns:
        ``[..., T]`` coefficients ``c`` with ``loss = (c * token_loss).sum()``; 0 where not valid.
    """
    coef = _coefficients(valid, reduction, num_items_in_batch, dtype, sequence_ids)
    return coef if token_weights is None else coef * torch.where(valid, token_weights.to(dtype), 0.0)


def _coefficients(
    valid: Tensor,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    dtype: torch.dtype,
    sequence_ids: Tensor | None,
) -> Tensor:
    mask = valid.to(dtype)
    if reduction == "sum":
        return mask
    if reduction == "mean":
        return mask / _denominator(valid.sum(), num_items_in_batch, dtype)
    if reduction == "sequence":
        if sequence_ids is None:
            per_seq = valid.sum(-1, keepdim=True)
            n_seq = _denominator((per_seq > 0).sum(), num_items_in_batch, dtype)
            return mask / per_seq.clamp_min(1).to(dtype) / n_seq
        ids = sequence_ids.reshape(-1).long()
        counts = torch.zeros(ids.numel(), dtype=dtype, device=ids.device).index_add_(0, ids, mask.reshape(-1))
        n_seq = _denominator((counts > 0).sum(), num_items_in_batch, dtype)
        return mask / counts[ids].reshape(mask.shape).clamp_min(1) / n_seq
    raise ValueError(f"reduction {reduction!r} has no coefficients; use 'mean', 'sum' or 'sequence'.")
