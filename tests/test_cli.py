import json
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

TINY = [
    "--max_steps",
    "4",
    "--logging_steps",
    "2",
    "--eval_steps",
    "2",
    "--max_eval_examples",
    "2",
    "--per_device_train_batch_size",
    "4",
    "--disable_tqdm",
    "true",
]


def dft_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "dft", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory):
    from dft.toy import toy_model, toy_tokenizer

    path = tmp_path_factory.mktemp("toy-model")
    tok = toy_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}A: {{ m['content'] }}\n"
        "{% else %}Q: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
    )
    toy_model(hidden_size=32, num_layers=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_default_job_writes_outputs(tmp_path):
    out = tmp_path / "run"
    proc = dft_cli("train", "--output_dir", out, *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json", "metrics.csv", "training.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"eval_loss", "eval_ce", "eval_exact_match"} <= set(metrics["final"])
    assert "kept" in proc.stdout and "supervised" in proc.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.tmp")]


@pytest.mark.parametrize("fmt", ["prompt_completion", "messages", "text", "parquet", "csv", "save_to_disk"])
def test_local_model_and_data_formats(tmp_path, toy_model_dir, fmt):
    from dft.toy import arithmetic_examples

    examples = arithmetic_examples(40, seed=3)
    if fmt == "messages":
        rows = [
            {
                "messages": [
                    {"role": "user", "content": e["prompt"].strip()},
                    {"role": "assistant", "content": e["completion"].strip()},
                ]
            }
            for e in examples
        ]
        data = _write_jsonl(tmp_path / "d.jsonl", rows)
    elif fmt == "text":
        data = _write_jsonl(tmp_path / "d.jsonl", [{"text": e["prompt"] + e["completion"]} for e in examples])
    elif fmt == "parquet":
        data = tmp_path / "d.parquet"
        Dataset.from_list(examples).to_parquet(str(data))
    elif fmt == "csv":
        data = tmp_path / "d.csv"
        Dataset.from_list(examples).to_csv(str(data))
    elif fmt == "save_to_disk":
        data = tmp_path / "d_disk"
        Dataset.from_list(examples).save_to_disk(str(data))
    else:
        data = _write_jsonl(tmp_path / "d.jsonl", examples)
    out = toy_model_dir
    if fmt in ("prompt_completion", "messages"):  # training runs are slow: two formats train, all evaluate
        out = tmp_path / "run"
        proc = dft_cli("train", "--model", toy_model_dir, "--data", data, "--output_dir", out, "--loss", "sft", *TINY)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "metrics.json").is_file()
        assert "loss_type=sft" in proc.stdout
    ev = dft_cli(
        "eval",
        "--model",
        out,
        "--data",
        data,
        "--max_eval_examples",
        "3",
        "--max_new_tokens",
        "8",
        "--output",
        tmp_path / "eval_results.json",
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((tmp_path / "eval_results.json").read_text())
    assert "eval_ce" in ev.stdout
    assert result["eval_ce"] > 0 and result["num_examples"] == 40
    assert (result["eval_exact_match"] is None) == (fmt == "text")


def test_config_file_and_flag_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_steps: 3\nlogging_steps: 1\ndft_alpha: 0.5\nmax_eval_examples: 1\neval_steps: 3\n")
    out = tmp_path / "run"
    proc = dft_cli("train", "--config", cfg, "--output_dir", out, "--max_steps", "2", "--disable_tqdm", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert max(h["step"] for h in history) == 2
    assert "alpha=0.5" in proc.stdout


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing_data", "data path not found"),
        ("missing_model", "model path not found"),
        ("bad_columns", "expected 'prompt' and 'completion'"),
        ("empty", "no examples"),
        ("short_max_length", "no example has a supervised token left"),
        ("unknown_flag", r"unknown flag\(s\) \['--no_such_flag', '1'\]"),
        ("bad_value", "dft_alpha|alpha must be >= 0"),
        ("bad_loss", "--loss must be"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, case, match):
    out = tmp_path / "run"
    good = _write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "Q: 1+1=?\n", "completion": "A: 2\n"}] * 4)
    args = {
        "missing_data": ["--data", tmp_path / "nope.jsonl"],
        "missing_model": ["--model", tmp_path / "no-model"],
        "bad_columns": ["--data", _write_jsonl(tmp_path / "b.jsonl", [{"question": "x", "answer": "y"}])],
        "empty": ["--data", _write_jsonl(tmp_path / "e.jsonl", [])],
        "short_max_length": ["--data", good, "--max_length", "4"],
        "unknown_flag": ["--no_such_flag", "1"],
        "bad_value": ["--dft_alpha", "-1"],
        "bad_loss": ["--loss", "dpo"],
    }[case]
    if case == "empty":
        (tmp_path / "e.jsonl").write_text("")
    proc = dft_cli("train", "--output_dir", out, *args, *TINY)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert __import__("re").search(match, proc.stderr), proc.stderr[-2000:]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.tmp")]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("loss", "logged"), [("asft", "kl"), ("eaft", "ce")])
def test_variant_losses_from_the_command_line(tmp_path, loss, logged):
    out = tmp_path / loss
    args = ("--loss", loss, "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "3", "--max_eval_examples", "1")
    proc = dft_cli("train", "--output_dir", out, *args, "--kl_coef", "0.2", "--disable_tqdm", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert any(logged in h for h in history)
