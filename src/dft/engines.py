"""What each training engine needs from the fused head, in one place (one small adapter per engine).

The fused head forms its gradients in the forward pass, so from whatever wraps the model it needs
(1) the head weight *gathered* at loss time, (2) the training's compute dtype, and (3) its weight
gradient going through the engine's *own* reduction. Every engine provides all three inside the
head module's own forward call:

* plain / DDP / DeepSpeed ZeRO-0..2: parameters are whole; DDP's and ZeRO's gradient hooks fire on
  the parameter's gradient accumulation, whoever produces the gradient.
* FSDP2 (``fully_shard``: head in the root unit, in accelerate's ``[norm, lm_head]`` tail group, or a
  unit of its own; ``reshard_after_forward`` true or false): the pre-forward hook swaps the gathered
  parameter in, the post-forward hook reshards it, the post-backward hook on the unit's *inputs*
  reduce-scatters the gradient.
* tensor parallel (transformers ``tp_plan="auto"``, torch ``ColwiseParallel`` on the head): the head
  weight stays a ``Shard(0)`` DTensor (this rank's vocabulary rows); the loss combines the row
  statistics over the tensor-parallel group ([`dft.vocab_parallel`][dft.vocab_parallel]) and never gathers it.
* DeepSpeed ZeRO-3: the pre-forward hook all-gathers the module's partitioned parameters, the
  post-forward hook releases them, a hook on each parameter's gradient accumulation reduce-scatters.

So [`run_model`][dft.engines.run_model] runs the wrapper's own forward (DDP arms its reducer there, FSDP2 / ZeRO-3 run
their hooks) with one position of logits, takes the backbone's full hidden states from a forward hook,
and calls the loss from a forward hook on the head placed *before* the engine's post-forward hooks:
the weight it sees is the gathered one, in the compute dtype. The hidden states are tied to the
head's (hooked) input with a zero gradient, so the engine's post-backward hooks on the head's inputs
run after the loss's gradients exist. Engines whose pre-backward hooks sit on module outputs (FSDP2,
ZeRO-3) also get the loss tied to the model's outputs (a zero gradient through the one-position head).

The adapters below only say how to recognise an engine, whether the fused head can run under it and
whether it gathers parameters per module; nothing else in the library checks for engines.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .fused import head_weight_refilled_in_place

__all__ = ["ENGINES", "EngineAdapter", "detect_engine", "forward_takes", "run_model", "unwrap_model", "wrapper_chain"]


def _class_names(obj: object) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _any_module(model: nn.Module, predicate: Callable[[nn.Module], bool]) -> bool:
    return any(predicate(m) for m in model.modules())


def _is_fsdp2_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FSDPModule)


def _is_deepspeed_engine(model: object) -> bool:
    return "DeepSpeedEngine" in _class_names(model)


def _has_dtensor_params(model: nn.Module) -> bool:
    """Parameters are DTensors outside FSDP2 (checked before): transformers ``tp_plan`` / torch
    ``parallelize_module``. The head weight, a ``Shard(0)`` DTensor, goes to
    [`dft.vocab_parallel`][dft.vocab_parallel]."""
    from .vocab_parallel import is_dtensor

    return any(is_dtensor(p) for p in model.parameters())


def _has_zero3_params(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@dataclass(frozen=True)
class EngineAdapter:
    """How one engine wraps a model.

    Attributes:
        name: shown in messages and [`detect_engine`][dft.engines.detect_engine].
        matches: ``model -> bool`` on the object handed to the loss (the wrapper, or the module
            inside it for engines that only install hooks).
        fused_reason: None when the fused head runs under this engine, else why it cannot (the
            logits path is then taken, with one warning).
        gathers_params: parameters are gathered around each module's forward and freed after it
            (FSDP2, ZeRO-3). Their pre-backward hooks sit on module outputs, so the loss is made to
            depend on the model's outputs (costs a one-position head backward), and a frozen
            reference head is copied while it is gathered.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    fused_reason: str | None = None
    gathers_params: bool = False


ENGINES: tuple[EngineAdapter, ...] = (
    EngineAdapter(
        "deepspeed-zero3",
        lambda m: (
            (_is_deepspeed_engine(m) and getattr(m, "zero_optimization_stage", lambda: 0)() == 3)
            or _has_zero3_params(m)
        ),
        gathers_params=True,
    ),
    EngineAdapter("deepspeed", _is_deepspeed_engine),
    EngineAdapter(
        "fsdp1",
        lambda m: _any_module(m, lambda x: "FullyShardedDataParallel" in _class_names(x)),
        fused_reason="FSDP1 flattens parameters (the head's weight is not a usable tensor in its forward); "
        "use FSDP2 (fsdp_version: 2)",
    ),
    EngineAdapter("fsdp2", lambda m: _any_module(m, _is_fsdp2_module), gathers_params=True),
    EngineAdapter(
        "data-parallel",
        lambda m: isinstance(m, nn.DataParallel) and len(m.device_ids) > 1,
        fused_reason="nn.DataParallel runs its replicas in threads that share the head's hooks; launch one "
        "process per GPU (torchrun / accelerate launch) for the fused head",
    ),
    EngineAdapter("ddp", lambda m: "DistributedDataParallel" in _class_names(m)),
    EngineAdapter("tensor-parallel", lambda m: _has_dtensor_params(m)),
    EngineAdapter("plain", lambda m: True),
)
"""Checked in order; the first that matches is the model's engine."""


def detect_engine(model: nn.Module) -> EngineAdapter:
    """The [`EngineAdapter`][dft.engines.EngineAdapter] of ``model`` (a DeepSpeed engine, DDP, an FSDP2 model, a
    plain module)."""
    inner = unwrap_model(model)
    for engine in ENGINES:
        if engine.matches(model) or (inner is not model and engine.matches(inner)):
            return engine
    raise AssertionError("unreachable: the plain adapter matches every model")  # pragma: no cover


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model`` and every module inside its wrappers, outermost first: DDP/DataParallel/FSDP1/DeepSpeed
    (``.module``), ``torch.compile`` (``._orig_mod``), PEFT (``get_base_model()``)."""
    chain, seen = [model], {id(model)}
    while True:
        names = _class_names(model)
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif names & {"DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine"}:
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
        if id(model) in seen:
            return chain
        seen.add(id(model))
        chain.append(model)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside every wrapper of [`wrapper_chain`][dft.engines.wrapper_chain]."""
    return wrapper_chain(model)[-1]


@functools.cache
def forward_takes(cls: type, name: str) -> bool:
    """Whether ``cls.forward`` takes the keyword ``name`` (read once per model class, not every step)."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _forward_takes_logits_to_keep(cls: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


class _TiedTo(torch.autograd.Function):
    """``x`` unchanged, made to depend on ``anchors`` (zero gradient to them).

    Orders backward: whatever hooks the engine put on the anchors' graph (the head's inputs, the
    model's outputs) runs after the gradient of ``x`` is known.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, *anchors: Tensor) -> Tensor:
        ctx.zeros = [_zeros_for(a) for a in anchors]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
        return (grad, *(zeros() for zeros in ctx.zeros))


def _zeros_for(anchor: Tensor) -> Callable[[], Tensor]:
    """A maker of the anchor's zero gradient, without keeping the anchor: a DTensor anchor (the head's input
    after torch's ``ColwiseParallel`` input hook made it ``Replicate()``) needs a DTensor gradient of its layout."""
    from .vocab_parallel import is_dtensor

    if is_dtensor(anchor):
        dtensor, mesh, placements = type(anchor), anchor.device_mesh, anchor.placements
        shape, stride, local = anchor.shape, anchor.stride(), anchor.to_local()
        local_shape, dtype, device = local.shape, local.dtype, local.device
        return lambda: dtensor.from_local(
            torch.zeros(local_shape, dtype=dtype, device=device), mesh, placements, run_check=False,
            shape=shape, stride=stride,
        )  # fmt: skip
    shape, dtype, device = anchor.shape, anchor.dtype, anchor.device
    return lambda: torch.zeros(shape, dtype=dtype, device=device)


def _tied_to(x: Tensor, anchors: Any) -> Tensor:
    if isinstance(anchors, Mapping):
        anchors = anchors.values()
    elif isinstance(anchors, Tensor):
        anchors = (anchors,)
    elif not isinstance(anchors, (tuple, list)):
        anchors = ()
    tensors = [a for a in anchors if isinstance(a, Tensor) and a.requires_grad]
    if not tensors or not x.requires_grad or not torch.is_grad_enabled():
        return x
    return _TiedTo.apply(x, *tensors)


HeadLoss = Callable[[Tensor, Tensor, "Tensor | None"], Any]
"""``head_loss(hidden [B, T, H], gathered head weight [V, H], head bias [V] | None)`` -> anything."""


def _hidden_of(output: Any) -> Tensor:
    return output["last_hidden_state"] if isinstance(output, Mapping) else output[0]


def _with_last_position(output: Any) -> Any:
    """The backbone's output with its hidden states cut to the last position (for models without
    ``logits_to_keep``: their head then computes one position of logits)."""
    if isinstance(output, Mapping):
        output["last_hidden_state"] = output["last_hidden_state"][:, -1:]
        return output
    return (output[0][:, -1:], *output[1:])


def _check_gathered(weight: Tensor) -> None:
    """The head weight as the fused head can use it: whole, or a vocabulary shard (a ``Shard(0)`` DTensor,
    tensor parallel: [`dft.vocab_parallel`][dft.vocab_parallel] combines the rows). A ZeRO-3 partition left empty or any
    other DTensor layout is an engine the fused head does not know."""
    from .vocab_parallel import is_dtensor

    if weight.numel() == 0 or (is_dtensor(weight) and not _is_vocab_sharded(weight)):
        layout = f" (DTensor placements {weight.placements})" if is_dtensor(weight) else ""
        raise RuntimeError(
            f"dft: the LM head weight is not gathered inside the head's forward{layout}; this engine is not "
            "supported by the fused head: use fused_lm_head=False and report the engine."
        )


def _is_vocab_sharded(weight: Tensor) -> bool:
    from torch.distributed.tensor import Replicate, Shard

    return all(
        isinstance(p, (Replicate, Shard)) and (not isinstance(p, Shard) or p.dim == 0) for p in weight.placements
    )


def run_model(
    model: nn.Module,
    backbone: nn.Module,
    head: nn.Module,
    model_inputs: dict[str, Any],
    head_loss: HeadLoss,
    engine: EngineAdapter | None = None,
) -> tuple[Any, Any]:
    """Run ``model`` through its wrapper's forward and call ``head_loss`` where the engine has the head gathered.

    Args:
        model: the model as the training loop holds it (DDP / DeepSpeed engine / FSDP2 / plain).
        backbone: the module whose output's first element is the final hidden states ``[B, T, H]``.
        head: the output embedding module (``nn.Linear``) the model calls on them.
        model_inputs: keyword inputs of the model's forward (no labels).
        head_loss: called once, inside the head's forward, as ``head_loss(hidden, weight, bias)``.
        engine: the model's [`EngineAdapter`][dft.engines.EngineAdapter] (detected when None).

    Returns:
        ``(head_loss's result, model outputs)``; the model's logits cover one position only.
    """
    engine = engine or detect_engine(model)
    _keep_head_loss_out_of_graphs()
    keep = _forward_takes_logits_to_keep(type(unwrap_model(model)))
    hidden: list[Tensor] = []
    results: list[Any] = []

    def backbone_hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        hidden.append(_hidden_of(output))
        return None if keep else _with_last_position(output)

    def head_hook(module: nn.Module, args: Any, _output: Any) -> None:
        if len(hidden) != 1:
            raise RuntimeError(f"dft: expected one backbone call before the LM head, got {len(hidden)}.")
        weight, bias = module.weight, module.bias
        _check_gathered(weight)
        with head_weight_refilled_in_place(engine.gathers_params):
            results.append(_call_head_loss(head_loss, _tied_to(hidden[0], args), weight, bias))

    handles = [
        backbone.register_forward_hook(backbone_hook),
        head.register_forward_hook(head_hook, prepend=True),  # before the engine's post-forward release
    ]
    try:
        extra = {"logits_to_keep": 1} if keep else {}
        outputs = model(**model_inputs, **extra, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(results) != 1:
        raise RuntimeError(
            f"dft: expected one LM-head call in {type(unwrap_model(model)).__name__}.forward, got {len(results)}."
        )
    return results[0], outputs


def _head_loss_call(head_loss: HeadLoss, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Any:
    return head_loss(hidden, weight, bias)


_head_loss_not_compiled: Callable[..., Any] | None = None


def _keep_head_loss_out_of_graphs() -> None:
    """Called outside any trace: once ``torch._dynamo`` is loaded (someone compiles), the head's loss is
    wrapped in ``torch.compiler.disable`` (the chunk loop has data-dependent shapes). Until then nothing
    compiles, and ``import dft`` does not pay for importing dynamo."""
    global _head_loss_not_compiled
    if _head_loss_not_compiled is None and "torch._dynamo" in sys.modules:
        _head_loss_not_compiled = torch.compiler.disable(_head_loss_call)


def _call_head_loss(head_loss: HeadLoss, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Any:
    """The head's loss, outside any ``torch.compile`` graph (see ``_keep_head_loss_out_of_graphs``)."""
    call = _head_loss_call if _head_loss_not_compiled is None else _head_loss_not_compiled
    return call(head_loss, hidden, weight, bias)


def tie_to_outputs(loss: Tensor, outputs: Any, engine: EngineAdapter) -> Tensor:
    """``loss`` made to depend on the model's outputs when the engine's pre-backward hooks need it."""
    return _tied_to(loss, outputs) if engine.gathers_params else loss
