import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.gradcheck import GradcheckError

import dft
from tests.helpers.reference import make_batch, ref_dft_loss, ref_stats

WEIGHT_OPTIONS = [
    {},
    {"alpha": 0.0},
    {"alpha": 0.5},
    {"alpha": 2.0},
    {"min_weight": 0.05},
    {"beta": 0.3},
    {"alpha": 1.0, "min_weight": 0.01, "beta": 0.7},
    {"p_min": 0.01},
    {"p_max": 0.2},
    {"weight_fn": lambda logp: torch.sigmoid(logp + 2.0)},
]
REDUCTIONS = ["mean", "sum", "none", "sequence"]


def _ids(options):
    return ",".join(f"{k}={'fn' if callable(v) else v}" for k, v in options.items()) or "default"


def _value_and_grad(fn, logits):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x)
    gout = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * gout).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("options", WEIGHT_OPTIONS, ids=_ids)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_float64_reference(gen, options, reduction):
    logits, labels = make_batch((3, 17), 1003, generator=gen)
    got, got_grad = _value_and_grad(lambda x: dft.dft_loss(x, labels, reduction=reduction, **options), logits)
    want, want_grad = _value_and_grad(lambda x: ref_dft_loss(x, labels, reduction=reduction, **options), logits)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-10)
    assert got_grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", ["mean", "sequence"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_replaces_denominator(gen, reduction, as_tensor):
    logits, labels = make_batch((4, 9), 31, generator=gen)
    n = 57 if reduction == "mean" else 7
    n_arg = torch.tensor(n) if as_tensor else n
    got = dft.dft_loss(logits, labels, reduction=reduction, num_items_in_batch=n_arg)
    want = ref_dft_loss(logits, labels, reduction=reduction, num_items_in_batch=n)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_alpha_zero_is_cross_entropy(gen, reduction):
    logits, labels = make_batch((64,), 101, generator=gen)
    got, got_grad = _value_and_grad(lambda x: dft.dft_loss(x, labels, alpha=0.0, reduction=reduction), logits)
    want, want_grad = _value_and_grad(lambda x: F.cross_entropy(x, labels, reduction=reduction), logits)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-12)


def test_beta_zero_is_cross_entropy(gen):
    logits, labels = make_batch((40,), 23, generator=gen)
    torch.testing.assert_close(dft.dft_loss(logits, labels, beta=0.0), F.cross_entropy(logits, labels))


def test_gradient_is_p_times_ce_gradient(gen):
    """Detach semantics: d(-sg(p) log p)/dz = p * d(-log p)/dz, token by token."""
    logits, labels = make_batch((50,), 37, ignore_frac=0.0, generator=gen)
    _, g_dft = _value_and_grad(lambda x: dft.dft_loss(x, labels, reduction="sum"), logits)
    _, g_ce = _value_and_grad(lambda x: F.cross_entropy(x, labels, reduction="sum"), logits)
    p = logits.softmax(-1).gather(-1, labels[:, None])
    torch.testing.assert_close(g_dft, p * g_ce, atol=1e-12, rtol=1e-10)
    # and it is NOT the gradient of -p log p (the weight really is detached)
    x = logits.clone().requires_grad_(True)
    logp = x.log_softmax(-1).gather(-1, labels[:, None])
    (-(logp.exp() * logp)).sum().backward()
    assert not torch.allclose(x.grad, g_dft)


@pytest.mark.parametrize("reduction", ["mean", "sequence"])
def test_gradient_accumulation_equals_full_batch(gen, reduction):
    logits, labels = make_batch((8, 13), 29, ignore_frac=0.4, generator=gen)
    labels[3, :] = -100  # an all-masked sequence in one micro-batch
    full = logits.clone().requires_grad_(True)
    dft.dft_loss(full, labels, reduction=reduction).backward()

    valid = labels != -100
    total = int(valid.sum()) if reduction == "mean" else int(valid.any(-1).sum())
    acc = logits.clone().requires_grad_(True)
    for chunk in torch.arange(8).split(2):
        dft.dft_loss(acc[chunk], labels[chunk], reduction=reduction, num_items_in_batch=total).backward()
    torch.testing.assert_close(acc.grad, full.grad, atol=1e-14, rtol=1e-12)
    # the naive mean of per-micro-batch means is different: the test can fail
    naive = logits.clone().requires_grad_(True)
    for chunk in torch.arange(8).split(2):
        (dft.dft_loss(naive[chunk], labels[chunk], reduction=reduction) / 4).backward()
    assert not torch.allclose(naive.grad, full.grad)


def test_gradcheck_float64(gen):
    """gradcheck needs a function whose true derivative is the analytic one: the stop-gradient makes
    d(dft)/dz differ from finite differences, so check CE (alpha=0) and a fixed external weight."""
    logits, labels = make_batch((2, 5), 7, generator=gen)
    x = logits.clone().requires_grad_(True)
    fixed = torch.rand(2, 5, dtype=torch.float64, generator=gen)
    for options in ({"alpha": 0.0}, {"weight_fn": lambda logp: fixed}):
        for reduction in REDUCTIONS:
            fn = functools.partial(dft.dft_loss, labels=labels, reduction=reduction, **options)
            assert torch.autograd.gradcheck(lambda z, fn=fn: fn(z), (x,))
    # and for DFT itself finite differences must NOT agree (the weight is detached): the check can fail
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda z: dft.dft_loss(z, labels), (x,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_is_finite_zero_with_zero_grad(reduction):
    logits = torch.randn(3, 6, 11, dtype=torch.float32, requires_grad=True)
    labels = torch.full((3, 6), -100)
    loss = dft.dft_loss(logits, labels, reduction=reduction)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss == 0).all()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    n0 = dft.dft_loss(logits, labels, num_items_in_batch=0) if reduction == "mean" else loss
    assert torch.isfinite(n0).all()


def test_empty_batch():
    loss = dft.dft_loss(torch.randn(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(torch.bfloat16, 1e-6), (torch.float16, 1e-6), (torch.float32, 1e-6)],
)
def test_low_precision_within_error_budget(gen, dtype, tol):
    """|impl - fp64| <= |naive in the same dtype - fp64| + tol; the result is float32."""
    logits64, labels = make_batch((4, 33), 517, generator=gen)
    logits = logits64.to(dtype)
    exact, exact_grad = _value_and_grad(lambda x: ref_dft_loss(x.double(), labels), logits.double())
    got, got_grad = _value_and_grad(lambda x: dft.dft_loss(x, labels), logits)
    assert got.dtype == torch.float32 and got_grad.dtype == dtype

    def naive(x):  # the same maths carried out in the input dtype
        logp = x.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
        valid = labels != -100
        return -(logp.detach().exp() * logp)[valid].sum() / valid.sum()

    naive_v, naive_grad = _value_and_grad(naive, logits)
    assert abs(got.double() - exact) <= abs(naive_v.double() - exact) + tol
    err = (got_grad.double() - exact_grad).abs().max()
    naive_err = (naive_grad.double() - exact_grad).abs().max()
    assert err <= naive_err + tol + torch.finfo(dtype).eps * exact_grad.abs().max()


def test_token_stats_match_reference(gen):
    logits, labels = make_batch((3, 21), 97, generator=gen)
    got = dft.token_stats(logits.float(), labels).as_dict()
    want = ref_stats(logits, labels)
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=1e-5, abs_tol=1e-6), k
    _, stats = dft.dft_loss(logits, labels, return_stats=True)
    assert stats.num_tokens.item() == (labels != -100).sum().item()
    assert math.isclose(stats.as_dict()["ce"], want["ce"], rel_tol=1e-6)  # stats are float32


def test_token_stats_add_up_over_micro_batches(gen):
    logits, labels = make_batch((6, 8), 19, generator=gen)
    a = dft.token_stats(logits[:2], labels[:2])
    b = dft.token_stats(logits[2:], labels[2:])
    whole = dft.token_stats(logits, labels)
    for k, v in (a + b).as_dict().items():
        assert math.isclose(v, whole.as_dict()[k], rel_tol=1e-6)


def test_causal_shift_matches_manual(gen):
    logits, labels = make_batch((2, 12), 41, generator=gen)
    manual = dft.dft_loss(logits[:, :-1], labels[:, 1:])
    torch.testing.assert_close(dft.causal_dft_loss(logits, labels), manual)
    shifted = dft.shift_causal_labels(labels)
    assert (shifted[:, -1] == -100).all() and torch.equal(shifted[:, :-1], labels[:, 1:])
    torch.testing.assert_close(dft.causal_dft_loss(logits, shift_labels=shifted), manual)
    with pytest.raises(ValueError, match="exactly one"):
        dft.causal_dft_loss(logits, labels, shift_labels=shifted)


def test_compute_loss_func_reads_logits(gen):
    logits, labels = make_batch((2, 12), 41, generator=gen)

    class Out(dict):
        pass

    out = Out(logits=logits)
    fn = functools.partial(dft.compute_loss_func, alpha=0.5)
    got = fn(out, labels, num_items_in_batch=30)
    want = ref_dft_loss(logits[:, :-1], labels[:, 1:], alpha=0.5, num_items_in_batch=30)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dft.compute_loss_func((logits,), labels), dft.causal_dft_loss(logits, labels))


def test_module_forwards_to_function(gen):
    logits, labels = make_batch((3, 5), 13, generator=gen)
    module = dft.DFTLoss(alpha=0.5, min_weight=0.02, reduction="sequence")
    torch.testing.assert_close(
        module(logits, labels), dft.dft_loss(logits, labels, alpha=0.5, min_weight=0.02, reduction="sequence")
    )
    assert "alpha=0.5" in repr(module)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x, y: dft.dft_loss(x, y[:, :-1]), ValueError, r"labels shape \(2, 4\).*\(2, 5\)"),
        (lambda x, y: dft.dft_loss(x, y.float()), TypeError, "integer tensor"),
        (lambda x, y: dft.dft_loss(x, y.bool()), TypeError, "integer tensor"),
        (lambda x, y: dft.dft_loss(x.long(), y), TypeError, "floating-point"),
        (lambda x, y: dft.dft_loss(x, y.clamp_min(0) + 7), ValueError, r"in \[0, 7\)"),
        (lambda x, y: dft.dft_loss(x, y - 200), ValueError, "ignore_index=-100"),
        (lambda x, y: dft.dft_loss(x, y, alpha=-1.0), ValueError, "alpha must be >= 0"),
        (lambda x, y: dft.dft_loss(x, y, beta=1.5), ValueError, "beta must be <= 1"),
        (lambda x, y: dft.dft_loss(x, y, min_weight=float("nan")), ValueError, "min_weight must be finite"),
        (lambda x, y: dft.dft_loss(x, y, p_min=0.5, p_max=0.1), ValueError, "p_min"),
        (lambda x, y: dft.dft_loss(x, y, alpha="1"), TypeError, "alpha must be a float"),
        (lambda x, y: dft.dft_loss(x, y, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda x, y: dft.dft_loss(x[0], y[0], reduction="sequence"), ValueError, r"\[batch, seq_len\]"),
        (lambda x, y: dft.dft_loss(x, y, reduction="sum", num_items_in_batch=3), ValueError, "num_items_in_batch"),
        (lambda x, y: dft.dft_loss(x, y, num_items_in_batch=-1), ValueError, "num_items_in_batch must be >= 0"),
        (lambda x, y: dft.dft_loss(x, y, num_items_in_batch="3"), TypeError, "num_items_in_batch"),
        (lambda x, y: dft.dft_loss(x, y, num_items_in_batch=torch.ones(2)), ValueError, "scalar"),
        (lambda x, y: dft.dft_loss(x, y, weight_fn=lambda lp: lp[:1]), ValueError, "weight_fn must return"),
        (lambda x, y: dft.dft_loss(x, y, weight_fn=3), TypeError, "weight_fn must be callable"),
        (lambda x, y: dft.dft_loss(x.numpy(), y), TypeError, "logits must be a torch.Tensor"),
        (lambda x, y: dft.dft_loss(x, y.tolist()), TypeError, "labels must be a torch.Tensor"),
    ],
)
def test_bad_input_raises_clear_error(call, error, match):
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 0] = -100
    with pytest.raises(error, match=match):
        call(logits, labels)


def test_validate_false_skips_range_check_only():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    dft.dft_loss(logits, labels, validate=False)  # fine
    with pytest.raises(ValueError, match="labels shape"):
        dft.dft_loss(logits, labels[:, :2], validate=False)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq=st.integers(1, 9),
    vocab=st.integers(1, 40),
    alpha=st.sampled_from([0.0, 0.25, 1.0, 3.0]),
    reduction=st.sampled_from(REDUCTIONS),
    seed=st.integers(0, 2**16),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_property_random_shapes_and_masks(batch, seq, vocab, alpha, reduction, seed, ignore_frac):
    g = torch.Generator().manual_seed(seed)
    logits, labels = make_batch((batch, seq), vocab, ignore_frac=ignore_frac, generator=g, scale=4.0)
    got, got_grad = _value_and_grad(lambda x: dft.dft_loss(x, labels, alpha=alpha, reduction=reduction), logits)
    want, want_grad = _value_and_grad(lambda x: ref_dft_loss(x, labels, alpha=alpha, reduction=reduction), logits)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-10)
    # DFT never exceeds CE token by token (w <= 1), and both are >= 0
    ce = dft.dft_loss(logits, labels, alpha=0.0, reduction="none")
    per = dft.dft_loss(logits, labels, alpha=alpha, reduction="none")
    assert (per >= 0).all() and (per <= ce + 1e-12).all()
    assert (per[labels == -100] == 0).all()


def test_logits_path_supports_double_backward_and_torch_func():
    """The logits path is where the fused head's error sends double backward and torch.func: the gradient
    equals the float64 reference's, and so do a Hessian-vector product, torch.func.grad and per-row vmap."""
    torch.manual_seed(0)
    z = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (2, 5))
    y[0, :2] = -100
    (g,) = torch.autograd.grad(dft.dft_loss(z, y), z, create_graph=True)
    (g_ref,) = torch.autograd.grad(ref_dft_loss(z, y), z, create_graph=True)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)
    v = torch.randn_like(z)
    (hvp,) = torch.autograd.grad((g * v).sum(), z)
    (hvp_ref,) = torch.autograd.grad((g_ref * v).sum(), z)
    assert hvp.abs().max() > 1e-3  # a real second derivative, not zeros
    torch.testing.assert_close(hvp, hvp_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.func.grad(lambda x: dft.dft_loss(x, y))(z.detach()), g_ref, atol=1e-12, rtol=0)
    per_row = torch.func.vmap(torch.func.grad(lambda x, t: dft.dft_loss(x, t, validate=False)))(z.detach(), y)
    want = torch.stack([torch.autograd.grad(ref_dft_loss(z[i : i + 1], y[i : i + 1]), z)[0][i] for i in range(2)])
    torch.testing.assert_close(per_row, want, atol=1e-12, rtol=0)
