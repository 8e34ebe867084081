"""Study v2: where does DFT help, where does it hurt? Fine-tune a base that already has a prior.

    python examples/study/study.py            # the study (30-33 min on 2 CPU cores, progress printed per run)
    python examples/study/study.py --smoke    # < 2 min: pipeline check on 1 seed, numbers meaningless

Starts from the shipped base (examples/study/base, made by pretrain.py: a 0.6 M-parameter Llama that already
solves part of the target task). Four experiments, the same steps and batches for every loss:

- reasoning  fine-tune on 300 worked solutions of 3-term sums; exact match in distribution (ID) and out of it
             (4 one-digit terms: one step longer than any example; an unseen compact phrasing 'Q:23+58+7=?'),
             plus teacher-forced scores of the computed tokens (every step result: lab.result_spans).
- noisy      the same demonstrations with 20% corrupted (one wrong digit in a step or the answer); scored on
             clean problems.
- forgetting the reasoning runs scored on pretraining skills the demonstrations do not cover (subtraction,
             direct answers, spelling digits, the memorised code table).
- knowledge  learn 100 new facts (random 3-letter code -> 3-digit value, no prior): recall exact match, the
             old facts kept and the target arithmetic (ID) kept.

Losses: sft (cross-entropy), dft (p * CE), dft_floor (weight >= 0.1), mix (beta 0.5), asft (DFT + 0.1 KL to
the base), eaft (CE x normalised top-20 entropy). The learning rate is picked per (experiment, loss) on a
validation metric from a grid of 4 values, extended while the best is at an edge; every lr is run on every
seed. Reported: mean, std, 95% t-interval over seeds, and paired differences vs SFT (same seed = same data,
same order). Outputs in --out (default examples/study/results): results.json (schema dft-study/2),
results.md, study.png.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import statistics
import time
from pathlib import Path

import lab
import tasks
import torch

import dft

LOSSES = {  # name -> (weighting, kl_coef)
    "sft": (dft.DFTWeight(alpha=0.0), 0.0),
    "dft": (dft.DFTWeight(alpha=1.0), 0.0),
    "dft_floor": (dft.DFTWeight(alpha=1.0, min_weight=0.1), 0.0),
    "mix": (dft.DFTWeight(alpha=1.0, beta=0.5), 0.0),
    "asft": (dft.DFTWeight(alpha=1.0), 0.1),
    "eaft": (dft.DFTWeight(alpha=0.0, eaft_alpha=1.0, eaft_top_k=20), 0.0),
}
LADDER = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]  # the grid grows along this ladder
EXPERIMENTS = ("reasoning", "noisy", "forgetting", "knowledge")
TRAINED = ("reasoning", "noisy", "knowledge")  # forgetting re-scores the reasoning runs
SELECT = {
    "reasoning": "val_exact_match",
    "noisy": "val_exact_match",
    "forgetting": "val_exact_match",
    "knowledge": "recall_exact_match",
}
FULL = {
    "seeds": [0, 1, 2, 3, 4],
    "grid": [1e-4, 3e-4, 1e-3, 3e-3],
    "steps": 60,
    "batch_size": 16,
    "n_demos": 300,
    "n_facts": 100,
    "n_eval": 150,
    "noise": 0.2,
    "max_rounds": 3,
}
SMOKE = {
    "seeds": [0],
    "grid": [3e-4, 1e-3],
    "steps": 2,
    "batch_size": 4,
    "n_demos": 8,
    "n_facts": 4,
    "n_eval": 4,
    "noise": 0.25,
    "max_rounds": 1,
}

_BASE: dict = {}


def base_model(path: str):
    if path not in _BASE:
        _BASE[path] = lab.load_base(path)
        _BASE[path].requires_grad_(False)
    return _BASE[path]


def training_data(experiment: str, seed: int, cfg: dict) -> list[dict]:
    rng = random.Random(seed)
    if experiment == "knowledge":
        return tasks.knowledge_facts(cfg["n_facts"], seed)
    demos = tasks.sums(cfg["n_demos"], rng, terms=3, digits=2)
    if experiment == "noisy":
        bad = set(rng.sample(range(len(demos)), round(cfg["noise"] * len(demos))))
        demos = [tasks.corrupt(d, rng) if i in bad else d for i, d in enumerate(demos)]
    return demos


def score(model, experiment: str, seed: int, cfg: dict) -> dict[str, float]:
    """Every metric of one fine-tuned (or base) model for one trained experiment."""
    sets = tasks.eval_sets(cfg["n_eval"])
    out: dict[str, float] = {}

    def em(name: str, data: list[dict]) -> None:
        longest = max(len(e["completion"]) for e in data)
        out[f"{name}_exact_match"] = lab.exact_match(model, data, max_new_tokens=longest + 4)

    if experiment == "knowledge":
        facts = training_data("knowledge", seed, cfg)
        em("recall", facts)
        out.update({f"recall_{k}": v for k, v in lab.teacher_forced(model, facts).items()})
        em("keep_code", sets["keep_code"])  # the facts the base already knew
        em("id", sets["id"])  # the target arithmetic: does learning facts cost reasoning?
        return out
    for name in ("val", "id", "ood_terms", "ood_phrasing"):
        em(name, sets[name])
    out.update({f"id_{k}": v for k, v in lab.teacher_forced(model, sets["id"]).items()})
    out.update({f"val_{k}": v for k, v in lab.teacher_forced(model, sets["val"]).items()})
    if experiment == "reasoning":  # the forgetting experiment's metrics
        for name in ("keep_sub", "keep_quick", "keep_spell", "keep_code"):
            em(name, sets[name])
        out["keep_mean_exact_match"] = statistics.mean(
            out[f"{k}_exact_match"] for k in ("keep_sub", "keep_quick", "keep_spell", "keep_code")
        )
    return out


def run_one(job: tuple) -> dict:
    """Fine-tune a copy of the base with one (experiment, loss, lr, seed) and score it (runs in a worker)."""
    experiment, loss, lr, seed, cfg, base_path = job
    torch.set_num_threads(1)
    t0 = time.time()
    base = base_model(base_path)
    model = lab.load_base(base_path)
    weighting, kl_coef = LOSSES[loss]
    lab.train(
        model,
        training_data(experiment, seed, cfg),
        steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        lr=lr,
        seed=seed,
        warmup=max(1, cfg["steps"] // 10),
        loss=weighting,
        ref_model=base if kl_coef else None,
        kl_coef=kl_coef,
    )
    metrics = score(model, experiment, seed, cfg)
    return {
        "experiment": experiment,
        "loss": loss,
        "lr": lr,
        "seed": seed,
        "metrics": metrics,
        "seconds": round(time.time() - t0, 1),
    }


# ---- statistics ----------------------------------------------------------------------------------------

_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def interval(xs: list[float]) -> dict:
    """Mean, sample std and the 95% t-interval of the mean (a point when there is one value)."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return {"mean": m, "std": 0.0, "ci95": [m, m], "n": len(xs)}
    s = statistics.stdev(xs)
    df = len(xs) - 1
    t = _T975.get(df) or _T975[max(k for k in _T975 if k <= df)] if df <= 30 else 1.96
    h = t * s / math.sqrt(len(xs))
    return {"mean": m, "std": s, "ci95": [m - h, m + h], "n": len(xs)}


def best_lr(runs: list[dict], loss: str, metric: str) -> float:
    """Highest mean validation metric over seeds; ties go to the higher mean result-token log-likelihood."""
    tie = metric.replace("exact_match", "result_logp")
    by_lr: dict[float, list[dict]] = {}
    for r in runs:
        if r["loss"] == loss:
            by_lr.setdefault(r["lr"], []).append(r["metrics"])
    return max(
        by_lr,
        key=lambda lr: (
            round(statistics.mean(m[metric] for m in by_lr[lr]), 9),
            statistics.mean(m.get(tie, 0.0) for m in by_lr[lr]),
        ),
    )


def grid_of(runs: list[dict], loss: str) -> list[float]:
    return sorted({r["lr"] for r in runs if r["loss"] == loss})


def extension(runs: list[dict], loss: str, metric: str) -> float | None:
    """The next lr on the ladder beyond the grid's edge when the best lr is at that edge, else None."""
    grid, best = grid_of(runs, loss), best_lr(runs, loss, metric)
    if best == grid[0] and LADDER.index(best) > 0:
        return LADDER[LADDER.index(best) - 1]
    if best == grid[-1] and LADDER.index(best) < len(LADDER) - 1:
        return LADDER[LADDER.index(best) + 1]
    return None


# ---- the study ------------------------------------------------------------------------------------------


def run_jobs(jobs: list[tuple], workers: int, t0: float, done: list[int], total: list[int]) -> list[dict]:
    total[0] += len(jobs)
    results = []
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for r in pool.imap_unordered(run_one, jobs) if pool else map(run_one, jobs):
            done[0] += 1
            key = SELECT[r["experiment"]]
            print(
                f"[{time.time() - t0:6.0f}s] {done[0]:3d}/{total[0]} {r['experiment']:9s} {r['loss']:9s} "
                f"lr {r['lr']:<6g} seed {r['seed']}: {key} {r['metrics'][key]:.3f} ({r['seconds']:.0f}s)",
                flush=True,
            )
            results.append(r)
    finally:
        if pool:
            pool.close()
            pool.join()
    return results


def summarise(experiment: str, runs: list[dict], base: dict, seeds: list[int]) -> dict:
    metric = SELECT[experiment]
    names = sorted(runs[0]["metrics"]) if runs else []
    if experiment == "forgetting":
        names = [n for n in names if n.startswith("keep_")] + ["id_exact_match"]
        base = {k: v for k, v in base.items() if k in names}
    chosen = {loss: best_lr(runs, loss, metric) for loss in LOSSES}
    at_best = {
        loss: sorted((r for r in runs if r["loss"] == loss and r["lr"] == chosen[loss]), key=lambda r: r["seed"])
        for loss in LOSSES
    }
    summary, paired = [], []
    for loss in LOSSES:
        for name in names:
            values = [r["metrics"][name] for r in at_best[loss]]
            summary.append({"loss": loss, "metric": name, **interval(values)})
            if loss != "sft":
                diffs = [a["metrics"][name] - b["metrics"][name] for a, b in zip(at_best[loss], at_best["sft"])]
                paired.append({"loss": loss, "metric": name, **interval(diffs)})
    sweep = {
        loss: {
            str(lr): statistics.mean(r["metrics"][metric] for r in runs if r["loss"] == loss and r["lr"] == lr)
            for lr in grid_of(runs, loss)
        }
        for loss in LOSSES
    }
    return {
        "base": base,
        "select_on": metric,
        "lr_grid": {loss: grid_of(runs, loss) for loss in LOSSES},
        "best_lr": chosen,
        "lr_sweep": sweep,
        "summary": summary,
        "paired_vs_sft": paired,
        "runs": [r for r in runs]
        if experiment != "forgetting"
        else [{**r, "metrics": {k: r["metrics"][k] for k in names}} for r in runs],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny settings, < 2 minutes")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--base", default=str(lab.BASE_DIR), help="the base model folder (pretrain.py)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--workers", type=int, default=2, help="parallel runs (1 = in this process)")
    args = p.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.seeds:
        cfg["seeds"] = args.seeds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, done, total = time.time(), [0], [0]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = base_model(args.base)
    base_scores = {}
    for experiment in TRAINED:
        per_seed = [score(base, experiment, s, cfg) for s in (cfg["seeds"] if experiment == "knowledge" else [0])]
        base_scores[experiment] = {k: statistics.mean(m[k] for m in per_seed) for k in per_seed[0]}
    print(
        f"[{time.time() - t0:6.0f}s] base: "
        + json.dumps(
            {e: {k: round(v, 3) for k, v in m.items() if k.endswith("exact_match")} for e, m in base_scores.items()}
        ),
        flush=True,
    )
    jobs = [
        (e, loss, lr, s, cfg, args.base) for e in TRAINED for loss in LOSSES for lr in cfg["grid"] for s in cfg["seeds"]
    ]
    runs = run_jobs(jobs, args.workers, t0, done, total)
    for _ in range(cfg["max_rounds"]):
        more = []
        for e in TRAINED:
            for loss in LOSSES:
                lr = extension([r for r in runs if r["experiment"] == e], loss, SELECT[e])
                if lr is not None:
                    print(f"[{time.time() - t0:6.0f}s] {e}/{loss}: best lr at the grid's edge -> adding lr {lr:g}")
                    more += [(e, loss, lr, s, cfg, args.base) for s in cfg["seeds"]]
        if not more:
            break
        runs += run_jobs(more, args.workers, t0, done, total)
    experiments = {}
    for e in EXPERIMENTS:
        source = "reasoning" if e == "forgetting" else e
        experiments[e] = summarise(e, [r for r in runs if r["experiment"] == source], base_scores[source], cfg["seeds"])
    minutes = (time.time() - t0) / 60
    command = "python examples/study/study.py" + (" --smoke" if args.smoke else "")
    result = {
        "schema": "dft-study/2",
        "seeds": cfg["seeds"],
        "command": command,
        "minutes": round(minutes, 1),
        "config": cfg,
        "losses": {k: {"weighting": repr(w), "kl_coef": c} for k, (w, c) in LOSSES.items()},
        "base_model": str(Path(args.base).name),
        "torch": torch.__version__,
        "experiments": experiments,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    import report

    (out / "results.md").write_text(report.markdown(result))
    report.plot(result, out / "study.png")
    print(report.markdown(result))
    print(f"{minutes:.1f} min; wrote {out}/results.json, results.md, study.png", flush=True)
    return result


if __name__ == "__main__":
    main()
