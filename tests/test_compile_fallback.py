"""The CUDA default path, forced on CPU: the compiled epilogue (``DFT_COMPILE_EPILOGUE=1``), its fallbacks, the chunk
plan each epilogue runs on, and the dW update paths a GPU takes.

On CUDA the epilogue is compiled by default; here it is compiled only when forced. Every compile-time failure (the
recompile limit included) must fall back to eager with one warning and equal results, and the call that fell back
must run on chunks planned for the eager epilogue (whose float32 temporaries the compiled one does not have).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dft
from dft import epilogue, fused
from tests.helpers.reference import ref_dft_loss


def _head(n, hidden, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * (2.0 / hidden**0.5)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.2] = -100
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), y


def _run(h, w, y, **kw):
    h.grad = w.grad = None
    out = dft.linear_dft_loss(h, w, y, **kw)
    loss = out[0] if isinstance(out, tuple) else out  # return_stats=True: (loss, stats)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


@pytest.fixture
def forced(monkeypatch):
    """DFT_COMPILE_EPILOGUE=1 with a fresh compile state; dynamo's caches reset before and after."""
    monkeypatch.setenv("DFT_COMPILE_EPILOGUE", "1")
    monkeypatch.setattr(epilogue, "_compiled", None)
    monkeypatch.setattr(epilogue, "_compile_failed", False)
    monkeypatch.setattr(fused, "_COMPILED_VARIANTS", set())
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def plans(monkeypatch):
    """Each _run_plan call of the fused head: (compiled epilogue?, rows per chunk)."""
    seen = []
    real = fused._run_plan

    def record(plan, ep, chunk, *args):
        seen.append((ep.compiled, chunk))
        return real(plan, ep, chunk, *args)

    monkeypatch.setattr(fused, "_run_plan", record)
    return seen


def test_recompile_limit_falls_back_to_eager(forced, monkeypatch):
    """With recompile_limit = 1, four calls that need new graphs (dtype, stats, softcap, autocast) give the eager
    results, with one warning; the compiled first call really compiled."""
    h32, w32, y = _head(24, 16, 257, torch.float32)
    calls = [
        (h32, w32, {}, None),
        (h32.detach().double().requires_grad_(), w32.detach().double().requires_grad_(), {}, None),  # dtype
        (h32, w32, {"return_stats": True}, None),  # stats flag
        (h32, w32, {"softcap": 3.0}, None),  # softcap
        (h32, w32, {}, torch.bfloat16),  # autocast state
    ]
    got = []
    with warnings.catch_warnings(record=True) as caught, torch._dynamo.config.patch(recompile_limit=1):
        warnings.simplefilter("always")
        for h, w, kw, autocast in calls:
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                got.append(_run(h, w, y, **kw))
    fell_back = [w for w in caught if "compiling the fused head's epilogue failed" in str(w.message)]
    assert len(fell_back) == 1 and "RecompileLimit" in str(fell_back[0].message)
    assert epilogue._compile_failed
    monkeypatch.setenv("DFT_COMPILE_EPILOGUE", "0")
    for (h, w, kw, autocast), out in zip(calls, got):
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            eager = _run(h, w, y, **kw)
        for a, b in zip(out, eager):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def _failing_compiled(counter):
    """An epilogue whose compiled passes fail to compile (as inductor raising would), priced as the compiled one."""
    from torch._dynamo.exc import BackendCompilerFailed

    def fail(*args):
        counter.append(1)
        raise BackendCompilerFailed("inductor", RuntimeError("made to fail"), None)

    return epilogue.Epilogue(
        epilogue._guarded(fail, epilogue.reduce),
        epilogue._guarded(fail, epilogue.ref_reduce),
        epilogue._guarded(fail, epilogue.grad_),
        temp_bytes_per_logit=0,
        compiled=True,
    )


def test_compile_failure_reruns_the_call_on_the_eager_plan(forced, monkeypatch, plans):
    """Inductor failing on the first call: that call starts again on chunks planned for the eager epilogue
    (never eager passes on chunks sized for the compiled one), with one warning and the eager result."""
    tried = []
    monkeypatch.setattr(fused, "epilogue_for", lambda *a: _failing_compiled(tried) if not tried else epilogue.EAGER)
    monkeypatch.setattr(fused, "chunk_budget_bytes", lambda device: 2**20)  # eager: several chunks here
    h, w, y = _head(200, 16, 1003, torch.float32)
    blocks = []  # rows of each [C, V] block the passes saw
    real_reduce = fused._reduce_chunk
    monkeypatch.setattr(
        fused, "_reduce_chunk", lambda plan, p, z, *a: blocks.append(z.shape[0]) or real_reduce(plan, p, z, *a)
    )
    with pytest.warns(RuntimeWarning, match="compiling the fused head's epilogue failed"):
        out = _run(h, w, y)
    compiled_rows = fused.default_chunk_size(1003, int((y != -100).sum()), h.device, h.dtype, _failing_compiled([]))
    eager_rows = fused.default_chunk_size(1003, int((y != -100).sum()), h.device, h.dtype, epilogue.EAGER)
    assert compiled_rows > eager_rows
    assert plans[:2] == [(True, compiled_rows), (False, eager_rows)], plans
    assert len(tried) == 1  # the failing pass never ran
    assert max(blocks) <= eager_rows  # not even the failed attempt held a block larger than the eager plan's
    exact = ref_dft_loss(F.linear(h.detach().double(), w.detach().double()), y)
    torch.testing.assert_close(out[0], exact, atol=1e-6, rtol=1e-5)
    monkeypatch.setattr(fused, "epilogue_for", lambda *a: epilogue.EAGER)
    for a, b in zip(out, _run(h, w, y)):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_a_runtime_error_of_the_compiled_pass_is_not_retried(forced, monkeypatch):
    """An error that is not a compile error (an OOM while the pass runs) propagates: nothing runs twice."""
    calls = []

    def oom(*args):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory")

    broken = epilogue.Epilogue(epilogue._guarded(oom, epilogue.reduce), *epilogue.EAGER[1:3], 0, True)
    monkeypatch.setattr(fused, "epilogue_for", lambda *a: broken)
    h, w, y = _head(16, 8, 101, torch.float32)
    with pytest.raises(torch.OutOfMemoryError):
        _run(h, w, y)
    assert calls == [1] and not epilogue._compile_failed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_equals_eager_in_low_precision(forced, monkeypatch, dtype):
    """The CUDA default's dtypes through inductor (its CPU backend here): compiled == eager within rounding."""
    h, w, y = _head(64, 32, 515, dtype, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure must not pass silently
        compiled = _run(h, w, y, chunk_size=32, softcap=5.0)
        assert epilogue._compiled is not None and not epilogue._compile_failed
    monkeypatch.setenv("DFT_COMPILE_EPILOGUE", "0")
    eager = _run(h, w, y, chunk_size=32, softcap=5.0)
    for a, b in zip(compiled, eager):
        assert (a - b).norm() <= 2e-2 * b.norm() + 1e-6, (dtype, (a - b).norm().item(), b.norm().item())


def test_dw_paths_by_path_alone(monkeypatch):
    """Each dW path gives the same accumulation; product_add (a CUDA fallback) is reachable here and warns."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 40, generator=g).to(torch.bfloat16)  # [C, V]
    h = torch.randn(9, 8, generator=g).to(torch.bfloat16)  # [N, H]
    a, b = z.t(), h[2:8]
    inv_scale = torch.tensor(0.25)
    exact = torch.ones(40, 8, dtype=torch.float64) + (a.double() @ b.double()) * 0.25
    results = {}
    for path in ("upcast_addmm_", "product_add"):
        monkeypatch.setattr(fused, "dw_update_path", lambda *args, _p=path: _p)
        acc = torch.ones(40, 8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused._LOGGED_PATHS.clear()
            fused._mm_into(acc, a, b, inv_scale)
        results[path] = acc
        warned = [w for w in caught if "float32 [V, H] product per chunk" in str(w.message)]
        assert len(warned) == (path == "product_add")
        torch.testing.assert_close(acc.double(), exact, atol=1e-5, rtol=1e-5)


def test_dw_probe_layout_and_failure(monkeypatch):
    """The probe runs the real call's layout (transposed block, row slice, alpha); a failing kernel means False."""
    assert fused._probe_addmm_out_dtype(torch.device("cpu"), torch.float32) in (True, False)  # runs, exact check

    def refuse(*args, **kwargs):
        raise RuntimeError("out_dtype is not supported")

    monkeypatch.setattr(torch, "addmm", refuse)
    assert fused._probe_addmm_out_dtype(torch.device("cpu"), torch.bfloat16) is False


def test_eaft_bytes_are_in_the_plan():
    """EAFT's float32 copy of the (transformed) logits is counted on either epilogue: fewer rows per chunk."""
    cpu = torch.device("cpu")
    for ep in (epilogue.EAGER, _failing_compiled([])):
        plain = fused.default_chunk_size(151936, 8192, cpu, torch.bfloat16, ep)
        eaft = fused.default_chunk_size(151936, 8192, cpu, torch.bfloat16, ep, eaft=True)
        capped = fused.default_chunk_size(
            151936, 8192, cpu, torch.bfloat16, ep, transform=dft.LogitTransform(softcap=30.0), eaft=True
        )
        assert capped < eaft < plain, (ep.compiled, plain, eaft, capped)


def test_vocabulary_shard_ranks_keep_one_plan(tmp_path):
    """2 gloo ranks: one rank's compile fails, the other's does not; with validate=False both run the eager
    path's plan (no hang), equal to the float64 reference; different chunk_size per rank is one clear error."""
    from tests.dist.launch import run_bounded

    worker = Path(__file__).parent / "dist" / "plan_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    run_bounded([*cmd, str(tmp_path)], timeout=180)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    plans = [r["fallback"]["plans"] for r in ranks]
    assert [p[-1][1] for p in plans] == [plans[0][-1][1]] * 2  # the same rows per chunk on both ranks
    assert plans[0] == plans[1] and len(plans[0]) == 1  # planned once, for eager passes, no restart
    supervised = int((ranks[0]["reference"]["dh"].abs().sum(-1) > 0).sum())
    assert plans[0][0][1] < supervised  # several chunks: several all_gathers that had to pair up
    assert ranks[0]["fallback"]["failed"] and not ranks[1]["fallback"]["failed"]
    ref = ranks[0]["reference"]
    for r in ranks:
        f = r["fallback"]
        torch.testing.assert_close(f["loss"], ref["loss"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(f["dh"], ref["dh"], atol=1e-6, rtol=1e-5)
        start, stop = f["rows"]
        torch.testing.assert_close(f["dw_rows"], ref["dw"][start:stop], atol=1e-6, rtol=1e-5)
        assert "rank 0: chunk_size=16, rank 1: chunk_size=32" in r["mismatch"]
