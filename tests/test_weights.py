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


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("extra", [{}, {"min_weight": 0.05, "beta": 0.5}, {"reduction": "none"}])
def test_ce_token_ids_weight_one_on_those_targets_exact(fused, extra):
    """ce_token_ids: weight exactly 1 on those targets (CE), DFT elsewhere; float64 reference, values and
    gradients, on the logits path and the fused head, with ignored tokens in the batch."""
    import torch.nn.functional as F

    import dft
    from tests.helpers.reference import ref_dft_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 20, 16, dtype=torch.float64, generator=g)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g) * 0.5
    y = torch.randint(0, 50, (3, 20), generator=g)
    y[:, ::4] = 7  # a frequent "special" token
    y[0, :3] = -100
    ids = (7, 3)
    extra = dict(extra)
    reduction = extra.pop("reduction", "mean")

    def run(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(hh, ww)
        (loss.sum() if reduction == "none" else loss).backward()
        return loss.detach(), hh.grad, ww.grad

    weighting = dft.DFTWeight(ce_token_ids=list(ids), **extra)
    if fused:
        got = run(lambda a, b: dft.linear_dft_loss(a, b, y, weighting, reduction=reduction, chunk_size=16))
    else:
        got = run(lambda a, b: dft.dft_loss(F.linear(a, b), y, weighting, reduction=reduction))
    want = run(lambda a, b: ref_dft_loss(F.linear(a, b), y, reduction=reduction, ce_token_ids=ids, **extra))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    plain = run(lambda a, b: ref_dft_loss(F.linear(a, b), y, reduction=reduction, **extra))
    assert not torch.allclose(got[2], plain[2])  # the option changes the update


def test_ce_token_ids_validation():
    import dft

    assert dft.DFTWeight(ce_token_ids=[5, 2, 5]).ce_token_ids == (2, 5)
    with pytest.raises(TypeError, match="ce_token_ids must be token ids"):
        dft.DFTWeight(ce_token_ids="eos")
    with pytest.raises(ValueError, match="need the target ids"):
        dft.DFTWeight(ce_token_ids=[1])(torch.zeros(3))


@pytest.mark.parametrize("fused", [True, False])
def test_ce_token_ids_accumulation_equals_one_big_batch(fused):
    """ce_token_ids under gradient accumulation (global num_items_in_batch): the summed micro-batch
    gradients equal one batch holding every row, on the fused head and the logits path."""
    import dft
    from tests.helpers.tiny_models import tiny_model, token_batch

    model = tiny_model("llama").double()
    weighting = dft.DFTWeight(alpha=1.0, min_weight=0.05, ce_token_ids=(3, 11, 17))
    parts = [token_batch(2, 12, seed=s) for s in (1, 2)]
    for part in parts:
        part["labels"][:, 4::3] = 11  # targets kept on CE in every row
    n = dft.global_num_items(parts)
    for part in parts:
        dft.causal_lm_loss(model, part, weighting, num_items_in_batch=n, fused=fused).loss.backward()
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    big = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    dft.causal_lm_loss(model, big, weighting, fused=fused).loss.backward()
    for a, b in zip(accumulated, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_process_caches_are_not_filled_under_fake_tensors():
    """A call under FakeTensorMode (non-strict export, FSDP's memory tracker) must not leave a fake tensor
    in a process-wide cache for the next real call."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from dft import weights

    weights._ID_TENSORS.clear()
    weighting = dft.DFTWeight(ce_token_ids=(1, 2))
    logits, labels = torch.randn(4, 7), torch.tensor([1, 2, 3, 0])
    with FakeTensorMode() as mode:
        fake = dft.dft_loss(mode.from_tensor(logits), mode.from_tensor(labels), weighting, validate=False)
        assert isinstance(fake, FakeTensor)
    assert not weights._ID_TENSORS
    real = dft.dft_loss(logits, labels, weighting)
    assert not isinstance(real, FakeTensor)
    torch.testing.assert_close(real, dft.dft_loss(logits.double(), labels, weighting).float())
