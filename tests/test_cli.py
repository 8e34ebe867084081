import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

STUDY_BASE = Path(__file__).resolve().parents[1] / "examples" / "study" / "base"  # a trained 0.6 M Llama
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


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _model_without_tokenizer(tmp_path: Path) -> Path:
    from dft.toy import toy_model

    path = tmp_path / "bare-model"
    toy_model(hidden_size=16, num_layers=1).save_pretrained(path)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _tokenizer_without_model(tmp_path: Path) -> Path:
    from dft.toy import toy_tokenizer

    path = tmp_path / "tokenizer-only"
    toy_tokenizer().save_pretrained(path)
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
    # a 4-step toy run: the recipe's 20 warm-up steps become 4 // 10 = 0 (else the lr would peak at 20% of 3e-3)
    first = next(h for h in metrics["log_history"] if "loss" in h)
    assert first["learning_rate"] > 2e-3, first
    # evaluated at steps 2 and 4; the final metrics are step 4's, not a second pass over the same model
    evals = [h for h in metrics["log_history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4], evals
    assert metrics["final"]["eval_loss"] == evals[-1]["eval_loss"]
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
    else:  # with a UTF-8 byte-order mark (Windows editors write one): accepted
        data = tmp_path / "d.jsonl"
        data.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(e) + "\n" for e in examples).encode())
    out = toy_model_dir
    if fmt in ("prompt_completion", "messages"):  # training runs are slow: two formats train, all evaluate
        out = tmp_path / "run"
        proc = dft_cli("train", "--model", toy_model_dir, "--data", data, "--output_dir", out, "--loss", "sft", *TINY)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "metrics.json").is_file()
        assert "training sft (cross-entropy)" in proc.stdout and "alpha" not in proc.stdout  # only what applies
        run_config = json.loads((out / "run_config.json").read_text())
        # a user's model and data: TrainingArguments' defaults, not the toy recipe's
        assert run_config["recipe"] is None and run_config["learning_rate"] == 5e-05
        assert run_config["loss_type"] == "sft" and run_config["eval_examples"] == 2  # 5% of 40
        assert "split: 38 train / 2 eval examples (5% of --data held out" in proc.stdout
        history = json.loads((out / "metrics.json").read_text())["log_history"]
        assert not any("dft_beta" in h for h in history)
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
        "--output_dir",
        tmp_path / "ev",
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    predictions = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == (0 if fmt == "text" else 3)
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
        ("broken_yaml", r"run.yaml is not valid YAML"),
        ("broken_json", r"run.json is not valid JSON"),
        ("null_completion", r"n.jsonl:2: 'completion' must be a string, got null"),
        ("messages_not_a_list", r"m.jsonl:1: 'messages' must be a non-empty list"),
        ("malformed_jsonl", r"x.jsonl:2: not valid JSON"),
        ("report_to_missing", r"--report_to tensorboard: not installed"),
        ("model_without_tokenizer", r"has no tokenizer"),
        ("bad_float", r"invalid float value: 'abc'"),
        ("bad_resume", r"not a checkpoint folder"),
        (
            "abbreviated_flag",
            r"unknown flag\(s\) \['--learning_rat', '1e-3'\]; did you mean --learning_rat -> --learning_rate\?",
        ),
        ("typo_flag", r"did you mean --max_step -> --max_steps"),
        ("negative_lr", r"--learning_rate must be > 0, got -1"),
        ("zero_batch", r"--per_device_train_batch_size must be >= 1, got 0"),
        ("zero_epochs", r"--num_train_epochs must be > 0 \(or give --max_steps\), got 0"),
        ("model_without_config", r"has no config.json"),
        ("unwritable_output", r"--output_dir /proc/dft-out/run is not writable"),
        ("output_under_a_file", r"is a file, not a folder"),
        ("not_utf8", r"latin.jsonl:2: not UTF-8 \(byte 0xe9 at column 16\)"),
        ("bot_role", r"c.jsonl:1: messages\[1\] has role 'bot'"),
        ("csv_columns", r"cols.csv: the dataset has columns \['question', 'answer'\]"),
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
        "broken_yaml": ["--config", _write(tmp_path / "run.yaml", "max_steps: [1, 2\n")],
        "broken_json": ["--config", _write(tmp_path / "run.json", '{"max_steps": ')],
        "null_completion": [
            "--data",
            _write_jsonl(
                tmp_path / "n.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}]
            ),
        ],
        "messages_not_a_list": ["--data", _write_jsonl(tmp_path / "m.jsonl", [{"messages": "oops"}])],
        "malformed_jsonl": [
            "--data",
            _write(tmp_path / "x.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n'),
        ],
        "report_to_missing": ["--report_to", "tensorboard"],
        "model_without_tokenizer": ["--model", _model_without_tokenizer(tmp_path), "--data", good],
        "bad_float": ["--learning_rate", "abc"],
        "bad_resume": ["--resume_from_checkpoint", tmp_path],
        "abbreviated_flag": ["--learning_rat", "1e-3"],
        "typo_flag": ["--max_step", "3"],
        "negative_lr": ["--learning_rate", "-1"],
        "zero_batch": ["--per_device_train_batch_size", "0"],
        "zero_epochs": ["--data", good, "--max_steps", "-1", "--num_train_epochs", "0"],
        "model_without_config": ["--model", _tokenizer_without_model(tmp_path), "--data", good],
        "unwritable_output": ["--output_dir", "/proc/dft-out/run"],  # read-only even for root
        "output_under_a_file": ["--output_dir", _write(tmp_path / "f.txt", "x") / "run"],
        "not_utf8": [
            "--data",
            _write_bytes(
                tmp_path / "latin.jsonl",
                b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n',
            ),
        ],
        "bot_role": [
            "--data",
            _write_jsonl(
                tmp_path / "c.jsonl",
                [{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
            ),
        ],
        "csv_columns": ["--data", _write(tmp_path / "cols.csv", "question,answer\na,b\n")],
    }[case]
    if case == "empty":
        (tmp_path / "e.jsonl").write_text("")
    proc = dft_cli("train", "--output_dir", out, *TINY, *args)  # the case's flags win
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert __import__("re").search(match, proc.stderr), proc.stderr[-2000:]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.tmp")]
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one line, no usage dump


def test_asft_from_the_command_line(tmp_path):
    out = tmp_path / "asft"
    args = ("--loss", "asft", "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "3", "--max_eval_examples")
    proc = dft_cli("train", "--output_dir", out, *args, "1", "--kl_coef", "0.2", "--disable_tqdm", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert any("kl" in h for h in history)


def _reference_sums(model_dir: Path, rows: list[dict], **weighting) -> tuple[float, float, int]:
    """(sum of the float64 reference loss, sum of the token CE, number of targets) of ``rows`` as dft train
    prepares them, each row through the model on its own (no padding, no packing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dft.data import prepare_dataset
    from tests.helpers.reference import ref_dft_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prepared, _ = prepare_dataset(Dataset.from_list(rows), AutoTokenizer.from_pretrained(model_dir), 128)
    loss = ce = 0.0
    count = 0
    for row in prepared:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(row["labels"][1:])
        loss += ref_dft_loss(logits, labels, reduction="sum", **weighting).item()
        ce += ref_dft_loss(logits, labels, reduction="sum", alpha=0.0).item()
        count += int((labels != -100).sum())
    return loss, ce, count


def test_eaft_from_the_command_line_trains_eaft(tmp_path, toy_model_dir, capsys):
    """--loss eaft: the first step's loss (one batch of every training row) is EAFT's, CE x (top-20 entropy /
    ln 20), of the starting model: ~0.5% below its CE here, 20x above DFT's. --eval_data: all of --data trains."""
    from dft.toy import arithmetic_examples

    rows = arithmetic_examples(6, seed=3)
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    held_out = _write_jsonl(tmp_path / "e.jsonl", arithmetic_examples(3, seed=4))
    out = tmp_path / "eaft"
    code, stdout, err = run_cli(capsys, "train", "--model", toy_model_dir, "--data", data, "--eval_data", held_out,
                                "--loss", "eaft", "--max_steps", "1", "--logging_steps", "1", "--per_device_train_"
                                "batch_size", "8", "--max_eval_examples", "1", "--save_strategy", "no",
                                "--disable_tqdm", "true", "--output_dir", out)  # fmt: skip
    assert code == 0, err[-3000:]
    assert "split: 6 train / 3 eval examples (--eval_data)" in stdout
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["eval_data"] == str(held_out.resolve()) and run_config["eval_fraction"] is None
    log = next(h for h in json.loads((out / "metrics.json").read_text())["log_history"] if "loss" in h)
    eaft, ce, count = _reference_sums(toy_model_dir, rows, alpha=0.0, eaft_alpha=1.0, eaft_top_k=20)
    assert log["ce"] == pytest.approx(ce / count, rel=1e-4)
    assert log["loss"] == pytest.approx(eaft / count, rel=1e-4)
    assert abs(eaft - ce) / ce > 20 * 1e-4  # the check tells EAFT from cross-entropy (and from DFT)


def test_train_flags_recipe_packing_lora(tmp_path, capsys):
    """One run on the study's trained base (its predictions depend on the context, unlike a fresh model's):
    --recipe toy on a user's model and data (the recipe's lr, schedule, CE -> DFT warm-up); --packing (one row,
    no padding: the input tokens counted are the rows' own, and the packed batch's CE is the rows' CE on their
    own: no row sees another); --lora_alpha / --lora_dropout in the adapter's config."""
    pytest.importorskip("peft")
    from transformers import AutoTokenizer

    from dft.data import prepare_dataset
    from dft.toy import arithmetic_examples

    rows = arithmetic_examples(6, seed=3)  # 28 to 45 tokens: padding would add tokens
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    held_out = _write_jsonl(tmp_path / "e.jsonl", arithmetic_examples(2, seed=4))
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--model", STUDY_BASE, "--data", data, "--eval_data", held_out,
                                "--recipe", "toy", "--packing", "true", "--lora_r", "4", "--lora_alpha", "8",
                                "--lora_dropout", "0.25", "--max_steps", "1", "--logging_steps", "1",
                                "--per_device_train_batch_size", "8", "--include_num_input_tokens_seen", "true",
                                "--max_eval_examples", "1", "--disable_tqdm", "true", "--output_dir", out)  # fmt: skip
    assert code == 0, err[-3000:]
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["recipe"] == "toy" and run_config["learning_rate"] == 3e-3
    assert run_config["lr_scheduler_type"] == "cosine" and run_config["dft_warmup_ratio"] == 0.25
    assert run_config["packing"] is True
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (4, 8, 0.25)
    log = next(h for h in json.loads((out / "metrics.json").read_text())["log_history"] if "loss" in h)
    _, ce, count = _reference_sums(STUDY_BASE, rows)  # LoRA's B starts at 0: the starting model's CE
    assert log["ce"] == pytest.approx(ce / count, rel=1e-3)
    prepared, _ = prepare_dataset(Dataset.from_list(rows), AutoTokenizer.from_pretrained(STUDY_BASE), 128)
    lengths = [len(r["input_ids"]) for r in prepared]
    assert log["num_input_tokens_seen"] == sum(lengths) < len(lengths) * max(lengths)


def test_bare_command_prints_usage_and_writes_nothing(tmp_path):
    proc = dft_cli(cwd=tmp_path)
    assert proc.returncode == 2 and "usage: dft {train,eval,inspect,sample}" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_help_shows_the_defaults_used():
    proc = dft_cli("train", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert text.index("--dft_alpha") < text.index("--learning_rate")  # DFT flags first after the script flags
    assert "(default: 5e-05)" in text  # TrainingArguments' default, used for a user's model/data
    assert "--learning_rate 3e-3" in text and "built-in recipe" in text  # the toy recipe, stated


def _train_until_signal(out, sig, *extra):
    import signal as _signal
    import time

    cmd = [
        sys.executable,
        "-m",
        "dft",
        "train",
        "--output_dir",
        str(out),
        "--max_steps",
        "2000",
        "--logging_steps",
        "1",
    ]
    cmd += [
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
        "--max_eval_examples",
        "1",
        "--disable_tqdm",
        "true",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("checkpoint-*")):
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(getattr(_signal, sig))
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_keeps_checkpoints_and_resume_continues(tmp_path, sig, code):
    out = tmp_path / "run"
    rc, _, stderr = _train_until_signal(out, sig)
    assert rc == code, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("dft:")]
    assert len(lines) == 1 and f"stopped by {sig}" in lines[0] and "--resume_from_checkpoint true" in lines[0]
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints and not (out / "metrics.json").exists()
    last = int(checkpoints[-1].name.split("-")[1])
    if sig == "SIGTERM":
        return
    resumed = dft_cli(
        "train", "--output_dir", out, "--resume_from_checkpoint", "true", "--max_steps", str(last + 2),
        "--logging_steps", "1", "--save_strategy", "no", "--max_eval_examples", "1", "--disable_tqdm", "true",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoints[-1]}" in resumed.stdout
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    new = [h for h in history if "loss" in h and h["step"] > last]
    assert [h["step"] for h in new] == [last + 1, last + 2]  # logs continue at the checkpoint's step
    assert new[0]["dft_beta"] > 0  # the CE -> DFT warm-up continues, it does not restart at 0


def test_eval_on_the_built_in_model_uses_the_shipped_test_split(tmp_path):
    out = tmp_path / "run"
    assert dft_cli("train", "--output_dir", out, *TINY).returncode == 0
    ev = dft_cli(
        "eval", "--model", out, "--max_eval_examples", "2", "--max_new_tokens", "4", "--output_dir", tmp_path / "ev"
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert result["num_examples"] == 200 and result["eval_exact_match_examples"] == 2
    assert len((tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()) == 2
    assert not (out / "eval_results.json").exists()  # nothing written into the model folder


def test_lora_and_load_dtype_flags(tmp_path, toy_model_dir):
    pytest.importorskip("peft")
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 1+1=?\n", "completion": "A: 2\n"}] * 8)
    out = tmp_path / "lora"
    proc = dft_cli(
        "train", "--model", toy_model_dir, "--data", data, "--output_dir", out, "--lora_r", "4",
        "--lora_target_modules", "q_proj,v_proj", "--torch_dtype", "float32", "--attn_implementation", "eager", *TINY,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_config.json").is_file()
    assert json.loads((out / "run_config.json").read_text())["lora"]["r"] == 4


@pytest.mark.parametrize("offline", ["1", None])
def test_hub_id_offline_is_one_line(tmp_path, offline):
    """A hub id that is not cached: HF_HUB_OFFLINE set, or the Hub unreachable (no network here): one line,
    exit 2, before huggingface_hub's minute of retries (the socket probe gives up after 5 s)."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update({"HF_HUB_OFFLINE": offline} if offline else {})
    proc = subprocess.run(
        [sys.executable, "-m", "dft", "train", "--model", "some-org/some-model", "--output_dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "hub id" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o").exists()


def test_short_run_on_user_data_reports_steps_logs_and_resumes(tmp_path, toy_model_dir):
    """A short run on the user's data: step count and epochs printed, logging_steps scaled to the run
    (not TrainingArguments' 500), run_config without contradictions; resuming it continues without a
    tied-weight warning; resuming a finished run is refused before anything is written."""
    from dft.toy import arithmetic_examples

    data = _write_jsonl(tmp_path / "d.jsonl", arithmetic_examples(40, seed=3))
    out = tmp_path / "run"
    common = ["--model", toy_model_dir, "--data", data, "--output_dir", out, "--per_device_train_batch_size", "4"]
    common += ["--max_eval_examples", "2", "--disable_tqdm", "true", "--save_strategy", "steps", "--save_steps", "3"]
    proc = dft_cli("train", *common, "--max_steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "for 3 steps (0.3 epochs of 10 steps, 38 examples, batch 4 x 1 accumulation x 1 processes)" in proc.stdout
    assert "logging every 1 steps" in proc.stdout
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["max_steps"] == 3 and run_config["num_train_epochs"] is None
    assert run_config["total_steps"] == 3 and run_config["logging_steps"] == 1
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert sum("loss" in h for h in history) == 3  # one log per step, not one per 500

    more = dft_cli("train", *common, "--max_steps", "6", "--resume_from_checkpoint", "true")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming from" in more.stdout and "missing keys" not in more.stderr  # lm_head.weight is tied
    metrics = (out / "metrics.json").read_text()
    done = dft_cli("train", *common, "--max_steps", "6", "--resume_from_checkpoint", "true")
    assert done.returncode == 2 and "is at step 6 of 6: that run is finished" in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and (out / "metrics.json").read_text() == metrics


def test_eval_writes_predictions_next_to_a_local_model(tmp_path, toy_model_dir):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(toy_model_dir, model)
    proc = dft_cli("eval", "--model", model, "--max_eval_examples", "2", "--max_new_tokens", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (model / "eval" / "predictions.jsonl").is_file() and (model / "eval" / "eval_results.json").is_file()


def test_existing_read_only_output_dir_is_caught_by_the_probe(tmp_path, monkeypatch):
    """An output dir that exists but refuses files (a read-only mount; chmod does not stop root, who runs
    these tests): the probe file's PermissionError becomes the one-line usage error, before any training."""
    from dft.cli import _parsing as cli

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "mkstemp", deny)
    with pytest.raises(cli.UsageError, match=r"--output_dir .* is not writable \(Permission denied in .*\)"):
        cli.check_writable(tmp_path)
    with pytest.raises(cli.UsageError, match="is not writable"):
        cli.check_writable(tmp_path / "new" / "run")  # created later: its nearest existing parent is probed


# ---- in-process helpers (no interpreter start: the flags that fail before loading cost milliseconds) ----


def run_cli(capsys, *args):
    """``dft.cli.main`` in this process: ``(exit status, stdout, stderr)``."""
    from dft.cli import main

    capsys.readouterr()  # only what this command prints
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_loading(monkeypatch):
    """Make any model load fail loudly: a check that must come first is seen to come first."""
    from dft.cli import _loading as cli

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load_model_and_tokenizer", refuse)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dft: error: "), err
    return lines[0]


def _arithmetic_jsonl(path: Path, n: int = 40) -> Path:
    from dft.toy import arithmetic_examples

    return _write_jsonl(path, arithmetic_examples(n, seed=3))


# ---- torchrun / accelerate launch -------------------------------------------------------------


def _torchrun_dft(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dft"] + [
        str(a) for a in args
    ]


def _params(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_torchrun_use_cpu_is_one_ddp_job_equal_to_one_process(tmp_path, toy_model_dir, capsys):
    """2 gloo ranks x batch 4 through the real launcher: the CLI's lines once, every file once and complete,
    and the parameters of one process x batch 8 on the same global batches (rows in the same order)."""
    from tests.dist.launch import run_bounded

    data = _arithmetic_jsonl(tmp_path / "d.jsonl")
    common = ["--model", toy_model_dir, "--data", data, "--max_steps", "3", "--logging_steps", "1"]
    common += ["--max_eval_examples", "2", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true"]
    ddp = tmp_path / "ddp"
    log = run_bounded(
        _torchrun_dft("train", *common, "--output_dir", ddp, "--per_device_train_batch_size", "4"), timeout=120
    )
    assert log.count("training dft") == 1 and "batch 4 x 1 accumulation x 2 processes" in log, log[-3000:]
    assert log.count("train: 38 examples") == 1 and log.count("split: 38 train") == 1
    assert log.count("eval_exact_match ") == 1 and log.count("\nwrote ") == 1
    for name in ("model.safetensors", "config.json", "tokenizer.json", "run_config.json", "metrics.json"):
        assert (ddp / name).is_file(), name
    assert (ddp / "training.png").is_file() and not (ddp / ".final-staging").exists()
    final = json.loads((ddp / "metrics.json").read_text())["final"]
    assert final["eval_exact_match_examples"] == 2  # one row per rank, gathered

    one = tmp_path / "one"
    code, out, err = run_cli(capsys, "train", *common, "--output_dir", one, "--per_device_train_batch_size", "8")
    assert code == 0, err[-3000:]
    assert "batch 8 x 1 accumulation x 1 processes" in out
    a, b, start = _params(ddp), _params(one), _params(toy_model_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-7
    assert min((b[k] - start[k]).abs().max().item() for k in b) > 1e-6  # it trained: every tensor moved
    losses = [[h["loss"] for h in json.loads((d / "metrics.json").read_text())["log_history"] if "loss" in h]
              for d in (ddp, one)]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=0)


def test_torchrun_on_cpu_without_use_cpu_is_one_job_and_its_lora_outputs_load(tmp_path, toy_model_dir, capsys):
    """No accelerator, no --use_cpu: the launcher's processes are one gloo DDP job (said once), not two jobs
    writing one folder; its LoRA run, merged on the main process, loads in dft eval as a model and as an
    adapter, with the same scores."""
    from dft.cli._processes import _has_accelerator
    from tests.dist.launch import run_bounded

    if _has_accelerator():
        pytest.skip("with an accelerator the launcher's processes take it (NCCL etc.), not gloo")
    data = _arithmetic_jsonl(tmp_path / "d.jsonl")
    out = tmp_path / "lora"
    log = run_bounded(
        _torchrun_dft(
            "train", "--model", toy_model_dir, "--data", data, "--output_dir", out, "--max_steps", "2",
            "--max_eval_examples", "1", "--save_strategy", "no", "--disable_tqdm", "true",
            "--lora_r", "4", "--merge_lora", "true",
        ),
        timeout=120,
    )  # fmt: skip
    assert log.count("training dft") == 1 and "x 2 processes" in log and "one DDP job over gloo" in log, log[-3000:]
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in log  # the two-jobs symptom
    assert log.count("\nwrote ") == 1 and "merged model (LoRA r=4 merged into" in log
    assert (out / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    scores = []
    for model in (out, out / "adapter"):
        ev = tmp_path / f"ev-{model.name}"
        args = ("eval", "--model", model, "--data", data, "--max_eval_examples", "1", "--max_new_tokens", "4")
        code, _, err = run_cli(capsys, *args, "--output_dir", ev)
        assert code == 0, err[-3000:]
        scores.append(json.loads((ev / "eval_results.json").read_text())["eval_ce"])
    assert scores[0] == pytest.approx(scores[1], rel=1e-5)


def test_torchrun_bad_input_is_one_line(tmp_path):
    """Every rank refuses the same input: one error line for the job, not one per process."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        _torchrun_dft("train", "--learning_rate", "-1", "--output_dir", tmp_path / "o"),
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("dft: error: --learning_rate must be > 0") == 1, proc.stderr[-3000:]
    assert not (tmp_path / "o").exists()


def test_use_cpu_false_under_a_launcher_without_accelerator_is_refused(tmp_path, capsys, monkeypatch, no_loading):
    from dft.cli import _train_args as cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli, "_has_accelerator", lambda: False)
    code, _, err = run_cli(capsys, "train", "--use_cpu", "false", "--output_dir", tmp_path / "o")
    assert code == 2
    line = _one_error_line(err)
    assert "WORLD_SIZE=2 but no GPU" in line and "would train alone on all the data" in line
    assert "--use_cpu true" in line
    monkeypatch.setenv("WORLD_SIZE", "1")
    script, config, _ = cli.parse_train_args(["--use_cpu", "false", "--output_dir", str(tmp_path / "o")])
    assert config.use_cpu is False and not script.cpu_ddp  # one process: the flag is taken as given


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_eval_and_inspect_refuse_a_launcher(tmp_path, capsys, monkeypatch, no_loading, command):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, command, "--model", tmp_path, "--output_dir", tmp_path / "o")
    assert code == 2 and f"dft {command} runs in one process (WORLD_SIZE=2)" in _one_error_line(err)


# ---- LoRA outputs ---------------------------------------------------------------------------------


def test_lora_output_loads_in_eval_and_inspect(tmp_path, toy_model_dir, capsys):
    """The adapter folder of `dft train --lora_r` (adapter_config.json, no config.json) loads on its base in
    dft eval and dft inspect; an adapter on the built-in model (no base path) is rebuilt from the run's record."""
    pytest.importorskip("peft")
    import warnings

    from dft.cli import TrainScriptArguments, _loading

    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 1+1=?\n", "completion": "A: 2\n"}] * 8)
    out = tmp_path / "user"
    short = ["--max_steps", "2", "--max_eval_examples", "1", "--save_strategy", "no", "--disable_tqdm", "true"]
    code, stdout, err = run_cli(capsys, "train", "--model", toy_model_dir, "--data", data, "--output_dir", out,
                                "--lora_r", "4", *short)  # fmt: skip
    assert code == 0, err[-3000:]
    assert f"LoRA adapter r=4 on {toy_model_dir.resolve()} (adapter_*" in stdout
    assert not (out / "config.json").exists()
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(toy_model_dir.resolve())  # absolute: it loads from any folder
    again = tmp_path / "again"  # the same command: the same adapter (its initial weights follow --seed)
    code, _, err = run_cli(capsys, "train", "--model", toy_model_dir, "--data", data, "--output_dir", again,
                           "--lora_r", "4", *short)  # fmt: skip
    assert code == 0, err[-3000:]
    import torch
    from safetensors.torch import load_file

    first, second = (load_file(str(d / "adapter_model.safetensors")) for d in (out, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    toy = tmp_path / "toy"  # what `dft train --lora_r 4` (no --model) writes, without its 2000-row training
    script = TrainScriptArguments(lora_r=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loading._apply_lora(_loading._toy_model(), script).save_pretrained(toy)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]  # peft's is_gradient_checkpointing
    __import__("dft.toy").toy.toy_tokenizer().save_pretrained(toy)
    (toy / "run_config.json").write_text(json.dumps({"model": _loading.TOY_MODEL}))
    assert not json.loads((toy / "adapter_config.json").read_text())["base_model_name_or_path"]  # None; peft < 0.13: ''
    merged = tmp_path / "merged"  # `dft train --lora_r 4 --merge_lora true`: the adapter moved to adapter/
    (merged / "adapter").mkdir(parents=True)
    for path in toy.iterdir():
        (merged / ("adapter" if path.name.startswith("adapter_") else "") / path.name).write_bytes(path.read_bytes())
    for folder in (out, toy, merged / "adapter"):
        code, stdout, err = run_cli(capsys, "eval", "--model", folder, "--data", data, "--max_eval_examples", "1",
                                    "--max_new_tokens", "4")  # fmt: skip
        assert code == 0, err[-3000:]
        assert json.loads((folder / "eval" / "eval_results.json").read_text())["eval_ce"] > 0
        code, stdout, err = run_cli(capsys, "inspect", "--model", folder, "--data", data, "--output_dir", folder / "i")
        assert code == 0, err[-3000:]
        assert json.loads((folder / "i" / "inspect.json").read_text())["supervised_tokens"] > 0


def test_merge_lora_needs_lora_r(tmp_path, capsys, no_loading):
    code, _, err = run_cli(capsys, "train", "--merge_lora", "true", "--output_dir", tmp_path / "o")
    assert code == 2 and "--merge_lora true needs --lora_r > 0" in _one_error_line(err)


# ---- resume guards ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, toy_model_dir):
    """A finished 3-step run on user data with its checkpoint-3 (dft_run.json inside)."""
    from dft.cli import main

    root = tmp_path_factory.mktemp("finished")
    data = _arithmetic_jsonl(root / "d.jsonl")
    out = root / "run"
    args = ["--model", toy_model_dir, "--data", data, "--output_dir", out, "--max_steps", "3", "--save_steps", "3"]
    args += ["--max_eval_examples", "1", "--disable_tqdm", "true", "--logging_steps", "1"]
    assert main(["train", *map(str, args)]) == 0
    assert (out / "checkpoint-3" / "dft_run.json").is_file()
    return {"root": root, "out": out, "args": [str(a) for a in args]}


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("loss_and_data", r"this run differs .*data '.*d\.jsonl' -> '.*other\.jsonl'; loss_type 'dft' -> 'sft'; "
         r"weighting\.alpha 1\.0 -> 0\.0\).*--overwrite"),
        ("other_architecture", r"saved from another architecture than --model .* \(hidden_size 32 -> 48"),
        ("lora_on_a_full_checkpoint", r"holds a full model, but this run trains a LoRA adapter"),
        ("learning_rate", r"learning_rate 5e-05 -> 0\.001"),
    ],
)  # fmt: skip
def test_resume_with_other_settings_is_refused(finished_run, tmp_path, capsys, no_loading, case, match):
    """Resuming must continue the same run: another loss, weight option, data, optimisation or model is one
    line naming the difference, before anything loads, and nothing in the run's folder changes."""
    from dft.toy import toy_model, toy_tokenizer

    out = finished_run["out"]
    before = (out / "metrics.json").read_text()
    extra = {
        "loss_and_data": ["--loss", "sft", "--data", _arithmetic_jsonl(tmp_path / "other.jsonl")],
        "lora_on_a_full_checkpoint": ["--lora_r", "4"],
        "learning_rate": ["--learning_rate", "1e-3"],
    }.get(case, [])
    if case == "other_architecture":
        toy_model(hidden_size=48, num_layers=1).save_pretrained(tmp_path / "m48")
        toy_tokenizer().save_pretrained(tmp_path / "m48")
        extra = ["--model", tmp_path / "m48"]
    code, _, err = run_cli(
        capsys, "train", *finished_run["args"], "--max_steps", "8", "--resume_from_checkpoint", "true", *extra
    )
    assert code == 2
    assert re.search(match, _one_error_line(err)), err
    assert (out / "metrics.json").read_text() == before and not (out / "checkpoint-8").exists()


def test_resume_with_overwrite_takes_the_new_settings(finished_run, tmp_path, capsys, monkeypatch):
    """--overwrite passes the settings guard (the architecture guard stays): the run then loads."""
    from dft.cli import _loading as cli

    def stop(*args, **kwargs):
        raise cli.UsageError("reached the model load")

    monkeypatch.setattr(cli, "_load_model_and_tokenizer", stop)
    args = [*finished_run["args"], "--max_steps", "8", "--resume_from_checkpoint", "true", "--loss", "sft"]
    code, _, err = run_cli(capsys, "train", *args, "--overwrite", "true")
    assert code == 2 and "reached the model load" in err


def test_extending_a_finished_run_replans_the_schedule(finished_run, capsys):
    """A finished linear schedule ends at lr 0: training the run on to 6 steps continues the 6-step schedule
    at step 3 (lr 5e-5 * 3/6), says so, and does not take a step at lr 0."""
    import shutil

    out = finished_run["root"] / "extended"
    shutil.copytree(finished_run["out"], out)
    args = [a if a != str(finished_run["out"]) else str(out) for a in finished_run["args"]]
    code, stdout, err = run_cli(capsys, "train", *args, "--max_steps", "6", "--resume_from_checkpoint", "true")
    assert code == 0, err[-3000:]
    assert "the run planned 3 steps, now 6: its linear lr schedule is re-planned for 6 steps and continues at " \
        "step 3 (lr 2.5e-05)" in stdout  # fmt: skip
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    lrs = {h["step"]: h["learning_rate"] for h in history if "loss" in h}
    assert lrs[4] == pytest.approx(2.5e-05) and lrs[5] == pytest.approx(5e-05 * 2 / 6)
    assert json.loads((out / "run_config.json").read_text())["resumed_from"].endswith("checkpoint-3")


# ---- optional packages, install names, TRL habits, warnings ---------------------------------------


@pytest.mark.parametrize(
    ("flags", "module", "message"),
    [
        (["--use_liger_kernel", "true"], "liger_kernel", "--use_liger_kernel true needs liger-kernel, which is "
         "not installed: pip install liger-kernel."),
        (["--lora_r", "8"], "peft", "--lora_r needs peft, which is not installed: pip install 'dft-loss[peft]'."),
    ],
)  # fmt: skip
def test_missing_optional_package_is_one_line_before_loading(
    tmp_path, capsys, monkeypatch, no_loading, flags, module, message
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    code, _, err = run_cli(capsys, "train", *flags, "--output_dir", tmp_path / "o")
    assert code == 2 and _one_error_line(err) == f"dft: error: {message}"
    assert not (tmp_path / "o").exists()


def test_install_hints_name_the_distribution():
    """`pip install dft` is an unrelated project: every hint names the distribution of pyproject.toml."""
    root = Path(__file__).resolve().parents[1]
    name = re.search(r'^name = "([^"]+)"', (root / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert name == "dft-loss"
    sources = [p for p in (root / "src" / "dft").rglob("*.py")]
    hints = [h for p in sources for h in re.findall(r"pip install '?\"?([\w.-]+)\[", p.read_text())]
    assert hints and set(hints) == {name}, hints


@pytest.mark.parametrize(
    ("command", "flags", "hint"),
    [
        ("train", ["--dataset_name", "org/data"], "--dataset_name: use --data (a local"),
        ("train", ["--model_name_or_path", "org/model"], "--model_name_or_path: use --model"),
        ("train", ["--completion_only_loss", "true"], "prompt/completion rows train on the completion only"),
        ("train", ["--assistant_only_loss", "true"], "'messages' rows train on the assistant turns only"),
        ("eval", ["--model_name_or_path", "org/model"], "--model_name_or_path: use --model"),
    ],
)
def test_trl_flags_point_to_the_cli_equivalents(tmp_path, capsys, no_loading, command, flags, hint):
    code, _, err = run_cli(capsys, command, *flags, "--output_dir", tmp_path / "o")
    line = _one_error_line(err)
    assert code == 2 and "(TRL's or another trainer's names)" in line and hint in line, line


def test_gradient_checkpointing_flag_warns_nothing(tmp_path):
    """--gradient_checkpointing (renamed activation_checkpointing in transformers 5) is taken under the
    current name: neither it nor the kwargs DFTConfig fills in warns (FutureWarning)."""
    import warnings

    from dft.cli._train_args import parse_train_args

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, config, _ = parse_train_args(["--gradient_checkpointing", "true", "--output_dir", str(tmp_path / "o")])
    assert config.gradient_checkpointing is True
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


# ---- what eval scored -----------------------------------------------------------------------------------


def test_eval_says_which_data_it_scored_and_why_exact_match_is_none(tmp_path, toy_model_dir, capsys):
    chats = [
        {"messages": [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}]},
        {"messages": [{"role": "user", "content": "1+2=?"}, {"role": "assistant", "content": "3"},
                      {"role": "user", "content": "and 2+2?"}]},
    ]  # fmt: skip
    cases = {"shipped": [], "user_turn_last": ["--data", _write_jsonl(tmp_path / "c.jsonl", [chats[1]] * 3)]}
    cases["mixed"] = ["--data", _write_jsonl(tmp_path / "m.jsonl", [chats[0], chats[1]])]
    for name, data in cases.items():
        ev = tmp_path / name
        args = ("eval", "--model", toy_model_dir, *data, "--max_eval_examples", "4", "--max_new_tokens", "2")
        code, out, err = run_cli(capsys, *args, "--output_dir", ev)
        assert code == 0, err[-3000:]
        result = json.loads((ev / "eval_results.json").read_text())
        if name == "shipped":
            assert "eval data: the shipped arithmetic test split (dft's built-in toy task" in out
            assert result["data"] == "shipped arithmetic_test.jsonl" and "eval_exact_match_note" not in result
        elif name == "user_turn_last":
            assert f"eval data: {(tmp_path / 'c.jsonl').resolve()}" in out
            assert result["eval_exact_match"] is None and result["eval_exact_match_examples"] == 0
            assert "exact match: 3 of 3 rows have no reference answer (3 ends with a 'user' turn)" in out
            assert "nothing to score" in result["eval_exact_match_note"]
        else:  # the chat with an answer is scored, the other one skipped and counted
            assert result["eval_exact_match_examples"] == 1 and result["eval_exact_match"] is not None
            assert "1 of 2 rows have no reference answer" in out


@pytest.mark.parametrize("command", ["eval", "inspect", "sample"])
def test_mistyped_flag_is_one_line(tmp_path, capsys, command):
    """eval / inspect / sample: an unknown flag is one line with a did-you-mean (was HfArgumentParser's traceback)."""
    code, _, err = run_cli(
        capsys, command, "--model", tmp_path, "--data", tmp_path / "d.jsonl", "--ouput_dir", tmp_path
    )
    assert code == 2 and "did you mean --ouput_dir -> --output_dir" in _one_error_line(err)


def test_eval_needs_at_least_one_example(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", "--model", tmp_path, "--max_eval_examples", "0")
    assert code == 2 and "--max_eval_examples must be >= 1, got 0" in _one_error_line(err)


def test_eval_table_names_the_exact_match_cap(tmp_path, toy_model_dir, capsys):
    """The two counts of the eval table say what they count: exact match is capped by --max_eval_examples,
    the token metrics cover every row (eval_results.json keeps the bare names)."""
    data = _arithmetic_jsonl(tmp_path / "d.jsonl", n=5)
    code, out, err = run_cli(capsys, "eval", "--model", toy_model_dir, "--data", data, "--max_eval_examples", "2",
                             "--max_new_tokens", "2", "--output_dir", tmp_path / "ev")  # fmt: skip
    assert code == 0, err[-3000:]
    assert re.search(r"^eval_exact_match_examples \(capped by --max_eval_examples=2\) +2$", out, re.M), out
    assert re.search(r"^num_examples \(every row, for the token metrics\) +5$", out, re.M), out
    result = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert result["eval_exact_match_examples"] == 2 and result["num_examples"] == 5


def test_eval_without_data_scores_the_runs_held_out_split(tmp_path, toy_model_dir, capsys):
    """dft train writes its held-out rows (eval_split.jsonl); dft eval --model OUT without --data scores exactly
    those, and says so; a folder without them gets the shipped test split."""
    rows = [json.loads(line) for line in _arithmetic_jsonl(tmp_path / "d.jsonl", n=40).read_text().splitlines()]
    out = tmp_path / "run"
    short = ["--max_steps", "1", "--max_eval_examples", "1", "--save_strategy", "no", "--disable_tqdm", "true"]
    code, stdout, err = run_cli(capsys, "train", "--model", toy_model_dir, "--data", tmp_path / "d.jsonl",
                                "--eval_fraction", "0.1", "--seed", "3", "--output_dir", out, *short)  # fmt: skip
    assert code == 0, err[-3000:]
    assert "eval_split.jsonl" in stdout.strip().splitlines()[-1]  # the wrote line
    held_out = [json.loads(line) for line in (out / "eval_split.jsonl").read_text().splitlines()]
    record = json.loads((out / "run_config.json").read_text())
    assert len(held_out) == record["eval_examples"] == 4 and all(r in rows for r in held_out)
    code, stdout, err = run_cli(capsys, "eval", "--model", out, "--max_eval_examples", "1", "--max_new_tokens", "2")
    assert code == 0, err[-3000:]
    assert f"eval data: the held-out split of the dft train run in {out} (eval_split.jsonl: 10% of --data held out " \
        "(seed 3); --data FILE scores other data)" in stdout  # fmt: skip
    result = json.loads((out / "eval" / "eval_results.json").read_text())
    assert result["num_examples"] == 4 and result["data"] == str((out / "eval_split.jsonl").resolve())
    code, stdout, err = run_cli(capsys, "eval", "--model", toy_model_dir, "--max_eval_examples", "1",
                                "--max_new_tokens", "2", "--output_dir", tmp_path / "ev")  # fmt: skip
    assert code == 0 and "eval data: the shipped arithmetic test split" in stdout, err[-3000:]


def test_the_clis_own_settings_do_not_warn(tmp_path, toy_model_dir, capsys, monkeypatch):
    """torch's pin_memory UserWarning (Trainer's DataLoader on a machine without an accelerator) is hidden
    around Trainer's loops only: another warning raised inside them still reaches the user."""
    import warnings

    from dft.trainer import DFTTrainer

    train = DFTTrainer.train

    def train_and_warn(self, *args, **kwargs):
        warnings.warn("a warning of the user's own", UserWarning, stacklevel=1)
        warnings.warn(
            "'pin_memory' argument is set as true but no accelerator is found, then ...", UserWarning, stacklevel=1
        )
        return train(self, *args, **kwargs)

    monkeypatch.setattr(DFTTrainer, "train", train_and_warn)
    data = _arithmetic_jsonl(tmp_path / "d.jsonl", n=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_cli(capsys, "train", "--model", toy_model_dir, "--data", data, "--output_dir",
                               tmp_path / "o", "--max_steps", "1", "--max_eval_examples", "1", "--save_strategy",
                               "no", "--disable_tqdm", "true")  # fmt: skip
    assert code == 0, err[-3000:]
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "pin_memory" in m], messages
    assert "a warning of the user's own" in messages
    with warnings.catch_warnings(record=True) as caught:  # outside the CLI's calls the filter is gone
        warnings.simplefilter("always")
        warnings.warn("'pin_memory' argument is set as true but no accelerator is found", UserWarning, stacklevel=1)
    assert len(caught) == 1
