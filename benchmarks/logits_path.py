"""Peak memory of the logits path (``dft.dft_loss`` on materialised logits) vs ``F.cross_entropy``.

    python benchmarks/logits_path.py                    # N=4096 tokens, V=32000, float32 logits
    python benchmarks/logits_path.py --n 8192 --v 128256

Each case runs forward + backward on the same float32 logits (20% ignored labels) in its own process
and reports the peak RSS growth over the logits themselves (``ru_maxrss`` after the call minus the RSS
with the logits allocated), the median of ``--repeats`` processes. This is the path every model the
fused head cannot take lands on (LoRA on lm_head, FSDP1, unknown transforms, quantised heads).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.n, a.v)))
        return
    logits_mb = a.n * a.v * 4 / 2**20
    print(f"N={a.n}, V={a.v}: one float32 logits tensor = {logits_mb:.0f} MiB; median of {a.repeats} processes")
    print("| case | peak growth over the logits (MiB) | x cross_entropy |")
    print("|---|---|---|")
    peaks = {}
    for case in CASES:
        runs = []
        for _ in range(a.repeats):
            cmd = [sys.executable, __file__, "--worker", case, "--n", str(a.n), "--v", str(a.v)]
            out = subprocess.run(
                cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        peaks[case] = statistics.median(runs)
        spread = f"{min(runs):.0f}-{max(runs):.0f}"
        ratio = peaks[case] / peaks["cross_entropy"]
        print(f"| {case} | {peaks[case]:.0f} ({spread}) | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
