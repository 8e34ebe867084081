"""Trainer step benchmark: peak memory and step time of DFTTrainer vs Trainer (HF CE loss) vs TRL DFT.

Each case runs in its own process on a tiny-but-wide Llama (default: hidden 256, 2 layers,
V=128256, seq 1024, batch 4), a few optimizer steps after one warm-up step.

  python benchmarks/trainer_step.py                       # the default shape
  python benchmarks/trainer_step.py --vocab 32000 --seq 512 --steps 3

Cases:
  trainer_ce   transformers.Trainer with the model's own loss (full logits, cross-entropy)
  trl_dft      trl.SFTTrainer(loss_type="dft") (if trl is installed)
  dft          dft.DFTTrainer (fused LM head)
  dft_logits   dft.DFTTrainer(fused_lm_head=False) (DFT on full logits, for reference)

Peak memory: on CUDA max_memory_allocated during the timed steps minus the model + optimizer; on
CPU the process's peak RSS minus its RSS after the warm-up step's model/optimizer allocation.

Writes benchmarks/results/trainer_step.json (provenance, every timed step) and trainer_step.md (the
table, rendered from the JSON by ``render``); ``--name`` picks another file stem.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]  # _provenance, also when imported from elsewhere
from _provenance import Provenance, conditions, default_name, load_average, median, table, write  # noqa: E402

CASES = ["trainer_ce", "trl_dft", "dft", "dft_logits"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(case: str, a: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    import dft

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=2 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=a.seq,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    n = a.batch * (a.steps + 1)
    ids = torch.randint(3, a.vocab, (n, a.seq))
    labels = ids.clone()
    labels[:, : a.seq // 4] = -100  # prompt masked
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * a.seq] * n, "labels": labels.tolist()}
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(
        output_dir=f"/tmp/trainer_step_{case}",
        per_device_train_batch_size=a.batch,
        max_steps=a.steps + 1,
        learning_rate=1e-4,
        report_to=[],
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        dataloader_num_workers=0,
    )

    times: list[float] = []
    cpu: list[float] = []
    mem: dict[str, int] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:  # after the warm-up step: model, grads and optimizer state exist
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    mem["base"] = torch.cuda.memory_allocated()
                else:
                    mem["base"] = _rss()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            if state.global_step > 1:
                times.append(time.perf_counter() - self.t0)
                cpu.append(time.process_time() - self.c0)

    if case == "trainer_ce":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=[Clock()])
    elif case in ("dft", "dft_logits"):
        trainer = dft.DFTTrainer(
            model=model,
            args=dft.DFTConfig(**common, fused_lm_head=case == "dft"),
            train_dataset=data,
            callbacks=[Clock()],
        )
    elif case == "trl_dft":
        import trl

        from dft.toy import toy_tokenizer

        tok = toy_tokenizer()
        trainer = trl.SFTTrainer(
            model=model,
            args=trl.SFTConfig(**common, loss_type="dft", max_length=None),
            train_dataset=data.remove_columns(["labels"]),
            processing_class=tok,
            callbacks=[Clock()],
        )
    else:
        raise ValueError(case)
    trainer.train()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - mem["base"]
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - mem["base"]
    return {"steps_s": times, "cpu_s": cpu, "peak_extra_mb": peak / 2**20}


LABELS = {
    "trainer_ce": "`transformers.Trainer` (the model's own CE loss)",
    "trl_dft": 'TRL `SFTTrainer(loss_type="dft")`',
    "dft": "**`dft.DFTTrainer`** (fused head)",
    "dft_logits": "`dft.DFTTrainer(fused_lm_head=False)` (logits path)",
}


def derive(result: dict) -> list[dict]:
    """Per case, from the timed steps: median, min and max step time, and the ratios to Trainer's CE (time,
    CPU time = user + system of the process, memory) and to TRL's DFT (memory)."""
    ok = {r["case"]: r for r in result["runs"] if "error" not in r}
    step = {c: median(r["steps_s"]) for c, r in ok.items()}
    cpu = {c: median(r["cpu_s"]) for c, r in ok.items()}
    rows = []
    for r in result["runs"]:
        case = r["case"]
        if "error" in r:
            rows.append({"case": case, "error": r["error"]})
            continue
        mem = r["peak_extra_mb"]
        rows.append(
            {
                "case": case,
                "step_s": step[case],
                "min_s": min(r["steps_s"]),
                "max_s": max(r["steps_s"]),
                "x_trainer_ce": step[case] / step["trainer_ce"] if "trainer_ce" in ok else None,
                "cpu_x_trainer_ce": cpu[case] / cpu["trainer_ce"] if "trainer_ce" in ok else None,
                "peak_extra_mb": mem,
                "mem_x_trainer_ce": mem / ok["trainer_ce"]["peak_extra_mb"] if "trainer_ce" in ok else None,
                "mem_x_trl_dft": mem / ok["trl_dft"]["peak_extra_mb"] if "trl_dft" in ok else None,
            }
        )
    return rows


def render(result: dict) -> str:
    def num(x: float | None, fmt: str, strong: bool) -> str:
        if x is None:
            return "–"
        return f"**{x:{fmt}}**" if strong else f"{x:{fmt}}"

    body = []
    for r in result["rows"]:
        label = LABELS.get(r["case"], r["case"])
        if "error" in r:
            body.append([label, f"failed: {r['error']}", "", "", "", "", "", "", ""])
            continue
        strong = r["case"] == "dft"
        body.append(
            [
                label,
                num(r["step_s"], ".2f", strong),
                f"{r['min_s']:.2f}–{r['max_s']:.2f}",
                num(r["x_trainer_ce"], ".2f", strong),
                num(r["cpu_x_trainer_ce"], ".2f", False),
                num(r["peak_extra_mb"], ".0f", strong),
                num(r["mem_x_trainer_ce"], ".2f", strong),
                num(r["mem_x_trl_dft"], ".2f", strong),
            ]
        )
    p = result["params"]
    where = "GPU" if result["provenance"]["device"]["kind"] == "cuda" else "CPU"
    header = [
        "case",
        f"step (s, {where} measured)",
        "min–max (s)",
        "× Trainer CE",
        "CPU time × Trainer CE",
        "peak extra (MB)",
        "mem × Trainer CE",
        "mem × TRL DFT",
    ]
    what = (
        f"Measured: one optimizer step of a Llama with hidden {p['hidden']}, {p['layers']} layers, V={p['vocab']}, "
        f"seq {p['seq']}, batch {p['batch']} (first quarter of each row a masked prompt), "
        f"{'bf16' if where == 'GPU' else 'float32'}; each case in its own process, median of {p['steps']} steps "
        "after a warm-up step; CPU time = user + system time of the process; "
        "peak extra = peak RSS beyond the model and optimizer state"
    )
    return table(header, body) + "\n" + conditions(result, what) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step); median reported")
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    p.add_argument("--name", default=default_name(), help="results file stem under benchmarks/results/")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._worker:
        print(json.dumps(worker(a._worker, a)))
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        a.cases = [c for c in a.cases if c != "trl_dft"]
    import torch

    prov = Provenance.start("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    print(
        f"# trainer step on {device}: Llama hidden {a.hidden}, {a.layers} layers, V={a.vocab}, "
        f"seq {a.seq}, batch {a.batch}; median of {a.steps} steps\n"
    )
    runs = []
    for case in a.cases:
        argv = [sys.executable, __file__, "--_worker", case] + [
            x for k in ("hidden", "layers", "vocab", "seq", "batch", "steps") for x in (f"--{k}", str(getattr(a, k)))
        ]
        proc = subprocess.run(argv, capture_output=True, text=True)
        run = {"case": case}
        if proc.returncode != 0:
            run["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
        else:
            run.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        run["load_after"] = load_average()
        runs.append(run)
        print(json.dumps(run), flush=True)
    params = {k: getattr(a, k) for k in ("hidden", "layers", "vocab", "seq", "batch", "steps", "cases")}
    result = write(a.name, prov.finish(), params, runs, derive, render)
    print(render(result))


if __name__ == "__main__":
    main()
