"""Run under torchrun (CPU ranks, gloo): context parallelism through DFTTrainer or a plain accelerate loop.

    PYTHONPATH=. python -m torch.distributed.run --nproc_per_node 2 tests/dist/cp_worker.py OUT_DIR CASE

Saves the full parameters after 2 optimizer steps, every ``dft:`` warning and, for the loop, whether
the fused head ran and the errors the two plain-loop mistakes raise. CASE: see tests/dist/cp_cases.py.
"""

import sys
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.parallelism_config import ParallelismConfig
from accelerate.utils import FullyShardedDataParallelPlugin
from datasets import Dataset
from transformers import default_data_collator

import dft
from dft.engines import unwrap_model
from tests.dist import exit_without_teardown, is_prior_warning
from tests.dist.cp_cases import ACCUMULATION, CASES, LR, ROWS_PER_STEP, STEPS, build_model, rows, step_rows
from tests.dist.cp_shim import RING_CALLS, fp64_ring_merge
from tests.dist.cp_shim import install as install_cp_shims
from tests.dist.engine_cases import SequentialTrainer, sgd_config

FSDP_CONFIG = {"version": 2, "reshard_after_forward": True, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}


SEEN_LENGTHS: set[int] = set()  # sequence lengths the model's embedding saw on this rank


def watched_model() -> torch.nn.Module:
    model = build_model()
    model.get_input_embeddings().register_forward_pre_hook(lambda _m, args: SEEN_LENGTHS.add(args[0].shape[1]))
    return model


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }


def run_trainer(out_dir: Path, cp: int, dp: int) -> tuple[torch.nn.Module, Accelerator, dict]:
    args = sgd_config(
        out_dir,
        per_device_train_batch_size=ROWS_PER_STEP // (ACCUMULATION * dp),
        gradient_accumulation_steps=ACCUMULATION,
        fsdp="full_shard",
        fsdp_config=FSDP_CONFIG,
        parallelism_config=ParallelismConfig(cp_size=cp, dp_shard_size=dp),
    )
    data = Dataset.from_dict({k: v.tolist() for k, v in rows().items()})
    trainer = SequentialTrainer(
        model=watched_model(), args=args, train_dataset=data, data_collator=default_data_collator
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return unwrap_model(trainer.model_wrapped), trainer.accelerator, {"logs": logs}


def _mistake(fn) -> str | None:
    """The ValueError ``fn`` raises (None if it raises nothing)."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def run_loop(cp: int) -> tuple[torch.nn.Module, Accelerator, dict]:
    """The plain-loop recipe of dft.global_num_items, after trying the two mistakes it documents."""
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True,
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, parallelism_config=ParallelismConfig(cp_size=cp))
    model = watched_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = rows()

    def micro_batches(step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches (one data-parallel rank: every CP rank holds the whole step), with the
        targets shifted *before* sharding (``shift_labels``) and the positions CP needs; the attention mask
        is left out: CP attends causally, and the padding is on the right, unsupervised."""
        batch = step_rows(data, step)
        size = ROWS_PER_STEP // ACCUMULATION
        out = []
        for i in range(ACCUMULATION):
            ids = batch["input_ids"][i * size : (i + 1) * size].clone()
            labels = batch["labels"][i * size : (i + 1) * size].clone()
            positions = torch.arange(ids.shape[1]).expand_as(ids).clone()
            out.append({"input_ids": ids, "shift_labels": dft.shift_causal_labels(labels), "position_ids": positions})
        return out

    def context(mbs: list[dict[str, torch.Tensor]]):
        buffers = [t for mb in mbs for t in mb.values()]
        return accelerator.maybe_context_parallel(
            buffers=buffers, buffer_seq_dims=[1] * len(buffers), no_restore_buffers=set(buffers)
        )

    # mistake 1: the count of the whole sequences, taken before sharding (2x the CP count: 0.5x gradients)
    early = _mistake(lambda: dft.global_num_items(micro_batches(0)))

    # mistake 2: unshifted `labels` sharded with the inputs (load-balanced chunks: targets paired across them)
    def unshifted() -> None:
        mb = micro_batches(0)[0]
        mb["labels"] = step_rows(data, 0)["labels"][: mb["input_ids"].shape[0]].clone()
        del mb["shift_labels"]
        with context([mb]):
            dft.causal_lm_loss(model, mb)

    def unshifted_count() -> None:
        mb = micro_batches(0)[0]
        with context([mb]):
            dft.global_num_items(mb["input_ids"])  # a bare tensor is read as unshifted labels

    mistakes = {
        "early_count": early,
        "unshifted_loss": _mistake(unshifted),
        "unshifted_count": _mistake(unshifted_count),
    }
    optimizer.zero_grad()

    fused = []
    for step in range(STEPS):
        mbs = micro_batches(step)
        with context(mbs):
            num_items = dft.global_num_items(mbs)  # of the local shards: inside the CP context
            for mb in mbs:
                out = dft.causal_lm_loss(model, mb, num_items_in_batch=num_items)
                accelerator.backward(out.loss)
                fused.append(out.fused)
        optimizer.step()
        optimizer.zero_grad()
    return unwrap_model(model), accelerator, {"mistakes": mistakes, "fused": fused}


def main() -> None:
    out_dir, case = Path(sys.argv[1]), sys.argv[2]
    install_cp_shims()
    fp64_ring_merge()
    cp, dp = CASES[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if case.startswith("trainer"):
            model, accelerator, extra = run_trainer(out_dir, cp, dp)
        else:
            model, accelerator, extra = run_loop(cp)
    dft_warnings = sorted({str(w.message) for w in caught if str(w.message).startswith("dft:") and not is_prior_warning(w)})
    params = full_parameters(model)
    mesh = accelerator.torch_device_mesh
    if accelerator.is_main_process:
        result = {
            "params": params,
            "warnings": dft_warnings,
            "mesh": dict(zip(mesh.mesh_dim_names, mesh.shape)),
            "seq_lengths": sorted(SEEN_LENGTHS),
            "ring_calls": dict(RING_CALLS),
        }
        torch.save({**result, **extra}, out_dir / "cp.pt")
    accelerator.wait_for_everyone()
    exit_without_teardown()


if __name__ == "__main__":
    main()
