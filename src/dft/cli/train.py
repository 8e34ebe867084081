"""``dft train``: DFT fine-tuning of a causal LM on local data (or the built-in toy job), then evaluation.

Under torchrun / accelerate launch every process runs it; the main process prints and writes. Ctrl-C / SIGTERM
stop after the current step, keep the checkpoints and exit 130 / 143.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _loading, _nft
from ._evaluation import _exact_match_metrics, _exact_match_on_ranks, _table_notes
from ._loading import EVAL_SPLIT, TOY_MODEL, _apply_lora, _asset, _peft_quietly, _prepare, _toy_model, _where
from ._parsing import Interrupted, UsageError, _one_line, check_writable
from ._processes import _exit_without_gloo_teardown, _is_main, _quiet_progress_bars, _wait_for_everyone, say
from ._reporting import format_table, plot_history, write_metrics
from ._resume import _check_resume, _check_unfinished, _resume_callbacks, _resume_target, _run_config
from ._train_args import parse_train_args

__all__ = ["run_train"]


def run_train(argv: list[str]) -> int:
    """``dft train``. Under torchrun / accelerate launch every process runs this; the main process (rank 0)
    prints and writes, the others wait for it at the end, and evaluation and exact match are spread over
    the ranks. Bad input fails on every rank alike, before anything loads."""
    script, config, toy = parse_train_args(argv)
    out = Path(config.output_dir)
    resume = _resume_target(config.resume_from_checkpoint, out)
    planned = None
    if resume:
        planned = _check_unfinished(Path(resume), config, out)
        _check_resume(Path(resume), script, config, toy)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file, not a folder.")
    if out.exists() and any(out.iterdir()) and not (script.overwrite or resume):
        raise UsageError(
            f"output_dir {out} exists and is not empty: choose another, pass --overwrite, or "
            "--resume_from_checkpoint true to continue it."
        )
    check_writable(out)
    main = _is_main()
    if not main:
        _quiet_progress_bars()
    model, tokenizer = _loading._load_model_and_tokenizer(script)
    if config.loss_type == "nft":
        _nft.check_tokenizer(script.sampling, tokenizer, script.data)
    with config.main_process_first(desc="dft: data preparation"):  # the main process fills the datasets cache
        train_set, eval_raw, eval_set, how = _load_data(script, tokenizer, config.seed)
    ref_model = None
    if script.ref_model is not None:  # NFT's pi_old (another model sampled) or ASFT's anchor
        ref_model, _ = _loading._load_model_and_tokenizer(dataclasses.replace(script, model=script.ref_model), False)
    elif config.effective_kl_coef() > 0 and script.lora_r <= 0:  # ASFT: a frozen copy of the starting model
        ref_model, _ = _loading._load_model_and_tokenizer(script)
    if script.lora_r > 0:  # the adapter's initial weights come from the run's seed (Trainer seeds later)
        from transformers import set_seed

        set_seed(config.seed)
    model = _apply_lora(model, script)
    from ..data import collator
    from ..trainer import DFTTrainer

    if script.overwrite and out.exists() and not resume and main:
        shutil.rmtree(out)
    _wait_for_everyone(config)
    record = _run_config(script, config, toy, {})
    stop = _SignalStop(out)
    with stop:
        try:
            trainer = DFTTrainer(
                model=model,
                args=config,
                train_dataset=train_set,
                eval_dataset=eval_set,
                data_collator=collator(tokenizer, script.packing),
                processing_class=tokenizer,
                ref_model=ref_model,
                callbacks=[stop.callback(), *_resume_callbacks(record, planned)],
            )
        except ValueError as e:  # NFT's rows (one verdict per prompt, a bad verdict): one line, naming the data
            if config.loss_type != "nft":
                raise
            raise UsageError(f"--data {script.data}: {_one_line(e)}") from None
        if trainer._dft_nft_counts is not None:
            say(_nft.counts_line(trainer._dft_nft_counts, config))
            train_set = trainer.train_dataset
        total, per_epoch = _schedule(trainer)
        if "logging_steps" not in script.given_flags:  # a 15-step run logs more than once
            trainer.args.logging_steps = max(1, min(trainer.args.logging_steps, -(-total // 20)))
        if toy and "warmup_steps" not in script.given_flags:  # the recipe's 20 warm-up steps, in a shorter run
            trainer.args.warmup_steps = min(trainer.args.warmup_steps, total // 10)
        epochs = total / per_epoch
        device = f"{trainer.args.device}"
        if script.cpu_ddp:
            device += " (no GPU found: --use_cpu true, so the processes train as one DDP job over gloo)"
        say(
            f"training {_describe_loss(config, script.ref_model)} for {total} step{'s' if total != 1 else ''} ({epochs:.3g} epochs of {per_epoch} steps, "
            f"{len(train_set)} examples, batch {trainer.args.per_device_train_batch_size} x "
            f"{trainer.args.gradient_accumulation_steps} accumulation x {trainer.args.world_size} processes) "
            f"at lr {config.learning_rate:g} on {device}, logging every "
            f"{trainer.args.logging_steps} steps" + (f", resuming from {resume}" if resume else "")
        )
        stop.training = True
        try:
            with _no_pin_memory_warning():
                trainer.train(resume_from_checkpoint=resume)
        except ValueError as e:  # the optimizer state of another model (a guard above missed it)
            if not (resume and "state dict" in str(e)):
                raise
            raise UsageError(f"--resume_from_checkpoint {resume}: cannot load its state: {_one_line(e)}") from None
        stop.training = False
        if stop.signum is not None:
            raise Interrupted(stop.signum, str(out))
        metrics = _final_evaluation(trainer)
        match_rows = _nft.exact_match_rows(eval_raw)
        match = _exact_match_on_ranks(trainer, tokenizer, match_rows, script.max_eval_examples)
        metrics.update(_exact_match_metrics(match))
        sizes = {
            "train_examples": len(train_set),
            "eval_examples": len(eval_set),
            "eval_split": how,
            "total_steps": total,
            "steps_per_epoch": per_epoch,
            "logging_steps": trainer.args.logging_steps,
        }
        if resume:
            sizes["resumed_from"] = _where(resume)
        staging = out / ".final-staging"  # the same path on every rank; filled, then moved into out
        if main:
            shutil.rmtree(staging, ignore_errors=True)  # a run stopped while publishing
            staging.mkdir(parents=True)
        _wait_for_everyone(config)
        try:
            trainer.save_model(str(staging))  # every rank (sharded engines gather); Trainer writes on the main one
            if main:
                written = _finish_model(staging, script, tokenizer)
                if how != SHIPPED_SPLIT:  # the held-out rows, for dft eval --model OUT without --data
                    rows = (json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in eval_raw)
                    (staging / EVAL_SPLIT).write_text("".join(rows))
                    written += f", {EVAL_SPLIT}"
                else:
                    (out / EVAL_SPLIT).unlink(missing_ok=True)  # a split left by an earlier run in this folder
                (staging / "run_config.json").write_text(json.dumps(_run_config(script, config, toy, sizes), indent=1))
                title = f"{config.loss_type}, lr {config.learning_rate:g}"
                plot_history(staging, trainer.state.log_history, title=title)
                write_metrics(staging, trainer.state.log_history, metrics)
                _publish(staging, out)
        finally:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            _wait_for_everyone(config)  # the others leave once every file is in place
    if main:
        table = {k: v for k, v in metrics.items() if k.startswith("eval_")}
        print("\n" + format_table(table, _table_notes(script.max_eval_examples)))
        if match.note:
            print(f"exact match: {match.note}")
        print(f"\nwrote {out}/: {written}, run_config.json, metrics.json, metrics.csv, training.png", flush=True)
    _exit_without_gloo_teardown()
    return 0


@contextlib.contextmanager
def _no_pin_memory_warning() -> Iterator[None]:
    """On a machine without an accelerator torch warns that Trainer's DataLoader asks for pinned memory
    (``dataloader_pin_memory``, on by default) nothing can use: a warning about the CLI's own settings that
    nobody running it can act on, hidden around Trainer's loops (every other warning stays)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="'pin_memory' argument is set as true but no accelerator is found", category=UserWarning
        )
        yield


SHIPPED_SPLIT = "the shipped test split"


def _load_data(script: Any, tokenizer: Any, seed: int) -> tuple[Any, Any, Any, str]:
    """``(train_set, eval_raw, eval_set, how the eval split was made)``."""
    from ..data import load_local_dataset

    train_raw = load_local_dataset(script.data or _asset("arithmetic_train.jsonl"))
    if script.eval_data or script.data is None:
        eval_raw = load_local_dataset(script.eval_data or _asset("arithmetic_test.jsonl"))
        how = "--eval_data" if script.eval_data else SHIPPED_SPLIT
    else:
        if len(train_raw) < 2:
            raise UsageError(
                f"--data {script.data} has {len(train_raw)} example: too few to hold out an eval split; "
                "add examples or give --eval_data."
            )
        if "prompt_index" in train_raw.column_names and script.loss_type_is_nft:  # a prompt's samples on one side
            train_raw, eval_raw = _nft.split_by_prompt(train_raw, script.eval_fraction, seed)
            how = f"{script.eval_fraction:.0%} of --data's prompts held out (seed {seed})"
        else:
            split = train_raw.train_test_split(test_size=script.eval_fraction, seed=seed)
            train_raw, eval_raw = split["train"], split["test"]
            how = f"{script.eval_fraction:.0%} of --data held out (seed {seed})"
    train_set = _prepare(train_raw, tokenizer, script.max_length, "train")
    eval_set = _prepare(eval_raw, tokenizer, script.max_length, "eval")
    say(f"split: {len(train_set)} train / {len(eval_set)} eval examples ({how})")
    return train_set, eval_raw, eval_set, how


def _final_evaluation(trainer: Any) -> dict[str, Any]:
    """The held-out metrics of the trained model: the evaluation Trainer ran at the last step when it did (a
    step-based ``eval_strategy`` evaluates there), else one now (every rank: Trainer shards the eval set and
    gathers the sums)."""
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return {k: v for k, v in last.items() if k != "step"}
    with _no_pin_memory_warning():
        return trainer.evaluate()


def _describe_loss(config: Any, ref_model: str | None = None) -> str:
    """Only what applies to this loss type."""
    kind = config.loss_type
    if kind == "nft":
        return _nft.describe(config, ref_model)
    if kind in ("sft", "nll"):
        return "sft (cross-entropy)"
    if kind == "eaft":
        text = f"eaft (cross-entropy x top-{config.eaft_top_k} entropy ** {config.eaft_alpha})"
    else:
        text = f"{kind} (alpha={config.dft_alpha}, beta={config.dft_beta}"
        if config.dft_min_weight is not None:
            text += f", min_weight={config.dft_min_weight}"
        if config.dft_ce_tokens:
            text += f", cross-entropy on {config.dft_ce_tokens} tokens"
        if config.dft_warmup_steps or config.dft_warmup_ratio:
            ramp = config.dft_warmup_steps or f"{config.dft_warmup_ratio:.0%} of the"
            text += f", CE->DFT warm-up over {ramp} steps"
        text += ")"
    kl = config.effective_kl_coef()
    return text + (f" + {kl} x KL to the initial model" if kl > 0 else "")


class _SignalStop:
    """SIGINT/SIGTERM: stop after the current optimizer step (saving a checkpoint when saving is on)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.signum: int | None = None
        self.training = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalStop:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        first = self.signum is None
        self.signum = signum
        if not (self.training and first):  # outside training, or a second signal: stop now
            raise Interrupted(signum, str(self.out))

    def callback(self) -> Any:
        from transformers import TrainerCallback

        stop = self

        class StopOnSignal(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
                if args.world_size > 1:  # the ranks stop after the same step (one may see the signal later)
                    import torch
                    import torch.distributed as dist

                    flag = torch.tensor([stop.signum or 0], device=args.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop.signum = stop.signum or int(flag.item()) or None
                if stop.signum is not None:
                    control.should_training_stop = True
                    strategy = getattr(args, "save_strategy", "no")
                    control.should_save = str(getattr(strategy, "value", strategy)) != "no"
                return control

        return StopOnSignal()


def _schedule(trainer: Any) -> tuple[int, int]:
    """``(optimizer steps of the run, steps per epoch)``, as Trainer will count them."""
    args = trainer.args
    batches = len(trainer.get_train_dataloader())
    per_epoch = max(-(-batches // args.gradient_accumulation_steps), 1)
    total = args.max_steps if args.max_steps > 0 else max(int(-(-args.num_train_epochs * per_epoch // 1)), 1)
    return total, per_epoch


def _publish(staging: Path, out: Path) -> None:
    """Move every final artefact into ``out``, each with an atomic rename; metrics.json last (it marks done)."""
    names = sorted(p.name for p in staging.iterdir())
    for name in sorted(names, key=lambda n: n == "metrics.json"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)


def _finish_model(staging: Path, script: Any, tokenizer: Any) -> str:
    """The tokenizer next to the saved model and, with --merge_lora, the merged model (the adapter moved
    to ``adapter/``). Returns what the folder holds, for the ``wrote`` line."""
    tokenizer.save_pretrained(str(staging))
    base = _where(script.model) or TOY_MODEL
    if script.lora_r <= 0:
        return "model + tokenizer"
    if not script.merge_lora:
        return (
            f"LoRA adapter r={script.lora_r} on {base} (adapter_*; dft eval / inspect load it on that base) + tokenizer"
        )
    from dataclasses import replace

    import peft

    adapter = staging / "adapter"
    adapter.mkdir()
    for path in list(staging.iterdir()):
        if path.name.startswith("adapter_") or path.name == "README.md":
            os.replace(path, adapter / path.name)
    plain = replace(script, lora_r=0)
    if script.model is None:
        model = _toy_model()
    else:
        model, _ = _loading._load_model_and_tokenizer(plain, need_tokenizer=False)
    with _peft_quietly():
        merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(staging))
    return f"merged model (LoRA r={script.lora_r} merged into {base}) + tokenizer, the adapter in adapter/"
