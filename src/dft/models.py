"""Find the backbone, output head, logit scale and final softcap of a Hugging Face causal LM.

One helper shared by every adapter (Trainer, plain loops, accelerate). It never patches the model.
"""

from __future__ import annotations

import functools
import re
import weakref
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .engines import EngineAdapter, detect_engine, unwrap_model
from .transform import LogitTransform

__all__ = [
    "LOGIT_RULES",
    "CausalLMParts",
    "LogitRule",
    "find_causal_lm_parts",
    "foreign_hooks",
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
        transform: how the model turns ``head(hidden)`` into logits ([`dft.LogitTransform`][dft.LogitTransform]).
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


def _is_plain_linear(module: object) -> bool:
    """An ``nn.Linear`` whose forward is exactly ``x @ W.T + b`` (no LoRA / quantisation wrapper)."""
    return (
        isinstance(module, nn.Linear) and type(module).__module__.startswith("torch.") and not hasattr(module, "lora_A")
    )


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
_RULE_ATTRIBUTES = frozenset(rule.attribute for rule in LOGIT_RULES) | {"hidden_size", "scale_width"}
_LOOKS_LIKE_HEAD_TRANSFORM = re.compile(r"logit.*(scal|mult|cap)|(lm_head|output|head).*(mult|scal)", re.IGNORECASE)


def _rule_applies(rule: LogitRule, model_type: str) -> bool:
    if rule.model_types is not None and model_type not in rule.model_types:
        return False
    return model_type not in rule.exclude_model_types


def _is_neutral(value: object) -> bool:
    return value is None or value is False or (isinstance(value, (int, float)) and float(value) == 1.0)


@functools.cache
def _looks_like_head_transform(name: str) -> bool:
    return bool(_LOOKS_LIKE_HEAD_TRANSFORM.search(name))


def _config_items(config: object) -> list[tuple[str, object]]:
    """The config's own attributes (no deep copy: ``to_dict()`` copies nested configs every call)."""
    try:
        return list(vars(config).items())
    except TypeError:
        return [(name, getattr(config, name, None)) for name in dir(config) if not name.startswith("_")]


def logit_transform_from_config(config: object) -> tuple[LogitTransform | None, str | None]:
    """The model's [`LogitTransform`][dft.LogitTransform] from its (text) config by
    [`LOGIT_RULES`][dft.models.LOGIT_RULES].

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
    unknown = sorted(
        name
        for name, value in _config_items(config)
        if name not in covered and _looks_like_head_transform(name) and not _is_neutral(value)
    )
    if unknown:
        return None, (
            f"config attribute(s) {unknown} of model type {model_type!r} may change the logits and no rule in "
            "dft.models.LOGIT_RULES covers them"
        )
    return LogitTransform(logit_scale=scale, softcap=softcap), None


def find_causal_lm_parts(model: nn.Module) -> CausalLMParts | None:
    """Backbone + head of a transformers causal LM, or None when the model cannot be seen into.

    See [`inspect_causal_lm`][dft.models.inspect_causal_lm] for the reason when it is None.
    """
    return inspect_causal_lm(model)[0]


def inspect_causal_lm(model: nn.Module, engine: EngineAdapter | None = None) -> tuple[CausalLMParts | None, str | None]:
    """``(parts, None)`` for a model the fused head can serve, else ``(None, why not)``.

    Works for ``*ForCausalLM`` models and the text path of ``*ForConditionalGeneration`` models
    (Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3, Cohere, Granite, Falcon-H1, MoE models, ...; the
    families checked are listed in the README), tied or untied embeddings, PEFT-wrapped models
    (LoRA inside the backbone), DDP, DeepSpeed, FSDP2 and compiled models. The logits
    path is needed when the output head is not a plain ``nn.Linear`` (LoRA on ``lm_head``, a
    quantised head), when no backbone attribute is found, under FSDP1 (see [`dft.engines`][dft.engines]), or
    when the config has a logit transform that [`LOGIT_RULES`][dft.models.LOGIT_RULES] does not know, or when a hook
    that the library did not put there (a module hook on the head, a global module hook) would change what
    the head computes ([`foreign_hooks`][dft.models.foreign_hooks]). Every other engine (DDP, DeepSpeed ZeRO-0..3, FSDP2
    however the head is grouped, tensor parallel) runs the fused head. ``engine``: the model's
    [`dft.engines.EngineAdapter`][dft.engines.EngineAdapter] when already detected.
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
    hooks = foreign_hooks(head)
    if hooks:
        return None, f"{hooks[0]} would be skipped by the fused head"
    engine = engine or detect_engine(model)
    if engine.fused_reason is not None:
        return None, engine.fused_reason
    config = getattr(inner, "config", None)
    if not _is_hf_config(config):
        return None, "the model has no transformers config (its logit transform is unknown)"
    transform, reason = _cached_transform(config)
    if transform is None:
        return None, reason
    return CausalLMParts(backbone=backbone, head=head, transform=transform), None


_KNOWN_HOOK_OWNERS = ("torch", "deepspeed", "accelerate", "transformers", "peft", "dft", "trl")
"""Packages whose hooks on the head are engine or library plumbing (FSDP2's and ZeRO-3's gather/release,
accelerate's device alignment, transformers' output recording); any other hook is the user's."""


def _hook_owner(hook: object) -> str:
    fn = getattr(hook, "func", hook)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # bound method
    return str(getattr(fn, "__module__", None) or type(fn).__module__ or "")


def foreign_hooks(head: nn.Module) -> list[str]:
    """Hooks on ``head`` (and global module hooks) that the fused head would skip, described for a warning.

    The fused head reads ``head.weight`` inside the head's forward and never uses the head's output:
    a forward pre-hook that changes the input, a forward hook that changes the logits, or a backward
    hook on the head would silently not apply. Hooks owned by the engines and libraries in
    ``_KNOWN_HOOK_OWNERS`` are recognised as theirs.
    """
    from torch.nn.modules import module as nn_module

    found = []
    for kind, hooks in (
        ("forward pre-hook on lm_head", head._forward_pre_hooks),
        ("forward hook on lm_head", head._forward_hooks),
        ("backward hook on lm_head", head._backward_hooks),
        ("backward pre-hook on lm_head", head._backward_pre_hooks),
        ("global forward pre-hook", nn_module._global_forward_pre_hooks),
        ("global forward hook", nn_module._global_forward_hooks),
        ("global backward hook", nn_module._global_backward_hooks),
        ("global backward pre-hook", nn_module._global_backward_pre_hooks),
    ):
        for hook in hooks.values():
            owner = _hook_owner(hook)
            if owner.split(".")[0] not in _KNOWN_HOOK_OWNERS:  # a package, not a prefix: 'trlx' is a user's
                found.append(f"a {kind} ({getattr(hook, '__qualname__', type(hook).__name__)} from {owner or '?'})")
    return found


def _is_hf_config(config: object) -> bool:
    try:
        from transformers import PretrainedConfig
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(config, PretrainedConfig)


_TRANSFORM_CACHE: dict[int, tuple[weakref.ref, tuple, tuple[LogitTransform | None, str | None]]] = {}


def _cached_transform(config: object) -> tuple[LogitTransform | None, str | None]:
    """[`logit_transform_from_config`][dft.models.logit_transform_from_config] of the text config, recomputed only
    when a relevant attribute changed."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    key = (str(getattr(text, "model_type", "")),) + tuple(
        (name, repr(value))
        for name, value in _config_items(text)
        if name in _RULE_ATTRIBUTES or _looks_like_head_transform(name)
    )
    hit = _TRANSFORM_CACHE.get(id(text))  # configs are unhashable: keyed by id, checked by a weak reference
    if hit is not None and hit[0]() is text and hit[1] == key:
        return hit[2]
    result = logit_transform_from_config(text)
    ident = id(text)
    try:
        ref = weakref.ref(text, lambda _r: _TRANSFORM_CACHE.pop(ident, None))
    except TypeError:  # not weak-referenceable: not cached
        return result
    _TRANSFORM_CACHE[ident] = (ref, key, result)
    return result
