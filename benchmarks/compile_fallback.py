"""Peak memory of the fused head's call that falls back from a failed compile, vs the eager path.

    python benchmarks/compile_fallback.py                  # N=8192 tokens, H=512, V=32000, float32

On CUDA the epilogue is compiled by default. When compiling fails on the first call, that call starts again on the
chunks planned for the eager epilogue (whose float32 temporaries the compiled one does not have). Each case runs
one forward + backward in its own process and reports the peak RSS growth over the inputs, the median of
``--repeats`` processes, and the rows per chunk of every plan the call ran:

* ``eager``: ``DFT_COMPILE_EPILOGUE=0``;
* ``compile_fails``: ``DFT_COMPILE_EPILOGUE=1`` with the compiled passes made to fail to compile (as inductor
  raising would), priced as the compiled epilogue (0 float32 temporaries per logit).

Writes benchmarks/results/compile_fallback.json (provenance, every process's peak and plans) and
compile_fallback.md (the table, rendered from the JSON by ``render``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]  # _provenance, also when imported from elsewhere
from _provenance import Provenance, conditions, default_name, load_average, median, table, write  # noqa: E402

CASES = ("eager", "compile_fails")
LABELS = {"eager": "eager epilogue (`DFT_COMPILE_EPILOGUE=0`)", "compile_fails": "**compile fails on the call**"}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(case: str, n: int, h: int, v: int) -> dict:
    os.environ["DFT_COMPILE_EPILOGUE"] = "0" if case == "eager" else "1"
    import warnings

    import torch
    from torch._dynamo.exc import BackendCompilerFailed

    import dft
    from dft import epilogue, fused

    if case == "compile_fails":

        def fail(*args):
            raise BackendCompilerFailed("inductor", RuntimeError("made to fail"), None)

        epilogue._compiled = epilogue.Epilogue(
            epilogue._guarded(fail, epilogue.reduce),
            epilogue._guarded(fail, epilogue.ref_reduce),
            epilogue._guarded(fail, epilogue.grad_),
            temp_bytes_per_logit=0,
            compiled=True,
        )
    plans = []
    real = fused._run_plan

    def record(plan, ep, chunk, *args):
        plans.append({"compiled": ep.compiled, "rows_per_chunk": chunk})
        return real(plan, ep, chunk, *args)

    fused._run_plan = record
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    before = _rss_mb()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's one warning
        dft.linear_dft_loss(hidden, weight, labels).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {"peak_mib": peak, "plans": plans}


def derive(result: dict) -> list[dict]:
    """Per case: the median peak over its processes, its min and max, the ratio to eager's median, and the rows
    per chunk of the plan that ran the passes (the last plan of the call)."""
    peaks = {r["case"]: median([p["peak_mib"] for p in r["processes"]]) for r in result["runs"]}
    return [
        {
            "case": r["case"],
            "median_mib": peaks[r["case"]],
            "min_mib": min(p["peak_mib"] for p in r["processes"]),
            "max_mib": max(p["peak_mib"] for p in r["processes"]),
            "x_eager": peaks[r["case"]] / peaks["eager"],
            "plans": r["processes"][0]["plans"],
        }
        for r in result["runs"]
    ]


def render(result: dict) -> str:
    def plans(row: dict) -> str:
        return " → ".join(f"{'compiled' if p['compiled'] else 'eager'} {p['rows_per_chunk']}" for p in row["plans"])

    body = [
        [
            LABELS[r["case"]],
            f"{r['median_mib']:.0f}",
            f"{r['min_mib']:.0f}–{r['max_mib']:.0f}",
            f"{r['x_eager']:.2f}",
            plans(r),
        ]
        for r in result["rows"]
    ]
    p = result["params"]
    header = ["case", "peak growth (MiB, CPU measured)", "min–max (MiB)", "× eager", "plans run (rows per chunk)"]
    what = (
        f"Measured: `linear_dft_loss` forward + backward, N={p['n']}, H={p['h']}, V={p['v']}, float32; peak RSS "
        f"growth over the inputs, median of {p['repeats']} processes"
    )
    return table(header, body) + "\n" + conditions(result, what) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--h", type=int, default=512)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default=default_name(), help="results file stem under benchmarks/results/")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.n, a.h, a.v)))
        return
    prov = Provenance.start("cpu")
    runs = []
    for case in CASES:
        processes = []
        for _ in range(a.repeats):
            cmd = [sys.executable, __file__, "--worker", case, "--n", str(a.n), "--h", str(a.h), "--v", str(a.v)]
            out = subprocess.run(
                cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            processes.append(json.loads(out.stdout.strip().splitlines()[-1]))
        runs.append({"case": case, "processes": processes, "load_after": load_average()})
        print(case, [round(p["peak_mib"]) for p in processes], processes[0]["plans"], flush=True)
    params = {"n": a.n, "h": a.h, "v": a.v, "repeats": a.repeats, "omp_num_threads": 1}
    result = write(a.name, prov.finish(), params, runs, derive, render)
    print(render(result))


if __name__ == "__main__":
    main()
