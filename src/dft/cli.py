"""The ``dft`` command: ``dft train`` (DFT fine-tuning) and ``dft eval``. Parsing and dispatch only.

    dft train                                   # built-in toy recipe: tiny Llama + shipped arithmetic, CPU, ~3 min
    dft train --model ./my-llama --data train.jsonl --loss dft --learning_rate 1e-5 --output_dir out
    dft train --model M --data D --lora_r 16 --torch_dtype bfloat16 --bf16 true
    dft train --config run.yaml                 # any flag below, as a YAML/JSON mapping (command line wins)
    dft train ... --resume_from_checkpoint true # continue from the latest checkpoint in output_dir
    dft eval --model out [--data test.jsonl] [--output_dir results]

Flags come from ``TrainScriptArguments`` and [`dft.DFTConfig`][dft.trainer.DFTConfig] (every ``TrainingArguments``
flag works, with its own default). The toy recipe's settings apply only when neither ``--model``
nor ``--data`` is given (or with ``--recipe toy``). Bad input prints one line and exits with status 2;
Ctrl-C / SIGTERM stop after the current step, keep the checkpoints and exit 130 / 143.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .evaluation import exact_match, token_ce
from .reporting import format_table, plot_history, write_metrics

__all__ = ["EvalScriptArguments", "InspectScriptArguments", "TrainScriptArguments", "main"]

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
    loss: str | None = field(
        default=None,
        metadata={"help": "Shortcut for --loss_type: dft, sft, asft (DFT + KL to the initial model) or eaft."},
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


@dataclass
class EvalScriptArguments:
    model: str = field(metadata={"help": "Model folder (with its tokenizer), e.g. a `dft train` output_dir."})
    data: str | None = field(
        default=None, metadata={"help": "Data file or save_to_disk folder. Default: the shipped arithmetic test split."}
    )
    max_length: int = field(default=128, metadata={"help": "Truncate examples to this many tokens."})
    max_eval_examples: int = field(default=100, metadata={"help": "Examples for the exact match (as dft train)."})
    batch_size: int = field(default=32, metadata={"help": "Batch size for the CE pass."})
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy generation length."})
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Write eval_results.json and predictions.jsonl here (default: MODEL/eval for a local model)."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own code."})


@dataclass
class InspectScriptArguments:
    model: str | None = field(
        default=None, metadata={"help": "Model folder or hub id (as dft train). Default: the built-in tiny Llama."}
    )
    data: str | None = field(
        default=None, metadata={"help": "Data file or save_to_disk folder (as dft train). Default: shipped arithmetic."}
    )
    max_examples: int = field(default=1000, metadata={"help": "Examples to read (the first N)."})
    max_length: int = field(default=128, metadata={"help": "Truncate examples to this many tokens (as dft train)."})
    batch_size: int = field(default=16, metadata={"help": "Examples per forward pass."})
    output_dir: str = field(default="dft-inspect", metadata={"help": "Where inspect.json and inspect.png go."})
    torch_dtype: str = field(default="float32", metadata={"help": "Load dtype: float32, bfloat16, float16 or auto."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own code."})


class UsageError(Exception):
    """Bad input: one message, exit status 2."""


class Interrupted(Exception):
    """SIGINT / SIGTERM: one line, exit 128 + signal number."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message)
        self.signum = signum


def _one_line(text: object) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()[:500]


def _asset(name: str) -> str:
    return str(resources.files("dft") / "assets" / name)


def _parser(dataclasses: tuple, prog: str, epilog: str | None = None):
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str) -> None:  # argparse would print 100+ lines of usage first
            unknown = message.split("unrecognized arguments:", 1)[1].split() if "unrecognized" in message else []
            raise UsageError(f"{message}{_did_you_mean(self, unknown)} (see '{prog} --help')")

    # allow_abbrev=False: argparse would take --learning_rat as --learning_rate without a word
    return Parser(dataclasses, prog=prog, epilog=epilog, allow_abbrev=False)


TRL_FLAGS = {
    "--model_name_or_path": "use --model (a save_pretrained folder or a hub id)",
    "--dataset_name": "use --data (a local .jsonl/.json/.parquet/.csv file or a save_to_disk folder; for a hub "
    "data set: datasets.load_dataset(name, split='train').save_to_disk(folder), then --data folder)",
    "--dataset_config": "--data takes one local file or folder (see --data)",
    "--dataset_train_split": "--data is the training data; --eval_data or --eval_fraction the held-out part",
    "--dataset_test_split": "use --eval_data (or --eval_fraction of --data)",
    "--dataset_text_field": "a 'text' column trains on every token; prompt/completion and messages are detected",
    "--completion_only_loss": "already how the CLI trains: prompt/completion rows train on the completion only "
    "(for loss on every token, give a 'text' column)",
    "--assistant_only_loss": "already how the CLI trains: 'messages' rows train on the assistant turns only",
    "--use_peft": "use --lora_r R (with --lora_alpha, --lora_dropout, --lora_target_modules)",
    "--max_seq_length": "use --max_length",
    "--dtype": "use --torch_dtype",
    "--lora_rank": "use --lora_r",
}
"""TRL ``sft.py`` flags (and a few other trainers' names) the CLI spells differently, or that name what it
already does."""


def _refuse_trl_flags(flags: list[str], parser: Any, prog: str) -> None:
    """TRL's names for what the CLI spells otherwise (or already does): one line pointing to the CLI's way,
    before parsing (argparse would first complain about a required --model, or say only "unknown")."""
    names = [a.split("=", 1)[0] for a in flags if a.startswith("--")]
    found = [n for n in dict.fromkeys(names) if n in TRL_FLAGS and n not in parser._option_string_actions]
    if found:
        hints = "; ".join(f"{flag}: {TRL_FLAGS[flag]}" for flag in found)
        raise UsageError(f"unknown flag(s) {found} (TRL's or another trainer's names): {hints}; see '{prog} --help'.")


def parse_command(parser: Any, argv: list[str], prog: str) -> Any:
    """The one dataclass of ``dft eval`` / ``inspect`` / ``sample``: TRL's flag names and unknown flags are one
    line (with a did-you-mean), never HfArgumentParser's traceback."""
    _refuse_trl_flags(argv, parser, prog)
    try:
        args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except (ValueError, ImportError) as e:  # a dataclass's own validation
        raise UsageError(_one_line(e)) from None
    if unknown:
        raise UsageError(
            f"unknown flag(s) {unknown}{_did_you_mean(parser, unknown)}; see '{prog} --help' for the flags."
        )
    return args


def _did_you_mean(parser: Any, unknown: list[str]) -> str:
    """``"; did you mean --learning_rate?"`` for flags close to a real one, else ``""``."""
    import difflib

    options = [o for o in parser._option_string_actions if o.startswith("--")]
    hints = []
    for flag in unknown:
        if flag.startswith("--"):
            close = difflib.get_close_matches(flag.split("=", 1)[0], options, n=1, cutoff=0.75)
            hints += [f"{flag.split('=', 1)[0]} -> {close[0]}"] if close else []
    return f"; did you mean {', '.join(hints)}?" if hints else ""


# ---- dft train: arguments ------------------------------------------------------------------------


def _flags_from_file(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {path}")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise UsageError(
            f"{path} is not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {_one_line(e)}"
        ) from None
    if not isinstance(values, dict):
        raise UsageError(f"{path} must hold a mapping of flag names to values, got {type(values).__name__}.")
    flags: list[str] = []
    for key, value in values.items():
        flags += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return flags


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def _train_epilog() -> str:
    toy = " ".join(f"--{k} {v}" for k, v in TOY_RECIPE.items())
    return (
        "With neither --model nor --data (or with --recipe toy) the built-in recipe sets: "
        f"{toy}. Otherwise every default is the one shown above (TrainingArguments'); the GPU is used when present."
    )


def parse_train_args(argv: list[str]) -> tuple[TrainScriptArguments, Any, bool]:
    """``(script, config, toy)``: the parsed flags and whether the toy recipe applies."""
    from .trainer import PRESET_IGNORES, DFTConfig

    config_path, argv = _split_config(argv)
    file_flags = _renamed_flags(_flags_from_file(config_path) if config_path else [], DFTConfig)
    argv = _renamed_flags(argv, DFTConfig)
    parser = _parser((TrainScriptArguments, DFTConfig), "dft train", _train_epilog())
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        raise SystemExit(0)
    _refuse_trl_flags(file_flags + argv, parser, "dft train")
    given = {a.split("=", 1)[0][2:] for a in file_flags + argv if a.startswith("--")}
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
    try:
        script, first, _ = parser.parse_args_into_dataclasses(
            args=cpu + file_flags + argv + ["--output_dir", DEFAULT_OUTPUT_DIR], return_remaining_strings=True
        )
    except (ValueError, ImportError) as e:  # DFTConfig / TrainingArguments validation
        raise UsageError(_one_line(e)) from None
    if script.recipe not in ("auto", "toy", "none"):
        raise UsageError(f"--recipe must be auto, toy or none; got {script.recipe!r}.")
    toy = script.recipe == "toy" or (script.recipe == "auto" and script.model is None and script.data is None)
    loss_type = script.loss if script.loss in PRESET_IGNORES else first.loss_type
    recipe = {k: v for k, v in TOY_RECIPE.items() if k not in PRESET_IGNORES[loss_type]}  # e.g. sft: no CE ramp
    defaults = [x for k, v in recipe.items() for x in (f"--{k}", v)] if toy else []
    defaults += ["--output_dir", DEFAULT_OUTPUT_DIR, *cpu]
    try:
        script, config, unknown = parser.parse_args_into_dataclasses(
            args=defaults + file_flags + argv, return_remaining_strings=True
        )
    except (ValueError, ImportError) as e:  # DFTConfig / TrainingArguments validation
        raise UsageError(_one_line(e)) from None
    if unknown:
        raise UsageError(
            f"unknown flag(s) {unknown}{_did_you_mean(parser, unknown)}; see 'dft train --help' for the flags."
        )
    if script.loss is not None:
        if script.loss not in ("dft", "sft", "asft", "eaft"):
            raise UsageError(f"--loss must be one of dft, sft, asft, eaft; got {script.loss!r}.")
        config.loss_type = script.loss
        try:
            config.validate_dft_arguments()
        except ValueError as e:
            raise UsageError(_one_line(e)) from None
    if not 0.0 < script.eval_fraction < 1.0:
        raise UsageError(f"--eval_fraction must be in (0, 1), got {script.eval_fraction}.")
    _check_numbers(script, config)
    _check_reporting(config)
    _check_packages(script, config)
    if script.merge_lora and script.lora_r <= 0:
        raise UsageError("--merge_lora true needs --lora_r > 0: there is no adapter to merge.")
    _refuse_every_sample(script.data)
    script.given_flags = given  # which flags the user set (the rest may be adapted to the run's length)
    script.cpu_ddp = cpu_ddp  # use_cpu was set for the launcher's processes (said in the start line)
    return script, config, toy


def _flag_value(flags: list[str], name: str) -> str | None:
    """The last value given to ``--name`` (``--name v``, ``--name=v``; a bare boolean flag is "true")."""
    value = None
    for i, flag in enumerate(flags):
        key, eq, rest = flag.partition("=")
        if key == f"--{name}":
            following = flags[i + 1] if i + 1 < len(flags) else None
            value = rest if eq else following if following and not following.startswith("--") else "true"
    return value.lower() if value is not None else None


def _world_size() -> int:
    """Processes of this job, as torchrun / accelerate launch / mpirun set it (1 for a plain run)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _is_main() -> bool:
    """The process that prints and writes the CLI's outputs (global rank 0; the only one of a plain run)."""
    return _rank() == 0


def say(*args: Any) -> None:
    """``print`` on the main process only (every rank runs the same CLI code)."""
    if _is_main():
        print(*args, flush=True)


def _has_accelerator() -> bool:
    """A GPU or another device TrainingArguments would train on (CUDA, ROCm, XPU, MPS, NPU, HPU, XLA...)."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if (accelerator is not None and accelerator.is_available()) or torch.cuda.is_available():
        return True
    from transformers.utils import is_torch_npu_available, is_torch_xla_available

    return is_torch_xla_available() or is_torch_npu_available()


_RENAMED = {"gradient_checkpointing": "activation_checkpointing"}
"""TrainingArguments flags renamed by transformers 5 (the old name still works, with a FutureWarning)."""


def _renamed_flags(flags: list[str], config_class: type) -> list[str]:
    """The flags users know (``--gradient_checkpointing``) under the current name where this transformers
    has one, so that neither the flag nor the kwargs DFTConfig fills in for it warn."""
    from dataclasses import fields

    names = {f.name for f in fields(config_class)}
    out = []
    for flag in flags:
        key, eq, value = flag.partition("=")
        for old, new in _RENAMED.items():
            for suffix in ("", "_kwargs"):
                if key == f"--{old}{suffix}" and f"{new}{suffix}" in names:
                    key = f"--{new}{suffix}"
        out.append(key + eq + value)
    return out


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


SAMPLE_ROW_KEYS = frozenset({"reward", "accepted", "sample_index"})
"""The columns by which ``dft sample``'s ``samples.jsonl`` (every sample, rejected ones too) is recognised."""


def _refuse_every_sample(data: str | None) -> None:
    """``--data S/samples.jsonl`` would train on the rejected samples as well: one line pointing to
    ``accepted.jsonl`` (reads the first line only)."""
    if not data or not str(data).endswith(".jsonl"):
        return
    from .data import first_jsonl_row

    if SAMPLE_ROW_KEYS <= (first_jsonl_row(data) or {}).keys():
        raise UsageError(
            f"--data {data} is dft sample's samples.jsonl: every sample, the rejected ones too (rewards below the "
            f"threshold); train on {Path(data).with_name('accepted.jsonl')}, or drop the reward/accepted columns "
            "to train on every sample."
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


def check_writable(out: Path, flag: str = "--output_dir") -> None:
    """``out`` (or, when it does not exist yet, the folder it would be created in) accepts files: a probe
    file is created and removed. Nothing is left behind; a read-only place fails now, not after training."""
    target = out
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise UsageError(f"{flag} {out}: {target} is a file, not a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dft-write-probe-", dir=target)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {out} is not writable ({e.strerror} in {target}): choose another {flag}.") from None


def _check_reporting(config: Any) -> None:
    """``--report_to X`` for an integration that is not installed: one line now, not a traceback later."""
    from transformers.integrations import get_available_reporting_integrations

    wanted = [r for r in (config.report_to or []) if r not in ("none", "all")]
    missing = sorted(set(wanted) - set(get_available_reporting_integrations()))
    if missing:
        raise UsageError(
            f"--report_to {','.join(missing)}: not installed (pip install {' '.join(missing)}), "
            "or use --report_to none."
        )


# ---- dft train: model and data -------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


SHIPPED_TRAIN = "shipped arithmetic_train.jsonl"
TOY_MODEL = "built-in tiny Llama (dft.toy)"
"""How run_config.json names the model of a run without --model (rebuilt by ``_toy_model``)."""


def _toy_model() -> Any:
    from .toy import toy_model

    return toy_model(hidden_size=64, num_layers=2)  # seeded: the same weights every time


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _run_record(folder: Path) -> dict[str, Any] | None:
    """The ``dft train`` record of a folder: ``run_config.json`` (a finished run), or ``dft_run.json`` (written
    into each checkpoint); None when there is neither."""
    for name in ("run_config.json", RUN_RECORD):
        try:
            return json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
    return None


def _load_adapter(script: Any, folder: Path) -> tuple[Any, Any]:
    """A LoRA adapter folder (``adapter_config.json``, as ``dft train --lora_r`` writes): its base model
    (``base_model_name_or_path``; the built-in model for a run without --model) with the adapter on it,
    and the folder's tokenizer (else the base's)."""
    from dataclasses import replace

    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except ValueError as e:
        raise UsageError(f"--model {folder}: adapter_config.json is not valid JSON ({_one_line(e)}).") from None
    try:
        import peft
    except ImportError:
        raise UsageError(
            f"--model {folder} is a LoRA adapter: loading it needs peft: pip install 'dft-loss[peft]'."
        ) from None
    base = config.get("base_model_name_or_path") or None
    # the adapter/ of a --merge_lora run: the run's record is in the folder above
    record = _run_record(folder) or (_run_record(folder.parent) if folder.name == "adapter" else None) or {}
    if base is None and record.get("model") != TOY_MODEL:
        raise UsageError(
            f"--model {folder} is a LoRA adapter whose adapter_config.json names no base model "
            "(base_model_name_or_path): set it to the base model's folder or hub id."
        )
    if base is not None and base.startswith((".", "/", "~")) and not Path(base).expanduser().is_dir():
        raise UsageError(
            f"--model {folder} is a LoRA adapter on {base}, which is not found from {Path.cwd()}: run from where "
            "it was trained, or set base_model_name_or_path in its adapter_config.json."
        )
    if base is None:
        from .toy import toy_tokenizer

        model, tokenizer = _toy_model(), toy_tokenizer()
    else:
        model, tokenizer = _load_model_and_tokenizer(replace(script, model=base), need_tokenizer=False)
    if _has_tokenizer(folder):
        tokenizer = _load_tokenizer(str(folder), script.trust_remote_code)
    elif tokenizer is None:
        raise UsageError(f"--model {folder}: neither the adapter folder nor its base {base} has a tokenizer.")
    try:
        with _peft_quietly():
            model = peft.PeftModel.from_pretrained(model, str(folder))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"cannot load the LoRA adapter {folder} on {base or TOY_MODEL}: {_one_line(e)}") from None
    return model, tokenizer


def _load_tokenizer(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model_and_tokenizer(script: Any, need_tokenizer: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``--model``: a save_pretrained folder, a LoRA adapter folder (on its base),
    a hub id, or the built-in tiny Llama. Bad paths are a ``UsageError``, before anything loads."""
    import torch
    from transformers import AutoModelForCausalLM

    path = script.model
    if path is None:
        from .toy import toy_tokenizer

        return _toy_model(), toy_tokenizer()
    local = Path(path)
    if local.exists() and not local.is_dir():
        raise UsageError(f"--model {path} is a file; give the folder written by save_pretrained (or a hub id).")
    if local.is_dir() and not (local / "config.json").is_file() and (local / "adapter_config.json").is_file():
        return _load_adapter(script, local)
    if local.is_dir() and not (local / "config.json").is_file():
        raise UsageError(
            f"--model {path} has no config.json (nor adapter_config.json: the folder is not a saved model): "
            "save the model there with model.save_pretrained(folder)."
        )
    if need_tokenizer and local.is_dir() and not _has_tokenizer(local):
        raise UsageError(
            f"--model {path} has no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}, ...): save it there "
            "with tokenizer.save_pretrained(folder)."
        )
    if not local.is_dir() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise UsageError(f"model path not found: {path} (a local folder written by save_pretrained, or a hub id).")
    if not local.is_dir():
        _check_hub(path)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if script.torch_dtype not in dtypes:
        raise UsageError(f"--torch_dtype must be one of {sorted(dtypes)}, got {script.torch_dtype!r}.")
    kwargs: dict[str, Any] = {"dtype": dtypes[script.torch_dtype], "trust_remote_code": script.trust_remote_code}
    if script.attn_implementation:
        kwargs["attn_implementation"] = script.attn_implementation
    try:
        tokenizer = None
        if need_tokenizer or not local.is_dir() or _has_tokenizer(local):
            tokenizer = _load_tokenizer(path, script.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        where = "folder" if local.is_dir() else "hub id"
        raise UsageError(f"cannot load a causal LM and its tokenizer from {where} {path}: {_one_line(e)}") from None
    return model, tokenizer


def _check_hub(repo_id: str, timeout: float = 5.0) -> None:
    """A hub id that is not in the local cache needs the Hub: say so at once when it cannot be reached
    (huggingface_hub would retry for about a minute, then print two dozen lines)."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return  # in the cache: from_pretrained can load it
    except Exception:  # an id huggingface_hub refuses: from_pretrained will say why
        return
    if constants.HF_HUB_OFFLINE:
        reason = "it is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    else:
        url = urlparse(constants.ENDPOINT)
        error: list[str] = [f"no answer within {timeout:g}s"]

        def probe() -> None:
            try:
                socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
                error.clear()
            except OSError as e:
                error[:] = [e.strerror or type(e).__name__]

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout + 1)  # name resolution is not covered by the socket timeout
        if not error:
            return
        reason = f"it is not in the Hugging Face cache and {constants.ENDPOINT} cannot be reached ({error[0]})"
    raise UsageError(
        f"--model {repo_id}: not a local folder, so a hub id, but {reason}: give a folder written by "
        "save_pretrained, or download the model where the Hub is reachable."
    )


def _apply_lora(model: Any, script: Any) -> Any:
    if script.lora_r <= 0:
        return model
    try:
        import peft
    except ImportError:
        raise UsageError("--lora_r needs peft: pip install 'dft-loss[peft]'.") from None
    targets = script.lora_target_modules
    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = peft.LoraConfig(
        r=script.lora_r,
        lora_alpha=script.lora_alpha,
        lora_dropout=script.lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        with _peft_quietly():
            model = peft.get_peft_model(model, config)
    except ValueError as e:
        raise UsageError(f"--lora_target_modules {targets}: {_one_line(e)}") from None
    # the adapter's base as a path that works from anywhere (peft stores the --model string as given);
    # empty for the built-in model, which dft eval / inspect rebuild from the run's record
    model.peft_config["default"].base_model_name_or_path = _where(script.model) or None
    return model


@contextlib.contextmanager
def _peft_quietly() -> Iterator[None]:
    """peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning
    nobody running the CLI can act on: hidden around peft's calls (every other warning stays)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _where(path: str | None) -> str | None:
    """A local path made absolute (so that a record or an adapter works from another folder); else as given."""
    if path and Path(path).expanduser().exists():
        return str(Path(path).expanduser().resolve())
    return path


def _prepare(raw: Any, tokenizer: Any, max_length: int, name: str):
    from .data import prepare_dataset

    prepared, report = prepare_dataset(raw, tokenizer, max_length)
    say(report.summary(name))
    return prepared


def _load_data(script: Any, tokenizer: Any, seed: int) -> tuple[Any, Any, Any, str]:
    """``(train_set, eval_raw, eval_set, how the eval split was made)``."""
    from .data import load_local_dataset

    train_raw = load_local_dataset(script.data or _asset("arithmetic_train.jsonl"))
    if script.eval_data or script.data is None:
        eval_raw = load_local_dataset(script.eval_data or _asset("arithmetic_test.jsonl"))
        how = "--eval_data" if script.eval_data else "the shipped test split"
    else:
        if len(train_raw) < 2:
            raise UsageError(
                f"--data {script.data} has {len(train_raw)} example: too few to hold out an eval split; "
                "add examples or give --eval_data."
            )
        split = train_raw.train_test_split(test_size=script.eval_fraction, seed=seed)
        train_raw, eval_raw = split["train"], split["test"]
        how = f"{script.eval_fraction:.0%} of --data held out (seed {seed})"
    train_set = _prepare(train_raw, tokenizer, script.max_length, "train")
    eval_set = _prepare(eval_raw, tokenizer, script.max_length, "eval")
    say(f"split: {len(train_set)} train / {len(eval_set)} eval examples ({how})")
    return train_set, eval_raw, eval_set, how


# ---- dft train: run ------------------------------------------------------------------------------


def _describe_loss(config: Any) -> str:
    """Only what applies to this loss type."""
    kind = config.loss_type
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


def _run_config(script: Any, config: Any, toy: bool, sizes: dict[str, Any]) -> dict[str, Any]:
    from . import __version__

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


RUN_RECORD = "dft_run.json"
"""Written into every checkpoint: the run's settings, which a resumed run must match."""

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


def _publish(staging: Path, out: Path) -> None:
    """Move every final artefact into ``out``, each with an atomic rename; metrics.json last (it marks done)."""
    names = sorted(p.name for p in staging.iterdir())
    for name in sorted(names, key=lambda n: n == "metrics.json"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)


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
    model, tokenizer = _load_model_and_tokenizer(script)
    with config.main_process_first(desc="dft: data preparation"):  # the main process fills the datasets cache
        train_set, eval_raw, eval_set, how = _load_data(script, tokenizer, config.seed)
    ref_model = None
    if config.effective_kl_coef() > 0 and script.lora_r <= 0:  # ASFT: a frozen copy of the starting model
        ref_model, _ = _load_model_and_tokenizer(script)
    if script.lora_r > 0:  # the adapter's initial weights come from the run's seed (Trainer seeds later)
        from transformers import set_seed

        set_seed(config.seed)
    model = _apply_lora(model, script)
    from .data import collator
    from .trainer import DFTTrainer

    if script.overwrite and out.exists() and not resume and main:
        shutil.rmtree(out)
    _wait_for_everyone(config)
    record = _run_config(script, config, toy, {})
    stop = _SignalStop(out)
    with stop:
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
        total, per_epoch = _schedule(trainer)
        if "logging_steps" not in script.given_flags and not toy:  # a 15-step run logs more than once
            trainer.args.logging_steps = max(1, min(trainer.args.logging_steps, -(-total // 20)))
        epochs = total / per_epoch
        device = f"{trainer.args.device}"
        if script.cpu_ddp:
            device += " (no GPU found: --use_cpu true, so the processes train as one DDP job over gloo)"
        say(
            f"training {_describe_loss(config)} for {total} step{'s' if total != 1 else ''} ({epochs:.3g} epochs of {per_epoch} steps, "
            f"{len(train_set)} examples, batch {trainer.args.per_device_train_batch_size} x "
            f"{trainer.args.gradient_accumulation_steps} accumulation x {trainer.args.world_size} processes) "
            f"at lr {config.learning_rate:g} on {device}, logging every "
            f"{trainer.args.logging_steps} steps" + (f", resuming from {resume}" if resume else "")
        )
        stop.training = True
        try:
            trainer.train(resume_from_checkpoint=resume)
        except ValueError as e:  # the optimizer state of another model (a guard above missed it)
            if not (resume and "state dict" in str(e)):
                raise
            raise UsageError(f"--resume_from_checkpoint {resume}: cannot load its state: {_one_line(e)}") from None
        stop.training = False
        if stop.signum is not None:
            raise Interrupted(stop.signum, str(out))
        metrics = trainer.evaluate()  # every rank: Trainer shards the eval set and gathers the sums
        match = _exact_match_on_ranks(trainer, tokenizer, eval_raw, script.max_eval_examples)
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
        print("\n" + format_table({k: v for k, v in metrics.items() if k.startswith("eval_")}))
        if match.note:
            print(f"exact match: {match.note}")
        print(f"\nwrote {out}/: {written}, run_config.json, metrics.json, metrics.csv, training.png", flush=True)
    _exit_without_gloo_teardown()
    return 0


def _exit_without_gloo_teardown() -> None:
    """A finished run over gloo (every rank past the last barrier, every file closed): run the exit hooks
    (report_to integrations), then leave without the interpreter's teardown, where torch 2.13's gloo
    backend now and then aborts a rank (a still-joinable thread at exit: SIGABRT), which torchrun would
    report as a failed job although every file is written (tests/dist/__init__.py has the details)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"):
        return
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _wait_for_everyone(config: Any) -> None:
    if config.world_size > 1:
        config.distributed_state.wait_for_everyone()


def _quiet_progress_bars() -> None:
    """Non-main ranks: no second copy of the loading / saving progress bars."""
    import datasets
    from transformers.utils import logging

    logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _exact_match_on_ranks(trainer: Any, tokenizer: Any, raw: Any, limit: int) -> Any:
    """Exact match once per job: the rows spread over the ranks when each holds the whole model (DDP,
    ZeRO-1/2), the same rows on every rank, kept in step, when the engine gathers parameters per module
    (FSDP2, ZeRO-3, tensor parallel)."""
    from .engines import detect_engine

    args = trainer.args
    if args.world_size == 1:
        return exact_match(trainer.model, tokenizer, raw, limit)
    whole = detect_engine(trainer.model_wrapped).name in ("plain", "ddp", "deepspeed")
    if whole:
        return exact_match(trainer.model, tokenizer, raw, limit, rank=args.process_index, world_size=args.world_size)
    return exact_match(trainer.model, tokenizer, raw, limit, synced_gpus=True)


def _exact_match_metrics(match: Any) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "eval_exact_match": match.score,
        "eval_exact_match_examples": len(match.predictions),
    }
    if match.note:
        metrics["eval_exact_match_note"] = match.note
    return metrics


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
        model, _ = _load_model_and_tokenizer(plain, need_tokenizer=False)
    with _peft_quietly():
        merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(staging))
    return f"merged model (LoRA r={script.lora_r} merged into {base}) + tokenizer, the adapter in adapter/"


# ---- dft eval ------------------------------------------------------------------------------------


def run_eval(argv: list[str]) -> int:
    from .data import load_local_dataset

    parser = _parser((EvalScriptArguments,), "dft eval")
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    args = parse_command(parser, argv, "dft eval")
    _single_process("dft eval")
    for name in ("max_eval_examples", "max_new_tokens", "batch_size", "max_length"):
        if getattr(args, name) < 1:  # 0 would score nothing and report exact match None
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.output_dir is None and Path(args.model).is_dir():
        args.output_dir = str(Path(args.model) / "eval")
    if args.output_dir:
        check_writable(Path(args.output_dir))
    script = TrainScriptArguments(model=args.model, trust_remote_code=args.trust_remote_code)
    model, tokenizer = _load_model_and_tokenizer(script)
    if args.data:
        source = _where(args.data)
        print(f"eval data: {source}", flush=True)
    else:
        source = "shipped arithmetic_test.jsonl"
        trained_on = (_run_record(Path(args.model)) or {}).get("data") if Path(args.model).is_dir() else None
        hint = f"; {args.model} was trained on {trained_on}" if trained_on and trained_on != SHIPPED_TRAIN else ""
        print(
            f"eval data: the shipped arithmetic test split (dft's built-in toy task; --data FILE scores your "
            f"own{hint})",
            flush=True,
        )
    raw = load_local_dataset(args.data or _asset("arithmetic_test.jsonl"))
    prepared = _prepare(raw, tokenizer, args.max_length, "eval")
    metrics: dict[str, Any] = {f"eval_{k}": v for k, v in token_ce(model, tokenizer, prepared, args.batch_size).items()}
    match = exact_match(model, tokenizer, raw, args.max_eval_examples, args.max_new_tokens)
    metrics.update(_exact_match_metrics(match))
    metrics["num_examples"] = len(prepared)
    print(format_table({k: v for k, v in metrics.items() if k != "eval_exact_match_note"}))
    if match.note:
        print(f"exact match: {match.note}")
    metrics.update(model=_where(args.model), data=source)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_results.json").write_text(json.dumps(metrics, indent=1))
        (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in match.predictions))
        print(f"\nwrote {out}/eval_results.json and predictions.jsonl")
    return 0


def _single_process(command: str) -> None:
    if _world_size() > 1:
        raise UsageError(
            f"{command} runs in one process (WORLD_SIZE={_world_size()}): run it without torchrun / accelerate "
            "launch; only dft train spreads over processes."
        )


def run_inspect(argv: list[str]) -> int:
    """``dft inspect``: the base model's p on the supervised tokens, and whether DFT fits (dft.prior)."""
    import torch

    from .data import collator, load_local_dataset
    from .prior import inspect_prior
    from .reporting import plot_prior
    from .trainer import ce_token_ids

    parser = _parser((InspectScriptArguments,), "dft inspect")
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    args = parse_command(parser, argv, "dft inspect")
    _single_process("dft inspect")
    for name in ("max_examples", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    out = Path(args.output_dir)
    check_writable(out)
    script = TrainScriptArguments(
        model=args.model, torch_dtype=args.torch_dtype, trust_remote_code=args.trust_remote_code
    )
    model, tokenizer = _load_model_and_tokenizer(script)
    raw = load_local_dataset(args.data or _asset("arithmetic_train.jsonl"))
    raw = raw.select(range(min(args.max_examples, len(raw))))
    prepared = _prepare(raw, tokenizer, args.max_length, "inspect")
    loader = torch.utils.data.DataLoader(prepared, batch_size=args.batch_size, collate_fn=collator(tokenizer))
    special = ce_token_ids("special", tokenizer)  # the ids --dft_ce_tokens special would keep on CE
    report = inspect_prior(model, loader, special_ids=special).as_dict()
    report["model"] = args.model or TOY_MODEL
    report["data"] = args.data or SHIPPED_TRAIN
    out.mkdir(parents=True, exist_ok=True)
    (out / "inspect.json").write_text(json.dumps(report, indent=1))
    plot_prior(out / "inspect.png", report)
    fig = report["frac_below"]
    sp = report["special_tokens"]
    print(
        f"{report['supervised_tokens']} supervised tokens: mean p {report['mean_p']:.3f}, median "
        f"{report['quantiles']['0.5']:.3g}; p < 0.01 for {fig['0.01']:.1%} (DFT keeps under 1% of SFT's update "
        f"there), p < 0.001 for {fig['0.001']:.1%}"
    )
    if sp["supervised_tokens"]:
        print(
            f"special tokens: {sp['supervised_tokens']} targets, mean p {sp['mean_p']:.3g}, "
            f"p < 0.01 for {sp['frac_below']['0.01']:.1%}"
        )
    print(f"recommendation: {report['recommendation']} ({report['reason']})")
    print(f"wrote {out}/inspect.json and inspect.png")
    return 0


USAGE = """usage: dft {train,eval,inspect,sample} [flags]

  dft train [--model M] [--data D] [--loss dft|sft|asft|eaft] [TrainingArguments flags]
            with neither --model nor --data: the built-in toy job (tiny Llama, shipped arithmetic, CPU)
  dft eval --model M [--data D] [--output_dir OUT]
  dft inspect --model M --data D [--max_examples N] [--output_dir OUT]
            should I switch? the model's p on your supervised tokens, and a recommendation
  dft sample --model M --data D --num_samples K --temperature T --verifier exact|math|MODULE:FUNCTION
            generate, verify, keep: samples.jsonl, accepted.jsonl (for dft train --data), summary.json

  dft train --help, dft eval --help, dft sample --help: every flag and its default"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    from .data import DataError

    try:
        if command == "train":
            return run_train(rest)
        if command == "eval":
            return run_eval(rest)
        if command == "inspect":
            return run_inspect(rest)
        if command == "sample":
            from .sample_cli import run_sample

            return run_sample(rest)
        raise UsageError(f"unknown command {command!r}. {USAGE.splitlines()[0]}")
    except (UsageError, DataError) as e:
        if _is_main():  # every rank checks the same input: one line per job, not per process
            print(f"dft: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
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


if __name__ == "__main__":
    sys.exit(main())
