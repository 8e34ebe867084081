"""Fused LM-head DFT loss: ``linear_dft_loss`` never materialises the tokens x vocab logits.

Tokens are processed in chunks of ``C`` rows. Per chunk (``h [C, H]``, ``W [V, H]``):

```text
z = h @ W.T + b                       # matmul 1, input dtype (or the autocast dtype): [C, V]
u = softcap(logit_scale * z) / T      # float32 (float64 for float64 inputs), never stored
m, s = max u, sum exp(u - m)          # pass 1 (dft.epilogue.reduce): lse = m + log s, and the stats
logp_y = u[y] - lse;  w = DFTWeight(logp_y)  (detached)
loss  += sum(c * -w * logp_y)         # c: reduction coefficients (dft.reduction)
dU     = c * w * (softmax(u) - onehot(y))           # known in the forward pass
z     <- dU / T * softcap'(.) * logit_scale         # pass 2 (dft.epilogue.grad_), in place, matmul dtype
dh     = dZ @ W                       # matmul 2 (skipped if hidden is frozen)
dW    += dZ.T @ h                     # matmul 3, in place into a float32 accumulator (skipped if W is frozen)
```

So a scalar reduction costs 3 matmuls and two passes over ``z`` (compiled: one kernel each, no float32
``[C, V]`` block; ``benchmarks/roofline.py`` prices it at 1.1-1.2x the matmuls on an H100), and backward
only scales the stored gradients by the upstream scalar. ``reduction="none"`` needs a general upstream
gradient: its backward recomputes the chunks with ``c = grad_output`` (4 matmuls). Ignored tokens are
dropped before any matmul (one host sync per call, which also checks the label range). Peak extra
memory is the float32 ``dW`` accumulator plus one chunk ([`default_chunk_size`][dft.fused.default_chunk_size]:
equal chunks within the device's budget), independent of N.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import Tensor

from .epilogue import EAGER, CompileFellBack, Epilogue, TransformConsts, epilogue_for, inline_fallback
from .labels import check_labels, supervised_index
from .losses import check_kl
from .nft import NFTInputs
from .options import LossCall, LossOptions, Unpack, resolve_options
from .precision import compute_dtype, matmul_dtype, real_execution
from .reduction import Reduction, check_reduction, reduction_coefficients, weighted_labels
from .stats import TokenStats, token_stats_from_rows
from .transform import LogitTransform
from .vocab_parallel import (
    RefPartials,
    RowPartials,
    VocabShard,
    all_reduce_,
    check_group,
    combine,
    gather_topk,
    localize_head,
    vocab_size_of,
)
from .weights import DFTWeight

__all__ = [
    "DW_PATHS",
    "LinearDFTLoss",
    "Reference",
    "auto_chunk_size",
    "budget_for_memory",
    "chunk_budget_bytes",
    "default_chunk_size",
    "dw_update_path",
    "linear_dft_loss",
]

_MIN_ROWS, _MAX_ROWS = 16, 8192


def budget_for_memory(total_bytes: int) -> int:
    """A chunk's working-set budget on an accelerator with ``total_bytes`` of memory: 1/64 of it, 256 MiB..2 GiB.

    An 80 GB H100 gets 1.25 GB (about 4k rows of bf16 logits at V=152k: per chunk the dW update is
    then bound by its FLOPs, not by the ``[V, H]`` float32 accumulator it reads and writes); a 24 GB
    card 384 MiB.
    """
    return int(min(max(total_bytes // 64, 256 * 2**20), 2 * 2**30))


def chunk_budget_bytes(device: torch.device) -> int:
    """The default chunk budget on ``device``: from its memory on CUDA, 256 MiB on CPU and elsewhere.

    On a CPU large chunks buy nothing (the matmuls dominate; 256/512/1024 rows at V=32000 ran
    within 6% of each other) and the memory is better kept.
    """
    if device.type == "cuda":
        return budget_for_memory(torch.cuda.get_device_properties(device).total_memory)
    return 256 * 2**20


def auto_chunk_size(
    vocab_size: int, budget_bytes: int | None = None, *, bytes_per_logit: int = 16, rows: int | None = None
) -> int:
    """Rows per chunk so that a chunk's ``[C, V]`` blocks take about ``budget_bytes`` (16..8192 rows).

    Args:
        vocab_size: V.
        budget_bytes: the chunk's working set (default: 256 MiB,
            [`chunk_budget_bytes`][dft.fused.chunk_budget_bytes] on CPU).
        bytes_per_logit: what the path holds per logit: the logits in the matmul dtype (2 for bf16),
            the reference logits for ASFT, plus the epilogue's float32 temporaries when it runs eagerly.
        rows: the rows to process; the chunks are then made equal (``ceil(rows / k)`` for the fewest
            ``k`` chunks within the budget), so no chunk is a short tail.
    """
    budget = 256 * 2**20 if budget_bytes is None else budget_bytes
    size = max(budget // (max(bytes_per_logit, 1) * max(vocab_size, 1)), 1)
    size = int(min(max(size, _MIN_ROWS), _MAX_ROWS))
    if rows is not None and rows > 0:
        num_chunks = -(-rows // size)
        size = -(-rows // num_chunks)
    return size


@dataclass(frozen=True)
class Reference:
    """ASFT's frozen reference head for [`dft.linear_dft_loss`][dft.linear_dft_loss]: its logits are
    ``transform(hidden @ weight.T + bias)``, built one chunk at a time and never as ``[N, V]``; no gradient.

    Attributes:
        hidden: ``[..., H_ref]`` the reference model's final hidden states (same leading shape as the policy's).
        weight: ``[V, H_ref]`` its output embedding.
        bias: ``[V]`` its head bias, or None.
        transform: its [`dft.LogitTransform`][dft.LogitTransform] (None: the policy's ``transform``).

    Examples:
        >>> ref = dft.Reference(ref_hidden, ref_model.lm_head.weight)
        >>> dft.linear_dft_loss(hidden, weight, labels, reference=ref, kl_coef=0.1)
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    transform: LogitTransform | None = None


@dataclass(frozen=True)
class _Reference:
    """ASFT's frozen reference head, rows already gathered: logits ``transform(h @ w.T + b)``, no gradient."""

    h: Tensor  # [n, H_ref] supervised rows, mm dtype (before rows(): [..., H_ref] as given)
    w: Tensor  # [V, H_ref]
    b: Tensor | None
    transform: LogitTransform
    kl_coef: float

    def rows(self, index: Tensor | None, num_rows: int, mm: torch.dtype) -> _Reference:
        """The supervised rows (``index`` of the flattened tokens; None: all), detached, in the matmul dtype."""
        h = self.h.detach().reshape(num_rows, self.h.shape[-1])
        h = h if index is None else h.index_select(0, index)
        b = None if self.b is None else self.b.detach().to(mm)
        return _Reference(h.to(mm), self.w.detach().to(mm), b, self.transform, self.kl_coef)

    def logits(self, rows: slice) -> Tensor:
        """The reference logits of ``rows`` before the transform: ``[C, V]`` in the matmul dtype."""
        h = self.h[rows]
        return torch.mm(h, self.w.t()) if self.b is None else torch.addmm(self.b, h, self.w.t())


@dataclass(frozen=True)
class _Plan:
    """Everything the autograd function needs besides the differentiable tensors."""

    weighting: DFTWeight
    transform: LogitTransform
    labels: Tensor  # [n] supervised labels (compacted)
    index: Tensor | None  # [n] their rows in the flattened tokens, None when all rows are supervised
    coef: Tensor | None  # [n] scalar-reduction coefficients; None for reduction="none"
    num_rows: int  # N, all tokens
    chunk_size: int | None  # None: auto_chunk_size from the path's bytes per logit and the device budget
    mm_dtype: torch.dtype
    want_stats: bool
    grad_enabled: bool  # grad mode at call time: no gradient work under torch.no_grad()
    reference: _Reference | None = None  # ASFT
    shard: VocabShard | None = None  # a vocabulary-sharded head (tensor parallel): dft.vocab_parallel
    nft: NFTInputs | None = None  # NFT's [n] per-row inputs (compacted)
    signed: bool = False  # a weight may be negative: the coefficients are not folded into the exponential


_ADDMM_OUT_DTYPE: dict[tuple[str, torch.dtype], bool] = {}


def _addmm_out_dtype(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, alpha=..., out=acc)`` accumulates ``dtype``
    (bf16/fp16) products into a float32 ``acc`` in place here (cuBLAS on CUDA: one GEMM with beta=1, no
    ``[V, H]`` temporary).

    Probed once per device and dtype with a small exact check in the layout of the real call (``a`` the
    transpose of a ``[C, V]`` block, ``b`` a row slice of the hidden states, a power-of-two ``alpha``); False on
    CPU (no such kernel), and never probed (nor cached) under fake tensors, tracing or CUDA-graph capture. Where
    the probe fails on CUDA, the fused head warns: dW then goes through a float32 ``[V, H]`` product per chunk.
    """
    if device.type != "cuda":
        return False
    key = (str(device), dtype)
    if key not in _ADDMM_OUT_DTYPE and not real_execution(device):
        return False
    if key not in _ADDMM_OUT_DTYPE:
        _ADDMM_OUT_DTYPE[key] = _probe_addmm_out_dtype(device, dtype)
    return _ADDMM_OUT_DTYPE[key]


def _probe_addmm_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """The in-place float32-output GEMM on operands laid out as ``_mm_into(acc, z.t(), h[rows], inv_scale)``."""
    try:
        z = (torch.arange(15, device=device, dtype=torch.float32).reshape(5, 3) / 4).to(dtype)  # [C, V]
        h = (torch.arange(14, device=device, dtype=torch.float32).reshape(7, 2) / 2).to(dtype)  # [N, H]
        a, b = z.t(), h[1:6]  # [V, C] transposed view, [C, H] row slice
        acc = torch.ones(3, 2, device=device, dtype=torch.float32)
        torch.addmm(acc, a, b, out_dtype=torch.float32, alpha=0.5, out=acc)
        return bool(torch.equal(acc, 1 + 0.5 * (a.float() @ b.float())))
    except (RuntimeError, TypeError):
        return False


DW_PATHS = {
    "addmm_": "same dtype: acc.addmm_(a, b)",
    "addmm_out_dtype": "one GEMM accumulating in place into the float32 accumulator (cuBLAS out_dtype; "
    "float16: its power-of-two scale as the GEMM's alpha)",
    "upcast_addmm_": "the chunk's operands cast up, then acc.addmm_ (CPU: no out_dtype kernel)",
    "product_add": "the product in float32, then added: a [V, H] float32 temporary per chunk (out_dtype failed)",
}
"""How the fused head accumulates ``dW`` ([`dw_update_path`][dft.fused.dw_update_path])."""


def dw_update_path(device: torch.device, mm_dtype: torch.dtype, acc_dtype: torch.dtype = torch.float32) -> str:
    """Which [`DW_PATHS`][dft.fused.DW_PATHS] entry ``dW += dz.T @ h`` takes for ``mm_dtype`` operands on
    ``device``."""
    if mm_dtype == acc_dtype:
        return "addmm_"
    if _addmm_out_dtype(device, mm_dtype):
        return "addmm_out_dtype"
    return "upcast_addmm_" if device.type != "cuda" else "product_add"


_LOGGED_PATHS: set[tuple[str, str, torch.dtype]] = set()


def _mm_into(acc: Tensor, a: Tensor, b: Tensor, inv_scale: Tensor | None = None) -> None:
    """In place ``acc += (a @ b) * inv_scale`` with ``acc`` float32/64 whatever the dtype of ``a`` and ``b``.

    Never a ``[V, H]`` temporary where the device can help it ([`dw_update_path`][dft.fused.dw_update_path],
    logged once per path at debug level on the ``dft`` logger): same dtype -> ``addmm_``; bf16/fp16 on CUDA -> one
    GEMM with
    a float32 output accumulating into ``acc`` (float16's power-of-two ``inv_scale`` as its ``alpha``: a
    host read of one scalar per chunk, float16 only); on CPU the (chunk-sized) operands are cast up and
    ``addmm_`` accumulates. Only where the CUDA probe fails is the product formed first.
    """
    path = dw_update_path(a.device, a.dtype, acc.dtype)
    key = (path, str(a.device), a.dtype)
    if key not in _LOGGED_PATHS:
        _LOGGED_PATHS.add(key)
        logging.getLogger("dft").debug("fused head dW path on %s for %s: %s", a.device, a.dtype, DW_PATHS[path])
        if path == "product_add":
            warnings.warn(
                f"dft: the in-place float32-output GEMM is not available for {a.dtype} on {a.device}: the fused "
                f"head's dW goes through a float32 [V, H] product per chunk ({a.shape[0]} x {b.shape[1]} here), "
                "memory beyond its chunk budget.",
                RuntimeWarning,
                stacklevel=2,
            )
    if path == "addmm_" and inv_scale is None:
        acc.addmm_(a, b)
    elif path == "addmm_out_dtype":
        alpha = 1.0 if inv_scale is None else float(inv_scale)
        torch.addmm(acc, a, b, out_dtype=acc.dtype, alpha=alpha, out=acc)
    elif path in ("upcast_addmm_", "addmm_"):
        a_up = a.to(acc.dtype)
        acc.addmm_(a_up if inv_scale is None else a_up.mul_(inv_scale), b.to(acc.dtype))
    else:
        try:
            prod = torch.mm(a, b, out_dtype=acc.dtype)
        except (RuntimeError, TypeError):  # no float32-output mm either: float32 operands (a product in the
            prod = torch.mm(a.to(acc.dtype), b.to(acc.dtype))  # matmul dtype would round every dW entry)
        acc.add_(prod if inv_scale is None else prod.mul_(inv_scale))


def _pow2_scale(bound: Tensor) -> Tensor:
    """A power of two ``s`` with ``bound * s <= 1`` (1 for a zero bound); 0-dim, no host sync.

    float16 has 5 exponent bits: gradients formed in the forward pass are tiny (``c = 1 / num_items``,
    and the loss scale is only applied in backward), so ``dz`` is scaled before it is stored in float16
    and the scale is undone in float32 after the matmuls. Powers of two make both steps exact.
    """
    amax = bound.amax()
    exponent = torch.where(amax > 0, -torch.ceil(torch.log2(amax)), torch.zeros_like(amax))
    return torch.exp2(exponent)


def _consts(transform: LogitTransform) -> TransformConsts:
    return TransformConsts(transform.logit_scale, transform.softcap or 0.0, transform.temperature)


def default_chunk_size(
    vocab: int,
    rows: int,
    device: torch.device,
    mm_dtype: torch.dtype,
    ep: Epilogue,
    reference: bool = False,
    transform: LogitTransform | None = None,
    eaft: bool = False,
) -> int:
    """The chunk ``linear_dft_loss(chunk_size=None)`` uses for ``rows`` supervised rows: the path's bytes per
    logit (``z`` and ASFT's ``r`` in the matmul dtype, plus the eager epilogue's float32 temporaries, plus
    EAFT's float32 copy of the transformed logits on either epilogue) within
    [`chunk_budget_bytes`][dft.fused.chunk_budget_bytes], in equal chunks."""
    size = torch.empty((), dtype=mm_dtype).element_size()
    temps = ep.temp_bytes_per_logit
    if temps and transform is not None and transform.softcap is not None:
        temps += 4  # the tanh kept for the derivative
    per_logit = (2 if reference else 1) * (size + temps)
    if eaft:  # _finish_rows: float(z), then transform.apply out of place (up to two more float32 blocks)
        identity = transform is None or transform == LogitTransform()
        per_logit += 4 if identity else 12
    return auto_chunk_size(vocab, chunk_budget_bytes(device), bytes_per_logit=per_logit, rows=rows)


class _Target(NamedTuple):
    """Where each row's target column is in this rank's logits block: ``col [C, 1]``; ``owned [C]`` (None:
    every target is here, i.e. no vocabulary shard)."""

    col: Tensor
    owned: Tensor | None

    @staticmethod
    def of(labels: Tensor, shard: VocabShard | None, local_vocab: int) -> _Target:
        if shard is None:
            return _Target(labels.unsqueeze(1), None)
        local = labels - shard.offset
        owned = (local >= 0) & (local < local_vocab)
        return _Target(torch.where(owned, local, 0).unsqueeze(1), owned)

    def read(self, z: Tensor, dtype: torch.dtype) -> Tensor:
        """``z[row, y]`` in ``dtype`` (0 where another rank holds the column)."""
        z_y = z.gather(1, self.col).squeeze(1).to(dtype)
        return z_y if self.owned is None else torch.where(self.owned, z_y, 0)

    def write_(self, z: Tensor, values: Tensor) -> None:
        """``z[row, y] = values`` where this rank holds the column."""
        if self.owned is not None:
            values = torch.where(self.owned, values, z.gather(1, self.col).squeeze(1))
        z.scatter_(1, self.col, values.unsqueeze(1))


class _Rows(NamedTuple):
    """One chunk's per-row values once its partials are combined over the whole vocabulary (``[C]`` each)."""

    logp: Tensor  # log p_y
    weight: Tensor  # DFTWeight(log p_y) (detached)
    loss: Tensor  # -weight * logp (+ kl_coef * kl)
    lse: Tensor  # m + log s
    s: Tensor  # sum exp(u - m): max_v p_v = 1 / s
    kl: Tensor | None  # KL(q_ref || p) (ASFT)
    r_lse: Tensor | None  # the reference's m_r + log s_r (ASFT)
    r_s: Tensor | None  # the reference's s_r (ASFT)
    r_uy: Tensor | None  # the reference's target logit (ASFT)


class _Grads(NamedTuple):
    """The gradient accumulators of one call (None where not needed): ``dh [n, H]``, ``dW [V_k, H]``, ``db [V_k]``."""

    dh: Tensor | None
    dw: Tensor | None
    db: Tensor | None

    @staticmethod
    def zeros(h: Tensor, w: Tensor, need: tuple[bool, bool, bool], acc_dtype: torch.dtype) -> _Grads:
        need_dh, need_dw, need_db = need
        fp16 = h.dtype == torch.float16  # float16: dh stays float32 until the loss scale is applied
        dh = None
        if need_dh:
            dh = torch.empty(h.shape, dtype=acc_dtype, device=h.device) if fp16 else torch.empty_like(h)
        dw = torch.zeros(w.shape, dtype=acc_dtype, device=h.device) if need_dw else None
        db = torch.zeros(w.shape[0], dtype=acc_dtype, device=h.device) if need_db else None
        return _Grads(dh, dw, db)


def _reduce_chunk(
    plan: _Plan, pass_: Epilogue, z: Tensor, r: Tensor | None, target: _Target, acc_dtype: torch.dtype, stats: bool
) -> tuple[RowPartials, Tensor | None]:
    """Phase 1: this rank's row partials of ``u = transform(z)`` (and of ASFT's ``r``), and the target's tanh."""
    kz = _consts(plan.transform)
    u_y, th_y = plan.transform.forward_(target.read(z, acc_dtype))  # transform(0) == 0: still 0 where not owned
    m, s, amax, t = pass_.reduce(z, acc_dtype, kz, stats)
    if amax is not None and plan.shard is not None:
        amax = amax + plan.shard.offset
    ref = None
    if r is not None:
        r_uy, _ = plan.reference.transform.forward_(target.read(r, acc_dtype))
        m_r, s_r, d = pass_.ref_reduce(r, z, acc_dtype, _consts(plan.reference.transform), kz)
        ref = RefPartials(m_r, s_r, d, r_uy)
    return RowPartials(m, s, u_y, amax, t, ref), th_y


def _finish_rows(plan: _Plan, part: RowPartials, z: Tensor, y: Tensor, acc_dtype: torch.dtype, rows: slice) -> _Rows:
    """Phase 3: from the whole row's values, the log-probability, the weight, the loss and ASFT's KL."""
    log_s = part.s.log()
    lse = part.m + log_s
    logp = part.u_y - lse
    u_full = None
    if plan.weighting.needs_logits:  # EAFT reads the distribution (an eager float32 copy; top-k under a shard)
        u_full = gather_topk(plan.transform.apply(z.to(acc_dtype)), plan.weighting.eaft_top_k, plan.shard)
    wt = plan.weighting(logp, u_full, y)
    del u_full
    if plan.nft is None:
        loss = -(wt * logp)
    else:  # NFT: its signed weight (times the weighting's) for the gradient, its own token value for the loss
        w_nft, value = plan.nft.terms(logp, rows)
        wt, loss = wt * w_nft, wt * value
    kl = r_lse = r_s = r_uy = None
    if part.ref is not None:  # ASFT: + kl_coef * KL(q || p), q = softmax(r_u)
        ref = part.ref
        log_s_r = ref.s.log()
        kl = ref.d / ref.s + (part.m - ref.m) + (log_s - log_s_r)
        loss = loss + plan.reference.kl_coef * kl
        r_lse, r_s, r_uy = ref.m + log_s_r, ref.s, ref.u_y
    return _Rows(logp, wt, loss, lse, part.s, kl, r_lse, r_s, r_uy)


def _backprop_chunk(
    plan: _Plan,
    pass_: Epilogue,
    row: _Rows,
    c: Tensor,
    coef_nonneg: bool,
    z: Tensor,
    r: Tensor | None,
    th_y: Tensor | None,
    target: _Target,
    h_c: Tensor,
    w: Tensor,
    grads: _Grads,
    rows: slice,
) -> None:
    """Phase 4: ``z <- dz`` in place (this rank's columns), then ``dh[rows]``, ``dW += dz.T h``, ``db += sum dz``.

    ``dU = c_p softmax(u) - c_w onehot(y) - c_q softmax(r_u)``: ``c_w = c w`` (the DFT term),
    ``c_q = c kl_coef`` (ASFT's anchor), ``c_p = c_w + c_q``; ``c`` the reduction coefficient.
    """
    acc_dtype = row.logp.dtype
    kz = _consts(plan.transform)
    ref = plan.reference
    c_w = c * row.weight
    c_q = None if ref is None else c * ref.kl_coef
    c_p = c_w if c_q is None else c_w + c_q
    shift, mult = (row.lse - c_p.log(), None) if coef_nonneg else (row.lse, c_p)  # exp(u - lse + log c_p) = c_p p
    scale = inv_scale = None
    if h_c.dtype == torch.float16:  # |dU| <= |c_p| max p + |c_w| + |c_q| max q, max p = 1/s; transform' <= scale/T
        bound = c_p.abs() / row.s + c_w.abs() + (0.0 if c_q is None else c_q.abs() / row.r_s)
        scale = _pow2_scale(bound * abs(kz.scale / kz.temperature))
        inv_scale = scale.reciprocal()
    kr = None if ref is None else _consts(ref.transform)
    pass_.grad_(z, shift, mult, acc_dtype, kz, scale, r, row.r_lse, c_q, kr)
    # the target column, exactly from float32 row values: dU_y = c_p p_y - c_w - c_q q_y
    du_y = c_p * row.logp.exp() - c_w
    if ref is not None:
        du_y = du_y - c_q * (row.r_uy - row.r_lse).exp()
    dz_y = plan.transform.backward_(du_y, th_y)
    if scale is not None:
        dz_y = dz_y * scale
    target.write_(z, dz_y.to(z.dtype))
    if grads.db is not None:
        col = z.sum(0, dtype=acc_dtype)
        grads.db.add_(col if inv_scale is None else col.mul_(inv_scale))
    if grads.dh is not None:
        if inv_scale is not None:
            grads.dh[rows].copy_(torch.mm(z, w)).mul_(inv_scale)  # float32 dh
        else:
            torch.mm(z, w, out=grads.dh[rows])
    if grads.dw is not None:
        _mm_into(grads.dw, z.t(), h_c, inv_scale)


def _run_chunks(
    plan: _Plan,
    h: Tensor,
    w: Tensor,
    b: Tensor | None,
    coef: Tensor | None,
    need: tuple[bool, bool, bool],
    coef_nonneg: bool = True,
) -> tuple[Tensor, TokenStats | None, _Grads]:
    """One pass over the supervised rows, chunk by chunk: logits, local reduce, combine over the vocabulary
    group ([`dft.vocab_parallel.combine`][dft.vocab_parallel.combine]; identity without a shard), finish,
    gradients.

    Args:
        h: ``[n, H]`` supervised hidden rows (mm dtype); w: ``[V_k, H]`` (this rank's vocabulary rows,
            all ``V`` without a shard); b: ``[V_k]`` or None.
        coef: ``[n]`` gradient coefficients (reduction coefficients, or the upstream gradient), or
            None to compute losses only.
        need: which of (dh, dW, db) to compute.
        coef_nonneg: the coefficients are >= 0 (reduction coefficients), which allows folding them
            into the exponential; False for an upstream gradient of any sign.

    Returns:
        token losses ``[n]`` (float32/64), stats ([`TokenStats`][dft.TokenStats]) or None, and ``_Grads``
            (``dh`` summed over the vocabulary group).
    """
    n = h.shape[0]
    sized_vocab = w.shape[0] if plan.shard is None else plan.shard.max_local  # the same on every rank
    ep = epilogue_for(h.device, n * sized_vocab)
    if plan.shard is not None:
        # The ranks of a vocabulary group pair their per-chunk collectives: plan for the eager epilogue, whatever
        # this rank's compile does, and let a compile failure run the eager pass on the spot.
        with inline_fallback():
            return _run_plan(plan, ep, _chunk_rows(plan, h, sized_vocab, EAGER), h, w, b, coef, need, coef_nonneg)
    eager_rows = _chunk_rows(plan, h, sized_vocab, EAGER)
    variant = first = None
    if ep.compiled:
        variant = (h.dtype, plan.want_stats, plan.transform, plan.reference is None, coef is None, coef_nonneg,
                   plan.weighting.needs_logits, torch.is_autocast_enabled())  # fmt: skip
        # Until this variant's passes have compiled once, the first chunk is one the eager epilogue could run: a
        # compile failure there costs no more memory than the eager path, and the call starts again on its plan.
        first = None if variant in _COMPILED_VARIANTS else eager_rows
    try:
        out = _run_plan(plan, ep, _chunk_rows(plan, h, sized_vocab, ep), h, w, b, coef, need, coef_nonneg, first)
    except CompileFellBack:  # compiling failed before its pass ran
        out = None  # leave the except block first: its traceback holds the failed attempt's buffers
    if out is None:  # start again on the eager path's chunks
        return _run_plan(plan, EAGER, eager_rows, h, w, b, coef, need, coef_nonneg)
    if variant is not None:
        _COMPILED_VARIANTS.add(variant)
    return out


_COMPILED_VARIANTS: set[tuple] = set()  # the call variants whose compiled passes have run in this process


def _chunk_rows(plan: _Plan, h: Tensor, sized_vocab: int, ep: Epilogue) -> int:
    """Rows per chunk: the caller's ``chunk_size``, or the default for the epilogue ``ep`` that will run."""
    return plan.chunk_size or default_chunk_size(
        sized_vocab,
        h.shape[0],
        h.device,
        h.dtype,
        ep,
        plan.reference is not None,
        plan.transform,
        eaft=plan.weighting.needs_logits,
    )


def _run_plan(
    plan: _Plan,
    ep: Epilogue,
    chunk: int,
    h: Tensor,
    w: Tensor,
    b: Tensor | None,
    coef: Tensor | None,
    need: tuple[bool, bool, bool],
    coef_nonneg: bool,
    first: int | None = None,
) -> tuple[Tensor, TokenStats | None, _Grads]:
    """[`_run_chunks`][dft.fused._run_chunks] with its epilogue and chunk rows chosen (``first``: a smaller first
    chunk): every buffer is this call's own, so a call that falls back to eager can start again."""
    n, local_vocab = h.shape[0], w.shape[0]
    acc_dtype = compute_dtype(h.dtype)
    token_loss = torch.empty(n, dtype=acc_dtype, device=h.device)
    want_grad = coef is not None
    grads = _Grads.zeros(h, w, tuple(x and want_grad for x in need), acc_dtype)
    stats = TokenStats.zeros(h.device) if plan.want_stats else None
    ref = plan.reference
    if plan.nft is not None:
        plan.nft.tally.reset_()  # this pass's sums only (a restart or a recomputing backward runs it again)
    starts = [0, *range(first, n, chunk)] if first is not None and first < min(chunk, n) else range(0, n, chunk)
    for i, start in enumerate(starts):
        rows = slice(start, min(starts[i + 1] if i + 1 < len(starts) else start + chunk, n))
        h_c, y = h[rows], plan.labels[rows]
        pass_ = ep if h_c.shape[0] >= 2 else EAGER  # dynamic shapes specialise 0/1 rows: never recompile a tail
        z = r = None  # free the previous chunk's blocks before this chunk's are allocated
        z = torch.mm(h_c, w.t()) if b is None else torch.addmm(b, h_c, w.t())  # [C, V_k] matmul dtype
        r = None if ref is None else ref.logits(rows)
        target = _Target.of(y, plan.shard, local_vocab)
        part, th_y = _reduce_chunk(plan, pass_, z, r, target, acc_dtype, stats is not None)
        whole = combine(part, plan.shard)  # phase 2: the full row's values on every rank
        row = _finish_rows(plan, whole, z, y, acc_dtype, rows)
        token_loss[rows] = row.loss
        if stats is not None:
            entropy = whole.s.log() - whole.t / whole.s
            stats = stats + token_stats_from_rows(row.logp, whole.argmax == y, entropy, row.kl)
        if not want_grad:
            continue
        c = coef[rows].to(acc_dtype)
        _backprop_chunk(plan, pass_, row, c, coef_nonneg, z, r, th_y, target, h_c, w, grads, rows)
    all_reduce_(grads.dh, plan.shard)
    return token_loss, stats, grads


def _scatter_rows(values: Tensor, plan: _Plan) -> Tensor:
    """``[n, ...]`` supervised rows -> ``[N, ...]`` with zeros at the ignored rows."""
    if plan.index is None:
        return values
    out = values.new_zeros((plan.num_rows, *values.shape[1:]))
    return out.index_copy_(0, plan.index, values)


def _gather_rows(hidden: Tensor, plan: _Plan) -> Tensor:
    h = hidden if plan.index is None else hidden.index_select(0, plan.index)
    return h.to(plan.mm_dtype)


class _LinearDFTFunction(torch.autograd.Function):
    """Autograd function for the fused head; ``apply(hidden [N,H], weight [V,H], bias [V]|None, plan)``."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan) -> tuple[Tensor, Tensor]:
        need = tuple(ctx.needs_input_grad[:3])
        grad_in_forward = plan.coef is not None and plan.grad_enabled and any(need)
        h = _gather_rows(hidden, plan)
        w = weight.to(plan.mm_dtype)
        b = None if bias is None else bias.to(plan.mm_dtype)
        token_loss, stats, (dh, dw, db) = _run_chunks(
            plan, h, w, b, plan.coef if grad_in_forward else None, need, coef_nonneg=not plan.signed
        )
        packed = _pack_stats(stats, token_loss)
        ctx.mark_non_differentiable(packed)
        ctx.plan = plan
        ctx.versions = _versions_of(weight, bias) if grad_in_forward else None
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if plan.coef is not None:
            loss = (plan.coef.to(token_loss.dtype) * token_loss).sum()
            if grad_in_forward:
                # float16: dh stays float32 until backward has applied the (loss-scaled) upstream gradient
                dh_full = None if dh is None else _scatter_rows(dh, plan)
                if dh_full is not None and plan.mm_dtype != torch.float16:
                    dh_full = dh_full.to(hidden.dtype)
                ctx.save_for_backward(dh_full, dw, db)
            return loss, packed
        ctx.save_for_backward(hidden, weight, bias)
        return _scatter_rows(token_loss, plan), packed

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_stats: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: a second derivative was asked for
            raise RuntimeError(
                "dft: linear_dft_loss has first-order gradients only (its gradients are formed in the forward "
                "pass); double backward / create_graph=True needs the logits path: dft.dft_loss(F.linear(...))."
            )
        _check_versions(ctx.versions)
        plan: _Plan = ctx.plan
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        if plan.coef is not None:  # gradients were formed in forward: scale them
            dh, dw, db = ctx.saved_tensors
        else:  # reduction="none": recompute with the upstream gradient as coefficients
            hidden, weight, bias = ctx.saved_tensors
            upstream = grad_out.reshape(-1)
            coef = upstream if plan.index is None else upstream.index_select(0, plan.index)
            h = _gather_rows(hidden, plan)
            w = weight.to(plan.mm_dtype)
            b = None if bias is None else bias.to(plan.mm_dtype)
            _, _, (dh, dw, db) = _run_chunks(plan, h, w, b, coef, tuple(ctx.needs_input_grad[:3]), coef_nonneg=False)
            dh = None if dh is None else _scatter_rows(dh, plan)
            grad_out = None
        return (
            _finish(dh, grad_out, hidden_dtype),
            _finish(dw, grad_out, weight_dtype),
            _finish(db, grad_out, bias_dtype),
            None,
        )


_REFILLED_IN_PLACE: contextvars.ContextVar[bool] = contextvars.ContextVar("dft_refilled_in_place", default=False)


@contextlib.contextmanager
def head_weight_refilled_in_place(refilled: bool = True) -> Iterator[None]:
    """Inside: the head weight is one an engine gathers around the head's forward and refills in place before
    backward by design (FSDP2, ZeRO-3), so the in-place-change check of the weight does not apply. Set by
    ``dft.engines`` around the head's loss."""
    token = _REFILLED_IN_PLACE.set(refilled)
    try:
        yield
    finally:
        _REFILLED_IN_PLACE.reset(token)


def _versions_of(*tensors: Tensor | None) -> list[tuple[Tensor, int]] | None:
    """The weight's (and bias's) version counters at forward time, to catch an in-place change before backward
    (e.g. ``optimizer.step()`` between them: the gradients were formed from the old values). Not for weights an
    engine gathers around the head's forward (FSDP2 / ZeRO-3 refill them in place by design)."""
    if _REFILLED_IN_PLACE.get():
        return None
    return [(t, t._version) for t in tensors if t is not None and t.is_leaf]


def _check_versions(versions: list[tuple[Tensor, int]] | None) -> None:
    for t, version in versions or ():
        if t._version != version:
            raise RuntimeError(
                f"dft: a tensor of shape {tuple(t.shape)} given to linear_dft_loss (the head weight or bias) was "
                f"modified in place between the forward pass and backward (version {version} -> {t._version}); "
                "its gradients were formed in the forward pass from the old values. Call backward() before "
                "optimizer.step() or any in-place update."
            )


def _finish(grad: Tensor | None, scale: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """``(grad * scale).to(dtype)`` written once into the returned gradient (no intermediate ``[V, H]`` copy)."""
    if grad is None:
        return None
    if scale is None:
        return grad.to(dtype)
    return torch.mul(grad, scale, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


def _pack_stats(stats: TokenStats | None, like: Tensor) -> Tensor:
    return like.new_zeros(0, dtype=torch.float32) if stats is None else stats.pack()


def _check_chunk_size(chunk_size: object) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")


def _validate_head(hidden: object, weight: object, bias: object, prefix: str = "") -> None:
    h_name, w_name, b_name = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    for name, t in ((h_name, hidden), (w_name, weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}.")
    if weight.dim() != 2:
        raise ValueError(f"{w_name} must have shape [V, H], got {tuple(weight.shape)}.")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{h_name} must have shape [..., H] with H = {w_name}.shape[1] = {weight.shape[1]}, "
            f"got {tuple(hidden.shape)}."
        )
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != weight.shape[:1]:
            got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"{b_name} must have shape [V] = ({weight.shape[0]},), got {got}.")
    dtypes = {t.dtype for t in (hidden, weight, bias) if isinstance(t, Tensor)}
    if len(dtypes) > 1 and not torch.is_autocast_enabled(hidden.device.type):
        raise TypeError(
            f"{h_name}, {w_name} and {b_name} must share a dtype, got {sorted(map(str, dtypes))}; "
            "cast them or use torch.autocast."
        )


@overload
def linear_dft_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    weighting: DFTWeight | None = ...,
    *,
    return_stats: Literal[False] = ...,
    **kw: Any,
) -> Tensor: ...
@overload
def linear_dft_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    weighting: DFTWeight | None = ...,
    *,
    return_stats: Literal[True],
    **kw: Any,
) -> tuple[Tensor, TokenStats]: ...
def linear_dft_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    weighting: DFTWeight | None = None,
    *,
    bias: Tensor | None = None,
    transform: LogitTransform | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
    validate: bool = True,
    return_stats: bool = False,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    ref_transform: LogitTransform | None = None,
    kl_coef: float = 0.0,
    vocab_shard: VocabShard | None = None,
    sequence_ids: Tensor | None = None,
    reference: Reference | None = None,
    token_weights: Tensor | None = None,
    nft: NFTInputs | None = None,
    **options: Unpack[LossOptions],
) -> Tensor | tuple[Tensor, TokenStats]:
    """DFT loss of a linear LM head without materialising the ``[N, V]`` logits.

    Equals ``dft.dft_loss(u, labels, ...)`` with ``u = transform(hidden @ weight.T + bias)``, i.e.
    ``u = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap) / temperature``
    (no tanh when ``softcap`` is None), in value and in gradients w.r.t. ``hidden``, ``weight``
    and ``bias``.

    Naive equivalent (what it saves is the ``[N, V]`` float32 logits and their gradient):

    ```python
    dft.dft_loss(F.linear(hidden, weight, bias), labels, weighting, transform=transform)
    ```

    Args:
        hidden: ``[..., H]`` final hidden states (after the final norm), any float dtype.
        weight: ``[V, H]`` output embedding (``lm_head.weight``); frozen (``requires_grad=False``)
            skips its gradient matmul.
        labels: ``[...]`` targets aligned with ``hidden`` (shift them for a causal LM).
        weighting: the weight family, [`dft.DFTWeight`][dft.DFTWeight] (default: DFT, ``alpha=1``).
        bias: ``[V]`` optional head bias.
        transform: [`dft.LogitTransform`][dft.LogitTransform] (``logit_scale``, ``softcap``,
            ``temperature``).
        ignore_index: as in [`dft.dft_loss`][dft.dft_loss].
        reduction: as in [`dft.dft_loss`][dft.dft_loss].
        num_items_in_batch: as in [`dft.dft_loss`][dft.dft_loss].
        validate: as in [`dft.dft_loss`][dft.dft_loss].
        sequence_ids: as in [`dft.dft_loss`][dft.dft_loss].
        chunk_size: token rows per chunk; None (default) sizes equal chunks from the path's bytes per
            logit (bf16 logits, ASFT's reference logits, eager float32 temporaries) and the device's
            budget ([`dft.fused.chunk_budget_bytes`][dft.fused.chunk_budget_bytes]: 1/64 of a GPU's memory,
            256 MiB on CPU).
        return_stats: also return [`dft.TokenStats`][dft.TokenStats], computed inside the same chunks.
        reference: ASFT's frozen reference head as one value, [`dft.Reference`][dft.Reference]``(hidden, weight,
            bias, transform)``; the same as the four flat ``ref_*`` keywords below (give one form, not both).
        ref_hidden: ASFT's frozen reference head: ``ref_hidden [..., H_ref]`` (same leading shape as
            ``hidden``), with ``ref_weight`` and ``ref_bias``; no gradient. Per chunk one extra matmul gives
            the reference logits; neither ``[N, V]`` matrix is built.
        ref_weight: ``[V, H_ref]``, the reference head's weight.
        ref_bias: ``[V]``, the reference head's bias.
        ref_transform: the reference's [`dft.LogitTransform`][dft.LogitTransform] (default: ``transform``).
        kl_coef: ASFT weight: each supervised token adds ``kl_coef * KL(softmax(ref) || softmax(u))``,
            whose gradient ``kl_coef * (softmax(u) - softmax(ref))`` is folded into the same pass.
        vocab_shard: for a head split on the vocabulary by hand (Megatron-style): ``weight`` (and
            ``bias``) are this rank's rows ``[V_k, H]`` and [`dft.VocabShard`][dft.VocabShard] says which ids
            they are (``offset``), the full ``vocab_size`` and the tensor-parallel ``group``. A ``Shard(0)``
            DTensor weight (transformers ``tp_plan="auto"``, torch ``ColwiseParallel``) needs nothing:
            its shard is read from it. Either way every rank of the group passes the same ``hidden``
            and ``labels``; the row statistics are combined over the group
            ([`dft.vocab_parallel`][dft.vocab_parallel]), ``dW`` is this rank's shard only and ``dh`` is summed
            over the group. Passing a local shard
            *without* ``vocab_shard`` is a softmax over that shard only: labels beyond it raise, but
            labels that all fall inside it cannot be told from a smaller vocabulary.
        token_weights: ``[...]`` per-token data weights (labels' shape, floats ``>= 0``): ``w > 0`` multiplies the
            token's loss, ``0`` leaves the token unsupervised and uncounted (the mean counts the supervised tokens).
        nft: NFT's per-token inputs, [`dft.nft.NFTInputs`][dft.nft.NFTInputs] (``pi_old``'s log-probabilities, the
            prompts' acceptance rates, the verdicts): the loss becomes NFT's (see [`dft.nft`][dft.nft]), times the
            ``weighting``'s weight (default with ``nft``: cross-entropy's 1).
        **options: flat keywords instead of ``weighting``/``transform``: ``alpha``, ``min_weight``,
            ``beta``, ``p_min``, ``p_max``, ``weight_fn``, ``logit_scale``, ``softcap``, ``temperature``.

    Returns:
        The loss (0-dim float32, float64 for float64 inputs; ``[...]`` for ``reduction="none"``), and
            the stats when ``return_stats=True``.

    Matmuls run in the input dtype (or the autocast dtype inside ``torch.autocast``); softmax
    statistics and the weight-gradient accumulator are float32.

    Autograd limits (the gradients are formed in the forward pass, under grad mode): each is a
    ``RuntimeError`` saying so. Double backward (``create_graph=True``) and ``torch.func`` transforms
    (``grad``, ``vmap``, ``jacrev``) are refused: use the naive equivalent above
    ([`dft.dft_loss`][dft.dft_loss] supports both). A ``weight`` changed in place between forward and backward
    (``optimizer.step()`` first) is detected from its version counter instead of giving the old weight's gradients.
    """
    weighting, transform = resolve_options(weighting, transform, options, nft)
    call = LossCall(
        weighting,
        transform,
        ignore_index,
        reduction,
        num_items_in_batch,
        validate,
        return_stats,
        kl_coef,
        sequence_ids,
        token_weights,
        nft,
    )
    reference = _reference_value(reference, ref_hidden, ref_weight, ref_bias, ref_transform)
    return fused_head_loss(hidden, weight, bias, labels, call, chunk_size, reference, vocab_shard)


def fused_head_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    call: LossCall,
    chunk_size: int | None = None,
    reference: Reference | None = None,
    vocab_shard: VocabShard | None = None,
) -> Tensor | tuple[Tensor, TokenStats]:
    """[`linear_dft_loss`][dft.linear_dft_loss] with its options already resolved into one
    [`LossCall`][dft.options.LossCall] (what [`dft.causal_lm_loss`][dft.causal_lm_loss] hands down)."""
    _validate_head(hidden, weight, bias)
    _refuse_functorch(hidden, weight)
    check_labels(labels, hidden.shape[:-1], weight.shape[0], call.ignore_index, check_range=False, what="hidden")
    check_reduction(call.reduction, labels.shape, call.num_items_in_batch)
    _check_chunk_size(chunk_size)
    hidden, weight, bias, shard = localize_head(hidden, weight, bias, vocab_shard)
    checked = _check_reference(hidden, weight, reference, call.transform, call.kl_coef, shard)
    return _linear_dft_loss(hidden, weight, bias, labels, call, _Head(chunk_size, checked, shard))


def _refuse_functorch(*tensors: Tensor) -> None:
    """``torch.func.grad`` / ``vmap`` cannot run a function whose gradients are formed in its forward."""
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        raise RuntimeError(
            "dft: linear_dft_loss does not support torch.func transforms (grad, vmap, jacrev): its gradients are "
            "formed in the forward pass. Use torch.autograd (loss.backward()), or the logits path dft.dft_loss."
        )


def _reference_value(
    reference: object, ref_hidden: object, ref_weight: object, ref_bias: object, ref_transform: object
) -> Reference | None:
    """The one [`Reference`][dft.Reference] of a call, from ``reference=`` or the flat ``ref_*`` keywords."""
    flat = {"ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias, "ref_transform": ref_transform}
    given = sorted(k for k, v in flat.items() if v is not None)
    if reference is not None:
        if not isinstance(reference, Reference):
            raise TypeError(f"reference must be a dft.Reference, got {type(reference).__name__}.")
        if given:
            raise ValueError(f"pass either reference=dft.Reference(...) or {given}, not both.")
        return reference
    if ref_hidden is None and ref_weight is None:
        if given:
            raise ValueError(f"{given} given without ref_hidden and ref_weight (ASFT needs both).")
        return None
    if ref_hidden is None or ref_weight is None:
        raise ValueError("ASFT needs both ref_hidden and ref_weight (and ref_bias if the reference head has one).")
    return Reference(ref_hidden, ref_weight, ref_bias, ref_transform)  # type: ignore[arg-type]


def _check_reference(
    hidden: Tensor,
    weight: Tensor,
    reference: Reference | None,
    transform: LogitTransform,
    kl_coef: object,
    shard: VocabShard | None = None,
) -> _Reference | None:
    """The reference checked against the policy's head (and cut to its vocabulary shard); rows not yet gathered."""
    check_kl(kl_coef, reference is not None, "reference (ref_hidden and ref_weight)")
    if reference is None:
        return None
    _validate_head(reference.hidden, reference.weight, reference.bias, prefix="ref_")
    ref_hidden, ref_weight, ref_bias = _reference_rows_of_shard(
        reference.hidden, reference.weight, reference.bias, shard, weight.shape[0]
    )
    if ref_hidden.shape[:-1] != hidden.shape[:-1] or ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"ref_hidden {tuple(ref_hidden.shape)} / ref_weight {tuple(ref_weight.shape)} must match hidden "
            f"{tuple(hidden.shape[:-1])} + (H_ref,) and the vocabulary size {weight.shape[0]}."
        )
    ref_transform = transform if reference.transform is None else reference.transform
    if not isinstance(ref_transform, LogitTransform):
        raise TypeError(f"ref_transform must be a dft.LogitTransform, got {type(ref_transform).__name__}.")
    return _Reference(ref_hidden, ref_weight, ref_bias, ref_transform, float(kl_coef))


def _reference_rows_of_shard(
    ref_hidden: Tensor, ref_weight: Tensor, ref_bias: Tensor | None, shard: VocabShard | None, local_rows: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """ASFT's reference head as the rows of the policy's vocabulary shard: a DTensor sharded the same way
    gives its local part; a whole ``[V, H_ref]`` reference (not tensor parallel) is sliced to the shard's rows."""
    ref_hidden, ref_weight, ref_bias, ref_shard = localize_head(ref_hidden, ref_weight, ref_bias, None)
    if shard is None:
        if ref_shard is not None:
            raise ValueError("ref_weight is sharded on the vocabulary but weight is not; shard both the same way.")
        return ref_hidden, ref_weight, ref_bias
    if ref_shard is not None:
        if (ref_shard.offset, ref_shard.vocab_size) != (shard.offset, shard.vocab_size):
            raise ValueError(
                f"ref_weight's vocabulary shard (offset {ref_shard.offset}) differs from weight's (offset {shard.offset})."
            )
        return ref_hidden, ref_weight, ref_bias
    if ref_weight.shape[0] == shard.vocab_size:  # a whole reference: this rank's rows of it
        rows = slice(shard.offset, shard.offset + local_rows)
        return ref_hidden, ref_weight[rows], None if ref_bias is None else ref_bias[rows]
    return ref_hidden, ref_weight, ref_bias


@dataclass(frozen=True)
class _Head:
    """What the fused head needs beyond [`LossCall`][dft.options.LossCall]: its chunking, ASFT's reference (rows not yet
    gathered) and the vocabulary shard."""

    chunk_size: int | None = None
    reference: _Reference | None = None
    shard: VocabShard | None = None


def _linear_dft_loss(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, call: LossCall, head: _Head
) -> Tensor | tuple[Tensor, TokenStats]:
    """Compact the supervised rows, form the [`_Plan`][dft.fused._Plan] once, run the autograd function."""
    shard, chunk_size = head.shard, head.chunk_size
    if call.token_weights is not None:
        labels = weighted_labels(labels, call.token_weights, call.ignore_index, call.validate)
    if call.nft is not None:
        call.nft.check(labels.shape)
    valid = labels != call.ignore_index
    num_rows = valid.numel()
    if call.validate and shard is not None:  # before anything that could raise on one rank only: a collective
        plan_inputs = (chunk_size or 0, 0 if chunk_size else chunk_budget_bytes(hidden.device))
        check_group(labels, hidden, weight.shape[0], shard, plan_inputs)
    index = supervised_index(  # the one host sync
        labels, call.ignore_index, vocab_size_of(weight, shard), check_range=call.validate, what="hidden"
    )
    flat_labels = labels.reshape(-1)
    sup_labels = flat_labels if index is None else flat_labels.index_select(0, index)
    coef = None
    if call.reduction != "none":
        coef = reduction_coefficients(
            valid,
            call.reduction,
            call.num_items_in_batch,
            compute_dtype(hidden.dtype),
            call.sequence_ids,
            call.token_weights,
        ).reshape(-1)
        coef = coef if index is None else coef.index_select(0, index)
    mm = matmul_dtype(hidden)
    plan = _Plan(
        weighting=call.weighting,
        transform=call.transform,
        labels=sup_labels,
        index=index,
        coef=coef,
        num_rows=num_rows,
        chunk_size=chunk_size,
        mm_dtype=mm,
        want_stats=call.return_stats,
        grad_enabled=torch.is_grad_enabled(),
        shard=shard,
        reference=None if head.reference is None else head.reference.rows(index, num_rows, mm),
        nft=None if call.nft is None else call.nft.rows(index),
        signed=call.signed,
    )
    loss, packed = _LinearDFTFunction.apply(hidden.reshape(num_rows, hidden.shape[-1]), weight, bias, plan)
    if call.reduction == "none":
        loss = loss.reshape(labels.shape)
        if call.token_weights is not None:
            loss = loss * call.token_weights.to(loss.dtype)
    if not call.return_stats:
        return loss
    return loss, TokenStats.unpack(packed)


class LinearDFTLoss(torch.nn.Module):
    """Module form of [`linear_dft_loss`][dft.linear_dft_loss]: stores the options;
    ``forward(hidden, weight, labels, bias=None)``.

    Args:
        weighting: as in [`linear_dft_loss`][dft.linear_dft_loss].
        transform: as in [`linear_dft_loss`][dft.linear_dft_loss].
        ignore_index: as in [`linear_dft_loss`][dft.linear_dft_loss].
        reduction: as in [`linear_dft_loss`][dft.linear_dft_loss].
        chunk_size: as in [`linear_dft_loss`][dft.linear_dft_loss].
        validate: as in [`linear_dft_loss`][dft.linear_dft_loss].
        **options: the flat options, as in [`linear_dft_loss`][dft.linear_dft_loss].

    Shapes: ``hidden [..., H]``, ``weight [V, H]``, ``labels [...]`` -> loss ``[]`` (``[...]`` for ``"none"``).
    """

    def __init__(
        self,
        weighting: DFTWeight | None = None,
        *,
        transform: LogitTransform | None = None,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        chunk_size: int | None = None,
        validate: bool = True,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__()
        if "return_stats" in options:
            raise ValueError("LinearDFTLoss returns the loss only; call linear_dft_loss(return_stats=True) for stats.")
        self.weighting, self.transform = resolve_options(weighting, transform, options)
        check_reduction(reduction, torch.Size([1, 1]), None)
        _check_chunk_size(chunk_size)
        self.ignore_index, self.reduction, self.chunk_size, self.validate = (
            ignore_index,
            reduction,
            chunk_size,
            validate,
        )

    def forward(
        self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, num_items_in_batch: Any = None
    ) -> Tensor:
        return linear_dft_loss(
            hidden,
            weight,
            labels,
            self.weighting,
            bias=bias,
            transform=self.transform,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
            chunk_size=self.chunk_size,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return f"{self.weighting}, {self.transform}, reduction={self.reduction!r}, chunk_size={self.chunk_size}"
