"""The elementwise passes of the fused head over one chunk of logits ``z [C, V]``: eager, or compiled.

Per chunk the fused head runs three matmuls and, between them, these passes over ``z`` (the first
matmul's output, in the matmul dtype; ``u = transform(float(z))`` is computed on the fly):

* ``reduce(z)``: ``m = max_v u``, ``s = sum_v exp(u - m)``, and with stats ``argmax_v u`` and
  ``t = sum_v exp(u - m) (u - m)``: so ``lse = m + log s`` and the entropy ``H = log s - t / s``.
* ``ref_reduce(r, z)`` (ASFT): over the reference logits ``r`` (``q = softmax(r_u)``): ``m_r``, ``s_r`` and
  ``d = sum_v exp(r_u - m_r) (r_u - u)``, so that ``KL(q || p) = d / s_r + (m - m_r) + log s - log s_r``
  is formed from differences of small numbers (float32 accuracy, no cancellation of two ``lse``).
* ``grad_(z, ...)``: overwrites ``z`` with ``dz = (c_p exp(u - lse) - c_q exp(r_u - lse_r)) * transform'(z) [* fp16
  scale]`` in the matmul dtype, ready for the two gradient matmuls. The one-hot term at the target column is
  not in the pass: the caller writes those ``C`` entries afterwards from float32 row values.

Eagerly each pass is a few torch ops with float32 ``[C, V]`` temporaries; inductor fuses each into
one kernel that reads ``z`` (``reduce``: twice, max then sums) and writes only ``[C]`` vectors, or
``dz`` in place: no float32 ``[C, V]`` block exists (``temp_bytes_per_logit`` is 0).

``DFT_COMPILE_EPILOGUE`` selects: ``"auto"`` (default: compiled on CUDA, and on other devices for
calls of at least ``2**27`` logits, e.g. 4096 tokens x 32k vocabulary, where the one-time compile
of a few seconds pays off; eager for small calls such as unit tests), ``"1"`` (compiled wherever
``torch.compile`` works), ``"0"`` (eager). A *compile* error (dynamo/inductor, the recompile limit included:
all raised before the pass runs) warns once and falls back to eager for the rest of the process: the call
that hit it starts again on the eager path's chunks (`CompileFellBack`), or,
where its chunks were planned for the eager path anyway (a vocabulary shard, whose ranks must run one plan),
the pass runs eagerly on the spot. Any other error (an out-of-memory included) propagates and is not retried.
Shapes are compiled as dynamic; chunks of fewer than 2 rows run eagerly, so a tail chunk never
recompiles (dynamic shapes still specialise sizes 0 and 1).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["CompileFellBack", "Epilogue", "TransformConsts", "epilogue_for"]


class TransformConsts(NamedTuple):
    """A [`dft.LogitTransform`][dft.LogitTransform] as plain floats: ``u = softcap * tanh(scale * z / softcap) /
    temperature``."""

    scale: float = 1.0
    softcap: float = 0.0  # 0: no soft-cap
    temperature: float = 1.0


def _logits(z: Tensor, dtype: torch.dtype, k: TransformConsts, inplace: bool) -> tuple[Tensor, Tensor | None]:
    """``u = transform(z)`` in ``dtype`` and the ``tanh`` term of the soft-cap (None without one).

    ``inplace``: ``z`` may be overwritten (it aliases ``u`` when it already has ``dtype``).
    """
    u = z.to(dtype)
    owned = inplace or z.dtype != dtype
    if k.scale != 1.0:
        u = u.mul_(k.scale) if owned else u * k.scale
        owned = True
    th = None
    if k.softcap:
        th = (u.div_(k.softcap) if owned else u / k.softcap).tanh_()
        u = th * k.softcap
    if k.temperature != 1.0:
        u = u.div_(k.temperature) if owned or k.softcap else u / k.temperature
    return u, th


def _owns(z: Tensor, dtype: torch.dtype, k: TransformConsts) -> bool:
    """Whether ``_logits(z, inplace=False)`` returns a fresh tensor (that later ops may overwrite)."""
    return z.dtype != dtype or k.scale != 1.0 or bool(k.softcap) or k.temperature != 1.0


def reduce(
    z: Tensor, dtype: torch.dtype, k: TransformConsts, stats: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Row statistics of ``u = transform(z)``: ``m [C]``, ``s [C]`` and, with ``stats``, ``argmax [C]``, ``t [C]``."""
    u, _ = _logits(z, dtype, k, inplace=False)
    if stats:
        m, amax = u.max(-1)
    else:
        m, amax = u.amax(-1), None
    e = u.sub_(m.unsqueeze(1)) if _owns(z, dtype, k) else u - m.unsqueeze(1)
    if not stats:
        return m, e.exp_().sum(-1), None, None
    x = e.exp()
    s = x.sum(-1)
    t = x.mul_(e).sum(-1)
    return m, s, amax, t


def ref_reduce(
    r: Tensor, z: Tensor, dtype: torch.dtype, kr: TransformConsts, kz: TransformConsts
) -> tuple[Tensor, Tensor, Tensor]:
    """ASFT: ``m_r [C]``, ``s_r [C]`` of ``r_u = transform_r(r)`` and ``d = sum exp(r_u - m_r) (r_u - u) [C]``."""
    ru, _ = _logits(r, dtype, kr, inplace=False)
    u, _ = _logits(z, dtype, kz, inplace=False)
    d = ru - u
    mr = ru.amax(-1)
    e = (ru.sub_(mr.unsqueeze(1)) if _owns(r, dtype, kr) else ru - mr.unsqueeze(1)).exp_()
    return mr, e.sum(-1), e.mul_(d).sum(-1)


def grad_(
    z: Tensor,
    shift: Tensor,
    mult: Tensor | None,
    dtype: torch.dtype,
    k: TransformConsts,
    out_scale: Tensor | None = None,
    r: Tensor | None = None,
    r_shift: Tensor | None = None,
    r_mult: Tensor | None = None,
    kr: TransformConsts | None = None,
) -> Tensor:
    """In place: ``z <- (exp(u - shift) [* mult] [- r_mult * exp(r_u - r_shift)]) * transform'(z) [* out_scale]``.

    ``shift``, ``mult``, ``r_shift``, ``r_mult``: ``[C]``; ``out_scale``: 0-dim (float16's power of two).
    ``r`` (the reference logits) is overwritten too. Returns ``z``.
    """
    u, th = _logits(z, dtype, k, inplace=True)
    g = u.sub_(shift.unsqueeze(1)).exp_()
    if mult is not None:
        g = g.mul_(mult.unsqueeze(1))
    if r is not None:
        ru, _ = _logits(r, dtype, kr, inplace=True)
        g = g.sub_(ru.sub_(r_shift.unsqueeze(1)).exp_().mul_(r_mult.unsqueeze(1)))
    if th is not None:
        g = g.mul_(th.square_().neg_().add_(1.0))
    factor = k.scale / k.temperature
    if factor != 1.0:
        g = g.mul_(factor)
    if out_scale is not None:
        g = g.mul_(out_scale)
    return z.copy_(g)


class Epilogue(NamedTuple):
    """The three passes (see the module docstring) and the float32 temporaries they hold per logit."""

    reduce: Callable[..., tuple[Tensor, Tensor, Tensor | None, Tensor | None]]
    ref_reduce: Callable[..., tuple[Tensor, Tensor, Tensor]]
    grad_: Callable[..., Tensor]
    temp_bytes_per_logit: int  # peak [C, V] temporaries beyond z itself, per logit (eager: float32 copies)
    compiled: bool


EAGER = Epilogue(reduce, ref_reduce, grad_, temp_bytes_per_logit=12, compiled=False)
_compiled: Epilogue | None = None
_compile_failed = False


def _mode() -> str:
    mode = os.environ.get("DFT_COMPILE_EPILOGUE", "auto").strip().lower()
    return mode if mode in ("0", "1", "auto") else "auto"


def _compile_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "inductor/dynamo could not compile this" (not an error of the computation).

    Each is raised while dynamo traces or inductor compiles, before the compiled pass runs, so nothing has been
    written yet and the eager pass can take over. ``FailOnRecompileLimitHit`` (a plain ``Exception``) is
    raised instead of a new graph once ``torch._dynamo.config.recompile_limit`` variants exist.
    """
    from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError, TorchRuntimeError, Unsupported

    errors: list[type[BaseException]] = [BackendCompilerFailed, Unsupported, InternalTorchDynamoError]
    errors.append(TorchRuntimeError)  # raised while tracing (fake tensors), before anything ran
    try:
        from torch._dynamo.exc import FailOnRecompileLimitHit

        errors.append(FailOnRecompileLimitHit)
    except ImportError:  # pragma: no cover - older torch
        pass
    try:
        from torch._inductor.exc import CppCompileError, InductorError, InvalidCxxCompiler

        errors += [InductorError, CppCompileError, InvalidCxxCompiler]
    except ImportError:  # pragma: no cover - older torch
        pass
    return tuple(errors)


class CompileFellBack(Exception):
    """Raised by a compiled pass whose compilation failed (after one warning): the caller re-plans its chunks for
    the eager epilogue and starts the call again. Nothing of the failing pass has run."""


_INLINE_FALLBACK: contextvars.ContextVar[bool] = contextvars.ContextVar("dft_inline_fallback", default=False)


@contextlib.contextmanager
def inline_fallback() -> Iterator[None]:
    """Inside: a compile failure runs the eager pass on the spot (the chunks were planned for eager passes)."""
    token = _INLINE_FALLBACK.set(True)
    try:
        yield
    finally:
        _INLINE_FALLBACK.reset(token)


def _guarded(compiled: Callable, eager: Callable) -> Callable:
    def run(*args: object) -> object:
        global _compile_failed
        if _compile_failed:
            return eager(*args)
        try:
            return compiled(*args)
        except _compile_errors() as e:
            _compile_failed = True
            warnings.warn(
                f"dft: compiling the fused head's epilogue failed ({type(e).__name__}: {str(e)[:200]}); "
                "using the eager epilogue (set DFT_COMPILE_EPILOGUE=0 to skip the attempt).",
                RuntimeWarning,
                stacklevel=2,
            )
            if _INLINE_FALLBACK.get():
                return eager(*args)
            raise CompileFellBack(type(e).__name__) from e

    return run


def _dispatch_mode_active() -> bool:
    """A TorchDispatchMode (profilers, tests that record ops) cannot be traced through: use eager then."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
    except ImportError:  # pragma: no cover
        return False
    return _get_current_dispatch_mode() is not None


AUTO_MIN_ELEMENTS = 2**27


def epilogue_for(device: torch.device, num_logits: int) -> Epilogue:
    """The epilogue for a call over ``num_logits = rows x vocabulary`` on ``device`` (see the module docstring)."""
    global _compiled
    mode = _mode()
    small = device.type != "cuda" and num_logits < AUTO_MIN_ELEMENTS
    if _compile_failed or mode == "0" or (mode == "auto" and small) or _dispatch_mode_active():
        return EAGER
    if _compiled is None:
        options = {"dynamic": True, "fullgraph": True}
        _compiled = Epilogue(
            _guarded(torch.compile(reduce, **options), reduce),
            _guarded(torch.compile(ref_reduce, **options), ref_reduce),
            _guarded(torch.compile(grad_, **options), grad_),
            temp_bytes_per_logit=0,
            compiled=True,
        )
    return _compiled
