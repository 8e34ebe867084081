"""dft.sampling / dft.verifiers / `dft sample`: generate, verify, keep; the offline-RL experiment's smoke run."""

import json
import math
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dft import sampling
from dft.verifiers import ExactVerifier, VerifierError, extract_answer, load_verifier, reward_of

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "examples" / "study"
BASE = STUDY / "base"  # the study's 0.6 M base: it solves part of these sums, so some samples verify
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}\n"
    "{% else %}Q: {{ m['content'] }}\n{% endif %}{% endfor %}"
)


def dft_cli(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "dft", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _sums(n: int, seed: int = 0) -> list[dict]:
    """3-term sums with worked solutions (the study's target task), prompt/completion rows."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = (rng.randint(0, 99) for _ in range(3))
        out.append(
            {
                "prompt": f"Q: {a}+{b}+{c}=?\n",
                "completion": f"{a}+{b}={a + b}; {a + b}+{c}={a + b + c}. A: {a + b + c}\n",
            }
        )
    return out


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(BASE), AutoTokenizer.from_pretrained(BASE)


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    """The study base saved with a chat template: user turns render as 'Q: ...\\n', assistant turns as-is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("chat-base")
    tok = AutoTokenizer.from_pretrained(BASE)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    AutoModelForCausalLM.from_pretrained(BASE).save_pretrained(path)
    return path


# ---- verifiers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, answer",
    [
        ("23+58=81; 81+7=88. A: 88\n", "88"),
        ("so the answer is \\boxed{\\frac{1}{2}}, not 3", "\\frac{1}{2}"),
        ("\\boxed{a} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("52-17=35", "35"),
        ("x = -5", "-5"),
        ("we have 1,000 apples", "1,000"),
        ("  Paris  ", "Paris"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_exact_verifier_compares_final_answers():
    exact = ExactVerifier()
    assert exact(None, "2+3=5. A: 5", "2+3=5. A: 5\n") == 1.0
    assert exact(None, "2+3=6. A: 5", "2+3=5. A: 5\n") == 1.0  # the final answer only, not the steps
    assert exact(None, "A: 5.0", "A: 5") == 1.0 and exact(None, "1,000", "1000") == 1.0
    assert exact(None, "A: 6", "A: 5") == 0.0 and exact(None, "A: -5", "A: 5") == 0.0
    assert exact(None, "\\boxed{x+1}", "so \\boxed{x + 1}.") == 1.0
    assert exact(None, "\\boxed{x+2}", "\\boxed{x+1}") == 0.0
    assert exact(None, "Paris.", "paris") == 0.0 and exact(None, "Paris.", "Paris") == 1.0
    by_regex = ExactVerifier(answer_regex=r"#### (\S+)")
    assert by_regex(None, "3 then 4 #### 7 and 9", "#### 7") == 1.0
    assert by_regex(None, "no marker 7", "#### 7") == 0.0  # no match: never accepted


def test_math_verifier_when_installed():
    pytest.importorskip("math_verify")
    math_v = load_verifier("math")
    assert math_v(None, "so \\boxed{\\frac{1}{2}}", "$0.5$") == 1.0
    assert math_v(None, "so \\boxed{\\frac{1}{3}}", "$0.5$") == 0.0
    assert ExactVerifier()(None, "so \\boxed{\\frac{1}{2}}", "$0.5$") == 0.0  # what math adds over exact


def test_math_verifier_missing_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify raises ImportError
    with pytest.raises(VerifierError, match=r"pip install 'dft-loss\[math\]'"):
        load_verifier("math")


def test_reward_of_rejects_non_numbers():
    assert reward_of(lambda p, c, r: True, "p", "c", "r") == 1.0
    for bad in ("1.0", None, float("nan"), [1]):
        with pytest.raises(VerifierError, match="not a"):
            reward_of(lambda p, c, r, bad=bad: bad, "p", "c", "r")
    with pytest.raises(VerifierError, match="raised ZeroDivisionError"):
        reward_of(lambda p, c, r: 1 / 0, "p", "c", "r")


def test_pass_at_k_matches_enumeration():
    from itertools import combinations

    for n, c in [(4, 0), (4, 1), (4, 3), (6, 2)]:
        passed = [i < c for i in range(n)]
        for k in range(1, n + 1):
            subsets = list(combinations(range(n), k))
            brute = sum(any(passed[i] for i in s) for s in subsets) / len(subsets)
            assert math.isclose(sampling.pass_at_k(n, c, k), brute)


# ---- the Python API ------------------------------------------------------------------------------------


def test_sampling_is_reproducible_and_rewards_are_recomputable(base):
    model, tok = base
    prompts = _sums(12)
    kwargs = {"num_samples": 4, "temperature": 1.0, "max_new_tokens": 40, "batch_size": 5}
    rows = sampling.sample(model, tok, prompts, seed=3, **kwargs)
    assert len(rows) == 48 and [(r["prompt_index"], r["sample_index"]) for r in rows] == [
        (i, j) for i in range(12) for j in range(4)
    ]
    assert sampling.sample(model, tok, prompts, seed=3, **kwargs) == rows
    other = sampling.sample(model, tok, prompts, seed=4, **kwargs)
    assert [r["completion"] for r in other] != [r["completion"] for r in rows]
    assert len({r["completion"] for r in rows}) > 12  # temperature 1: the K samples of a prompt differ
    for r in rows:  # the reward is the final answer's match, recomputed here from the text
        assert (
            r["reference"] == prompts[r["prompt_index"]]["completion"]
            and r["prompt"] == prompts[r["prompt_index"]]["prompt"]
        )
        want = r["reference"].split("A: ")[-1].strip()
        got = r["completion"].split("A: ")[-1].strip() if "A: " in r["completion"] else None
        assert r["reward"] == float(got == want), r
        assert r["accepted"] == (r["reward"] == 1.0 and r["finished"])
    assert 0 < sum(r["accepted"] for r in rows) < len(rows)  # the base solves some, not all
    greedy = sampling.sample(model, tok, prompts, temperature=0.0, num_samples=2, max_new_tokens=40)
    assert all(greedy[2 * i]["completion"] == greedy[2 * i + 1]["completion"] for i in range(12))
    summary = sampling.summarize(rows)
    assert summary["accepted"] == sum(r["accepted"] for r in rows) and summary["samples_per_prompt"] == 4
    assert summary["prompts_without_accepted"] == sum(
        not any(r["accepted"] for r in rows if r["prompt_index"] == i) for i in range(12)
    )
    assert summary["pass_at_k"]["1"] == pytest.approx(sum(r["reward"] for r in rows) / 48)


def test_max_new_tokens_cut_is_never_accepted(base):
    model, tok = base
    rows = sampling.sample(model, tok, _sums(3), num_samples=2, max_new_tokens=3, verifier=lambda p, c, r: 1.0)
    assert all(not r["finished"] and r["reward"] == 1.0 and not r["accepted"] for r in rows)
    assert all(r["num_tokens"] == 3 for r in rows)
    assert sampling.summarize(rows)["verified_but_unfinished"] == 6


def test_score_verifies_rows_from_another_generator():
    rows = [  # what a vLLM loop writes: prompt, completion, reference
        {"prompt": "Q: 1+2=?\n", "completion": "1+2=3. A: 3", "reference": "1+2=3. A: 3\n"},
        {"prompt": "Q: 1+2=?\n", "completion": "1+2=4. A: 4", "reference": "1+2=3. A: 3\n"},
    ]
    scored = sampling.score(rows, "exact")
    assert [r["reward"] for r in scored] == [1.0, 0.0] and sampling.accepted(scored) == [
        {"prompt": "Q: 1+2=?\n", "completion": "1+2=3. A: 3"}
    ]
    with pytest.raises(VerifierError, match="sample 1 has no reference"):
        sampling.score([{"prompt": "p", "completion": "c"}], "exact")


def test_check_refuses_bad_arguments_before_generating():
    prompts = sampling.read_prompts(_sums(2))
    for kwargs, match in [
        ({"num_samples": 0}, "num_samples must be >= 1"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            sampling.check(prompts, "exact", **kwargs)
    with pytest.raises(ValueError, match="row 1 has no reference"):
        sampling.check(sampling.read_prompts(["Q: 1+1=?\n"]), "exact")
    assert sampling.check(sampling.read_prompts(["Q: 1+1=?\n"]), lambda p, c, r: 0.5)  # user verifiers may


# ---- the command ---------------------------------------------------------------------------------------

VERIFIER_MODULE = '''
import json, os

def reward(prompt, completion, reference):
    """1.0 when the completion's final answer is even (a made-up reward that ignores the reference)."""
    with open(os.environ["CALLS"], "a") as f:
        f.write(json.dumps([prompt, completion, reference]) + "\\n")
    answer = completion.split("A: ")[-1].strip()
    return float(answer.isdigit() and int(answer) % 2 == 0)

def raises(prompt, completion, reference):
    raise KeyError("oops")

def text(prompt, completion, reference):
    return "yes"

not_callable = 3
'''


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """`dft sample` on the study base, 16 prompts x 4 samples, exact verifier."""
    tmp = tmp_path_factory.mktemp("sample")
    data = _write_jsonl(tmp / "prompts.jsonl", _sums(16, seed=1))
    out = tmp / "samples"
    t0 = time.time()
    proc = dft_cli("sample", "--model", BASE, "--data", data, "--num_samples", 4, "--temperature", 1.0,
                   "--max_new_tokens", 40, "--verifier", "exact", "--seed", 5, "--output_dir", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"dft sample: {time.time() - t0:.1f}s")
    return tmp, data, out, proc.stdout


def test_cli_writes_samples_accepted_and_summary(sampled, base):
    tmp, data, out, stdout = sampled
    rows = _read_jsonl(out / "samples.jsonl")
    acc = _read_jsonl(out / "accepted.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 64 and {"prompt", "completion", "reference", "reward", "sample_index"} <= set(rows[0])
    prompts = _sums(16, seed=1)
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts for _ in range(4)]
    assert [r["reference"] for r in rows] == [p["completion"] for p in prompts for _ in range(4)]

    def solved(row) -> bool:  # by hand: the number after the completion's last "A: " is the prompt's sum
        a, b, c = map(int, re.fullmatch(r"Q: (\d+)\+(\d+)\+(\d+)=\?\n", row["prompt"]).groups())
        answer = row["completion"].rsplit("A: ", 1)[-1].strip()
        return "A: " in row["completion"] and answer.isdigit() and int(answer) == a + b + c

    assert [r["reward"] for r in rows] == [float(solved(r)) for r in rows]
    assert [r["accepted"] for r in rows] == [solved(r) and r.get("finished", True) for r in rows]
    assert 0 < sum(map(solved, rows)) < len(rows)  # some right, some wrong: both sides of the check seen
    assert acc == [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows if r["accepted"]]
    assert summary["accepted"] == len(acc) > 0 and summary["samples"] == 64 and summary["verifier"] == "exact"
    assert f"{len(acc)} accepted" in stdout
    model, tok = base  # the command's rows are the API's rows with the same seed
    api = sampling.sample(model, tok, _sums(16, seed=1), num_samples=4, max_new_tokens=40, seed=5)
    assert [r["completion"] for r in api] == [r["completion"] for r in rows]


def test_top_k_one_samples_the_greedy_completion(tmp_path, base, capsys):
    """`dft sample --top_k 1` keeps the most likely token only: at temperature 1 every sample is the greedy
    completion (the same command without it samples different completions, see `sampled`)."""
    from dft.cli import main

    prompts = _sums(3, seed=2)
    data = _write_jsonl(tmp_path / "p.jsonl", prompts)
    args = ["--model", BASE, "--data", data, "--num_samples", 3, "--temperature", 1.0, "--top_k", 1]
    args += ["--max_new_tokens", 24, "--seed", 5, "--disable_tqdm", "true", "--output_dir", tmp_path / "s"]
    assert main(["sample", *map(str, args)]) == 0
    assert "(top_p 1, top_k 1, max 24 new tokens)" in capsys.readouterr().out
    rows = _read_jsonl(tmp_path / "s" / "samples.jsonl")
    model, tok = base
    greedy = sampling.sample(model, tok, prompts, num_samples=1, temperature=0.0, max_new_tokens=24)
    assert [r["completion"] for r in rows] == [g["completion"] for g in greedy for _ in range(3)]


def test_accepted_jsonl_trains(sampled):
    tmp, _, out, _ = sampled
    run = tmp / "rft"
    proc = dft_cli("train", "--model", BASE, "--data", out / "accepted.jsonl", "--loss", "dft", "--max_steps", 2,
                   "--per_device_train_batch_size", 4, "--max_eval_examples", 1, "--eval_fraction", 0.2,
                   "--report_to", "none", "--disable_tqdm", "true", "--output_dir", run)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert any("loss" in h for h in metrics["log_history"]) and metrics["final"]["eval_ce"] > 0


def test_training_on_every_sample_is_refused(sampled, tmp_path, capsys):
    """samples.jsonl holds the rejected samples too: dft train refuses it in one line, naming accepted.jsonl."""
    _, _, out, _ = sampled
    from dft.cli import main

    assert main(["train", "--model", str(BASE), "--data", str(out / "samples.jsonl"), "--output_dir",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "is dft sample's samples.jsonl" in err and "accepted.jsonl" in err, err
    assert not (tmp_path / "o").exists()


def test_user_verifier_is_called(tmp_path, monkeypatch):
    (tmp_path / "myreward.py").write_text(VERIFIER_MODULE)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("CALLS", str(calls))
    data = _write_jsonl(tmp_path / "p.jsonl", _sums(4))
    proc = dft_cli("sample", "--model", BASE, "--data", data, "--num_samples", 2, "--max_new_tokens", 40,
                   "--verifier", "myreward:reward", "--threshold", 0.5, "--output_dir", tmp_path / "s",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _read_jsonl(tmp_path / "s" / "samples.jsonl")
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(seen) == 1 + len(rows)  # one probe on row 1 before generating, then every sample
    assert seen[0] == [_sums(4)[0]["prompt"], _sums(4)[0]["completion"], _sums(4)[0]["completion"]]
    assert [s[1] for s in seen[1:]] == [r["completion"] for r in rows]
    for r in rows:
        answer = r["completion"].split("A: ")[-1].strip()
        assert r["reward"] == float(answer.isdigit() and int(answer) % 2 == 0)
    # the same function by file path
    proc = dft_cli("sample", "--model", BASE, "--data", data, "--num_samples", 1, "--max_new_tokens", 40,
                   "--verifier", f"{tmp_path / 'myreward.py'}:reward", "--output_dir", tmp_path / "s2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_prompts_without_references_sample_with_a_user_verifier(tmp_path, monkeypatch):
    """Prompt rows without a completion (or some with one): a verifier that needs no reference gets None."""
    (tmp_path / "myreward.py").write_text(VERIFIER_MODULE)
    monkeypatch.setenv("CALLS", str(tmp_path / "calls.jsonl"))
    sums = _sums(2)
    data = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": sums[0]["prompt"]}, sums[1]])
    proc = dft_cli("sample", "--model", BASE, "--data", data, "--num_samples", 1, "--max_new_tokens", 40,
                   "--verifier", "myreward:reward", "--output_dir", tmp_path / "s", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _read_jsonl(tmp_path / "s" / "samples.jsonl")
    assert [r["reference"] for r in rows] == [None, sums[1]["completion"]]


def test_chat_rows_round_trip(tmp_path, chat_base):
    from transformers import AutoTokenizer

    from dft.data import load_local_dataset, prepare_dataset

    chat = [
        {"messages": [{"role": "user", "content": e["prompt"][3:-1]}, {"role": "assistant", "content": e["completion"][:-1]}]}
        for e in _sums(8, seed=2)
    ]  # fmt: skip
    data = _write_jsonl(tmp_path / "chat.jsonl", chat)
    out = tmp_path / "s"
    proc = dft_cli("sample", "--model", chat_base, "--data", data, "--num_samples", 4, "--max_new_tokens", 40,
                   "--output_dir", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _read_jsonl(out / "samples.jsonl")
    for r in rows:
        assert r["prompt"] == chat[r["prompt_index"]]["messages"][:1]
        assert r["reference"] == chat[r["prompt_index"]]["messages"][1]["content"]
    accepted = _read_jsonl(out / "accepted.jsonl")
    assert accepted, "the base answers some of these in chat form too"
    assert accepted == [
        {"messages": [*r["prompt"], {"role": "assistant", "content": r["completion"]}]} for r in rows if r["accepted"]
    ]
    tok = AutoTokenizer.from_pretrained(chat_base)
    prepared, report = prepare_dataset(load_local_dataset(out / "accepted.jsonl"), tok, 128)
    assert report.kept == len(accepted)
    first = prepared[0]  # the supervised tokens are the sampled completion + EOS
    supervised = [t for t, lab in zip(first["input_ids"], first["labels"]) if lab != -100]
    assert tok.decode(supervised) == accepted[0]["messages"][-1]["content"] + "\n"


@pytest.mark.parametrize(
    "case, match",
    [
        ("no_reference", "row 1 has no reference answer"),
        ("text_rows", "expected 'prompt' (+ 'completion', the reference) or 'messages' (chat) to sample from"),
        ("prompt_only_exact", "row 1 has no reference answer"),
        ("k0", "--num_samples must be >= 1, got 0"),
        ("t_negative", "--temperature must be >= 0"),
        ("top_p", "--top_p must be in"),
        ("unknown_verifier", "--verifier must be exact, math or MODULE:FUNCTION"),
        ("missing_module", "cannot import nosuchmodule"),
        ("missing_function", "has no attribute 'nope'"),
        ("not_callable", "not a function"),
        ("raises", "raised KeyError"),
        ("non_number", "returned str 'yes', not a number"),
        ("bad_regex", "not a valid regular expression"),
        ("regex_with_math", "--answer_regex applies to --verifier exact only"),
        ("not_empty", "exists and is not empty"),
        ("missing_data", "data path not found"),
    ],
)
def test_bad_input_exits_2_before_generating(tmp_path, case, match):
    (tmp_path / "myreward.py").write_text(VERIFIER_MODULE)
    good = _write_jsonl(tmp_path / "ok.jsonl", _sums(3))
    out = tmp_path / "s"
    flags = {
        "no_reference": ["--data", _write_jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "1+1"}]}])],
        "text_rows": ["--data", _write_jsonl(tmp_path / "t.jsonl", [{"text": "Q: 1+1=?\n"}])],
        "prompt_only_exact": ["--data", _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: 1+1=?\n"}])],
        "k0": ["--num_samples", "0"],
        "t_negative": ["--temperature", "-1"],
        "top_p": ["--top_p", "1.5"],
        "unknown_verifier": ["--verifier", "exactly"],
        "missing_module": ["--verifier", "nosuchmodule:reward"],
        "missing_function": ["--verifier", "myreward:nope"],
        "not_callable": ["--verifier", "myreward:not_callable"],
        "raises": ["--verifier", "myreward:raises"],
        "non_number": ["--verifier", "myreward:text"],
        "bad_regex": ["--answer_regex", "(unclosed"],
        "regex_with_math": ["--verifier", "math", "--answer_regex", "A: (\\d+)"],
        "not_empty": [],
        "missing_data": ["--data", tmp_path / "nope.jsonl"],
    }[case]  # fmt: skip
    if case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    args = ["sample", "--model", BASE, "--data", good, "--output_dir", out, *flags]
    t0 = time.time()
    proc = dft_cli(*args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, (case, proc.stderr[-2000:])
    assert len(proc.stderr.strip().splitlines()) == 1 and match in proc.stderr, proc.stderr
    assert "Loading weights" not in proc.stderr and "dft sample:" not in proc.stderr  # no model, no generation
    assert (not out.exists()) or case == "not_empty", case
    print(f"{case}: exit 2 after {time.time() - t0:.1f}s")


def test_two_ranks_sample_their_shards_and_main_writes(tmp_path, base):
    """torchrun, 2 gloo ranks: each generates every other batch; the files equal one process's rows."""
    from tests.dist.launch import run_bounded

    data = _write_jsonl(tmp_path / "p.jsonl", _sums(10, seed=4))
    out = tmp_path / "s"
    t0 = time.time()
    run_bounded([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "dft", "sample", "--model", str(BASE), "--data", str(data), "--num_samples", "3",
                 "--max_new_tokens", "40", "--batch_size", "3", "--seed", "2", "--disable_tqdm", "true",
                 "--output_dir", str(out)], timeout=120)  # fmt: skip
    elapsed = time.time() - t0
    rows = _read_jsonl(out / "samples.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(rows) == 30
    model, tok = base
    one = sampling.sample(model, tok, _sums(10, seed=4), num_samples=3, max_new_tokens=40, batch_size=3, seed=2)
    assert [(r["prompt_index"], r["completion"], r["reward"]) for r in rows] == [
        (r["prompt_index"], r["completion"], r["reward"]) for r in one
    ]
    print(f"2 ranks: {elapsed:.1f}s")


# ---- the study's offline-RL experiment -----------------------------------------------------------------


def _load_offline_rl():
    sys.path.insert(0, str(STUDY))
    try:
        import offline_rl
    finally:
        sys.path.remove(str(STUDY))
    return offline_rl


def test_offline_rl_smoke_runs(tmp_path):
    """`offline_rl.py --smoke` (the CI setting): every data set x loss trained, accepted sets measured, summary."""
    out = tmp_path / "offline_rl.json"
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(STUDY / "offline_rl.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"offline_rl --smoke: {time.time() - t0:.1f}s")
    result = json.loads(out.read_text())
    assert result["complete"] and result["command"].endswith("--smoke")
    done = {(r["data"], r["loss"]) for r in result["runs"]}
    losses = set(_load_offline_rl().LOSSES)
    assert done == {("gold", "sft"), ("gold", "dft")} | {(d, loss) for d in ("rft", "rft_round2") for loss in losses}
    for key in ("accepted", "accepted_round2"):
        a = result[key]["0"]
        assert 0 <= a["accepted"] <= a["samples"] == 2 * result["config"]["n_demos"]
        assert a["acceptance_rate"] == a["accepted"] / a["samples"]
    rft = result["experiments"]["rft"]
    assert set(rft["best_lr"]) == losses and rft["summary"]["dft"]["paired"]["rft_sft"]["id_exact_match"]["n"] == 1
    assert "| base's verified samples | DFT |" in proc.stdout


def test_committed_offline_rl_results():
    """results/offline_rl.json: complete, >= 5 seeds, every loss on the same accepted samples at an interior lr,
    paired differences over every seed, the docs' table made from it (tests/test_results.py recomputes every
    summary and interval from the runs)."""
    offline_rl = _load_offline_rl()
    result = json.loads((STUDY / "results" / "offline_rl.json").read_text())
    assert result["complete"] and "--smoke" not in result["command"] and len(result["seeds"]) >= 5
    assert set(result["accepted"]) == {str(s) for s in result["seeds"]}
    rft = result["experiments"]["rft"]
    ladder = offline_rl.study.LADDER
    for loss, grid in rft["lr_grid"].items():
        best = rft["best_lr"][loss]
        assert len(grid) >= 4 and (grid[0] < best < grid[-1] or best in (ladder[0], ladder[-1])), (loss, grid, best)
        seeds = [r["seed"] for r in result["runs"] if r["data"] == "rft" and r["loss"] == loss and r["lr"] == best]
        assert sorted(seeds) == result["seeds"]  # every seed: the same accepted samples for every loss
    for loss in ("dft", "dft_floor", "asft"):  # the values of the means and intervals: tests/test_results.py
        assert rft["summary"][loss]["paired"]["rft_sft"]["id_exact_match"]["n"] == len(result["seeds"])
    assert set(result["experiments"]["gold"]["summary"]) == {"sft", "dft"}
    page = (ROOT / "docs" / "offline-rl.md").read_text()
    for line in offline_rl.markdown(result).splitlines():
        assert line in page, f"docs/offline-rl.md's table is not the committed results' table: {line}"
