"""Global supervised-token count across accumulation steps and ranks.

A token-mean loss that each rank (or micro-batch) normalises by its own token count is a mean of
means: its gradient differs from the gradient of the same global batch on one process. The exact
recipe is to divide every micro-batch's *sum* by the global count ``N`` of supervised tokens::

    num_items = dft.global_num_items([mb["labels"] for mb in micro_batches])   # one all_reduce
    for mb in micro_batches:
        loss = dft.causal_lm_loss(model, mb, num_items_in_batch=num_items).loss
        accelerator.backward(loss)          # no division by the accumulation steps

DDP, FSDP and DeepSpeed *average* gradients over the ``R`` ranks, so by default the count returned
is ``N / R``: then ``sum_rank(grad_rank) / R`` is exactly ``grad(sum of all tokens) / N``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from .losses import shift_causal_labels

__all__ = ["global_num_items"]


def global_num_items(
    labels: Tensor | Iterable[Tensor],
    *,
    ignore_index: int = -100,
    shift: bool = True,
    grads_averaged_over_ranks: bool = True,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """The ``num_items_in_batch`` that makes accumulated, multi-rank DFT gradients exact.

    Args:
        labels: this rank's labels ``[B, T]`` for the whole optimizer step: one tensor, or one per
            micro-batch (accumulation step).
        ignore_index: label value that is not supervised.
        shift: the labels are unshifted causal-LM labels (count ``labels[..., 1:]``), as transformers does.
            Pass False for labels that are already aligned (``shift_labels``).
        grads_averaged_over_ranks: the engine averages gradients over ranks (DDP, FSDP, DeepSpeed):
            return ``N / world_size`` so that the average equals the single-process gradient.
            False returns ``N``.
        group: process group (default: the world). Without an initialised process group this is a
            single process and the local count is returned.

    Returns:
        0-dim float32 tensor on the labels' device.
    """
    tensors = [labels] if isinstance(labels, Tensor) else list(labels)
    if not tensors:
        raise ValueError("global_num_items needs at least one labels tensor.")
    count = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"labels must be tensors, got {type(t).__name__}.")
        target = shift_causal_labels(t, ignore_index) if shift else t
        count = count + (target != ignore_index).sum()
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
        world = dist.get_world_size(group)
    if grads_averaged_over_ranks:
        count = count / world
    return count.float()
