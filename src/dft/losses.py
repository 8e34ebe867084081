"""DFT loss on materialised logits: ``dft_loss``, ``DFTLoss``, causal-LM helpers and ``token_stats``.

Token loss (Wu et al. 2025, arXiv 2508.05629)::

    loss_t = -sg(w_t) * log p_t,   p_t = softmax(logits_t)[y_t],   w_t = p_t ** alpha (see dft.weights)

Naive equivalent (float64 reference used by the tests)::

    logp = logits.double().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    loss = -(logp.exp().detach() ** alpha * logp)[labels != ignore_index].mean()

Everything is computed in float32 whatever the input dtype (float64 stays float64).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .reduction import Reduction, check_reduction, reduction_coefficients
from .stats import TokenStats, token_stats_from_probs
from .weights import DFTWeight, WeightFn

__all__ = [
    "DFTLoss",
    "causal_dft_loss",
    "check_labels",
    "compute_loss_func",
    "compute_dtype",
    "dft_loss",
    "dft_weighted_loss",
    "shift_causal_labels",
    "token_stats",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_labels(
    labels: object,
    expected_shape: torch.Size | tuple[int, ...],
    num_classes: int,
    ignore_index: int,
    *,
    check_range: bool = True,
    what: str = "logits",
) -> None:
    """Validate labels against the prediction's shape and vocabulary size.

    Raises:
        TypeError: labels are not an integer tensor.
        ValueError: shape mismatch, or a label outside ``[0, num_classes)`` other than ``ignore_index``
            (only checked when ``check_range``; that check syncs with the device).
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (torch.long), got dtype {labels.dtype}.")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the {what} shape without its last dimension "
            f"{tuple(expected_shape)}. For a causal LM with unshifted labels use dft.causal_dft_loss."
        )
    if check_range and labels.numel() > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(
                f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}; found {first} "
                f"(vocabulary size {num_classes}). Check the tokenizer/model vocabulary and the pad label."
            )


def dft_weighted_loss(
    target_logp: Tensor,
    valid: Tensor,
    weight: DFTWeight,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
) -> Tensor:
    """Apply the DFT weight and the reduction to target log-probabilities (the shared tail).

    Args:
        target_logp: ``[...]`` ``log p_t`` with its graph (ignored positions hold any finite value).
        valid: ``[...]`` bool, True where supervised.
        weight: the weight family.
        reduction, num_items_in_batch: see :mod:`dft.reduction`.

    Returns:
        The reduced loss (0-dim), or ``[...]`` per-token losses for ``reduction="none"``.
    """
    w = weight(target_logp.detach())
    token_loss = torch.where(
        valid, -(w * target_logp), torch.zeros((), dtype=target_logp.dtype, device=target_logp.device)
    )
    if reduction == "none":
        return token_loss
    coef = reduction_coefficients(valid, reduction, num_items_in_batch, dtype=token_loss.dtype)
    return (coef * token_loss).sum()


def _check_logits(logits: object) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}.")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}.")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}.")


def _dft_loss(
    logits: Tensor,
    labels: Tensor,
    weight: DFTWeight,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
    validate: bool,
    return_stats: bool,
) -> Tensor | tuple[Tensor, TokenStats]:
    _check_logits(logits)
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index, check_range=validate)
    check_reduction(reduction, labels.shape, num_items_in_batch)
    z = logits.to(compute_dtype(logits.dtype))
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(z, dim=-1)
    target_logp = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    loss = dft_weighted_loss(target_logp, valid, weight, reduction, num_items_in_batch)
    if not return_stats:
        return loss
    with torch.no_grad():
        probs = torch.exp(z.detach() - lse.detach().unsqueeze(-1))
        stats = token_stats_from_probs(
            probs.reshape(-1, z.shape[-1]), target_logp.reshape(-1), safe.reshape(-1), valid.reshape(-1)
        )
    return loss, stats


@overload
def dft_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = ...,
    min_weight: float | None = ...,
    beta: float = ...,
    p_min: float | None = ...,
    p_max: float | None = ...,
    weight_fn: WeightFn | None = ...,
    ignore_index: int = ...,
    reduction: Reduction = ...,
    num_items_in_batch: int | Tensor | None = ...,
    validate: bool = ...,
    return_stats: Literal[False] = ...,
) -> Tensor: ...
@overload
def dft_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = ...,
    min_weight: float | None = ...,
    beta: float = ...,
    p_min: float | None = ...,
    p_max: float | None = ...,
    weight_fn: WeightFn | None = ...,
    ignore_index: int = ...,
    reduction: Reduction = ...,
    num_items_in_batch: int | Tensor | None = ...,
    validate: bool = ...,
    return_stats: Literal[True],
) -> tuple[Tensor, TokenStats]: ...
def dft_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    min_weight: float | None = None,
    beta: float = 1.0,
    p_min: float | None = None,
    p_max: float | None = None,
    weight_fn: WeightFn | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    num_items_in_batch: int | Tensor | None = None,
    validate: bool = True,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, TokenStats]:
    """Dynamic Fine-Tuning loss on logits: a drop-in for ``F.cross_entropy``.

    ``loss_t = -sg(w_t) * log p_t`` with ``p_t = softmax(logits_t)[labels_t]`` and, by default,
    ``w_t = p_t ** alpha``. ``alpha=0`` is exactly cross-entropy; ``alpha=1`` is the paper's DFT.
    Computed in float32 whatever the input dtype (float64 stays float64).

    Naive equivalent::

        logp = logits.float().log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
        w = (logp.detach().exp() ** alpha)
        loss = -(w * logp)[labels != ignore_index].mean()

    Args:
        logits: ``[..., V]`` unnormalised scores, any float dtype.
        labels: ``[...]`` integer targets aligned with ``logits`` (already shifted for a causal LM;
            see :func:`causal_dft_loss` otherwise). ``ignore_index`` marks unsupervised positions.
        alpha, min_weight, beta, p_min, p_max, weight_fn: the weight family, see :class:`dft.DFTWeight`.
        ignore_index: label value that is not supervised (``-100`` as in transformers).
        reduction: ``"mean"`` (over supervised tokens), ``"sum"``, ``"none"`` (shape of labels, 0 where
            ignored) or ``"sequence"`` (mean per sequence over the last dim, then over sequences).
        num_items_in_batch: replaces the mean's denominator (transformers' contract), e.g. the
            number of supervised tokens over all accumulation steps and ranks.
        validate: check that labels lie in ``[0, V)`` (a device sync); shapes and dtypes are always checked.
        return_stats: also return :class:`dft.TokenStats` (CE, mean p, accuracy, entropy) from the same softmax.

    Returns:
        The loss (0-dim float32/64, or ``[...]`` for ``reduction="none"``), and the stats when
        ``return_stats=True``. A batch with no supervised token gives 0 with zero gradients.

    Example::

        >>> logits, labels = torch.randn(4, 10, 50), torch.randint(0, 50, (4, 10))
        >>> dft.dft_loss(logits.view(-1, 50), labels.view(-1))  # replaces F.cross_entropy(...)
    """
    weight = DFTWeight(alpha=alpha, min_weight=min_weight, beta=beta, p_min=p_min, p_max=p_max, weight_fn=weight_fn)
    return _dft_loss(logits, labels, weight, ignore_index, reduction, num_items_in_batch, validate, return_stats)


def token_stats(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, validate: bool = True) -> TokenStats:
    """Diagnostics of a batch from its logits (no graph): CE, mean p, token accuracy, entropy.

    Args:
        logits: ``[..., V]``; labels: ``[...]`` aligned (already shifted for a causal LM).

    Returns:
        :class:`dft.TokenStats` with sums over supervised tokens; ``.as_dict()`` gives the means.
    """
    with torch.no_grad():
        _, stats = _dft_loss(logits, labels, DFTWeight(alpha=0.0), ignore_index, "sum", None, validate, True)
    return stats


def shift_causal_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token targets: ``shift[..., t] = labels[..., t + 1]`` and ``ignore_index`` at the end.

    Same as transformers' ``ForCausalLMLoss``: pad with ``ignore_index`` then drop the first column,
    so logits need no slicing (no copy). ``labels``: ``[..., T]`` -> ``[..., T]``.
    """
    if not isinstance(labels, Tensor) or labels.dim() < 1:
        raise TypeError(f"labels must be a tensor of shape [..., T], got {type(labels).__name__}.")
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


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
        ignore_index, num_items_in_batch: see :func:`dft_loss`.
        **options: any other :func:`dft_loss` keyword (alpha, beta, reduction, return_stats, ...).
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("causal_dft_loss needs exactly one of labels (unshifted) or shift_labels (pre-shifted).")
    if shift_labels is None:
        _check_logits(logits)
        check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index, check_range=False)
        shift_labels = shift_causal_labels(labels, ignore_index)
    return dft_loss(logits, shift_labels, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch, **options)


def compute_loss_func(
    outputs: Any,
    labels: Tensor,
    num_items_in_batch: int | Tensor | None = None,
    **options: Any,
) -> Tensor:
    """``transformers.Trainer(compute_loss_func=dft.compute_loss_func)``: DFT on the model's logits.

    Trainer pops ``labels`` from the inputs, runs the model, and calls this with the outputs, the
    unshifted labels and ``num_items_in_batch`` (tokens over the accumulation steps, and over ranks
    with ``average_tokens_across_devices``). Options go through ``functools.partial``::

        Trainer(..., compute_loss_func=functools.partial(dft.compute_loss_func, alpha=0.5))

    Note that this path materialises the logits; :class:`dft.DFTTrainer` uses the fused head.
    """
    logits = outputs["logits"] if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if logits is None:
        logits = outputs[0]
    if options.get("return_stats"):
        raise ValueError("compute_loss_func must return a tensor; use dft.token_stats for diagnostics.")
    return causal_dft_loss(logits, labels, num_items_in_batch=num_items_in_batch, **options)


class DFTLoss(nn.Module):
    """Module form of :func:`dft_loss`: stores the options, ``forward(logits, labels)`` forwards.

    Args:
        alpha, min_weight, beta, p_min, p_max, weight_fn: the weight family (:class:`dft.DFTWeight`).
        ignore_index, reduction, validate: see :func:`dft_loss`.

    Shapes: ``logits [..., V]``, ``labels [...]`` -> loss ``[]`` (or ``[...]`` for ``"none"``).
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        min_weight: float | None = None,
        beta: float = 1.0,
        p_min: float | None = None,
        p_max: float | None = None,
        weight_fn: WeightFn | None = None,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.weight = DFTWeight(
            alpha=alpha, min_weight=min_weight, beta=beta, p_min=p_min, p_max=p_max, weight_fn=weight_fn
        )
        check_reduction(reduction, torch.Size([1, 1]), None)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.validate = validate

    def forward(self, logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
        return _dft_loss(
            logits, labels, self.weight, self.ignore_index, self.reduction, num_items_in_batch, self.validate, False
        )

    def extra_repr(self) -> str:
        return f"{self.weight}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
