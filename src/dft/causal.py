"""Run a causal LM and compute its DFT loss through the fused head (the one adapter every loop uses).

``causal_lm_loss(model, batch)`` runs the model's backbone, takes the final hidden states and the
output embedding, and calls :func:`dft.linear_dft_loss`: the ``[tokens, vocab]`` logits are never
built. For a model it cannot see inside it runs the whole model and uses :func:`dft.causal_dft_loss`
on the logits, with one warning naming the model class.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .fused import linear_dft_loss
from .losses import causal_dft_loss, shift_causal_labels
from .models import find_causal_lm_parts, unwrap_model
from .stats import TokenStats

__all__ = ["CausalLMLossOutput", "causal_lm_loss", "supervised_labels"]

# Inputs that are loss arguments, not model arguments.
_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch", "return_dict", "logits_to_keep", "use_cache")


@dataclass
class CausalLMLossOutput:
    """``loss``: 0-dim tensor with its graph; ``stats``: :class:`dft.TokenStats` of the batch;
    ``fused``: whether the fused head was used (False: logits path)."""

    loss: Tensor
    stats: TokenStats
    fused: bool


def supervised_labels(inputs: Mapping[str, Any], ignore_index: int = -100) -> Tensor:
    """Next-token targets ``[B, T]`` of a batch, with transformers' semantics.

    ``shift_labels`` when the batch has them (context parallelism, some padding-free collators), else
    ``labels`` shifted left with ``ignore_index`` appended. With padding-free packing
    (``position_ids`` restarting at 0 inside a row), a target that would cross into the next packed
    sequence is ignored too.
    """
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"]
    labels = inputs.get("labels")
    if labels is None:
        raise ValueError("The batch has no 'labels' (or 'shift_labels'): nothing to supervise.")
    shifted = shift_causal_labels(labels, ignore_index)
    position_ids = inputs.get("position_ids")
    if isinstance(position_ids, Tensor) and position_ids.shape == labels.shape and labels.shape[-1] > 1:
        starts_next = torch.zeros_like(shifted, dtype=torch.bool)
        starts_next[..., :-1] = position_ids[..., 1:] == 0
        shifted = shifted.masked_fill(starts_next, ignore_index)
    return shifted


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return _forward_takes_logits_to_keep(type(unwrap_model(model)))


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    """Per model class (the signature is read once, not at every training step)."""
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def _run_backbone(model: nn.Module, backbone: nn.Module, model_inputs: dict[str, Any]) -> Tensor:
    """Final hidden states ``[B, T, H]``, running the forward *through the wrapper* (DDP, FSDP, PEFT).

    DDP/FSDP synchronise gradients and gather parameters only when their own ``forward`` runs, so
    the backbone is not called directly: the whole model runs with ``logits_to_keep=1`` (one
    position of logits, negligible) and a forward hook captures the backbone's output.
    """
    if not _accepts_logits_to_keep(model):
        outputs = backbone(**model_inputs, use_cache=False)
        return outputs["last_hidden_state"] if isinstance(outputs, Mapping) else outputs[0]
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output["last_hidden_state"] if isinstance(output, Mapping) else output[0])

    handle = backbone.register_forward_hook(hook)
    try:
        model(**model_inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"dft: expected one backbone call in {type(unwrap_model(model)).__name__}.forward, got {len(captured)}."
        )
    return captured[0]


def _warn_logits_path(model: nn.Module) -> None:
    warnings.warn(
        f"dft: cannot find a plain linear output head and a backbone in {type(unwrap_model(model)).__name__}; "
        "computing the DFT loss on full logits instead of the fused head (more memory).",
        RuntimeWarning,
        stacklevel=3,
    )


def causal_lm_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    num_items_in_batch: int | Tensor | None = None,
    fused: bool = True,
    ignore_index: int = -100,
    **loss_options: Any,
) -> CausalLMLossOutput:
    """DFT loss of a Hugging Face causal LM on one batch, through the fused LM head.

    Args:
        model: a transformers ``*ForCausalLM`` (possibly PEFT-, DDP- or compile-wrapped), or any
            module whose ``forward(**inputs)`` returns logits (then the logits path is used).
        inputs: the batch: ``input_ids [B, T]``, ``labels [B, T]`` (unshifted; or ``shift_labels``),
            plus whatever the model takes (``attention_mask``, ``position_ids``, ...).
        num_items_in_batch: global number of supervised tokens (see :mod:`dft.distributed`); None
            means the mean over this batch.
        fused: False forces the logits path.
        ignore_index: label value that is not supervised.
        **loss_options: the :func:`dft.linear_dft_loss` options (alpha, min_weight, beta, p_min,
            p_max, weight_fn, reduction, chunk_size, ...).

    Returns:
        :class:`CausalLMLossOutput` with the loss and the batch's :class:`dft.TokenStats`.
    """
    targets = supervised_labels(inputs, ignore_index)
    model_inputs = {k: v for k, v in inputs.items() if k not in _LOSS_KEYS}
    parts = find_causal_lm_parts(model) if fused else None
    if parts is None:
        if fused:
            _warn_logits_path(model)
        outputs = model(**model_inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else getattr(outputs, "logits", outputs[0])
        options = {k: v for k, v in loss_options.items() if k != "chunk_size"}
        loss, stats = causal_dft_loss(
            logits,
            shift_labels=targets,
            ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch,
            return_stats=True,
            **options,
        )
        return CausalLMLossOutput(loss=loss, stats=stats, fused=False)
    hidden = _run_backbone(model, parts.backbone, model_inputs)
    weight, bias = parts.head_weight()
    loss, stats = linear_dft_loss(
        hidden,
        weight,
        targets,
        bias=bias,
        logit_scale=parts.logit_scale,
        softcap=parts.softcap,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        return_stats=True,
        **loss_options,
    )
    return CausalLMLossOutput(loss=loss, stats=stats, fused=True)
