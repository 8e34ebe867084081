"""The command line's flags: HfArgumentParser without its usage dump, TRL's flag names pointed to the CLI's,
did-you-mean for unknown flags, ``--config`` files, and the one-line errors (``UsageError``: exit status 2)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["Interrupted", "UsageError", "check_writable", "parse_command"]


class UsageError(Exception):
    """Bad input: one message, exit status 2."""


class Interrupted(Exception):
    """SIGINT / SIGTERM: one line, exit 128 + signal number."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message)
        self.signum = signum


def _one_line(text: object) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()[:500]


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
        args, unknown = parser.parse_args_into_dataclasses(
            args=joined_negative_values(argv), return_remaining_strings=True
        )
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


def _flags_from_file(path: str) -> list[str]:
    """The flags of a YAML or JSON file (``--config``); a path without either suffix, such as the pipe of
    ``--config <(...)``, is read as JSON, else YAML."""
    p = Path(path)
    if not p.exists() or p.is_dir():
        raise UsageError(f"config file not found: {path}")
    text = p.read_text()
    suffix = p.suffix.lower()
    kind = "YAML" if suffix in (".yaml", ".yml") else "JSON" if suffix == ".json" else "JSON or YAML"
    try:
        if kind == "YAML":
            values = _yaml(text)
        elif kind == "JSON":
            values = json.loads(text)
        else:
            try:
                values = json.loads(text)
            except json.JSONDecodeError:
                values = _yaml(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise UsageError(f"{path} is not valid {kind}: {_one_line(e)}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path} must hold a mapping of flag names to values, got {type(values).__name__}.")
    if "config" in values:
        raise UsageError(f"{path}: a config file cannot name another (config: {values['config']}); give one --config.")
    flags: list[str] = []
    for key, value in values.items():
        flags += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return flags


def _yaml(text: str) -> Any:
    import yaml

    return yaml.safe_load(text) or {}


_NEGATIVE_NUMBER = re.compile(r"^-(\d|\.\d|inf$|nan$)", re.IGNORECASE)


def joined_negative_values(argv: list[str]) -> list[str]:
    """``--flag -1e-3`` as ``--flag=-1e-3``: argparse takes ``-1`` and ``-0.5`` as values but ``-1e-3`` as an
    unknown option, and would answer "expected one argument" instead of checking the value."""
    out: list[str] = []
    for arg in argv:
        if _NEGATIVE_NUMBER.match(arg) and out and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def _flag_value(flags: list[str], name: str) -> str | None:
    """The last value given to ``--name`` (``--name v``, ``--name=v``; a bare boolean flag is "true")."""
    value = None
    for i, flag in enumerate(flags):
        key, eq, rest = flag.partition("=")
        if key == f"--{name}":
            following = flags[i + 1] if i + 1 < len(flags) else None
            value = rest if eq else following if following and not following.startswith("--") else "true"
    return value.lower() if value is not None else None


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
