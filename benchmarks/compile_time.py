"""The compiled epilogue's one-time compile cost: cold (a new inductor cache) and warm (the same cache again).

    python benchmarks/compile_time.py [--n 4096] [--h 512] [--v 32768] [--runs 1]

Each measurement is a fresh process: the first ``linear_dft_loss`` forward+backward at N x V logits
(2^27 by default, where ``DFT_COMPILE_EPILOGUE=auto`` compiles on CPU) minus the median of the next three
calls. "cold" runs with ``TORCHINDUCTOR_CACHE_DIR`` a new folder, "warm" with the folder the cold run filled.
Writes benchmarks/results/compile_time.json (provenance, every call's time) and compile_time.md (the
table, rendered from the JSON by ``render``); ``--name`` picks another file stem.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]  # _provenance, also when imported from elsewhere
from _provenance import Provenance, conditions, default_name, load_average, median, table, write  # noqa: E402

CHILD = r"""
import json, sys, time, torch, dft
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
print(json.dumps({"times_s": times}))
"""


def measure(n: int, h: int, v: int, cache: str) -> dict:
    """One fresh process: its four calls' times (the first includes the compile) and the load after it."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "DFT_COMPILE_EPILOGUE": "auto"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n), str(h), str(v)], env=env, capture_output=True, text=True, check=True
    )
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load_after": load_average()}


def compile_s(times: list[float]) -> float:
    """The first call minus the median of the next three."""
    return times[0] - median(times[1:])


def derive(result: dict) -> list[dict]:
    return [
        {
            "run": i + 1,
            "cold_s": compile_s(r["cold"]["times_s"]),
            "warm_s": compile_s(r["warm"]["times_s"]),
            "steady_s": median(r["cold"]["times_s"][1:] + r["warm"]["times_s"][1:]),
        }
        for i, r in enumerate(result["runs"])
    ]


def render(result: dict) -> str:
    body = [
        [str(r["run"]), f"**{r['cold_s']:.1f}**", f"**{r['warm_s']:.1f}**", f"{r['steady_s']:.2f}"]
        for r in result["rows"]
    ]
    p = result["params"]
    header = ["run", "cold compile (s, CPU measured)", "warm compile (s, CPU measured)", "call after it (s)"]
    what = (
        f"Measured: first `linear_dft_loss` forward + backward minus the median of the next three, "
        f"N={p['n']}, H={p['h']}, V={p['v']}, float32, `DFT_COMPILE_EPILOGUE=auto`, each in a fresh process; "
        "cold: a new `TORCHINDUCTOR_CACHE_DIR`, warm: the same folder again; "
        "call after it: median of the later calls of both processes"
    )
    return table(header, body) + "\n" + conditions(result, what) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--runs", type=int, default=1, help="cold + warm pairs, each with its own new cache")
    p.add_argument("--name", default=default_name(), help="results file stem under benchmarks/results/")
    args = p.parse_args()
    prov = Provenance.start("cpu")
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            cold = measure(args.n, args.h, args.v, cache)
            warm = measure(args.n, args.h, args.v, cache)
            runs.append({"cold": cold, "warm": warm})
    params = {"n": args.n, "h": args.h, "v": args.v, "runs": args.runs}
    result = write(args.name, prov.finish(), params, runs, derive, render)
    rows = result["rows"]
    print(f"N={args.n} H={args.h} V={args.v} ({args.n * args.v} logits), {os.cpu_count()} CPUs, {args.runs} run(s)")
    print("cold compile s:", " / ".join(f"{r['cold_s']:.1f}" for r in rows))
    print("warm compile s:", " / ".join(f"{r['warm_s']:.1f}" for r in rows))


if __name__ == "__main__":
    main()
