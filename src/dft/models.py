"""Find the backbone, output head, logit scale and final softcap of a Hugging Face causal LM.

One helper shared by every adapter (Trainer, plain loops, accelerate). It never patches the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .transform import LogitTransform

__all__ = [
    "LOGIT_RULES",
    "CausalLMParts",
    "LogitRule",
    "find_causal_lm_parts",
    "inspect_causal_lm",
    "logit_transform_from_config",
    "unwrap_model",
]


@dataclass(frozen=True)
class CausalLMParts:
    """What the fused loss needs from a causal LM.

    Attributes:
        backbone: module returning the final (normed) hidden states ``[B, T, H]`` as ``outputs[0]``.
        head: the output embedding (``nn.Linear``, tied or not).
        transform: how the model turns ``head(hidden)`` into logits (:class:`dft.LogitTransform`).
    """

    backbone: nn.Module
    head: nn.Linear
    transform: LogitTransform = LogitTransform()

    @property
    def logit_scale(self) -> float:
        return self.transform.logit_scale

    @property
    def softcap(self) -> float | None:
        return self.transform.softcap

    def head_weight(self) -> tuple[Tensor, Tensor | None]:
        """``(weight [V, H], bias [V] | None)`` as the head's own forward would see them.

        Call it inside the model's forward (see :func:`dft.causal_lm_loss`): FSDP2 has then swapped
        in the gathered parameters. A sharded ``DTensor`` here means the head is not gathered (it is
        its own FSDP unit, or this is called outside the forward): gathering it ourselves would
        bypass FSDP's gradient reduction, so that is an error.
        """
        weight, bias = self.head.weight, self.head.bias
        if _is_dtensor(weight) or _is_dtensor(bias):
            raise RuntimeError(
                "dft: the LM head weight is a sharded DTensor at loss time; call the fused head inside the model's "
                "forward (dft.causal_lm_loss does) or use fused=False."
            )
        return weight, bias

    def frozen_head_weight(self) -> tuple[Tensor, Tensor | None]:
        """The head's full weight and bias, detached, outside any forward (a frozen reference model).

        A sharded ``DTensor`` (FSDP2) is gathered with ``full_tensor()`` under ``no_grad``: no gradient
        flows to a reference, so nothing bypasses the engine's gradient reduction.
        """
        weight, bias = self.head.weight, self.head.bias
        with torch.no_grad():
            weight = weight.full_tensor() if _is_dtensor(weight) else weight
            bias = bias.full_tensor() if _is_dtensor(bias) else bias
        return weight.detach(), None if bias is None else bias.detach()


def _is_dtensor(t: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP1 (``.module``), ``torch.compile`` (``._orig_mod``) and PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
    return model


def _is_plain_linear(module: object) -> bool:
    """An ``nn.Linear`` whose forward is exactly ``x @ W.T + b`` (no LoRA / quantisation wrapper)."""
    return (
        isinstance(module, nn.Linear) and type(module).__module__.startswith("torch.") and not hasattr(module, "lora_A")
    )


def _head_is_partitioned(model: nn.Module, head: nn.Module) -> bool:
    """Engines where the fused head would not see the head's gathered weight: use the logits path.

    * DeepSpeed ZeRO-3 gathers a module's parameters only around that module's own forward (the
      head's forward runs on one position only, after the backbone).
    * FSDP1 flattens parameters; the original ``lm_head.weight`` is not a usable view in our hook.
    * FSDP2 with the head as its own unit (``fully_shard(model.lm_head)``): gathered only in its
      own forward, like ZeRO-3. The head inside the root unit (accelerate's default) is fused.
    """
    if hasattr(head.weight, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
        return True
    if _is_fsdp2_unit(head):
        return True
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in (model, *model.modules()))


def _is_fsdp2_unit(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(module, FSDPModule)


@dataclass(frozen=True)
class LogitRule:
    """One config attribute by which a model family changes its logits after the head matmul.

    ``effect``: ``"multiply"`` (logits times the value), ``"divide"`` (logits over the value),
    ``"softcap"`` (``c * tanh(logits / c)``, applied after any scaling), or ``"dim_ratio"`` (times
    ``value / hidden_size``: MiniCPM's ``scale_width``, which divides the hidden states by
    ``hidden_size / dim_model_base`` before a bias-free head).
    """

    attribute: str
    effect: Literal["multiply", "divide", "softcap", "dim_ratio"]
    families: str
    model_types: frozenset[str] | None = None  # only these ``config.model_type`` (None: any)
    exclude_model_types: frozenset[str] = frozenset()


LOGIT_RULES: tuple[LogitRule, ...] = (
    LogitRule("logit_scale", "multiply", "Cohere, Cohere 2"),
    LogitRule("output_multiplier", "multiply", "Muse Glimmer"),
    LogitRule("lm_head_multiplier", "multiply", "Falcon-H1"),
    LogitRule("logits_scaling", "multiply", "HyperCLOVA X", model_types=frozenset({"hyperclovax"})),
    LogitRule(
        "logits_scaling",
        "divide",
        "Granite, Granite MoE, MiniCPM3 (hidden states divided before the head)",
        exclude_model_types=frozenset({"hyperclovax"}),
    ),
    LogitRule("dim_model_base", "dim_ratio", "MiniCPM (remote code, scale_width)", model_types=frozenset({"minicpm"})),
    LogitRule("final_logit_softcapping", "softcap", "Gemma 2, Gemma 3"),
)
"""How each known family turns the head's output into logits; the fused head applies exactly these."""

# Config attributes that look like logit transforms but act inside the backbone (attention, routers).
BACKBONE_ATTRIBUTES: frozenset[str] = frozenset(
    {"attn_logit_softcapping", "attention_multiplier", "embedding_multiplier", "residual_multiplier"}
)
_LOOKS_LIKE_HEAD_TRANSFORM = re.compile(r"logit.*(scal|mult|cap)|(lm_head|output|head).*(mult|scal)", re.IGNORECASE)


def _rule_applies(rule: LogitRule, model_type: str) -> bool:
    if rule.model_types is not None and model_type not in rule.model_types:
        return False
    return model_type not in rule.exclude_model_types


def _is_neutral(value: object) -> bool:
    return value is None or value is False or (isinstance(value, (int, float)) and float(value) == 1.0)


def logit_transform_from_config(config: object) -> tuple[LogitTransform | None, str | None]:
    """The model's :class:`LogitTransform` from its (text) config by :data:`LOGIT_RULES`.

    Returns ``(transform, None)``, or ``(None, reason)`` when the config carries an attribute that
    looks like a head transform (``*logit*scal*``, ``*head*multiplier*``, ...) and no rule covers it:
    the caller must then use the logits path rather than a possibly wrong fused loss.
    """
    model_type = str(getattr(config, "model_type", ""))
    scale, softcap, covered = 1.0, None, set(BACKBONE_ATTRIBUTES)
    for rule in LOGIT_RULES:
        value = getattr(config, rule.attribute, None)
        if not _rule_applies(rule, model_type):
            continue
        covered.add(rule.attribute)
        if value is None or value is False:
            continue
        if rule.effect == "multiply":
            scale *= float(value)
        elif rule.effect == "divide":
            scale /= float(value)
        elif rule.effect == "dim_ratio":
            if getattr(config, "scale_width", True):
                scale *= float(value) / float(config.hidden_size)
        elif rule.effect == "softcap":
            softcap = float(value)
    names = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    unknown = sorted(
        name
        for name, value in names.items()
        if name not in covered and _LOOKS_LIKE_HEAD_TRANSFORM.search(name) and not _is_neutral(value)
    )
    if unknown:
        return None, (
            f"config attribute(s) {unknown} of model type {model_type!r} may change the logits and no rule in "
            "dft.models.LOGIT_RULES covers them"
        )
    return LogitTransform(logit_scale=scale, softcap=softcap), None


def find_causal_lm_parts(model: nn.Module) -> CausalLMParts | None:
    """Backbone + head of a transformers causal LM, or None when the model cannot be seen into.

    See :func:`inspect_causal_lm` for the reason when it is None.
    """
    return inspect_causal_lm(model)[0]


def inspect_causal_lm(model: nn.Module) -> tuple[CausalLMParts | None, str | None]:
    """``(parts, None)`` for a model the fused head can serve, else ``(None, why not)``.

    Works for ``*ForCausalLM`` models and the text path of ``*ForConditionalGeneration`` models
    (Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3, Cohere, Granite, Falcon-H1, MoE models, ...; the
    families checked are listed in the README), tied or untied embeddings, PEFT-wrapped models
    (LoRA inside the backbone), DDP, FSDP2 (head in the root unit) and compiled models. The logits
    path is needed when the output head is not a plain ``nn.Linear`` (LoRA on ``lm_head``, a
    quantised head), when no backbone attribute is found, under DeepSpeed ZeRO-3 / FSDP1 (the head's
    full weight only exists inside their forward), or when the config has a logit transform that
    :data:`LOGIT_RULES` does not know.
    """
    inner = unwrap_model(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    prefix = getattr(inner, "base_model_prefix", "")
    backbone = getattr(inner, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module):  # transformers < 5: some models keep the backbone as `.model`
        backbone = getattr(inner, "model", None)
    if not _is_plain_linear(head):
        return None, "the output head is not a plain nn.Linear (LoRA or quantisation on lm_head?)"
    if not isinstance(backbone, nn.Module) or backbone is inner:
        return None, "no backbone module found through base_model_prefix"
    if _head_is_partitioned(model, head):
        return None, "the engine (DeepSpeed ZeRO-3, FSDP1, or FSDP2 with lm_head as its own unit) partitions the head"
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    transform, reason = logit_transform_from_config(text_config)
    if transform is None:
        return None, reason
    return CausalLMParts(backbone=backbone, head=head, transform=transform), None
