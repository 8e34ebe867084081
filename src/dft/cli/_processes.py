"""Which process this is, under torchrun / accelerate launch: the main one prints and writes, the others wait
(rank and world size come from [`dft.distributed`][dft.distributed]); how a finished job leaves."""

from __future__ import annotations

import os
import sys
from typing import Any

from ..distributed import is_main_process, rank_and_world_size
from ._parsing import UsageError


def _world_size() -> int:
    """Processes of this job, as torchrun / accelerate launch / mpirun set it (1 for a plain run)."""
    return rank_and_world_size()[1]


def _is_main() -> bool:
    """The process that prints and writes the CLI's outputs (global rank 0; the only one of a plain run)."""
    return is_main_process()


def say(*args: Any) -> None:
    """``print`` on the main process only (every rank runs the same CLI code)."""
    if _is_main():
        print(*args, flush=True)


def _has_accelerator() -> bool:
    """A GPU or another device TrainingArguments would train on (CUDA, ROCm, XPU, MPS, NPU, HPU, XLA...)."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if (accelerator is not None and accelerator.is_available()) or torch.cuda.is_available():
        return True
    from transformers.utils import is_torch_npu_available, is_torch_xla_available

    return is_torch_xla_available() or is_torch_npu_available()


def _single_process(command: str) -> None:
    if _world_size() > 1:
        raise UsageError(
            f"{command} runs in one process (WORLD_SIZE={_world_size()}): run it without torchrun / accelerate "
            "launch; only dft train spreads over processes."
        )


def _wait_for_everyone(config: Any) -> None:
    if config.world_size > 1:
        config.distributed_state.wait_for_everyone()


def _quiet_progress_bars() -> None:
    """Non-main ranks: no second copy of the loading / saving progress bars."""
    import datasets
    from transformers.utils import logging

    logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _exit_without_gloo_teardown() -> None:
    """A finished run over gloo (every rank past the last barrier, every file closed): run the exit hooks
    (report_to integrations), then leave without the interpreter's teardown, where torch 2.13's gloo
    backend now and then aborts a rank (a still-joinable thread at exit: SIGABRT), which torchrun would
    report as a failed job although every file is written (tests/dist/__init__.py has the details)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"):
        return
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
