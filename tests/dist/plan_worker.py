"""Run under torchrun (2 CPU ranks, gloo): the ranks of a vocabulary shard keep one chunk plan.

    PYTHONPATH=. python -m torch.distributed.run --nproc_per_node 2 tests/dist/plan_worker.py OUT_DIR

* ``fallback``: rank 0's compiled epilogue fails to compile (as inductor raising would), rank 1's compiles
  (an eager stand-in priced as the compiled one); with ``validate=False`` both run the plan made for the eager
  epilogue, the per-chunk collectives pair up, and the loss and gradients equal the float64 reference.
* ``mismatch``: different ``chunk_size`` on the two ranks: one ``ValueError`` on every rank naming both plans.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import dft
from dft import VocabShard, epilogue, fused
from tests.dist import exit_without_teardown
from tests.helpers.reference import ref_dft_loss

V, H, N = 1003, 16, 160


def stand_in(fails: bool) -> epilogue.Epilogue:
    from torch._dynamo.exc import BackendCompilerFailed

    def guarded(eager):
        def compiled(*args):
            if fails:
                raise BackendCompilerFailed("inductor", RuntimeError("made to fail"), None)
            return eager(*args)

        return epilogue._guarded(compiled, eager)

    return epilogue.Epilogue(
        guarded(epilogue.reduce), guarded(epilogue.ref_reduce), guarded(epilogue.grad_), 0, compiled=True
    )


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = init_device_mesh("cpu", (2,)).get_group()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.2] = -100
    half = (V + 1) // 2
    rows = slice(0, half) if rank == 0 else slice(half, V)
    shard = VocabShard(offset=rows.start, vocab_size=V, group=group)
    result: dict = {}

    seen = []
    real = fused._run_plan

    def record(plan, ep, chunk, *args):
        seen.append((ep.compiled, chunk))
        return real(plan, ep, chunk, *args)

    fused._run_plan = record
    fused.epilogue_for = lambda *a: stand_in(fails=rank == 0)
    fused.chunk_budget_bytes = lambda device: 2**18  # eager: 4 chunks, compiled: 1
    h = hidden.float().requires_grad_()
    w_local = weight[rows].float().requires_grad_()
    loss = dft.linear_dft_loss(h, w_local, labels, vocab_shard=shard, validate=False)
    loss.backward()
    result["fallback"] = {
        "plans": seen,
        "loss": loss.detach().double(),
        "dh": h.grad.double(),
        "dw_rows": w_local.grad.double(),
        "rows": (rows.start, rows.stop),
        "failed": epilogue._compile_failed,
    }
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = ref_dft_loss(F.linear(ref_h, ref_w), labels)
    ref.backward()
    result["reference"] = {"loss": ref.detach(), "dh": ref_h.grad, "dw": ref_w.grad}

    fused.epilogue_for = lambda *a: epilogue.EAGER
    try:
        dft.linear_dft_loss(h, w_local, labels, vocab_shard=shard, chunk_size=16 * (rank + 1))
        result["mismatch"] = None
    except ValueError as e:
        result["mismatch"] = str(e)
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()
    exit_without_teardown()


if __name__ == "__main__":
    main()
