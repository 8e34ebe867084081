"""Run under torchrun (2 CPU ranks, gloo): one accumulated DDP step with dft, saved for the test to compare.

    PYTHONPATH=. python -m torch.distributed.run --nproc_per_node 2 tests/dist/worker.py OUT_DIR MODE

MODE: ``exact`` (padded rows), ``naive`` (mean of means), ``packed`` (padding-free rows with
position_ids), ``packed_naive`` (packed rows counted by shifting labels only, the old bug), ``asft``
(kl_coef=0.5 to a frozen reference), ``nft`` (NFT with pi_old the frozen reference, per-token data weights).
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

import dft
from dft.toy import toy_model

from tests.dist import exit_without_teardown
from tests.dist.global_batch import ACCUM, LR, global_examples, micro_batches, with_nft_keys


def main() -> None:
    out_dir, mode = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "exact")
    accelerator = Accelerator(cpu=True)
    model = toy_model(hidden_size=32, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    ref = toy_model(hidden_size=32, seed=1).eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    micro = micro_batches(global_examples(), rank, world, packed=mode.startswith("packed"))
    if mode == "nft":
        micro = [with_nft_keys(mb) for mb in micro]
    if mode == "packed_naive":  # counts targets that cross a packed boundary
        num_items = dft.global_num_items([mb["labels"] for mb in micro])
    else:
        num_items = dft.global_num_items(micro)
    for i, mb in enumerate(micro):
        ctx = accelerator.no_sync(model) if i < ACCUM - 1 else torch.enable_grad()
        with ctx:
            if mode == "naive":  # per-micro-batch mean, divided by the steps: the mean-of-means bug
                loss = dft.causal_lm_loss(model, mb).loss / ACCUM
            elif mode == "nft":  # pi_old: the frozen reference; weight-0 tokens uncounted by global_num_items
                loss = dft.causal_lm_loss(
                    model, mb, num_items_in_batch=num_items, ref_model=ref, nft=dft.NFTWeight()
                ).loss
            elif mode == "asft":  # KL anchor to a frozen reference (each rank holds its own copy)
                loss = dft.causal_lm_loss(model, mb, num_items_in_batch=num_items, ref_model=ref, kl_coef=0.5).loss
            else:
                loss = dft.causal_lm_loss(model, mb, num_items_in_batch=num_items).loss
            accelerator.backward(loss)
    grads = {n: p.grad.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    optimizer.step()
    tokens = sum(int((dft.causal_targets(mb) != -100).sum()) for mb in micro)
    counts = [torch.zeros(1) for _ in range(world)]
    torch.distributed.all_gather(counts, torch.tensor([float(tokens)]))
    if rank == 0:
        params = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
        torch.save({"grads": grads, "params": params, "tokens_per_rank": [int(c) for c in counts]}, out_dir / "dist.pt")
    accelerator.wait_for_everyone()
    exit_without_teardown()


if __name__ == "__main__":
    main()
