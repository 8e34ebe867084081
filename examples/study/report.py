"""Turn a study results.json (schema dft-study/2) into results.md and study.png."""

from __future__ import annotations

from pathlib import Path

SHOW = {  # experiment -> (metric, column title); the first metric is the experiment's headline
    "reasoning": [
        ("id_exact_match", "ID"),
        ("ood_terms_exact_match", "OOD 4 terms"),
        ("ood_phrasing_exact_match", "OOD phrasing"),
        ("id_result_acc", "ID result-token acc (TF)"),
        ("id_result_logp", "ID result log p (TF)"),
    ],
    "noisy": [
        ("id_exact_match", "ID (clean)"),
        ("ood_terms_exact_match", "OOD 4 terms"),
        ("ood_phrasing_exact_match", "OOD phrasing"),
        ("id_result_acc", "ID result-token acc (TF)"),
        ("id_result_logp", "ID result log p (TF)"),
    ],
    "forgetting": [
        ("keep_mean_exact_match", "kept skills, mean"),
        ("keep_sub_exact_match", "subtraction"),
        ("keep_quick_exact_match", "direct answers"),
        ("keep_spell_exact_match", "spelling"),
        ("keep_code_exact_match", "code table"),
        ("id_exact_match", "target ID"),
    ],
    "knowledge": [
        ("recall_exact_match", "recall of new facts"),
        ("recall_result_acc", "answer-token acc (TF)"),
        ("recall_result_logp", "answer log p (TF)"),
        ("keep_code_exact_match", "old facts kept"),
        ("id_exact_match", "target ID (arithmetic)"),
    ],
}
COLOURS = {
    "base": "#444444",
    "sft": "#1f77b4",
    "dft": "#d62728",
    "dft_floor": "#ff7f0e",
    "mix": "#9467bd",
    "asft": "#2ca02c",
    "eaft": "#8c564b",
}


def _row(summary: list[dict], loss: str, metric: str) -> dict | None:
    return next((s for s in summary if s["loss"] == loss and s["metric"] == metric), None)


def _fmt(x: float, signed: bool = False) -> str:
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    lines = [
        f"# Study results (`{result['command']}`, {result['minutes']} min)",
        "",
        f"Mean ± std over seeds {seeds}; [95% t-interval]. Each loss at its own best learning rate "
        "(picked on the validation metric named per experiment). TF = teacher-forced (gold prefix). "
        "Δ = paired difference vs SFT, same seed (same data, same order).",
        "",
    ]
    for name, exp in result["experiments"].items():
        show = [(m, t) for m, t in SHOW[name] if _row(exp["summary"], "sft", m)]
        head = show[0][0]
        lines += [
            f"## {name}",
            "",
            f"Learning rate picked on `{exp['select_on']}`.",
            "",
            "| loss | best lr | " + " | ".join(t for _, t in show) + f" | Δ {show[0][1]} vs SFT |",
            "|---|---|" + "---|" * (len(show) + 1),
        ]
        lines.append(
            "| base | - | " + " | ".join(_fmt(exp["base"][m]) if m in exp["base"] else "-" for m, _ in show) + " | |"
        )
        for loss, lr in exp["best_lr"].items():
            cells = []
            for m, _ in show:
                r = _row(exp["summary"], loss, m)
                cells.append(f"{_fmt(r['mean'])} ± {r['std']:.3f}")
            d = _row(exp["paired_vs_sft"], loss, head)
            delta = (
                "" if d is None else f"{_fmt(d['mean'], True)} [{_fmt(d['ci95'][0], True)}, {_fmt(d['ci95'][1], True)}]"
            )
            lines.append(f"| {loss} | {lr:g} | " + " | ".join(cells) + f" | {delta} |")
        lines += [
            "",
            "Intervals of the headline metric: "
            + "; ".join(
                f"{loss} [{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}]"
                for loss in exp["best_lr"]
                if (r := _row(exp["summary"], loss, head))
            ),
            "",
        ]
        lines += ["Learning-rate sweep (mean validation metric per lr):", ""]
        for loss, sweep in exp["lr_sweep"].items():
            lines.append(f"- {loss}: " + ", ".join(f"{float(lr):g}: {v:.3f}" for lr, v in sweep.items()))
        lines.append("")
    return "\n".join(lines)


HEADLINE = {  # experiment -> the row title of the docs' headline table (its metric: SHOW's first)
    "reasoning": "reasoning: 300 worked solutions (ID exact match)",
    "noisy": "noisy: 20% of them with a wrong digit (ID, clean problems)",
    "forgetting": "forgetting: 4 pretraining skills not in the data (mean)",
    "knowledge": "knowledge: 100 new key→value facts, no prior (recall)",
}
HEADLINE_LOSSES = [("dft", "DFT"), ("dft_floor", "DFT+floor"), ("mix", "mix"), ("asft", "ASFT"), ("eaft", "EAFT")]


def _interval(d: dict) -> str:
    text = f"{_fmt(d['mean'], True)} [{_fmt(d['ci95'][0], True)}, {_fmt(d['ci95'][1], True)}]"
    excludes_zero = d["ci95"][0] > 0 or d["ci95"][1] < 0
    return f"**{text}**" if excludes_zero else text


def headline(result: dict) -> str:
    """The docs' headline table: per experiment, base and SFT, then each loss's paired Δ vs SFT [95% CI]."""
    head = "| experiment (headline metric) | base | SFT | " + " | ".join(f"{t} Δ" for _, t in HEADLINE_LOSSES) + " |"
    lines = [head, "|" + "---|" * (3 + len(HEADLINE_LOSSES))]
    for name, title in HEADLINE.items():
        exp = result["experiments"][name]
        metric = SHOW[name][0][0]
        sft = _row(exp["summary"], "sft", metric)
        cells = [title, _fmt(exp["base"][metric]), _fmt(sft["mean"])]
        cells += [_interval(_row(exp["paired_vs_sft"], loss, metric)) for loss, _ in HEADLINE_LOSSES]
        lines.append("| " + " | ".join(c.replace("-", "−") if c[:1] in "-*" or "[" in c else c for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _lr(x: float) -> str:
    return f"{x:g}"


def lr_table(result: dict, offline: dict) -> str:
    """Where each loss peaked, per data shape: the study's and the offline-RL experiment's best learning rates
    (picked on validation from the same grid) and what DFT and SFT score at the grid's largest lr."""
    rows = [(HEADLINE[n].split(":")[0], result["experiments"][n]) for n in ("reasoning", "noisy", "knowledge")]
    rows.append(("offline RL: verified self-samples", offline["experiments"]["rft"]))
    lines = [
        "| data | SFT's best lr | DFT's best lr | DFT ÷ SFT | DFT + floor | mix | at lr 3e-3: SFT / DFT |",
        "|---|---|---|---|---|---|---|",
    ]
    for title, exp in rows:
        best, sweep = exp["best_lr"], exp["lr_sweep"]
        mix = _lr(best["mix"]) if "mix" in best else "–"
        high = f"{_fmt(sweep['sft']['0.003'])} / {_fmt(sweep['dft']['0.003'])}"
        ratio = f"{best['dft'] / best['sft']:.2g}"
        lines.append(
            f"| {title} | {_lr(best['sft'])} | {_lr(best['dft'])} | {ratio} | {_lr(best['dft_floor'])} | {mix} | {high} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> None:
    """One panel per experiment, one colour per loss in every panel, error bars = 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = result["experiments"]
    cols = 2
    rows = (len(exps) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax, (name, exp) in zip(axes.flat, exps.items()):
        show = [(m, t) for m, t in SHOW[name] if "log p" not in t and _row(exp["summary"], "sft", m)][:5]
        losses = list(exp["best_lr"])
        width = 0.8 / (len(losses) + 1)
        for j, loss in enumerate(["base", *losses]):
            xs = [i + j * width for i in range(len(show))]
            if loss == "base":
                ys = [exp["base"].get(m, 0.0) for m, _ in show]
                ax.bar(xs, ys, width, color=COLOURS[loss], label="base")
                continue
            rows = [_row(exp["summary"], loss, m) for m, _ in show]
            ys = [r["mean"] for r in rows]
            err = [[r["mean"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["mean"] for r in rows]]
            ax.bar(xs, ys, width, yerr=err, capsize=2, color=COLOURS.get(loss), label=loss)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(show))], [t for _, t in show], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(name)
        ax.set_ylabel("exact match / accuracy")
    axes[0][0].legend(fontsize=8, ncol=4, loc="upper right")
    fig.suptitle(
        f"SFT vs DFT variants from a pretrained base ({len(result['seeds'])} seeds, 95% intervals; "
        f"{result['command']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
