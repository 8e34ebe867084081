import pytest
import torch


@pytest.fixture
def gen():
    """A seeded generator per test (no import-time global state)."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(1234)
