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

Writes benchmarks/results/data_prep.json (provenance, every step's raw numbers) and data_prep.md (the
table, rendered from the JSON by ``render``); ``--name`` picks another file stem.
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

sys.path[:0] = [str(Path(__file__).resolve().parent)]  # _provenance, also when imported from elsewhere
from _provenance import Provenance, conditions, default_name, load_average, table, write  # noqa: E402

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
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # any helper process so far
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
        "children_before_mb": children / 2**20,
    }


LABELS = {
    "load": "load (JSONL → Arrow)",
    "map": "**prepare (`datasets.map`)**",
    "cached": "prepare again (cached)",
    "rowwise": "row-by-row preparation (Python lists, for comparison)",
}


def derive(result: dict) -> list[dict]:
    """Per row count and step: seconds, rows/s (not for a cache hit), peak RSS, its growth in the step and the
    largest map worker's peak (None when no child process of the step outgrew those started before it)."""
    return [
        {
            "rows": r["rows"],
            "step": r["step"],
            "seconds": r["seconds"],
            "rows_per_s": None if r["step"] == "cached" else r["rows"] / r["seconds"],
            "peak_mb": r["peak_mb"],
            "peak_growth_mb": r["peak_growth_mb"],
            "worker_peak_mb": r["worker_peak_mb"] if r["worker_peak_mb"] > r["children_before_mb"] else None,
        }
        for r in result["runs"]
    ]


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def render(result: dict) -> str:
    body = []
    for r in result["rows"]:
        strong = r["step"] == "map"
        seconds = f"{r['seconds']:.1f}"
        rate = "—" if r["rows_per_s"] is None else f"{r['rows_per_s']:,.0f}"
        body.append(
            [
                _count(r["rows"]),
                LABELS.get(r["step"], r["step"]),
                f"**{seconds}**" if strong else seconds,
                f"**{rate}**" if strong and r["rows_per_s"] is not None else rate,
                f"{r['peak_mb']:.0f}",
                f"{r['peak_growth_mb']:.0f}",
                "— (1 process)" if r["worker_peak_mb"] is None else f"{r['worker_peak_mb']:.0f}",
            ]
        )
    p = result["params"]
    header = [
        "rows",
        "step",
        "seconds (CPU measured)",
        "rows/s",
        "peak RSS (MB)",
        "growth in the step (MB)",
        "map worker peak (MB)",
    ]
    what = (
        f"Measured: synthetic prompt/completion JSONL rows of ~160 BPE tokens, `max_length` {p['max_length']}; "
        "each step in its own process with a fresh datasets cache per row count; peak RSS of that process"
    )
    return table(header, body) + "\n" + conditions(result, what) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    parser.add_argument("--rowwise-max", type=int, default=200_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--workdir", default=None, help="keep the generated data here (default: a temp dir)")
    parser.add_argument("--name", default=default_name(), help="results file stem under benchmarks/results/")
    parser.add_argument("--_worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        step, path, tok_dir, max_length = args._worker
        print(json.dumps(worker(step, path, tok_dir, int(max_length))))
        return
    prov = Provenance.start("cpu")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dft-data-prep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"# data_prep: {os.cpu_count()} cores, max_length {args.max_length}, workdir {workdir}")
    print("\n| rows | step | seconds | rows/s | peak RSS (MB) | growth during the step (MB) | worker peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    runs = []
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
            runs.append({"step": step, **r, "load_after": load_average()})
            print(
                f"| {rows} | {step} | {r['seconds']:.1f} | {rows / r['seconds']:,.0f} | {r['peak_mb']:.0f} "
                f"| {r['peak_growth_mb']:.0f} | {r['worker_peak_mb']:.0f} |",
                flush=True,
            )
    params = {"rows": args.rows, "rowwise_max": args.rowwise_max, "max_length": args.max_length}
    write(args.name, prov.finish(), params, runs, derive, render)


if __name__ == "__main__":
    main()
