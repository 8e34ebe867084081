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
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

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
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            if state.global_step > 1:
                times.append(time.perf_counter() - self.t0)

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
    return {"step_s": sorted(times)[len(times) // 2], "peak_extra_mb": peak / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step); median reported")
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
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

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    print(
        f"# trainer step on {device}: Llama hidden {a.hidden}, {a.layers} layers, V={a.vocab}, "
        f"seq {a.seq}, batch {a.batch}; median of {a.steps} steps\n"
    )
    print("| case | step (s) | x trainer_ce | peak extra (MB) | mem x trainer_ce | mem x trl_dft |")
    print("|---|---|---|---|---|---|")
    results = {}
    for case in a.cases:
        argv = [sys.executable, __file__, "--_worker", case] + [
            x for k in ("hidden", "layers", "vocab", "seq", "batch", "steps") for x in (f"--{k}", str(getattr(a, k)))
        ]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"| {case} | failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:100]} | | | | |")
            continue
        results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
    base, trl_r = results.get("trainer_ce"), results.get("trl_dft")
    for case, r in results.items():
        xt = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
        mt = f"{r['peak_extra_mb'] / base['peak_extra_mb']:.2f}" if base else "-"
        mtrl = f"{r['peak_extra_mb'] / trl_r['peak_extra_mb']:.2f}" if trl_r else "-"
        print(f"| {case} | {r['step_s']:.2f} | {xt} | {r['peak_extra_mb']:.0f} | {mt} | {mtrl} |")


if __name__ == "__main__":
    main()
