"""Which tokens are supervised: the ONE definition used by every loss, counter and adapter.

A *target* tensor holds, at each position, the token id the prediction at that position must
produce, or ``ignore_index`` where nothing is supervised. For a causal LM the targets of a batch
are (transformers' semantics, [`causal_targets`][dft.causal_targets]):

* ``shift_labels`` when the batch carries them (context parallelism, some padding-free collators);
* otherwise ``labels`` shifted left by one with ``ignore_index`` appended, and, for padding-free
  packed rows (``position_ids`` restarting at 0 inside a row), no target that crosses from one
  packed sequence into the next.

The losses average over exactly the positions [`count_targets`][dft.labels.count_targets] counts, so
``dft.global_num_items`` (accumulation steps, ranks) and ``DFTTrainer``'s ``num_items_in_batch``
agree with the loss for padded, packed and pre-shifted batches alike.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Batch",
    "causal_targets",
    "check_labels",
    "count_targets",
    "sequence_ids",
    "shift_causal_labels",
    "shift_token_values",
    "supervised_index",
]

Batch = Mapping[str, Any]
"""A batch as collators make it: ``labels [B, T]`` (or ``shift_labels``), optional ``position_ids [B, T]``."""

UNSHIFTED_UNDER_CP = (
    "{what}: unshifted labels inside a context-parallel context. CP shards the sequence into load-balanced "
    "chunks (a head and a tail chunk per rank), so shifting a shard pairs positions with tokens from another "
    "part of the sequence. Shift before sharding: batch['shift_labels'] = dft.shift_causal_labels(labels), "
    "and shard 'shift_labels' instead of 'labels' (see help(dft.global_num_items))."
)


def check_labels(
    labels: object,
    expected_shape: torch.Size | tuple[int, ...],
    num_classes: int,
    ignore_index: int,
    *,
    check_range: bool = True,
    what: str = "logits",
) -> None:
    """Validate targets against the prediction's shape and vocabulary size.

    Raises:
        TypeError: labels are not an integer tensor.
        ValueError: shape mismatch, or a label outside ``[0, num_classes)`` other than ``ignore_index``
            (only checked when ``check_range``; that check syncs with the device).
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (torch.long), got dtype {labels.dtype}.")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the {what} shape without its last dimension "
            f"{tuple(expected_shape)}. For a causal LM with unshifted labels use dft.causal_dft_loss."
        )
    if check_range and labels.numel() > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(
                f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}; found {first} "
                f"(vocabulary size {num_classes}). Check the tokenizer/model vocabulary and the pad label"
                + (
                    "; a tensor-parallel rank's local head shard needs vocab_shard=dft.VocabShard(offset, vocab_size)."
                    if what == "hidden"
                    else "."
                )
            )


def shift_causal_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token targets: ``shift[..., t] = labels[..., t + 1]`` and ``ignore_index`` at the end.

    Same as transformers' ``ForCausalLMLoss``: pad with ``ignore_index`` then drop the first column,
    so logits need no slicing (no copy). ``labels``: ``[..., T]`` -> ``[..., T]``.
    """
    if not isinstance(labels, Tensor) or labels.dim() < 1:
        raise TypeError(f"labels must be a tensor of shape [..., T], got {type(labels).__name__}.")
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_targets(batch: Batch, ignore_index: int = -100) -> Tensor:
    """Next-token targets ``[B, T]`` of a causal-LM batch (see the module docstring).

    Args:
        batch: mapping with ``labels [B, T]`` (unshifted: ``labels[t]`` is token ``t``) or
            ``shift_labels [B, T]`` (already aligned with the predictions), and optionally
            ``position_ids [B, T]`` (padding-free packing: a row holds several sequences, each
            restarting at position 0), and ``loss_weights [B, T]`` (aligned like the labels: a token of
            weight 0 is not a target).
        ignore_index: label value that is not supervised.

    Returns:
        ``[B, T]`` targets aligned with the model's predictions; ``ignore_index`` where not supervised.

    Raises:
        ValueError: no ``labels``/``shift_labels``; or ``labels`` without ``shift_labels`` inside
            torch's context-parallel context (the shards are not contiguous: shift before sharding).
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping with 'labels' or 'shift_labels', got {type(batch).__name__}.")
    targets = _shifted_targets(batch, ignore_index)
    weights = batch.get("loss_weights")
    if isinstance(weights, Tensor) and weights.shape == targets.shape:  # a token of weight 0 is not a target
        targets = targets.masked_fill(shift_token_values(batch, weights).to(targets.device) == 0, ignore_index)
    return targets


def shift_token_values(batch: Batch, values: Tensor) -> Tensor:
    """Per-token values ``[B, T]`` aligned with the batch's ``labels`` -> aligned with its targets: shifted left by
    one like the labels (0 appended), or as they are next to ``shift_labels`` (already aligned)."""
    if batch.get("shift_labels") is not None:
        return values
    return torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)


def _shifted_targets(batch: Batch, ignore_index: int) -> Tensor:
    if batch.get("shift_labels") is not None:
        return batch["shift_labels"]
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("The batch has no 'labels' (or 'shift_labels'): nothing to supervise.")
    if in_context_parallel():
        raise ValueError(UNSHIFTED_UNDER_CP.format(what="batch['labels']"))
    shifted = shift_causal_labels(labels, ignore_index)
    position_ids = batch.get("position_ids")
    if isinstance(position_ids, Tensor) and position_ids.shape == labels.shape and labels.shape[-1] > 1:
        starts_next = torch.zeros_like(shifted, dtype=torch.bool)
        starts_next[..., :-1] = position_ids[..., 1:] == 0
        shifted = shifted.masked_fill(starts_next, ignore_index)
    return shifted


def sequence_ids(batch: Batch) -> Tensor | None:
    """``[B, T]`` the id of the sequence each position belongs to, unique over the batch, for padding-free
    packed rows (``position_ids`` restarting at 0 inside a row); None without ``position_ids``."""
    position_ids = batch.get("position_ids") if isinstance(batch, Mapping) else None
    if not isinstance(position_ids, Tensor) or position_ids.dim() < 1:
        return None
    starts = position_ids == 0
    starts[..., 0] = True
    return (starts.reshape(-1).cumsum(0) - 1).reshape(position_ids.shape)


def count_targets(targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Number of supervised positions (0-dim int64 tensor on the targets' device)."""
    return (targets != ignore_index).sum()


def supervised_index(
    labels: Tensor, ignore_index: int, num_classes: int, *, check_range: bool = True, what: str = "logits"
) -> Tensor | None:
    """Flat indices ``[n]`` of the supervised labels, or None when every label is supervised.

    One host sync (``nonzero``) covers both the index and, with ``check_range``, the range check of
    [`check_labels`][dft.labels.check_labels]: a bad label appends ``N + 1`` extra hits, so the count alone tells.

    Raises:
        ValueError: a label outside ``[0, num_classes)`` other than ``ignore_index`` (``check_range``).
    """
    flat = labels.reshape(-1)
    n = flat.numel()
    valid = flat != ignore_index
    mask = valid
    if check_range and n > 0:
        bad = valid & ((flat < 0) | (flat >= num_classes))
        mask = torch.cat([valid, bad.any().expand(n + 1)])
    index = mask.nonzero().squeeze(1)
    if index.numel() > n:
        check_labels(labels, labels.shape, num_classes, ignore_index, what=what)  # raises with the first bad label
    return None if index.numel() == n else index


def in_context_parallel() -> bool:
    """Whether torch's context parallelism is on: inside ``context_parallel`` (accelerate's
    ``maybe_context_parallel``, Trainer's CP step), or with its dispatcher enabled for sharded buffers.

    Read from torch's state (private, torch 2.13): its SDPA handlers are in DTensor's dispatch table
    exactly while CP is on. A torch without that state reads as False (no error is ever raised then).
    """
    cp = sys.modules.get("torch.distributed.tensor.experimental._context_parallel._attention")
    if cp is None:  # never imported: CP never ran
        return False
    try:
        from torch.distributed.tensor import DTensor

        handlers = DTensor._op_dispatcher._custom_op_handlers
        return any(op in handlers for op in cp.custom_ops)
    except (AttributeError, TypeError):
        return False
