"""Should I switch? `dft inspect`'s figures on six data shapes, next to which loss won when trained.

    python examples/study/shapes.py            # ~10 min on 2 CPU cores: inspect figures + 2 new shapes trained
    python examples/study/shapes.py --smoke    # 1 seed, 2 steps: pipeline check, numbers meaningless

Inspect figures (``dft.inspect_prior`` of the shipped base on each shape's training data, seed 0) for the
study's four experiments (results from results/results.json, made by study.py) and two new shapes,
trained here with the study's protocol (same base, steps, batches; 5 seeds; paired differences vs SFT
with 95% t-intervals; each loss at its best lr from results.json: the reasoning experiment's for
new_format, the knowledge experiment's for mixed, whose new part is the facts):

- new_format  the 300 reasoning demonstrations with a new stop token: each completion ends with '?'
              instead of the newline ('... A: 199?'). The base has never produced '?' in a completion.
              Scored on 150 held-out problems in that format, greedy, '?' as the stop token:
              ``stop_rate`` (the generation ended with '?') and ``exact_match`` (the answer before it).
- mixed       the 300 reasoning demonstrations plus 100 new facts (the knowledge experiment's table,
              no prior). Scored: ``id_exact_match`` (reasoning) and ``recall_exact_match`` (facts).

Losses: sft, dft, dft_floor (min_weight 0.1), mix (beta 0.5), dft_ce (DFT with
``DFTWeight(ce_token_ids=[stop, newline])``, what ``--dft_ce_tokens`` does; new_format only).
Writes results/shapes.json.
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
METRICS = {"new_format": ("stop_rate", "exact_match"), "mixed": ("id_exact_match", "recall_exact_match")}


def new_format(examples: list[dict]) -> list[dict]:
    return [{"prompt": e["prompt"], "completion": e["completion"].rstrip("\n") + STOP} for e in examples]


def shape_data(shape: str, seed: int, cfg: dict) -> list[dict]:
    """The training data of every shape (the study's four and the two new ones)."""
    if shape in ("reasoning", "noisy", "knowledge"):
        return study.training_data(shape, seed, cfg)
    if shape == "forgetting":  # the reasoning runs, scored on other skills
        return study.training_data("reasoning", seed, cfg)
    if shape == "new_format":
        return new_format(study.training_data("reasoning", seed, cfg))
    if shape == "mixed":
        return study.training_data("reasoning", seed, cfg) + study.training_data("knowledge", seed, cfg)
    raise ValueError(shape)


def losses(best_lr: dict[str, float], shape: str) -> dict[str, tuple[dft.DFTWeight, float]]:
    out = {
        "sft": (dft.DFTWeight(alpha=0.0), best_lr["sft"]),
        "dft": (dft.DFTWeight(alpha=1.0), best_lr["dft"]),
        "dft_floor": (dft.DFTWeight(alpha=1.0, min_weight=0.1), best_lr["dft_floor"]),
        "mix": (dft.DFTWeight(alpha=1.0, beta=0.5), best_lr["mix"]),
    }
    if shape == "new_format":
        out["dft_ce"] = (dft.DFTWeight(alpha=1.0, ce_token_ids=(STOP_ID, tasks.EOS)), best_lr["dft"])
    return out


@torch.no_grad()
def stop_scores(model, examples: list[dict]) -> dict[str, float]:
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


def score(model, shape: str, seed: int, cfg: dict) -> dict[str, float]:
    sets = tasks.eval_sets(cfg["n_eval"])
    if shape == "new_format":
        return stop_scores(model, new_format(sets["id"]))
    facts = study.training_data("knowledge", seed, cfg)
    longest = max(len(e["completion"]) for e in facts + sets["id"])
    return {
        "id_exact_match": lab.exact_match(model, sets["id"], max_new_tokens=longest + 4),
        "recall_exact_match": lab.exact_match(model, facts, max_new_tokens=longest + 4),
    }


def run_one(job: tuple) -> dict:
    shape, name, weighting, lr, seed, cfg = job
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    model = copy.deepcopy(lab.load_base())
    data = shape_data(shape, seed, cfg)
    lab.train(model, data, steps=cfg["steps"], batch_size=cfg["batch_size"], lr=lr, seed=seed, loss=weighting)
    return {"shape": shape, "loss": name, "lr": lr, "seed": seed, **score(model, shape, seed, cfg)}


def inspect_figures(cfg: dict) -> dict[str, dict]:
    base = lab.load_base()
    out = {}
    for shape in ("reasoning", "noisy", "forgetting", "knowledge", "new_format", "mixed"):
        data = shape_data(shape, 0, cfg)
        batches = [lab.batch(data[i : i + 64]) for i in range(0, len(data), 64)]
        out[shape] = dft.inspect_prior(base, batches, special_ids=[STOP_ID, tasks.EOS]).as_dict()
        out[shape].pop("histogram")
    return out


def summarise(runs: list[dict], names: dict[str, list[str]]) -> dict[str, dict]:
    """Per shape and loss: its lr, each metric's interval over seeds and the paired difference vs SFT."""
    table: dict[str, dict] = {}
    for shape, losses_of_shape in names.items():
        table[shape] = {}
        sft = sorted((r for r in runs if r["shape"] == shape and r["loss"] == "sft"), key=lambda r: r["seed"])
        for name in losses_of_shape:
            mine = sorted((r for r in runs if r["shape"] == shape and r["loss"] == name), key=lambda r: r["seed"])
            row = table[shape][name] = {"lr": mine[0]["lr"]}
            for metric in METRICS[shape]:
                row[metric] = study.interval([r[metric] for r in mine])
                row[f"{metric}_vs_sft"] = study.interval([a[metric] - b[metric] for a, b in zip(mine, sft)])
    return table


TITLES = {
    "sft": "SFT",
    "dft": "DFT",
    "dft_floor": "DFT + floor 0.1",
    "mix": "mix (beta 0.5)",
    "dft_ce": "**DFT + CE on `?` and EOS** (`ce_token_ids`)",
}


def new_format_table(*results: dict) -> str:
    """The docs' new-stop-token table: stop rate and exact match per loss, one pair of columns per result file
    (each at one lr), with the paired difference vs SFT [95% t-interval]."""

    def cell(row: dict, metric: str, name: str) -> str:
        if name == "sft":
            return f"{row[metric]['mean']:.3f}"
        d = row[f"{metric}_vs_sft"]
        return f"{row[metric]['mean']:.3f} ({d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}])"

    tables = [r["losses"]["new_format"] for r in results]
    head = ["loss"]
    for t in tables:
        lr = f"{t['sft']['lr']:g}"
        head += [f"stop rate, lr {lr}", f"exact match, lr {lr}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, title in TITLES.items():
        cells = [title]
        for t in tables:
            cells += [cell(t[name], "stop_rate", name), cell(t[name], "exact_match", name)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def inspect_cells(figures: dict) -> str:
    """The inspect columns of the docs' shapes table for one shape: tokens, mean p, share below 0.01, advice."""
    return (
        f"| {figures['supervised_tokens']} | {figures['mean_p']:.3f} | {100 * figures['frac_below']['0.01']:.1f}% "
        f"| `{figures['recommendation']}`"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "shapes.json"))
    parser.add_argument("--shapes", nargs="+", default=list(METRICS), choices=list(METRICS))
    parser.add_argument("--lr", type=float, default=None, help="one lr for every loss instead of the study's best")
    args = parser.parse_args()
    cfg = dict(study.SMOKE if args.smoke else study.FULL)
    study_runs = json.loads((HERE / "results" / "results.json").read_text())["experiments"]
    lrs = {"new_format": study_runs["reasoning"]["best_lr"], "mixed": study_runs["knowledge"]["best_lr"]}
    if args.lr is not None:
        lrs = {shape: dict.fromkeys(lrs[shape], args.lr) for shape in lrs}
    shapes = {shape: METRICS[shape] for shape in args.shapes}
    t0 = time.time()
    figures = inspect_figures(cfg)
    for shape, f in figures.items():
        print(
            f"{shape:11s} tokens {f['supervised_tokens']:5d}  mean p {f['mean_p']:.3f}  p<0.01 "
            f"{f['frac_below']['0.01']:.3f}  -> {f['recommendation']}"
        )
    base = lab.load_base()
    bases = {shape: score(base, shape, 0, cfg) for shape in shapes}
    jobs = [
        (shape, name, w, lr, seed, cfg)
        for shape in shapes
        for name, (w, lr) in losses(lrs[shape], shape).items()
        for seed in cfg["seeds"]
    ]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        runs = pool.map(run_one, jobs)
    table = summarise(runs, {shape: list(losses(lrs[shape], shape)) for shape in shapes})
    for shape, rows in table.items():
        for name, row in rows.items():
            line = "  ".join(
                f"{m} {row[m]['mean']:.3f} (vs SFT {row[m + '_vs_sft']['mean']:+.3f} "
                f"[{row[m + '_vs_sft']['ci95'][0]:+.3f}, {row[m + '_vs_sft']['ci95'][1]:+.3f}])"
                for m in METRICS[shape]
            )
            print(f"{shape:11s} {name:9s} lr {row['lr']:g}: {line}", flush=True)
    out = {
        "command": "python examples/study/shapes.py"
        + (" --smoke" if args.smoke else "")
        + (f" --shapes {' '.join(args.shapes)} --lr {args.lr:g}" if args.lr is not None else ""),
        "minutes": (time.time() - t0) / 60,
        "seeds": cfg["seeds"],
        "inspect": figures,
        "base": bases,
        "losses": table,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"base: {bases}\n{out['minutes']:.1f} min; wrote {args.out}")


if __name__ == "__main__":
    random.seed(0)
    main()
