"""The ``dft`` command: ``dft train`` (DFT fine-tuning, offline embedded default) and ``dft eval``.

    dft train                                   # tiny model + shipped arithmetic data, < 3 min on CPU
    dft train --model ./my-llama --data train.jsonl --loss dft --learning_rate 1e-5 --output_dir out
    dft train --config run.yaml                 # any flag below, as a YAML/JSON mapping
    dft eval --model out --data test.jsonl      # exact match of greedy answers + mean token CE

Flags are parsed by ``transformers.HfArgumentParser`` from :class:`TrainScriptArguments` and
:class:`dft.DFTConfig` (every ``TrainingArguments`` flag works). Bad input prints one message and
exits with status 2; the output folder is written to a temporary folder and renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .evaluation import exact_match, token_ce
from .reporting import format_table, plot_history, write_metrics

__all__ = ["EvalScriptArguments", "TrainScriptArguments", "main"]

DEFAULT_TRAIN_FLAGS = {
    "output_dir": "dft-output",
    "per_device_train_batch_size": "32",
    "per_device_eval_batch_size": "64",
    "learning_rate": "3e-3",
    "lr_scheduler_type": "cosine",
    "warmup_steps": "20",
    "max_steps": "1500",
    "logging_steps": "50",
    "eval_strategy": "steps",
    "eval_steps": "250",
    "dft_warmup_ratio": "0.25",
    "save_strategy": "no",
    "report_to": "none",
    "use_cpu": "true",
    "seed": "0",
}


@dataclass
class TrainScriptArguments:
    """What to train on. With no ``--model``/``--data``: a tiny Llama built from config and the
    arithmetic dataset shipped in the package (``dft/assets``)."""

    model: str | None = field(
        default=None,
        metadata={"help": "Local model folder (save_pretrained). Default: a tiny Llama built from config."},
    )
    data: str | None = field(
        default=None,
        metadata={"help": "Local .jsonl/.json/.parquet/.csv or save_to_disk folder. Default: shipped arithmetic."},
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "Held-out data; default: the shipped test split, or 5%% of --data."}
    )
    loss: str | None = field(
        default=None,
        metadata={"help": "Shortcut for --loss_type: dft, sft, asft (DFT + KL to the initial model) or eaft."},
    )
    max_length: int = field(default=128, metadata={"help": "Truncate examples to this many tokens."})
    packing: bool = field(
        default=False, metadata={"help": "Padding-free packing (position_ids; needs an attention that honours them)."}
    )
    max_eval_examples: int = field(default=100, metadata={"help": "Examples for the exact-match evaluation."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing, non-empty output_dir."})
    config: str | None = field(default=None, metadata={"help": "YAML or JSON file of flags (command-line flags win)."})


@dataclass
class EvalScriptArguments:
    model: str = field(metadata={"help": "Local model folder (with its tokenizer)."})
    data: str = field(
        metadata={"help": "Local data file or save_to_disk folder (prompt/completion, messages or text)."}
    )
    max_length: int = field(default=128, metadata={"help": "Truncate examples to this many tokens."})
    max_eval_examples: int = field(default=200, metadata={"help": "Examples for the exact-match evaluation."})
    batch_size: int = field(default=32, metadata={"help": "Batch size for the CE pass."})
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy generation length."})
    output: str | None = field(
        default=None, metadata={"help": "Write the metrics json here (default: MODEL/eval_results.json)."}
    )


class UsageError(Exception):
    """Bad input: one message, exit status 2."""


def _asset(name: str) -> str:
    return str(resources.files("dft") / "assets" / name)


def _flags_from_file(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {path}")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise UsageError(f"{path} must hold a mapping of flag names to values.")
    flags: list[str] = []
    for key, value in values.items():
        if isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def parse_train_args(argv: list[str]) -> tuple[TrainScriptArguments, Any]:
    from transformers import HfArgumentParser

    from .trainer import DFTConfig

    config_path, argv = _split_config(argv)
    defaults = [x for k, v in DEFAULT_TRAIN_FLAGS.items() for x in (f"--{k}", v)]
    file_flags = _flags_from_file(config_path) if config_path else []
    parser = HfArgumentParser((TrainScriptArguments, DFTConfig), prog="dft train")
    try:
        script, config, unknown = parser.parse_args_into_dataclasses(
            args=defaults + file_flags + argv, return_remaining_strings=True
        )
    except ValueError as e:  # DFTConfig / TrainingArguments validation
        raise UsageError(str(e)) from None
    if unknown:
        raise UsageError(f"unknown flag(s) {unknown}; see 'dft train --help' for the flags.")
    if script.loss is not None:
        if script.loss not in ("dft", "sft", "asft", "eaft"):
            raise UsageError(f"--loss must be one of dft, sft, asft, eaft; got {script.loss!r}.")
        config.loss_type = script.loss
    return script, config


def _load_model_and_tokenizer(path: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        from .toy import toy_model, toy_tokenizer

        return toy_model(hidden_size=64, num_layers=2), toy_tokenizer()
    if not Path(path).is_dir():
        raise UsageError(f"model path not found (a local folder written by save_pretrained is needed): {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a causal LM and its tokenizer from {path}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_prepared(path: str, tokenizer: Any, max_length: int, name: str):
    from .data import load_local_dataset, prepare_dataset

    raw = load_local_dataset(path)
    prepared, report = prepare_dataset(raw, tokenizer, max_length)
    print(report.summary(name), flush=True)
    return raw, prepared


def _collator(tokenizer: Any, packing: bool):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


def run_train(argv: list[str]) -> int:
    script, config = parse_train_args(argv)
    from .trainer import DFTTrainer

    final_dir = Path(config.output_dir)
    if final_dir.exists() and any(final_dir.iterdir()) and not script.overwrite:
        raise UsageError(f"output_dir {final_dir} exists and is not empty: choose another or pass --overwrite.")
    model, tokenizer = _load_model_and_tokenizer(script.model)
    data_path = script.data or _asset("arithmetic_train.jsonl")
    train_raw, train_set = _load_prepared(data_path, tokenizer, script.max_length, "train")
    if script.eval_data or script.data is None:
        eval_raw, eval_set = _load_prepared(
            script.eval_data or _asset("arithmetic_test.jsonl"), tokenizer, script.max_length, "eval"
        )
    else:
        split = train_raw.train_test_split(test_size=0.05, seed=config.seed)
        train_raw, eval_raw = split["train"], split["test"]
        from .data import prepare_dataset

        train_set, _ = prepare_dataset(train_raw, tokenizer, script.max_length)
        eval_set, _ = prepare_dataset(eval_raw, tokenizer, script.max_length)

    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        config.output_dir = str(tmp)
        print(
            f"training with loss_type={config.loss_type} (alpha={config.dft_alpha}, beta={config.dft_beta}, "
            f"warm-up ratio {config.dft_warmup_ratio}) for {config.max_steps} steps",
            flush=True,
        )
        ref_model = None
        if config.effective_kl_coef() > 0:  # ASFT: the reference is a frozen copy of the starting model
            ref_model, _ = _load_model_and_tokenizer(script.model)
        trainer = DFTTrainer(
            ref_model=ref_model,
            model=model,
            args=config,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=_collator(tokenizer, script.packing),
            processing_class=tokenizer,
        )
        trainer.train()
        metrics = trainer.evaluate()
        metrics["eval_exact_match"] = exact_match(trainer.model, tokenizer, eval_raw, script.max_eval_examples)
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_metrics(tmp, trainer.state.log_history, metrics)
        plot_history(tmp, trainer.state.log_history)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print("\n" + format_table({k: v for k, v in metrics.items() if k.startswith("eval_")}))
    print(f"\nwrote {final_dir}/: model + tokenizer, metrics.json, metrics.csv, training.png")
    return 0


def run_eval(argv: list[str]) -> int:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(EvalScriptArguments, prog="dft eval").parse_args_into_dataclasses(args=argv)
    model, tokenizer = _load_model_and_tokenizer(args.model)
    raw, prepared = _load_prepared(args.data, tokenizer, args.max_length, "eval")
    metrics: dict[str, Any] = {f"eval_{k}": v for k, v in token_ce(model, tokenizer, prepared, args.batch_size).items()}
    metrics["eval_exact_match"] = exact_match(model, tokenizer, raw, args.max_eval_examples, args.max_new_tokens)
    metrics["num_examples"] = len(prepared)
    print(format_table(metrics))
    out = Path(args.output) if args.output else Path(args.model) / "eval_results.json"
    out.write_text(json.dumps(metrics, indent=1))
    print(f"\nwrote {out}")
    return 0


USAGE = "usage: dft {train,eval} [flags]   (dft train --help, dft eval --help)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help"):
        print(USAGE)
        return 0
    from .data import DataError

    try:
        if command == "train":
            return run_train(rest)
        if command == "eval":
            return run_eval(rest)
        raise UsageError(f"unknown command {command!r}. {USAGE}")
    except (UsageError, DataError) as e:
        print(f"dft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
