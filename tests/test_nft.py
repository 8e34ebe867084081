"""NFT (learning from rejected samples) and per-token data weights, on both loss paths, against float64 ports."""

import pytest
import torch
import torch.nn.functional as F

import dft
from dft.nft import NFTInputs, NFTWeight, nft_terms
from tests.helpers.reference import ref_dft_loss, ref_nft_loss

V = 37


def _batch(gen, b=3, t=9, h=8, moved=0.0):
    """Hidden rows, head, labels (some ignored), and NFT inputs; ``moved``: how far pi_old is from pi."""
    hidden = torch.randn(b, t, h, dtype=torch.float64, generator=gen).requires_grad_()
    weight = (torch.randn(V, h, dtype=torch.float64, generator=gen) / h**0.5).requires_grad_()
    labels = torch.randint(0, V, (b, t), generator=gen)
    labels[torch.rand(b, t, generator=gen) < 0.25] = -100
    with torch.no_grad():
        logp = F.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    old_logp = logp + moved * torch.randn(b, t, dtype=torch.float64, generator=gen)
    rhat = torch.rand(b, 1, dtype=torch.float64, generator=gen).expand(b, t).clone()
    rhat[0] = 0.0  # clamped to 0.02
    accepted = torch.tensor([1, 0, 0])[:b, None].expand(b, t).clone()
    return hidden, weight, labels, old_logp, rhat, accepted


def test_terms_are_the_official_gradient_and_value():
    """w is -d(official token loss)/d(log p) and value the official token loss: at the first step, after the policy
    moved, past the ratio clip (log ratio > 10) and under the negative clamp (x < 1)."""
    logp = torch.tensor([-2.0, -0.5, -3.0, -1.0, -0.2, -4.0, -1.5], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-2.0, -0.9, -14.0, -1.0, -0.7, -3.0, -13.0], dtype=torch.float64)
    rhat = torch.tensor([0.25, 0.5, 0.5, 0.25, 0.5, 0.99, 0.4], dtype=torch.float64)
    acc = torch.tensor([1, 1, 1, 0, 0, 0, 0])
    opts = NFTWeight()
    w, value, tally = nft_terms(logp, old, rhat, acc, opts)
    r = rhat.clamp(0.02, 0.98)
    lr = torch.clamp(logp - old, max=10.0)
    x = (1 - r * lr.exp()) / (1 - r)
    st = x + (x.clamp(min=1.0) - x).detach()
    official = (1 - r) * torch.where(acc.bool(), -lr, -torch.log(st))
    (grad,) = torch.autograd.grad(official.sum(), logp)
    torch.testing.assert_close(value, official.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(w, -grad, rtol=0, atol=1e-15)
    assert w[0].item() == pytest.approx(0.75) and w[3].item() == pytest.approx(-0.25)  # first step: 1 - r, -r
    assert w[2].item() == 0.0 and w[6].item() == 0.0  # log ratio 11 > 10: clipped, no gradient
    assert float(tally.ratio_clipped) == 2 and float(tally.negative_tokens) == 4
    assert float(tally.negative_clamped) == 2  # x < 1 where the policy raised a rejected token's p (index 4, 6)


def test_nft_weight_refuses_bad_options():
    with pytest.raises(ValueError, match="rhat_max must be < 1"):
        NFTWeight(rhat_max=1.0)
    with pytest.raises(ValueError, match="clamp_negative must be > 0"):
        NFTWeight(clamp_negative=0.0)
    with pytest.raises(ValueError, match="neg_weight must be a finite number"):
        NFTWeight(neg_weight="1")


@pytest.mark.parametrize("moved", [0.0, 0.7])
@pytest.mark.parametrize("path", ["logits", "fused"])
@pytest.mark.parametrize("dft_positive", [False, True])
def test_nft_loss_equals_official_float64(gen, moved, path, dft_positive):
    hidden, weight, labels, old, rhat, acc = _batch(gen, moved=moved)
    opts = NFTWeight(dft_positive=dft_positive, clamp_negative=0.9)
    nft = NFTInputs(old, rhat, acc, opts)
    if path == "logits":
        got = dft.dft_loss(hidden @ weight.T, labels, nft=nft)
    else:
        got = dft.linear_dft_loss(hidden, weight, labels, nft=nft, chunk_size=5)
    want = ref_nft_loss(hidden @ weight.T, labels, old, rhat, acc, dft_positive=dft_positive, clamp_negative=0.9)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(torch.autograd.grad(got, [hidden, weight]), torch.autograd.grad(want, [hidden, weight])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    supervised = (labels != -100).sum().item()
    assert float(nft.tally.positive_tokens + nft.tally.negative_tokens) == supervised


def test_nft_accumulation_equals_one_batch(gen):
    """Two micro-batches with the step's token count == the whole batch (the token mean over the step)."""
    hidden, weight, labels, old, rhat, acc = _batch(gen, moved=0.5)
    n = (labels != -100).sum()
    whole = dft.linear_dft_loss(hidden, weight, labels, nft=NFTInputs(old, rhat, acc))
    parts = sum(
        dft.linear_dft_loss(hidden[s], weight, labels[s], nft=NFTInputs(old[s], rhat[s], acc[s]), num_items_in_batch=n)
        for s in (slice(0, 1), slice(1, 3))
    )
    torch.testing.assert_close(parts, whole, rtol=1e-13, atol=1e-15)
    g_whole = torch.autograd.grad(whole, [hidden, weight])
    g_parts = torch.autograd.grad(parts, [hidden, weight])
    for a, b in zip(g_parts, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_nft_inputs_of_the_wrong_shape_are_refused(gen):
    hidden, weight, labels, old, rhat, acc = _batch(gen)
    with pytest.raises(ValueError, match=r"NFT's rhat must have the labels' shape \(3, 9\), got \(3,\)"):
        dft.linear_dft_loss(hidden, weight, labels, nft=NFTInputs(old, rhat[:, 0], acc))


@pytest.mark.parametrize("path", ["logits", "fused"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_weights_equal_float64_reference(gen, path, reduction):
    hidden, weight, labels, *_ = _batch(gen)
    tw = torch.rand(labels.shape, dtype=torch.float64, generator=gen) * 3
    tw[0, :4] = 0.0  # weight 0: not supervised, not counted
    kept = labels.masked_fill(tw == 0, -100)
    if path == "logits":
        got = dft.dft_loss(hidden @ weight.T, labels, token_weights=tw, reduction=reduction)
    else:
        got = dft.linear_dft_loss(hidden, weight, labels, token_weights=tw, reduction=reduction, chunk_size=4)
    per_token = ref_dft_loss(hidden @ weight.T, kept, reduction="none")
    if reduction == "none":
        want = per_token * tw
    else:
        want = (per_token * tw).sum() / ((kept != -100).sum() if reduction == "mean" else 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    out, ref = (got.sum(), want.sum())
    for a, b in zip(torch.autograd.grad(out, [hidden, weight]), torch.autograd.grad(ref, [hidden, weight])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    unweighted = dft.dft_loss(hidden @ weight.T, labels, reduction=reduction)
    assert not torch.allclose(unweighted, got)


def test_token_weights_refused(gen):
    hidden, weight, labels, *_ = _batch(gen)
    bad = torch.ones(labels.shape, dtype=torch.float64)
    bad[1, 2] = -1.0
    with pytest.raises(ValueError, match="token_weights must be finite and >= 0"):
        dft.dft_loss(hidden @ weight.T, labels, token_weights=bad)
    with pytest.raises(TypeError, match="token_weights must be a float tensor of the labels' shape, got torch.int64"):
        dft.linear_dft_loss(hidden, weight, labels, token_weights=torch.ones(labels.shape, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_weights must have the labels' shape \(3, 9\)"):
        dft.dft_loss(hidden @ weight.T, labels, token_weights=torch.ones(3, dtype=torch.float64))


def _policy_and_old():
    from tests.helpers.tiny_models import tiny_model

    old = tiny_model("llama", seed=0).double().eval()
    policy = tiny_model("llama", seed=0).double()
    with torch.no_grad():  # the policy has moved away from pi_old
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, old


def _model_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("fused", [True, False])
def test_causal_lm_loss_nft_equals_official(fused):
    """causal_lm_loss(nft=...) == the official formula on the shifted targets, pi_old = ref_model at the same
    temperature (values and gradients, float64); row-level accepted / nft_rhat ([B]) repeat along the row."""
    from tests.helpers.tiny_models import token_batch

    policy, old = _policy_and_old()
    batch = token_batch(batch=3, seq=10)
    batch["accepted"] = torch.tensor([1, 0, 0])
    batch["nft_rhat"] = torch.tensor([0.5, 0.5, 0.25], dtype=torch.float64)
    t = dft.LogitTransform(temperature=0.7)
    out = dft.causal_lm_loss(policy, batch, nft=dft.NFTWeight(), ref_model=old, transform=t, fused=fused)
    targets = dft.shift_causal_labels(batch["labels"])
    with torch.no_grad():
        old_logits = _model_logits(old, batch) / 0.7
        old_logp = F.log_softmax(old_logits, -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    acc = batch["accepted"][:, None].expand_as(targets)
    rhat = batch["nft_rhat"][:, None].expand_as(targets)
    want = ref_nft_loss(_model_logits(policy, batch) / 0.7, targets, old_logp, rhat, acc)
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    params = [p for p in policy.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    assert out.fused is fused and out.nft is not None
    assert float(out.nft.negative_tokens) == (targets[1:] != -100).sum().item()


def test_causal_lm_loss_nft_needs_its_batch_keys_and_a_reference():
    from tests.helpers.tiny_models import token_batch

    policy, old = _policy_and_old()
    batch = token_batch(batch=2)
    with pytest.raises(ValueError, match=r"nft needs the batch keys \['accepted', 'nft_rhat'\]"):
        dft.causal_lm_loss(policy, batch, nft=dft.NFTWeight(), ref_model=old)
    batch |= {"accepted": torch.tensor([1, 0]), "nft_rhat": torch.tensor([0.5, 0.5])}
    with pytest.raises(ValueError, match="or nft needs a reference model"):
        dft.causal_lm_loss(policy, batch, nft=dft.NFTWeight())
    with pytest.raises(ValueError, match="pick one"):
        dft.causal_lm_loss(policy, batch, nft=dft.NFTWeight(), ref_model=old, kl_coef=0.1)


@pytest.mark.parametrize("fused", [True, False])
def test_causal_lm_loss_reads_loss_weights(fused):
    """batch["loss_weights"] (aligned with labels) weights each token; 0 supervises and counts nothing."""
    from tests.helpers.tiny_models import token_batch

    policy, _ = _policy_and_old()
    batch = token_batch(batch=2, seq=10)
    lw = torch.ones(batch["labels"].shape, dtype=torch.float64)
    lw[0, 5:8] = 0.0
    lw[1, 4:] = 2.5
    out = dft.causal_lm_loss(policy, {**batch, "loss_weights": lw}, fused=fused)
    targets = dft.shift_causal_labels(batch["labels"])
    tw = torch.cat([lw[:, 1:], torch.zeros(2, 1, dtype=torch.float64)], 1)
    kept = targets.masked_fill(tw == 0, -100)
    per_token = ref_dft_loss(_model_logits(policy, batch), kept, reduction="none")
    want = (per_token * tw).sum() / (kept != -100).sum()
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    assert out.stats.num_tokens.item() == (kept != -100).sum().item()
