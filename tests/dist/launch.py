"""Launch a worker under torchrun on 2 CPU ranks (gloo) and load what it saved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _stop(proc: subprocess.Popen) -> None:
    """torchrun forwards SIGTERM to its workers (which run in their own sessions); then kill what is left."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def run_bounded(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 240) -> str:
    """Run ``cmd`` in its own session, kill it after ``timeout`` s; fail the test on a non-zero exit."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True, cwd=ROOT
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        output, _ = proc.communicate()
        pytest.fail(f"{cmd[:4]} timed out:\n{output[-3000:]}")
    finally:
        _stop(proc)
    assert proc.returncode == 0, output[-3000:]
    return output


def torchrun(worker: Path, out_dir: Path, *args: str, result: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    run_bounded([*cmd, str(out_dir), *args])
    return torch.load(out_dir / result)
