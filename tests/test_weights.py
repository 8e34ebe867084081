import pytest
import torch

import dft
from dft.weights import DFTWeight, beta_schedule
from tests.helpers.reference import make_batch


def test_beta_schedule():
    assert [beta_schedule(s, 1.0, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert beta_schedule(0, 0.8, 0) == 0.8


def test_weighting_object_equals_flat_options(gen):
    logits, labels = make_batch((3, 7), 31, generator=gen)
    w = DFTWeight(alpha=0.5, min_weight=0.05, beta=0.7, p_max=0.95)
    flat = dict(alpha=0.5, min_weight=0.05, beta=0.7, p_max=0.95)
    assert torch.equal(dft.dft_loss(logits, labels, w), dft.dft_loss(logits, labels, **flat))
    h, weight = torch.randn(3, 7, 8, dtype=torch.float64), torch.randn(31, 8, dtype=torch.float64)
    assert torch.equal(dft.linear_dft_loss(h, weight, labels, w), dft.linear_dft_loss(h, weight, labels, **flat))


def test_object_and_flat_options_together_are_refused(gen):
    logits, labels = make_batch((2, 5), 11, generator=gen)
    with pytest.raises(ValueError, match="either weighting"):
        dft.dft_loss(logits, labels, DFTWeight(alpha=0.5), alpha=0.5)
    with pytest.raises(ValueError, match="either transform"):
        dft.dft_loss(logits, labels, transform=dft.LogitTransform(temperature=2.0), temperature=2.0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['alpah'\]"):
        dft.dft_loss(logits, labels, alpah=0.5)
    with pytest.raises(TypeError, match="DFTWeight"):
        dft.dft_loss(logits, labels, {"alpha": 0.5})


def test_with_beta_keeps_the_other_fields():
    w = DFTWeight(alpha=0.5, min_weight=0.1).with_beta(0.25)
    assert (w.alpha, w.min_weight, w.beta) == (0.5, 0.1, 0.25)
