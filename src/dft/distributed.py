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

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from .labels import Batch, causal_targets, count_targets, shift_causal_labels

__all__ = ["global_num_items"]


def global_num_items(
    batches: Batch | Tensor | Iterable[Batch | Tensor],
    *,
    ignore_index: int = -100,
    shift: bool = True,
    grads_averaged_over_ranks: bool = True,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """The ``num_items_in_batch`` that makes accumulated, multi-rank DFT gradients exact.

    Counts exactly the targets the loss averages over (:mod:`dft.labels`): pass the step's batches
    (mappings) and packed rows (``position_ids``) or pre-shifted ``shift_labels`` are counted right.

    Args:
        batches: this rank's data for the whole optimizer step: one batch or one per micro-batch
            (accumulation step). A batch is a mapping with ``labels`` (or ``shift_labels``) and
            optionally ``position_ids``, or a bare labels tensor ``[B, T]``.
        ignore_index: label value that is not supervised.
        shift: for bare label tensors only: they are unshifted causal-LM labels (count
            ``labels[..., 1:]``), as transformers does. False: already aligned targets.
        grads_averaged_over_ranks: the engine averages gradients over ranks (DDP, FSDP, DeepSpeed):
            return ``N / world_size`` so that the average equals the single-process gradient.
            False returns ``N``.
        group: process group (default: the world). Without an initialised process group this is a
            single process and the local count is returned.

    Returns:
        0-dim float32 tensor on the data's device.
    """
    items = [batches] if isinstance(batches, (Tensor, Mapping)) else list(batches)
    if not items:
        raise ValueError("global_num_items needs at least one batch or labels tensor.")
    counts = []
    for item in items:
        if isinstance(item, Mapping):
            targets = causal_targets(item, ignore_index)
        elif isinstance(item, Tensor):
            targets = shift_causal_labels(item, ignore_index) if shift else item
        else:
            raise TypeError(f"global_num_items takes batches (mappings) or labels tensors, got {type(item).__name__}.")
        counts.append(count_targets(targets, ignore_index).to(torch.float64))
    count = torch.stack([c.to(counts[0].device) for c in counts]).sum()
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
        world = dist.get_world_size(group)
    if grads_averaged_over_ranks:
        count = count / world
    return count.float()
