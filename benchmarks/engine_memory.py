"""Peak memory per rank of DFTTrainer under each engine: fused head vs the logits path (2 CPU ranks).

    python benchmarks/engine_memory.py                       # every engine, fused and logits path
    python benchmarks/engine_memory.py --vocab 65536         # smaller head
    python benchmarks/engine_memory.py --engines tp sp cp    # the model-parallel rows only

Each run launches 2 gloo ranks with torchrun (DeepSpeed: DS_ACCELERATOR=cpu; FSDP2 through
accelerate's own preparation with the test suite's CPU shim), trains 2 optimizer steps of a Llama
with a large vocabulary (hidden 64, 2 layers, untied head; rows of 1024 tokens, 2 rows per
micro-batch, 2 accumulation steps, all tokens supervised) and reports each rank's peak RSS growth
during training (``ru_maxrss`` after ``train()`` minus the RSS before it), the larger of the two
ranks. CPU RSS is a proxy for device memory: what matters is the ``[tokens, vocab]`` float32 logits
(and their gradient) that the logits path builds and the fused head never does.

What one rank holds per micro-batch:

* ``ddp``, ``zero2``, ``zero3``, ``fsdp2``: its own 2 rows x 1024 tokens (2 data-parallel ranks).
* ``tp``: tensor parallel, ``from_pretrained(tp_plan="auto")`` (head ``colwise_gather_output``);
  one data-parallel rank, so both ranks run the same 2 rows x 1024 tokens.
* ``sp``: Ulysses sequence parallel (DeepSpeed ALST) on ZeRO-2, ``ParallelismConfig(sp_size=2,
  sp_backend="deepspeed")``, launched as tests/dist/sp_worker.py does (shim: tests/dist/sp_shim.py).
  One data-parallel rank: Trainer's ``UlyssesSPDataLoaderAdapter`` deals each rank's 2-row batch
  out to both ranks as sequence halves, so a rank holds 2 rows x 512 tokens (``shift_labels``;
  the rows carry ``position_ids``, which the adapter needs, and no attention mask).
* ``cp``: context parallel, FSDP2 + ``ParallelismConfig(cp_size=2)``, launched as
  tests/dist/cp_worker.py does (shims: tests/dist/cp_shim.py, torch's default float32 ring merge).
  One data-parallel rank: both ranks get the same 2 rows and each keeps half of every sequence,
  2 rows x 512 tokens (torch's load balancing: a head and a tail chunk of 256, so the length must
  be a multiple of 2 * cp_size = 4), with ``position_ids`` and ``shift_labels``.

Under ``sp`` and ``cp`` the per-rank logits are therefore half those of the other rows (the header
line gives the full 2 x 1024 tensor).

Writes benchmarks/results/engine_memory.json (provenance, every launch's peak) and engine_memory.md (the
table, rendered from the JSON by ``render``); ``--name`` picks another file stem.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]  # _provenance, also when imported from elsewhere
from _provenance import Provenance, conditions, default_name, load_average, table, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("ddp", "zero2", "zero3", "fsdp2", "tp", "sp", "cp")
FSDP2 = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
SP = CP = 2  # sequence-parallel / context-parallel degree: both ranks


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(engine: str, fused: bool, vocab: int, seq: int, out: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, default_data_collator

    import dft
    from tests.dist.cpu_fsdp_shim import install

    install()
    if engine == "sp":  # deepspeed.comm initialised on CPU ranks (tests/dist/sp_shim.py)
        from tests.dist.sp_shim import install as install_sp

        install_sp()
    elif engine == "cp":  # torch's ring attention for the CPU SDPA kernel (tests/dist/cp_shim.py)
        from tests.dist.cp_shim import install as install_cp

        install_cp()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if engine in ("sp", "cp"):
        model.config._attn_implementation = "sdpa"  # CP: torch's ring attention; SP: DeepSpeed's core attention
    if engine == "tp":  # loaded as users do: from_pretrained(..., tp_plan="auto"), head Shard(0) on 2 ranks
        model = _tensor_parallel(model, out)
    ids = torch.randint(0, vocab, (16, seq))
    columns = {"input_ids": ids.tolist(), "labels": ids.tolist()}
    if engine in ("sp", "cp"):  # the SP adapter needs them; CP shards them with the inputs
        assert seq % (2 * CP) == 0, "CP load balancing needs a sequence length divisible by 2 * cp_size"
        columns["position_ids"] = torch.arange(seq).expand_as(ids).tolist()
    data = Dataset.from_dict(columns)
    kwargs: dict = {}
    if engine.startswith("zero") or engine == "sp":
        kwargs["deepspeed"] = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "zero_optimization": {
                "stage": 2 if engine == "sp" else int(engine[-1]),
                "stage3_param_persistence_threshold": 0,
            },
            "zero_allow_untested_optimizer": True,
        }
    elif engine in ("fsdp2", "cp"):
        kwargs["fsdp"] = "full_shard"
        kwargs["fsdp_config"] = FSDP2 if engine == "fsdp2" else {**FSDP2, "reshard_after_forward": True}
    if engine in ("sp", "cp"):
        kwargs["parallelism_config"] = _parallelism_config(engine)
    args = dft.DFTConfig(
        output_dir=str(out / "run"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-3,
        optim="sgd",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        fused_lm_head=fused,
        **kwargs,
    )
    trainer = dft.DFTTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    before = _rss_mb()
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    peaks = [torch.zeros(1) for _ in range(trainer.accelerator.num_processes)]
    torch.distributed.all_gather(peaks, torch.tensor([peak]))
    if trainer.accelerator.is_main_process:
        (out / "peak.txt").write_text(str(max(float(p) for p in peaks)))
    trainer.accelerator.wait_for_everyone()
    os._exit(0)  # skip gloo teardown (see tests/dist/__init__.py)


def _parallelism_config(engine: str):
    from accelerate import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    if engine == "cp":
        return ParallelismConfig(cp_size=CP)
    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation="sdpa")
    return ParallelismConfig(sp_size=SP, sp_backend="deepspeed", sp_handler=handler)


def _tensor_parallel(model, out: Path):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from tests.dist.sp_shim import allow_cpu_parallelism_config

    allow_cpu_parallelism_config()  # accelerate refuses ParallelismConfig on CPU ranks (test-only shim)
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        model.save_pretrained(out / "model")
    dist.barrier()
    return AutoModelForCausalLM.from_pretrained(out / "model", tp_plan="auto")


def run(engine: str, fused: bool, vocab: int, seq: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
        cmd += ["--worker", engine, "--fused", str(int(fused)), "--vocab", str(vocab), "--seq", str(seq), "--out", tmp]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{engine} fused={fused} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return float(Path(tmp, "peak.txt").read_text())


LABELS = {
    "ddp": "DDP",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
    "fsdp2": "FSDP2",
    "tp": 'tensor parallel (`tp_plan="auto"`)',
    "sp": "Ulysses SP (DeepSpeed ALST, ZeRO-2): half sequences",
    "cp": "context parallel (FSDP2): half sequences",
}


def derive(result: dict) -> list[dict]:
    """Per engine: the fused and logits-path peaks (the larger rank's) and their ratio."""
    by: dict[str, dict] = {}
    for r in result["runs"]:
        by.setdefault(r["engine"], {})["fused" if r["fused"] else "logits"] = r
    rows = []
    for engine, pair in by.items():
        row: dict = {"engine": engine}
        for kind in ("fused", "logits"):
            r = pair.get(kind)
            row[f"{kind}_mib"] = r.get("peak_mib") if r else None
            if r and "error" in r:
                row[f"{kind}_error"] = r["error"]
        ok = row["fused_mib"] is not None and row["logits_mib"] is not None
        row["ratio"] = row["fused_mib"] / row["logits_mib"] if ok else None
        rows.append(row)
    return rows


def render(result: dict) -> str:
    def mib(row: dict, kind: str) -> str:
        if row[f"{kind}_mib"] is None:
            return "failed" if f"{kind}_error" in row else "–"
        return f"{row[f'{kind}_mib']:.0f}"

    body = [
        [
            LABELS.get(r["engine"], r["engine"]),
            f"**{mib(r, 'fused')}**",
            mib(r, "logits"),
            "–" if r["ratio"] is None else f"**{r['ratio']:.2f}**",
        ]
        for r in result["rows"]
    ]
    p = result["params"]
    header = [
        "engine",
        "fused head: peak RSS growth / rank (MiB, CPU measured)",
        "logits path (MiB)",
        "fused ÷ logits",
    ]
    what = (
        f"Measured: `DFTTrainer`, 2 optimizer steps on 2 CPU ranks (gloo), Llama hidden 64, 2 layers, V={p['vocab']}, "
        f"2 rows × {p['seq']} tokens per micro-batch, 2 accumulation steps; one float32 logits tensor "
        f"{p['logits_mib']:.0f} MiB; one launch per cell, the larger rank's peak RSS growth during `train()`"
    )
    return table(header, body) + "\n" + conditions(result, what) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES))
    parser.add_argument("--name", default=default_name(), help="results file stem under benchmarks/results/")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--fused", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        worker(a.worker, bool(a.fused), a.vocab, a.seq, Path(a.out))
        return
    prov = Provenance.start("cpu")
    logits_mb = 2 * a.seq * a.vocab * 4 / 2**20
    print(f"V={a.vocab}, 2 rows x {a.seq} tokens per micro-batch: one float32 logits tensor = {logits_mb:.0f} MiB")
    print("| engine | fused head: peak RSS growth / rank | logits path | ratio |")
    print("|---|---|---|---|")
    runs = []
    for engine in a.engines:
        peaks = {}
        for fused in (True, False):
            t0 = time.perf_counter()
            record: dict = {"engine": engine, "fused": fused}
            try:
                record["peak_mib"] = peaks[fused] = run(engine, fused, a.vocab, a.seq)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                record["error"] = str(e).strip().splitlines()[-1][:200]
                print(f"{engine} fused={fused} failed: {e}", file=sys.stderr)
            record["wall_s"] = time.perf_counter() - t0
            record["load_after"] = load_average()
            runs.append(record)
        if len(peaks) == 2:
            print(
                f"| {engine} | {peaks[True]:.0f} MiB | {peaks[False]:.0f} MiB | {peaks[True] / peaks[False]:.2f}x |",
                flush=True,
            )
    params = {"vocab": a.vocab, "seq": a.seq, "engines": a.engines, "logits_mib": logits_mb, "ranks": 2}
    write(a.name, prov.finish(), params, runs, derive, render)


if __name__ == "__main__":
    main()
