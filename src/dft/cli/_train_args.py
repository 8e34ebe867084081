"""``dft train``'s flags: ``TrainScriptArguments`` plus [`dft.DFTConfig`][dft.trainer.DFTConfig]'s, the toy
recipe, and every check of their values that needs no model and no data, made before Trainer, datasets,
DeepSpeed, accelerate or even ``transformers.training_args`` are imported (the fields are read from its source:
``dft.cli._training_fields``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._nft import SAMPLE_ROW_KEYS
from ._parsing import (
    UsageError,
    _did_you_mean,
    _flag_value,
    _flags_from_file,
    _one_line,
    _parser,
    _refuse_trl_flags,
    _renamed_flags,
    _split_config,
    joined_negative_values,
)
from ._processes import _has_accelerator, _world_size
from ._training_fields import flags_class

__all__ = ["TOY_RECIPE", "TrainScriptArguments", "parse_train_args"]


TOY_RECIPE = {
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
"""The built-in job's settings (a model trained from scratch needs a high lr and a CE -> DFT warm-up)."""


DEFAULT_OUTPUT_DIR = "dft-output"


@dataclass
class TrainScriptArguments:
    """What to train on, and how to load it."""

    model: str | None = field(
        default=None,
        metadata={"help": "Model folder (save_pretrained) or hub id. Default: a tiny Llama built from config."},
    )
    data: str | None = field(
        default=None,
        metadata={"help": "Local .jsonl/.json/.parquet/.csv or save_to_disk folder. Default: shipped arithmetic."},
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "Held-out data; default: the shipped test split, or --eval_fraction of --data."}
    )
    eval_fraction: float = field(default=0.05, metadata={"help": "Share of --data held out when no --eval_data."})
    ref_model: str | None = field(
        default=None,
        metadata={
            "help": "The reference model (folder or hub id): NFT's pi_old when another model sampled, ASFT's anchor. "
            "Default: a frozen copy of --model as training starts (with --lora_r: the base without the adapter)."
        },
    )
    loss: str | None = field(
        default=None,
        metadata={
            "help": "Shortcut for --loss_type: dft, sft, asft (DFT + KL to the initial model), eaft, or nft (dft "
            "sample's samples.jsonl, the rejected samples too)."
        },
    )
    recipe: str = field(
        default="auto",
        metadata={
            "help": "toy: the built-in job's settings; none: TrainingArguments defaults; auto: toy only "
            "when neither --model nor --data is given."
        },
    )
    max_length: int = field(default=128, metadata={"help": "Truncate examples to this many tokens."})
    packing: bool = field(
        default=False, metadata={"help": "Padding-free packing (position_ids; needs an attention that honours them)."}
    )
    max_eval_examples: int = field(default=100, metadata={"help": "Examples for the exact-match evaluation."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing, non-empty output_dir."})
    config: str | None = field(default=None, metadata={"help": "YAML or JSON file of flags (command-line flags win)."})
    torch_dtype: str = field(
        default="float32", metadata={"help": "Load dtype: float32, bfloat16, float16 or auto (the checkpoint's)."}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own code from its folder/hub."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: full fine-tuning). Needs peft."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "Comma-separated module names, or all-linear."}
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "With --lora_r: write the merged model (base + adapter, a plain save_pretrained folder) to "
            "output_dir and the adapter to output_dir/adapter. Without it output_dir holds the adapter, which "
            "dft eval / dft inspect load on its base model."
        },
    )


def _train_epilog() -> str:
    toy = " ".join(f"--{k} {v}" for k, v in TOY_RECIPE.items())
    return (
        "With neither --model nor --data (or with --recipe toy) the built-in recipe sets: "
        f"{toy}. Otherwise every default is the one shown above (TrainingArguments'); the GPU is used when present."
    )


def _parse(parser: Any, args: list[str]) -> tuple[Any, Any, list[str]]:
    try:
        return parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    except (ValueError, ImportError) as e:  # DFTConfig / TrainingArguments validation
        raise UsageError(_one_line(e)) from None


def parse_train_args(argv: list[str]) -> tuple[TrainScriptArguments, Any, bool]:
    """``(script, config, toy)``: the parsed flags and whether the toy recipe applies.

    The flags are parsed and checked first into ``TrainFlags`` (neither transformers.training_args nor Trainer,
    datasets, accelerate or DeepSpeed imported or set up), then once more into the real ``DFTConfig``."""
    from ..arguments import PRESET_IGNORES

    if any(a in ("-h", "--help") for a in argv):  # the imported fields: their help lists the enums' choices
        _parser((TrainScriptArguments, flags_class(read_source=False)), "dft train", _train_epilog()).print_help()
        raise SystemExit(0)
    fields_class = flags_class()
    config_path, argv = _split_config(argv)
    file_flags = _flags_from_file(config_path) if config_path else []
    file_flags = _renamed_flags(joined_negative_values(file_flags), fields_class)
    argv = _renamed_flags(joined_negative_values(argv), fields_class)
    parser = _parser((TrainScriptArguments, fields_class), "dft train", _train_epilog())
    _refuse_trl_flags(file_flags + argv, parser, "dft train")
    given = {a.split("=", 1)[0][2:] for a in file_flags + argv if a.startswith("--")}
    shortcut = _flag_value(file_flags + argv, "loss")
    if shortcut is not None:  # --loss X is --loss_type X: the loss's own flags are checked against it
        if shortcut not in LOSS_SHORTCUTS:
            raise UsageError(f"--loss must be one of {', '.join(LOSS_SHORTCUTS)}; got {shortcut!r}.")
        if "loss_type" not in given:
            argv = [*argv, "--loss_type", shortcut]
    world = _world_size()
    # torchrun / accelerate launch on a machine without an accelerator: without use_cpu, TrainingArguments
    # would make each process a job of its own (all the data, the same output_dir); use_cpu makes it DDP
    cpu_ddp = world > 1 and not ({"deepspeed", "use_cpu"} & given) and not _has_accelerator()
    cpu = ["--use_cpu", "true"] if cpu_ddp else []
    use_cpu = _flag_value(file_flags + argv, "use_cpu")
    use_cpu_env = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if world > 1 and use_cpu in ("false", "0", "no") and not use_cpu_env and "deepspeed" not in given:
        if not _has_accelerator():  # refused before TrainingArguments sets up (and joins) the process group
            raise UsageError(
                f"WORLD_SIZE={world} but no GPU or other accelerator: with --use_cpu false each of the {world} "
                "processes would train alone on all the data; drop --use_cpu false (they then train as one DDP "
                "job over gloo, as with --use_cpu true)."
            )
    # first pass: the script flags decide whether the toy recipe applies
    script, first, _ = _parse(parser, cpu + file_flags + argv + ["--output_dir", DEFAULT_OUTPUT_DIR])
    if script.recipe not in ("auto", "toy", "none"):
        raise UsageError(f"--recipe must be auto, toy or none; got {script.recipe!r}.")
    toy = script.recipe == "toy" or (script.recipe == "auto" and script.model is None and script.data is None)
    loss_type = script.loss if script.loss in PRESET_IGNORES else first.loss_type
    recipe = {k: v for k, v in TOY_RECIPE.items() if k not in PRESET_IGNORES[loss_type]}  # e.g. sft: no CE ramp
    defaults = [x for k, v in recipe.items() for x in (f"--{k}", v)] if toy else []
    defaults += ["--output_dir", DEFAULT_OUTPUT_DIR, *cpu]
    script, flags, unknown = _parse(parser, defaults + file_flags + argv)
    if unknown:
        raise UsageError(
            f"unknown flag(s) {unknown}{_did_you_mean(parser, unknown)}; see 'dft train --help' for the flags."
        )
    if script.loss is not None:
        flags.loss_type = script.loss
        try:
            flags.validate_dft_arguments()
        except ValueError as e:
            raise UsageError(_one_line(e)) from None
    if not 0.0 < script.eval_fraction < 1.0:
        raise UsageError(f"--eval_fraction must be in (0, 1), got {script.eval_fraction}.")
    _check_numbers(script, flags)
    _check_reporting(flags)
    _check_packages(script, flags)
    if script.merge_lora and script.lora_r <= 0:
        raise UsageError("--merge_lora true needs --lora_r > 0: there is no adapter to merge.")
    # every flag is good: the real DFTConfig (TrainingArguments' own checks; it sets up the device)
    from ..trainer import DFTConfig

    script, config, _ = _parse(_parser((TrainScriptArguments, DFTConfig), "dft train"), defaults + file_flags + argv)
    if script.loss is not None:
        config.loss_type = script.loss
    script.sampling = None  # dft sample's record of the samples (--loss nft)
    script.loss_type_is_nft = config.loss_type == "nft"
    if script.ref_model is not None and not (config.loss_type == "nft" or config.effective_kl_coef() > 0):
        raise UsageError("--ref_model is the reference of --loss nft (pi_old) or asft (the anchor); this run has none.")
    if config.loss_type == "nft":
        from ._nft import check_nft_data

        script.sampling = check_nft_data(script, config)
    else:
        _refuse_every_sample(script.data)
    script.given_flags = given  # which flags the user set (the rest may be adapted to the run's length)
    script.cpu_ddp = cpu_ddp  # use_cpu was set for the launcher's processes (said in the start line)
    return script, config, toy


LOSS_SHORTCUTS = ("dft", "sft", "asft", "eaft", "nft")
"""The values of ``--loss`` (a shortcut for ``--loss_type``)."""

OPTIONAL_PACKAGES = (
    ("peft", "--lora_r", "pip install 'dft-loss[peft]'", lambda script, config: script.lora_r > 0),
    ("liger_kernel", "--use_liger_kernel true", "pip install liger-kernel", lambda s, c: c.use_liger_kernel),
)
"""``(module, flag, how to install, whether the run needs it)``: checked before anything loads."""


def _check_packages(script: Any, config: Any) -> None:
    import importlib.util

    for module, flag, install, needed in OPTIONAL_PACKAGES:
        if needed(script, config) and importlib.util.find_spec(module) is None:
            raise UsageError(f"{flag} needs {module.replace('_', '-')}, which is not installed: {install}.")


def _refuse_every_sample(data: str | None) -> None:
    """``--data S/samples.jsonl`` would train on the rejected samples as well: one line pointing to
    ``accepted.jsonl`` (reads the first line only)."""
    if not data or not str(data).endswith(".jsonl"):
        return
    from ..data import first_jsonl_row

    if SAMPLE_ROW_KEYS <= (first_jsonl_row(data) or {}).keys():
        raise UsageError(
            f"--data {data} is dft sample's samples.jsonl: every sample, the rejected ones too (rewards below the "
            f"threshold); train on {Path(data).with_name('accepted.jsonl')}, or learn from the rejected samples too "
            "with --loss nft."
        )


def _check_numbers(script: Any, config: Any) -> None:
    """Values TrainingArguments accepts but that fail (or silently do nothing) later: one line now."""
    rules = [
        ("learning_rate", config.learning_rate > 0, "> 0"),
        ("per_device_train_batch_size", config.per_device_train_batch_size >= 1, ">= 1"),
        ("per_device_eval_batch_size", config.per_device_eval_batch_size >= 1, ">= 1"),
        ("gradient_accumulation_steps", config.gradient_accumulation_steps >= 1, ">= 1"),
        ("max_steps", config.max_steps == -1 or config.max_steps > 0, "> 0, or -1 to train --num_train_epochs"),
        ("num_train_epochs", config.max_steps > 0 or config.num_train_epochs > 0, "> 0 (or give --max_steps)"),
        ("logging_steps", config.logging_steps > 0, "> 0"),
        ("max_length", script.max_length >= 2, ">= 2"),
        ("max_eval_examples", script.max_eval_examples >= 0, ">= 0"),
        ("lora_r", script.lora_r >= 0, ">= 0 (0: full fine-tuning)"),
    ]
    for name, ok, rule in rules:
        if not ok:
            value = getattr(config, name, getattr(script, name, None))
            raise UsageError(
                f"--{name} must be {rule}, got {value:g}."
                if isinstance(value, float)
                else f"--{name} must be {rule}, got {value}."
            )


def _check_reporting(config: Any) -> None:
    """``--report_to X`` for an integration that is not installed: one line now, not a traceback later."""
    given = [config.report_to] if isinstance(config.report_to, str) else config.report_to or []  # as parsed
    wanted = [r for r in given if r not in ("none", "all")]
    if not wanted:
        return
    from transformers.integrations import get_available_reporting_integrations

    missing = sorted(set(wanted) - set(get_available_reporting_integrations()))
    if missing:
        raise UsageError(
            f"--report_to {','.join(missing)}: not installed (pip install {' '.join(missing)}), "
            "or use --report_to none."
        )
