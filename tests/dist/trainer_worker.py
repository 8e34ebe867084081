"""Run under torchrun (2 CPU ranks, gloo): DFTTrainer with an engine, as users launch it.

    PYTHONPATH=. DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 \
        tests/dist/trainer_worker.py OUT_DIR CASE

Saves the full parameters after training and every ``dft:`` warning (the logits-path fallback warns).
CASE: see tests/dist/engine_cases.py.
"""

import sys
import warnings
from pathlib import Path

import torch
from transformers import default_data_collator

from dft.engines import detect_engine, unwrap_model
from tests.dist import exit_without_teardown, is_prior_warning
from tests.dist.cpu_fsdp_shim import install as install_cpu_fsdp
from tests.dist.engine_cases import (
    SequentialTrainer,
    build_model,
    dataset,
    has_reference,
    loss_kwargs,
    sgd_config,
    trainer_kwargs,
)


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):  # ZeRO-3: gather the partitions
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().clone() for n, p in params.items()}
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone() for n, p in params.items()
    }


def describe_head(model: torch.nn.Module) -> str:
    """How the engine holds the head: "partitioned" (ZeRO-3), "own FSDP2 unit" or "whole"."""
    from torch.distributed.fsdp import FSDPModule

    head = model.get_output_embeddings()
    if hasattr(head.weight, "ds_id"):
        return "partitioned" if head.weight.ds_tensor.numel() < head.weight.ds_numel else "whole (ZeRO-3 persistent)"
    return "own FSDP2 unit" if isinstance(head, FSDPModule) else "whole"


def main() -> None:
    out_dir, case = Path(sys.argv[1]), sys.argv[2]
    install_cpu_fsdp()
    model = build_model(case)
    ref_model = build_model(case, seed=1) if has_reference(case) else None
    args = sgd_config(out_dir, **trainer_kwargs(case), **loss_kwargs(case))
    trainer = SequentialTrainer(
        model=model,
        args=args,
        train_dataset=dataset(case),
        data_collator=default_data_collator,
        ref_model=ref_model,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    dft_warnings = sorted(
        {str(w.message) for w in caught if str(w.message).startswith("dft:") and not is_prior_warning(w)}
    )
    inner = unwrap_model(trainer.model_wrapped)
    head_state = describe_head(inner)
    params = full_parameters(inner)
    if trainer.accelerator.is_main_process:
        engine = detect_engine(trainer.model_wrapped).name
        ref_engine = None if trainer.ref_model is None else detect_engine(trainer.ref_model).name
        logs = [e for e in trainer.state.log_history if "loss" in e]
        torch.save(
            {
                "params": params,
                "warnings": dft_warnings,
                "engine": engine,
                "ref_engine": ref_engine,
                "head": head_state,
                "logs": logs,
            },
            out_dir / "trainer.pt",
        )
    trainer.accelerator.wait_for_everyone()
    exit_without_teardown()


if __name__ == "__main__":
    main()
