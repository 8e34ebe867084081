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


# prompts whose worked solutions are 18 to 27 characters: at max_new_tokens 22 some finish, some are cut
ID_PROMPTS = ["Q: 1+2+3=?\n", "Q: 12+34+56=?\n", "Q: 4+5+6=?\n", "Q: 47+8+91=?\n", "Q: 7+1+2=?\n"]


def _generate_by_hand(model, tok, prompts, *, num_samples, temperature, max_new_tokens, seed):
    """``model.generate`` on the left-padded batch of ``prompts`` (one batch: seeded as batch 0 of ``seed``):
    the padded sequences and the prompt width."""
    import torch
    from transformers import GenerationConfig

    encoded = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    sampled = {"temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, num_return_sequences=num_samples if temperature else 1,
        pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id], do_sample=bool(temperature), **sampled,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(sampling._batch_seed(seed, 0))
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config).tolist()
    if not temperature:
        out = [row for row in out for _ in range(num_samples)]
    return out, width


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_token_ids_are_the_generated_sequence(base, temperature):
    """``prompt_ids + completion_ids`` is what ``model.generate`` produced, pads aside: a finished sample ends on
    its stop id (the first one), a cut one holds max_new_tokens ids and no EOS; both decode to the row's text."""
    model, tok = base
    eos, pad, n = tok.eos_token_id, tok.pad_token_id, 22
    rows = sampling.generate(
        model, tok, ID_PROMPTS, num_samples=3, temperature=temperature, max_new_tokens=n, batch_size=8, seed=7
    )
    out, width = _generate_by_hand(
        model, tok, ID_PROMPTS, num_samples=3, temperature=temperature, max_new_tokens=n, seed=7
    )
    assert len(rows) == len(out) == 15
    for row, seq in zip(rows, out):
        prompt_ids, completion_ids = row["prompt_ids"], row["completion_ids"]
        assert prompt_ids == tok(row["prompt"])["input_ids"] and tok.decode(prompt_ids) == "<bos>" + row["prompt"]
        assert seq[: width - len(prompt_ids)] == [pad] * (width - len(prompt_ids))  # the left padding only
        generated = seq[width:]
        assert seq[width - len(prompt_ids) : width + len(completion_ids)] == prompt_ids + completion_ids
        assert generated[len(completion_ids) :] == [pad] * (len(generated) - len(completion_ids))
        assert row["num_tokens"] == len(completion_ids) and all(type(t) is int for t in prompt_ids + completion_ids)
        assert tok.decode(completion_ids, skip_special_tokens=True) == row["completion"]
        if row["finished"]:
            assert completion_ids[-1] == eos and eos not in completion_ids[:-1] and len(completion_ids) <= n
            assert tok.decode(completion_ids) == row["completion"] + "\n"  # this tokenizer's EOS is "\n"
        else:
            assert len(completion_ids) == n and eos not in completion_ids
            assert tok.decode(completion_ids) == row["completion"]
    assert {r["finished"] for r in rows} == {True, False}  # both kinds checked
    if not temperature:  # greedy: the K copies carry the same ids
        assert all(rows[i]["completion_ids"] == rows[i + 1]["completion_ids"] for i in range(0, 15, 3))


def test_tokenizer_fingerprint_is_stable_and_tells_vocabularies_apart():
    from transformers import AutoTokenizer

    from dft.toy import toy_tokenizer

    a, b = AutoTokenizer.from_pretrained(BASE), AutoTokenizer.from_pretrained(BASE)
    fp = sampling.tokenizer_fingerprint(a)
    assert re.fullmatch(r"[0-9a-f]{16}", fp) and sampling.tokenizer_fingerprint(b) == fp
    b.chat_template = CHAT_TEMPLATE  # a template changes prompts, not what an id means: the same fingerprint
    assert sampling.tokenizer_fingerprint(b) == fp
    b.add_tokens(["<extra>"])
    assert sampling.tokenizer_fingerprint(b) != fp
    c = AutoTokenizer.from_pretrained(BASE)
    c.pad_token = c.eos_token  # the same vocabulary, another pad id
    assert sampling.tokenizer_fingerprint(c) != fp
    assert sampling.tokenizer_fingerprint(toy_tokenizer()) not in {fp, sampling.tokenizer_fingerprint(b)}


def test_generation_record(base):
    model, tok = base
    record = sampling.generation_record(model, tok, num_samples=3, temperature=0.7, top_p=0.9, top_k=5,
                                        max_new_tokens=17)  # fmt: skip
    assert record == {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "max_new_tokens": 17, "num_samples": 3,
                      "stop_ids": [22], "tokenizer": sampling.tokenizer_fingerprint(tok)}  # fmt: skip


def _row(i, j, prompt, completion, *, accepted, finished=True):
    return {"prompt_index": i, "sample_index": j, "prompt": prompt, "completion": completion, "reference": None,
            "finished": finished, "reward": float(accepted), "accepted": accepted}  # fmt: skip


CHAT = [{"role": "user", "content": "1+2"}]
PAIR_ROWS = [
    # prompt 0 (text): 2 accepted, 3 finished rejected (one cut, left out): 2 pairs, in sample_index order
    _row(0, 4, "Q: a\n", "r4", accepted=False),
    _row(0, 0, "Q: a\n", "r0", accepted=False),
    _row(0, 1, "Q: a\n", "c1", accepted=True),
    _row(0, 2, "Q: a\n", "cut", accepted=False, finished=False),
    _row(0, 3, "Q: a\n", "c3", accepted=True),
    _row(0, 5, "Q: a\n", "r5", accepted=False),
    # prompt 1: accepted only
    _row(1, 0, "Q: b\n", "c", accepted=True),
    _row(1, 1, "Q: b\n", "c", accepted=True),
    # prompt 2: rejected only (one cut: not counted, nothing to pair it with anyway)
    _row(2, 0, "Q: c\n", "r", accepted=False),
    _row(2, 1, "Q: c\n", "cut", accepted=False, finished=False),
    # prompt 3: accepted, and a cut rejected only: no pair, one left out
    _row(3, 0, "Q: d\n", "c", accepted=True),
    _row(3, 1, "Q: d\n", "cut", accepted=False, finished=False),
    # prompt 4 (chat): 3 accepted, 1 finished rejected: 1 pair of assistant turns
    _row(4, 0, CHAT, "1+2=4", accepted=False),
    _row(4, 1, CHAT, "1+2=3", accepted=True),
    _row(4, 2, CHAT, "3", accepted=True),
    _row(4, 3, CHAT, "three", accepted=True),
]


def test_pairs_zip_accepted_with_finished_rejected():
    made, counts = sampling.pairs(PAIR_ROWS)
    assert made == [
        {"prompt": "Q: a\n", "chosen": "c1", "rejected": "r0"},
        {"prompt": "Q: a\n", "chosen": "c3", "rejected": "r4"},
        {
            "prompt": CHAT,
            "chosen": [{"role": "assistant", "content": "1+2=3"}],
            "rejected": [{"role": "assistant", "content": "1+2=4"}],
        },
    ]
    assert counts == {"pairs": 3, "prompts_with_pairs": 2, "unfinished_rejected_left_out": 2}
    assert sampling.pairs([]) == ([], {"pairs": 0, "prompts_with_pairs": 0, "unfinished_rejected_left_out": 0})
    # rows without prompt_index / sample_index (another generator's): grouped by prompt, in file order
    bare = [{k: v for k, v in r.items() if k not in ("prompt_index", "sample_index")} for r in PAIR_ROWS[6:]]
    assert sampling.pairs(bare)[0] == [made[2]]


def test_write_writes_pairs_and_the_generation_record(tmp_path, base):
    model, tok = base
    record = sampling.generation_record(model, tok, num_samples=6, temperature=1.0, max_new_tokens=9)
    summary = sampling.write(PAIR_ROWS, tmp_path / "s", extra={"generation": record})
    written = sorted(p.name for p in (tmp_path / "s").iterdir())  # and no temporary file left behind
    assert written == ["accepted.jsonl", "pairs.jsonl", "samples.jsonl", "summary.json"]
    assert _read_jsonl(tmp_path / "s" / "pairs.jsonl") == sampling.pairs(PAIR_ROWS)[0]
    on_disk = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert on_disk == summary and summary["generation"] == record
    assert summary["pairs"] == {"pairs": 3, "prompts_with_pairs": 2, "unfinished_rejected_left_out": 2}
    assert summary["accepted"] == 8 and summary["samples"] == len(PAIR_ROWS)  # the other keys stay


def test_pairs_are_trl_preference_rows():
    """TRL's data utilities take a pairs row as a preference example: a text row as it is, a chat row rendered
    into prompt / chosen / rejected text by the chat template."""
    pytest.importorskip("trl")
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    tok = AutoTokenizer.from_pretrained(BASE)
    tok.chat_template = CHAT_TEMPLATE
    text, _, chat = sampling.pairs(PAIR_ROWS)[0]
    assert not is_conversational(text) and is_conversational(chat)
    assert maybe_apply_chat_template(text, tok) == text
    assert maybe_apply_chat_template(chat, tok) == {
        "prompt": "<bos>Q: 1+2\n", "chosen": "1+2=3\n", "rejected": "1+2=4\n"
    }  # fmt: skip


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
    assert [(r["prompt_ids"], r["completion_ids"]) for r in api] == [
        (r["prompt_ids"], r["completion_ids"]) for r in rows
    ]
    # pairs.jsonl: dft.sampling.pairs of the rows; its counts and the generation record in summary.json
    made, counts = sampling.pairs(rows)
    assert _read_jsonl(out / "pairs.jsonl") == made and summary["pairs"] == counts and counts["pairs"] > 0
    assert summary["generation"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 40,
                                     "num_samples": 4, "stop_ids": [22],
                                     "tokenizer": sampling.tokenizer_fingerprint(tok)}  # fmt: skip
    last = stdout.strip().splitlines()[-1]
    assert last == (f"wrote {out}/samples.jsonl, accepted.jsonl ({len(acc)} rows for dft train --data), "
                    f"pairs.jsonl ({counts['pairs']} pairs for DPO), summary.json")  # fmt: skip


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


@pytest.mark.filterwarnings("ignore")
def test_pairs_jsonl_trains_trl_dpo(sampled, tmp_path):
    """TRL's DPOTrainer takes pairs.jsonl as it is: the prompt tokenized as dft sample tokenized it, chosen and
    rejected with TRL's appended EOS, one step with a finite loss."""
    pytest.importorskip("trl")
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    _, _, out, _ = sampled
    rows = _read_jsonl(out / "samples.jsonl")
    made = _read_jsonl(out / "pairs.jsonl")
    tok = AutoTokenizer.from_pretrained(BASE)
    config = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                       use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)  # fmt: skip
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(BASE), args=config, processing_class=tok,
                         train_dataset=load_dataset("json", data_files=str(out / "pairs.jsonl"), split="train"))  # fmt: skip
    first = trainer.train_dataset[0]
    sample = next(r for r in rows if r["prompt"] == made[0]["prompt"] and r["accepted"])
    if "prompt_ids" in first:
        assert first["prompt_ids"] == sample["prompt_ids"]
        chosen, rejected = first["chosen_ids"], first["rejected_ids"]
    else:  # trl < 1: *_input_ids columns, and the prompt tokenized without its BOS
        assert first["prompt_input_ids"] == sample["prompt_ids"][1:]
        chosen, rejected = first["chosen_input_ids"], first["rejected_input_ids"]
    assert chosen == sample["completion_ids"]  # the accepted sample's ids, its stop id included
    assert tok.decode(rejected) == made[0]["rejected"] + tok.eos_token
    loss = trainer.train().training_loss
    assert math.isfinite(loss) and loss > 0


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
    tok = AutoTokenizer.from_pretrained(chat_base)
    for r in rows:  # the chat prompt's ids: the template with its generation prompt, as generation saw them
        rendered = tok.apply_chat_template(r["prompt"], add_generation_prompt=True)  # transformers 5: a BatchEncoding
        assert r["prompt_ids"] == list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
        assert tok.decode(r["completion_ids"], skip_special_tokens=True) == r["completion"]
    accepted = _read_jsonl(out / "accepted.jsonl")
    assert accepted, "the base answers some of these in chat form too"
    made = _read_jsonl(out / "pairs.jsonl")
    assert made == sampling.pairs(rows)[0] and made, "some prompts have both verdicts"
    for pair in made:  # chat pairs: the prompt's messages, one assistant turn each side
        assert pair["prompt"] in [r["prompt"] for r in rows]
        assert [m["role"] for m in pair["chosen"] + pair["rejected"]] == ["assistant", "assistant"]
    assert accepted == [
        {"messages": [*r["prompt"], {"role": "assistant", "content": r["completion"]}]} for r in rows if r["accepted"]
    ]
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
    """`offline_rl.py --smoke` (the CI setting): every data set x loss trained (NFT on every sample of the prompts
    with both verdicts, DPO on the pairs where the installed TRL has DPOTrainer), accepted sets measured, summary."""
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
    offline_rl = _load_offline_rl()
    no_dpo = offline_rl.dpo_unavailable()
    if no_dpo:
        assert f"DPO skipped: {no_dpo}" in proc.stdout
    done = {(r["data"], r["loss"]) for r in result["runs"]}
    losses = set(offline_rl.LOSSES)
    new = set(offline_rl.NFT) | ({"dpo"} if not no_dpo else set())
    assert done == {("gold", "sft"), ("gold", "dft")} | {
        (d, loss) for d in ("rft", "rft_round2") for loss in losses
    } | {("rft", loss) for loss in new}
    for key in ("accepted", "accepted_round2"):
        a = result[key]["0"]
        assert 0 <= a["accepted"] <= a["samples"] == 2 * result["config"]["n_demos"]
        assert a["acceptance_rate"] == a["accepted"] / a["samples"]
    a = result["accepted"]["0"]
    assert 0 < a["nft_accepted_rows"] < a["nft_rows"] <= a["samples"] and a["nft_rows"] % 2 == 0  # 2 per prompt
    assert a["pairs"]["pairs"] >= 1
    rft = result["experiments"]["rft"]
    assert (
        set(rft["best_lr"]) == losses | new and rft["summary"]["dft"]["paired"]["rft_sft"]["id_exact_match"]["n"] == 1
    )
    for loss in new:
        assert rft["summary"][loss]["paired"]["rft_sft"]["id_exact_match"]["n"] == 1
    if not no_dpo:
        assert rft["summary"]["dpo"]["beta"] == rft["dpo_beta"] in result["config"]["dpo_betas"]
        assert all("beta" in r for r in result["runs"] if r["loss"] == "dpo")
    assert "| base's verified samples | DFT |" in proc.stdout
    assert "| NFT, DFT-weighted positives |" in proc.stdout


def test_committed_offline_rl_results():
    """results/offline_rl.json: complete, >= 5 seeds, every loss on the same samples at an interior lr (DPO: at its
    beta, picked on dpo_select_seeds), paired differences over every seed, the docs' tables made from it
    (tests/test_results.py recomputes every summary and interval from the runs)."""
    offline_rl = _load_offline_rl()
    result = json.loads((STUDY / "results" / "offline_rl.json").read_text())
    assert result["complete"] and "--smoke" not in result["command"] and len(result["seeds"]) >= 5
    assert set(result["accepted"]) == {str(s) for s in result["seeds"]}
    rft = result["experiments"]["rft"]
    assert set(rft["best_lr"]) == {*offline_rl.LOSSES, *offline_rl.NFT, "dpo"}
    ladder = offline_rl.study.LADDER
    for loss, grid in rft["lr_grid"].items():
        best, beta = rft["best_lr"][loss], rft["dpo_beta"] if loss == "dpo" else None
        assert len(grid) >= 4 and (grid[0] < best < grid[-1] or best in (ladder[0], ladder[-1])), (loss, grid, best)
        seeds = [
            r["seed"]
            for r in result["runs"]
            if r["data"] == "rft" and r["loss"] == loss and r["lr"] == best and r.get("beta") == beta
        ]
        assert sorted(seeds) == result["seeds"]  # every seed: the same samples for every loss
    for loss in ("dft", "dft_floor", "asft", *offline_rl.NFT, "dpo"):  # the values: tests/test_results.py
        assert rft["summary"][loss]["paired"]["rft_sft"]["id_exact_match"]["n"] == len(result["seeds"])
    pick = result["config"]["dpo_select_seeds"]
    assert set(pick) < set(result["seeds"]) and set(rft["dpo_sweep"]) == {str(b) for b in result["config"]["dpo_betas"]}
    for beta, sweep in rft["dpo_sweep"].items():  # every beta's lr grid interior (or at the ladder's end)
        lrs, top = sorted(map(float, sweep)), max(sweep, key=sweep.get)
        assert len(lrs) >= 4 and (lrs[0] < float(top) < lrs[-1] or float(top) in (ladder[0], ladder[-1])), beta
    for a in result["accepted"].values():  # NFT: both verdicts per kept prompt, 4 samples each
        assert 0 < a["nft_accepted_rows"] < a["nft_rows"] == 4 * a["nft_prompts"] and a["pairs"]["pairs"] > 0
    assert set(result["experiments"]["gold"]["summary"]) == {"sft", "dft"}
    page = (ROOT / "docs" / "offline-rl.md").read_text()
    for line in (offline_rl.markdown(result) + "\n" + offline_rl.five_way(result)).splitlines():
        assert line in page, f"docs/offline-rl.md's table is not the committed results' table: {line}"
