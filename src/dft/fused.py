"""Fused LM-head DFT loss: ``linear_dft_loss`` never materialises the tokens x vocab logits.

Tokens are processed in chunks of ``C`` rows. Per chunk (``h [C, H]``, ``W [V, H]``)::

    z = h @ W.T + b                       # matmul 1, input dtype (or the autocast dtype)
    u = softcap(logit_scale * z) / T      # float32 (float64 for float64 inputs)
    logp_y = u[y] - logsumexp(u);  w = DFTWeight(logp_y)  (detached)
    loss  += sum(c * -w * logp_y)         # c: reduction coefficients (dft.reduction)
    dU     = c * w * (softmax(u) - onehot(y))           # known in the forward pass
    dZ     = dU / T * softcap'(.) * logit_scale
    dh     = dZ @ W                       # matmul 2 (skipped if hidden is frozen)
    dW    += dZ.T @ h                     # matmul 3, float32 accumulator (skipped if W is frozen)

So a scalar reduction costs 3 matmuls in all and backward only scales the stored gradients by the
upstream scalar. ``reduction="none"`` needs a general upstream gradient: its backward recomputes
the chunks with ``c = grad_output`` (4 matmuls). Ignored tokens are dropped before any matmul.
Peak extra memory is ``O(C x V)`` plus the float32 ``dW`` accumulator, independent of N.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor

from .epilogue import epilogue_for
from .labels import check_labels
from .losses import check_kl
from .options import LossOptions, Unpack, resolve_options
from .precision import compute_dtype, matmul_dtype
from .reduction import Reduction, check_reduction, reduction_coefficients
from .stats import TokenStats, token_stats_from_probs
from .transform import LogitTransform
from .weights import DFTWeight

__all__ = ["LinearDFTLoss", "auto_chunk_size", "linear_dft_loss"]

_CHUNK_BUDGET_BYTES = 64 * 2**20  # float32 logits of one chunk


def auto_chunk_size(vocab_size: int, budget_bytes: int = _CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk so that one chunk's float32 logits take about ``budget_bytes`` (a power of 2, 16..8192)."""
    rows = max(budget_bytes // (4 * max(vocab_size, 1)), 1)
    return int(min(max(2 ** int(math.log2(rows)), 16), 8192))


@dataclass(frozen=True)
class _Reference:
    """ASFT's frozen reference head, rows already gathered: logits ``transform(h @ w.T + b)``, no gradient."""

    h: Tensor  # [n, H_ref] supervised rows, mm dtype
    w: Tensor  # [V, H_ref]
    b: Tensor | None
    transform: LogitTransform
    kl_coef: float

    def log_probs(self, rows: slice, acc_dtype: torch.dtype) -> Tensor:
        """``log softmax`` of the reference logits of ``rows``: ``[C, V]`` in ``acc_dtype``."""
        h = self.h[rows]
        r = torch.mm(h, self.w.t()) if self.b is None else torch.addmm(self.b, h, self.w.t())
        r, _ = self.transform.forward_(r.to(acc_dtype))
        return r.sub_(torch.logsumexp(r, dim=-1, keepdim=True))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for ``[C, V]`` blocks without a ``[C, V]`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


@dataclass(frozen=True)
class _Plan:
    """Everything the autograd function needs besides the differentiable tensors."""

    weighting: DFTWeight
    transform: LogitTransform
    labels: Tensor  # [n] supervised labels (compacted)
    index: Tensor | None  # [n] their rows in the flattened tokens, None when all rows are supervised
    coef: Tensor | None  # [n] scalar-reduction coefficients; None for reduction="none"
    num_rows: int  # N, all tokens
    chunk_size: int
    mm_dtype: torch.dtype
    want_stats: bool
    grad_enabled: bool  # grad mode at call time: no gradient work under torch.no_grad()
    reference: _Reference | None = None  # ASFT


def _mm_into(acc: Tensor, a: Tensor, b: Tensor, inv_scale: Tensor | None = None) -> None:
    """``acc += (a @ b) * inv_scale`` with ``acc`` in float32/64 whatever the dtype of ``a`` and ``b``."""
    if a.dtype == acc.dtype and inv_scale is None:
        acc.addmm_(a, b)
        return
    prod = None
    if a.is_cuda:
        try:
            prod = torch.mm(a, b, out_dtype=acc.dtype)
        except (RuntimeError, TypeError):
            prod = None
    if prod is None:
        prod = torch.mm(a, b).to(acc.dtype)
    acc.add_(prod if inv_scale is None else prod.mul_(inv_scale))


def _pow2_scale(dz: Tensor) -> Tensor:
    """A power of two ``s`` with ``max|dz * s|`` in ``(0.5, 1]`` (1 for an all-zero block); no host sync.

    float16 has 5 exponent bits: gradients formed in the forward pass are tiny (``c = 1 / num_items``,
    and the loss scale is only applied in backward), so they are scaled before the cast to float16
    and the scale is undone in float32 after the matmuls. Powers of two make both steps exact.
    """
    amax = dz.abs().amax()
    exponent = torch.where(amax > 0, -torch.ceil(torch.log2(amax)), torch.zeros_like(amax))
    return torch.exp2(exponent)


def _run_chunks(
    plan: _Plan,
    h: Tensor,
    w: Tensor,
    b: Tensor | None,
    coef: Tensor | None,
    need: tuple[bool, bool, bool],
    coef_nonneg: bool = True,
) -> tuple[Tensor, TokenStats | None, Tensor | None, Tensor | None, Tensor | None]:
    """One pass over the supervised rows.

    Args:
        h: ``[n, H]`` supervised hidden rows (mm dtype); w: ``[V, H]``; b: ``[V]`` or None.
        coef: ``[n]`` gradient coefficients (reduction coefficients, or the upstream gradient), or
            None to compute losses only.
        coef_nonneg: the coefficients are >= 0 (reduction coefficients), which allows folding them
            into the exponential; False for an upstream gradient of any sign.
        need: which of (dh, dW, db) to compute.

    Returns:
        token losses ``[n]``, stats, ``dh [n, H]``, ``dW [V, H]`` (float32/64), ``db [V]``.
    """
    n = h.shape[0]
    acc_dtype = compute_dtype(h.dtype)
    device = h.device
    token_loss = torch.empty(n, dtype=acc_dtype, device=device)
    want_grad = coef is not None
    need_dh, need_dw, need_db = (x and want_grad for x in need)
    fp16 = h.dtype == torch.float16
    dh = (torch.empty(h.shape, dtype=acc_dtype, device=device) if fp16 else torch.empty_like(h)) if need_dh else None
    dw = torch.zeros(w.shape, dtype=acc_dtype, device=device) if need_dw else None
    db = torch.zeros(w.shape[0], dtype=acc_dtype, device=device) if need_db else None
    stats = TokenStats.zeros(device) if plan.want_stats else None
    ref = plan.reference
    ep = epilogue_for(h.device, n * w.shape[0])
    for start in range(0, n, plan.chunk_size):
        rows = slice(start, min(start + plan.chunk_size, n))
        h_c, y_c = h[rows], plan.labels[rows]
        z = torch.mm(h_c, w.t()) if b is None else torch.addmm(b, h_c, w.t())
        u, t = plan.transform.forward_(z.to(acc_dtype))
        lse = ep.logsumexp(u)
        logp = u.gather(1, y_c.unsqueeze(1)).squeeze(1).sub_(lse)
        wt = plan.weighting(logp, u if plan.weighting.needs_logits else None)
        token_loss[rows] = -(wt * logp)
        q = kl = None
        if ref is not None:  # ASFT: KL(q || p) = sum q log q - sum q u + lse (u is still the logits here)
            logq = ref.log_probs(rows, acc_dtype)
            q = logq.exp()
            kl = _rowdot(q, logq).sub_(_rowdot(q, u)).add_(lse)
            token_loss[rows] += ref.kl_coef * kl
        if not (want_grad or plan.want_stats):
            continue
        c = coef[rows].to(acc_dtype) if want_grad else None
        cw = c * wt if want_grad else None
        cp = cw if ref is None or cw is None else cw + c * ref.kl_coef  # coefficient of softmax(u) in du
        if stats is None and coef_nonneg and cw is not None:
            # c * w * softmax(u) = exp(u - (lse - log(c * w))): the scaling rides on the exp pass
            # (c * w = 0 gives exp(-inf) = 0), one pass over the chunk fewer than softmax then multiply.
            du = ep.shifted_exp_(u, lse - cp.log())
        else:
            probs = ep.shifted_exp_(u, lse)  # softmax, in place
            if stats is not None:
                valid = torch.ones_like(y_c, dtype=torch.bool)
                stats = stats + token_stats_from_probs(probs, logp, y_c, valid, kl)
            if cw is None:
                continue
            du = probs.mul_(cp.unsqueeze(1))
        if q is not None:  # d KL / du = p - q
            du.sub_(q.mul_((c * ref.kl_coef).unsqueeze(1)))
        du.scatter_add_(1, y_c.unsqueeze(1), -cw.unsqueeze(1))
        dz = plan.transform.backward_(du, t)
        if db is not None:
            db.add_(dz.sum(0))
        if fp16:  # pre-scale by a power of two before the cast (see _pow2_scale), undo in float32
            scale = _pow2_scale(dz)
            dz_mm, inv_scale = dz.mul_(scale).to(h.dtype), scale.reciprocal()
            if dh is not None:
                dh[rows].copy_(torch.mm(dz_mm, w)).mul_(inv_scale)  # float32 dh
        else:
            dz_mm, inv_scale = dz.to(h.dtype), None
            if dh is not None:
                torch.mm(dz_mm, w, out=dh[rows])
        if dw is not None:
            _mm_into(dw, dz_mm.t(), h_c, inv_scale)
    return token_loss, stats, dh, dw, db


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
        token_loss, stats, dh, dw, db = _run_chunks(
            plan, h, w, b, plan.coef if grad_in_forward else None, need, coef_nonneg=plan.weighting.is_nonnegative
        )
        packed = _pack_stats(stats, token_loss)
        ctx.mark_non_differentiable(packed)
        ctx.plan = plan
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
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor, _grad_stats: Tensor) -> tuple[Tensor | None, ...]:
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
            _, _, dh, dw, db = _run_chunks(plan, h, w, b, coef, tuple(ctx.needs_input_grad[:3]), coef_nonneg=False)
            dh = None if dh is None else _scatter_rows(dh, plan)
            grad_out = None
        return (
            _finish(dh, grad_out, hidden_dtype),
            _finish(dw, grad_out, weight_dtype),
            _finish(db, grad_out, bias_dtype),
            None,
        )


def _finish(grad: Tensor | None, scale: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    if grad is None:
        return None
    if scale is not None:
        grad = grad * scale
    return grad.to(dtype)


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
    **options: Unpack[LossOptions],
) -> Tensor | tuple[Tensor, TokenStats]:
    """DFT loss of a linear LM head without materialising the ``[N, V]`` logits.

    Equals ``dft.dft_loss(u, labels, ...)`` with ``u = transform(hidden @ weight.T + bias)``, i.e.
    ``u = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap) / temperature``
    (no tanh when ``softcap`` is None), in value and in gradients w.r.t. ``hidden``, ``weight``
    and ``bias``.

    Naive equivalent (what it saves is the ``[N, V]`` float32 logits and their gradient)::

        dft.dft_loss(F.linear(hidden, weight, bias), labels, weighting, transform=transform)

    Args:
        hidden: ``[..., H]`` final hidden states (after the final norm), any float dtype.
        weight: ``[V, H]`` output embedding (``lm_head.weight``); frozen (``requires_grad=False``)
            skips its gradient matmul.
        labels: ``[...]`` targets aligned with ``hidden`` (shift them for a causal LM).
        weighting: the weight family, :class:`dft.DFTWeight` (default: DFT, ``alpha=1``).
        bias: ``[V]`` optional head bias.
        transform: :class:`dft.LogitTransform` (``logit_scale``, ``softcap``, ``temperature``).
        ignore_index, reduction, num_items_in_batch, validate: as in :func:`dft.dft_loss`.
        chunk_size: token rows per chunk; None picks it so one chunk's float32 logits take ~64 MiB.
        return_stats: also return :class:`dft.TokenStats`, computed inside the same chunks.
        ref_hidden, ref_weight, ref_bias: ASFT's frozen reference head: ``ref_hidden [..., H_ref]``
            (same leading shape as ``hidden``), ``ref_weight [V, H_ref]``, ``ref_bias [V]``; no gradient.
            Per chunk one extra matmul gives the reference logits; neither ``[N, V]`` matrix is built.
        ref_transform: the reference's :class:`dft.LogitTransform` (default: ``transform``).
        kl_coef: ASFT weight: each supervised token adds ``kl_coef * KL(softmax(ref) || softmax(u))``,
            whose gradient ``kl_coef * (softmax(u) - softmax(ref))`` is folded into the same pass.
        **options: flat keywords instead of ``weighting``/``transform``: ``alpha``, ``min_weight``,
            ``beta``, ``p_min``, ``p_max``, ``weight_fn``, ``logit_scale``, ``softcap``, ``temperature``.

    Returns:
        The loss (0-dim float32, float64 for float64 inputs; ``[...]`` for ``reduction="none"``), and
        the stats when ``return_stats=True``.

    Matmuls run in the input dtype (or the autocast dtype inside ``torch.autocast``); softmax
    statistics and the weight-gradient accumulator are float32.
    """
    _validate_head(hidden, weight, bias)
    check_labels(labels, hidden.shape[:-1], weight.shape[0], ignore_index, check_range=validate, what="hidden")
    check_reduction(reduction, labels.shape, num_items_in_batch)
    _check_chunk_size(chunk_size)
    weighting, transform = resolve_options(weighting, transform, options)
    ref_transform = transform if ref_transform is None else ref_transform
    reference = _check_reference(hidden, weight, ref_hidden, ref_weight, ref_bias, ref_transform, kl_coef)
    return _linear_dft_loss(
        hidden,
        weight,
        labels,
        bias,
        weighting,
        transform,
        ignore_index,
        reduction,
        num_items_in_batch,
        chunk_size,
        return_stats,
        reference,
    )


def _check_reference(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: object,
    ref_weight: object,
    ref_bias: object,
    ref_transform: object,
    kl_coef: object,
) -> tuple[Tensor, Tensor, Tensor | None, LogitTransform, float] | None:
    check_kl(kl_coef, ref_hidden is not None and ref_weight is not None, "ref_hidden and ref_weight")
    if ref_hidden is None and ref_weight is None:
        return None
    if ref_hidden is None or ref_weight is None:
        raise ValueError("ASFT needs both ref_hidden and ref_weight (and ref_bias if the reference head has one).")
    _validate_head(ref_hidden, ref_weight, ref_bias, prefix="ref_")
    if ref_hidden.shape[:-1] != hidden.shape[:-1] or ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"ref_hidden {tuple(ref_hidden.shape)} / ref_weight {tuple(ref_weight.shape)} must match hidden "
            f"{tuple(hidden.shape[:-1])} + (H_ref,) and the vocabulary size {weight.shape[0]}."
        )
    if not isinstance(ref_transform, LogitTransform):
        raise TypeError(f"ref_transform must be a dft.LogitTransform, got {type(ref_transform).__name__}.")
    return ref_hidden, ref_weight, ref_bias, ref_transform, float(kl_coef)


def _linear_dft_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    weighting: DFTWeight,
    transform: LogitTransform,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    chunk_size: int | None,
    return_stats: bool,
    reference: tuple[Tensor, Tensor, Tensor | None, LogitTransform, float] | None = None,
) -> Tensor | tuple[Tensor, TokenStats]:
    valid = labels != ignore_index
    flat_valid = valid.reshape(-1)
    num_rows = flat_valid.numel()
    index = None if bool(flat_valid.all()) else flat_valid.nonzero().squeeze(1)
    flat_labels = labels.reshape(-1)
    sup_labels = flat_labels if index is None else flat_labels.index_select(0, index)
    coef = None
    if reduction != "none":
        coef = reduction_coefficients(valid, reduction, num_items_in_batch, compute_dtype(hidden.dtype)).reshape(-1)
        coef = coef if index is None else coef.index_select(0, index)
    plan = _Plan(
        weighting=weighting,
        transform=transform,
        labels=sup_labels,
        index=index,
        coef=coef,
        num_rows=num_rows,
        chunk_size=chunk_size or auto_chunk_size(weight.shape[0]),
        mm_dtype=matmul_dtype(hidden),
        want_stats=return_stats,
        grad_enabled=torch.is_grad_enabled(),
    )
    if reference is not None:
        ref_hidden, ref_weight, ref_bias, ref_transform, kl_coef = reference
        mm = plan.mm_dtype
        ref_rows = ref_hidden.detach().reshape(num_rows, ref_hidden.shape[-1])
        ref_rows = ref_rows if index is None else ref_rows.index_select(0, index)
        ref = _Reference(
            h=ref_rows.to(mm),
            w=ref_weight.detach().to(mm),
            b=None if ref_bias is None else ref_bias.detach().to(mm),
            transform=ref_transform,
            kl_coef=float(kl_coef),
        )
        plan = dataclasses.replace(plan, reference=ref)
    loss, packed = _LinearDFTFunction.apply(hidden.reshape(num_rows, hidden.shape[-1]), weight, bias, plan)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    if not return_stats:
        return loss
    return loss, TokenStats.unpack(packed)


class LinearDFTLoss(torch.nn.Module):
    """Module form of :func:`linear_dft_loss`: stores the options; ``forward(hidden, weight, labels, bias=None)``.

    Args: ``weighting``, ``transform``, ``ignore_index``, ``reduction``, ``chunk_size``, ``validate`` and the
    flat options, as in :func:`linear_dft_loss`.

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
