"""Modeled H100 time of the fused head at real head shapes: every aten op's FLOPs and bytes, priced.

CPU timings hide what a GPU pays: next to tensor cores, every pass over a ``[C, V]`` block and every
touch of the ``[V, H]`` float32 dW accumulator is expensive. This script runs ``dft.linear_dft_loss``
forward + backward on CPU tensors at real shapes (N=8192 tokens, bf16) under a ``TorchDispatchMode``
that records each aten op, and prices each op on an H100 as ``max(FLOPs / 600 TFLOP/s, bytes / 3 TB/s)``
(assumed sustained bf16 tensor-core rate and HBM bandwidth). It reports the modeled time against the
3-matmul floor (``6 n V H`` FLOPs over the ``n`` supervised rows), the peak extra memory (what the call
allocates, beyond its inputs) and the top costs.

What is modeled, and how:
* The library runs as it does on CUDA: the default chunk policy for an 80 GB device
  (``dft.fused.budget_for_memory``), the compiled epilogue (``temp_bytes_per_logit = 0``) and the
  in-place bf16 -> float32 dW GEMM (``torch.addmm(acc, a, b, out_dtype=float32, out=acc)``), in the steady
  state of a training run: the call's compiled passes have run before (a process's first call of a variant
  runs an eager-sized first chunk, modeled away here).
* The compiled epilogue passes (``dft.epilogue.reduce``, ``ref_reduce``, ``grad_``) are priced as one
  fused kernel each, as inductor emits them: it reads its ``[C, V]`` inputs (``reduce``: twice, a max
  loop then a sum loop; ``ref_reduce``: ``r`` twice and ``z`` once) and writes its outputs; the
  eager ops inside are not counted and their float32 temporaries are not allocated in the model.
* Everything else is priced op by op as recorded (gathers and scatters by the elements they touch;
  views cost nothing). Launch latency is not modeled (kernels are queued ahead of the GPU).
* To run in minutes, no op whose inputs or outputs exceed 1 MiB is computed: its outputs are
  allocated (lazily, from the op's meta shapes) and left uninitialised. Only shapes, dtypes and the
  small index tensors matter for the count.

Usage:
  python benchmarks/roofline.py                           # the README table (3 heads x masked x variants)
  python benchmarks/roofline.py --models qwen2.5-1.5b --variants stats --top 10
  python benchmarks/roofline.py --json out.json

Writes benchmarks/results/roofline.json (provenance, every case's raw counts) and roofline.md (the table,
rendered from the JSON by ``render``); ``--name`` picks another file stem.

On a GPU, measure instead: ``python benchmarks/lm_head.py --device cuda --dtypes bfloat16 --h 1536
--v 151936 --n 8192 --cases naive torch_ce dft floor``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import dft
import dft.epilogue as epilogue
import dft.fused as fused

sys.path[:0] = [str(Path(__file__).resolve().parent)]  # _provenance, also when imported from elsewhere
from _provenance import Provenance, conditions, default_name, table, write  # noqa: E402

PEAK_FLOPS = 600e12  # bf16 dense, sustained (H100 SXM peak is ~990)
BANDWIDTH = 3.0e12  # bytes/s (H100 SXM HBM3 peak is 3.35)
H100_MEMORY = 80 * 10**9
SKIP_BYTES = 2**20

MODELS = {  # hidden, vocabulary, final-logit soft-cap
    "qwen2.5-1.5b": (1536, 151936, None),
    "llama-3-8b": (4096, 128256, None),
    "gemma-2-2b": (2304, 256000, 30.0),
}
VARIANTS = ("dft", "stats", "asft")
MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
INDEXED = {
    "gather",
    "scatter",
    "scatter_add",
    "index_select",
    "index_copy",
    "index_add",
    "index_put",
    "_index_put_impl",
}
FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh"}
REGION_READS = {"reduce": {0: 2}, "ref_reduce": {0: 2, 1: 1}, "grad_": {0: 1, 6: 1}}  # arg position -> passes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(tree: object) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


@dataclass
class Op:
    name: str
    flops: float
    bytes: float

    @property
    def seconds(self) -> float:
        return max(self.flops / PEAK_FLOPS, self.bytes / BANDWIDTH)


class Recorder(TorchDispatchMode):
    """Records ops (FLOPs, bytes), skips large computations, tracks live storages for the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.region: str | None = None
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.chunks: list[int] = []

    def _track(self, outputs: list[torch.Tensor]) -> None:
        for t in outputs:
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self.live:
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__.rstrip("_")
        inplace = func.overloadpacket.__name__.endswith("_") or "out" in kwargs
        out = self._run(func, name, args, kwargs)
        if func.is_view or name in ("t", "view", "slice", "select", "unsqueeze", "squeeze", "expand", "alias"):
            return out
        outs = _tensors(out)
        if self.region is None:
            if not inplace:
                self._track(outs)
            self.ops.append(self._price(name, args, kwargs, outs, inplace))
        return out

    def _run(self, func, name: str, args, kwargs):  # noqa: ANN001
        """The op's outputs: computed when small; else allocated from the meta shapes (or the mutated input)."""
        if name in MATMULS and "out" in kwargs:
            return kwargs["out"]
        try:
            meta_args, meta_kwargs = tree_map(
                lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, (args, kwargs)
            )
            if "device" in meta_kwargs:
                meta_kwargs["device"] = torch.device("meta")
            meta_out = func(*meta_args, **meta_kwargs)
        except Exception:  # data-dependent (nonzero, item): small here, compute it
            return func(*args, **kwargs)
        size = sum(map(_nbytes, _tensors((args, kwargs)))) + sum(map(_nbytes, _tensors(meta_out)))
        if size <= SKIP_BYTES or func.is_view:
            return func(*args, **kwargs)
        if "out" in kwargs:
            return kwargs["out"]
        if func.overloadpacket.__name__.endswith("_"):
            return args[0]
        device = next((t.device for t in _tensors((args, kwargs))), torch.device("cpu"))
        return tree_map(
            lambda m: (
                torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device)
                if isinstance(m, torch.Tensor)
                else m
            ),
            meta_out,
        )

    def _price(self, name: str, args, kwargs, outs: list[torch.Tensor], inplace: bool) -> Op:  # noqa: ANN001
        ins = _tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
        if name in MATMULS:
            a, b = (ins[-2], ins[-1])
            m, k = a.shape[-2], a.shape[-1]
            flops = 2.0 * m * k * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
            rw = sum(map(_nbytes, ins)) + sum(map(_nbytes, outs))  # addmm's C is read (an input) and written
            return Op(name, flops, rw)
        if name in INDEXED:
            index = [t for t in ins if not t.is_floating_point()]
            touched = sum(t.numel() for t in index) * (outs[0].element_size() if outs else 4)
            return Op(name, 0.0, 2 * touched + sum(map(_nbytes, index)))
        if name in FREE:
            return Op(name, 0.0, 0.0)
        written = sum(map(_nbytes, outs))
        read = sum(_nbytes(t) for t in ins if not (inplace and t is ins[0] and name in ("zero", "fill")))
        return Op(name, 0.0, read + written)

    @contextlib.contextmanager
    def fused(self, name: str, args: tuple) -> Iterator[Callable[[object], None]]:
        """Ops inside run uncounted; on exit the region is priced as one kernel (see the module docstring)."""
        self.region = name
        outs: list[torch.Tensor] = []
        try:
            yield lambda result: outs.extend(_tensors(result))
        finally:
            self.region = None
        reads = sum(
            _nbytes(args[i]) * passes
            for i, passes in REGION_READS[name].items()
            if i < len(args) and isinstance(args[i], torch.Tensor)
        )
        in_place = name.endswith("_")
        writes = _nbytes(args[0]) if in_place else sum(map(_nbytes, outs))
        if not in_place:
            self._track(outs)
        self.ops.append(Op(f"epilogue.{name}", 0.0, reads + writes))


def _modeled_epilogue(recorder: Recorder) -> epilogue.Epilogue:
    def wrap(name: str, fn: Callable) -> Callable:
        def run(*args: object) -> object:
            with recorder.fused(name, args) as keep:
                result = fn(*args)
                keep(result)
            return result

        return run

    eager = epilogue.EAGER
    return epilogue.Epilogue(
        wrap("reduce", eager.reduce), wrap("ref_reduce", eager.ref_reduce), wrap("grad_", eager.grad_), 0, True
    )


class _Everything(set):
    """A set that holds every call variant: the steady state, where this variant's compiled passes have run."""

    def __contains__(self, item: object) -> bool:
        return True


@contextlib.contextmanager
def _as_on_h100(recorder: Recorder) -> Iterator[None]:
    """The library's CUDA choices on CPU tensors, in the steady state: chunk budget, compiled epilogue (its passes
    already compiled, so no eager-sized first chunk), in-place dW GEMM."""
    saved = (fused.chunk_budget_bytes, fused.epilogue_for, fused._addmm_out_dtype, fused.default_chunk_size)
    saved_variants = getattr(fused, "_COMPILED_VARIANTS", None)

    def chunk_size(*args: object, **kw: object) -> int:
        rows = saved[3](*args, **kw)
        if getattr(args[4], "compiled", False):  # the compiled plan's chunks (not the eager fallback's)
            recorder.chunks.append(rows)
        return rows

    fused.chunk_budget_bytes = lambda device: fused.budget_for_memory(H100_MEMORY)
    fused.epilogue_for = lambda device, num_logits: _modeled_epilogue(recorder)
    fused._addmm_out_dtype = lambda device, dtype=None: True
    fused.default_chunk_size = chunk_size
    if saved_variants is not None:
        fused._COMPILED_VARIANTS = _Everything()
    try:
        yield
    finally:
        fused.chunk_budget_bytes, fused.epilogue_for, fused._addmm_out_dtype, fused.default_chunk_size = saved
        if saved_variants is not None:
            fused._COMPILED_VARIANTS = saved_variants


def model_case(model: str, variant: str, masked: bool, n: int = 8192, row_len: int = 1024) -> dict:
    hid, vocab, softcap = MODELS[model]
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    hidden = torch.empty(n, hid, dtype=dtype).requires_grad_(True)
    weight = torch.empty(vocab, hid, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    if masked:
        labels.view(-1, row_len)[:, : int(0.3 * row_len)] = -100
    supervised = int((labels != -100).sum())
    kw: dict = {"softcap": softcap} if softcap else {}
    if variant in ("stats", "asft"):
        kw["return_stats"] = True
    if variant == "asft":
        kw.update(ref_hidden=torch.empty(n, hid, dtype=dtype), ref_weight=torch.empty(vocab, hid, dtype=dtype))
        kw["kl_coef"] = 0.1
    recorder = Recorder()
    with _as_on_h100(recorder), recorder:
        out = dft.linear_dft_loss(hidden, weight, labels, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
    del out, loss
    floor = 6.0 * supervised * vocab * hid / PEAK_FLOPS
    total = sum(op.seconds for op in recorder.ops)
    by_name: dict[str, float] = defaultdict(float)
    for op in recorder.ops:
        by_name[op.name] += op.seconds
    top = sorted(by_name.items(), key=lambda kv: -kv[1])
    dw_bytes = vocab * hid * 4
    return {
        "model": model,
        "H": hid,
        "V": vocab,
        "masked": masked,
        "variant": variant,
        "supervised": supervised,
        "chunk_rows": recorder.chunks[0],
        "kernels": len(recorder.ops),
        "floor_ms": floor * 1e3,
        "modeled_ms": total * 1e3,
        "x_floor": total / floor,
        "peak_extra_gb": recorder.peak / 1e9,
        "dw_fp32_gb": dw_bytes / 1e9,
        "peak_minus_dw_gb": (recorder.peak - dw_bytes) / 1e9,
        "top": [(name, secs * 1e3) for name, secs in top],
    }


HEADS = {"qwen2.5-1.5b": "Qwen2.5-1.5B", "llama-3-8b": "Llama-3-8B", "gemma-2-2b": "Gemma-2-2B, soft-cap 30"}


def derive(result: dict) -> list[dict]:
    """One row per head and masking, from the runs: the floor recomputed from the shape, each variant's
    modeled time as the sum of its priced ops, and their ratios."""
    peak_flops = result["params"]["peak_flops"]
    rows: dict[tuple, dict] = {}
    for r in result["runs"]:
        row = rows.setdefault(
            (r["model"], r["masked"]),
            {
                "model": r["model"],
                "H": r["H"],
                "V": r["V"],
                "masked": r["masked"],
                "dw_fp32_gb": r["V"] * r["H"] * 4 / 1e9,
            },
        )
        floor_ms = 6.0 * r["supervised"] * r["V"] * r["H"] / peak_flops * 1e3
        modeled_ms = sum(ms for _, ms in r["top"])
        row["floor_ms"] = floor_ms
        row[f"{r['variant']}_ms"] = modeled_ms
        row[f"{r['variant']}_x_floor"] = modeled_ms / floor_ms
        row[f"{r['variant']}_chunk_rows"] = r["chunk_rows"]
        row[f"{r['variant']}_peak_extra_gb"] = r["peak_extra_gb"]
    return list(rows.values())


def render(result: dict) -> str:
    """The markdown table (rows/chunk and peak memory of the path DFTTrainer takes: DFT + statistics)."""

    def f(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "–"

    def variant_key(row: dict, field: str) -> str:
        return next((f"{v}_{field}" for v in ("stats", "dft", "asft") if f"{v}_{field}" in row), "")

    body = []
    for row in result["rows"]:
        body.append(
            [
                f"{HEADS.get(row['model'], row['model'])} ({row['H']}, {row['V']})",
                "30%" if row["masked"] else "—",
                f(row, variant_key(row, "chunk_rows"), "d"),
                f"{row['floor_ms']:.1f}",
                f(row, "stats_ms", ".1f"),
                "**" + f(row, "stats_x_floor", ".2f") + "**" if "stats_x_floor" in row else "–",
                f(row, "asft_x_floor", ".2f"),
                f(row, variant_key(row, "peak_extra_gb"), ".2f"),
                f"{row['dw_fp32_gb']:.2f}",
            ]
        )
    p = result["params"]
    what = (
        f"Modelled, not measured: H100 priced at {p['peak_flops'] / 1e12:.0f} TFLOP/s bf16 and "
        f"{p['bandwidth'] / 1e12:.1f} TB/s, N={p['n']} tokens in rows of {p['row_len']}, bf16, default chunks for an 80 GB device; op counts recorded on CPU tensors"
    )
    header = [
        "head (H, V)",
        "masked prompt",
        "rows/chunk",
        "floor (ms, modelled H100)",
        "DFT + stats (ms, modelled H100)",
        "DFT + stats × floor",
        "ASFT × floor",
        "peak extra (GB)",
        "of which dW fp32 (GB)",
    ]
    return table(header, body) + "\n" + conditions(result, what) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--masked", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--top", type=int, default=3, help="top costs to list per row")
    parser.add_argument("--json", default=None, help="also write the result JSON here")
    parser.add_argument("--name", default=default_name(), help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    prov = Provenance.start("cpu")
    runs = []
    print(
        f"torch {torch.__version__}; H100 priced at {PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16, {BANDWIDTH / 1e12:.1f} TB/s"
    )
    print(
        "| head | H | V | masked prompt | path | rows/chunk | floor (ms) | modeled (ms) | × floor "
        "| peak extra (GB) | − dW fp32 (GB) | top costs (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        for masked in args.masked:
            for variant in args.variants:
                t0 = time.perf_counter()
                r = model_case(model, variant, masked == "yes", n=args.n)
                r["wall_s"] = time.perf_counter() - t0
                runs.append(r)
                top = ", ".join(f"{name} {ms:.2f}" for name, ms in r["top"][: args.top])
                print(
                    f"| {model} | {r['H']} | {r['V']} | {'30%' if r['masked'] else '0%'} | {variant} "
                    f"| {r['chunk_rows']} | {r['floor_ms']:.2f} | {r['modeled_ms']:.2f} | {r['x_floor']:.2f} "
                    f"| {r['peak_extra_gb']:.2f} | {r['peak_minus_dw_gb']:.2f} | {top} |",
                    flush=True,
                )
    params = {
        "n": args.n,
        "row_len": 1024,
        "masked_fraction": 0.3,
        "dtype": "bfloat16",
        "peak_flops": PEAK_FLOPS,
        "bandwidth": BANDWIDTH,
        "device_memory": H100_MEMORY,
        "models": {m: MODELS[m] for m in args.models},
    }
    write(args.name, prov.finish(), params, runs, derive, render, extra_json=args.json)


if __name__ == "__main__":
    main()
