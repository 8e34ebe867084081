"""A new stop token the base never produced: plain DFT vs DFT + cross-entropy on it vs SFT.

    python examples/study/stop_token.py             # 5 seeds x 3 losses, ~3 min on 2 CPU cores
    python examples/study/stop_token.py --smoke     # 1 seed, a few steps: pipeline check

The study's reasoning demonstrations (300 worked 3-term sums) in a new output format: every
completion ends with '?' instead of the newline ('... A: 199?'). The shipped base has never
produced '?' in a completion (it only appears in prompts), so its p at that position is tiny and
DFT's weight there is ~0. Losses (each at its best reasoning lr from results/results.json):
``sft``; ``dft``; ``dft_ce`` = DFT with ``DFTWeight(ce_token_ids=[?, newline])`` (what
``--dft_ce_tokens`` does with the special tokens). Scored on 150 held-out problems in the new format,
greedy generation with '?' as the stop token: ``stop_rate`` (the generation ended with '?') and
``exact_match`` (the answer before it). Paired differences vs SFT over seeds (same data and order),
with 95% t-intervals. Writes results/stop_token.json. Also prints ``dft inspect``'s figures for
the training data (``dft.inspect_prior``): what the rule sees before training.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import random
import time
from pathlib import Path

import lab
import study
import tasks
import torch

import dft

STOP = "?"
STOP_ID = tasks.encode(STOP)[0]
HERE = Path(__file__).resolve().parent


def new_format(examples: list[dict]) -> list[dict]:
    return [{"prompt": e["prompt"], "completion": e["completion"].rstrip("\n") + STOP} for e in examples]


def losses(best_lr: dict[str, float]) -> dict[str, tuple[dft.DFTWeight, float]]:
    return {
        "sft": (dft.DFTWeight(alpha=0.0), best_lr["sft"]),
        "dft": (dft.DFTWeight(alpha=1.0), best_lr["dft"]),
        "dft_ce": (dft.DFTWeight(alpha=1.0, ce_token_ids=(STOP_ID, tasks.EOS)), best_lr["dft"]),
    }


@torch.no_grad()
def score(model, examples: list[dict]) -> dict[str, float]:
    model.eval()
    longest = max(len(e["completion"]) for e in examples)
    stopped = correct = 0
    for e in examples:
        ids = torch.tensor([[tasks.BOS] + tasks.encode(e["prompt"])])
        out = model.generate(
            ids, max_new_tokens=longest + 4, do_sample=False, pad_token_id=tasks.PAD, eos_token_id=STOP_ID
        )
        text = tasks.decode(out[0, ids.shape[1] :].tolist())
        stopped += text.endswith(STOP)
        correct += tasks.answer(text.split(STOP)[0]) == tasks.answer(e["completion"].rstrip(STOP))
    return {"stop_rate": stopped / len(examples), "exact_match": correct / len(examples)}


def run_one(job: tuple) -> dict:
    name, weighting, lr, seed, cfg = job
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    model = copy.deepcopy(lab.load_base())
    data = new_format(study.training_data("reasoning", seed, cfg))
    lab.train(model, data, steps=cfg["steps"], batch_size=cfg["batch_size"], lr=lr, seed=seed, loss=weighting)
    evals = new_format(tasks.eval_sets(cfg["n_eval"])["id"])
    return {"loss": name, "lr": lr, "seed": seed, **score(model, evals)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "stop_token.json"))
    args = parser.parse_args()
    cfg = dict(study.SMOKE if args.smoke else study.FULL)
    results = json.loads((HERE / "results" / "results.json").read_text())
    best_lr = results["experiments"]["reasoning"]["best_lr"]
    t0 = time.time()
    base = lab.load_base()
    data = new_format(study.training_data("reasoning", 0, cfg))
    prior = dft.inspect_prior(
        base, [lab.batch(data[i : i + 32]) for i in range(0, len(data), 32)], special_ids=[STOP_ID, tasks.EOS]
    )
    print(
        f"inspect: mean_p {prior.mean_p:.3f}, frac_below {prior.frac_below}, stop token mean p "
        f"{prior.special_tokens['mean_p']:.2e} -> {prior.recommendation}"
    )
    evals = new_format(tasks.eval_sets(cfg["n_eval"])["id"])
    base_score = score(base, evals)
    jobs = [(n, w, lr, s, cfg) for n, (w, lr) in losses(best_lr).items() for s in cfg["seeds"]]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        runs = pool.map(run_one, jobs)
    table = {}
    for name in losses(best_lr):
        mine = sorted((r for r in runs if r["loss"] == name), key=lambda r: r["seed"])
        sft = sorted((r for r in runs if r["loss"] == "sft"), key=lambda r: r["seed"])
        table[name] = {"lr": mine[0]["lr"]}
        for metric in ("stop_rate", "exact_match"):
            values = [r[metric] for r in mine]
            table[name][metric] = study.interval(values)
            table[name][f"{metric}_vs_sft"] = study.interval([a[metric] - b[metric] for a, b in zip(mine, sft)])
    out = {
        "command": "python examples/study/stop_token.py" + (" --smoke" if args.smoke else ""),
        "minutes": (time.time() - t0) / 60,
        "seeds": cfg["seeds"],
        "prior": prior.as_dict(),
        "base": base_score,
        "losses": table,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"base: stop_rate {base_score['stop_rate']:.3f}, exact_match {base_score['exact_match']:.3f}")
    for name, row in table.items():
        print(
            f"{name:7s} lr {row['lr']:g}: stop_rate {row['stop_rate']['mean']:.3f} "
            f"(vs SFT {row['stop_rate_vs_sft']['mean']:+.3f} [{row['stop_rate_vs_sft']['ci95'][0]:+.3f}, "
            f"{row['stop_rate_vs_sft']['ci95'][1]:+.3f}]), exact_match {row['exact_match']['mean']:.3f} "
            f"(vs SFT {row['exact_match_vs_sft']['mean']:+.3f} [{row['exact_match_vs_sft']['ci95'][0]:+.3f}, "
            f"{row['exact_match_vs_sft']['ci95'][1]:+.3f}])"
        )
    print(f"{out['minutes']:.1f} min; wrote {args.out}")


if __name__ == "__main__":
    random.seed(0)
    main()
