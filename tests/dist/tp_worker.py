"""Run under torchrun (2 CPU ranks, gloo): DFTTrainer on a tensor-parallel model, as users launch it.

    PYTHONPATH=. python -m torch.distributed.run --nproc_per_node 2 tests/dist/tp_worker.py OUT_DIR CASE

The model is loaded with ``from_pretrained(folder, tp_plan="auto", dtype=float64)``: transformers shards
it (``lm_head``: ``colwise_gather_output``, a ``Shard(0)`` DTensor; the tied embedding shares it) and
Trainer builds ``ParallelismConfig(tp_size=2)`` itself. Both ranks see the same batches (one data-parallel
rank). ``tp2-fsdp2`` (4 ranks): ``DistributedConfig(tp_size=2, fsdp_size=2)``, FSDP2 over two
data-parallel shards, each with tensor parallel 2. CASE: ``tp-tied``, ``tp-untied``, ``tp-asft`` (a reference loaded with the same plan), ``tp-nft`` (NFT, pi_old loaded so),
``tp-logits`` (``fused_lm_head=False``, the logits path: the baseline of the comparison).
Saves the full parameters after 2 optimizer steps, the ``dft:`` warnings and the head's gradient layout.
"""

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, default_data_collator

from dft.engines import detect_engine
from tests.dist import exit_without_teardown, is_prior_warning
from tests.dist.engine_cases import ROWS_PER_STEP, SequentialTrainer, dataset, has_reference, loss_kwargs, sgd_config
from tests.dist.sp_shim import allow_cpu_parallelism_config
from tests.dist.tp_cases import save_models


def main() -> None:
    out_dir, case = Path(sys.argv[1]), sys.argv[2]
    allow_cpu_parallelism_config()  # accelerate refuses ParallelismConfig on MULTI_CPU (tests/dist/sp_shim.py)
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        save_models(out_dir, case)
    dist.barrier()
    load = {"tp_plan": "auto"}
    if case.startswith("tp2-fsdp2"):  # 2-D: 4 ranks, FSDP2 over 2 data-parallel shards x tensor parallel 2
        from transformers.distributed import DistributedConfig

        from tests.dist.cpu_fsdp_shim import install as install_cpu_fsdp

        install_cpu_fsdp()  # accelerate turns FSDP on only for GPU-like devices (tests/dist/cpu_fsdp_shim.py)
        load = {"distributed_config": DistributedConfig(tp_size=2, fsdp_size=2)}
    model = AutoModelForCausalLM.from_pretrained(out_dir / "policy", dtype=torch.float64, **load)
    ref_model = None
    if has_reference(case):
        ref_model = AutoModelForCausalLM.from_pretrained(out_dir / "reference", tp_plan="auto", dtype=torch.float64)
    head_grads = []
    model.lm_head.weight.register_hook(
        lambda g: head_grads.append((type(g).__name__, str(g.placements), g.to_local().shape))
    )
    args = sgd_config(
        out_dir,
        per_device_train_batch_size=ROWS_PER_STEP // (4 if case.startswith("tp2-fsdp2") else 2),
        fused_lm_head=not case.endswith("-logits"),
        **loss_kwargs(case),
    )
    trainer = SequentialTrainer(
        model=model, args=args, train_dataset=dataset(case), data_collator=default_data_collator, ref_model=ref_model
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    dft_warnings = sorted(
        {str(w.message) for w in caught if str(w.message).startswith("dft:") and not is_prior_warning(w)}
    )
    params = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }
    if dist.get_rank() == 0:
        logs = [e for e in trainer.state.log_history if "loss" in e]
        torch.save(
            {
                "params": params,
                "warnings": dft_warnings,
                "engine": detect_engine(trainer.model_wrapped).name,
                "tp_size": trainer.get_tp_size(),
                "head_grads": head_grads,
                "logs": logs,
            },
            out_dir / "trainer.pt",
        )
    dist.barrier()
    exit_without_teardown()


if __name__ == "__main__":
    main()
