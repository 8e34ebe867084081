"""SFT vs DFT at CPU scale: where does DFT help, where does it not? (mirrors arXiv 2508.05629's setting)

    python examples/study/study.py --smoke          # < 2 min: pipeline check, numbers meaningless
    python examples/study/study.py                  # the study (~15-20 min on 2 CPU cores)

(a) Pretrain a tiny Llama with cross-entropy on a broad synthetic distribution (sums of 2-3 numbers of
    1-2 digits with worked solutions, plus direct answers) so that it has a prior, like a base model.
(b) Fine-tune copies of it on a small demonstration set with each loss: SFT (CE), DFT (alpha=1),
    DFT+floor (min_weight=0.1), mix (beta=0.5). Same steps, same batch; the learning rate is swept
    over LRS for every loss and picked on an in-distribution validation split.
(c) Evaluate exact match of the final answer (greedy) in distribution and on out-of-distribution
    splits: more terms, longer numbers, an unseen prompt phrasing; and on a low-entropy
    single-answer task (direct answers, fine-tuned separately). SEEDS seeds, mean +- std.

Outputs in --out (default study-output/): results.json, results.md (the table), study.png.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import time
from pathlib import Path

import torch

import dft
from dft.toy import BOS, PAD, arithmetic_examples, encode, toy_batch, toy_model

LOSSES = {
    "sft": {"alpha": 0.0},
    "dft": {"alpha": 1.0},
    "dft_floor": {"alpha": 1.0, "min_weight": 0.1},
    "mix": {"alpha": 1.0, "beta": 0.5},
}


def direct(examples):
    """Single-answer variant: the completion is the answer only (low entropy, one right output)."""
    return [{"prompt": e["prompt"], "completion": e["completion"].split("A: ")[-1]} for e in examples]


def rephrase(examples):
    """Unseen phrasing: 'Q:12+7=?' becomes '12+7=? Q:' ... kept within the character vocabulary."""
    return [{"prompt": e["prompt"].replace("Q: ", "").replace("=?\n", "=? Q:\n"), "completion": e["completion"]}
            for e in examples]


def splits(seed: int, n_eval: int) -> dict[str, list[dict]]:
    s = 1000 + seed
    return {
        "pretrain": arithmetic_examples(6000, seed=s, terms=(2, 3), digits=1)
        + arithmetic_examples(6000, seed=s + 1, terms=(2, 2), digits=2)
        + direct(arithmetic_examples(3000, seed=s + 2, terms=(2, 2), digits=2)),
        "demo": arithmetic_examples(300, seed=s + 3, terms=(3, 3), digits=2),
        "val": arithmetic_examples(n_eval, seed=s + 4, terms=(3, 3), digits=2),
        "id": arithmetic_examples(n_eval, seed=s + 5, terms=(3, 3), digits=2),
        "ood_terms": arithmetic_examples(n_eval, seed=s + 6, terms=(4, 4), digits=2),
        "ood_digits": arithmetic_examples(n_eval, seed=s + 7, terms=(3, 3), digits=3),
        "ood_phrasing": rephrase(arithmetic_examples(n_eval, seed=s + 8, terms=(3, 3), digits=2)),
        "single_demo": direct(arithmetic_examples(300, seed=s + 9, terms=(2, 2), digits=3)),
        "single_eval": direct(arithmetic_examples(n_eval, seed=s + 10, terms=(2, 2), digits=3)),
    }


def train(model, data, *, steps, batch, lr, loss_options, seed, warmup_ce=0, eval_fn=None, eval_every=0):
    """Plain loop with the fused DFT head; returns the accuracy curve [(step, acc)] if eval_fn."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    curve = []
    model.train()
    for step in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g).tolist()
        options = dict(loss_options)
        if step < warmup_ce:
            options = {"alpha": 0.0}
        dft.causal_lm_loss(model, toy_batch([data[i] for i in idx], max_length=96), **options).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if eval_fn is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            curve.append((step + 1, eval_fn(model)))
            model.train()
    return curve


@torch.no_grad()
def exact_match(model, examples, max_new_tokens=48) -> float:
    """Greedy, batched (left padding); compares the text after the last 'A: ' (or the whole answer)."""
    model.eval()
    prompts = [[BOS] + encode(e["prompt"]) for e in examples]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=PAD, eos_token_id=encode("\n")[0])
    hits = 0
    for e, row in zip(examples, out[:, width:].tolist()):
        text = dft.toy.decode(row).split("\n")[0]
        want = e["completion"].strip().split("A: ")[-1]
        hits += text.split("A: ")[-1].strip() == want
    return hits / len(examples)


def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny settings, < 2 minutes")
    p.add_argument("--out", default="study-output")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    args = p.parse_args()
    if args.smoke:
        cfg = {"seeds": [0], "pre_steps": 20, "ft_steps": 6, "batch": 8, "n_eval": 4, "lrs": [1e-3], "hidden": 32,
               "eval_every": 6, "max_new_tokens": 8}
    else:
        cfg = {"seeds": [0, 1, 2], "pre_steps": 2500, "ft_steps": 300, "batch": 32, "n_eval": 200,
               "lrs": [3e-4, 1e-3], "hidden": 96, "eval_every": 50, "max_new_tokens": 48}
    if args.seeds:
        cfg["seeds"] = args.seeds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    em = functools.partial(exact_match, max_new_tokens=cfg["max_new_tokens"])
    t0 = time.time()
    runs = []  # one row per (seed, task, loss, lr)
    for seed in cfg["seeds"]:
        data = splits(seed, cfg["n_eval"])
        base = toy_model(hidden_size=cfg["hidden"], num_layers=2, seed=seed)
        train(base, data["pretrain"], steps=cfg["pre_steps"], batch=64, lr=3e-3, loss_options={"alpha": 0.0},
              seed=seed)
        base_scores = {k: em(base, data[k]) for k in ("id", "ood_terms", "ood_digits", "ood_phrasing",
                                                               "single_eval")}
        runs.append({"seed": seed, "task": "base", "loss": "base", "lr": 0.0, "scores": base_scores, "curve": []})
        print(f"[{time.time() - t0:6.0f}s] seed {seed} base: {base_scores}", flush=True)
        for task, demo, evals in (
            ("reasoning", "demo", ("val", "id", "ood_terms", "ood_digits", "ood_phrasing")),
            ("single_answer", "single_demo", ("single_eval",)),
        ):
            for loss, options in LOSSES.items():
                for lr in cfg["lrs"]:
                    model = copy.deepcopy(base)
                    curve_set = data["id" if task == "reasoning" else evals[-1]][: max(4, cfg["n_eval"] // 4)]
                    curve = train(model, data[demo], steps=cfg["ft_steps"], batch=cfg["batch"], lr=lr,
                                  loss_options=options, seed=seed + 17,
                                  eval_fn=functools.partial(em, examples=curve_set), eval_every=cfg["eval_every"])
                    scores = {k: em(model, data[k]) for k in evals}
                    runs.append({"seed": seed, "task": task, "loss": loss, "lr": lr, "scores": scores, "curve": curve})
                    print(f"[{time.time() - t0:6.0f}s] seed {seed} {task:13s} {loss:9s} lr {lr:g}: {scores}",
                          flush=True)
    summary = summarise(runs, cfg)
    (out / "results.json").write_text(json.dumps({"config": cfg, "runs": runs, "summary": summary}, indent=1))
    table = markdown(summary, cfg, args)
    (out / "results.md").write_text(table)
    plot(runs, summary, out / "study.png")
    print("\n" + table)
    print(f"\n{time.time() - t0:.0f}s; wrote {out}/results.json, results.md, study.png")


def summarise(runs, cfg):
    """Per loss and task: pick the lr with the best mean validation score, then mean +- std over seeds."""
    summary = {}
    for task, pick_on in (("reasoning", "val"), ("single_answer", "single_eval")):
        for loss in LOSSES:
            by_lr = {lr: [r for r in runs if r["task"] == task and r["loss"] == loss and r["lr"] == lr]
                     for lr in cfg["lrs"]}
            best = max(by_lr, key=lambda lr: statistics.mean(r["scores"][pick_on] for r in by_lr[lr]))
            keys = by_lr[best][0]["scores"].keys()
            summary[f"{task}/{loss}"] = {
                "lr": best,
                "sweep": {str(lr): statistics.mean(r["scores"][pick_on] for r in rs) for lr, rs in by_lr.items()},
                **{k: mean_std([r["scores"][k] for r in by_lr[best]]) for k in keys},
            }
    base = [r for r in runs if r["task"] == "base"]
    summary["base"] = {k: mean_std([r["scores"][k] for r in base]) for k in base[0]["scores"]}
    return summary


def markdown(summary, cfg, args):
    cmd = "python examples/study/study.py" + (" --smoke" if args.smoke else "")
    cols = ["id", "ood_terms", "ood_digits", "ood_phrasing"]
    lines = [f"Exact match (mean ± std over seeds {cfg['seeds']}), `{cmd}`:", "",
             "| loss | best lr | ID | OOD more terms | OOD longer numbers | OOD phrasing | single-answer task |",
             "|---|---|---|---|---|---|---|"]

    def f(ms):
        return f"{ms[0]:.3f} ± {ms[1]:.3f}"

    b = summary["base"]
    lines.append(f"| base (no fine-tune) | - | {' | '.join(f(b[c]) for c in cols)} | {f(b['single_eval'])} |")
    for loss in LOSSES:
        r, s = summary[f"reasoning/{loss}"], summary[f"single_answer/{loss}"]
        lines.append(f"| {loss} | {r['lr']:g} / {s['lr']:g} | {' | '.join(f(r[c]) for c in cols)} | "
                     f"{f(s['single_eval'])} |")
    lines += ["", "Learning-rate sweep (mean validation exact match):", ""]
    for key, r in summary.items():
        if "sweep" in r:
            lines.append(f"- {key}: " + ", ".join(f"lr {lr}: {v:.3f}" for lr, v in r["sweep"].items()))
    return "\n".join(lines) + "\n"


def plot(runs, summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4))
    for loss in LOSSES:
        lr = summary[f"reasoning/{loss}"]["lr"]
        curves = [r["curve"] for r in runs if r["task"] == "reasoning" and r["loss"] == loss and r["lr"] == lr]
        steps = [s for s, _ in curves[0]]
        means = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        a1.plot(steps, means, marker=".", label=f"{loss} (lr {lr:g})")
    a1.set_xlabel("fine-tuning step")
    a1.set_ylabel("ID exact match (subset)")
    a1.set_title("accuracy vs step (mean over seeds)")
    a1.legend()
    cols = ["id", "ood_terms", "ood_digits", "ood_phrasing"]
    width = 0.8 / (len(LOSSES) + 1)
    for j, loss in enumerate(["base", *LOSSES]):
        r = summary["base"] if loss == "base" else summary[f"reasoning/{loss}"]
        a2.bar([i + j * width for i in range(len(cols))], [r[c][0] for c in cols], width,
               yerr=[r[c][1] for c in cols], label=loss)
    a2.set_xticks([i + 0.4 - width / 2 for i in range(len(cols))], ["ID", "more terms", "longer nums", "phrasing"])
    a2.set_ylabel("exact match")
    a2.set_title("in vs out of distribution")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
