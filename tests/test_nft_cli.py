"""`dft sample` -> `dft train --data S/samples.jsonl --loss nft`, and its one-line refusals."""

import json

import pytest

from tests.test_sampling import BASE, _read_jsonl, _sums, _write_jsonl, dft_cli


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nft")
    data = _write_jsonl(tmp / "prompts.jsonl", _sums(16, seed=3))
    proc = dft_cli("sample", "--model", BASE, "--data", data, "--num_samples", 4, "--temperature", 1.0,
                   "--max_new_tokens", 40, "--seed", 2, "--disable_tqdm", "true", "--output_dir", tmp / "S")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, tmp / "S"


def _train(samples_file, out, *extra):
    return dft_cli("train", "--model", BASE, "--data", samples_file, "--loss", "nft", "--max_steps", 2,
                   "--per_device_train_batch_size", 8, "--eval_fraction", 0.25, "--max_eval_examples", 2,
                   "--report_to", "none", "--disable_tqdm", "true", "--output_dir", out, *extra)  # fmt: skip


def test_samples_jsonl_trains_with_nft(samples):
    tmp, S = samples
    rows = _read_jsonl(S / "samples.jsonl")
    proc = _train(S / "samples.jsonl", tmp / "run", "--ref_model", BASE)  # pi_old given: the model that sampled
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_index"], set()).add(bool(r["accepted"]))
    held = {r["prompt_index"] for r in _read_jsonl(tmp / "run" / "eval_split.jsonl")}
    assert len(held) == 4  # 25% of the 16 prompts, every sample of each
    train_prompts = set(by_prompt) - held
    uniform = sum(len(by_prompt[q]) == 1 for q in train_prompts)
    mixed = len(train_prompts) - uniform
    assert mixed > 0, "the fixture needs prompts with both verdicts"
    line = next(x for x in proc.stdout.splitlines() if x.startswith("nft: "))
    assert line == (f"nft: {4 * mixed} samples of {mixed} prompts; {uniform} prompts whose samples share one verdict "
                    f"dropped ({4 * uniform} samples)")  # fmt: skip
    assert f"training nft (neg_weight=1.0, temperature=1; pi_old = {BASE})" in proc.stdout
    record = json.loads((tmp / "run" / "run_config.json").read_text())
    assert record["ref_model"] == str(BASE) and record["nft"]["temperature"] == 1.0
    history = json.loads((tmp / "run" / "metrics.json").read_text())["log_history"]
    first = next(h for h in history if "loss" in h)
    assert first["nft/ratio"] == pytest.approx(1.0, abs=1e-6) and 0 < first["nft/rejected_tokens"] < 1
    # dft eval on the run scores its held-out prompts against their references, not the sampled completions
    proc = dft_cli("eval", "--model", tmp / "run", "--max_new_tokens", 8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exact match: 4 prompts against their reference answers" in proc.stdout, proc.stdout
    result = json.loads((tmp / "run" / "eval" / "eval_results.json").read_text())
    assert result["eval_exact_match_examples"] == 4 and result["num_examples"] == 16
    predictions = _read_jsonl(tmp / "run" / "eval" / "predictions.jsonl")
    held_references = {r["reference"].strip() for r in rows if r["prompt_index"] in held}
    assert {p["reference"].strip() for p in predictions} == held_references, (
        predictions
    )  # one per prompt: 4 distinct sums


def _copy(S, dest, edit_rows=None, edit_summary=None):
    dest.mkdir()
    rows = _read_jsonl(S / "samples.jsonl")
    summary = json.loads((S / "summary.json").read_text())
    rows = edit_rows(rows) if edit_rows else rows
    if edit_summary:
        edit_summary(summary)
    _write_jsonl(dest / "samples.jsonl", rows)
    (dest / "summary.json").write_text(json.dumps(summary))
    return dest / "samples.jsonl"


def _error(proc):
    """Exit status 2 and one error line (after the loading progress bars of the refusals that need the model)."""
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("dft: error: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().endswith(lines[0])
    return lines[0]


def test_nft_refusals_are_one_line(samples):
    tmp, S = samples
    no_verdict = _copy(
        S, tmp / "a", edit_rows=lambda rows: [{k: v for k, v in r.items() if k != "accepted"} for r in rows]
    )
    assert "--loss nft needs the columns ['accepted']" in _error(_train(no_verdict, tmp / "o1"))
    uniform = _copy(S, tmp / "b", edit_rows=lambda rows: [{**r, "accepted": True} for r in rows])
    assert "got one verdict: NFT learns from the contrast" in _error(_train(uniform, tmp / "o2"))
    greedy = _copy(S, tmp / "c", edit_summary=lambda s: s["generation"].update(temperature=0.0))
    assert "drawn at temperature 0 (greedy)" in _error(_train(greedy, tmp / "o3"))
    other = _copy(S, tmp / "d", edit_summary=lambda s: s["generation"].update(tokenizer="0123456789abcdef"))
    assert "its token ids come from another tokenizer (fingerprint 0123456789abcdef" in _error(
        _train(other, tmp / "o4")
    )
    ref = _error(dft_cli("train", "--model", BASE, "--data", S / "accepted.jsonl", "--ref_model", BASE,
                         "--output_dir", tmp / "o5"))  # fmt: skip
    assert "--ref_model is the reference of --loss nft (pi_old) or asft" in ref
    assert not (tmp / "o1").exists() and not (tmp / "o3").exists()  # refused before anything loads


def test_loss_shortcut_takes_its_own_flags(samples):
    """--loss nft / eaft is --loss_type: their own flags are checked against that loss, not the default dft."""
    from dft.cli._train_args import parse_train_args

    _, S = samples
    common = ["--model", str(BASE), "--output_dir", str(S.parent / "p"), "--report_to", "none"]
    _, config, _ = parse_train_args(["--data", str(S / "samples.jsonl"), "--loss", "nft",
                                     "--nft_keep_uniform_prompts", "true", *common])  # fmt: skip
    assert config.loss_type == "nft" and config.nft_keep_uniform_prompts and config.nft_temperature == 1.0
    _, config, _ = parse_train_args(
        ["--data", str(S / "accepted.jsonl"), "--loss", "eaft", "--eaft_top_k", "10", *common]
    )
    assert config.loss_type == "eaft" and config.eaft_top_k == 10
