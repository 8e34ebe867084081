import os
import sys

import pytest
import torch


@pytest.fixture
def gen():
    """A seeded generator per test (no import-time global state)."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def _no_mixed_precision_leak():
    """Mixed precision outlives the Trainer that asked for it: transformers 4.x's ``TrainingArguments(bf16=True)``
    (and TRL 0.20's configs, bf16 by default) export ``ACCELERATE_MIXED_PRECISION`` into ``os.environ``, and
    accelerate keeps ``mixed_precision`` in its process-wide ``AcceleratorState``; every later Trainer in the
    process would then train under bf16 autocast. Both are restored after each test."""
    before = os.environ.get("ACCELERATE_MIXED_PRECISION")
    yield
    after = os.environ.get("ACCELERATE_MIXED_PRECISION")
    state = sys.modules.get("accelerate.state")
    kept = state.AcceleratorState._shared_state.get("_mixed_precision") if state else None
    if after != before or kept not in (None, "no", before):
        if before is None:
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = before
        if state:
            state.AcceleratorState._reset_state(reset_partial_state=True)
