import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def gen():
    """A seeded generator per test (no import-time global state)."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(1234)
