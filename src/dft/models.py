"""Find the backbone, output head, logit scale and final softcap of a Hugging Face causal LM.

One helper shared by every adapter (Trainer, plain loops, accelerate). It never patches the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .transform import LogitTransform

__all__ = ["CausalLMParts", "find_causal_lm_parts", "unwrap_model"]


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


def find_causal_lm_parts(model: nn.Module) -> CausalLMParts | None:
    """Backbone + head of a transformers causal LM, or None when the model cannot be seen into.

    Works for ``*ForCausalLM`` models (Llama, Qwen2, Mistral, Gemma/Gemma2/3, Phi, Cohere, Granite, ...),
    tied or untied embeddings, PEFT-wrapped models (LoRA inside the backbone), DDP and compiled models.
    Returns None when the output head is not a plain ``nn.Linear`` (e.g. LoRA on ``lm_head``, a
    quantised head), when no backbone attribute is found, or under DeepSpeed ZeRO-3 / FSDP1 (the
    head's full weight only exists inside their forward): callers then use the logits path.
    FSDP2 keeps the fused head when the head lies in the root unit: the loss runs inside the
    model's forward, where FSDP2 has gathered the weight.
    """
    inner = unwrap_model(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    prefix = getattr(inner, "base_model_prefix", "")
    backbone = getattr(inner, prefix, None) if prefix else None
    if not _is_plain_linear(head) or not isinstance(backbone, nn.Module) or backbone is inner:
        return None
    if _head_is_partitioned(model, head):
        return None
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = float(getattr(text_config, "logit_scale", None) or 1.0)
    granite = getattr(text_config, "logits_scaling", None)
    if granite:
        scale /= float(granite)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    transform = LogitTransform(logit_scale=scale, softcap=float(softcap) if softcap else None)
    return CausalLMParts(backbone=backbone, head=head, transform=transform)
