"""Peak memory of the logits path (``dft.dft_loss`` on materialised logits) vs ``F.cross_entropy``.

    python benchmarks/logits_path.py                    # N=4096 tokens, V=32000, float32 logits
    python benchmarks/logits_path.py --n 8192 --v 128256

Each case runs forward + backward on the same float32 logits (20% ignored labels) in its own process
and reports the peak RSS growth over the logits themselves (``ru_maxrss`` after the call minus the RSS
with the logits allocated), the median of ``--repeats`` processes. This is the path every model the
fused head cannot take lands on (LoRA on lm_head, FSDP1, unknown transforms, quantised heads).

Writes benchmarks/results/logits_path.json (provenance, every process's peak) and logits_path.md (the
table, rendered from the JSON by ``render``); ``--name`` picks another file stem.
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

CASES = ("cross_entropy", "dft", "dft_stats")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(case: str, n: int, v: int) -> float:
    import torch
    import torch.nn.functional as F

    import dft

    torch.manual_seed(0)
    logits = torch.randn(n, v, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < 0.2] = -100
    before = _rss_mb()
    if case == "cross_entropy":
        loss = F.cross_entropy(logits, labels)
    elif case == "dft":
        loss = dft.dft_loss(logits, labels)
    else:
        loss, stats = dft.dft_loss(logits, labels, return_stats=True)
        stats.as_dict()
    loss.backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


LABELS = {
    "cross_entropy": "`F.cross_entropy`",
    "dft": "**`dft.dft_loss`**",
    "dft_stats": "`dft.dft_loss(..., return_stats=True)`",
}


def derive(result: dict) -> list[dict]:
    """Per case: the median, min and max of its processes' peaks, and the median's ratio to cross-entropy's."""
    peaks = {r["case"]: median(r["peaks_mib"]) for r in result["runs"]}
    return [
        {
            "case": r["case"],
            "median_mib": peaks[r["case"]],
            "min_mib": min(r["peaks_mib"]),
            "max_mib": max(r["peaks_mib"]),
            "x_cross_entropy": peaks[r["case"]] / peaks["cross_entropy"] if "cross_entropy" in peaks else None,
        }
        for r in result["runs"]
    ]


def render(result: dict) -> str:
    body = [
        [
            LABELS.get(r["case"], r["case"]),
            f"{r['median_mib']:.0f}",
            f"{r['min_mib']:.0f}–{r['max_mib']:.0f}",
            "–" if r["x_cross_entropy"] is None else f"{r['x_cross_entropy']:.2f}",
        ]
        for r in result["rows"]
    ]
    p = result["params"]
    header = ["case", "peak growth over the logits (MiB, CPU measured)", "min–max (MiB)", "× cross_entropy"]
    what = (
        f"Measured: forward + backward on float32 logits N={p['n']}, V={p['v']} ({p['logits_mib']:.0f} MiB), "
        f"20% of labels ignored; peak RSS growth over the logits, median of {p['repeats']} processes"
    )
    return table(header, body) + "\n" + conditions(result, what) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default=default_name(), help="results file stem under benchmarks/results/")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.n, a.v)))
        return
    prov = Provenance.start("cpu")
    logits_mb = a.n * a.v * 4 / 2**20
    print(f"N={a.n}, V={a.v}: one float32 logits tensor = {logits_mb:.0f} MiB; median of {a.repeats} processes")
    print("| case | peak growth over the logits (MiB) | x cross_entropy |")
    print("|---|---|---|")
    runs = []
    for case in CASES:
        peaks = []
        for _ in range(a.repeats):
            cmd = [sys.executable, __file__, "--worker", case, "--n", str(a.n), "--v", str(a.v)]
            out = subprocess.run(
                cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
        runs.append({"case": case, "peaks_mib": peaks, "load_after": load_average()})
        ratio = median(peaks) / median(runs[0]["peaks_mib"])
        spread = f"{min(peaks):.0f}-{max(peaks):.0f}"
        print(f"| {case} | {median(peaks):.0f} ({spread}) | {ratio:.2f}x |", flush=True)
    params = {"n": a.n, "v": a.v, "repeats": a.repeats, "logits_mib": logits_mb, "omp_num_threads": 1}
    write(a.name, prov.finish(), params, runs, derive, render)


if __name__ == "__main__":
    main()
