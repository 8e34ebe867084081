"""LM-head loss benchmark: forward+backward time and peak extra memory, each case in its own process.

Cases (all compute gradients w.r.t. hidden and weight):
  naive      dft.dft_loss on full logits F.linear(hidden, weight)
  trl        trl.kernels ChunkedLogProbFunction + DFT weighting (if trl is installed)
  torch_ce   torch's F.linear_cross_entropy(options=LinearCrossEntropyOptions()), plain CE: the speed bar
  torch_dft  torch's F.linear_cross_entropy(reduction="none") + DFT weighting
  dft        dft.linear_dft_loss (fused, grad-in-forward)
  floor      the three matmuls alone (logits, dH, dW) over the same chunks

Usage:
  python benchmarks/lm_head.py                         # the target: N=4096 H=512 V=32000 fp32 + N scaling
  python benchmarks/lm_head.py --grid                  # N {1024,4096,16384} x H {512,2048} x V {32000,128256}
  python benchmarks/lm_head.py --n 4096 --h 512 --v 32000 --dtypes float32 bfloat16 --repeats 3

Peak extra memory: on CUDA max_memory_allocated minus what the inputs hold; on CPU the process's peak
RSS (ru_maxrss) minus its RSS after the inputs were allocated. Skips a case whose naive logits would
not fit in --max-gb. Prints a markdown table with ratios to naive and to the floor.
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

CASES = ["naive", "trl", "torch_ce", "torch_dft", "dft", "floor"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(case: str, n: int, h: int, v: int, dtype_name: str, repeats: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    import dft

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    hidden = torch.randn(n, h, device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, dtype=dtype) * h**-0.5).requires_grad_(True)
    labels = torch.randint(0, v, (n,), device=device)
    chunk = dft.fused.auto_chunk_size(v)

    def run() -> None:
        if case == "naive":
            loss = dft.dft_loss(F.linear(hidden, weight), labels)
        elif case == "dft":
            loss = dft.linear_dft_loss(hidden, weight, labels)
        elif case == "torch_ce":
            loss = F.linear_cross_entropy(hidden, weight, labels, options=torch.nn.LinearCrossEntropyOptions())
        elif case == "torch_dft":
            ce = F.linear_cross_entropy(
                hidden, weight, labels, reduction="none", options=torch.nn.LinearCrossEntropyOptions()
            )
            loss = (torch.exp(-ce).detach() * ce).sum() / n
        elif case == "trl":
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction

            logp = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 4096, None, 1.0, ())[0]
            loss = -(logp.exp().detach() * logp).sum() / n
        elif case == "floor":
            with torch.no_grad():
                dw = torch.zeros(v, h, device=device, dtype=torch.float32)
                for s in range(0, n, chunk):
                    z = hidden[s : s + chunk] @ weight.t()
                    z @ weight  # noqa: B018  (dH)
                    dw += (z.t() @ hidden[s : s + chunk]).float()
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
    run()  # warm-up (also counted in the peak: same for every case)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"time_s": min(times), "peak_extra_mb": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--h", type=int, nargs="+", default=[512])
    parser.add_argument("--v", type=int, nargs="+", default=[32000])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--grid", action="store_true", help="N {1024,4096,16384} x H {512,2048} x V {32000,128256}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-gb", type=float, default=20.0, help="skip shapes whose naive logits exceed this")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--_worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        case, n, h, v, dtype = args._worker
        print(json.dumps(worker(case, int(n), int(h), int(v), dtype, args.repeats, args.device)))
        return
    if args.grid:
        args.n, args.h, args.v = [1024, 4096, 16384], [512, 2048], [32000, 128256]
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import trl  # noqa: F401
    except ImportError:
        args.cases = [c for c in args.cases if c != "trl"]
    machine = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(f"# lm_head benchmark on {device} ({machine}), torch {torch.__version__}, fwd+bwd, min of {args.repeats}\n")
    print("| N | H | V | dtype | case | time (s) | x naive | x floor | peak extra (MB) | mem x naive |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for dtype in args.dtypes:
        for v in args.v:
            for h in args.h:
                for n in args.n:
                    if n * v * 4 * 3 / 2**30 > args.max_gb:
                        print(
                            f"| {n} | {h} | {v} | {dtype} | skipped: naive logits exceed {args.max_gb} GB | | | | | |"
                        )
                        continue
                    results = {}
                    for case in args.cases:
                        cmd = [
                            sys.executable,
                            __file__,
                            "--_worker",
                            case,
                            str(n),
                            str(h),
                            str(v),
                            dtype,
                            "--repeats",
                            str(args.repeats),
                            "--device",
                            device,
                        ]
                        proc = subprocess.run(cmd, capture_output=True, text=True)
                        if proc.returncode != 0:
                            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                            print(f"| {n} | {h} | {v} | {dtype} | {case} failed: {err[:80]} | | | | | |")
                            continue
                        results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
                    naive, floor = results.get("naive"), results.get("floor")
                    for case, r in results.items():
                        xn = f"{r['time_s'] / naive['time_s']:.2f}" if naive else "-"
                        xf = f"{r['time_s'] / floor['time_s']:.2f}" if floor else "-"
                        mn = f"{r['peak_extra_mb'] / naive['peak_extra_mb']:.2f}" if naive else "-"
                        print(
                            f"| {n} | {h} | {v} | {dtype} | {case} | {r['time_s']:.3f} | {xn} | {xf} | "
                            f"{r['peak_extra_mb']:.0f} | {mn} |",
                            flush=True,
                        )
                        rows.append({"n": n, "h": h, "v": v, "dtype": dtype, "case": case, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
