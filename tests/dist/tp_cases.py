"""The tensor-parallel cases of tests/dist/tp_worker.py and their single-process reference (float64)."""

from __future__ import annotations

from pathlib import Path

import torch

import dft
from tests.dist.engine_cases import LR, ROWS_PER_STEP, STEPS, build_model, has_reference, loss_rows, reference_kwargs

CASES = ("tp-tied", "tp-untied", "tp-asft", "tp-nft", "tp2-fsdp2-untied")
"""``tp2-fsdp2-untied``: 4 ranks, ``DistributedConfig(tp_size=2, fsdp_size=2)``. Its tied variant is off by
1.2e-4 after the second step on the logits path too (transformers' FSDP2 x TP with tied embeddings, not
the loss: the first step is exact), so it is not a case here."""


def models(case: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The policy (and ASFT's reference or NFT's pi_old) in float64; V = 23 splits 12 / 11 over 2 ranks."""
    policy = build_model("untied" if "untied" in case else "tied").double()
    reference = build_model("tied", seed=1).double() if has_reference(case) else None
    return policy, reference


def save_models(out_dir: Path, case: str) -> None:
    policy, reference = models(case)
    policy.save_pretrained(out_dir / "policy")
    if reference is not None:
        reference.save_pretrained(out_dir / "reference")


def single_process(case: str) -> dict[str, torch.Tensor]:
    """One process, each step's rows as one batch, the same SGD steps (float64)."""
    model, ref = models(case)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    data, kw = loss_rows(case), reference_kwargs(case, ref and ref.eval())
    for step in range(STEPS):
        batch = {k: v[step * ROWS_PER_STEP : (step + 1) * ROWS_PER_STEP] for k, v in data.items()}
        optimizer.zero_grad()
        dft.causal_lm_loss(model, batch, **kw).loss.backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}
