"""Run a causal LM and compute its DFT loss through the fused head (the one adapter every loop uses).

``causal_lm_loss(model, batch)`` runs the model's backbone, takes the final hidden states and the
output embedding, and calls [`dft.linear_dft_loss`][dft.linear_dft_loss]: the ``[tokens, vocab]`` logits are
never built. For a model it cannot see inside it runs the whole model and uses
[`dft.causal_dft_loss`][dft.causal_dft_loss] on the logits, with one warning naming the model class.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from .batches import LOSS_COLUMNS
from .engines import EngineAdapter, detect_engine, forward_takes, run_model, tie_to_outputs, unwrap_model, wrapper_chain
from .fused import Reference, fused_head_loss
from .labels import causal_targets, sequence_ids, shift_token_values
from .losses import check_kl, logits_loss, logits_of
from .models import CausalLMParts, inspect_causal_lm
from .nft import NFTInputs, NFTTally, NFTWeight
from .options import LossCall, LossOptions, Unpack, resolve_options
from .reduction import Reduction
from .stats import TokenStats
from .transform import LogitTransform
from .weights import DFTWeight

__all__ = ["CausalLMLossOutput", "causal_lm_loss"]

# Inputs that are loss arguments, not model arguments.
_LOSS_KEYS = (
    "labels",
    "shift_labels",
    "num_items_in_batch",
    "return_dict",
    "logits_to_keep",
    "use_cache",
    *LOSS_COLUMNS,
)


@dataclass
class CausalLMLossOutput:
    """What [`causal_lm_loss`][dft.causal_lm_loss] returns.

    Attributes:
        loss: 0-dim tensor with its graph: ``head_loss + router_loss``, as the model's own loss.
        stats: [`dft.TokenStats`][dft.TokenStats] of the batch.
        fused: whether the fused head was used (False: logits path).
        aux_loss: a mixture-of-experts model's router load-balancing loss before its coefficient
            (detached), or None.
        head_loss: the DFT loss alone (with its graph).
        router_loss: ``router_aux_loss_coef * aux_loss`` with its graph (None without one). The router
            loss is a per-micro-batch mean: a loop that normalises ``head_loss`` by a global token count
            adds ``router_loss / accumulation_steps`` instead (what
            [`dft.DFTTrainer`][dft.trainer.DFTTrainer] does).
        outputs: the model's own outputs (on the fused path their logits cover the last position only).
        nft: with ``nft=``: the batch's NFT sums ([`dft.nft.NFTTally`][dft.nft.NFTTally]), else None.
    """

    loss: Tensor
    stats: TokenStats
    fused: bool
    aux_loss: Tensor | None = None
    head_loss: Tensor | None = None
    router_loss: Tensor | None = None
    outputs: Any = None
    nft: NFTTally | None = None

    def __post_init__(self) -> None:
        if self.head_loss is None:
            self.head_loss = self.loss


def _warn_logits_path(model: nn.Module, reason: str | None) -> None:
    warnings.warn(
        f"dft: {type(unwrap_model(model)).__name__}: {reason or 'cannot see into this model'}; "
        "computing the DFT loss on full logits instead of the fused head (correct, more memory).",
        RuntimeWarning,
        stacklevel=3,
    )


def causal_lm_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    weighting: DFTWeight | None = None,
    *,
    transform: LogitTransform | None = None,
    num_items_in_batch: int | Tensor | None = None,
    reduction: Reduction = "mean",
    ignore_index: int = -100,
    chunk_size: int | None = None,
    fused: bool = True,
    ref_model: nn.Module | None = None,
    kl_coef: float = 0.0,
    nft: NFTWeight | None = None,
    **options: Unpack[LossOptions],
) -> CausalLMLossOutput:
    """DFT loss of a Hugging Face causal LM on one batch, through the fused LM head.

    The targets are [`dft.labels.causal_targets`][dft.causal_targets] of the batch (shifted labels,
    packing-aware); the model's own logit transform (soft-cap, scale; see [`dft.models`][dft.models]) is
    applied on both paths, then ``transform`` on top of it. Both paths take exactly the same arguments.

    Args:
        model: a transformers ``*ForCausalLM`` (possibly PEFT-, DDP- or compile-wrapped), or any
            module whose ``forward(**inputs)`` returns logits (then the logits path is used).
        inputs: the batch: ``input_ids [B, T]``, ``labels [B, T]`` (unshifted; or ``shift_labels``),
            plus whatever the model takes (``attention_mask``, ``position_ids``, ...).
        weighting: [`dft.DFTWeight`][dft.DFTWeight] (default DFT), or give its fields as flat ``**options``.
        transform: an extra [`dft.LogitTransform`][dft.LogitTransform] after the model's own (e.g. a
            temperature).
        num_items_in_batch: global number of supervised tokens (see
            [`dft.global_num_items`][dft.distributed.global_num_items]); None means the mean over this batch.
        reduction: as in [`dft.dft_loss`][dft.dft_loss].
        ignore_index: as in [`dft.dft_loss`][dft.dft_loss].
        chunk_size: rows per chunk of the fused head (not used on the logits path).
        fused: False forces the logits path.
        ref_model: ASFT's frozen reference (e.g. a copy of the base model), run under ``no_grad``.
            For a PEFT model it may be omitted: the reference is then the same model with its
            adapters disabled (no extra weights in memory).
        kl_coef: ASFT: add ``kl_coef * KL(reference || model)`` per supervised token (see
            [`dft.dft_loss`][dft.dft_loss]); the mean KL is in ``stats.kl``.
        nft: NFT ([`dft.NFTWeight`][dft.NFTWeight]): the batch carries ``accepted`` and ``nft_rhat`` (``[B, T]``
            like ``labels``, or ``[B]``); ``pi_old`` is ``ref_model`` (or, for a PEFT model, itself with its
            adapters disabled), scored in eval mode under ``no_grad`` at ``transform``'s temperature (the same as
            the policy's): only its ``[N]`` target log-probabilities are formed. The token values, ratios and clamp
            counts are in ``output.nft`` ([`dft.nft.NFTTally`][dft.nft.NFTTally]).

    A batch key ``loss_weights`` (``[B, T]`` floats, aligned with ``labels``) weights each token (see
    [`dft.dft_loss`][dft.dft_loss]'s ``token_weights``).

    Returns:
        [`CausalLMLossOutput`][dft.CausalLMLossOutput] with the loss and the batch's
            [`dft.TokenStats`][dft.TokenStats].
    """
    weighting, transform = resolve_options(weighting, transform, dict(options), nft)
    check_kl(kl_coef, True, "")
    if nft is not None and kl_coef > 0:
        raise ValueError("nft and kl_coef > 0 (ASFT) both use the reference model: pick one.")
    targets = causal_targets(inputs, ignore_index)
    call = LossCall(
        weighting,
        transform,
        ignore_index,
        reduction,
        num_items_in_batch,
        return_stats=True,
        kl_coef=kl_coef,
        sequence_ids=sequence_ids(inputs) if reduction == "sequence" else None,  # packed rows: per sequence
        token_weights=token_values(inputs, "loss_weights", targets),
    )
    model_inputs = {k: v for k, v in inputs.items() if k not in _LOSS_KEYS}
    route = _route(model, fused, ref_model, kl_coef > 0 or nft is not None, transform)  # decided once
    step = _Step(model_inputs, targets, call, transform, nft, *(_nft_batch(inputs, targets) if nft else (None, None)))
    if route.parts is None:
        if fused:
            _warn_logits_path(model, route.reason)
        return _logits_path(model, route, step)
    return _fused_path(model, route, step, chunk_size)


def token_values(inputs: Mapping[str, Any], key: str, targets: Tensor) -> Tensor | None:
    """The batch's per-token ``key`` (one of [`LOSS_COLUMNS`][dft.batches.LOSS_COLUMNS]) aligned with ``targets``:
    shifted like the labels (``[B, T]``), taken as it is next to ``shift_labels``, a ``[B]`` value repeated."""
    value = inputs.get(key)
    if value is None:
        return None
    if not isinstance(value, Tensor):
        raise TypeError(f"batch[{key!r}] must be a tensor, got {type(value).__name__}.")
    value = value.to(targets.device)
    if value.dim() == 1 and targets.dim() == 2 and value.shape[0] == targets.shape[0]:
        return value[:, None].expand(targets.shape).to(torch.float32 if not value.is_floating_point() else value.dtype)
    if value.shape != targets.shape:
        raise ValueError(
            f"batch[{key!r}] must have the labels' shape {tuple(targets.shape)}, got {tuple(value.shape)}."
        )
    if not value.is_floating_point():
        value = value.float()
    return shift_token_values(inputs, value)


def _nft_batch(inputs: Mapping[str, Any], targets: Tensor) -> tuple[Tensor, Tensor]:
    """NFT's ``(accepted, rhat)`` of the batch, aligned with the targets (checked before the model runs)."""
    missing = [k for k in ("accepted", "nft_rhat") if inputs.get(k) is None]
    if missing:
        raise ValueError(
            f"nft needs the batch keys {missing} (each sample's verdict and its prompt's acceptance rate): "
            "train on dft sample's samples.jsonl with loss_type='nft', or add them to the batch."
        )
    return token_values(inputs, "accepted", targets), token_values(inputs, "nft_rhat", targets)


@dataclass
class _Step:
    """One batch's loss, decided once: the model's inputs, the targets, the resolved call, NFT's batch values."""

    model_inputs: dict[str, Any]
    targets: Tensor
    call: LossCall
    transform: LogitTransform  # the caller's own (NFT scores pi_old at its temperature too)
    nft: NFTWeight | None = None
    accepted: Tensor | None = None
    rhat: Tensor | None = None

    def with_old_logp(self, old_logp: Tensor) -> LossCall:
        """The call with NFT's inputs, once ``pi_old``'s target log-probabilities are known."""
        return replace(self.call, nft=NFTInputs(old_logp, self.rhat, self.accepted, self.nft))

    def old_logp_call(self, transform: LogitTransform) -> LossCall:
        """``pi_old``'s target log-probabilities as a loss call: CE per token (``-log p``), no reduction."""
        return LossCall(DFTWeight(alpha=0.0), transform, self.call.ignore_index, "none", validate=False)


@dataclass
class _Route:
    """How one batch is computed: the fused head (``parts`` set) or the logits path (``reason``)."""

    parts: CausalLMParts | None
    reason: str | None
    engine: EngineAdapter
    reference: _ReferenceRunner | None = None
    ref_parts: CausalLMParts | None = None


def _route(
    model: nn.Module, fused: bool, ref_model: nn.Module | None, needs_reference: bool, transform: LogitTransform | None
) -> _Route:
    """Phase 1: inspect the model (and ASFT's reference) once; the fused head needs both to be seen into."""
    engine = detect_engine(model)
    parts, reason = inspect_causal_lm(model, engine)
    if parts is not None:
        parts.transform.then(transform)  # validated on both paths (e.g. two soft-caps)
    reference = _reference_runner(model, ref_model) if needs_reference or ref_model is not None else None
    if not fused:
        return _Route(None, None, engine, reference)
    ref_parts = None
    if reference is not None and parts is not None:
        ref_parts, ref_reason = inspect_causal_lm(reference.model)
        if ref_parts is None:
            parts, reason = None, f"the reference model: {ref_reason}"
    return _Route(parts, reason, engine, reference, ref_parts)


def _fused_path(model: nn.Module, route: _Route, step: _Step, chunk_size: int | None) -> CausalLMLossOutput:
    """Phase 2a: the backbone inside the engine's scope, then the fused head on its hidden states."""
    call = replace(step.call, transform=route.parts.transform.then(step.call.transform))
    reference = None if route.reference is None else _reference_head(route, step.model_inputs, step.nft is not None)
    if step.nft is not None:  # pi_old's [N] target log-probabilities, at the caller's temperature
        with torch.no_grad():
            old_transform = reference.transform.then(step.transform)
            old_logp = -fused_head_loss(
                reference.hidden, reference.weight, reference.bias, step.targets, step.old_logp_call(old_transform)
            )
        call = replace(step.with_old_logp(old_logp), transform=call.transform)
        reference = None  # not an ASFT anchor
    copy_weight = route.engine.gathers_params and call.reduction == "none"  # its backward recomputes after the release

    def head_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, TokenStats]:
        if copy_weight:
            weight = _GatheredCopy.apply(weight)
        return fused_head_loss(hidden, weight, bias, step.targets, call, chunk_size, reference)

    (loss, stats), outputs = run_model(
        model, route.parts.backbone, route.parts.head, step.model_inputs, head_loss, route.engine
    )
    return _output(tie_to_outputs(loss, outputs, route.engine), stats, True, model, outputs, call)


def _logits_path(model: nn.Module, route: _Route, step: _Step) -> CausalLMLossOutput:
    """Phase 2b: the whole model, full logits, [`dft.dft_loss`][dft.dft_loss] (the model's own head, hooks and
    all)."""
    call, ref_logits = step.call, None
    if route.reference is not None:
        reference = route.reference
        with torch.no_grad(), reference.context(eval_mode=step.nft is not None):
            ref_logits = logits_of(reference.model(**_no_cache(reference.model, step.model_inputs))).detach()
    if step.nft is not None:
        with torch.no_grad():
            old_logp = -logits_loss(ref_logits, step.targets, step.old_logp_call(step.transform))
        call, ref_logits = step.with_old_logp(old_logp), None
    outputs = model(**_no_cache(model, step.model_inputs))
    loss, stats = logits_loss(logits_of(outputs), step.targets, call, ref_logits)
    return _output(loss, stats, False, model, outputs, call)


def _no_cache(model: nn.Module, model_inputs: dict[str, Any]) -> dict[str, Any]:
    """``use_cache=False`` where the forward takes it, as on the fused path: training needs no KV cache, and
    with one transformers does not detect padding-free packed rows (``position_ids``) for its attention mask."""
    if "use_cache" in model_inputs or not forward_takes(type(unwrap_model(model)), "use_cache"):
        return model_inputs
    return {**model_inputs, "use_cache": False}


def _reference_head(route: _Route, model_inputs: dict[str, Any], eval_mode: bool = False) -> Reference:
    """The frozen reference's (ASFT's anchor, NFT's ``pi_old``) hidden states and head, read inside its own
    forward; ``eval_mode``: run it in eval mode (no dropout)."""
    reference, ref_parts = route.reference, route.ref_parts
    ref_engine = detect_engine(reference.model)
    with torch.no_grad(), reference.context(eval_mode):
        (ref_hidden, ref_weight, ref_bias), _ = run_model(
            reference.model,
            ref_parts.backbone,
            ref_parts.head,
            model_inputs,
            functools.partial(_frozen_head, copy=ref_engine.gathers_params),
            ref_engine,
        )
    return Reference(ref_hidden, ref_weight, ref_bias, ref_parts.transform)


class _GatheredCopy(torch.autograd.Function):
    """``weight.clone()`` whose gradient goes to ``weight``: ``reduction="none"`` recomputes the chunks in its
    backward, after FSDP2 / ZeRO-3 have released the gathered weight (one ``[V, H]`` copy, that path only)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor) -> Tensor:
        return weight.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def _frozen_head(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, copy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """ASFT's reference head, read inside its forward (copied when the engine frees the gathered weight after)."""
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    if copy:
        weight, bias = weight.clone(), None if bias is None else bias.clone()
    return hidden.detach(), weight, bias


def _output(
    loss: Tensor, stats: TokenStats, fused: bool, model: nn.Module, outputs: Any, call: LossCall
) -> CausalLMLossOutput:
    router, aux = _router_loss(model, outputs, loss)
    total = loss if router is None else loss + router
    nft = None if call.nft is None else call.nft.tally
    return CausalLMLossOutput(
        loss=total, stats=stats, fused=fused, aux_loss=aux, head_loss=loss, router_loss=router, outputs=outputs, nft=nft
    )


@dataclass
class _ReferenceRunner:
    """How to run ASFT's reference: a separate frozen model, or the policy with its adapters disabled."""

    model: nn.Module
    peft_model: nn.Module | None = None  # set when the reference is ``model`` with adapters disabled

    @contextlib.contextmanager
    def context(self, eval_mode: bool = False) -> Iterator[None]:
        """Inside: the reference (the adapters disabled for a PEFT model; eval mode when asked, restored after)."""
        was_training = self.model.training
        if eval_mode:
            self.model.eval()
        try:
            with self.peft_model.disable_adapter() if self.peft_model is not None else contextlib.nullcontext():
                yield
        finally:
            if eval_mode:
                self.model.train(was_training)


def _find_peft(model: nn.Module) -> nn.Module | None:
    """The PEFT model among ``model``'s wrappers (its adapters can be disabled), or None."""
    return next(
        (m for m in wrapper_chain(model) if hasattr(m, "disable_adapter") and hasattr(m, "get_base_model")), None
    )


def _reference_runner(model: nn.Module, ref_model: nn.Module | None) -> _ReferenceRunner:
    if ref_model is not None:
        return _ReferenceRunner(model=ref_model)
    peft = _find_peft(model)
    if peft is None:
        raise ValueError(
            "kl_coef > 0 (ASFT) or nft needs a reference model (NFT's: the policy that sampled): pass ref_model= (a "
            "frozen copy of the base model), or train a PEFT model, whose reference is itself with its adapters "
            "disabled."
        )
    return _ReferenceRunner(model=model, peft_model=peft)


def _router_loss(model: nn.Module, outputs: Any, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``(router_aux_loss_coef * aux_loss, aux_loss detached)`` when the model returned a router loss.

    Exactly what transformers' MoE models (Mixtral, Qwen3-MoE, OLMoE, ...) add to their own loss when
    ``output_router_logits`` is on: per micro-batch, not normalised by ``num_items_in_batch``.
    """
    aux = outputs.get("aux_loss") if isinstance(outputs, Mapping) else None
    if not isinstance(aux, Tensor):
        return None, None
    config = getattr(unwrap_model(model), "config", None)
    coef = getattr(config, "router_aux_loss_coef", None)
    if coef is None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else None
        coef = getattr(text, "router_aux_loss_coef", None)
    if coef is None:
        warnings.warn(
            "dft: the model returned aux_loss but its config has no router_aux_loss_coef; the aux loss is not added.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, aux.detach()
    return float(coef) * aux.to(like.device, like.dtype), aux.detach()
