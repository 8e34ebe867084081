"""Test-only: run torch's context parallelism (through accelerate and Trainer) on CPU ranks (gloo).

:func:`install` applies two patches, each named by what it bypasses:

* ``tests.dist.cpu_fsdp_shim``: accelerate turns FSDP on only for GPU-like distributed types; on a
  ``MULTI_CPU`` run it would prepare the model with DDP, and CP needs FSDP2. With it the state is
  FSDP before ``ParallelismConfig._validate_accelerator`` runs, so that check's refusal of
  ``MULTI_CPU`` ("ParallelismConfig is only compatible DistributedType.FSDP (version 2) ...") is never
  reached and needs no patch of its own: its real checks (the sizes multiply to the world size, FSDP
  has a dimension to shard across) run unchanged.
* :func:`ring_attention_for_cpu_sdpa`: torch 2.13's CP routes only the CUDA SDPA kernels to its ring
  attention; this adds the CPU kernel.

Everything else -- accelerate's ``ParallelismConfig`` mesh, its FSDP2 preparation over the
``dp_shard_cp`` mesh, its attention-mask hooks and ``maybe_context_parallel``, Trainer's
``shift_labels`` and buffer sharding, torch's load-balanced sharding, its DTensor dispatch and its ring
attention (``_templated_ring_attention`` and its backward, load balancing, merge) -- is the libraries'
own code path. :func:`fp64_ring_merge` is not a bypass: it flips torch's own switch of the ring
merge's precision.
"""

from __future__ import annotations

from collections import Counter

import torch

from tests.dist.cpu_fsdp_shim import install as install_cpu_fsdp

aten = torch.ops.aten
SEQ_DIM = 2  # [batch, heads, sequence, head_dim]: the dimension torch's CP shards
RING_CALLS: Counter = Counter()  # ring attention calls of this process, "forward" and "backward"


def _shard_seq_strategy(n_outputs: int, n_inputs: int):
    """A DTensor sharding strategy: every tensor input and output sharded on the sequence dimension."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy

    def strategy(op_schema):
        mesh = op_schema.get_mesh_from_args(validate=False)
        placements = [Shard(SEQ_DIM)] * (n_outputs + n_inputs)
        return expand_to_full_mesh_op_strategy(mesh, op_schema, [placements], input_index=n_outputs)

    return strategy


def _cpu_sdpa_handler(op_call, args, kwargs):
    """torch's ``_sdpa_handler`` (DTensor -> local shards -> ring attention -> DTensor) for the CPU kernel."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    op_info = DTensor._op_dispatcher.unwrap_to_op_info(op_call, args, kwargs)
    DTensor._op_dispatcher.sharding_propagator.propagate(op_info)
    output_sharding = op_info.output_sharding
    assert output_sharding is not None and not output_sharding.needs_redistribute
    # the op's arguments by name: (query, key, value, dropout_p, is_causal, *, attn_mask, scale) forward,
    # (grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask, scale) backward
    names = [a.name for a in op_call._schema.arguments]
    bound = {**dict(zip(names, op_info.local_args)), **op_info.local_kwargs}
    if bound.get("attn_mask") is not None:  # accelerate's CP hooks drop the mask for is_causal=True
        raise NotImplementedError("ring attention takes no attn_mask")
    group = op_info.compute_mesh.get_group()
    if op_call == aten._scaled_dot_product_flash_attention_for_cpu.default:
        op = aten._scaled_dot_product_flash_attention_for_cpu
        results = cp._templated_ring_attention(group, SEQ_DIM, op, **bound)
        RING_CALLS["forward"] += 1
    else:
        op = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
        results = cp._templated_ring_attention_backward(group, SEQ_DIM, op, grad_out_name="grad_out", **bound)
        RING_CALLS["backward"] += 1
    return DTensor._op_dispatcher.wrap(tuple(results), output_sharding.output_spec)


def ring_attention_for_cpu_sdpa() -> None:
    """Bypasses torch 2.13 CP's CUDA-only attention table: the CPU SDPA kernel gets torch's own ring attention.

    Inside ``context_parallel`` torch turns the query, key and value into DTensors sharded on the
    sequence and routes the flash, efficient and cuDNN SDPA ops (CUDA kernels) to its ring attention;
    on CPU SDPA dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward),
    which has no sharding strategy (``NotImplementedError``) and no CP handler. This registers, for
    those two CPU ops, a ``Shard(2)``-everywhere sharding strategy and a handler that runs torch's
    ``_templated_ring_attention`` / ``_templated_ring_attention_backward`` on the local shards -- the
    same functions, load balancing and merge the CUDA ops use; only the per-block kernel is the CPU one.
    The handler joins torch's CP handler table, so it is active only inside the CP context.
    """
    from torch.distributed.tensor._ops.utils import register_op_strategy
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    forward = aten._scaled_dot_product_flash_attention_for_cpu.default
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    if forward in cp.custom_ops:
        return
    # (out, lse) <- (q, k, v); (dq, dk, dv) <- (d_out, q, k, v, out, lse)
    register_op_strategy(forward)(_shard_seq_strategy(n_outputs=2, n_inputs=3))
    register_op_strategy(backward)(_shard_seq_strategy(n_outputs=3, n_inputs=6))
    cp.custom_ops[forward] = _cpu_sdpa_handler  # the table torch's context_parallel enables and disables
    cp.custom_ops[backward] = _cpu_sdpa_handler


def fp64_ring_merge() -> None:
    """torch's own switch: merge the ring's partial attention outputs in the query's dtype (float64 here).

    ``_cp_options.convert_to_f32`` (default True) casts every block's output and log-sum-exp, and the
    backward's accumulators, to float32: a float64 run then differs from full attention by ~1e-7,
    torch's floor, not the loss's. False keeps float64 end to end.
    """
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    cp._cp_options.convert_to_f32 = False


def install() -> None:
    install_cpu_fsdp()
    ring_attention_for_cpu_sdpa()
