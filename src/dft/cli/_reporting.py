"""Reporting of a run: metrics json/csv, the training plot, a console table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

__all__ = ["format_table", "plot_history", "plot_prior", "write_metrics"]


def write_metrics(out: Path, history: list[dict], final: dict[str, Any]) -> None:
    (out / "metrics.json").write_text(json.dumps({"final": final, "log_history": history}, indent=1))
    keys = sorted({k for row in history for k in row})
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def plot_history(out: Path, history: list[dict], title: str | None = None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    rows = [h for h in history if "loss" in h]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, key in zip(axes, ("loss", "ce", "mean_p", "token_accuracy")):
        ax.plot([h["step"] for h in rows if key in h], [h[key] for h in rows if key in h], marker=".")
        evals = [h for h in history if f"eval_{key}" in h]
        if evals:
            ax.plot([h["step"] for h in evals], [h[f"eval_{key}"] for h in evals], "o", label="eval")
            ax.legend()
        ax.set_title(key)
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_prior(path: Path, report: dict[str, Any], title: str | None = None) -> Path | None:
    """``dft inspect``'s figure: histogram of ``log10 p_t`` (special tokens marked) and, on a second axis,
    the share of SFT's update DFT keeps per bin (the mean ``p`` there)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    hist = report["histogram"]
    edges = hist["log10_p_edges"]
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    width = edges[1] - edges[0]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(centers, hist["counts"], width=width * 0.9, color="#8da0cb", label="supervised tokens")
    ax.bar(centers, hist["special_counts"], width=width * 0.9, color="#fc8d62", label="special tokens (EOS, ...)")
    ax.set_xlabel("log10 p(target) under the base model")
    ax.set_ylabel("tokens")
    ax.axvline(-2, color="grey", linestyle=":", linewidth=1)
    share = ax.twinx()
    points = [(c, k) for c, k in zip(centers, hist["dft_share_of_ce_update"]) if k is not None]
    share.plot([c for c, _ in points], [k for _, k in points], "k.-", label="DFT's share of the SFT update")
    share.set_ylim(0, 1)
    share.set_ylabel("DFT / SFT gradient (= mean p)")
    handles = ax.get_legend_handles_labels()[0] + share.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    ax.set_title(title or f"recommendation: {report['recommendation']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(metrics: dict[str, Any], notes: dict[str, str] | None = None) -> str:
    """The console table: one row per metric, ``notes`` said in parentheses after a metric's name."""
    labels = {k: f"{k} ({notes[k]})" if notes and k in notes else k for k in metrics}
    width = max(len(label) for label in labels.values())
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for k, v in metrics.items():
        label = labels[k]
        lines.append(f"{label:<{width}}  {v:.4f}" if isinstance(v, float) else f"{label:<{width}}  {v}")
    return "\n".join(lines)
