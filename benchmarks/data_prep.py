"""Data preparation at real sizes: ``dft.data.prepare_dataset`` (a batched ``datasets.map``) against the
row-by-row preparation it replaced (Python lists, ``Dataset.from_dict`` at the end).

Synthetic prompt/completion JSONL (math-like words, ~40 + ~120 tokens per row) with a byte-level BPE
tokenizer trained here on the same words (8k vocabulary, built offline). Per row count, each step runs
in its own process with a fresh datasets cache:

  load      ``dft.data.load_local_dataset`` (JSONL checked line by line, streamed into Arrow)
  map       ``prepare_dataset`` on the loaded file (first run: tokenizes, writes the cache)
  cached    the same call again in a new process (the cache is reused)
  rowwise   the previous implementation (skipped above ``--rowwise-max`` rows: it holds every row in Python)

Reported: seconds, rows/s, the process's peak RSS (``ru_maxrss``, libraries and tokenizer included),
its growth during the step, and the largest worker process's peak (``datasets.map`` with ``num_proc``,
from 50k rows); "flat in the number of rows" is what the table checks.

Usage:
  python benchmarks/data_prep.py                       # 20k, 200k and 1M rows (the README table)
  python benchmarks/data_prep.py --rows 20000 --rowwise-max 20000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [f"{w}" for w in "let x be the sum of all prime numbers less than twenty then compute".split()]
WORDS += [str(i) for i in range(200)] + ["+", "-", "*", "/", "=", "(", ")", "so", "we", "get", "answer", "is"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def generate(workdir: Path, rows: int) -> Path:
    path = workdir / f"data-{rows}.jsonl"
    if not path.exists():
        rng = random.Random(rows)
        with open(path, "w") as f:
            for _ in range(rows):
                row = {
                    "prompt": "Problem: " + _text(rng, rng.randint(20, 40)) + "\nSolution:",
                    "completion": " " + _text(rng, rng.randint(60, 120)),
                }
                f.write(json.dumps(row) + "\n")
    tok_dir = workdir / "tokenizer"
    if not tok_dir.exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        rng = random.Random(0)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "<eos>"])
        tok.train_from_iterator((_text(rng, 50) for _ in range(20000)), trainer)
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(tok_dir)
    return path


def rowwise_prepare(ds, tok, max_length: int):
    """The preparation this library shipped before ``datasets.map`` (prompt/completion rows)."""
    from datasets import Dataset

    rows: dict[str, list] = {"input_ids": [], "labels": []}
    for ex in ds:
        prompt = tok(ex["prompt"])["input_ids"]
        completion = tok(ex["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, labels = (prompt + completion)[:max_length], ([-100] * len(prompt) + completion)[:max_length]
        if any(label != -100 for label in labels[1:]):
            rows["input_ids"].append(ids)
            rows["labels"].append(labels)
    return Dataset.from_dict(rows)


def worker(step: str, path: str, tok_dir: str, max_length: int) -> dict:
    from transformers import AutoTokenizer

    from dft.data import load_local_dataset, prepare_dataset

    tok = AutoTokenizer.from_pretrained(tok_dir)
    t0, base = time.perf_counter(), _rss()
    ds = load_local_dataset(path)
    if step == "load":
        out = ds
    else:
        t0, base = time.perf_counter(), _rss()
        out = rowwise_prepare(ds, tok, max_length) if step == "rowwise" else prepare_dataset(ds, tok, max_length)[0]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # datasets.map's num_proc workers
    return {
        "seconds": seconds,
        "rows": len(ds),
        "kept": len(out),
        "peak_mb": peak / 2**20,
        "peak_growth_mb": (peak - base) / 2**20,
        "worker_peak_mb": workers / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    parser.add_argument("--rowwise-max", type=int, default=200_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--workdir", default=None, help="keep the generated data here (default: a temp dir)")
    parser.add_argument("--_worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        step, path, tok_dir, max_length = args._worker
        print(json.dumps(worker(step, path, tok_dir, int(max_length))))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dft-data-prep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"# data_prep: {os.cpu_count()} cores, max_length {args.max_length}, workdir {workdir}")
    print("\n| rows | step | seconds | rows/s | peak RSS (MB) | growth during the step (MB) | worker peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for rows in args.rows:
        path = generate(workdir, rows)
        env = {**os.environ, "HF_DATASETS_CACHE": str(workdir / f"cache-{rows}"), "TOKENIZERS_PARALLELISM": "true"}
        steps = ["load", "map", "cached"] + (["rowwise"] if rows <= args.rowwise_max else [])
        for step in steps:
            cmd = [
                sys.executable,
                __file__,
                "--_worker",
                "map" if step == "cached" else step,
                str(path),
                str(workdir / "tokenizer"),
                str(args.max_length),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(proc.returncode)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"| {rows} | {step} | {r['seconds']:.1f} | {rows / r['seconds']:,.0f} | {r['peak_mb']:.0f} "
                f"| {r['peak_growth_mb']:.0f} | {r['worker_peak_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
