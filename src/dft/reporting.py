"""Reporting of a run: metrics json/csv, the training plot, a console table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

__all__ = ["format_table", "plot_history", "write_metrics"]


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


def format_table(metrics: dict[str, Any]) -> str:
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for k, v in metrics.items():
        lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)
