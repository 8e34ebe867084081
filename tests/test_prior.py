"""dft.inspect_prior / `dft inspect`: figures against a float64 teacher-forced reference, the rule on the
study's data, the CLI's outputs and bad inputs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dft
from dft.prior import prior_figures, recommend
from tests.helpers.tiny_models import tiny_model, token_batch

STUDY = Path(__file__).resolve().parents[1] / "examples" / "study"


def _reference_p(model, batches):
    """Teacher-forced p of every supervised target: full logits, log_softmax in float64, gather."""
    ps, ys = [], []
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double()
            y = b["labels"][:, 1:]
            valid = y != -100
            logp = F.log_softmax(logits, -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            ps.append(logp.exp()[valid])
            ys.append(y[valid])
    return torch.cat(ps), torch.cat(ys)


def test_figures_equal_a_float64_reference():
    model = tiny_model("llama").double().train()
    batches = [token_batch(3, 12, seed=s) for s in range(3)]
    special = [5, 9]
    report = dft.inspect_prior(model, batches, special_ids=special)
    p, y = _reference_p(model, batches)
    assert report.supervised_tokens == p.numel()
    assert abs(report.mean_p - p.mean().item()) < 1e-9
    for q in (0.1, 0.5, 0.9):
        assert abs(report.quantiles[str(q)] - float(np.quantile(p.numpy(), q))) < 1e-9
    for t in (0.001, 0.01, 0.1):
        assert report.frac_below[str(t)] == pytest.approx((p < t).double().mean().item())
    sp = p[torch.isin(y, torch.tensor(special))]
    assert report.special_tokens["supervised_tokens"] == sp.numel() > 0
    assert abs(report.special_tokens["mean_p"] - sp.mean().item()) < 1e-9
    assert sum(report.histogram["counts"]) == p.numel() and sum(report.histogram["special_counts"]) == sp.numel()
    assert set(report.as_dict()) >= {
        "supervised_tokens", "mean_p", "quantiles", "frac_below", "special_tokens", "recommendation", "reason"
    }  # fmt: skip
    assert model.training  # the pass runs in eval mode and restores the mode it found


def test_rule_thresholds():
    def figures(low, mean_p=0.8):
        return {"supervised_tokens": 100, "mean_p": mean_p, "frac_below": {"0.01": low}}

    assert recommend(figures(0.002))[0] == "dft"
    assert recommend(figures(0.015))[0] == "dft_floor"
    assert recommend(figures(0.2))[0] == "mix"
    assert recommend(figures(0.5))[0] == "sft"
    assert recommend(figures(0.0, mean_p=0.04), vocab_size=25)[0] == "sft"  # near uniform: no prior
    assert recommend(prior_figures(torch.zeros(0)))[0] == "sft"
    assert "mean p 0.800, 20.0% of the supervised tokens at p < 0.01" in recommend(figures(0.2))[1]
    new_stop = {"supervised_tokens": 30, "mean_p": 1e-6, "frac_below": {"0.01": 1.0}}
    assert "--dft_ce_tokens special" in recommend(figures(0.03), 1000, new_stop)[1]
    assert "dft_ce_tokens" not in recommend(figures(0.03), 1000, figures(0.0))[1]


def test_study_base_reasoning_goes_to_dft_and_new_facts_away_from_it():
    """The shipped study base: its mean p equals a teacher-forced float64 computation to 2e-3; the
    reasoning demonstrations are sent to DFT (or the floor), the new fact table away from plain DFT."""
    sys.path.insert(0, str(STUDY))
    try:
        import lab
        import study
    finally:
        sys.path.remove(str(STUDY))
    base = lab.load_base()
    for experiment, allowed in (("reasoning", {"dft", "dft_floor"}), ("knowledge", {"mix", "sft"})):
        data = study.training_data(experiment, 0, study.FULL)
        batches = [lab.batch(data[i : i + 64]) for i in range(0, len(data), 64)]
        report = dft.inspect_prior(base, batches)
        p, _ = _reference_p(base, batches)
        assert abs(report.mean_p - p.mean().item()) < 2e-3
        assert report.recommendation in allowed, (experiment, report.reason)


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "dft", "inspect", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_cli_writes_json_and_plot(tmp_path):
    out = tmp_path / "insp"
    proc = _cli("--max_examples", "64", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "inspect.json").read_text())
    assert report["supervised_tokens"] > 0 and report["recommendation"] in ("dft", "dft_floor", "mix", "sft")
    assert (out / "inspect.png").stat().st_size > 0
    assert "recommendation:" in proc.stdout


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing_data", "data path not found"),
        ("missing_model", "model path not found"),
        ("wrong_columns", r"w.jsonl:1: the dataset has columns \['question'\]"),
        ("empty", "no examples"),
        ("bad_number", "--max_examples must be >= 1"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, case, match):
    args = {
        "missing_data": ["--data", tmp_path / "nope.jsonl"],
        "missing_model": ["--model", tmp_path / "no-model"],
        "wrong_columns": ["--data", tmp_path / "w.jsonl"],
        "empty": ["--data", tmp_path / "e.jsonl"],
        "bad_number": ["--max_examples", "0"],
    }[case]
    (tmp_path / "w.jsonl").write_text('{"question": "a"}\n')
    (tmp_path / "e.jsonl").write_text("")
    proc = _cli("--output_dir", tmp_path / "o", *args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert __import__("re").search(match, proc.stderr), proc.stderr
    assert not (tmp_path / "o").exists()


def _train_with_warnings(tmp_path, model, tok=None, rows=None, **config):
    import warnings

    from datasets import Dataset

    from dft.data import collator, prepare_dataset
    from dft.toy import toy_tokenizer

    tok = tok or toy_tokenizer()
    rows = rows or [{"prompt": "12+7=", "completion": "19"}] * 8
    data, _ = prepare_dataset(Dataset.from_list(rows), tok, max_length=48)
    args = dft.DFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, **config
    )
    trainer = dft.DFTTrainer(model=model, args=args, train_dataset=data, data_collator=collator(tok))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return [str(w.message) for w in caught if "step 0's batches" in str(w.message)], trainer


def test_trainer_warns_when_the_prior_says_dft_cannot_learn(tmp_path):
    """An untrained model (p ~ 1/V): a DFT run warns once before its first optimizer step, naming 'sft'; SFT and
    the CE -> DFT warm-up (the remedy) do not; the rule is dft inspect's."""
    from dft.toy import toy_model

    said, trainer = _train_with_warnings(tmp_path, toy_model())
    assert len(said) == 1 and "recommend 'sft'" in said[0] and "no prior" in said[0], said
    assert trainer.check_prior()[0] == "sft"  # the same rule as dft inspect (dft.prior.recommend)
    figures = {"supervised_tokens": 1, "mean_p": 0.045, "frac_below": {"0.01": 0.0}}
    assert recommend(figures, vocab_size=23)[0] == "sft"
    assert not _train_with_warnings(tmp_path, toy_model(), loss_type="sft")[0]
    assert not _train_with_warnings(tmp_path, toy_model(), dft_warmup_steps=10)[0]


def test_trainer_is_quiet_on_a_base_with_a_prior(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(__file__).resolve().parents[1]
    base = AutoModelForCausalLM.from_pretrained(root / "examples" / "study" / "base")
    tok = AutoTokenizer.from_pretrained(root / "examples" / "study" / "base")
    rows = [json.loads(line) for line in (root / "src" / "dft" / "assets" / "arithmetic_train.jsonl").open()][:8]
    said, trainer = _train_with_warnings(tmp_path, base, tok, rows)
    assert not said and trainer.check_prior() is None
