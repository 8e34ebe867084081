"""The DFT loss options as dataclass fields: ``DFTArguments``, shared by [`dft.DFTConfig`][dft.trainer.DFTConfig]
(``TrainingArguments`` + these) and TRL's [`DFTSFTConfig`][dft.trl_compat.DFTSFTConfig], with their checks.

Nothing here imports transformers: the command line checks its flags with these before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .nft import NFTWeight
from .weights import DFTWeight

__all__ = ["DFTArguments", "ce_token_ids", "check_numeric_fields"]

LOSS_TYPES = ("dft", "sft", "nll", "asft", "eaft", "nft")  # "nll" is TRL's name for cross-entropy
DEFAULT_ASFT_KL_COEF = 0.1  # LLaMA-Factory's asft_alpha


@dataclass
class DFTArguments:
    """The DFT loss options, as dataclass fields shared by [`DFTConfig`][dft.trainer.DFTConfig] and TRL's
    ``DFTSFTConfig``.

    Args:
        loss_type: `"dft"` for Dynamic Fine-Tuning, `"sft"` (or TRL's `"nll"`) for plain cross-entropy through the same
            code path (`alpha=0`), handy for side-by-side runs; `"asft"`: DFT plus a KL anchor to a reference model
            (`kl_coef`, default 0.1; give `DFTTrainer(ref_model=...)` or train a PEFT model); `"eaft"`: cross-entropy
            weighted by the top-k entropy (`eaft_alpha`, `eaft_top_k`); `"nft"`: Negative-aware Fine-Tuning on
            verified samples, the rejected ones included (rows with `accepted` and `prompt_index`, as `dft sample`'s
            `samples.jsonl`; `pi_old` = `DFTTrainer(ref_model=...)`, a PEFT model's base, or a frozen copy of the
            model as training starts; see [`dft.nft`][dft.nft]).
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
        nft_neg_weight: NFT: weight of the rejected samples' term.
        nft_clamp_negative: NFT: `eps` of the rejected term's clamp `max(x, eps)` (value only).
        nft_max_log_ratio: NFT: upper clamp of `log pi - log pi_old`.
        nft_rhat_min: NFT: lower clamp of a prompt's acceptance rate.
        nft_rhat_max: NFT: upper clamp of a prompt's acceptance rate.
        nft_dft_positive: NFT: weight the accepted samples' term by DFT's `sg(p)` too.
        nft_keep_uniform_prompts: NFT: keep the prompts whose samples all got one verdict (dropped by default, as the
            official runs' `filter_groups`; kept, their `r` is clamped).
        nft_temperature: NFT: the sampling temperature; both policies' logits are divided by it. None: 1.0 (`dft
            train` reads it from `dft sample`'s `summary.json`).
        dft_ce_tokens: Targets kept on cross-entropy (weight 1, DFT elsewhere): `"special"` (the tokenizer's special
            tokens, EOS included), comma-separated token ids, or both (`"special,32001"`). A stop token or format marker
            the base never produced has `p ~ 1/V`: plain DFT barely trains it.
    """

    loss_type: str = field(
        default="dft",
        metadata={
            "help": "'dft', 'sft' (cross-entropy; TRL's 'nll' too), 'asft', 'eaft' or 'nft' (rejected samples too)."
        },
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
    nft_neg_weight: float = field(default=1.0, metadata={"help": "NFT: weight of the rejected samples' term."})
    nft_clamp_negative: float = field(default=1.0, metadata={"help": "NFT: eps of the rejected term's clamp."})
    nft_max_log_ratio: float = field(default=10.0, metadata={"help": "NFT: upper clamp of log pi - log pi_old."})
    nft_rhat_min: float = field(default=0.02, metadata={"help": "NFT: lower clamp of a prompt's acceptance rate."})
    nft_rhat_max: float = field(default=0.98, metadata={"help": "NFT: upper clamp of a prompt's acceptance rate."})
    nft_dft_positive: bool = field(default=False, metadata={"help": "NFT: DFT-weight the accepted samples (sg(p))."})
    nft_keep_uniform_prompts: bool = field(
        default=False, metadata={"help": "NFT: keep prompts whose samples all got one verdict (dropped by default)."}
    )
    nft_temperature: float | None = field(
        default=None, metadata={"help": "NFT: the sampling temperature (default: summary.json's, else 1.0)."}
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
            nft_only = self.loss_type != "nft" and all(name in NFT_FIELDS for name in ignored)
            hint = "the nft_* fields: loss_type='nft'" if nft_only else PRESET_USES_HINT[self.loss_type]
            raise ValueError(
                f"loss_type={self.loss_type!r} ignores {given}: drop {'it' if len(ignored) == 1 else 'them'}, or pick "
                f"the loss that uses {'it' if len(ignored) == 1 else 'them'} ({hint})."
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
        if self.loss_type == "nft":
            if self.kl_coef:
                raise ValueError("loss_type='nft' takes no kl_coef (its reference model is pi_old, not an anchor).")
            self.nft_weight()  # validates the NFT options
            if self.nft_temperature is not None and not (
                isinstance(self.nft_temperature, (int, float)) and self.nft_temperature > 0
            ):
                raise ValueError(
                    f"nft_temperature must be > 0 (greedy samples have no ratio to learn from), got "
                    f"{self.nft_temperature!r}."
                )
        ce_token_ids(self.dft_ce_tokens, tokenizer=None)  # syntax only; "special" is resolved by the trainer

    def effective_kl_coef(self) -> float:
        """The ASFT weight in use: ``kl_coef``, or 0.1 for ``loss_type="asft"`` when unset."""
        if self.kl_coef is not None:
            return float(self.kl_coef)
        return DEFAULT_ASFT_KL_COEF if self.loss_type == "asft" else 0.0

    def dft_weighting(self, beta: float | None = None, ce_tokens: tuple[int, ...] | None = None) -> DFTWeight:
        """The [`dft.DFTWeight`][dft.DFTWeight] these arguments describe (``beta``: the warm-up's current value;
        ``ce_tokens``: ``dft_ce_tokens`` resolved to ids)."""
        if self.loss_type in ("sft", "nll", "nft"):  # NFT: its own weights on cross-entropy's
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

    def nft_weight(self) -> NFTWeight:
        """NFT's options ([`dft.NFTWeight`][dft.NFTWeight]) from the ``nft_*`` fields."""
        try:
            return NFTWeight(
                neg_weight=self.nft_neg_weight,
                clamp_negative=self.nft_clamp_negative,
                max_log_ratio=self.nft_max_log_ratio,
                rhat_min=self.nft_rhat_min,
                rhat_max=self.nft_rhat_max,
                dft_positive=self.nft_dft_positive,
            )
        except ValueError as e:  # name the field, not the value class
            raise ValueError(str(e).replace("NFTWeight.", "nft_")) from None

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
    "nft_neg_weight": 1.0,
    "nft_clamp_negative": 1.0,
    "nft_max_log_ratio": 10.0,
    "nft_rhat_min": 0.02,
    "nft_rhat_max": 0.98,
    "nft_dft_positive": False,
    "nft_keep_uniform_prompts": False,
    "nft_temperature": None,
}
NFT_FIELDS = tuple(name for name in WEIGHT_FIELD_DEFAULTS if name.startswith("nft_"))
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
    "dft": ("eaft_alpha", "eaft_top_k", *NFT_FIELDS),
    "asft": ("eaft_alpha", "eaft_top_k", *NFT_FIELDS),
    "sft": (*_DFT_FIELDS, "eaft_alpha", "eaft_top_k", "dft_ce_tokens", *NFT_FIELDS),
    "nll": (*_DFT_FIELDS, "eaft_alpha", "eaft_top_k", "dft_ce_tokens", *NFT_FIELDS),
    "eaft": (*_DFT_FIELDS, *NFT_FIELDS),
    "nft": (*_DFT_FIELDS, "eaft_alpha", "eaft_top_k", "dft_ce_tokens"),
}
PRESET_USES_HINT = {
    "dft": "eaft_alpha / eaft_top_k: loss_type='eaft', or DFTTrainer(weighting=DFTWeight(alpha=1, eaft_alpha=...))",
    "asft": "eaft_alpha / eaft_top_k: loss_type='eaft'",
    "sft": "the dft_* weight fields: loss_type='dft'; dft_beta=0 is cross-entropy too",
    "nll": "the dft_* weight fields: loss_type='dft'",
    "eaft": "dft_* fields: loss_type='dft', or DFTTrainer(weighting=DFTWeight(alpha=..., eaft_alpha=...))",
    "nft": "the dft_* / eaft_* fields: loss_type='dft' or 'eaft'; nft_dft_positive=True DFT-weights NFT's positives",
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
