import pytest
import torch
import torch.nn.functional as F

import dft
from dft.fused import auto_chunk_size, budget_for_memory, linear_dft_loss
from tests.helpers.reference import ref_dft_loss, ref_stats

HEAD_OPTIONS = [
    {},
    {"logit_scale": 0.7},
    {"softcap": 3.0},
    {"temperature": 1.7},
    {"softcap": 2.5, "logit_scale": 1.3, "temperature": 0.8},
]
WEIGHT_OPTIONS = [
    {},
    {"alpha": 0.0},
    {"alpha": 0.5, "min_weight": 0.05, "beta": 0.7},
    {"p_min": 0.01, "p_max": 0.9},
    {"weight_fn": lambda logp: torch.sigmoid(logp + 3.0)},
]
REDUCTIONS = ["mean", "sum", "none", "sequence"]


def _ids(options):
    return ",".join(f"{k}={'fn' if callable(v) else v}" for k, v in options.items()) or "default"


def make_head(batch, seq, hidden, vocab, *, dtype=torch.float64, ignore_frac=0.2, bias=True, generator=None):
    h = torch.randn(batch, seq, hidden, dtype=torch.float64, generator=generator)
    w = torch.randn(vocab, hidden, dtype=torch.float64, generator=generator) * (3.0 / hidden**0.5)
    b = torch.randn(vocab, dtype=torch.float64, generator=generator) if bias else None
    y = torch.randint(0, vocab, (batch, seq), generator=generator)
    y[torch.rand(batch, seq, generator=generator) < ignore_frac] = -100

    def cast(t):
        return None if t is None else t.to(dtype).requires_grad_(True)

    return cast(h), cast(w), cast(b), y


def reference_logits(h, w, b, logit_scale=1.0, softcap=None, temperature=1.0):
    z = F.linear(h, w, b) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _grads(loss, tensors):
    out = loss
    gout = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    params = [t for t in tensors if t is not None]
    return torch.autograd.grad((out * gout).sum(), params)


@pytest.mark.parametrize("head", HEAD_OPTIONS, ids=_ids)
@pytest.mark.parametrize("weighting", WEIGHT_OPTIONS, ids=_ids)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_equals_reference_on_materialised_logits_float64(gen, head, weighting, reduction):
    """Against the naive float64 reference of tests/helpers/reference.py (log_softmax + gather, no dft code)."""
    h, w, b, y = make_head(3, 11, 16, 1003, generator=gen)
    got = dft.linear_dft_loss(h, w, y, bias=b, reduction=reduction, chunk_size=7, **head, **weighting)
    want = ref_dft_loss(reference_logits(h, w, b, **head), y, reduction=reduction, **weighting)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    for g_got, g_want in zip(_grads(got, (h, w, b)), _grads(want, (h, w, b))):
        torch.testing.assert_close(g_got, g_want, atol=1e-9, rtol=1e-9)


def test_matches_independent_reference(gen):
    """Also against the naive float64 reference of tests/reference.py (not only against dft_loss)."""
    h, w, b, y = make_head(2, 9, 8, 57, generator=gen)
    got = dft.linear_dft_loss(h, w, y, bias=b, chunk_size=4)
    want = ref_dft_loss(F.linear(h, w, b), y)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    for g1, g2 in zip(_grads(got, (h, w, b)), _grads(want, (h, w, b))):
        torch.testing.assert_close(g1, g2, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float32_relative_1e5(gen, reduction):
    h, w, b, y = make_head(2, 33, 32, 517, dtype=torch.float32, generator=gen)
    got = dft.linear_dft_loss(h, w, y, bias=b, reduction=reduction)
    want = dft.dft_loss(F.linear(h, w, b), y, reduction=reduction)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for g1, g2 in zip(_grads(got, (h, w, b)), _grads(want, (h, w, b))):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 10_000, None])
def test_chunk_size_does_not_change_result(gen, chunk_size):
    h, w, b, y = make_head(2, 13, 8, 41, generator=gen)
    base = dft.linear_dft_loss(h, w, y, bias=b, chunk_size=3)
    got = dft.linear_dft_loss(h, w, y, bias=b, chunk_size=chunk_size)
    torch.testing.assert_close(got, base, atol=1e-12, rtol=1e-12)


def test_gradcheck_float64(gen):
    """Fixed external weight: then the analytic gradient must equal finite differences (also CE)."""
    h, w, b, y = make_head(2, 3, 4, 6, generator=gen)
    fixed = torch.rand(2, 3, dtype=torch.float64, generator=gen)
    for options in ({"alpha": 0.0}, {"weight_fn": lambda logp: fixed.reshape(-1)[: logp.numel()]}):
        for reduction in REDUCTIONS:
            for head in ({}, {"softcap": 2.0, "logit_scale": 1.5, "temperature": 0.7}):

                def fn(h, w, b, options=options, reduction=reduction, head=head):
                    return dft.linear_dft_loss(h, w, y, bias=b, reduction=reduction, chunk_size=2, **head, **options)

                assert torch.autograd.gradcheck(fn, (h, w, b))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_is_zero_with_zero_grads(gen, reduction):
    h, w, b, y = make_head(2, 5, 8, 17, dtype=torch.float32, generator=gen)
    y[:] = -100
    loss = dft.linear_dft_loss(h, w, y, bias=b, reduction=reduction)
    gh, gw, gb = _grads(loss, (h, w, b))
    assert torch.isfinite(loss).all() and (loss == 0).all()
    assert not gh.any() and not gw.any() and not gb.any()


def test_frozen_weight_and_frozen_hidden(gen):
    h, w, b, y = make_head(2, 7, 8, 29, bias=False, generator=gen)
    w_frozen = w.detach()
    loss = dft.linear_dft_loss(h, w_frozen, y)
    (gh,) = torch.autograd.grad(loss, h)
    want = dft.dft_loss(F.linear(h, w_frozen), y)
    (gh_want,) = torch.autograd.grad(want, h)
    torch.testing.assert_close(gh, gh_want)
    h_frozen = h.detach()
    loss = dft.linear_dft_loss(h_frozen, w, y)
    (gw,) = torch.autograd.grad(loss, w)
    (gw_want,) = torch.autograd.grad(dft.dft_loss(F.linear(h_frozen, w), y), w)
    torch.testing.assert_close(gw, gw_want)


def test_no_grad_forward_only(gen):
    h, w, b, y = make_head(2, 7, 8, 29, generator=gen)
    with torch.no_grad():
        loss = dft.linear_dft_loss(h, w, y, bias=b)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, dft.dft_loss(F.linear(h, w, b), y).detach())


def test_upstream_scale_reaches_gradients(gen):
    """Backward scales the gradients formed in forward by the upstream gradient (e.g. 1/accum steps)."""
    h, w, b, y = make_head(2, 7, 8, 29, generator=gen)
    g1 = torch.autograd.grad(dft.linear_dft_loss(h, w, y, bias=b) * 0.25, (h, w, b))
    g2 = torch.autograd.grad(dft.dft_loss(F.linear(h, w, b), y) * 0.25, (h, w, b))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


def test_gradient_accumulation_equals_full_batch(gen):
    h, w, b, y = make_head(8, 6, 8, 23, ignore_frac=0.5, generator=gen)
    full = torch.autograd.grad(dft.linear_dft_loss(h, w, y, bias=b), (h, w, b))
    total = int((y != -100).sum())
    acc = [torch.zeros_like(t) for t in (h, w, b)]
    for rows in torch.arange(8).split(3):
        grads = torch.autograd.grad(
            dft.linear_dft_loss(h[rows], w, y[rows], bias=b, num_items_in_batch=total), (h, w, b)
        )
        for a, g in zip(acc, grads):
            a += g
    for a, g in zip(acc, full):
        torch.testing.assert_close(a, g, atol=1e-13, rtol=1e-11)


def test_return_stats_match_reference(gen):
    h, w, b, y = make_head(3, 17, 16, 211, generator=gen)
    loss, stats = dft.linear_dft_loss(h, w, y, bias=b, return_stats=True, chunk_size=5)
    want = ref_stats(F.linear(h, w, b), y)
    for k, v in stats.as_dict().items():
        assert v == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    assert stats.num_tokens.item() == int((y != -100).sum())
    torch.testing.assert_close(loss, dft.linear_dft_loss(h, w, y, bias=b))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
def test_low_precision_within_error_budget(gen, dtype, tol):
    """|fused - fp64| <= |naive in the same dtype - fp64| + tol, for the value and every gradient."""
    h64, w64, b64, y = make_head(2, 40, 64, 1003, generator=gen)
    h, w, b = (t.detach().to(dtype).requires_grad_(True) for t in (h64, w64, b64))
    hd, wd, bd = (t.detach().double().requires_grad_(True) for t in (h, w, b))
    exact = ref_dft_loss(F.linear(hd, wd, bd), y)
    exact_grads = torch.autograd.grad(exact, (hd, wd, bd))

    fused = dft.linear_dft_loss(h, w, y, bias=b)
    fused_grads = torch.autograd.grad(fused, (h, w, b))
    naive = dft.dft_loss(F.linear(h, w, b), y)
    naive_grads = torch.autograd.grad(naive, (h, w, b))
    assert fused.dtype == torch.float32
    assert abs(fused.double() - exact) <= abs(naive.double() - exact) + tol
    for f, n, e in zip(fused_grads, naive_grads, exact_grads):
        assert f.dtype == dtype
        scale = e.abs().max()
        assert (f.double() - e).abs().max() <= (n.double() - e).abs().max() + tol * scale + torch.finfo(
            dtype
        ).eps * scale


def test_autocast_runs_matmuls_in_autocast_dtype(gen):
    """float32 inputs under CPU bf16 autocast: the logits and dh matmuls take bf16 operands (as F.linear would),
    dW accumulates in float32 (CPU has no bf16 GEMM into float32); without autocast they stay float32."""
    h, w, b, y = make_head(2, 9, 16, 53, dtype=torch.float32, bias=False, generator=gen)
    with _MatmulDtypes(53) as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dft.linear_dft_loss(h, w, y)
    head = [dtypes for name, dtypes in rec.calls if name != "addmm_"]
    dw = [dtypes for name, dtypes in rec.calls if name == "addmm_"]
    assert len(head) >= 2 and len(dw) >= 1, rec.calls
    assert all(dtypes == (torch.bfloat16,) * 2 for dtypes in head), rec.calls
    assert all(dtypes == (torch.float32,) * 3 for dtypes in dw), rec.calls
    with _MatmulDtypes(53) as rec:
        dft.linear_dft_loss(h, w, y)
    assert rec.calls and all(dtype == torch.float32 for _, dtypes in rec.calls for dtype in dtypes), rec.calls
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == gh.dtype == gw.dtype == torch.float32
    want = ref_dft_loss(F.linear(h.double(), w.double()), y)
    torch.testing.assert_close(loss.double(), want.detach(), atol=1e-2, rtol=1e-2)


def test_module_form(gen):
    h, w, b, y = make_head(2, 5, 8, 19, generator=gen)
    module = dft.LinearDFTLoss(alpha=0.5, softcap=4.0)
    torch.testing.assert_close(module(h, w, y, b), dft.linear_dft_loss(h, w, y, bias=b, alpha=0.5, softcap=4.0))
    with pytest.raises(ValueError, match="softcap"):
        dft.LinearDFTLoss(softcap=-1.0)


def test_auto_chunk_size_bounds():
    assert auto_chunk_size(128256) < auto_chunk_size(32000)
    assert 16 <= auto_chunk_size(10**9) and auto_chunk_size(1) <= 8192
    # the working set is the path's bytes per logit times the budget: bf16 logits on an 80 GB GPU
    h100 = budget_for_memory(80 * 10**9)
    assert 256 * 2**20 <= h100 <= 2 * 2**30 and budget_for_memory(10**9) == 256 * 2**20
    assert auto_chunk_size(151936, h100, bytes_per_logit=2) >= 2048  # dW's [V, H] traffic amortised
    assert auto_chunk_size(151936, h100, bytes_per_logit=14) < auto_chunk_size(151936, h100, bytes_per_logit=2)
    for rows in (1, 17, 1000, 5734, 8192, 100_000):  # equal chunks: never a short tail (a recompile, a thin GEMM)
        size = auto_chunk_size(32000, rows=rows)
        k = -(-rows // size)
        assert size <= auto_chunk_size(32000) and rows - (k - 1) * size >= size - k + 1, (rows, size)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"weight": torch.randn(11, 5)},
            ValueError,
            r"hidden must have shape \[..., H\] with H = weight.shape\[1\] = 5",
        ),
        ({"weight": torch.randn(11)}, ValueError, r"weight must have shape \[V, H\]"),
        ({"bias": torch.randn(10)}, ValueError, r"bias must have shape \[V\] = \(11,\)"),
        ({"weight": torch.randn(11, 4, dtype=torch.float64)}, TypeError, "share a dtype"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, ValueError, r"labels shape \(3,\).*hidden shape"),
        ({"labels": torch.full((2, 3), 11)}, ValueError, r"in \[0, 11\)"),
        ({"labels": torch.zeros(2, 3)}, TypeError, "integer tensor"),
        ({"hidden": torch.zeros(2, 3, 4, dtype=torch.long)}, TypeError, "hidden must be a floating-point"),
        ({"softcap": 0.0}, ValueError, "softcap must be a finite number > 0"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"logit_scale": float("inf")}, ValueError, "logit_scale"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"alpha": -0.5}, ValueError, "alpha must be >= 0"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {
        "hidden": torch.randn(2, 3, 4),
        "weight": torch.randn(11, 4),
        "labels": torch.randint(0, 11, (2, 3)),
    }
    for k in ("hidden", "weight", "labels"):
        if k in kwargs:
            args[k] = kwargs.pop(k)
    with pytest.raises(error, match=match):
        dft.linear_dft_loss(args["hidden"], args["weight"], args["labels"], **kwargs)


class _MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the input dtypes of every matmul that touches a dimension of size ``dim``."""

    def __init__(self, dim):
        super().__init__()
        self.dim, self.seen, self.calls = dim, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if any(self.dim in t.shape for t in tensors):
                self.seen.append(tuple(t.dtype for t in tensors))
                self.calls.append((func.overloadpacket.__name__, self.seen[-1]))
        return func(*args, **(kwargs or {}))


def test_no_gradient_work_under_no_grad(gen):
    """Under torch.no_grad() (every evaluate()), only the logits matmul runs, even if W requires grad."""
    h, w, _, y = make_head(2, 16, 8, 37, dtype=torch.float32, bias=False, generator=gen)
    with _MatmulDtypes(37) as rec, torch.no_grad():
        loss = dft.linear_dft_loss(h, w, y, chunk_size=8)
    n_chunks = -(-int((y != -100).sum()) // 8)
    assert len(rec.seen) == n_chunks  # one matmul per chunk, no dh/dW matmuls
    with _MatmulDtypes(37) as rec:
        again = dft.linear_dft_loss(h, w, y, chunk_size=8)
    assert len(rec.seen) == 3 * n_chunks
    torch.testing.assert_close(loss, again.detach())


def test_negative_weights_from_weight_fn_are_exact(gen):
    """A weight_fn may return negative weights (e.g. unlikelihood terms): fused == materialised, finite."""
    h, w, b, y = make_head(2, 9, 8, 23, generator=gen)
    fn = lambda logp: logp.exp() - 0.5  # noqa: E731 - negative for p < 0.5
    fused = dft.linear_dft_loss(h, w, y, bias=b, weight_fn=fn)
    naive = dft.dft_loss(reference_logits(h, w, b), y, weight_fn=fn)
    torch.testing.assert_close(fused, naive)
    for a, r in zip(_grads(fused, [h, w, b]), _grads(naive, [h, w, b])):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("accum", [1, 8])
def test_fp16_loss_scale_keeps_small_gradients(accum):
    """fp16 under a 65536 GradScaler-style scale: gradients formed in the forward (c = 1/num_items) must
    not underflow before the scale is applied. Budget: within 2x of the materialised fp16 path."""
    g = torch.Generator().manual_seed(0)
    n, hid, vocab, scale = 512, 64, 2003, 65536.0
    h = torch.randn(n, hid, dtype=torch.float64, generator=g)
    w = torch.randn(vocab, hid, dtype=torch.float64, generator=g) * (2 / hid**0.5)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.25] = -100
    num = int((y != -100).sum()) * accum  # the step's count over `accum` micro-batches

    def grads(fn, dtype):
        hh, ww = h.to(dtype).detach().requires_grad_(), w.to(dtype).detach().requires_grad_()
        (fn(hh, ww) * scale).backward()
        return hh.grad.double() / scale, ww.grad.double() / scale

    ref = grads(lambda a, b: dft.linear_dft_loss(a, b, y, num_items_in_batch=num), torch.float64)
    fused = grads(lambda a, b: dft.linear_dft_loss(a, b, y, num_items_in_batch=num), torch.float16)
    naive = grads(lambda a, b: dft.dft_loss(F.linear(a, b), y, num_items_in_batch=num), torch.float16)
    for got, mat, exact in zip(fused, naive, ref):
        err, budget = (got - exact).norm() / exact.norm(), (mat - exact).norm() / exact.norm()
        assert err <= 2 * budget + 1e-5, (err.item(), budget.item())


@pytest.fixture
def compiled_epilogue(monkeypatch):
    from dft import epilogue

    monkeypatch.setenv("DFT_COMPILE_EPILOGUE", "1")
    monkeypatch.setattr(epilogue, "_compiled", None)
    monkeypatch.setattr(epilogue, "_compile_failed", False)
    return epilogue


@pytest.mark.parametrize(
    "options",
    [{}, {"softcap": 3.0, "alpha": 0.5}, {"weight_fn": lambda lp: lp.exp() - 0.3}, {"asft": True, "softcap": 5.0}],
)
def test_compiled_epilogue_equals_eager(gen, compiled_epilogue, options):
    """Inductor's fused epilogue == eager to 1e-6 (float32), values, stats and gradients; no recompile per step."""
    import warnings

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    h, w, b, y = make_head(4, 64, 16, 1003, dtype=torch.float32, generator=gen)
    options = dict(options)
    if options.pop("asft", False):
        options.update(ref_hidden=h.detach() * 0.9, ref_weight=w.detach() + 0.01, kl_coef=0.2)
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure must not pass silently here
        for mode in ("1", "0"):
            compiled_epilogue.os.environ["DFT_COMPILE_EPILOGUE"] = mode
            loss, stats = dft.linear_dft_loss(h, w, y, bias=b, chunk_size=48, return_stats=True, **options)
            results.append((loss, stats.ce, stats.entropy, stats.kl, *_grads(loss, [h, w, b])))
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really compiled
    compiled_epilogue.os.environ["DFT_COMPILE_EPILOGUE"] = "1"

    flat_h, flat_y = h.reshape(-1, h.shape[-1]), y.reshape(-1)

    def step(rows):  # the first `rows` tokens
        opts = {k: v.reshape(-1, v.shape[-1])[:rows] if k == "ref_hidden" else v for k, v in options.items()}
        dft.linear_dft_loss(flat_h[:rows], w, flat_y[:rows], bias=b, chunk_size=48, **opts).backward()

    step(100)  # the training call's graphs (no stats)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for rows in (3, 4, 2, 1, 62, 97):  # more steps, other numbers of rows, a 1-row tail chunk: no new graphs
        step(rows)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_asft_kl_float32_under_bf16_autocast():
    """ASFT's per-token KL under bf16 autocast is computed in float32 from the bf16 logits: within 1e-3
    relative of float64 on the same logits (a bf16 row dot product gave -0.017..0.024 for a true 0.0012)."""
    g = torch.Generator().manual_seed(0)
    n, hid, vocab = 64, 32, 3001
    h = torch.randn(n, hid, generator=g)
    w = torch.randn(vocab, hid, generator=g) * (4 / hid**0.5)
    h_ref, w_ref = h + 0.01 * torch.randn(n, hid, generator=g), w + 0.01 * torch.randn(vocab, hid, generator=g)
    y = torch.randint(0, vocab, (n,), generator=g)
    with torch.autocast("cpu", torch.bfloat16):
        _, stats = dft.linear_dft_loss(
            h, w, y, ref_hidden=h_ref, ref_weight=w_ref, kl_coef=0.1, return_stats=True, chunk_size=16
        )
        z, r = F.linear(h, w).double(), F.linear(h_ref, w_ref).double()  # the same bf16 logits
    kl = (r.softmax(-1) * (r.log_softmax(-1) - z.log_softmax(-1))).sum(-1).mean()
    assert 1e-4 < kl < 1e-2  # a realistic ASFT KL
    assert abs(stats.kl.double() - kl) <= 1e-3 * kl, (stats.kl.item(), kl.item())


class _SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that wait for the device: ``.item()``/``bool()`` (``_local_scalar_dense``), ``nonzero``."""

    SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.equal", "aten.is_nonzero")

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in self.SYNCS or func.overloadpacket.__name__ in ("_local_scalar_dense", "nonzero"):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("asft", [False, True])
def test_one_host_sync_per_call(gen, asft):
    """Forward + backward of the fused head (stats on, labels validated, masked rows, an int num_items) wait
    for the device once: the supervised rows' nonzero, which also carries the label range check."""
    h, w, b, y = make_head(2, 40, 16, 301, dtype=torch.float32, generator=gen)
    ref = {"ref_hidden": h.detach() + 0.1, "ref_weight": w.detach(), "kl_coef": 0.1} if asft else {}
    with _SyncCounter() as counter:
        loss, stats = dft.linear_dft_loss(
            h, w, y, bias=b, num_items_in_batch=123, chunk_size=16, return_stats=True, **ref
        )
        loss.backward()
    assert counter.syncs == ["aten.nonzero.default"], counter.syncs
    y_bad = y.clone()
    y_bad[1, 3] = 301
    with pytest.raises(ValueError, match="labels must be in \\[0, 301\\).*found 301"):
        dft.linear_dft_loss(h, w, y_bad, bias=b)


def test_compile_guard_catches_only_compile_errors(gen, monkeypatch):
    """A compile error falls back to eager with one warning; any other error (an OOM) propagates and
    leaves compilation on."""
    from torch._dynamo.exc import BackendCompilerFailed

    from dft import epilogue

    h, w, b, y = make_head(2, 8, 16, 101, dtype=torch.float32, generator=gen)

    def failing(exc):
        def run(*args):
            raise exc

        return epilogue._guarded(run, epilogue.reduce)

    monkeypatch.setattr(epilogue, "_compile_failed", False)
    oom = epilogue.Epilogue(failing(torch.OutOfMemoryError("CUDA out of memory")), *epilogue.EAGER[1:])
    monkeypatch.setattr(epilogue, "epilogue_for", lambda *a: oom)
    monkeypatch.setattr(dft.fused, "epilogue_for", lambda *a: oom)
    with pytest.raises(torch.OutOfMemoryError):
        dft.linear_dft_loss(h, w, y, bias=b)
    assert not epilogue._compile_failed
    broken = epilogue.Epilogue(
        failing(BackendCompilerFailed("inductor", RuntimeError("no cxx"), None)), *epilogue.EAGER[1:]
    )
    monkeypatch.setattr(dft.fused, "epilogue_for", lambda *a: broken)
    with pytest.warns(RuntimeWarning, match="compiling the fused head's epilogue failed"):
        loss = dft.linear_dft_loss(h, w, y, bias=b)
    assert epilogue._compile_failed
    torch.testing.assert_close(loss.double(), ref_dft_loss(F.linear(h, w, b).double(), y), atol=1e-6, rtol=1e-5)


def test_autograd_limits_are_clear_errors():
    """Gradients are formed in the forward pass: double backward, torch.func and a weight changed in place
    between forward and backward get one clear error each (never gradients of the old weight)."""
    hidden = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 2, 3, -100, 4, 5])
    loss = linear_dft_loss(hidden, weight, labels)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(loss, hidden, create_graph=True)
    loss = linear_dft_loss(hidden, weight, labels)
    with torch.no_grad():
        weight.add_(0.1)  # e.g. optimizer.step() before backward
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda h: linear_dft_loss(h, weight.detach(), labels))(hidden.detach())
    hidden.grad = weight.grad = None
    loss = linear_dft_loss(hidden, weight, labels)  # unchanged weight: fine, the gradients of this weight
    loss.backward()
    h64, w64 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    want = torch.autograd.grad(ref_dft_loss(F.linear(h64, w64), labels), (h64, w64))
    torch.testing.assert_close(hidden.grad, want[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(weight.grad, want[1], atol=1e-12, rtol=1e-10)
