"""Ulysses sequence parallelism (DeepSpeed ALST) through ``DFTTrainer``, and its single-process reference.

CASE: ``sp2-zero2``, ``sp2-zero3``: ``DFTConfig(deepspeed={... "stage": 2|3},
parallelism_config=ParallelismConfig(sp_size=2, sp_backend="deepspeed", sp_handler=...))`` on 2 ranks,
so one data-parallel rank: each optimizer step is 2 accumulation steps, each of them one rank's 4-row
batch, which Trainer's ``UlyssesSPDataLoaderAdapter`` deals out to both ranks as sequence halves
(``shift_labels``, no ``labels``). ``sp2-zero3-allreduce``: ZeRO-3 with ``reduce_scatter: false``, whose
contiguous all-reduce sums the SP ranks' gradients where the default reduce-scatter averages them.
``sp2-zero2-logits``: ZeRO-2 with ``fused_lm_head=False`` (full logits of each half sequence). 8 rows per step, 2 steps, SGD, no clipping; the rows are those of
tests/dist/engine_cases.py (long and short sums, mixed), with ``position_ids`` (the adapter needs them)
and no ``attention_mask`` (Ulysses does not shard a mask; the rows are right-padded, so causal attention
is the same).
"""

from __future__ import annotations

import torch
from datasets import Dataset

import dft
from tests.dist.engine_cases import LR, ROWS_PER_STEP, STEPS, build_model, ds_config
from tests.dist.engine_cases import rows as engine_rows

__all__ = ["CASES", "LR", "ROWS_PER_STEP", "SP", "STEPS", "build_model", "dataset", "rows", "single_process"]

CASES = ("sp2-zero2", "sp2-zero3", "sp2-zero3-allreduce", "sp2-zero2-logits")
SP = 2
PER_DEVICE, ACCUM = 4, 2  # one data-parallel rank: ACCUM batches of PER_DEVICE rows per optimizer step


def rows() -> dict[str, torch.Tensor]:
    data = engine_rows("zero2")
    data.pop("attention_mask")
    width = data["input_ids"].shape[1]
    assert width % SP == 0, "the adapter needs a sequence length divisible by sp_size"
    data["position_ids"] = torch.arange(width).expand_as(data["input_ids"]).clone()
    return data


def dataset(eval: bool = False) -> Dataset:
    """The training rows; ``eval``: the first step's rows, evaluated after training (not sequence-sharded:
    Trainer adapts the train loader only, and DeepSpeed's SP attention is off in eval)."""
    data = rows()
    if eval:
        data = {k: v[:ROWS_PER_STEP] for k, v in data.items()}
    return Dataset.from_dict({k: v.tolist() for k, v in data.items()})


def trainer_kwargs(case: str) -> dict:
    from accelerate import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation="sdpa")
    deepspeed = ds_config(3 if "zero3" in case else 2)
    if case.endswith("-allreduce"):
        deepspeed["zero_optimization"]["reduce_scatter"] = False
    return {
        "fused_lm_head": not case.endswith("-logits"),  # -logits: the logits path (the issue found it 4x too)
        "deepspeed": deepspeed,
        "parallelism_config": ParallelismConfig(sp_size=SP, sp_backend="deepspeed", sp_handler=handler),
        "per_device_train_batch_size": PER_DEVICE,
        "per_device_eval_batch_size": PER_DEVICE,  # one eval step: rank r evaluates rows 4r..4r+3
        "gradient_accumulation_steps": ACCUM,
    }


def single_process() -> dict:
    """One process, each step's 8 rows as one batch, the same SGD steps (as engine_cases.single_process);
    with each step's loss and statistics before its update (what the trainer logs), and the loss and
    statistics of the eval rows after training."""
    model = build_model("zero2")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    data = rows()
    logs = []
    for step in range(STEPS):
        batch = {k: v[step * ROWS_PER_STEP : (step + 1) * ROWS_PER_STEP] for k, v in data.items()}
        optimizer.zero_grad()
        out = dft.causal_lm_loss(model, batch)
        out.loss.backward()
        optimizer.step()
        logs.append({"loss": out.loss.item(), **out.stats.as_dict("")})
        if step == 0:  # the base model's figures, logged once
            logs[0].update(
                {"prior/mean_p": out.stats.mean_p.item(), "prior/frac_below_0.01": out.stats.frac_low_p.item()}
            )
    with torch.no_grad():
        out = dft.causal_lm_loss(model, {k: v[:ROWS_PER_STEP] for k, v in data.items()})
    evaluation = {"eval_loss": out.loss.item(), **out.stats.as_dict("eval_")}
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "logs": logs, "eval": evaluation}
