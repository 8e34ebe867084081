"""Run under torchrun (2 CPU ranks, gloo): DFTTrainer with DeepSpeed Ulysses sequence parallelism, as users launch it.

    PYTHONPATH=. DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 \
        tests/dist/sp_worker.py OUT_DIR CASE

Saves the full parameters after training, the logs, ``evaluate()``'s metrics after training, every
``dft:`` warning (the logits-path fallback warns), what the loss saw of each training micro-batch (keys, shape)
and how the trainer found DeepSpeed to reduce the sequence-parallel ranks' gradients
(``_sp_ranks_summed``). CASE: see tests/dist/sp_cases.py.
"""

import sys
import warnings
from pathlib import Path

import torch
from transformers import default_data_collator

from dft.engines import detect_engine, unwrap_model
from tests.dist import exit_without_teardown, is_prior_warning
from tests.dist.engine_cases import SequentialTrainer, sgd_config
from tests.dist.sp_cases import build_model, dataset, trainer_kwargs
from tests.dist.sp_shim import install as install_sp_shim
from tests.dist.trainer_worker import full_parameters


class RecordingTrainer(SequentialTrainer):
    """Records the keys and shape of the training batches the loss receives (the adapter's shards)."""

    seen: list

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen = getattr(self, "seen", [])
        if model.training:
            self.seen.append((sorted(inputs), tuple(inputs["input_ids"].shape)))
        return super().compute_loss(model, inputs, *args, **kwargs)


def main() -> None:
    out_dir, case = Path(sys.argv[1]), sys.argv[2]
    install_sp_shim()
    args = sgd_config(out_dir, **trainer_kwargs(case))
    trainer = RecordingTrainer(
        model=build_model("zero2"),
        args=args,
        train_dataset=dataset(),
        eval_dataset=dataset(eval=True),
        data_collator=default_data_collator,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
        metrics = trainer.evaluate()
    dft_warnings = sorted({str(w.message) for w in caught if str(w.message).startswith("dft:") and not is_prior_warning(w)})
    params = full_parameters(unwrap_model(trainer.model_wrapped))
    if trainer.accelerator.is_main_process:
        torch.save(
            {
                "params": params,
                "warnings": dft_warnings,
                "engine": detect_engine(trainer.model_wrapped).name,
                "logs": [e for e in trainer.state.log_history if "loss" in e],
                "eval": metrics,
                "seen": trainer.seen,
                "sp_ranks_summed": trainer._sp_ranks_summed(),
            },
            out_dir / "trainer.pt",
        )
    trainer.accelerator.wait_for_everyone()
    exit_without_teardown()


if __name__ == "__main__":
    main()
