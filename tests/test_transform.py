import pytest
import torch

import dft
from dft.transform import LogitTransform

CASES = [
    (LogitTransform(), LogitTransform(temperature=2.0)),
    (LogitTransform(logit_scale=0.5, softcap=3.0), LogitTransform(temperature=0.7)),
    (LogitTransform(logit_scale=0.5, softcap=3.0, temperature=1.5), LogitTransform(logit_scale=2.0, temperature=0.8)),
    (LogitTransform(logit_scale=1.3, temperature=2.0), LogitTransform(logit_scale=0.9, softcap=4.0, temperature=1.1)),
    (LogitTransform(softcap=5.0), LogitTransform()),
]


@pytest.mark.parametrize(("inner", "outer"), CASES)
def test_then_composes(inner, outer):
    z = torch.randn(4, 9, dtype=torch.float64) * 5
    torch.testing.assert_close(inner.then(outer).apply(z), outer.apply(inner.apply(z)))


def test_then_refuses_two_softcaps():
    with pytest.raises(ValueError, match="soft-cap twice"):
        LogitTransform(softcap=5.0).then(LogitTransform(softcap=3.0))


def test_in_place_forward_matches_apply():
    z = torch.randn(4, 9, dtype=torch.float64) * 5
    t = LogitTransform(logit_scale=0.7, softcap=2.0, temperature=1.3)
    u, _ = t.forward_(z.clone())
    torch.testing.assert_close(u, t.apply(z))


@pytest.mark.parametrize(("kwargs", "match"), [({"softcap": 0.0}, "softcap"), ({"temperature": -1}, "temperature")])
def test_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogitTransform(**kwargs)


def test_dft_loss_applies_transform(gen):
    logits = torch.randn(3, 5, 11, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    t = LogitTransform(softcap=2.0, temperature=0.5)
    torch.testing.assert_close(dft.dft_loss(logits, labels, transform=t), dft.dft_loss(t.apply(logits), labels))
    torch.testing.assert_close(
        dft.dft_loss(logits, labels, softcap=2.0, temperature=0.5), dft.dft_loss(t.apply(logits), labels)
    )
