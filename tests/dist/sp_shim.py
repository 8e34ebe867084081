"""Test-only: accelerate's ``ParallelismConfig`` on CPU ranks (gloo, ``DS_ACCELERATOR=cpu``).

Two shims; nothing of the parallel code paths themselves (DeepSpeed's ``UlyssesSPAttentionHF`` and
``UlyssesSPDataLoaderAdapter``, ZeRO's reduction over the sequence-data-parallel group, transformers'
tensor-parallel plans) is replaced:

* :func:`init_deepspeed_comm` (Ulysses sequence parallelism, :func:`install`, tests/dist/sp_worker.py):
  with ``use_cpu`` accelerate initialises ``torch.distributed`` itself and never calls
  ``deepspeed.comm.init_distributed`` (it does only on GPUs, under ``ACCELERATE_USE_DEEPSPEED``), so when
  ``UlyssesSPAttentionHF.register_with_transformers`` builds the sequence-parallel groups,
  ``parallel_state_sp.initialize_sequence_parallel`` fails its ``assert dist.is_initialized()``
  (DeepSpeed's comm backend is None). This calls ``deepspeed.comm.init_distributed("gloo")`` first,
  which initialises the same default process group accelerate would; it bypasses no check.
* :func:`allow_cpu_parallelism_config` (tensor parallelism without DeepSpeed, tests/dist/tp_worker.py):
  ``ParallelismConfig._validate_accelerator`` refuses an accelerator whose distributed type is
  ``MULTI_CPU`` ("ParallelismConfig is only compatible DistributedType.FSDP (version 2) or
  DistributedType.Multi{Device} or DistributedType.DEEPSPEED"); the wrapper runs the same validation
  with the accelerator presented as a multi-device one (``multi_device=True``), the only thing it
  bypasses. Sequence parallelism does not need it: with a DeepSpeed config the distributed type is
  ``DEEPSPEED`` on CPU ranks too, which the validation accepts.
"""

from __future__ import annotations

from typing import Any


class _MultiDevice:
    """The accelerator as ``_validate_accelerator`` reads it, with ``multi_device`` True."""

    multi_device = True

    def __init__(self, accelerator: Any) -> None:
        self._accelerator = accelerator

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
    """What the Ulysses sequence-parallel worker needs: DeepSpeed's comm initialised."""
    init_deepspeed_comm()
