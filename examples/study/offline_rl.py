"""Offline RL on the study base: RFT, DFT, NFT and DPO on the same verified self-samples.

    python examples/study/offline_rl.py            # the experiment (~100 min on 2 shared CPU cores), results/offline_rl.json
    python examples/study/offline_rl.py --smoke    # < 2 min: pipeline check on 1 seed, numbers meaningless
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
3. the rejected samples too, on the same samples of each seed: NFT (``dft.NFTWeight()``, pi_old = the base that
   sampled, at its sampling temperature 1.0) and NFT with DFT-weighted positives (``NFTWeight(dft_positive=True)``)
   on every sample of the prompts with both verdicts (the official runs drop one-verdict prompts), each prompt's
   acceptance rate as ``nft_rhat``, lr from the same grid protocol on every seed; DPO (TRL's ``DPOTrainer``,
   reference = the base) on the seed's ``dft.sampling.pairs`` (the pairs.jsonl ``dft sample`` writes), the same
   steps, batch size (in pairs), AdamW and schedule, (lr, beta) picked on the validation exact match of the seeds
   ``dpo_select_seeds`` (each beta's lr grid extended until its best is interior), then run on every seed;
4. references: SFT and DFT on the gold demonstrations (the reasoning experiment), re-run here at the lr
   results.json picked for them;
5. round 2 (``rounds`` = 2): sample again, from the round-1 model of step 2's losses with the best validation score
   (per seed, that loss at its best lr, re-trained), and fine-tune each of step 2's losses from the base on that
   round's accepted set at its round-1 lr.

Reported: ID and OOD exact match, retention of the other skills, the accepted sets (size, pass@4, the share
whose every step is right: a final-answer verifier also accepts lucky wrong steps), the base's p on the accepted
tokens, and paired differences over seeds with 95% t-intervals (same seed = same prompts, samples and order).
Results are written after every run (``"complete": false`` until the end); ``--resume`` keeps the runs in the file
and runs only the missing ones (a run's key: data, loss, lr, seed and, for DPO, beta).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import lab
import study
import tasks
import torch

import dft
import dft.sampling

HERE = Path(__file__).resolve().parent
LOSSES = {name: study.LOSSES[name] for name in ("sft", "dft", "dft_floor", "asft")}
NFT = {"nft": dft.NFTWeight(), "nft_dft": dft.NFTWeight(dft_positive=True)}  # the official options
DPO = "dpo"
GOLD = ("sft", "dft")
NEW_SETTINGS = ("dpo_betas", "dpo_select_seeds")  # settings of the NFT / DPO runs only
SELECT = "val_exact_match"
FULL = {
    **study.FULL,
    "seeds": [0, 1, 2, 3, 4, 5, 6, 7],
    "num_samples": 4,
    "temperature": 1.0,
    "max_new_tokens": 48,
    "rounds": 2,
    "dpo_betas": [0.05, 0.1, 0.3],
    "dpo_select_seeds": [0, 1, 2],
}
SMOKE = {
    **study.SMOKE,
    "num_samples": 2,
    "temperature": 1.0,
    "max_new_tokens": 40,
    "rounds": 2,
    "max_rounds": 0,
    "dpo_betas": [0.1],
    "dpo_select_seeds": [0],
}
SHOW = [  # metric, column title
    ("id_exact_match", "ID"),
    ("ood_terms_exact_match", "OOD 4 terms"),
    ("ood_phrasing_exact_match", "OOD phrasing"),
    ("keep_mean_exact_match", "kept skills"),
]


# ---- data ------------------------------------------------------------------------------------------------


def sample_set(model, seed: int, cfg: dict, round_: int, base_path: str) -> tuple[dict[str, list[dict]], dict]:
    """The training rows ``model``'s samples on the seed's training prompts give each loss, and their figures (the
    base at ``base_path``'s prior on the accepted ones): ``"rft"`` the accepted samples (text rows), ``"nft"`` every
    sample of the prompts with both verdicts (token-id rows with ``accepted`` and ``nft_rhat``), ``"dpo"`` the
    preference pairs (``dft.sampling.pairs``)."""
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
    nft, pairs = nft_rows(rows), dft.sampling.pairs(rows)
    stats["unfinished"] = sum(not r["finished"] for r in rows)
    stats["nft_rows"] = len(nft)
    stats["nft_accepted_rows"] = sum(r["accepted"] for r in nft)
    stats["nft_prompts"] = len({r["prompt_index"] for r in nft})
    stats["pairs"] = pairs[1]
    return {"rft": data, "nft": nft, "dpo": pairs[0]}, stats


def nft_rows(rows: list[dict]) -> list[dict]:
    """NFT's training rows: every sample (its token ids as sampled) of the prompts whose samples got both verdicts,
    with ``nft_rhat`` = the share of that prompt's samples accepted. An accepted sample's ids are checked to be the
    ids the study's encoder gives its text (what RFT trains on): the same tokens for both."""
    by_prompt: dict[int, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_index"], []).append(r)
    out = []
    for index, group in by_prompt.items():
        accepted = sum(bool(r["accepted"]) for r in group)
        if accepted in (0, len(group)):  # one verdict: no signal for NFT (dropped, as the official runs do)
            continue
        for r in sorted(group, key=lambda r: r["sample_index"]):
            if r["accepted"] and (
                r["prompt_ids"] != [tasks.BOS, *tasks.encode(r["prompt"])]
                or r["completion_ids"] != tasks.encode(r["completion"] + "\n")
            ):
                raise SystemExit(f"prompt {index}: the sampled ids are not the encoded text RFT trains on")
            out.append(
                {
                    "prompt_index": index,
                    "prompt_ids": r["prompt_ids"],
                    "completion_ids": r["completion_ids"],
                    "accepted": bool(r["accepted"]),
                    "nft_rhat": accepted / len(group),
                }
            )
    return out


# ---- runs ------------------------------------------------------------------------------------------------


def train_model(data: list[dict], loss: str, lr: float, seed: int, cfg: dict, base_path: str, beta=None):
    if loss == DPO:
        return train_dpo(data, lr, beta, seed, cfg, base_path)
    weighting, kl_coef = LOSSES[loss] if loss in LOSSES else (None, 0.0)
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
        ref_model=study.base_model(base_path) if kl_coef or loss in NFT else None,  # NFT: pi_old = the sampler
        kl_coef=kl_coef,
        nft=NFT.get(loss),
    )
    return model


def dpo_unavailable() -> str | None:
    """Why TRL's DPOTrainer cannot run here (None when it can)."""
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed"
    try:
        import trl
        from trl import DPOConfig, DPOTrainer  # noqa: F401
    except ImportError as e:
        return f"the installed trl has no DPOTrainer ({e})"
    fields = getattr(DPOConfig, "__dataclass_fields__", {})
    missing = [f for f in ("beta", "use_cpu", "max_steps") if f not in fields]
    if missing:
        return f"the installed trl {trl.__version__}'s DPOConfig lacks {missing}"
    return None


def train_dpo(pairs: list[dict], lr: float, beta: float, seed: int, cfg: dict, base_path: str):
    """TRL's DPOTrainer on the pairs: a fresh copy of the base against the base as reference, ``cfg``'s steps and
    batch size (pairs per step), lab.train's AdamW, schedule and grad-norm clip, sigmoid loss at ``beta``."""
    import datasets
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()

    model = lab.load_base(base_path)
    optimizers = lab.optimizer(model, lr=lr, steps=cfg["steps"], warmup=max(1, cfg["steps"] // 10))
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp,
            max_steps=cfg["steps"],
            per_device_train_batch_size=cfg["batch_size"],
            learning_rate=lr,
            beta=beta,
            max_grad_norm=1.0,
            seed=seed,
            use_cpu=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            gradient_checkpointing=False,  # TRL's default is on; the other losses' runs do not checkpoint
            dataloader_num_workers=0,
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=lab.load_base(base_path),
            args=args,
            train_dataset=datasets.Dataset.from_list(pairs),
            processing_class=AutoTokenizer.from_pretrained(base_path),
            optimizers=optimizers,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    model.eval()
    return model


def run_one(job: tuple) -> dict:
    """Fine-tune a copy of the base on one data set with one (loss, lr, seed[, beta]) and score it (in a worker)."""
    data_name, loss, lr, seed, cfg, data, base_path, beta = job
    torch.set_num_threads(1)
    t0 = time.time()
    model = train_model(data, loss, lr, seed, cfg, base_path, beta)
    metrics = study.score(model, "reasoning", seed, cfg)
    return {
        "data": data_name,
        "loss": loss,
        "lr": lr,
        **({"beta": beta} if beta is not None else {}),
        "seed": seed,
        "metrics": metrics,
        "seconds": round(time.time() - t0, 1),
    }


def _key(r: dict) -> tuple:
    return (r["data"], r["loss"], r["lr"], r["seed"], r.get("beta"))


class Runner:
    """Runs jobs in a pool, keeps every result, and rewrites the results file after each one."""

    def __init__(self, workers: int, save, runs: list[dict], t0: float) -> None:
        self.workers, self.save, self.runs, self.t0 = workers, save, runs, t0

    def done(self, data_name: str, loss: str, lr: float, seed: int, beta=None) -> bool:
        return (data_name, loss, lr, seed, beta) in {_key(r) for r in self.runs}

    def run(self, jobs: list[tuple]) -> None:
        done = {_key(r) for r in self.runs}
        jobs = [j for j in jobs if (*j[:4], j[7]) not in done]
        if not jobs:
            return
        pool = mp.get_context("spawn").Pool(self.workers) if self.workers > 1 else None
        try:
            for i, r in enumerate(pool.imap_unordered(run_one, jobs) if pool else map(run_one, jobs), 1):
                self.runs.append(r)
                beta = f" beta {r['beta']:g}" if "beta" in r else ""
                print(
                    f"[{time.time() - self.t0:6.0f}s] {i:3d}/{len(jobs)} {r['data']:10s} {r['loss']:9s} lr "
                    f"{r['lr']:<6g}{beta} seed {r['seed']}: val {r['metrics'][SELECT]:.3f} id "
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


def grid_search(runner: Runner, data_name: str, sets: dict[int, dict], cfg: dict, base_path: str, losses) -> None:
    """study.py's protocol: every loss on the grid, extended while its best lr is at an edge (every seed)."""
    seeds = list(sets)
    runner.run(
        [job(data_name, loss, lr, s, cfg, sets[s], base_path) for loss in losses for lr in cfg["grid"] for s in seeds]
    )
    for _ in range(cfg["max_rounds"]):
        more = []
        for loss in losses:
            lr = study.extension(of(runner.runs, data_name), loss, SELECT)
            if lr is not None:
                print(f"{data_name}/{loss}: best lr at the grid's edge -> adding lr {lr:g}", flush=True)
                more += [job(data_name, loss, lr, s, cfg, sets[s], base_path) for s in seeds]
        if not more:
            break
        runner.run(more)


def job(data_name: str, loss: str, lr: float, seed: int, cfg: dict, sets: dict, base_path: str, beta=None) -> tuple:
    """One run: ``sets`` is the seed's training rows per loss family (``sample_set``) or one list for every loss."""
    family = "dpo" if loss == DPO else "nft" if loss in NFT else "rft"
    data = sets[family] if isinstance(sets, dict) else sets
    return (data_name, loss, lr, seed, cfg, data, base_path, beta)


def dpo_search(runner: Runner, sets: dict[int, dict], cfg: dict, base_path: str) -> None:
    """DPO: every (lr, beta) of the grid on the seeds ``dpo_select_seeds``, each beta's lr grid extended while its
    best lr is at an edge (study.py's protocol per beta); then the best (lr, beta) on every seed."""
    pick = cfg["dpo_select_seeds"]
    runner.run(
        [
            job("rft", DPO, lr, s, cfg, sets[s], base_path, b)
            for b in cfg["dpo_betas"]
            for lr in cfg["grid"]
            for s in pick
        ]
    )
    for _ in range(cfg["max_rounds"]):
        more = []
        for beta in cfg["dpo_betas"]:
            runs = [r for r in of(runner.runs, "rft") if r["loss"] == DPO and r["beta"] == beta and r["seed"] in pick]
            lr = study.extension(runs, DPO, SELECT)
            if lr is not None:
                print(f"rft/dpo beta {beta:g}: best lr at the grid's edge -> adding lr {lr:g}", flush=True)
                more += [job("rft", DPO, lr, s, cfg, sets[s], base_path, beta) for s in pick]
        if not more:
            break
        runner.run(more)
    lr, beta = dpo_choice(of(runner.runs, "rft"), pick)
    print(f"rft/dpo: lr {lr:g}, beta {beta:g} (picked on seeds {pick}) -> every seed", flush=True)
    runner.run([job("rft", DPO, lr, s, cfg, sets[s], base_path, beta) for s in sets])


# ---- statistics ------------------------------------------------------------------------------------------


def at_lr(runs: list[dict], loss: str, lr: float, beta=None) -> list[dict]:
    return sorted(
        (r for r in runs if r["loss"] == loss and r["lr"] == lr and r.get("beta") == beta), key=lambda r: r["seed"]
    )


def paired(a: list[dict], b: list[dict], metric: str) -> dict:
    """Paired differences a - b over the seeds both have."""
    bs = {r["seed"]: r for r in b}
    diffs = [r["metrics"][metric] - bs[r["seed"]]["metrics"][metric] for r in a if r["seed"] in bs]
    return study.interval(diffs) if diffs else {}


def summarise(runs: list[dict], chosen: dict[str, float], refs: dict[str, list[dict]], betas=None) -> dict:
    """Every loss at its chosen lr (and beta): each metric's interval, and paired differences against each
    reference."""
    out = {}
    for loss, lr in chosen.items():
        beta = (betas or {}).get(loss)
        mine = at_lr(runs, loss, lr, beta)
        if not mine:
            continue
        names = sorted(mine[0]["metrics"])
        out[loss] = {
            "lr": lr,
            **({"beta": beta} if beta is not None else {}),
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


def dpo_means(runs: list[dict], seeds: list[int]) -> dict[tuple[float, float], tuple[float, float]]:
    """(lr, beta) -> (mean validation exact match, mean validation result log p) over ``seeds``, for the (lr, beta)
    run on all of them."""
    by: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["loss"] == DPO and r["seed"] in seeds:
            by.setdefault((r["lr"], r["beta"]), []).append(r["metrics"])
    tie = SELECT.replace("exact_match", "result_logp")
    return {
        key: (statistics.mean(m[SELECT] for m in ms), statistics.mean(m[tie] for m in ms))
        for key, ms in by.items()
        if len(ms) == len(seeds)
    }


def dpo_choice(runs: list[dict], seeds: list[int]) -> tuple[float, float]:
    """DPO's (lr, beta): study.best_lr's rule (validation exact match, ties to the higher result log p) over
    ``seeds``."""
    means = dpo_means(runs, seeds)
    return max(means, key=lambda key: (round(means[key][0], 9), means[key][1]))


def analyse(result: dict) -> dict:
    """The summaries of the runs in ``result`` (called after every run, so a partial file is readable)."""
    runs = result["runs"]
    gold, rft, rft2 = of(runs, "gold"), of(runs, "rft"), of(runs, "rft_round2")
    dpo_runs, rft = [r for r in rft if r["loss"] == DPO], [r for r in rft if r["loss"] != DPO]
    best = {loss: study.best_lr(rft, loss, SELECT) for loss in (*LOSSES, *NFT) if any(r["loss"] == loss for r in rft)}
    refs = {
        "rft_sft": at_lr(rft, "sft", best["sft"]) if "sft" in best else [],
        "gold_sft": at_lr(gold, "sft", result["gold_lr"]["sft"]),
        "gold_dft": at_lr(gold, "dft", result["gold_lr"]["dft"]),
    }
    round1 = {
        "lr_grid": {loss: sorted({r["lr"] for r in rft if r["loss"] == loss}) for loss in best},
        "best_lr": dict(best),
        "lr_sweep": sweep(rft),
    }
    betas = {}
    pick = result["config"].get("dpo_select_seeds", [])
    if dpo_means(dpo_runs, pick):
        lr, beta = dpo_choice(dpo_runs, pick)
        betas[DPO] = beta
        round1["lr_grid"][DPO] = sorted({r["lr"] for r in dpo_runs if r["beta"] == beta})
        round1["best_lr"][DPO] = lr
        round1["dpo_beta"] = beta
        round1["dpo_select_seeds"] = pick
        means = dpo_means(dpo_runs, pick)
        round1["dpo_sweep"] = {
            str(b): {str(x): means[(x, b)][0] for x in sorted(x for x, y in means if y == b)}
            for b in sorted({b for _, b in means})
        }
    round1["summary"] = summarise(rft + dpo_runs, round1["best_lr"], refs, betas)
    experiments = {"gold": {"summary": summarise(gold, result["gold_lr"], refs)}, "rft": round1}
    if rft2:
        refs2 = {**refs, "round2_sft": at_lr(rft2, "sft", best["sft"])}
        experiments["rft_round2"] = {"summary": summarise(rft2, {k: best[k] for k in LOSSES if k in best}, refs2)}
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
            if loss not in names:  # NFT and DPO: five_way()
                continue
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


FIVE = [  # loss, row title, what it trains on (its training-row count per seed: a key of "accepted")
    ("sft", "RFT (SFT on the accepted samples)", "accepted samples", "accepted"),
    ("dft", "DFT", "accepted samples", "accepted"),
    ("nft", "NFT", "samples of prompts with both verdicts", "nft_rows"),
    ("nft_dft", "NFT, DFT-weighted positives", "samples of prompts with both verdicts", "nft_rows"),
    ("dpo", "DPO (TRL)", "accepted/rejected pairs", "pairs"),
]


def five_way(result: dict) -> str:
    """The round-1 comparison on each seed's base samples: RFT, DFT, NFT, NFT with DFT-weighted positives and DPO,
    each at its chosen lr (DPO: and beta), mean ± std over seeds of ID exact match and the paired differences vs
    RFT (95% t-interval) of ID, the two OOD sets and the kept skills."""
    exp = result["experiments"]["rft"]
    lines = [
        "| loss | trains on (rows per seed, mean) | lr | β | seeds | ID | "
        + " | ".join(f"Δ {t} vs RFT" for _, t in SHOW)
        + " |",
        "|---" * (6 + len(SHOW)) + "|",
    ]
    accepted = result.get("accepted", {}).values()
    for loss, title, what, key in FIVE:
        s = exp["summary"].get(loss)
        if s is None:
            continue
        counts = [a[key]["pairs"] if key == "pairs" else a[key] for a in accepted]
        rows = f"{statistics.mean(counts):.0f} {what}" if counts else what
        beta = f"{s['beta']:g}" if "beta" in s else "-"
        idem = s["metrics"][SHOW[0][0]]
        deltas = " | ".join("" if loss == "sft" else _ci(s["paired"]["rft_sft"][m]) for m, _ in SHOW)
        lines.append(
            f"| {title} | {rows} | {s['lr']:g} | {beta} | {len(s['seeds'])} | {idem['mean']:.3f} ± {idem['std']:.3f} "
            f"| {deltas} |"
        )
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny settings, < 2 minutes")
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
    no_dpo = dpo_unavailable()
    if no_dpo:
        print(f"DPO skipped: {no_dpo}", flush=True)
    result: dict = {
        "schema": "dft-offline-rl/1",
        "command": command,
        "complete": False,
        "seeds": cfg["seeds"],
        "config": cfg,
        "losses": {
            **{k: {"weighting": repr(w), "kl_coef": c} for k, (w, c) in LOSSES.items()},
            **{k: {"nft": repr(w), "pi_old": "the base (the sampler), temperature 1.0"} for k, w in NFT.items()},
            **({} if no_dpo else {DPO: {"trainer": "trl.DPOTrainer", "loss_type": "sigmoid", "ref_model": "the base"}}),
        },
        "gold_lr": gold_lr,
        "gold_lr_source": "results.json, reasoning experiment" if not args.smoke else "the smoke grid's first lr",
        "torch": torch.__version__,
        "trl": None if no_dpo else __import__("trl").__version__,
        "runs": [],
    }
    old: dict = {}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        mine = json.loads(json.dumps(cfg))
        theirs = {k: v for k, v in old.get("config", {}).items() if k != "rounds"}
        if (
            set(theirs) - set(mine)
            or any(theirs[k] != mine[k] for k in theirs)
            or set(mine)
            - set(theirs)
            - {
                "rounds",
                *NEW_SETTINGS,
            }
        ):
            raise SystemExit(f"--resume: {out} was made with other settings; remove it or drop --resume")
        result["runs"] = old["runs"]
        print(f"resuming with {len(result['runs'])} runs from {out}", flush=True)
    minutes_before = old.get("minutes", 0.0)

    def save() -> None:
        result["minutes"] = round(minutes_before + (time.time() - t0) / 60, 1)
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
            f"{a['every_step_right']:.3f}; NFT rows {a['nft_rows']} ({a['nft_prompts']} prompts), DPO pairs "
            f"{a['pairs']['pairs']} ({a['seconds']:.0f}s)",
            flush=True,
        )
        before = old.get("accepted", {}).get(str(s), {})
        if any(a.get(k) != v for k, v in before.items() if k != "seconds"):  # the runs in the file used other samples
            raise SystemExit(f"--resume: seed {s}'s samples differ from those {out}'s runs were trained on")
    runner = Runner(workers, save, result["runs"], t0)
    gold_sets = {s: study.training_data("reasoning", s, cfg) for s in cfg["seeds"]}
    runner.run(
        [job("gold", loss, gold_lr[loss], s, cfg, gold_sets[s], args.base) for loss in GOLD for s in cfg["seeds"]]
    )
    grid_search(runner, "rft", sets, cfg, args.base, LOSSES)
    grid_search(runner, "rft", sets, cfg, args.base, NFT)
    if not no_dpo:
        dpo_search(runner, sets, cfg, args.base)
    if cfg["rounds"] >= 2:
        best = {k: v for k, v in analyse(result)["rft"]["best_lr"].items() if k in LOSSES}
        rft = of(result["runs"], "rft")
        leader = max(best, key=lambda loss: statistics.mean(r["metrics"][SELECT] for r in at_lr(rft, loss, best[loss])))
        result["round2_sampler"] = {"loss": leader, "lr": best[leader]}
        todo = [
            (loss, s) for loss in LOSSES for s in cfg["seeds"] if not runner.done("rft_round2", loss, best[loss], s)
        ]
        if not todo and old.get("accepted_round2") and old.get("round2_sampler") == result["round2_sampler"]:
            result["accepted_round2"] = old["accepted_round2"]  # every round-2 run is in the file
            print("round 2: every run is in the file (its samples' figures kept)", flush=True)
        else:
            print(f"round 2: sampling from the round-1 {leader} models (lr {best[leader]:g})", flush=True)
            sets2, result["accepted_round2"] = {}, {}
            for s in cfg["seeds"]:
                sampler = train_model(sets[s]["rft"], leader, best[leader], s, cfg, args.base)  # = its round-1 run
                sets2[s], result["accepted_round2"][str(s)] = sample_set(sampler, s, cfg, round_=2, base_path=args.base)
                print(f"  seed {s}: {result['accepted_round2'][str(s)]['accepted']} accepted", flush=True)
            runner.run(
                [
                    job("rft_round2", loss, best[loss], s, cfg, sets2[s], args.base)
                    for loss in LOSSES
                    for s in cfg["seeds"]
                ]
            )
    result["complete"] = True
    save()
    print(markdown(result))
    print(five_way(result))
    print(f"{result['minutes']:.1f} min; wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
