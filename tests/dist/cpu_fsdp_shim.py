"""Test-only: let accelerate shard with FSDP on CPU ranks (gloo), as it does on GPUs.

accelerate turns FSDP on only for GPU-like distributed types; on a ``MULTI_CPU`` run it keeps the
FSDP plugin unused and prepares the model with DDP, so ``Trainer(fsdp=...)`` would silently test DDP.
This patch makes ``AcceleratorState`` take the FSDP branch it takes on GPUs; everything after it
(``fsdp2_prepare_model``: auto-wrap, the ``[norm, lm_head]`` tail group, the root unit, mixed
precision, the optimizer and gradient handling) is accelerate's own code path.
"""

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType


def install() -> None:
    original = AcceleratorState.__init__
    if getattr(original, "_dft_cpu_fsdp", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):  # noqa: N807
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    __init__._dft_cpu_fsdp = True
    AcceleratorState.__init__ = __init__
