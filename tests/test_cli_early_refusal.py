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
    ],
)
def test_train_refuses_bad_flags_before_trainer_datasets_and_accelerate_state(tmp_path, args, error):
    """dft train's flags need TrainingArguments' field list (transformers.training_args, which imports
    accelerate's modules), but neither Trainer nor datasets nor DeepSpeed is imported, and accelerate's state
    (device, process group) is not set up."""
    seen, err = probe(tmp_path, *args)
    assert seen["code"] == 2 and err.startswith("dft: error: ") and error in err, err
    assert not {"transformers.trainer", "datasets", "deepspeed"} & set(seen["loaded"]), seen
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
