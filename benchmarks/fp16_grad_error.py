"""Gradient error of the fused head in fp16 under a GradScaler-style loss scale, vs the materialised path.

    python benchmarks/fp16_grad_error.py [--n 2048] [--hidden 128] [--vocab 8003]

Prints the relative error (vs float64) of dh and dW for 1, 8 and 64 accumulation steps (the loss is
normalised by the step's token count, so per-token gradients shrink with the steps), and the
fraction of dh entries that are exactly zero (25% of rows are ignored, so 0.25 is the floor).

Writes benchmarks/results/fp16_grad_error.json (provenance, every error) and fp16_grad_error.md (the table,
rendered from the JSON by ``render``); ``--name`` picks another file stem.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import dft

sys.path[:0] = [str(Path(__file__).resolve().parent)]  # _provenance, also when imported from elsewhere
from _provenance import Provenance, conditions, default_name, table, write  # noqa: E402

FIELDS = ("dh_fused", "dh_materialised", "dh_zeros_fused", "dw_fused", "dw_materialised")


def derive(result: dict) -> list[dict]:
    """Per accumulation count: the errors as measured, and the materialised path's dh error over the fused one's."""
    return [
        {
            "accum": r["accum"],
            **{k: r[k] for k in FIELDS},
            "dh_materialised_x_fused": r["dh_materialised"] / r["dh_fused"],
        }
        for r in result["runs"]
    ]


def render(result: dict) -> str:
    body = [
        [
            str(r["accum"]),
            f"**{r['dh_fused']:.1e}**",
            f"{r['dh_materialised']:.1e}",
            f"{r['dh_materialised_x_fused']:.2f}",
            f"{r['dh_zeros_fused']:.2f}",
            f"{r['dw_fused']:.1e}",
            f"{r['dw_materialised']:.1e}",
        ]
        for r in result["rows"]
    ]
    p = result["params"]
    header = [
        "accumulation steps",
        "dh error, fused fp16",
        "dh error, materialised fp16",
        "materialised ÷ fused",
        "dh entries zero (fused)",
        "dW error, fused fp16",
        "dW error, materialised fp16",
    ]
    what = (
        f"Measured (deterministic): relative error vs float64 of the gradients, N={p['n']}, H={p['hidden']}, "
        f"V={p['vocab']}, {p['ignored']:.0%} of labels ignored, loss scale {p['scale']:.0f}, "
        "loss normalised by the step's token count"
    )
    return table(header, body) + "\n" + conditions(result, what) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8003)
    p.add_argument("--scale", type=float, default=65536.0)
    p.add_argument("--name", default=default_name(), help="results file stem under benchmarks/results/")
    args = p.parse_args()
    prov = Provenance.start("cpu")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.n, args.hidden, dtype=torch.float64, generator=g)
    w = torch.randn(args.vocab, args.hidden, dtype=torch.float64, generator=g) * (2 / args.hidden**0.5)
    y = torch.randint(0, args.vocab, (args.n,), generator=g)
    y[torch.rand(args.n, generator=g) < 0.25] = -100
    n_valid = int((y != -100).sum())

    def grads(fn, dtype):
        hh, ww = h.to(dtype).detach().requires_grad_(), w.to(dtype).detach().requires_grad_()
        (fn(hh, ww) * args.scale).backward()
        return hh.grad.double() / args.scale, ww.grad.double() / args.scale

    def err(a, b):
        return ((a - b).norm() / b.norm()).item()

    print("accum | dh fused | dh materialised | dh zeros (fused) | dW fused | dW materialised")
    runs = []
    for accum in (1, 8, 64):
        num = n_valid * accum
        ref = grads(lambda a, b, num=num: dft.linear_dft_loss(a, b, y, num_items_in_batch=num), torch.float64)
        fused = grads(lambda a, b, num=num: dft.linear_dft_loss(a, b, y, num_items_in_batch=num), torch.float16)
        mat = grads(lambda a, b, num=num: dft.dft_loss(F.linear(a, b), y, num_items_in_batch=num), torch.float16)
        zeros = (fused[0] == 0).double().mean().item()
        print(
            f"{accum:5d} | {err(fused[0], ref[0]):.2e} | {err(mat[0], ref[0]):.2e} | {zeros:.2f} | "
            f"{err(fused[1], ref[1]):.2e} | {err(mat[1], ref[1]):.2e}"
        )
        values = (err(fused[0], ref[0]), err(mat[0], ref[0]), zeros, err(fused[1], ref[1]), err(mat[1], ref[1]))
        runs.append({"accum": accum, **dict(zip(FIELDS, values))})
    params = {"n": args.n, "hidden": args.hidden, "vocab": args.vocab, "scale": args.scale, "ignored": 0.25, "seed": 0}
    write(args.name, prov.finish(), params, runs, derive, render)


if __name__ == "__main__":
    main()
