"""The study's own pieces (examples/study): the shipped base, the tasks, the statistics, the results file."""

import json
import random
import subprocess
import sys
from pathlib import Path

STUDY = Path(__file__).resolve().parents[1] / "examples" / "study"
sys.path.insert(0, str(STUDY))

import lab  # noqa: E402
import study  # noqa: E402
import tasks  # noqa: E402


def test_shipped_base_has_a_prior_on_the_target():
    """The base solves part of the target task (the 15-70% band) and keeps its pretraining skills."""
    base = lab.load_base()
    sets = tasks.eval_sets(100)
    em = lab.exact_match(base, sets["id"])
    assert 0.15 <= em <= 0.70, em
    assert lab.exact_match(base, sets["keep_sub"]) > 0.5
    assert sum(p.numel() for p in base.parameters()) < 2_000_000
    assert (STUDY / "base" / "model.safetensors").stat().st_size < 5_000_000


def test_shipped_tokenizer_matches_the_task_encoding():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lab.BASE_DIR)
    text = "Q: code abc\n23+58=81. A: 81\n"
    assert tok(text)["input_ids"] == [tasks.BOS, *tasks.encode(text)]
    assert tok.decode(tasks.encode(text)) == text


def test_pretrain_smoke_writes_a_loadable_base(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(STUDY / "pretrain.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "pretrain.json").read_text())
    assert record["settings"]["steps"] == 8 and set(record["exact_match"]) >= {"id", "keep_code"}
    lab.load_base(tmp_path)
    from transformers import AutoTokenizer

    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.x and 5.x
    assert AutoTokenizer.from_pretrained(tmp_path)("Q: 1+2=?\n")["input_ids"] == [
        tasks.BOS,
        *tasks.encode("Q: 1+2=?\n"),
    ]


def test_corrupt_changes_one_digit_of_a_result():
    rng = random.Random(0)
    for e in tasks.sums(200, rng, terms=3, digits=2):
        bad = tasks.corrupt(e, rng)["completion"]
        diff = [i for i, (a, b) in enumerate(zip(e["completion"], bad)) if a != b]
        assert len(bad) == len(e["completion"]) and len(diff) == 1 and bad[diff[0]].isdigit()
        before = e["completion"][: diff[0]]
        assert before.endswith("A: ") or "=" in before.split(";")[-1].split(".")[0] or before[-1].isdigit()


def test_knowledge_facts_are_new():
    old = {e["prompt"] for e in tasks.code_table(300, tasks.PRETRAIN_TABLE_SEED)}
    facts = tasks.knowledge_facts(100, seed=3)
    assert len(facts) == 100 and not old & {e["prompt"] for e in facts}


def test_result_spans_are_the_computed_tokens():
    assert lab.result_spans("23+58=81; 81+7=88. A: 88\n") == [(6, 8), (15, 17)]
    assert lab.result_spans("A: 417\n") == [(3, 6)]


def test_teacher_forced_scores_the_computed_tokens_only():
    """A model right on every step result and wrong everywhere else scores acc 1 / logp 0; wrong on one
    result digit, it scores below 1."""
    import torch

    examples = tasks.sums(3, random.Random(1), terms=3, digits=2)
    b = lab.batch(examples, max_length=10**6)

    def oracle(wrong_first_result: bool):
        logits = torch.zeros(*b["input_ids"].shape, tasks.VOCAB_SIZE)
        logits.scatter_(-1, torch.roll(b["input_ids"], -1, dims=1)[..., None], 1e4)
        for i, e in enumerate(examples):
            right = torch.zeros(logits.shape[1], dtype=torch.bool)
            for start, end in lab.result_spans(e["completion"]):
                right[len(e["prompt"]) + start : len(e["prompt"]) + end] = True  # logits row predicting them
            if wrong_first_result:
                right[len(e["prompt"]) + lab.result_spans(e["completion"])[0][0]] = False
            logits[i, ~right] = logits[i, ~right].roll(1, dims=-1)

        class Oracle(torch.nn.Module):
            def forward(self, input_ids, attention_mask):
                return type("Out", (), {"logits": logits})()

        return Oracle()

    got = lab.teacher_forced(oracle(False), examples)
    assert got["result_acc"] == 1.0 and got["result_logp"] > -1e-6
    got = lab.teacher_forced(oracle(True), examples)
    assert got["result_acc"] < 1.0 and got["result_logp"] < -1.0


def test_interval_and_grid_extension():
    s = study.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["mean"] == 3.0 and abs(s["ci95"][1] - (3.0 + 2.776 * (2.5**0.5) / 5**0.5)) < 1e-9
    assert study.interval([0.5])["ci95"] == [0.5, 0.5]

    def runs(scores):
        return [{"loss": "sft", "lr": lr, "metrics": {"val_exact_match": v}} for lr, v in scores.items()]

    assert study.extension(runs({1e-4: 0.1, 3e-4: 0.2, 1e-3: 0.3, 3e-3: 0.4}), "sft", "val_exact_match") == 1e-2
    assert study.extension(runs({1e-4: 0.5, 3e-4: 0.2, 1e-3: 0.3, 3e-3: 0.4}), "sft", "val_exact_match") == 3e-5
    assert study.extension(runs({1e-4: 0.1, 3e-4: 0.5, 1e-3: 0.3, 3e-3: 0.4}), "sft", "val_exact_match") is None


def test_committed_results_follow_the_schema():
    """results.json: schema dft-study/2, >= 5 seeds, >= 4 lrs per loss, the chosen lr inside its grid."""
    result = json.loads((STUDY / "results" / "results.json").read_text())
    assert result["schema"] == "dft-study/2" and len(result["seeds"]) >= 5 and "--smoke" not in result["command"]
    assert set(result["experiments"]) == {"reasoning", "noisy", "forgetting", "knowledge"}
    for name, exp in result["experiments"].items():
        assert set(exp["best_lr"]) == set(study.LOSSES) and exp["base"]
        for loss, grid in exp["lr_grid"].items():
            assert len(grid) >= 4 and grid == sorted(grid)
            best = exp["best_lr"][loss]
            assert grid[0] < best < grid[-1] or best in (study.LADDER[0], study.LADDER[-1]), (name, loss, grid, best)
            assert sum(r["loss"] == loss and r["lr"] == best for r in exp["runs"]) == len(result["seeds"])
        for row in exp["summary"]:
            assert {"loss", "metric", "mean", "std", "ci95"} <= set(row) and row["ci95"][0] <= row["mean"] <= row[
                "ci95"
            ][1]
    assert (STUDY / "results" / "results.md").exists() and (STUDY / "results" / "study.png").exists()
