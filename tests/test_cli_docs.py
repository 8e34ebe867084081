"""docs/cli.md documents each command's own flags in full: its flag tables and ``dft <command> --help`` agree
both ways (every own flag of the help is in the command's tables, every flag of the tables is in the help),
and each table's default is the one the help prints."""

import functools
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
COMMANDS = ("train", "eval", "inspect", "sample")
TRAINING_ARGUMENTS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"


@functools.cache
def _launch() -> dict[str, subprocess.Popen]:
    """``dft COMMAND --help`` of every command, one process each, side by side; run wide, so that no line wraps."""
    env = {**os.environ, "COLUMNS": "2000", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    return {
        command: subprocess.Popen(
            [sys.executable, "-m", "dft", command, "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for command in COMMANDS
    }


@functools.cache
def help_texts() -> dict[str, str]:
    texts = {}
    for command, proc in _launch().items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"dft {command} --help: exit status {proc.returncode}\n{err[-2000:]}"
        texts[command] = out
    return texts


@functools.cache
def help_options(command: str) -> dict[str, str]:
    """``{flag: default}`` for every option ``dft COMMAND --help`` lists, in its order (the first spelling:
    ``--max_length``, not ``--max-length``); ``-h/--help`` left out."""
    text = help_texts()[command]
    sections = re.split(r"^(?:options|optional arguments):\n", text, flags=re.M)
    assert len(sections) == 2, f"no options section in 'dft {command} --help':\n{text[:2000]}"
    entries: list[list[str]] = []
    for line in sections[1].splitlines():
        if not line.strip():
            break  # the epilog follows a blank line
        if re.match(r"  -", line):
            entries.append([line])
        elif entries:
            entries[-1].append(line)
    options = {}
    for entry in entries:
        flag = entry[0].split()[0].rstrip(",")
        if flag in ("-h", "--help"):
            continue
        default = re.search(r".*\(default: (.*)\)\s*$", " ".join(s.strip() for s in entry))
        assert flag.startswith("--") and default, f"cannot read this entry of 'dft {command} --help': {entry}"
        options[flag] = default.group(1)
    return options


def own_options(command: str) -> dict[str, str]:
    """The help's options that are ``dft``'s own: for ``dft train`` the script flags and DFTConfig's own
    fields (TrainingArguments' fields, ``--no_X`` included, left out); for the others every option."""
    options = help_options(command)
    if command != "train":
        return options
    from transformers import TrainingArguments

    trainer = {f.name for f in fields(TrainingArguments)}
    return {flag: d for flag, d in options.items() if flag[2:].removeprefix("no_") not in trainer}


def doc_sections() -> dict[str, str]:
    """``{command: text}`` of the ``## dft COMMAND`` sections of docs/cli.md (each up to the next ``## ``)."""
    found = {}
    for part in re.split(r"^(?=## )", DOC.read_text(), flags=re.M):
        heading = re.match(r"## `?dft (\w+)`?\s*$", part.splitlines()[0]) if part.startswith("## ") else None
        if heading:
            found[heading.group(1)] = part
    return found


def _cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def doc_flags(section: str) -> dict[str, str]:
    """``{flag: default cell}`` of every table whose header is ``| flag | default | meaning |`` in a section;
    a row may name several flags (``--fused_lm_head``, ``--no_fused_lm_head``): each gets the row's default."""
    rows: dict[str, str] = {}
    table = None
    for line in section.splitlines():
        if not line.startswith("|"):
            table = None
            continue
        cells = _cells(line)
        if table is None:
            table = [c.lower() for c in cells]
            continue
        if table[:2] != ["flag", "default"] or set(line) <= set("|-: "):
            continue
        flags = re.findall(r"`(--[\w-]+)`", cells[0])
        assert flags, f"a row of a flag table names no flag: {line}"
        for flag in flags:
            assert flag not in rows, f"{flag} is in the tables twice"
            rows[flag] = cells[1]
    return rows


def test_help_parser_reads_every_flag():
    """The parser finds the flags the commands are built from (so that a broken parser fails here)."""
    _launch()  # the help processes run while this one imports
    from dft.cli import EvalScriptArguments, InspectScriptArguments, SampleScriptArguments, TrainScriptArguments
    from dft.trainer import DFTArguments

    built_from = {
        "train": [TrainScriptArguments, DFTArguments],
        "eval": [EvalScriptArguments],
        "inspect": [InspectScriptArguments],
        "sample": [SampleScriptArguments],
    }
    for command, classes in built_from.items():
        names = {f"--{f.name}" for cls in classes for f in fields(cls)}
        own = set(own_options(command))
        # --no_X: argparse's negation of a boolean that defaults to True
        assert own - names <= {f"--no_{n[2:]}" for n in names}, (command, own - names)
        assert names <= own, (command, names - own)
    assert len(own_options("train")) >= 30
    assert len(help_options("train")) >= len(own_options("train")) + 80  # TrainingArguments' fields
    assert min(len(own_options(c)) for c in COMMANDS) >= 8
    assert help_options("train")["--max_length"] == "128"
    assert help_options("inspect")["--output_dir"] == "dft-inspect"


def test_every_command_has_a_section():
    assert set(doc_sections()) >= set(COMMANDS), sorted(doc_sections())


@pytest.mark.parametrize("command", COMMANDS)
def test_doc_tables_list_the_own_flags_of_the_help(command):
    documented = doc_flags(doc_sections()[command])
    own, every = own_options(command), help_options(command)
    missing = [flag for flag in own if flag not in documented]
    assert not missing, f"'dft {command} --help' lists {missing}, which docs/cli.md's tables do not"
    unknown = [flag for flag in documented if flag not in every]
    assert not unknown, f"docs/cli.md's tables for dft {command} list {unknown}, which its --help does not"
    foreign = [flag for flag in documented if flag not in own]
    assert not foreign, f"docs/cli.md's tables for dft {command} list TrainingArguments' {foreign}"


@pytest.mark.parametrize("command", COMMANDS)
def test_doc_defaults_are_the_help_defaults(command):
    """A default cell starts with the help's default as code (`128`, `false` for False); a default of None is
    described in words (—, required), never as code."""
    wrong = []
    for flag, cell in doc_flags(doc_sections()[command]).items():
        if flag not in help_options(command):
            continue  # test_doc_tables_list_the_own_flags_of_the_help names it
        default = help_options(command)[flag]
        code = re.match(r"`([^`]*)`", cell)
        if default == "None":
            ok = code is None
        else:
            ok = code is not None and code.group(1).lower() == default.lower()
        if not ok and not flag.startswith("--no_"):
            wrong.append(f"{flag}: help {default!r}, docs {cell!r}")
    assert not wrong, "\n".join(wrong)


def test_train_links_training_arguments_and_lists_the_toy_recipe():
    from dft.cli._train_args import TOY_RECIPE

    train = doc_sections()["train"]
    assert TRAINING_ARGUMENTS in train
    toy = train.split("### The toy recipe", 1)[1]
    for name, value in TOY_RECIPE.items():
        assert re.search(rf"^\| `{name}` \| `{re.escape(value)}` \|", toy, flags=re.M), (name, value)
