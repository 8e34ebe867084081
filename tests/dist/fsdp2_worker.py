"""Run under torchrun (2 CPU ranks, gloo): one FSDP2 step of dft.causal_lm_loss, saved for the test to compare.

    PYTHONPATH=. python -m torch.distributed.run --nproc_per_node 2 tests/dist/fsdp2_worker.py OUT_DIR CASE

CASE: ``{tied|untied}-{reshard|keep}[-bf16]``: tied or untied head, ``reshard_after_forward`` True or
False, and optionally ``MixedPrecisionPolicy(param_dtype=bfloat16)`` or ``-none``: ``reduction="none"``. Each decoder layer and the root
are sharded, as accelerate's FSDP2 plugin does.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import dft
from dft.toy import toy_model
from tests.dist import exit_without_teardown
from tests.dist.global_batch import global_examples, micro_batches


def main() -> None:
    out_dir, case = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tied, reshard, bf16 = case.startswith("tied"), "-reshard" in case, case.endswith("-bf16")
    model = toy_model(hidden_size=32, seed=0)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    mesh = init_device_mesh("cpu", (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16 else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    micro = micro_batches(global_examples(), rank, world, packed=False)
    num_items = dft.global_num_items(micro)
    for mb in micro:
        if case.endswith("-none"):  # per-token losses: the backward recomputes after FSDP2 resharded the head
            (dft.causal_lm_loss(model, mb, reduction="none").loss.sum() / num_items).backward()
        else:
            dft.causal_lm_loss(model, mb, num_items_in_batch=num_items).loss.backward()
    grads = {n: p.grad.full_tensor().detach().float().clone() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"grads": grads}, out_dir / "fsdp2.pt")
    dist.barrier()
    exit_without_teardown()


if __name__ == "__main__":
    main()
