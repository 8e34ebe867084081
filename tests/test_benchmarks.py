"""The committed benchmark figures follow from their JSON (no benchmark is run here).

For every ``benchmarks/results/*.json``: the provenance is complete; the script's ``render`` reproduces the
committed ``.md`` exactly; the rows (the table's figures) are recomputed from the raw runs, by the script's
``derive`` and (for the scripts listed in RECOMPUTE) independently here; a changed raw run is caught. Every
snippet in docs/ points to a file, every result is included by a docs page, and each number written on
docs/benchmarks.md (outside the included tables) is in some result.
"""

from __future__ import annotations

import copy
import datetime
import functools
import importlib.util
import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
PAGE = DOCS / "benchmarks.md"
JSONS = sorted(RESULTS.glob("*.json"))
SNIPPET = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$', re.M)


@functools.cache
def _module(stem: str):
    """benchmarks/<stem>.py imported as a module (its ``if __name__ == "__main__"`` keeps it from running)."""
    path = ROOT / "benchmarks" / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def _differences(a: object, b: object, where: str = "") -> list[str]:
    """Where two JSON values differ (floats to 1e-12 relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12):
            return []
        return [f"{where}: {a!r} != {b!r}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


# ---- independent recomputation of each table's figures from the raw runs --------------------------------


def _lm_head(result: dict) -> list[tuple[dict, str, float | None]]:
    runs: dict[tuple, list[dict]] = {}  # every round of a case
    for r in result["runs"]:
        if "error" not in r:
            runs.setdefault((r["n"], r["h"], r["v"], r["dtype"], r["case"]), []).append(r)

    def best(key: tuple, field: str) -> float:
        return min(x for r in runs[key] for x in r[field])

    out = []
    for row in result["rows"]:
        if "error" in row:
            continue
        shape = (row["n"], row["h"], row["v"], row["dtype"])
        me, floor = (*shape, row["case"]), (*shape, "floor")
        base = (*shape, "asft_naive" if row["case"].startswith("asft") and (*shape, "asft_naive") in runs else "naive")
        times = [x for r in runs[me] for x in r["times_s"]]
        peak = max(r["peak_extra_mb"] for r in runs[me])
        out += [(row, "time_s", min(times)), (row, "spread", max(times) / min(times) - 1), (row, "peak_extra_mb", peak)]
        out.append((row, "x_naive", min(times) / best(base, "times_s") if base in runs else None))
        out.append((row, "x_floor", min(times) / best(floor, "times_s") if floor in runs else None))
        out.append((row, "cpu_x_naive", best(me, "cpu_s") / best(base, "cpu_s") if base in runs else None))
        base_peak = max(r["peak_extra_mb"] for r in runs[base]) if base in runs else None
        out.append((row, "mem_x_naive", peak / base_peak if base_peak else None))
    return out


def _trainer_step(result: dict) -> list[tuple[dict, str, float | None]]:
    runs = {r["case"]: r for r in result["runs"] if "error" not in r}
    ce, trl = runs.get("trainer_ce"), runs.get("trl_dft")
    out = []
    for row in result["rows"]:
        if "error" in row:
            continue
        r = runs[row["case"]]
        step = statistics.median(r["steps_s"])
        out += [(row, "step_s", step), (row, "min_s", min(r["steps_s"])), (row, "max_s", max(r["steps_s"]))]
        out.append((row, "x_trainer_ce", step / statistics.median(ce["steps_s"]) if ce else None))
        cpu = statistics.median(r["cpu_s"]) / statistics.median(ce["cpu_s"]) if ce else None
        out.append((row, "cpu_x_trainer_ce", cpu))
        out.append((row, "mem_x_trainer_ce", r["peak_extra_mb"] / ce["peak_extra_mb"] if ce else None))
        out.append((row, "mem_x_trl_dft", r["peak_extra_mb"] / trl["peak_extra_mb"] if trl else None))
    return out


def _logits_path(result: dict) -> list[tuple[dict, str, float | None]]:
    runs = {r["case"]: r["peaks_mib"] for r in result["runs"]}
    ce = statistics.median(runs["cross_entropy"])
    out = []
    for row in result["rows"]:
        peaks = runs[row["case"]]
        out += [(row, "median_mib", statistics.median(peaks)), (row, "min_mib", min(peaks))]
        out += [(row, "max_mib", max(peaks)), (row, "x_cross_entropy", statistics.median(peaks) / ce)]
    return out


def _roofline(result: dict) -> list[tuple[dict, str, float | None]]:
    peak = result["params"]["peak_flops"]
    out = []
    for r in result["runs"]:
        row = next(x for x in result["rows"] if (x["model"], x["masked"]) == (r["model"], r["masked"]))
        floor_ms = 6 * r["supervised"] * r["V"] * r["H"] / peak * 1e3
        ms = math.fsum(ms for _, ms in r["top"])
        out += [(row, "floor_ms", floor_ms), (row, f"{r['variant']}_ms", ms)]
        out += [(row, f"{r['variant']}_x_floor", ms / floor_ms), (row, "dw_fp32_gb", r["V"] * r["H"] * 4 / 1e9)]
        out.append((row, f"{r['variant']}_peak_extra_gb", r["peak_extra_gb"]))
    return out


def _fp16_grad_error(result: dict) -> list[tuple[dict, str, float | None]]:
    out = []
    for r, row in zip(result["runs"], result["rows"]):
        out += [
            (row, k, r[k]) for k in ("dh_fused", "dh_materialised", "dh_zeros_fused", "dw_fused", "dw_materialised")
        ]
        out.append((row, "dh_materialised_x_fused", r["dh_materialised"] / r["dh_fused"]))
    return out


def _engine_memory(result: dict) -> list[tuple[dict, str, float | None]]:
    peaks = {(r["engine"], r["fused"]): r.get("peak_mib") for r in result["runs"]}
    out = []
    for row in result["rows"]:
        fused, logits = peaks.get((row["engine"], True)), peaks.get((row["engine"], False))
        out += [(row, "fused_mib", fused), (row, "logits_mib", logits)]
        out.append((row, "ratio", fused / logits if fused is not None and logits is not None else None))
    return out


def _compile_time(result: dict) -> list[tuple[dict, str, float | None]]:
    out = []
    for r, row in zip(result["runs"], result["rows"]):
        cold, warm = r["cold"]["times_s"], r["warm"]["times_s"]
        out.append((row, "cold_s", cold[0] - statistics.median(cold[1:])))
        out.append((row, "warm_s", warm[0] - statistics.median(warm[1:])))
        out.append((row, "steady_s", statistics.median(cold[1:] + warm[1:])))
    return out


def _data_prep(result: dict) -> list[tuple[dict, str, float | None]]:
    out = []
    for r, row in zip(result["runs"], result["rows"]):
        out += [(row, k, r[k]) for k in ("seconds", "peak_mb", "peak_growth_mb")]
        worker = r["worker_peak_mb"] if r["worker_peak_mb"] > r["children_before_mb"] else None
        out.append((row, "worker_peak_mb", worker))
        out.append((row, "rows_per_s", None if r["step"] == "cached" else r["rows"] / r["seconds"]))
    return out


RECOMPUTE = {
    "lm_head": _lm_head,
    "trainer_step": _trainer_step,
    "logits_path": _logits_path,
    "roofline": _roofline,
    "fp16_grad_error": _fp16_grad_error,
    "engine_memory": _engine_memory,
    "compile_time": _compile_time,
    "data_prep": _data_prep,
}


def _mismatches(result: dict) -> list[str]:
    """Every figure in the rows that does not follow from the raw runs (by the script and by this file)."""
    module = _module(result["benchmark"])
    found = [f"derive{d}" for d in _differences(module.derive(result), result["rows"])]
    for row, key, expected in RECOMPUTE.get(result["benchmark"], lambda result: [])(result):
        got = row.get(key, "missing")
        if expected is None or got is None or got == "missing":
            if got != expected:
                found.append(f"{key}: {got!r} != {expected!r}")
        elif not math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12):
            found.append(f"{key}: {got!r} != {expected!r}")
    return found


# ---- the tests ------------------------------------------------------------------------------------------


SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", SCRIPTS, ids=_ids(SCRIPTS))
def test_importing_a_script_does_not_run_it(path):
    module = _module(path.stem)  # a script that ran here would parse pytest's argv or take minutes
    assert callable(module.derive) and callable(module.render) and callable(module.main)


def test_results_are_committed():
    assert JSONS, "no benchmarks/results/*.json"
    assert {p.stem for p in RESULTS.glob("*.md")} == {p.stem for p in JSONS}


@pytest.mark.parametrize("path", JSONS, ids=_ids(JSONS))
def test_provenance_is_complete(path):
    result = _load(path)
    assert (ROOT / "benchmarks" / f"{result['benchmark']}.py").is_file()
    p = result["provenance"]
    assert f"benchmarks/{result['benchmark']}.py" in p["command"] and p["argv"]
    assert p["device"]["cpu"] and p["device"]["arch"] and p["device"]["cores"] >= 1
    if p["device"]["kind"] == "cuda":
        assert p["device"]["gpu"]
    for name in ("python", "dft", "torch", "transformers", "datasets", "accelerate"):
        assert p["versions"][name], name
    assert re.fullmatch(r"[0-9a-f]{40}", p["git"]["commit"]) and isinstance(p["git"]["dirty"], bool)
    start, end = (datetime.datetime.fromisoformat(p["date"][k]) for k in ("start", "end"))
    assert start.utcoffset() == datetime.timedelta(0) and start <= end
    for k in ("start", "end"):
        assert len(p["load"][k]) == 3 and all(x >= 0 for x in p["load"][k])
    assert result["params"] and result["runs"] and result["rows"]


@pytest.mark.parametrize("path", JSONS, ids=_ids(JSONS))
def test_render_reproduces_the_committed_markdown(path):
    result = _load(path)
    assert _module(result["benchmark"]).render(result) == path.with_suffix(".md").read_text()


@pytest.mark.parametrize("path", JSONS, ids=_ids(JSONS))
def test_rows_follow_from_the_raw_runs(path):
    assert _mismatches(_load(path)) == []


def _perturb(value: object) -> object:
    """Every float in a run times 1.5 (identifiers and counts stay)."""
    if isinstance(value, dict):
        return {k: v if k == "load_after" else _perturb(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_perturb(v) for v in value]
    return value * 1.5 if isinstance(value, float) else value


@pytest.mark.parametrize("path", JSONS, ids=_ids(JSONS))
def test_a_changed_raw_run_is_caught(path):
    result = copy.deepcopy(_load(path))
    run = next(i for i, r in enumerate(result["runs"]) if "error" not in r)
    result["runs"][run] = _perturb(result["runs"][run])
    assert _mismatches(result), "changing a raw run left every figure unchanged"


def _snippets() -> dict[Path, list[str]]:
    return {page: SNIPPET.findall(page.read_text()) for page in DOCS.rglob("*.md")}


def test_snippets_point_to_files():
    for page, targets in _snippets().items():
        for target in targets:
            assert (ROOT / target).is_file() or (DOCS / target).is_file(), f"{page.name}: {target}"


def test_every_result_is_in_the_docs():
    included = {target for targets in _snippets().values() for target in targets}
    for path in JSONS:
        assert f"benchmarks/results/{path.stem}.md" in included, path.name


NUMBER = re.compile(r"(?<![\w.\-])(\d+(?:\.\d+)?)(%?)(?![\w])")


def _known_numbers() -> set[str]:
    """Each number in the results, as written at 0-4 decimals (and as a percentage), and every number
    inside their strings (commands, names)."""
    known: set[str] = set()

    def walk(x: object) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, bool) or x is None:
            return
        elif isinstance(x, (int, float)):
            for d in range(5):
                known.add(f"{x:.{d}f}")
                known.add(f"{x * 100:.{d}f}%")
        elif isinstance(x, str):
            for m in NUMBER.finditer(x):
                known.update((m.group(1), m.group(1) + "%"))

    for path in JSONS:
        walk(_load(path))
    return known


def _prose(text: str) -> str:
    """The page as written (snippet lines stand for the included tables), without fenced code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return "\n".join(line for line in text.splitlines() if not SNIPPET.match(line))


def test_numbers_in_the_prose_come_from_the_results():
    known = _known_numbers()
    prose = _prose(PAGE.read_text())
    missing = [m.group(0) for m in NUMBER.finditer(prose) if m.group(1) + m.group(2) not in known]
    assert not missing, f"numbers in docs/benchmarks.md's prose that no results JSON holds: {missing}"
