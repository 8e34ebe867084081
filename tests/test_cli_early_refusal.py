"""A bad flag is refused before anything heavy is imported or set up: told by what is in ``sys.modules`` when the
error prints (not by a timer). Each case runs ``dft.cli.main`` in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ["transformers.trainer", "accelerate", "deepspeed", "datasets", "transformers.training_args"]

PROBE = f"""
import json, sys
from dft.cli import main
code = main(json.loads(sys.argv[1]))
state = sys.modules.get("accelerate.state")
set_up = bool(state and (state.PartialState._shared_state or state.AcceleratorState._shared_state))
print(json.dumps({{"code": code, "loaded": [m for m in {HEAVY!r} if m in sys.modules], "accelerate_state": set_up}}))
"""


def probe(tmp_path, *args: str) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr.strip()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["train", "--learning_rat", "1e-3"], "did you mean --learning_rat -> --learning_rate?"),
        (["train", "--max_steps", "abc"], "invalid int value: 'abc'"),
        (["train", "--loss", "dpo"], "--loss must be one of"),
        (["train", "--learning_rate", "-1"], "--learning_rate must be > 0"),
        (["train", "--learning_rate", "-1e-3"], "--learning_rate must be > 0, got -0.001"),  # not "expected one"
        (["train", "--lr_scheduler_type", "cosin"], "invalid choice: 'cosin'"),
        (["train", "--debug", "underflow_overflow", "--max_steps", "1.5"], "invalid int value: '1.5'"),
    ],
)
def test_train_refuses_bad_flags_before_anything_heavy(tmp_path, args, error):
    """dft train's flags are TrainingArguments' fields read from its source: neither transformers.training_args
    nor accelerate is imported, let alone Trainer, datasets or DeepSpeed, and accelerate's state (device, process
    group) is not set up."""
    seen, err = probe(tmp_path, *args)
    assert seen["code"] == 2 and err.startswith("dft: error: ") and error in err, err
    assert seen["loaded"] == [], seen
    assert not seen["accelerate_state"], seen


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["eval", "--model", "m", "--bogus", "1"], "unknown flag(s) ['--bogus', '1']"),
        (["inspect", "--batch_size", "0"], "--batch_size must be >= 1, got 0."),
        (["sample", "--model", "m", "--data", "d", "--ouput_dir", "x"], "did you mean --ouput_dir -> --output_dir?"),
    ],
)
def test_eval_inspect_sample_refuse_bad_flags_before_anything_heavy(tmp_path, args, error):
    seen, err = probe(tmp_path, *args)
    assert seen["code"] == 2 and error in err, err
    assert seen["loaded"] == [], seen


def test_the_probe_sees_heavy_imports(tmp_path):
    """Good flags and a missing model: the error comes after the Trainer's config was built (the probe can fail)."""
    seen, err = probe(tmp_path, "train", "--model", "./no-such-model", "--data", "d.jsonl")
    assert seen["code"] == 2 and "model path not found" in err, err
    assert "transformers.trainer" in seen["loaded"] and seen["accelerate_state"], seen


def _actions(fields_class: type) -> dict[str, object]:
    from transformers import HfArgumentParser

    return {a.dest: a for a in HfArgumentParser(fields_class)._actions}


def test_train_flags_from_source_parse_as_the_imported_class():
    """Every flag of TrainingArguments read from its source is the imported class's flag: the same option
    strings, number of values, constant, default, conversion, choices and help (for the installed transformers;
    CI runs this with the newest and the oldest supported). The one difference allowed: choices computed at
    import (log levels) are left to the real parse."""
    from transformers.hf_argparser import string_to_bool

    from dft.cli._training_fields import flags_class

    light, real = _actions(flags_class()), _actions(flags_class(read_source=False))
    assert light.keys() == real.keys()
    computed = set()
    for dest, b in real.items():
        a = light[dest]
        # int, float, str and bool convert alike; any other converter is a choice function (the same choices,
        # checked below) or a class (ParallelismConfig, a list's enum: read as a str subclass)
        plain = (int, float, str, string_to_bool, None)
        kinds = [t if t in plain else "converter" for t in (a.type, b.type)]
        assert kinds[0] == kinds[1], (dest, a.type, b.type)
        default = getattr(b.default, "value", b.default)  # an enum member's value, as the parse gives it
        assert (a.option_strings, a.nargs, a.const, a.default, a.help, a.required) == (
            b.option_strings, b.nargs, b.const, default, b.help, b.required,
        ), dest  # fmt: skip
        if a.choices is None and b.choices is not None:
            computed.add(dest)
        else:
            assert list(a.choices or []) == list(b.choices or []), dest
    assert computed <= {"log_level", "log_level_replica"}, computed


def test_train_flags_from_source_give_the_same_values():
    from transformers import HfArgumentParser

    from dft.cli._training_fields import flags_class

    argv = ["--output_dir", "o", "--learning_rate", "1e-3", "--lr_scheduler_type", "cosine", "--bf16",
            "--report_to", "none", "--save_strategy", "steps", "--no_remove_unused_columns", "--max_steps", "3",
            "--debug", "underflow_overflow", "--loss_type", "asft", "--kl_coef", "0.2"]  # fmt: skip
    (light,) = HfArgumentParser(flags_class()).parse_args_into_dataclasses(args=argv)
    (real,) = HfArgumentParser(flags_class(read_source=False)).parse_args_into_dataclasses(args=argv)
    values = {k: [getattr(x, "value", x) for x in v] if isinstance(v, list) else v for k, v in vars(real).items()}
    assert vars(light) == {k: getattr(v, "value", v) for k, v in values.items()}


def test_train_flags_fall_back_to_the_imported_class(monkeypatch):
    """A training_args.py this reader does not follow: the flags come from the imported class."""
    import transformers

    from dft.cli import _training_fields

    def unreadable():
        raise SyntaxError("a source this reader does not follow")

    monkeypatch.setattr(_training_fields, "training_fields", unreadable)
    assert issubclass(_training_fields.flags_class(), transformers.TrainingArguments)


def test_config_from_a_pipe_is_read_as_json_or_yaml(tmp_path):
    """``--config <(...)``: a path without a suffix (a pipe) is read as JSON, else YAML; its flags are checked."""
    import os

    from dft.cli._parsing import UsageError, _flags_from_file

    for text in ('{"max_steps": 3, "report_to": ["none"]}', "max_steps: 3\nreport_to: [none]\n"):
        read, write = os.pipe()
        os.write(write, text.encode())
        os.close(write)
        try:
            assert _flags_from_file(f"/dev/fd/{read}") == ["--max_steps", "3", "--report_to", "none"]
        finally:
            os.close(read)
    (tmp_path / "flags").write_text("max_steps: [1, 2\n")
    with pytest.raises(UsageError, match="is not valid JSON or YAML"):
        _flags_from_file(str(tmp_path / "flags"))
    (tmp_path / "nested.yaml").write_text("config: other.yaml\nmax_steps: 3\n")  # not silently ignored
    with pytest.raises(UsageError, match="a config file cannot name another"):
        _flags_from_file(str(tmp_path / "nested.yaml"))
