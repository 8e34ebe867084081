"""The DFT loss options as dataclass fields: ``DFTArguments``, shared by [`dft.DFTConfig`][dft.trainer.DFTConfig]
(``TrainingArguments`` + these) and TRL's [`DFTSFTConfig`][dft.trl_compat.DFTSFTConfig], with their checks.

Nothing here imports transformers: the command line checks its flags with these before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .weights import DFTWeight

__all__ = ["DFTArguments", "ce_token_ids", "check_numeric_fields"]

LOSS_TYPES = ("dft", "sft", "nll", "asft", "eaft")  # "nll" is TRL's name for cross-entropy
DEFAULT_ASFT_KL_COEF = 0.1  # LLaMA-Factory's asft_alpha


@dataclass
class DFTArguments:
    """The DFT loss options, as dataclass fields shared by [`DFTConfig`][dft.trainer.DFTConfig] and TRL's
    ``DFTSFTConfig``.

    Args:
        loss_type: `"dft"` for Dynamic Fine-Tuning, `"sft"` (or TRL's `"nll"`) for plain cross-entropy through the same
            code path (`alpha=0`), handy for side-by-side runs; `"asft"`: DFT plus a KL anchor to a reference model
            (`kl_coef`, default 0.1; give `DFTTrainer(ref_model=...)` or train a PEFT model); `"eaft"`: cross-entropy
            weighted by the top-k entropy (`eaft_alpha`, `eaft_top_k`).
        dft_alpha: Power of the detached target probability in the token weight, `w = p ** alpha`.
        dft_min_weight: Floor of the token weight, `w = max(w, dft_min_weight)` (the authors' pre-release code used
            0.01).
        dft_beta: Mix with cross-entropy, `w = beta * w + (1 - beta)`; the final value of the warm-up.
        dft_p_min: Targets with `p < dft_p_min` get weight 0 (they still count in the mean).
        dft_p_max: Targets with `p > dft_p_max` get weight 0 (they still count in the mean).
        dft_warmup_steps: Optimizer steps over which `beta` ramps linearly from 0 (CE) to `dft_beta`.
        dft_warmup_ratio: Same as a fraction of the total training steps; used when `dft_warmup_steps` is 0.
        fused_lm_head: Compute the loss from the last hidden states and the output embedding without building the
            `[tokens, vocab]` logits. False uses the logits path.
        loss_chunk_size: Token rows per chunk of the fused head; None: equal chunks within the device's budget.
        kl_coef: Weight of the per-token `KL(reference || model)` anchor (ASFT). None: 0.1 for `loss_type="asft"`, 0
            otherwise. Any value > 0 needs a reference.
        eaft_alpha: EAFT's power of the normalised top-k entropy (used with `loss_type="eaft"`).
        eaft_top_k: EAFT's `k`.
        dft_log_prior: Log `prior/mean_p` and `prior/frac_below_0.01` once: the base model's figures on the first
            optimizer step's batches (from the loss's own statistics, no extra pass; see `dft inspect`).
        dft_ce_tokens: Targets kept on cross-entropy (weight 1, DFT elsewhere): `"special"` (the tokenizer's special
            tokens, EOS included), comma-separated token ids, or both (`"special,32001"`). A stop token or format marker
            the base never produced has `p ~ 1/V`: plain DFT barely trains it.
    """

    loss_type: str = field(
        default="dft", metadata={"help": "'dft', 'sft' (cross-entropy; TRL's 'nll' too), 'asft' or 'eaft'."}
    )
    dft_alpha: float = field(default=1.0, metadata={"help": "Token weight w = p ** alpha (detached)."})
    dft_min_weight: float | None = field(default=None, metadata={"help": "Floor of the token weight."})
    dft_beta: float = field(default=1.0, metadata={"help": "Mix w = beta * w + (1 - beta); 0 is CE."})
    dft_p_min: float | None = field(default=None, metadata={"help": "Weight 0 for targets with p < p_min."})
    dft_p_max: float | None = field(default=None, metadata={"help": "Weight 0 for targets with p > p_max."})
    dft_warmup_steps: int = field(default=0, metadata={"help": "Steps of the CE -> DFT ramp of beta."})
    dft_warmup_ratio: float = field(default=0.0, metadata={"help": "CE -> DFT ramp as a fraction of training."})
    fused_lm_head: bool = field(default=True, metadata={"help": "Fused LM-head loss (no full logits)."})
    loss_chunk_size: int | None = field(default=None, metadata={"help": "Rows per chunk of the fused head."})
    kl_coef: float | None = field(
        default=None, metadata={"help": "ASFT: weight of KL(reference || model); default 0.1 for --loss asft."}
    )
    eaft_alpha: float = field(default=1.0, metadata={"help": "EAFT: power of the top-k entropy weight."})
    eaft_top_k: int = field(default=20, metadata={"help": "EAFT: k of the top-k entropy."})
    dft_log_prior: bool = field(
        default=True,
        metadata={"help": "Log prior/mean_p and prior/frac_below_0.01 of the first step's batches (the base model)."},
    )
    dft_ce_tokens: str | None = field(
        default=None,
        metadata={
            "help": "Targets kept on cross-entropy: 'special' (the tokenizer's special tokens), ids '2,7', or both."
        },
    )

    def validate_dft_arguments(self) -> None:
        """Raise ``ValueError`` naming the field for an invalid DFT option, or for a field the ``loss_type`` preset
        would ignore (never silently overridden)."""
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        ignored = [
            name for name in PRESET_IGNORES[self.loss_type] if getattr(self, name) != WEIGHT_FIELD_DEFAULTS[name]
        ]
        if ignored:
            given = ", ".join(f"{name}={getattr(self, name)!r}" for name in ignored)
            raise ValueError(
                f"loss_type={self.loss_type!r} ignores {given}: drop {'it' if len(ignored) == 1 else 'them'}, or pick "
                f"the loss that uses {'it' if len(ignored) == 1 else 'them'} ({PRESET_USES_HINT[self.loss_type]})."
            )
        self.dft_weighting()  # validates the weight options
        if not isinstance(self.dft_warmup_steps, int) or self.dft_warmup_steps < 0:
            raise ValueError(f"dft_warmup_steps must be an int >= 0, got {self.dft_warmup_steps!r}.")
        if not 0.0 <= self.dft_warmup_ratio < 1.0:
            raise ValueError(f"dft_warmup_ratio must be in [0, 1), got {self.dft_warmup_ratio!r}.")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1 or None, got {self.loss_chunk_size!r}.")
        if self.kl_coef is not None and (not isinstance(self.kl_coef, (int, float)) or self.kl_coef < 0):
            raise ValueError(f"kl_coef must be a number >= 0 or None, got {self.kl_coef!r}.")
        ce_token_ids(self.dft_ce_tokens, tokenizer=None)  # syntax only; "special" is resolved by the trainer

    def effective_kl_coef(self) -> float:
        """The ASFT weight in use: ``kl_coef``, or 0.1 for ``loss_type="asft"`` when unset."""
        if self.kl_coef is not None:
            return float(self.kl_coef)
        return DEFAULT_ASFT_KL_COEF if self.loss_type == "asft" else 0.0

    def dft_weighting(self, beta: float | None = None, ce_tokens: tuple[int, ...] | None = None) -> DFTWeight:
        """The [`dft.DFTWeight`][dft.DFTWeight] these arguments describe (``beta``: the warm-up's current value;
        ``ce_tokens``: ``dft_ce_tokens`` resolved to ids)."""
        if self.loss_type in ("sft", "nll"):
            return DFTWeight(alpha=0.0)
        if self.loss_type == "eaft":
            return DFTWeight(alpha=0.0, eaft_alpha=self.eaft_alpha, eaft_top_k=self.eaft_top_k, ce_token_ids=ce_tokens)
        return DFTWeight(
            alpha=self.dft_alpha,
            min_weight=self.dft_min_weight,
            beta=self.dft_beta if beta is None else beta,
            p_min=self.dft_p_min,
            p_max=self.dft_p_max,
            ce_token_ids=ce_tokens,
        )

    def weight_fields_given(self) -> list[str]:
        """The ``dft_*`` weight fields set away from their defaults (a ``weighting=`` value replaces them all)."""
        return [name for name in WEIGHT_FIELDS if getattr(self, name) != WEIGHT_FIELD_DEFAULTS[name]]


WEIGHT_FIELD_DEFAULTS: dict[str, Any] = {
    "dft_alpha": 1.0,
    "dft_min_weight": None,
    "dft_beta": 1.0,
    "dft_p_min": None,
    "dft_p_max": None,
    "dft_warmup_steps": 0,
    "dft_warmup_ratio": 0.0,
    "eaft_alpha": 1.0,
    "eaft_top_k": 20,
    "dft_ce_tokens": None,
}
WEIGHT_FIELDS = ("dft_alpha", "dft_min_weight", "dft_beta", "dft_p_min", "dft_p_max", "eaft_alpha", "eaft_top_k")
_DFT_FIELDS = (
    "dft_alpha",
    "dft_min_weight",
    "dft_beta",
    "dft_p_min",
    "dft_p_max",
    "dft_warmup_steps",
    "dft_warmup_ratio",
)
PRESET_IGNORES: dict[str, tuple[str, ...]] = {  # loss_type -> the fields its weighting does not read
    "dft": ("eaft_alpha", "eaft_top_k"),
    "asft": ("eaft_alpha", "eaft_top_k"),
    "sft": (*_DFT_FIELDS, "eaft_alpha", "eaft_top_k", "dft_ce_tokens"),
    "nll": (*_DFT_FIELDS, "eaft_alpha", "eaft_top_k", "dft_ce_tokens"),
    "eaft": _DFT_FIELDS,
}
PRESET_USES_HINT = {
    "dft": "eaft_alpha / eaft_top_k: loss_type='eaft', or DFTTrainer(weighting=DFTWeight(alpha=1, eaft_alpha=...))",
    "asft": "eaft_alpha / eaft_top_k: loss_type='eaft'",
    "sft": "the dft_* weight fields: loss_type='dft'; dft_beta=0 is cross-entropy too",
    "nll": "the dft_* weight fields: loss_type='dft'",
    "eaft": "dft_* fields: loss_type='dft', or DFTTrainer(weighting=DFTWeight(alpha=..., eaft_alpha=...))",
}


def check_numeric_fields(args: Any) -> None:
    """Numeric dataclass fields given as strings (``learning_rate="1e-3"``, YAML's ``1e-3``) are parsed at
    construction; a string that is not a number is a ``ValueError`` naming the field (not an error inside the
    optimizer later)."""
    import types
    import typing

    try:
        hints = typing.get_type_hints(type(args))
    except Exception:  # unresolvable annotations: nothing to check
        return
    for f in dataclasses.fields(args):
        value = getattr(args, f.name, None)
        if not isinstance(value, str) or f.name not in hints:
            continue
        hint = hints[f.name]
        kinds = (
            {a for a in typing.get_args(hint) if a is not type(None)}
            if typing.get_origin(hint)
            in (
                typing.Union,
                types.UnionType,
            )
            else {hint}
        )
        if not kinds or not kinds <= {int, float}:
            continue
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{f.name} must be a number, got {value!r}.") from None
        if kinds == {int}:
            if not number.is_integer():
                raise ValueError(f"{f.name} must be an integer, got {value!r}.")
            setattr(args, f.name, int(number))
        else:
            setattr(
                args,
                f.name,
                int(number)
                if kinds == {int, float} and number.is_integer() and "." not in value and "e" not in value.lower()
                else number,
            )


def ce_token_ids(spec: str | None, tokenizer: Any = None) -> tuple[int, ...] | None:
    """``dft_ce_tokens`` -> token ids: ``"special"`` (``tokenizer.all_special_ids``, EOS included) and/or ids.

    ``tokenizer=None`` checks the syntax only. Raises ``ValueError`` naming the bad part.
    """
    if spec is None or not str(spec).strip():
        return None
    ids: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        if part == "special":
            if tokenizer is not None:
                tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
                special = set(getattr(tok, "all_special_ids", []) or [])
                if getattr(tok, "eos_token_id", None) is not None:
                    special.add(int(tok.eos_token_id))
                ids |= special
        elif part.isdigit():
            ids.add(int(part))
        else:
            raise ValueError(f"dft_ce_tokens: {part!r} is neither 'special' nor a token id (e.g. 'special,32001').")
    return tuple(sorted(ids)) if tokenizer is not None or ids else None
