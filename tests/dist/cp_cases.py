"""Context parallelism as users launch it, and its single-process reference (float64).

Every case is 2 optimizer steps of 8 rows each (SGD, no clipping) on ``dft.toy.toy_model(hidden_size=32)``
in float64 with SDPA attention; the rows are right-padded to a multiple of ``2 * cp`` so that torch
load-balances the sequence (each CP rank holds a head and a tail chunk). CASE:

* ``trainer-cp2``: ``DFTTrainer`` + ``DFTConfig(fsdp=..., fsdp_config={"version": 2, ...},
  parallelism_config=ParallelismConfig(cp_size=2))`` on 2 ranks (each step: 4 rows x 2 accumulation steps).
* ``trainer-cp2-dp2``: the same with ``ParallelismConfig(cp_size=2, dp_shard_size=2)`` on 4 ranks
  (2 rows x 2 accumulation steps x 2 data-parallel ranks).
* ``loop-cp2``: a hand-written accelerate loop with ``maybe_context_parallel`` and the recipe of
  :func:`dft.global_num_items` (shard ``shift_labels``, count inside the CP context) on 2 ranks.
"""

from __future__ import annotations

import torch

import dft
from dft.toy import arithmetic_examples, toy_batch, toy_model

CASES = {"trainer-cp2": (2, 1), "trainer-cp2-dp2": (2, 2), "loop-cp2": (2, 1)}  # case -> (cp_size, dp_shard_size)
ROWS_PER_STEP, STEPS, LR = 8, 2, 0.5
ACCUMULATION = 2


def build_model(seed: int = 0) -> torch.nn.Module:
    model = toy_model(hidden_size=32, seed=seed).double()
    model.config._attn_implementation = "sdpa"  # torch's CP is SDPA ring attention
    return model


def rows(cp_size: int = 2) -> dict[str, torch.Tensor]:
    """All rows, long sums and short ones mixed (uneven supervision), padded to a multiple of ``2 * cp_size``."""
    examples = [
        e
        for s in range(STEPS)
        for pair in zip(
            arithmetic_examples(4, seed=20 + s, terms=(3, 5), digits=3),
            arithmetic_examples(4, seed=30 + s, terms=(2, 2), digits=1),
        )
        for e in pair
    ]
    batch = toy_batch(examples)
    multiple = 2 * cp_size
    pad = -batch["input_ids"].shape[1] % multiple
    values = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: torch.nn.functional.pad(v, (0, pad), value=values[k]) for k, v in batch.items()}


def step_rows(data: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    return {k: v[step * ROWS_PER_STEP : (step + 1) * ROWS_PER_STEP] for k, v in data.items()}


def single_process() -> dict[str, torch.Tensor]:
    """The reference: one process, each step's 8 rows as one batch, the same SGD steps, full attention."""
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    data = rows()
    for step in range(STEPS):
        optimizer.zero_grad()
        dft.causal_lm_loss(model, step_rows(data, step)).loss.backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}
