"""``--resume_from_checkpoint``: which checkpoint, and the guards that refuse to continue a finished run or one
trained with another model, data, loss or optimisation; the run's record written into each checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._loading import RUN_RECORD, SHIPPED_TRAIN, TOY_MODEL, _run_record, _toy_model, _where
from ._parsing import UsageError
from ._processes import say


def _run_config(script: Any, config: Any, toy: bool, sizes: dict[str, Any]) -> dict[str, Any]:
    from .._version import __version__
    from ..arguments import NFT_FIELDS

    weighting = config.dft_weighting()
    return {
        "dft_version": __version__,
        "recipe": "toy" if toy else None,
        "model": _where(script.model) or TOY_MODEL,
        "data": _where(script.data) or SHIPPED_TRAIN,
        "eval_data": _where(script.eval_data),
        "eval_fraction": script.eval_fraction if script.data and not script.eval_data else None,
        **sizes,
        "loss_type": config.loss_type,
        "weighting": {k: (repr(v) if callable(v) else v) for k, v in vars(weighting).items()},
        "kl_coef": config.effective_kl_coef(),
        "ref_model": _where(getattr(script, "ref_model", None)),
        "nft": {name[4:]: getattr(config, name) for name in NFT_FIELDS} if config.loss_type == "nft" else None,
        "dft_ce_tokens": config.dft_ce_tokens,
        "dft_warmup_steps": config.dft_warmup_steps,
        "dft_warmup_ratio": config.dft_warmup_ratio,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": str(getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)),
        "max_steps": config.max_steps if config.max_steps > 0 else None,
        "num_train_epochs": None if config.max_steps > 0 else config.num_train_epochs,  # max_steps wins
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "seed": config.seed,
        "max_length": script.max_length,
        "packing": script.packing,
        "torch_dtype": script.torch_dtype,
        "lora": {"r": script.lora_r, "alpha": script.lora_alpha, "target_modules": script.lora_target_modules}
        if script.lora_r > 0
        else None,
    }


def _resume_target(value: str | None, out: Path) -> str | None:
    if value is None or value.lower() in ("false", "none", ""):
        return None
    if value.lower() == "true":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is None:
            raise UsageError(f"--resume_from_checkpoint true: no checkpoint-* folder in {out}.")
        return last
    if not (Path(value) / "trainer_state.json").is_file():
        raise UsageError(f"--resume_from_checkpoint {value}: not a checkpoint folder (no trainer_state.json).")
    return value


def _check_unfinished(checkpoint: Path, config: Any, out: Path) -> int:
    """Resuming a run that already reached its last step would train nothing and overwrite its metrics.
    Returns the steps the checkpoint's run planned (its ``max_steps``)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    done, planned = int(state.get("global_step", 0)), int(state.get("max_steps", 0) or 0)
    target = config.max_steps if config.max_steps > 0 else planned
    if target and done >= target:
        raise UsageError(
            f"--resume_from_checkpoint: {checkpoint} is at step {done} of {target}: that run is finished "
            f"(results in {out}); raise --max_steps to train on, or use a new --output_dir."
        )
    return planned


RESUME_KEYS = (
    "recipe", "model", "data", "eval_data", "eval_fraction", "max_length", "packing", "torch_dtype", "lora",
    "loss_type", "weighting", "kl_coef", "dft_ce_tokens", "dft_warmup_steps", "dft_warmup_ratio",
    "learning_rate", "lr_scheduler_type", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
)  # fmt: skip
"""What a resumed run must share with the checkpoint's: its model and data, the loss and its options, and
what the optimizer, the schedule and the data order were built from (``max_steps`` may grow)."""


ARCHITECTURE_KEYS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
    "num_attention_heads", "num_key_value_heads",
)  # fmt: skip


def _check_resume(checkpoint: Path, script: Any, config: Any, toy: bool) -> None:
    """Resuming with another model, data, loss or optimisation than the checkpoint's run: one line naming
    the differences (``--overwrite`` resumes anyway, with the new settings). Another architecture, or
    LoRA where the checkpoint holds a full model (or the reverse), is refused in any case."""
    _check_architecture(checkpoint, script)
    record = _run_record(checkpoint) or _run_record(checkpoint.parent)
    if record is None or script.overwrite:
        return
    now = json.loads(json.dumps(_run_config(script, config, toy, {})))
    for key in ("model", "data", "eval_data"):  # a record of an older version holds the paths as given
        if isinstance(record.get(key), str):
            record[key] = _where(record[key])
    changed = []
    for key in (k for k in RESUME_KEYS if k in record and record[k] != now[k]):
        old, new = record[key], now[key]
        if isinstance(old, dict) and isinstance(new, dict):  # the weight options: only the fields that differ
            changed += [f"{key}.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
        else:
            changed.append(f"{key} {old!r} -> {new!r}")
    if changed:
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint}: this run differs from the one it continues ("
            f"{'; '.join(changed)}): resume with that run's flags, start a new --output_dir, or pass "
            "--overwrite to resume anyway with the new settings."
        )


def _check_architecture(checkpoint: Path, script: Any) -> None:
    adapter = (checkpoint / "adapter_config.json").is_file()
    if adapter != (script.lora_r > 0) and (adapter or (checkpoint / "config.json").is_file()):
        held, wanted = ("a LoRA adapter", "full fine-tuning") if adapter else ("a full model", "a LoRA adapter")
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint} holds {held}, but this run trains {wanted} "
            f"({'no ' if adapter else ''}--lora_r): resume with the run's flags, or start a new --output_dir."
        )
    if adapter or not (checkpoint / "config.json").is_file():
        return
    saved = json.loads((checkpoint / "config.json").read_text())
    if script.model is None:
        current = _toy_model().config.to_dict()
    elif (Path(script.model) / "config.json").is_file():
        current = json.loads((Path(script.model) / "config.json").read_text())
    else:
        return  # a hub id: its config is not read before the model loads
    diffs = [
        f"{key} {saved[key]} -> {current[key]}"
        for key in ARCHITECTURE_KEYS
        if key in saved and key in current and saved[key] != current[key]
    ]
    if diffs:
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint} was saved from another architecture than --model "
            f"{script.model or TOY_MODEL} ({', '.join(diffs)}): resume with the model that run trained, or "
            "start a new --output_dir."
        )


def _resume_callbacks(record: dict[str, Any], planned: int | None) -> list[Any]:
    """``dft_run.json`` into each checkpoint; on resume with another length, the schedule re-planned."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class RecordRun(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                (folder / RUN_RECORD).write_text(json.dumps(record, indent=1))

    class Replan(TrainerCallback):
        """Trainer restores the scheduler's step and the optimizer's last lr, then steps the schedule built
        for the new ``max_steps``: a finished run's first resumed step would train at its final lr (0 for
        linear / cosine), then jump. Here the lr is set to what the new schedule gives at that step."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            import torch

            optimizer, scheduler = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
            if not planned or state.max_steps == planned or state.global_step == 0:
                return
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                say(f"note: the run planned {planned} steps, now {state.max_steps}: its lr scheduler is kept")
                return
            step = scheduler.last_epoch
            lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs
            kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
            say(
                f"the run planned {planned} steps, now {state.max_steps}: its {kind} lr schedule is re-planned for "
                f"{state.max_steps} steps and continues at step {state.global_step} (lr {lrs[0]:.3g}), as if "
                f"planned so from the start"
            )

    return [RecordRun(), Replan()]
