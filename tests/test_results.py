"""The committed study results follow from their own per-run data, and the docs quote them.

Every summary, paired difference, interval, chosen learning rate and sweep in ``results.json``,
``offline_rl.json`` and the shapes JSONs is recomputed from the runs the file holds, with the study's own
``summarise`` / ``analyse``; ``results.md`` is re-rendered; the docs' tables are rendered from the JSON and
every figure the docs' prose quotes from these results is found in them. Changing one per-run value fails.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "examples" / "study"
RESULTS = STUDY / "results"
sys.path.insert(0, str(STUDY))

import offline_rl  # noqa: E402
import report  # noqa: E402
import shapes  # noqa: E402
import study  # noqa: E402


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _same(a, b, path: str = "") -> None:
    """Equal structures, floats to 1e-9 (the files hold what json wrote of the same floats)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def check_study(result: dict) -> None:
    for name, exp in result["experiments"].items():
        source = result["experiments"]["reasoning" if name == "forgetting" else name]  # forgetting re-scores them
        again = study.summarise(name, source["runs"], source["base"], result["seeds"])
        for key in ("select_on", "lr_grid", "best_lr", "lr_sweep", "summary", "paired_vs_sft", "runs", "base"):
            _same(again[key], exp[key], f"{name}.{key}")


def check_offline(result: dict) -> None:
    _same(offline_rl.analyse(result), result["experiments"], "experiments")


def check_shapes(result: dict) -> None:
    names = {shape: list(table) for shape, table in result["losses"].items()}
    _same(shapes.summarise(result["runs"], names), result["losses"], "losses")


def test_study_summaries_follow_from_the_runs():
    result = _load("results.json")
    check_study(result)
    assert (RESULTS / "results.md").read_text() == report.markdown(result)


def test_offline_rl_summaries_follow_from_the_runs():
    check_offline(_load("offline_rl.json"))


@pytest.mark.parametrize("name", ["shapes.json", "shapes_new_format_lr1e-3.json"])
def test_shapes_summaries_follow_from_the_runs(name):
    check_shapes(_load(name))


def _set_dft_runs(runs: list[dict], value: float) -> int:
    n = 0
    for r in runs:
        if r["loss"] == "dft":
            metrics = r.get("metrics", r)
            for k in metrics:
                if k.endswith("exact_match") and isinstance(metrics[k], float | int):
                    metrics[k] = value
                    n += 1
    return n


def test_one_changed_run_fails_the_checks():
    """Setting the per-run DFT values to 0.99 (summaries untouched) is caught in every file."""
    study_result = copy.deepcopy(_load("results.json"))
    assert _set_dft_runs(study_result["experiments"]["reasoning"]["runs"], 0.99)
    with pytest.raises(AssertionError):
        check_study(study_result)
    offline = copy.deepcopy(_load("offline_rl.json"))
    assert _set_dft_runs(offline["runs"], 0.99)
    with pytest.raises(AssertionError):
        check_offline(offline)
    shaped = copy.deepcopy(_load("shapes.json"))
    assert _set_dft_runs(shaped["runs"], 0.99)
    with pytest.raises(AssertionError):
        check_shapes(shaped)
    one = copy.deepcopy(_load("offline_rl.json"))  # a single run, not all of them
    best = one["experiments"]["rft"]["best_lr"]["dft"]
    run = next(r for r in one["runs"] if r["data"] == "rft" and r["loss"] == "dft" and r["lr"] == best)
    run["metrics"]["id_exact_match"] += 0.01
    with pytest.raises(AssertionError):
        check_offline(one)
    for loss in ("nft", "nft_dft", "dpo"):  # one run of each loss that trains on the rejected samples too
        one = copy.deepcopy(_load("offline_rl.json"))
        chosen = one["experiments"]["rft"]["summary"][loss]
        run = next(
            r
            for r in one["runs"]
            if r["data"] == "rft"
            and r["loss"] == loss
            and r["lr"] == chosen["lr"]
            and r.get("beta") == chosen.get("beta")
        )
        run["metrics"]["ood_terms_exact_match"] += 0.01
        with pytest.raises(AssertionError):
            check_offline(one)


def _quoted(table: str, page: str) -> None:
    text = (ROOT / "docs" / page).read_text()
    for line in table.strip().splitlines():
        assert line in text, f"docs/{page} does not quote the committed results: {line}"


def test_docs_tables_are_rendered_from_the_results():
    results, offline = _load("results.json"), _load("offline_rl.json")
    shaped, lr1e3 = _load("shapes.json"), _load("shapes_new_format_lr1e-3.json")
    _quoted(report.headline(results), "evidence.md")
    _quoted(report.lr_table(results, offline), "choosing-a-loss.md")
    _quoted(offline_rl.markdown(offline), "offline-rl.md")
    _quoted(offline_rl.five_way(offline), "offline-rl.md")
    _quoted(shapes.new_format_table(shaped, lr1e3), "evidence.md")
    evidence = (ROOT / "docs" / "evidence.md").read_text()
    for shape, figures in shaped["inspect"].items():
        assert shapes.inspect_cells(figures) in evidence, shape


def _numbers(value, out: set[str]) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _numbers(v, out)
    elif isinstance(value, list):
        for v in value:
            _numbers(v, out)
    elif isinstance(value, float | int) and not isinstance(value, bool):
        for digits in (1, 2, 3):
            out.add(f"{value:.{digits}f}")
            out.add(f"{abs(value):.{digits}f}")
            out.add(f"{100 * value:.{digits - 1}f}")


# Figures the prose quotes from elsewhere, each with its source (the paper; the study's set-up).
EXTERNAL = {
    "35.4",
    "24.0",  # the paper's offline table: DFT vs RFT, Qwen2.5-Math-1.5B
    "0.6",  # the base's size in millions of parameters
    "1.5",  # Qwen2.5-Math-1.5B
}


def test_prose_figures_are_in_the_results():
    """Every decimal figure in the study pages' prose (outside tables and code) is one of the results' values."""
    known: set[str] = set()
    for name in ("results.json", "offline_rl.json", "shapes.json", "shapes_new_format_lr1e-3.json"):
        _numbers(_load(name), known)
    _numbers(offline_rl.analyse(_load("offline_rl.json")), known)
    checked = 0
    for page in ("evidence.md", "offline-rl.md"):
        text = re.sub(r"```.*?```", "", (ROOT / "docs" / page).read_text(), flags=re.S)
        for line in text.splitlines():
            if line.startswith("|"):
                continue
            for figure in re.findall(r"(?<![\w.])[−-]?\d+\.\d+(?![\w.])", line):
                figure = figure.replace("−", "-").lstrip("-")
                checked += 1
                assert figure in known or figure in EXTERNAL, f"docs/{page}: {figure} is not in the results: {line}"
    assert checked > 20
