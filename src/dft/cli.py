"""The ``dft`` command: ``dft train`` (DFT fine-tuning) and ``dft eval``. Parsing and dispatch only.

    dft train                                   # built-in toy recipe: tiny Llama + shipped arithmetic, CPU, ~3 min
    dft train --model ./my-llama --data train.jsonl --loss dft --learning_rate 1e-5 --output_dir out
    dft train --model M --data D --lora_r 16 --torch_dtype bfloat16 --bf16 true
    dft train --config run.yaml                 # any flag below, as a YAML/JSON mapping (command line wins)
    dft train ... --resume_from_checkpoint true # continue from the latest checkpoint in output_dir
    dft eval --model out [--data test.jsonl] [--output_dir results]

Flags come from :class:`TrainScriptArguments` and :class:`dft.DFTConfig` (every ``TrainingArguments``
flag works, with its own default). The toy recipe's settings apply only when neither ``--model``
nor ``--data`` is given (or with ``--recipe toy``). Bad input prints one line and exits with status 2;
Ctrl-C / SIGTERM stop after the current step, keep the checkpoints and exit 130 / 143.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
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
    from .trainer import DFTConfig

    config_path, argv = _split_config(argv)
    file_flags = _flags_from_file(config_path) if config_path else []
    parser = _parser((TrainScriptArguments, DFTConfig), "dft train", _train_epilog())
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        raise SystemExit(0)
    # first pass: the script flags decide whether the toy recipe applies
    try:
        script = parser.parse_args_into_dataclasses(
            args=file_flags + argv + ["--output_dir", DEFAULT_OUTPUT_DIR], return_remaining_strings=True
        )[0]
    except (ValueError, ImportError) as e:  # DFTConfig / TrainingArguments validation
        raise UsageError(_one_line(e)) from None
    if script.recipe not in ("auto", "toy", "none"):
        raise UsageError(f"--recipe must be auto, toy or none; got {script.recipe!r}.")
    toy = script.recipe == "toy" or (script.recipe == "auto" and script.model is None and script.data is None)
    defaults = [x for k, v in TOY_RECIPE.items() for x in (f"--{k}", v)] if toy else []
    defaults += ["--output_dir", DEFAULT_OUTPUT_DIR]
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
        config.validate_dft_arguments()
    if not 0.0 < script.eval_fraction < 1.0:
        raise UsageError(f"--eval_fraction must be in (0, 1), got {script.eval_fraction}.")
    _check_numbers(script, config)
    _check_reporting(config)
    given = {a.split("=", 1)[0][2:] for a in file_flags + argv if a.startswith("--")}
    script.given_flags = given  # which flags the user set (the rest may be adapted to the run's length)
    return script, config, toy


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


def _load_model_and_tokenizer(script: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = script.model
    if path is None:
        from .toy import toy_model, toy_tokenizer

        return toy_model(hidden_size=64, num_layers=2), toy_tokenizer()
    local = Path(path)
    if local.exists() and not local.is_dir():
        raise UsageError(f"--model {path} is a file; give the folder written by save_pretrained (or a hub id).")
    if local.is_dir() and not (local / "config.json").is_file():
        raise UsageError(
            f"--model {path} has no config.json (the folder is not a saved model): save the model there with "
            "model.save_pretrained(folder)."
        )
    if local.is_dir() and not any((local / f).is_file() for f in _TOKENIZER_FILES):
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
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=script.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        where = "folder" if local.is_dir() else "hub id"
        raise UsageError(f"cannot load a causal LM and its tokenizer from {where} {path}: {_one_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
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
        return peft.get_peft_model(model, config)
    except ValueError as e:
        raise UsageError(f"--lora_target_modules {targets}: {_one_line(e)}") from None


def _prepare(raw: Any, tokenizer: Any, max_length: int, name: str):
    from .data import prepare_dataset

    prepared, report = prepare_dataset(raw, tokenizer, max_length)
    print(report.summary(name), flush=True)
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
    print(f"split: {len(train_set)} train / {len(eval_set)} eval examples ({how})", flush=True)
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
        "model": script.model or "built-in tiny Llama (dft.toy)",
        "data": script.data or "shipped arithmetic_train.jsonl",
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


def _check_unfinished(checkpoint: Path, config: Any, out: Path) -> None:
    """Resuming a run that already reached its last step would train nothing and overwrite its metrics."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    done, planned = int(state.get("global_step", 0)), int(state.get("max_steps", 0) or 0)
    target = config.max_steps if config.max_steps > 0 else planned
    if target and done >= target:
        raise UsageError(
            f"--resume_from_checkpoint: {checkpoint} is at step {done} of {target}: that run is finished "
            f"(results in {out}); raise --max_steps to train on, or use a new --output_dir."
        )


def _publish(staging: Path, out: Path) -> None:
    """Move every final artefact into ``out``, each with an atomic rename; metrics.json last (it marks done)."""
    names = sorted(p.name for p in staging.iterdir())
    for name in sorted(names, key=lambda n: n == "metrics.json"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)


def run_train(argv: list[str]) -> int:
    script, config, toy = parse_train_args(argv)
    out = Path(config.output_dir)
    resume = _resume_target(config.resume_from_checkpoint, out)
    if resume:
        _check_unfinished(Path(resume), config, out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file, not a folder.")
    if out.exists() and any(out.iterdir()) and not (script.overwrite or resume):
        raise UsageError(
            f"output_dir {out} exists and is not empty: choose another, pass --overwrite, or "
            "--resume_from_checkpoint true to continue it."
        )
    check_writable(out)
    model, tokenizer = _load_model_and_tokenizer(script)
    train_set, eval_raw, eval_set, how = _load_data(script, tokenizer, config.seed)
    ref_model = None
    if config.effective_kl_coef() > 0 and script.lora_r <= 0:  # ASFT: a frozen copy of the starting model
        ref_model, _ = _load_model_and_tokenizer(script)
    model = _apply_lora(model, script)
    from .data import collator
    from .trainer import DFTTrainer

    if script.overwrite and out.exists() and not resume:
        shutil.rmtree(out)
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
            callbacks=[stop.callback()],
        )
        total, per_epoch = _schedule(trainer)
        if "logging_steps" not in script.given_flags and not toy:  # a 15-step run logs more than once
            trainer.args.logging_steps = max(1, min(trainer.args.logging_steps, -(-total // 20)))
        epochs = total / per_epoch
        print(
            f"training {_describe_loss(config)} for {total} steps ({epochs:.3g} epochs of {per_epoch} steps, "
            f"{len(train_set)} examples, batch {trainer.args.per_device_train_batch_size} x "
            f"{trainer.args.gradient_accumulation_steps} accumulation x {trainer.args.world_size} processes) "
            f"at lr {config.learning_rate:g} on {trainer.args.device}, logging every "
            f"{trainer.args.logging_steps} steps" + (f", resuming from {resume}" if resume else ""),
            flush=True,
        )
        stop.training = True
        trainer.train(resume_from_checkpoint=resume)
        stop.training = False
        if stop.signum is not None:
            raise Interrupted(stop.signum, str(out))
        metrics = trainer.evaluate()
        em, predictions = exact_match(trainer.model, tokenizer, eval_raw, script.max_eval_examples)
        metrics["eval_exact_match"] = em
        metrics["eval_exact_match_examples"] = len(predictions)
        sizes = {
            "train_examples": len(train_set),
            "eval_examples": len(eval_set),
            "eval_split": how,
            "total_steps": total,
            "steps_per_epoch": per_epoch,
            "logging_steps": trainer.args.logging_steps,
        }
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
        try:
            trainer.save_model(str(staging))
            tokenizer.save_pretrained(str(staging))
            (staging / "run_config.json").write_text(json.dumps(_run_config(script, config, toy, sizes), indent=1))
            plot_history(staging, trainer.state.log_history, title=f"{config.loss_type}, lr {config.learning_rate:g}")
            write_metrics(staging, trainer.state.log_history, metrics)
            _publish(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print("\n" + format_table({k: v for k, v in metrics.items() if k.startswith("eval_")}))
    print(f"\nwrote {out}/: model + tokenizer, run_config.json, metrics.json, metrics.csv, training.png")
    return 0


# ---- dft eval ------------------------------------------------------------------------------------


def run_eval(argv: list[str]) -> int:
    from .data import load_local_dataset

    parser = _parser((EvalScriptArguments,), "dft eval")
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if args.output_dir is None and Path(args.model).is_dir():
        args.output_dir = str(Path(args.model) / "eval")
    if args.output_dir:
        check_writable(Path(args.output_dir))
    script = TrainScriptArguments(model=args.model, trust_remote_code=args.trust_remote_code)
    model, tokenizer = _load_model_and_tokenizer(script)
    raw = load_local_dataset(args.data or _asset("arithmetic_test.jsonl"))
    prepared = _prepare(raw, tokenizer, args.max_length, "eval")
    metrics: dict[str, Any] = {f"eval_{k}": v for k, v in token_ce(model, tokenizer, prepared, args.batch_size).items()}
    em, predictions = exact_match(model, tokenizer, raw, args.max_eval_examples, args.max_new_tokens)
    metrics["eval_exact_match"] = em
    metrics["eval_exact_match_examples"] = len(predictions)
    metrics["num_examples"] = len(prepared)
    print(format_table(metrics))
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_results.json").write_text(json.dumps(metrics, indent=1))
        (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
        print(f"\nwrote {out}/eval_results.json and predictions.jsonl")
    return 0


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
    (args,) = parser.parse_args_into_dataclasses(args=argv)
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
    report["model"] = args.model or "built-in tiny Llama (dft.toy)"
    report["data"] = args.data or "shipped arithmetic_train.jsonl"
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


USAGE = """usage: dft {train,eval,inspect} [flags]

  dft train [--model M] [--data D] [--loss dft|sft|asft|eaft] [TrainingArguments flags]
            with neither --model nor --data: the built-in toy job (tiny Llama, shipped arithmetic, CPU)
  dft eval --model M [--data D] [--output_dir OUT]
  dft inspect --model M --data D [--max_examples N] [--output_dir OUT]
            should I switch? the model's p on your supervised tokens, and a recommendation
  dft sample --model M --data D --num_samples K --temperature T --verifier exact|math|MODULE:FUNCTION
            generate, verify, keep: samples.jsonl, accepted.jsonl (for dft train --data), summary.json

  dft train --help, dft eval --help: every flag and its default"""


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
        print(f"dft: stopped by {name}{where}", file=sys.stderr)
        return 128 + int(signum)


if __name__ == "__main__":
    sys.exit(main())
