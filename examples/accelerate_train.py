"""DFT with an `accelerate.Accelerator` loop: exact token normalisation across ranks and accumulation.

    torchrun --nproc_per_node 2 examples/accelerate_train.py          # 2 CPU processes (gloo)
    accelerate launch examples/accelerate_train.py                    # GPUs: DDP
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/accelerate_train.py
    (also ddp.yaml, deepspeed_zero2.yaml, deepspeed_zero3.yaml; an optional argument sets the steps)

Each rank sees its own shard of the global batch. `dft.global_num_items` all-reduces the number of
supervised tokens of the whole optimizer step and divides it by the world size, because DDP/FSDP
*average* gradients over ranks: the update then equals the single-process update of the whole
global batch, however unevenly the supervised tokens fall on the ranks.
"""

import sys

import torch
from accelerate import Accelerator

import dft
from dft.engines import detect_engine
from dft.toy import arithmetic_examples, toy_batch, toy_model

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
micro_batch, accum, lr, seed = 8, 2, 3e-3, 0

accelerator = Accelerator(gradient_accumulation_steps=accum)
if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed wants the micro-batch size (no DataLoader here)
    accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
    accelerator.state.deepspeed_plugin.deepspeed_config.pop("train_batch_size", None)  # DeepSpeed derives it
model = toy_model(seed=seed)
optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
model, optimizer = accelerator.prepare(model, optimizer)
accum = accelerator.gradient_accumulation_steps  # a DeepSpeed config's own value wins
accelerator.print(f"engine: {detect_engine(model).name}")

rank, world = accelerator.process_index, accelerator.num_processes
data = arithmetic_examples(steps * micro_batch * accum * world, seed=seed)

for step in range(steps):
    per_step = micro_batch * accum * world
    mine = data[step * per_step : (step + 1) * per_step][rank::world]  # this rank's shard
    micro_batches = [{k: v.to(accelerator.device) for k, v in toy_batch(mine[i::accum]).items()} for i in range(accum)]
    num_items = dft.global_num_items(micro_batches)  # all-reduce, / world
    weighting = dft.DFTWeight(beta=dft.beta_schedule(step, 1.0, 10))  # CE -> DFT warm-up over 10 steps
    stats = None
    for mb in micro_batches:
        with accelerator.accumulate(model):  # gradients are synced (DeepSpeed steps) on the last micro-batch only
            out = dft.causal_lm_loss(model, mb, weighting, num_items_in_batch=num_items)
            # accelerate and DeepSpeed divide each loss by the accumulation steps (as for a per-micro-batch
            # mean); ours is already a share of the global token count, so that division is undone here
            accelerator.backward(out.loss * accum)
            optimizer.step()  # skipped until the last micro-batch (a no-op under DeepSpeed, which stepped)
            optimizer.zero_grad(set_to_none=True)
        stats = dft.TokenStats.accumulate(stats, out.stats)
    if step % 10 == 0 or step == steps - 1:
        stats = stats.all_reduce()
        accelerator.print(f"step {step:3d} | ranks {world} | ce {stats.ce:.3f} | mean p {stats.mean_p:.3f}")
