"""Global supervised-token count across accumulation steps and ranks.

A token-mean loss that each rank (or micro-batch) normalises by its own token count is a mean of
means: its gradient differs from the gradient of the same global batch on one process. The exact
recipe is to divide every micro-batch's *sum* by the global count ``N`` of supervised tokens:

```python
num_items = dft.global_num_items([mb["labels"] for mb in micro_batches])   # one all_reduce
for mb in micro_batches:
    loss = dft.causal_lm_loss(model, mb, num_items_in_batch=num_items).loss
    accelerator.backward(loss)          # no division by the accumulation steps
```

DDP, FSDP and DeepSpeed *average* gradients over the ``R`` ranks, so by default the count returned
is ``N / R``: then ``sum_rank(grad_rank) / R`` is exactly ``grad(sum of all tokens) / N``.

Context parallelism (accelerate ``ParallelismConfig(cp_size=...)``, torch's ``context_parallel``)
needs its own order of sharding and counting: see [`global_num_items`][dft.distributed.global_num_items].

Which process this is (its rank, the job's size, whether it is the main one) is answered here once, for the
command line and [`dft.sampling`][dft.sampling]: ``rank_and_world_size``, ``is_main_process``,
``join_launcher_group``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from .labels import UNSHIFTED_UNDER_CP, Batch, causal_targets, count_targets, in_context_parallel, shift_causal_labels

__all__ = ["global_num_items", "is_main_process", "join_launcher_group", "rank_and_world_size"]


def global_num_items(
    batches: Batch | Tensor | Iterable[Batch | Tensor],
    *,
    ignore_index: int = -100,
    shift: bool = True,
    grads_averaged_over_ranks: bool = True,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """The ``num_items_in_batch`` that makes accumulated, multi-rank DFT gradients exact.

    Counts exactly the targets the loss averages over ([`dft.labels`][dft.labels]): pass the step's batches
    (mappings) and packed rows (``position_ids``) or pre-shifted ``shift_labels`` are counted right.
    Under context parallelism call it inside the CP context, on batches whose ``shift_labels`` were
    sharded (below).

    Context parallelism (accelerate ``ParallelismConfig(cp_size=...)`` + FSDP2, torch's
    ``context_parallel``): every CP rank of a data-parallel rank holds the same rows, and the context
    shards the listed buffers on the sequence -- load-balanced, so each rank holds a head and a tail
    chunk, not one contiguous part. Two things make a hand-written loop exact:

    * shard ``shift_labels`` (``dft.shift_causal_labels(labels)``, shifted *before* sharding), never the
      unshifted ``labels``: shifted inside a shard, the last position of a chunk would be paired with the
      first token of the other chunk the rank holds (another part of the sequence);
    * count *inside* the context, from the shards: outside it every CP rank counts whole sequences, a
      count ``cp_size`` times too large (``1 / cp_size`` of the gradients).

    ```python
    for mb in micro_batches:  # one sequence length, a multiple of 2 * cp_size
        mb["shift_labels"] = dft.shift_causal_labels(mb.pop("labels"))
        mb["position_ids"] = torch.arange(mb["input_ids"].shape[1]).expand_as(mb["input_ids"]).clone()
        mb.pop("attention_mask", None)  # CP attends causally (accelerate drops masks): pad on the right
    buffers = [t for mb in micro_batches for t in mb.values()]
    with accelerator.maybe_context_parallel(
        buffers=buffers, buffer_seq_dims=[1] * len(buffers), no_restore_buffers=set(buffers)
    ):
        num_items = dft.global_num_items(micro_batches)  # of the local shards
        for mb in micro_batches:
            accelerator.backward(dft.causal_lm_loss(model, mb, num_items_in_batch=num_items).loss)
    optimizer.step()
    ```

    ``DFTTrainer`` with ``DFTConfig(parallelism_config=ParallelismConfig(cp_size=...))`` does all of
    this itself (Trainer shifts, shards and counts before sharding, divided by ``cp_size``).

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
            single process and the local count is returned. Under context parallelism it must hold
            the CP ranks (the world does).

    Returns:
        0-dim float32 tensor on the data's device.

    Raises:
        ValueError: context parallelism is configured (accelerate ``cp_size > 1``) but this is called
            outside the CP context, where each CP rank still holds whole sequences; or, inside the
            context, ``batches`` has unshifted labels (a batch without ``shift_labels``, a bare tensor
            with ``shift=True``).
    """
    items = [batches] if isinstance(batches, (Tensor, Mapping)) else list(batches)
    if not items:
        raise ValueError("global_num_items needs at least one batch or labels tensor.")
    in_cp = in_context_parallel()
    cp_size = _accelerate_cp_size()
    if cp_size > 1 and not in_cp:
        raise ValueError(
            f"global_num_items: accelerate's ParallelismConfig has cp_size={cp_size}, but this is called outside "
            f"the context-parallel context, where every CP rank holds whole sequences: the count would be "
            f"{cp_size}x too large ({1 / cp_size:g}x gradients). Call it inside "
            "`with accelerator.maybe_context_parallel(buffers=[..., mb['shift_labels'], ...], ...)`, on the "
            "sharded batches (see help(dft.global_num_items))."
        )
    counts = []
    for item in items:
        if isinstance(item, Mapping):
            targets = causal_targets(item, ignore_index)
        elif isinstance(item, Tensor):
            if shift and in_cp:
                what = "global_num_items(labels tensor, shift=True) (for shift_labels tensors pass shift=False)"
                raise ValueError(UNSHIFTED_UNDER_CP.format(what=what))
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


def _accelerate_cp_size() -> int:
    """``cp_size`` of the ``ParallelismConfig`` in accelerate's (process-wide) state; 1 without one."""
    state = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state, "AcceleratorState", None), "_shared_state", None)
    config = shared.get("parallelism_config") if isinstance(shared, dict) else None
    if config is None or getattr(config, "cp_backend", "torch") != "torch":
        return 1
    try:
        return int(getattr(config, "cp_size", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def rank_and_world_size(*, launcher: bool = True) -> tuple[int, int]:
    """``(global rank, world size)`` of this process: torch.distributed's when a process group is initialised;
    otherwise, with ``launcher=True``, what torchrun / accelerate launch / mpirun set (``RANK``, ``WORLD_SIZE``),
    so that every process knows its place before any group exists; ``(0, 1)`` for a plain run (and, with
    ``launcher=False``, for any process without a group: nothing to gather from)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not launcher:
        return 0, 1
    return _env_int("RANK", 0), max(_env_int("WORLD_SIZE", 1), 1)


def is_main_process() -> bool:
    """The process that prints and writes (global rank 0; the only one of a plain run)."""
    return rank_and_world_size()[0] == 0


def join_launcher_group() -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``: joins the process group the launcher's environment describes when there
    is one and none is initialised yet (torchrun / accelerate launch set ``WORLD_SIZE``, ``LOCAL_RANK``): NCCL on
    GPUs, gloo on CPU. A plain run stays one process on ``cuda:0`` or the CPU."""
    world = max(_env_int("WORLD_SIZE", 1), 1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", _env_int("LOCAL_RANK", 0)) if cuda else torch.device("cpu")
    if world > 1 and dist.is_available() and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = rank_and_world_size(launcher=False)
    return rank, world, device
