"""The compiled epilogue's one-time compile cost: cold (a new inductor cache) and warm (the same cache again).

    python benchmarks/compile_time.py [--n 4096] [--h 512] [--v 32768] [--runs 1]

Each measurement is a fresh process: the first ``linear_dft_loss`` forward+backward at N x V logits
(2^27 by default, where ``DFT_COMPILE_EPILOGUE=auto`` compiles on CPU) minus the median of the next three
calls. "cold" runs with ``TORCHINDUCTOR_CACHE_DIR`` a new folder, "warm" with the folder the cold run filled.
The README's compile figures come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, statistics, sys, time, torch, dft
n, h, v = map(int, sys.argv[1:4])
torch.manual_seed(0)
hidden = torch.randn(n, h, requires_grad=True)
weight = (torch.randn(v, h) * 0.02).requires_grad_()
labels = torch.randint(0, v, (n,))
times = []
for _ in range(4):
    t0 = time.perf_counter()
    dft.linear_dft_loss(hidden, weight, labels).backward()
    times.append(time.perf_counter() - t0)
print(json.dumps({"first": times[0], "steady": statistics.median(times[1:])}))
"""


def measure(n: int, h: int, v: int, cache: str) -> float:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "DFT_COMPILE_EPILOGUE": "auto"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n), str(h), str(v)], env=env, capture_output=True, text=True, check=True
    )
    t = json.loads(out.stdout.strip().splitlines()[-1])
    return t["first"] - t["steady"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--runs", type=int, default=1, help="cold + warm pairs, each with its own new cache")
    args = p.parse_args()
    cold, warm = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(measure(args.n, args.h, args.v, cache))
            warm.append(measure(args.n, args.h, args.v, cache))
    print(f"N={args.n} H={args.h} V={args.v} ({args.n * args.v} logits), {os.cpu_count()} CPUs, {args.runs} run(s)")
    print("cold compile s:", " / ".join(f"{t:.1f}" for t in cold))
    print("warm compile s:", " / ".join(f"{t:.1f}" for t in warm))


if __name__ == "__main__":
    main()
