"""Provenance for benchmark results: what ran, where, on which code, and how busy the machine was.

Every benchmark script writes ``benchmarks/results/<name>.json``::

    {"benchmark": ..., "provenance": {...}, "params": {...}, "runs": [every raw measurement], "rows": [...]}

and ``benchmarks/results/<name>.md``, the markdown its ``render(result)`` builds from that JSON alone
(``tests/test_benchmarks.py`` re-renders it, and recomputes ``rows`` from ``runs`` with the script's
``derive(result)``).

    prov = Provenance.start(device="cpu")     # before the first measurement
    ...                                       # runs.append(...); prov.load_now() after each run
    write("lm_head", prov.finish(), params, runs, derive, render)
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("torch", "transformers", "datasets", "accelerate", "trl", "deepspeed", "tokenizers", "numpy")
PROVENANCE_KEYS = ("command", "argv", "device", "versions", "git", "date", "load")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def load_average() -> list[float]:
    """``os.getloadavg()``: runnable processes averaged over 1, 5 and 15 minutes."""
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str = "cpu") -> dict:
    """The CPU (model, architecture, cores) and, for a CUDA run, the GPU's name and memory."""
    info: dict = {
        "kind": "cuda" if str(device).startswith("cuda") else str(device),
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
    }
    if info["kind"] == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def versions() -> dict:
    """python, dft (from the checkout being measured) and the libraries the benchmarks touch."""
    out = {"python": platform.python_version()}
    try:
        sys.path.insert(0, str(ROOT / "src"))
        import dft

        out["dft"] = dft.__version__
    except Exception:  # noqa: BLE001
        out["dft"] = None
    finally:
        sys.path.remove(str(ROOT / "src"))
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict:
    """HEAD, and whether the work tree differs from it (with the paths that do, at most 50)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None, "changed": []}
    return {"commit": commit, "dirty": bool(changed), "changed": changed[:50]}


def command_line() -> str:
    """``sys.argv`` as a shell command run from the repository root (niceness shown when it is not 0)."""
    argv = list(sys.argv)
    try:
        argv[0] = os.path.relpath(os.path.abspath(argv[0]), ROOT)
    except ValueError:
        pass
    nice = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0
    return (f"nice -n {nice} " if nice else "") + shlex.join(["python", *argv])


class Provenance:
    """Collected at the start of a benchmark; ``finish()`` adds the end time and load."""

    def __init__(self, device: str = "cpu") -> None:
        self.data: dict = {
            "command": command_line(),
            "argv": list(sys.argv),
            "cwd": os.getcwd(),
            "niceness": os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0,
            "device": device_info(device),
            "versions": versions(),
            "git": git_state(),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "DFT_COMPILE_EPILOGUE") if k in os.environ},
            "date": {"start": _now(), "end": None},
            "load": {"start": load_average(), "end": None},
        }

    @classmethod
    def start(cls, device: str = "cpu") -> Provenance:
        return cls(device)

    def finish(self) -> dict:
        self.data["date"]["end"] = _now()
        self.data["load"]["end"] = load_average()
        return self.data


def default_name() -> str:
    return Path(sys.argv[0]).stem


def write(
    name: str,
    provenance: dict,
    params: dict,
    runs: list,
    derive: Callable[[dict], list],
    render: Callable[[dict], str],
    extra_json: str | None = None,
) -> dict:
    """Writes ``benchmarks/results/<name>.json`` and ``.md`` (and the same JSON to ``extra_json``)."""
    result = {"benchmark": default_name(), "provenance": provenance, "params": params, "runs": runs}
    # through JSON once, so that rows and the markdown are built from exactly what the file holds
    result = json.loads(json.dumps(result))
    result["rows"] = derive(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1) + "\n"
    (RESULTS / f"{name}.json").write_text(text)
    (RESULTS / f"{name}.md").write_text(render(result))
    if extra_json:
        Path(extra_json).write_text(text)
    print(f"wrote {RESULTS.relative_to(ROOT)}/{name}.json and .md", file=sys.stderr)
    return result


def local_changes(result: dict) -> bool:
    """Whether the run had uncommitted changes to the code it measures (src/ or a benchmark script)."""
    changed = result["provenance"]["git"]["changed"]
    return any(p.startswith("src/") or (p.startswith("benchmarks/") and "/results/" not in p) for p in changed)


def conditions(result: dict, what: str) -> str:
    """The one line of conditions under a table: what ran, on what, how loaded, from which commit."""
    p = result["provenance"]
    d, v = p["device"], p["versions"]
    if d["kind"] == "cuda":
        where = f"{d['gpu']} ({d['gpu_memory_gb']} GB)"
    else:
        where = f"CPU {d['cpu']} ({d['arch']}, {d['cores']} cores)"
    commit = (p["git"]["commit"] or "?")[:10] + (" + uncommitted changes" if local_changes(result) else "")
    load = p["load"]
    return (
        f"*{what}. Ran on {where}, torch {v['torch']}, dft {v['dft']}, commit {commit}, {p['date']['start'][:10]}; "
        f"load average (1 min) {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end: "
        f"`{p['command']}`*"
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2
