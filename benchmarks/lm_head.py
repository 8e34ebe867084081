"""LM-head loss benchmark: forward+backward time and peak extra memory, each case in its own process.

Tokens come in rows of --row-len; the first --prompt-frac of each row is a masked prompt (labels
-100), as in chat SFT, so the cases that skip masked rows show that gain.

Cases (all compute gradients w.r.t. hidden and weight):
  naive       dft.dft_loss on full logits F.linear(hidden, weight)
  trl         trl.kernels ChunkedLogProbFunction + DFT weighting (if trl is installed)
  torch_ce    torch's F.linear_cross_entropy (chunked, plain CE: no DFT weight): the speed bar
  torch_dft   torch's F.linear_cross_entropy(reduction="none") + DFT weighting
  dft         dft.linear_dft_loss (fused, grad-in-forward), eager epilogue (DFT_COMPILE_EPILOGUE=0);
              with --chunk-sizes, one case per size (dft@C)
  dft_compiled  the same with DFT_COMPILE_EPILOGUE=1 (inductor-fused elementwise passes; compiled in the warm-up)
  floor       the three matmuls alone (logits, dH, dW) over the *supervised* rows, in the chunks the
              default path takes (dft.fused.default_chunk_size)
  asft_naive  ASFT on full logits: dft_loss(F.linear(h, W), ref_logits=F.linear(h_ref, W_ref), kl_coef=0.1)
  asft        ASFT fused: linear_dft_loss(..., ref_hidden, ref_weight, kl_coef=0.1)

Usage:
  python benchmarks/lm_head.py --n 8192 --repeats 4                  # the README table
  python benchmarks/lm_head.py --n 8192 --cases dft floor --chunk-sizes 256 512 1024 2048
  python benchmarks/lm_head.py --n 4096 --cases asft_naive asft
  python benchmarks/lm_head.py --device cuda --dtypes bfloat16 --h 1536 --v 151936 --n 8192   # on a GPU

Time: min over --repeats after one warm-up; the spread (max/min - 1) is printed too. Peak extra
memory: on CUDA max_memory_allocated minus what the inputs hold; on CPU the process's peak RSS
(ru_maxrss) minus its RSS after the inputs were allocated. Skips a case whose naive logits would not
fit in --max-gb. Prints a markdown table with ratios to naive and to the floor, and writes
benchmarks/results/lm_head.json (provenance and every repeat's time) and lm_head.md (the table, rendered from
the JSON by ``render``); ``--name`` picks another file stem.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]  # _provenance, also when imported from elsewhere
from _provenance import Provenance, conditions, default_name, load_average, table, write  # noqa: E402

CASES = ["naive", "trl", "torch_ce", "torch_dft", "dft", "dft_compiled", "floor", "asft_naive", "asft"]
DEFAULT_CASES = ["naive", "trl", "torch_ce", "torch_dft", "dft", "dft_compiled", "floor"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(case: str, n: int, h: int, v: int, dtype_name: str, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    import dft

    device = args.device
    os.environ["DFT_COMPILE_EPILOGUE"] = "1" if case.startswith("dft_compiled") else "0"
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    hidden = torch.randn(n, h, device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, dtype=dtype) * h**-0.5).requires_grad_(True)
    labels = torch.randint(0, v, (n,), device=device)
    row = min(args.row_len, n)
    prompt = int(args.prompt_frac * row)
    labels.view(-1, row)[:, :prompt] = -100  # masked prompts
    if case.startswith("asft"):
        ref_hidden = torch.randn(n, h, device=device, dtype=dtype)
        ref_weight = torch.randn(v, h, device=device, dtype=dtype) * h**-0.5
    chunk = int(case.split("@")[1]) if "@" in case else None  # None: the library's default policy
    supervised = (labels != -100).nonzero().squeeze(1)
    if case == "floor" and chunk is None:  # the chunks the default (auto) path takes at this size
        os.environ["DFT_COMPILE_EPILOGUE"] = "auto"
        ep = dft.epilogue.epilogue_for(torch.device(device or "cpu"), supervised.numel() * v)
        chunk = dft.fused.default_chunk_size(v, supervised.numel(), torch.device(device or "cpu"), dtype, ep)

    def run() -> None:
        if case == "naive":
            loss = dft.dft_loss(F.linear(hidden, weight), labels)
        elif case.startswith("dft"):
            loss = dft.linear_dft_loss(hidden, weight, labels, chunk_size=chunk)
        elif case == "asft_naive":
            ref_logits = F.linear(ref_hidden, ref_weight)
            loss = dft.dft_loss(F.linear(hidden, weight), labels, ref_logits=ref_logits, kl_coef=0.1)
        elif case == "asft":
            loss = dft.linear_dft_loss(
                hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, kl_coef=0.1
            )
        elif case == "torch_ce":
            loss = F.linear_cross_entropy(hidden, weight, labels, options=torch.nn.LinearCrossEntropyOptions())
        elif case == "torch_dft":
            ce = F.linear_cross_entropy(
                hidden, weight, labels, reduction="none", options=torch.nn.LinearCrossEntropyOptions()
            )
            valid = labels != -100
            loss = (torch.exp(-ce).detach() * ce)[valid].sum() / valid.sum()
        elif case == "trl":
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction

            logp = ChunkedLogProbFunction.apply(hidden, weight, None, labels.clamp_min(0), 1.0, 4096, None, 1.0, ())[0]
            valid = labels != -100
            loss = -(logp.exp().detach() * logp)[valid].sum() / valid.sum()
        elif case == "floor":
            with torch.no_grad():
                hs = hidden.index_select(0, supervised)
                dw = torch.zeros(v, h, device=device, dtype=torch.float32)
                for s in range(0, hs.shape[0], chunk):
                    z = hs[s : s + chunk] @ weight.t()
                    z @ weight  # noqa: B018  (dH)
                    if dw.dtype == z.dtype:
                        dw.addmm_(z.t(), hs[s : s + chunk])  # in place, as the fused head does
                    else:
                        dw += (z.t() @ hs[s : s + chunk]).float()
            return
        else:
            raise ValueError(case)
        loss.backward()
        hidden.grad = None
        weight.grad = None

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    run()  # warm-up (also counted in the peak: same for every case)
    sync()
    warmup = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"times_s": times, "cpu_s": cpu, "warmup_s": warmup, "peak_extra_mb": peak / 2**20}


LABELS = {
    "naive": "naive `dft_loss` on full logits",
    "trl": "TRL `ChunkedLogProbFunction` + DFT",
    "torch_ce": "torch `F.linear_cross_entropy` (CE only, no DFT)",
    "torch_dft": 'torch `F.linear_cross_entropy(reduction="none")` + DFT',
    "dft": "`dft.linear_dft_loss`, eager epilogue",
    "dft_compiled": "**`dft.linear_dft_loss`**, compiled epilogue",
    "floor": "3-matmul floor over the supervised rows",
    "asft_naive": "ASFT on full logits (policy + reference)",
    "asft": "**ASFT fused** (`ref_hidden`, `ref_weight`, `kl_coef=0.1`)",
}


def derive(result: dict) -> list[dict]:
    """Per shape and case, from the raw repeats of every round: min wall time, spread (max/min - 1), ratios to
    the naive path (ASFT rows: to ASFT on full logits) and to the floor, the same ratio in CPU time (user +
    system, all threads: less sensitive to other processes), peak memory (the largest over rounds) and its
    ratio to naive."""
    shapes: dict[tuple, dict[str, list[dict]]] = {}
    for r in result["runs"]:
        shapes.setdefault((r["n"], r["h"], r["v"], r["dtype"]), {}).setdefault(r["case"], []).append(r)
    rows = []
    for (n, h, v, dtype), cases in shapes.items():
        ok = {c: [r for r in rs if "error" not in r] for c, rs in cases.items()}
        ok = {c: rs for c, rs in ok.items() if rs}
        t = {c: min(x for r in rs for x in r["times_s"]) for c, rs in ok.items()}
        cpu = {c: min(x for r in rs for x in r["cpu_s"]) for c, rs in ok.items()}
        peak = {c: max(r["peak_extra_mb"] for r in rs) for c, rs in ok.items()}
        for case, rs in cases.items():
            row = {"n": n, "h": h, "v": v, "dtype": dtype, "case": case}
            if case not in ok:
                rows.append({**row, "error": rs[-1]["error"]})
                continue
            base = "asft_naive" if case.startswith("asft") and "asft_naive" in ok else "naive"
            row["time_s"] = t[case]
            row["spread"] = max(x for r in ok[case] for x in r["times_s"]) / t[case] - 1
            row["x_naive"] = t[case] / t[base] if base in ok else None
            row["x_floor"] = t[case] / t["floor"] if "floor" in ok else None
            row["cpu_x_naive"] = cpu[case] / cpu[base] if base in ok else None
            row["peak_extra_mb"] = peak[case]
            row["mem_x_naive"] = peak[case] / peak[base] if base in ok else None
            rows.append(row)
    return rows


def render(result: dict) -> str:
    """The markdown table from the JSON's rows (shape columns only when it holds several shapes)."""
    rows = result["rows"]
    shapes = {(r["n"], r["h"], r["v"], r["dtype"]) for r in rows}
    many = len(shapes) > 1
    bold = {"dft_compiled", "asft"}

    def num(x: float | None, fmt: str, strong: bool) -> str:
        if x is None:
            return "–"
        return f"**{x:{fmt}}**" if strong else f"{x:{fmt}}"

    body = []
    for r in rows:
        case = r["case"]
        label = (
            LABELS.get(case)
            or f"`dft.linear_dft_loss`, {'compiled' if 'compiled' in case else 'eager'}, chunk {case.split('@')[-1]}"
        )
        cells = [str(r["n"]), str(r["h"]), str(r["v"]), r["dtype"]] if many else []
        if "error" in r:
            body.append(cells + [label, f"failed: {r['error']}", "", "", "", "", "", ""])
            continue
        strong = case in bold
        body.append(
            cells
            + [
                label,
                num(r["time_s"], ".2f", strong),
                f"{r['spread']:.0%}",
                num(r["x_naive"], ".2f", strong),
                num(r["x_floor"], ".2f", False),
                num(r["cpu_x_naive"], ".2f", False),
                num(r["peak_extra_mb"], ".0f", strong),
                num(r["mem_x_naive"], ".2f", strong),
            ]
        )
    p = result["params"]
    header = (["N", "H", "V", "dtype"] if many else []) + [
        "case",
        f"time (s, {'GPU' if p['device'] == 'cuda' else 'CPU'} measured)",
        "spread",
        "× naive",
        "× floor",
        "CPU time × naive",
        "peak extra (MB)",
        "mem × naive",
    ]
    shape = "" if many else "N={}, H={}, V={}, {}, ".format(*next(iter(shapes)))
    n_rounds = p.get("rounds", 1)
    rounds = f", the cases run in turn {n_rounds} times" if n_rounds > 1 else ""
    repeats = f"{p['repeats']} × {n_rounds}" if n_rounds > 1 else f"{p['repeats']}"
    what = (
        f"Measured: forward + backward, {shape}rows of {p['row_len']} tokens whose first "
        f"{p['prompt_frac']:.0%} is a masked prompt; each case in its own process{rounds}, min of {repeats} "
        "after a warm-up; spread = max/min − 1; CPU time = user + system time of the process; "
        "ASFT rows relative to ASFT on full logits"
    )
    return table(header, body) + "\n" + conditions(result, what) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[8192])
    parser.add_argument("--h", type=int, nargs="+", default=[512])
    parser.add_argument("--v", type=int, nargs="+", default=[32000])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=CASES)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=None, help="sweep the fused head's chunk size")
    parser.add_argument("--prompt-frac", type=float, default=0.3, help="masked prompt fraction of each row")
    parser.add_argument("--row-len", type=int, default=1024, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the whole case list this many times in turn (shares out the load)"
    )
    parser.add_argument("--max-gb", type=float, default=20.0, help="skip shapes whose naive logits exceed this")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, help="also write the result JSON to this file")
    parser.add_argument("--name", default=default_name(), help="results file stem under benchmarks/results/")
    parser.add_argument("--_worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        case, n, h, v, dtype = args._worker
        print(json.dumps(worker(case, int(n), int(h), int(v), dtype, args)))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prov = Provenance.start(device)
    cases = list(args.cases)
    try:
        import trl  # noqa: F401
    except ImportError:
        cases = [c for c in cases if c != "trl"]
    for name in ("dft", "dft_compiled"):
        if args.chunk_sizes and name in cases:
            i = cases.index(name)
            cases[i : i + 1] = [f"{name}@{c}" for c in args.chunk_sizes]
    machine = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(
        f"# lm_head benchmark on {device} ({machine}), torch {torch.__version__}, fwd+bwd, min of {args.repeats}, "
        f"prompt fraction {args.prompt_frac} of rows of {args.row_len}\n"
    )
    runs = []
    skipped = []
    for dtype in args.dtypes:
        for v in args.v:
            for h in args.h:
                for n in args.n:
                    if n * v * 4 * 3 / 2**30 > args.max_gb:
                        print(f"skipped N={n} H={h} V={v} {dtype}: naive logits exceed {args.max_gb} GB")
                        skipped.append({"n": n, "h": h, "v": v, "dtype": dtype})
                        continue
                    for rnd, case in [(i, c) for i in range(args.rounds) for c in cases]:
                        cmd = [sys.executable, __file__, "--_worker", case, str(n), str(h), str(v), dtype]
                        cmd += ["--repeats", str(args.repeats), "--device", device]
                        cmd += ["--prompt-frac", str(args.prompt_frac), "--row-len", str(args.row_len)]
                        proc = subprocess.run(cmd, capture_output=True, text=True)
                        run = {"n": n, "h": h, "v": v, "dtype": dtype, "case": case, "round": rnd}
                        if proc.returncode != 0:
                            run["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
                        else:
                            run.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                        run["load_after"] = load_average()
                        runs.append(run)
                        print(json.dumps(run), flush=True)
    params = {
        "device": device,
        "n": args.n,
        "h": args.h,
        "v": args.v,
        "dtypes": args.dtypes,
        "cases": cases,
        "prompt_frac": args.prompt_frac,
        "row_len": args.row_len,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "skipped": skipped,
    }
    result = write(args.name, prov.finish(), params, runs, derive, render, extra_json=args.json)
    print(render(result))


if __name__ == "__main__":
    main()
