"""Test-only: run DeepSpeed's Ulysses sequence parallelism (accelerate ``ParallelismConfig(sp_size=...)``) on CPU ranks.

Two shims, both for a machine without GPUs (gloo ranks, ``DS_ACCELERATOR=cpu``); nothing of the
sequence-parallel code path itself (``UlyssesSPAttentionHF``, ``UlyssesSPDataLoaderAdapter``, ZeRO's
reduction over the sequence-data-parallel group) is replaced:

* :func:`allow_cpu_parallelism_config`: ``ParallelismConfig._validate_accelerator`` refuses an accelerator
  whose distributed type is ``MULTI_CPU`` ("ParallelismConfig is only compatible ..."); the wrapper runs
  the same validation with the accelerator presented as a multi-device one (``multi_device=True``),
  which is the only thing it bypasses.
* :func:`init_deepspeed_comm`: with ``use_cpu`` accelerate initialises ``torch.distributed`` itself and
  never calls ``deepspeed.comm.init_distributed``, so DeepSpeed's communication backend (``cdb``) is
  ``None`` when ``UlyssesSPAttentionHF.register_with_transformers`` builds the sequence-parallel groups.
  This calls ``deepspeed.comm.init_distributed("gloo")`` first (what accelerate does on GPUs with
  ``ACCELERATE_USE_DEEPSPEED``); it bypasses nothing.
"""

from __future__ import annotations

from typing import Any


class _MultiDevice:
    """The accelerator as ``_validate_accelerator`` reads it, with ``multi_device`` True."""

    def __init__(self, accelerator: Any) -> None:
        self._accelerator = accelerator

    multi_device = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._accelerator, name)


def allow_cpu_parallelism_config() -> None:
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DistributedType

    original = ParallelismConfig._validate_accelerator
    if getattr(original, "_dft_cpu", False):
        return

    def _validate_accelerator(self, accelerator):
        if accelerator.distributed_type == DistributedType.MULTI_CPU:
            accelerator = _MultiDevice(accelerator)
        return original(self, accelerator)

    _validate_accelerator._dft_cpu = True
    ParallelismConfig._validate_accelerator = _validate_accelerator


def init_deepspeed_comm() -> None:
    import deepspeed.comm

    deepspeed.comm.init_distributed("gloo")


def install() -> None:
    allow_cpu_parallelism_config()
    init_deepspeed_comm()
