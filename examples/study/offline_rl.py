"""Offline RL on the study base: does DFT beat RFT when both train on the same verified self-samples?

    python examples/study/offline_rl.py            # the experiment (65 min on 2 shared CPU cores), results/offline_rl.json
    python examples/study/offline_rl.py --smoke    # < 1 min: pipeline check on 1 seed, numbers meaningless
    python examples/study/offline_rl.py --resume   # continue a cut-off run from the runs already in the file
    python examples/study/offline_rl.py --rounds 1 # without the second sampling round

The paper's offline setting (Wu et al. 2025, sec. 4.2): sample 4 responses per training prompt from the base at
temperature 1.0, keep those a verifier accepts, fine-tune on them. Here, with the reasoning experiment of
study.py (same base, the same 300 training prompts per seed, the same evaluation sets, steps and batches):

1. per seed, ``dft.sampling.sample(base, ..., num_samples=4, temperature=1.0, verifier="exact")`` on the
   seed's 300 training prompts (the gold solutions serve only as references for the final answer);
2. SFT on the accepted samples (= RFT), DFT, DFT + floor (min_weight 0.1) and ASFT (DFT + 0.1 KL to the base),
   each fine-tuning a copy of the base on exactly those samples; lr picked on the validation exact match from a
   grid extended until the best is interior (study.py's rule), every lr on every seed;
3. references: SFT and DFT on the gold demonstrations (the reasoning experiment), re-run here at the lr
   results.json picked for them;
4. round 2 (``rounds`` = 2): sample again, from the round-1 model with the best validation score (per seed,
   that loss at its best lr, re-trained), and fine-tune every loss from the base on that round's accepted set
   at its round-1 lr.

Reported: ID and OOD exact match, retention of the other skills, the accepted sets (size, pass@4, the share
whose every step is right: a final-answer verifier also accepts lucky wrong steps), the base's p on the accepted
tokens, and paired differences over seeds with 95% t-intervals (same seed = same prompts, samples and order).
Results are written after every run (``"complete": false`` until the end).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import lab
import study
import torch

import dft
import dft.sampling

HERE = Path(__file__).resolve().parent
LOSSES = {name: study.LOSSES[name] for name in ("sft", "dft", "dft_floor", "asft")}
GOLD = ("sft", "dft")
SELECT = "val_exact_match"
FULL = {
    **study.FULL,
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7],
    "num_samples": 4,
    "temperature": 1.0,
    "max_new_tokens": 48,
    "rounds": 2,
}
SMOKE = {
    **study.SMOKE,
    "num_samples": 2,
    "temperature": 1.0,
    "max_new_tokens": 40,
    "rounds": 2,
    "max_rounds": 0,
}
SHOW = [  # metric, column title
    ("id_exact_match", "ID"),
    ("ood_terms_exact_match", "OOD 4 terms"),
    ("ood_phrasing_exact_match", "OOD phrasing"),
    ("keep_mean_exact_match", "kept skills"),
]


# ---- data ------------------------------------------------------------------------------------------------


def sample_set(model, seed: int, cfg: dict, round_: int, base_path: str) -> tuple[list[dict], dict]:
    """The accepted samples of ``model`` on the seed's training prompts (as training rows) and their figures
    (the base at ``base_path``'s prior on them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    prompts = study.training_data("reasoning", seed, cfg)
    t0 = time.time()
    rows = dft.sampling.sample(
        model,
        tokenizer,
        prompts,
        num_samples=cfg["num_samples"],
        temperature=cfg["temperature"],
        max_new_tokens=cfg["max_new_tokens"],
        batch_size=100,
        seed=1000 * round_ + seed,
        verifier="exact",
    )
    seconds = time.time() - t0
    summary = dft.sampling.summarize(rows)
    # dft train appends EOS to a completion; the study's encoder does not, so the newline (= EOS) is added here
    data = [{"prompt": r["prompt"], "completion": r["completion"] + "\n"} for r in dft.sampling.accepted(rows)]
    gold = {e["prompt"]: e["completion"] for e in prompts}
    stats = {k: summary[k] for k in ("samples", "accepted", "acceptance_rate", "pass_at_k", "prompts_without_accepted")}
    stats["distinct_accepted"] = summary["distinct_accepted"]
    stats["every_step_right"] = sum(d["completion"] == gold[d["prompt"]] for d in data) / max(len(data), 1)
    stats["seconds"] = round(seconds, 1)
    if data:
        base = study.base_model(base_path)
        batches = [lab.batch(data[i : i + 64]) for i in range(0, len(data), 64)]
        prior = dft.inspect_prior(base, batches).as_dict()
        stats["base_mean_p"] = prior["mean_p"]
        stats["base_frac_p_below_0.01"] = prior["frac_below"]["0.01"]
    return data, stats


# ---- runs ------------------------------------------------------------------------------------------------


def train_model(data: list[dict], loss: str, lr: float, seed: int, cfg: dict, base_path: str):
    weighting, kl_coef = LOSSES[loss]
    model = lab.load_base(base_path)
    lab.train(
        model,
        data,
        steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        lr=lr,
        seed=seed,
        warmup=max(1, cfg["steps"] // 10),
        loss=weighting,
        ref_model=study.base_model(base_path) if kl_coef else None,
        kl_coef=kl_coef,
    )
    return model


def run_one(job: tuple) -> dict:
    """Fine-tune a copy of the base on one data set with one (loss, lr, seed) and score it (in a worker)."""
    data_name, loss, lr, seed, cfg, data, base_path = job
    torch.set_num_threads(1)
    t0 = time.time()
    model = train_model(data, loss, lr, seed, cfg, base_path)
    metrics = study.score(model, "reasoning", seed, cfg)
    return {
        "data": data_name,
        "loss": loss,
        "lr": lr,
        "seed": seed,
        "metrics": metrics,
        "seconds": round(time.time() - t0, 1),
    }


def _key(r: dict) -> tuple:
    return (r["data"], r["loss"], r["lr"], r["seed"])


class Runner:
    """Runs jobs in a pool, keeps every result, and rewrites the results file after each one."""

    def __init__(self, workers: int, save, runs: list[dict], t0: float) -> None:
        self.workers, self.save, self.runs, self.t0 = workers, save, runs, t0

    def run(self, jobs: list[tuple]) -> None:
        done = {_key(r) for r in self.runs}
        jobs = [j for j in jobs if (j[0], j[1], j[2], j[3]) not in done]
        if not jobs:
            return
        pool = mp.get_context("spawn").Pool(self.workers) if self.workers > 1 else None
        try:
            for i, r in enumerate(pool.imap_unordered(run_one, jobs) if pool else map(run_one, jobs), 1):
                self.runs.append(r)
                print(
                    f"[{time.time() - self.t0:6.0f}s] {i:3d}/{len(jobs)} {r['data']:10s} {r['loss']:9s} lr "
                    f"{r['lr']:<6g} seed {r['seed']}: val {r['metrics'][SELECT]:.3f} id "
                    f"{r['metrics']['id_exact_match']:.3f} ({r['seconds']:.0f}s)",
                    flush=True,
                )
                self.save()
        finally:
            if pool:
                pool.close()
                pool.join()


def of(runs: list[dict], data: str) -> list[dict]:
    """The runs on one data set, in study.py's record shape (``best_lr`` / ``extension`` read ``loss``)."""
    return [r for r in runs if r["data"] == data]


def grid_search(runner: Runner, data_name: str, sets: dict[int, list[dict]], cfg: dict, base_path: str) -> None:
    """study.py's protocol: every loss on the grid, extended while its best lr is at an edge."""
    seeds = list(sets)
    runner.run(
        [(data_name, loss, lr, s, cfg, sets[s], base_path) for loss in LOSSES for lr in cfg["grid"] for s in seeds]
    )
    for _ in range(cfg["max_rounds"]):
        more = []
        for loss in LOSSES:
            lr = study.extension(of(runner.runs, data_name), loss, SELECT)
            if lr is not None:
                print(f"{data_name}/{loss}: best lr at the grid's edge -> adding lr {lr:g}", flush=True)
                more += [(data_name, loss, lr, s, cfg, sets[s], base_path) for s in seeds]
        if not more:
            break
        runner.run(more)


# ---- statistics ------------------------------------------------------------------------------------------


def at_lr(runs: list[dict], loss: str, lr: float) -> list[dict]:
    return sorted((r for r in runs if r["loss"] == loss and r["lr"] == lr), key=lambda r: r["seed"])


def paired(a: list[dict], b: list[dict], metric: str) -> dict:
    """Paired differences a - b over the seeds both have."""
    bs = {r["seed"]: r for r in b}
    diffs = [r["metrics"][metric] - bs[r["seed"]]["metrics"][metric] for r in a if r["seed"] in bs]
    return study.interval(diffs) if diffs else {}


def summarise(runs: list[dict], chosen: dict[str, float], refs: dict[str, list[dict]]) -> dict:
    """Every loss at its chosen lr: each metric's interval, and paired differences against each reference."""
    out = {}
    for loss, lr in chosen.items():
        mine = at_lr(runs, loss, lr)
        if not mine:
            continue
        names = sorted(mine[0]["metrics"])
        out[loss] = {
            "lr": lr,
            "seeds": [r["seed"] for r in mine],
            "metrics": {m: study.interval([r["metrics"][m] for r in mine]) for m in names},
            "paired": {
                ref: {m: paired(mine, ref_runs, m) for m, _ in SHOW} for ref, ref_runs in refs.items() if ref_runs
            },
        }
    return out


def sweep(runs: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for loss in sorted({r["loss"] for r in runs}):
        lrs = sorted({r["lr"] for r in runs if r["loss"] == loss})
        out[loss] = {str(lr): statistics.mean(r["metrics"][SELECT] for r in at_lr(runs, loss, lr)) for lr in lrs}
    return out


def analyse(result: dict) -> dict:
    """The summaries of the runs in ``result`` (called after every run, so a partial file is readable)."""
    runs = result["runs"]
    gold, rft, rft2 = of(runs, "gold"), of(runs, "rft"), of(runs, "rft_round2")
    best = {loss: study.best_lr(rft, loss, SELECT) for loss in LOSSES if any(r["loss"] == loss for r in rft)}
    refs = {
        "rft_sft": at_lr(rft, "sft", best["sft"]) if "sft" in best else [],
        "gold_sft": at_lr(gold, "sft", result["gold_lr"]["sft"]),
        "gold_dft": at_lr(gold, "dft", result["gold_lr"]["dft"]),
    }
    experiments = {
        "gold": {"summary": summarise(gold, result["gold_lr"], refs)},
        "rft": {
            "lr_grid": {loss: sorted({r["lr"] for r in rft if r["loss"] == loss}) for loss in best},
            "best_lr": best,
            "lr_sweep": sweep(rft),
            "summary": summarise(rft, best, refs),
        },
    }
    if rft2:
        refs2 = {**refs, "round2_sft": at_lr(rft2, "sft", best["sft"])}
        experiments["rft_round2"] = {"summary": summarise(rft2, best, refs2)}
    return experiments


# ---- report ----------------------------------------------------------------------------------------------


def _ci(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "-"


def markdown(result: dict) -> str:
    """The headline table: every model's mean ± std over seeds, and the paired ID differences (95% t-interval)
    vs SFT on the same training rows (for the verified samples: RFT) and vs SFT on the gold demonstrations."""
    exps = result["experiments"]
    head = "| training data | loss | lr | training rows | " + " | ".join(t for _, t in SHOW)
    lines = [head + " | Δ ID vs SFT on the same rows | Δ ID vs gold SFT |", "|---" * (len(SHOW) + 6) + "|"]
    base = result["base"]
    lines.append("| none (base) | - | - | - | " + " | ".join(f"{base[m]:.3f}" for m, _ in SHOW) + " | | |")
    sizes = {"gold": result["config"]["n_demos"]}
    for data, key in (("rft", "accepted"), ("rft_round2", "accepted_round2")):
        sizes[data] = statistics.mean(a["accepted"] for a in result.get(key, {}).values()) if result.get(key) else 0
    titles = {"gold": "gold demonstrations", "rft": "base's verified samples", "rft_round2": "round 2 samples"}
    names = {"sft": "SFT", "dft": "DFT", "dft_floor": "DFT + floor", "asft": "ASFT"}
    for data, exp in exps.items():
        for loss, s in exp["summary"].items():
            name = names[loss] if data == "gold" or loss != "sft" else "SFT = RFT"
            cells = " | ".join(f"{s['metrics'][m]['mean']:.3f} ± {s['metrics'][m]['std']:.3f}" for m, _ in SHOW)
            same = {"gold": "gold_sft", "rft": "rft_sft", "rft_round2": "round2_sft"}[data]
            vs_same = "" if loss == "sft" else _ci(s["paired"].get(same, {}).get(SHOW[0][0], {}))
            vs_gold = (
                "" if data == "gold" and loss == "sft" else _ci(s["paired"].get("gold_sft", {}).get(SHOW[0][0], {}))
            )
            lines.append(
                f"| {titles[data]} | {name} | {s['lr']:g} | {sizes[data]:.0f} | {cells} | {vs_same} | {vs_gold} |"
            )
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny settings, < 1 minute")
    p.add_argument("--out", default=str(HERE / "results" / "offline_rl.json"))
    p.add_argument("--base", default=str(lab.BASE_DIR))
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default 2; 1 with --smoke)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out (same settings)")
    p.add_argument("--rounds", type=int, default=None, choices=(1, 2), help="sampling rounds (default 2)")
    args = p.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.rounds is not None:
        cfg["rounds"] = args.rounds
    workers = args.workers or (1 if args.smoke else 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python examples/study/offline_rl.py" + (" --smoke" if args.smoke else "")
    t0 = time.time()
    torch.set_num_threads(1)
    study_result = json.loads((HERE / "results" / "results.json").read_text())
    gold_lr = (
        {loss: study_result["experiments"]["reasoning"]["best_lr"][loss] for loss in GOLD}
        if not args.smoke
        else dict.fromkeys(GOLD, cfg["grid"][0])
    )
    result: dict = {
        "schema": "dft-offline-rl/1",
        "command": command,
        "complete": False,
        "seeds": cfg["seeds"],
        "config": cfg,
        "losses": {k: {"weighting": repr(w), "kl_coef": c} for k, (w, c) in LOSSES.items()},
        "gold_lr": gold_lr,
        "gold_lr_source": "results.json, reasoning experiment" if not args.smoke else "the smoke grid's first lr",
        "torch": torch.__version__,
        "runs": [],
    }
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        same = {k: v for k, v in json.loads(json.dumps(cfg)).items() if k != "rounds"}
        if {k: v for k, v in old.get("config", {}).items() if k != "rounds"} != same:
            raise SystemExit(f"--resume: {out} was made with other settings; remove it or drop --resume")
        result["runs"] = old["runs"]
        print(f"resuming with {len(result['runs'])} runs from {out}", flush=True)

    def save() -> None:
        result["minutes"] = round((time.time() - t0) / 60, 1)
        result["experiments"] = analyse(result) if any(r["data"] == "rft" for r in result["runs"]) else {}
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".offline_rl.")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, out)

    base = study.base_model(args.base)
    result["base"] = study.score(base, "reasoning", 0, cfg)
    print(f"[{time.time() - t0:6.0f}s] base: id {result['base']['id_exact_match']:.3f}", flush=True)
    sets, result["accepted"] = {}, {}
    for s in cfg["seeds"]:
        sets[s], result["accepted"][str(s)] = sample_set(base, s, cfg, round_=1, base_path=args.base)
        a = result["accepted"][str(s)]
        print(
            f"[{time.time() - t0:6.0f}s] seed {s}: {a['accepted']}/{a['samples']} accepted, pass@"
            f"{cfg['num_samples']} {a['pass_at_k'][str(cfg['num_samples'])]:.3f}, every step right "
            f"{a['every_step_right']:.3f} ({a['seconds']:.0f}s)",
            flush=True,
        )
    runner = Runner(workers, save, result["runs"], t0)
    gold_sets = {s: study.training_data("reasoning", s, cfg) for s in cfg["seeds"]}
    runner.run([("gold", loss, gold_lr[loss], s, cfg, gold_sets[s], args.base) for loss in GOLD for s in cfg["seeds"]])
    grid_search(runner, "rft", sets, cfg, args.base)
    if cfg["rounds"] >= 2:
        best = analyse(result)["rft"]["best_lr"]
        rft = of(result["runs"], "rft")
        leader = max(best, key=lambda loss: statistics.mean(r["metrics"][SELECT] for r in at_lr(rft, loss, best[loss])))
        result["round2_sampler"] = {"loss": leader, "lr": best[leader]}
        print(f"round 2: sampling from the round-1 {leader} models (lr {best[leader]:g})", flush=True)
        sets2, result["accepted_round2"] = {}, {}
        for s in cfg["seeds"]:
            sampler = train_model(sets[s], leader, best[leader], s, cfg, args.base)  # = its round-1 run
            sets2[s], result["accepted_round2"][str(s)] = sample_set(sampler, s, cfg, round_=2, base_path=args.base)
            print(f"  seed {s}: {result['accepted_round2'][str(s)]['accepted']} accepted", flush=True)
        runner.run(
            [("rft_round2", loss, best[loss], s, cfg, sets2[s], args.base) for loss in LOSSES for s in cfg["seeds"]]
        )
    result["complete"] = True
    save()
    print(markdown(result))
    print(f"{result['minutes']:.1f} min; wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
