"""DFT loss on materialised logits: ``dft_loss``, ``DFTLoss``, causal-LM helpers and ``token_stats``.

Token loss (Wu et al. 2025, arXiv 2508.05629):

```text
loss_t = -sg(w_t) * log p_t,   p_t = softmax(logits_t)[y_t],   w_t = p_t ** alpha (see dft.weights)
```

Naive equivalent (float64 reference used by the tests):

```python
logp = logits.double().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
loss = -(logp.exp().detach() ** alpha * logp)[labels != ignore_index].mean()
```

Everything is computed in float32 whatever the input dtype (float64 stays float64).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from .labels import check_labels, shift_causal_labels
from .nft import NFTInputs
from .options import LossCall, LossOptions, Unpack, resolve_options
from .precision import compute_dtype
from .reduction import Reduction, check_reduction, reduction_coefficients, weighted_labels
from .stats import TokenStats, token_stats_from_rows
from .transform import LogitTransform
from .weights import DFTWeight

__all__ = [
    "DFTLoss",
    "causal_dft_loss",
    "compute_loss_func",
    "dft_loss",
    "check_kl",
    "shift_causal_labels",
    "token_stats",
]


def _check_logits(logits: object) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}.")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}.")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}.")


def logits_loss(
    logits: Tensor, labels: Tensor, call: LossCall, ref_logits: Tensor | None = None
) -> Tensor | tuple[Tensor, TokenStats]:
    """[`dft_loss`][dft.dft_loss] with its options already resolved into one [`LossCall`][dft.options.LossCall]
    (what [`dft.causal_lm_loss`][dft.causal_lm_loss] hands down)."""
    ignore_index, reduction, num_items_in_batch = call.ignore_index, call.reduction, call.num_items_in_batch
    kl_coef, weight, transform = call.kl_coef, call.weighting, call.transform
    _check_logits(logits)
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index, check_range=call.validate)
    check_reduction(reduction, labels.shape, num_items_in_batch)
    check_kl(kl_coef, ref_logits is not None, "ref_logits")
    if call.token_weights is not None:
        labels = weighted_labels(labels, call.token_weights, ignore_index, call.validate)
    if call.nft is not None:
        call.nft.check(labels.shape)
        call.nft.tally.reset_()
    if ref_logits is not None:
        _check_logits(ref_logits)
        if ref_logits.shape != logits.shape:
            raise ValueError(
                f"ref_logits must have the logits' shape {tuple(logits.shape)}, got {tuple(ref_logits.shape)}."
            )
    z = transform.apply(logits.to(compute_dtype(logits.dtype)))
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    if ref_logits is None and not torch._C._functorch.is_functorch_wrapped_tensor(z):
        # row chunks: no [N, V] temporary in forward, one (the gradient) in backward
        target_logp, lse = _TargetLogProb.apply(z, safe)
    else:  # ASFT's KL differentiates through lse as well; torch.func transforms (grad, vmap) need plain ops
        lse = torch.logsumexp(z, dim=-1)
        target_logp = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    w = weight(target_logp.detach(), z.detach() if weight.needs_logits else None, safe)
    token_loss = -(w * target_logp)
    if call.nft is not None:  # NFT: its signed weight in the gradient, its own value in the loss
        token_loss = _nft_token_loss(call.nft, target_logp, w, valid)
    kl = None
    if ref_logits is not None:  # ASFT: KL(q_ref || p) over the whole vocabulary, reference detached
        logq = torch.log_softmax(ref_logits.detach().to(z.dtype), dim=-1)
        kl = (logq.exp() * (logq - (z - lse.unsqueeze(-1)))).sum(-1)
        if kl_coef:
            token_loss = token_loss + kl_coef * kl
    token_loss = torch.where(valid, token_loss, torch.zeros((), dtype=z.dtype, device=z.device))
    if reduction == "none":
        loss = token_loss if call.token_weights is None else token_loss * call.token_weights.to(token_loss.dtype)
    else:
        coef = reduction_coefficients(
            valid, reduction, num_items_in_batch, token_loss.dtype, call.sequence_ids, call.token_weights
        )
        loss = (coef * token_loss).sum()
    if not call.return_stats:
        return loss
    stats = _chunked_stats(z, lse, target_logp, safe, valid, kl)
    return loss, stats


def _nft_token_loss(nft: NFTInputs, target_logp: Tensor, base: Tensor, valid: Tensor) -> Tensor:
    """``value + (-w log p) - sg(-w log p)``: NFT's token value, with the gradient ``-w grad log p``
    (``w`` = NFT's signed weight times the base weighting's)."""
    mask = valid.reshape(-1)
    logp = target_logp.reshape(-1)[mask]
    w, value = nft.rows(None).terms(logp, mask)
    w, value = w * base.reshape(-1)[mask], value * base.reshape(-1)[mask].detach()
    surrogate = -(w * logp)
    full = torch.zeros_like(target_logp).reshape(-1)
    full = full.masked_scatter(mask, surrogate + (value - surrogate).detach())
    return full.reshape(target_logp.shape)


_STATS_CHUNK_BYTES = 64 * 2**20


def _row_chunks(rows: int, vocab: int, itemsize: int) -> range:
    """Start rows of chunks whose ``[C, V]`` float temporaries take about 64 MiB."""
    step = max(1, _STATS_CHUNK_BYTES // max(1, vocab * itemsize))
    return range(0, rows, step)


class _TargetLogProb(torch.autograd.Function):
    """``log softmax(z)[y]`` and ``logsumexp(z)`` of ``z [..., V]``, row chunk by row chunk.

    Forward keeps no ``[N, V]`` temporary (autograd's logsumexp + gather keep one and build three in
    backward); backward writes ``g * (onehot(y) - softmax(z))`` into one ``[N, V]`` gradient, chunk by chunk.
    ``lse`` is returned detached (non-differentiable). Under ``create_graph=True`` backward forms the same
    gradient from differentiable ops, so double backward (Hessian-vector products) works.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        flat, ys = z.reshape(-1, z.shape[-1]), y.reshape(-1)
        lse = torch.empty(flat.shape[0], dtype=z.dtype, device=z.device)
        step = _row_chunks(*flat.shape, z.element_size()).step
        for start in range(0, flat.shape[0], step):
            lse[start : start + step] = torch.logsumexp(flat[start : start + step], dim=-1)
        logp = flat.gather(1, ys.unsqueeze(1)).squeeze(1) - lse
        ctx.save_for_backward(z, y, lse)
        ctx.mark_non_differentiable(lse)
        return logp.reshape(y.shape), lse.reshape(y.shape)

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, _grad_lse: Tensor) -> tuple[Tensor, None]:
        z, y, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a graph of the gradient for double backward
            g = grad_logp.to(z.dtype).unsqueeze(-1)
            onehot = torch.zeros_like(z).scatter_(-1, y.unsqueeze(-1), 1.0)
            return g * (onehot - torch.softmax(z, dim=-1)), None
        flat, ys, g = z.reshape(-1, z.shape[-1]), y.reshape(-1), grad_logp.reshape(-1).to(z.dtype)
        grad = torch.empty_like(flat)
        step = _row_chunks(*flat.shape, z.element_size()).step
        for start in range(0, flat.shape[0], step):
            rows = slice(start, start + step)
            out = grad[rows]
            torch.sub(flat[rows], lse[rows].unsqueeze(1), out=out).exp_().mul_(-g[rows].unsqueeze(1))
            out.scatter_add_(1, ys[rows].unsqueeze(1), g[rows].unsqueeze(1))
        return grad.reshape(z.shape), None


@torch.no_grad()
def _chunked_stats(
    z: Tensor, lse: Tensor, target_logp: Tensor, safe: Tensor, valid: Tensor, kl: Tensor | None
) -> TokenStats:
    """[`TokenStats`][dft.TokenStats] from the logits in row chunks (entropy, argmax): no second ``[N, V]``
    softmax."""
    flat, lse_f = z.detach().reshape(-1, z.shape[-1]), lse.detach().reshape(-1)
    entropy = torch.empty_like(lse_f)
    argmax = torch.empty(lse_f.shape, dtype=torch.long, device=z.device)
    step = _row_chunks(*flat.shape, z.element_size()).step
    for start in range(0, flat.shape[0], step):
        rows = slice(start, start + step)
        logq = flat[rows] - lse_f[rows].unsqueeze(1)
        entropy[rows] = -(logq.exp() * logq).nan_to_num_(0.0).sum(-1)  # 0 * -inf (a masked column) counts 0
        argmax[rows] = flat[rows].argmax(-1)
    return token_stats_from_rows(
        target_logp.reshape(-1),
        argmax == safe.reshape(-1),
        entropy,
        None if kl is None else kl.reshape(-1),
        valid.reshape(-1),
    )


def check_kl(kl_coef: object, has_reference: bool, reference_name: str) -> None:
    """``kl_coef`` is a finite float >= 0, and a reference is given when it is > 0."""
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not math.isfinite(kl_coef) or kl_coef < 0:
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}.")
    if kl_coef > 0 and not has_reference:
        raise ValueError(f"kl_coef={kl_coef} (ASFT) needs the reference model's {reference_name}.")


@overload
def dft_loss(
    logits: Tensor, labels: Tensor, weighting: DFTWeight | None = ..., *, return_stats: Literal[False] = ..., **kw: Any
) -> Tensor: ...
@overload
def dft_loss(
    logits: Tensor, labels: Tensor, weighting: DFTWeight | None = ..., *, return_stats: Literal[True], **kw: Any
) -> tuple[Tensor, TokenStats]: ...
def dft_loss(
    logits: Tensor,
    labels: Tensor,
    weighting: DFTWeight | None = None,
    *,
    transform: LogitTransform | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    validate: bool = True,
    return_stats: bool = False,
    ref_logits: Tensor | None = None,
    kl_coef: float = 0.0,
    sequence_ids: Tensor | None = None,
    token_weights: Tensor | None = None,
    nft: NFTInputs | None = None,
    **options: Unpack[LossOptions],
) -> Tensor | tuple[Tensor, TokenStats]:
    """Dynamic Fine-Tuning loss on logits: a drop-in for ``F.cross_entropy``.

    ``loss_t = -sg(w_t) * log p_t`` with ``p_t = softmax(logits_t)[labels_t]`` and, by default,
    ``w_t = p_t ** alpha``. ``alpha=0`` is exactly cross-entropy; ``alpha=1`` is the paper's DFT.
    Computed in float32 whatever the input dtype (float64 stays float64).

    Naive equivalent:

    ```python
    logp = logits.float().log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    w = (logp.detach().exp() ** alpha)
    loss = -(w * logp)[labels != ignore_index].mean()
    ```

    Args:
        logits: ``[..., V]`` unnormalised scores, any float dtype.
        labels: ``[...]`` integer targets aligned with ``logits`` (already shifted for a causal LM;
            see [`causal_dft_loss`][dft.causal_dft_loss] otherwise). ``ignore_index`` marks unsupervised
            positions.
        weighting: the weight family as a value, [`dft.DFTWeight`][dft.DFTWeight] (default: DFT, ``alpha=1``).
        transform: a [`dft.LogitTransform`][dft.LogitTransform] applied to ``logits`` first (e.g. a temperature).
        ignore_index: label value that is not supervised (``-100`` as in transformers).
        reduction: ``"mean"`` (over supervised tokens), ``"sum"``, ``"none"`` (shape of labels, 0 where
            ignored) or ``"sequence"`` (mean per sequence over the last dim, then over sequences).
        num_items_in_batch: replaces the mean's denominator (transformers' contract), e.g. the
            number of supervised tokens over all accumulation steps and ranks.
        validate: check that labels lie in ``[0, V)`` (a device sync); shapes and dtypes are always checked.
        return_stats: also return [`dft.TokenStats`][dft.TokenStats] (CE, mean p, accuracy, entropy) from the
            same softmax.
        ref_logits: ``[..., V]`` a frozen reference model's logits of the same tokens (ASFT, Anchored
            SFT, arXiv 2509.23753); detached. With ``kl_coef > 0`` each supervised token adds
            ``kl_coef * KL(softmax(ref_logits) || softmax(logits))``; the mean KL is in the stats.
        kl_coef: weight of the KL anchor (``0``: plain DFT; LLaMA-Factory's ``asft_alpha`` is 0.1).
        sequence_ids: ``[...]`` (labels' shape) for ``reduction="sequence"`` on padding-free packed rows:
            which sequence each token belongs to ([`dft.labels.sequence_ids`][dft.labels.sequence_ids]); None:
            one per row.
        token_weights: ``[...]`` per-token data weights (labels' shape, floats ``>= 0``): ``w > 0`` multiplies the
            token's loss, ``0`` leaves the token unsupervised and uncounted (the mean counts the supervised tokens).
        nft: NFT's per-token inputs, [`dft.nft.NFTInputs`][dft.nft.NFTInputs] (``pi_old``'s log-probabilities, the
            prompts' acceptance rates, the verdicts): the loss becomes NFT's (see [`dft.nft`][dft.nft]), times the
            ``weighting``'s weight (default with ``nft``: cross-entropy's 1).
        **options: the same as flat keywords instead of ``weighting``/``transform``: ``alpha``,
            ``min_weight``, ``beta``, ``p_min``, ``p_max``, ``weight_fn`` ([`dft.DFTWeight`][dft.DFTWeight]) and
            ``logit_scale``, ``softcap``, ``temperature`` ([`dft.LogitTransform`][dft.LogitTransform]).

    Returns:
        The loss (0-dim float32/64, or ``[...]`` for ``reduction="none"``), and the stats when
            ``return_stats=True``. A batch with no supervised token gives 0 with zero gradients.

    Examples:
        >>> logits, labels = torch.randn(4, 10, 50), torch.randint(0, 50, (4, 10))
        >>> dft.dft_loss(logits.view(-1, 50), labels.view(-1))  # replaces F.cross_entropy(...)
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
    return logits_loss(logits, labels, call, ref_logits)


def token_stats(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, validate: bool = True) -> TokenStats:
    """Diagnostics of a batch from its logits (no graph): CE, mean p, token accuracy, entropy.

    Args:
        logits: ``[..., V]``.
        labels: ``[...]`` aligned (already shifted for a causal LM).
        ignore_index: see [`dft_loss`][dft.dft_loss].
        validate: see [`dft_loss`][dft.dft_loss].

    Returns:
        [`dft.TokenStats`][dft.TokenStats] with sums over supervised tokens; ``.as_dict()`` gives the means.
    """
    with torch.no_grad():
        call = LossCall(DFTWeight(alpha=0.0), LogitTransform(), ignore_index, "sum", None, validate, return_stats=True)
        _, stats = logits_loss(logits, labels, call)
    return stats


def causal_dft_loss(
    logits: Tensor,
    labels: Tensor | None = None,
    *,
    shift_labels: Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    **options: Any,
) -> Tensor | tuple[Tensor, TokenStats]:
    """DFT loss of a causal LM with transformers' label semantics.

    Args:
        logits: ``[B, T, V]`` model outputs.
        labels: ``[B, T]`` unshifted labels (``labels[t]`` is token ``t``); shifted here.
        shift_labels: ``[B, T]`` labels already shifted (as transformers passes them under context
            parallelism); give either this or ``labels``.
        ignore_index: see [`dft_loss`][dft.dft_loss].
        num_items_in_batch: see [`dft_loss`][dft.dft_loss].
        **options: any other [`dft_loss`][dft.dft_loss] keyword (alpha, beta, reduction, return_stats, ...).
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("causal_dft_loss needs exactly one of labels (unshifted) or shift_labels (pre-shifted).")
    if shift_labels is None:
        _check_logits(logits)
        check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index, check_range=False)
        shift_labels = shift_causal_labels(labels, ignore_index)
    return dft_loss(logits, shift_labels, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch, **options)


def logits_of(outputs: Any) -> Tensor:
    """The logits in a model's outputs: a bare tensor, ``outputs["logits"]``, ``outputs.logits``, or ``outputs[0]``."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    else:
        logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"cannot find logits in the model's outputs ({type(outputs).__name__}): return a tensor, a mapping with "
            "'logits', an object with .logits, or a tuple whose first element is the logits."
        )
    return logits


def compute_loss_func(
    outputs: Any,
    labels: Tensor,
    num_items_in_batch: int | Tensor | None = None,
    **options: Any,
) -> Tensor:
    """``transformers.Trainer(compute_loss_func=dft.compute_loss_func)``: DFT on the model's logits.

    Trainer pops ``labels`` from the inputs, runs the model, and calls this with the outputs, the
    unshifted labels and ``num_items_in_batch`` (tokens over the accumulation steps, and over ranks
    with ``average_tokens_across_devices``). Options go through ``functools.partial``:

    ```python
    Trainer(..., compute_loss_func=functools.partial(dft.compute_loss_func, alpha=0.5))
    ```

    Note that this path materialises the logits; [`dft.DFTTrainer`][dft.trainer.DFTTrainer] uses the fused head.
    """
    logits = logits_of(outputs)
    if options.get("return_stats"):
        raise ValueError("compute_loss_func must return a tensor; use dft.token_stats for diagnostics.")
    return causal_dft_loss(logits, labels, num_items_in_batch=num_items_in_batch, **options)


class DFTLoss(nn.Module):
    """Module form of [`dft_loss`][dft.dft_loss]: stores the options, ``forward(logits, labels)`` forwards.

    Args:
        weighting: see [`dft_loss`][dft.dft_loss].
        transform: see [`dft_loss`][dft.dft_loss].
        ignore_index: see [`dft_loss`][dft.dft_loss].
        reduction: see [`dft_loss`][dft.dft_loss].
        validate: see [`dft_loss`][dft.dft_loss].
        **options: see [`dft_loss`][dft.dft_loss].

    Shapes: ``logits [..., V]``, ``labels [...]`` -> loss ``[]`` (or ``[...]`` for ``"none"``).
    """

    def __init__(
        self,
        weighting: DFTWeight | None = None,
        *,
        transform: LogitTransform | None = None,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        validate: bool = True,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__()
        self.weighting, self.transform = resolve_options(weighting, transform, options)
        check_reduction(reduction, torch.Size([1, 1]), None)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.validate = validate

    def forward(self, logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
        call = LossCall(
            self.weighting, self.transform, self.ignore_index, self.reduction, num_items_in_batch, self.validate
        )
        return logits_loss(logits, labels, call)

    def extra_repr(self) -> str:
        return f"{self.weighting}, {self.transform}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
