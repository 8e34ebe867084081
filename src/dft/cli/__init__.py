"""The ``dft`` command: ``dft train`` (DFT fine-tuning), ``dft eval``, ``dft inspect``, ``dft sample``. Dispatch only.

    dft train                                   # built-in toy recipe: tiny Llama + shipped arithmetic, CPU, ~3 min
    dft train --model ./my-llama --data train.jsonl --loss dft --learning_rate 1e-5 --output_dir out
    dft train --model M --data D --lora_r 16 --torch_dtype bfloat16 --bf16 true
    dft train --config run.yaml                 # any flag below, as a YAML/JSON mapping (command line wins)
    dft train ... --resume_from_checkpoint true # continue from the latest checkpoint in output_dir
    dft eval --model out [--data test.jsonl] [--output_dir results]

One module per command (``train``, ``eval``, ``inspect``, ``sample``), each imported when its command runs; the
parts they share are the private modules of this package. ``dft train``'s flags come from
``TrainScriptArguments`` and [`dft.DFTConfig`][dft.trainer.DFTConfig] (every ``TrainingArguments`` flag works,
with its own default). The toy recipe's settings apply only when neither ``--model`` nor ``--data`` is given (or
with ``--recipe toy``). Bad input prints one line and exits with status 2, before anything heavy is imported for
a bad flag; Ctrl-C / SIGTERM stop after the current step, keep the checkpoints and exit 130 / 143.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from ._parsing import Interrupted, UsageError, _one_line
from ._processes import _is_main

__all__ = ["EvalScriptArguments", "InspectScriptArguments", "SampleScriptArguments", "TrainScriptArguments", "main"]


USAGE = """usage: dft {train,eval,inspect,sample} [flags]

  dft train [--model M] [--data D] [--loss dft|sft|asft|eaft|nft] [TrainingArguments flags]
            with neither --model nor --data: the built-in toy job (tiny Llama, shipped arithmetic, CPU)
  dft eval --model M [--data D] [--output_dir OUT]
  dft inspect --model M --data D [--max_examples N] [--output_dir OUT]
            should I switch? the model's p on your supervised tokens, and a recommendation
  dft sample --model M --data D --num_samples K --temperature T --verifier exact|math|MODULE:FUNCTION
            generate, verify, keep: samples.jsonl (for --loss nft), accepted.jsonl (for dft train --data),
            pairs.jsonl (for DPO), summary.json

  dft train --help, dft eval --help, dft inspect --help, dft sample --help: every flag and its default"""


def _data_error(e: BaseException) -> bool:
    """A ``dft.data.DataError`` (one line, exit 2), told without importing ``dft.data`` (which imports datasets):
    when it was never imported, nothing raised one."""
    data = sys.modules.get("dft.data")
    return data is not None and isinstance(e, data.DataError)


def _run(command: str, rest: list[str]) -> int:
    if command == "train":
        from .train import run_train

        return run_train(rest)
    if command == "eval":
        from .eval import run_eval

        return run_eval(rest)
    if command == "inspect":
        from .inspect import run_inspect

        return run_inspect(rest)
    if command == "sample":
        from .sample import run_sample

        return run_sample(rest)
    raise UsageError(f"unknown command {command!r}. {USAGE.splitlines()[0]}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        return _run(argv[0], argv[1:])
    except UsageError as e:
        return _refused(e)
    except (Interrupted, KeyboardInterrupt) as e:
        return _stopped(e)
    except Exception as e:
        if _data_error(e):
            return _refused(e)
        raise


def _refused(e: Exception) -> int:
    if _is_main():  # every rank checks the same input: one line per job, not per process
        print(f"dft: error: {_one_line(e)}", file=sys.stderr)
    else:
        _wait_for_the_main_process()
    return 2


def _wait_for_the_main_process(seconds: float = 20.0) -> None:
    """A launcher (torchrun, accelerate launch) ends the whole job when its first process exits: a rank that
    refused the input silently waits, so that the main process, which refuses the same input, prints its line
    first (the launcher then ends this one)."""
    import time

    time.sleep(seconds)


def _stopped(e: BaseException) -> int:
    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    name = signal.Signals(signum).name
    out = str(e) if isinstance(e, Interrupted) and str(e) else None
    where = ""
    if out and Path(out).is_dir():
        checkpoints = sorted(Path(out).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        where = (
            (
                f"; checkpoints kept in {out}/ (latest {checkpoints[-1].name}): continue with "
                "--resume_from_checkpoint true"
            )
            if checkpoints
            else f"; no checkpoint was saved in {out}/"
        )
    if _is_main():
        print(f"dft: stopped by {name}{where}", file=sys.stderr)
    return 128 + int(signum)


_PUBLIC = {
    "TrainScriptArguments": "_train_args",
    "EvalScriptArguments": "eval",
    "InspectScriptArguments": "inspect",
    "SampleScriptArguments": "sample",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:  # the commands' flag dataclasses, from their modules (imported on first access)
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
