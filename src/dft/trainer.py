"""Hugging Face Trainer adapter: ``DFTConfig`` and ``DFTTrainer`` (fused head, exact normalisation).

Swap ``Trainer``/``TrainingArguments`` for ``DFTTrainer``/``DFTConfig`` and keep everything else:

```python
args = dft.DFTConfig(output_dir="out", dft_alpha=1.0, dft_warmup_ratio=0.1)
trainer = dft.DFTTrainer(model=model, args=args, train_dataset=ds, data_collator=collator)
trainer.train()
```

The adapter only translates: it finds the backbone and head ([`dft.models`][dft.models]), passes tensors to
[`dft.linear_dft_loss`][dft.linear_dft_loss] through [`dft.causal_lm_loss`][dft.causal_lm_loss], and logs what comes
back.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .advice import recommend_loss
from .arguments import (  # noqa: F401  (LOSS_TYPES, PRESET_IGNORES, ...: the trainer's names too)
    DEFAULT_ASFT_KL_COEF,
    LOSS_TYPES,
    PRESET_IGNORES,
    PRESET_USES_HINT,
    WEIGHT_FIELD_DEFAULTS,
    WEIGHT_FIELDS,
    DFTArguments,
    ce_token_ids,
    check_numeric_fields,
)
from .batches import LOSS_COLUMNS, nft_dataset, with_loss_columns
from .causal import causal_lm_loss
from .engines import unwrap_model
from .labels import causal_targets, count_targets
from .nft import NFTTally, NFTWeight
from .stats import TokenStats
from .transform import LogitTransform
from .weights import DFTWeight, beta_schedule

logger = logging.getLogger(__name__)

__all__ = ["DFTArguments", "DFTConfig", "DFTTrainer", "DFTTrainerMixin", "beta_schedule"]


@dataclass
class DFTConfig(TrainingArguments, DFTArguments):
    """``transformers.TrainingArguments`` plus the DFT loss options of [`DFTArguments`][dft.arguments.DFTArguments]:
    ``loss_type``, ``dft_alpha``, ``dft_min_weight``, ``dft_beta``, ``dft_p_min``, ``dft_p_max``, ``dft_warmup_steps``,
    ``dft_warmup_ratio``, ``fused_lm_head``, ``loss_chunk_size``, ``kl_coef``, ``eaft_alpha``,
    ``eaft_top_k``, ``dft_log_prior``, ``dft_ce_tokens``. Invalid values raise ``ValueError``."""

    def __post_init__(self) -> None:
        check_numeric_fields(self)
        self.validate_dft_arguments()
        # transformers < 5 defaults to reentrant checkpointing; use the non-reentrant kind everywhere. Newer
        # transformers names the fields activation_checkpointing*: set that one (the old name warns).
        on = bool(getattr(self, "activation_checkpointing", None) or self.gradient_checkpointing)
        kwargs_field = "activation_checkpointing_kwargs" if hasattr(self, "activation_checkpointing_kwargs") else None
        kwargs_field = kwargs_field or "gradient_checkpointing_kwargs"
        if on and getattr(self, kwargs_field) is None and self.gradient_checkpointing_kwargs is None:
            setattr(self, kwargs_field, {"use_reentrant": False})
        super().__post_init__()


class _TrainerTouchPoints:
    """Every place the adapter relies on ``transformers.Trainer`` internals, in one commented class.

    * ``model_accepts_loss_kwargs = True``: makes Trainer count ``num_items_in_batch`` for every model
      and not divide our (already ``num_items``-normalised) loss again by the accumulation steps.
    * ``_get_num_items_in_batch``: Trainer counts ``labels[..., 1:]``, which over-counts packed rows
      (targets that cross a ``position_ids`` restart). We hand it batches whose ``shift_labels`` are
      our targets ([`dft.labels.causal_targets`][dft.causal_targets]), so its count — and its gather over ranks and
      its TP/CP divisions — is taken over exactly what the loss averages.
    * ``get_batch_samples``: transformers < 4.57 has no ``_get_num_items_in_batch`` and counts
      ``labels.ne(-100)`` without the causal shift (nothing for batches with only ``shift_labels``);
      there we count the targets ourselves (and gather them over ranks with
      ``average_tokens_across_devices``, as Trainer does).
    * ``_undo_rank_average``: with ``average_tokens_across_devices`` the count covers all ranks
      and DDP averages gradients, so the loss is multiplied by the number of data-parallel ranks,
      as Trainer does for its own losses.
    * Ulysses sequence parallelism (``_ulysses_sp_size``: accelerate's ``ParallelismConfig(sp_size=N,
      sp_backend="deepspeed")``; transformers >= 5). Trainer wraps the train loader in DeepSpeed's
      ``UlyssesSPDataLoaderAdapter``, which pops ``labels``, adds the pre-shifted ``shift_labels`` and
      gives each rank of an SP group its own slice of the same rows' sequences, and routes its own
      ``compute_loss`` to ``deepspeed_sp_compute_loss`` (ours replaces it: the fused head runs on the
      rank's slice and the targets are its ``shift_labels``). Three factors follow from the sources:

      - the count: ``Trainer._get_num_items_in_batch`` gathers the per-rank counts over all ranks and
        divides by ``tp * cp * sp`` ("devices with the same batch"); the adapter has already sharded
        the sequences, so the gather counts every target once and the ``/ sp`` is undone here
        (eval batches are not sharded at all: each rank has its own rows, and the same holds).
      - the gradient (``_sp_ranks_summed``): each SP rank holds the gradient of its slice's loss
        (the all-to-alls' backward included), and DeepSpeed reduces them over the sequence-data-parallel
        group (every rank) in one of two ways. ZeRO 0-2 (``engine._reduce_non_expert_gradients``;
        ``stage_1_and_2`` ``gradient_reduction_w_predivide``, ``average_tensor``, ``allreduce_bucket``)
        and ZeRO-3's contiguous all-reduce (``stage3.__avg_scatter_contiguous_grads``: only with
        ``contiguous_gradients`` and ``reduce_scatter: false``) divide by ``world / sequence_parallel_size``:
        they *sum* the SP ranks and average over data parallelism only, so the loss is multiplied by
        ``num_processes // (tp * sp)``. ZeRO-3's default reduce-scatter (``stage3.__avg_scatter_grads`` ->
        ``reduce_scatter_coalesced``, which pre-divides by the group size) averages over every rank, SP
        included: ``num_processes // tp`` as under DDP. ZeRO-3 with ``reduce_scatter: false`` and a
        parameter larger than ``reduce_bucket_size`` would mix both per bucket: refused. DeepSpeed >= 0.20.2
        (deepspeedai/DeepSpeed#8854, as transformers 5.25's ``deepspeed_sp_compute_loss`` reads it) scales
        ZeRO-3's gradients over the SP group on every path: summed, as ZeRO 0-2 (``_zero3_sums_sp_ranks``).
      - the logged value: Trainer logs the mean over all ranks of the returned losses, so each rank
        returns ``num_processes // tp`` times its share (as under DDP), with the gradient of the factor
        above where the two differ: ``grad + (value - grad).detach()``.

      ``average_tokens_across_devices=False`` would normalise each slice by its own count (a sum of
      per-slice means over the SP group): refused.
    * ``_router_loss_steps``: ``current_gradient_accumulation_steps`` (set by Trainer's loop; the
      configured steps before it exists), for a MoE router loss.
    """

    def _claim_loss_kwargs(self) -> None:
        self.model_accepts_loss_kwargs = True

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        batches = [_counted(b) if _has_labels(b) else b for b in batch_samples]
        num_items = super()._get_num_items_in_batch(batches, device)
        sp = self._ulysses_sp_size()
        if num_items is not None and sp > 1:  # Trainer's `/ sp`: the batches are already sliced (see above)
            num_items = num_items * sp
        return num_items

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if hasattr(Trainer, "_get_num_items_in_batch") or not (batch_samples and _has_labels(batch_samples[0])):
            return batch_samples, num_items  # newer Trainer: counted above
        local = sum(count_targets(causal_targets(b)) for b in batch_samples if _has_labels(b))
        local = torch.as_tensor(local, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            local = self.accelerator.gather(local).sum()
        return batch_samples, local

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """Resuming a model with tied embeddings: the checkpoint (safetensors) stores the shared weight once,
        so the tied name (``lm_head.weight``) is "missing"; it is not, once tied. Only other keys warn."""
        tied = _tied_names(self.model, getattr(load_result, "missing_keys", []))
        if tied:
            self.model.tie_weights()
            load_result = load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied])
        super()._issue_warnings_after_load(load_result)

    def _router_loss_steps(self, num_items_in_batch: Tensor | int | None) -> int:
        """A MoE router loss is a per-micro-batch mean that the engine averages over ranks. With
        ``num_items_in_batch`` Trainer leaves accumulation to the loss, so it is divided by the
        accumulation steps here (as TRL's SFTTrainer does); without, Trainer divides the whole loss."""
        if num_items_in_batch is None:
            return 1
        return int(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps))

    def _ulysses_sp_size(self) -> int:
        """The DeepSpeed (Ulysses/ALST) sequence-parallel size of accelerate's ``parallelism_config``; 1 without."""
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is None or getattr(pc, "sp_backend", None) != "deepspeed":
            return 1
        return int(getattr(pc, "sp_size", None) or 1)

    def _check_sequence_parallel(self) -> None:
        if self._ulysses_sp_size() > 1 and not self.args.average_tokens_across_devices:
            raise ValueError(
                "average_tokens_across_devices=False with sequence parallelism (parallelism_config sp_size > 1): each "
                "rank holds a slice of every sequence, so the loss must be normalised by the count over all ranks; "
                "set average_tokens_across_devices=True."
            )

    def _sp_ranks_summed(self) -> int:
        """``sp`` where DeepSpeed sums the gradients of the ranks of a sequence-parallel group, 1 where it
        averages them with the data-parallel ranks (ZeRO-3's reduce-scatter); see the class docstring."""
        sp = self._ulysses_sp_size()
        if sp == 1:
            return 1
        if getattr(self, "_dft_sp_ranks_summed", None) is not None:
            return self._dft_sp_ranks_summed
        engine = self.model_wrapped
        stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
        summed = sp
        if stage == 3 and not _zero3_sums_sp_ranks():
            zero = engine.optimizer
            if zero.reduce_scatter or not zero.contiguous_gradients:
                summed = 1  # stage3.__avg_scatter_grads: reduce_scatter_coalesced divides by every rank
            else:  # stage3.__avg_scatter_contiguous_grads, except for a bucket over reduce_bucket_size
                too_large = [
                    n
                    for n, p in engine.module.named_parameters()
                    if p.requires_grad and p.ds_numel > zero.reduce_bucket_size
                ]
                if too_large:
                    raise ValueError(
                        f"zero_optimization.reduce_bucket_size={zero.reduce_bucket_size} is smaller than {too_large[0]} "
                        "with reduce_scatter=false under sequence parallelism: DeepSpeed ZeRO-3 would sum the "
                        "sequence-parallel ranks' gradients of some parameters and average those of others. Set "
                        "reduce_scatter=true (the default) or a reduce_bucket_size above the largest parameter."
                    )
        self._dft_sp_ranks_summed = summed
        return summed

    def _undo_rank_average(self, loss: Tensor, num_items_in_batch: Tensor | int | None, training: bool) -> Tensor:
        if not (self.args.average_tokens_across_devices and num_items_in_batch is not None):
            return loss
        tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
        value = loss * (self.accelerator.num_processes // tp)
        summed = self._sp_ranks_summed() if training else 1  # eval: the SP attention is off, each rank has its rows
        if summed == 1:
            return value
        grad = loss * (self.accelerator.num_processes // (tp * summed))
        return grad + (value - grad).detach()


def _tied_names(model: nn.Module, names: list[str]) -> set[str]:
    """The ``names`` whose parameter is shared with another parameter of ``model`` (tied weights)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    owners: dict[int, int] = {}
    for p in params.values():
        owners[id(p)] = owners.get(id(p), 0) + 1
    return {n for n in names if n in params and owners[id(params[n])] > 1}


def _deepspeed_reference(ref_model: nn.Module, accelerator: Any) -> nn.Module:
    """A frozen reference as TRL and LLaMA-Factory prepare it under DeepSpeed: a ZeRO-3 inference engine
    (partitioned like the policy) under ZeRO-3, else a whole copy per rank (stage 0)."""
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    hidden = getattr(getattr(ref_model, "config", None), "hidden_size", None)
    if zero.get("stage") == 3 and hidden is not None:
        for key, value in (
            ("reduce_bucket_size", hidden * hidden),
            ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
            ("stage3_param_persistence_threshold", 10 * hidden),
        ):
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    elif zero.get("stage") != 3:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=ref_model, config=config)
    engine.eval()  # DeepSpeedEngine.eval() returns None
    return engine


def _has_labels(batch: Any) -> bool:
    return isinstance(batch, dict) and (batch.get("labels") is not None or batch.get("shift_labels") is not None)


def _counted(batch: dict) -> dict:
    """What Trainer's counter reads: ``shift_labels`` = our targets. ``labels`` only has to be present (Trainer
    counts only batches with a ``labels`` key; the sequence-parallel loader's batches have ``shift_labels`` only)."""
    targets = causal_targets(batch)
    labels = batch.get("labels")
    return {"labels": targets if labels is None else labels, "shift_labels": targets}


class DFTTrainerMixin(_TrainerTouchPoints):
    """The DFT ``compute_loss`` + logging, for any ``transformers.Trainer`` subclass (Trainer, TRL's SFTTrainer).

    Put it first in the bases (``class MyTrainer(DFTTrainerMixin, Trainer)``); its ``__init__`` is
    cooperative. Reads the loss options from ``self.args`` (a [`DFTConfig`][dft.trainer.DFTConfig] or any arguments
    object with the same fields; missing fields take the DFT defaults).
    """

    def __init__(
        self,
        *args: Any,
        ref_model: nn.Module | None = None,
        weighting: DFTWeight | None = None,
        transform: LogitTransform | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._dft_weighting_value, self._dft_transform = self._check_option_values(weighting, transform)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"DFTTrainer does not run under nn.DataParallel (one process, {self.args.n_gpu} GPUs visible): its "
                "loss hooks the LM head, which DataParallel replicas share across threads. Launch one process per "
                "GPU: `torchrun --nproc_per_node N train.py` or `accelerate launch train.py` (or make one GPU "
                "visible: CUDA_VISIBLE_DEVICES=0)."
            )
        self._dft_want_logits = False  # set by prediction_step when compute_metrics / predict() need logits
        self._dft_nft_counts = self._prepare_nft_data() if self._is_nft() else None
        if self._is_nft() and ref_model is None and not hasattr(self.model, "disable_adapter"):
            ref_model = copy.deepcopy(unwrap_model(self.model))  # pi_old: the model as training starts
        if not hasattr(self, "_prepare_dataset"):  # TRL's SFTTrainer prepares its own columns and collator
            self.data_collator = with_loss_columns(self.data_collator)
        self.ref_model = self._prepare_reference(ref_model)
        self._dft_nft: dict[str, Tensor | None] = {"train": None, "eval": None}  # NFTTally sums
        self._dft_stats: dict[str, TokenStats | None] = {"train": None, "eval": None}
        self._dft_aux: dict[str, Tensor | None] = {"train": None, "eval": None}  # [sum, count] of router aux losses
        self._dft_beta_used: float | None = None
        self._dft_prior: TokenStats | None = None  # step 0's batches, this rank; reduced once over ranks
        self._dft_prior_reduced: TokenStats | None = None
        self._dft_prior_logged = False
        self.add_callback(_PriorCheck(self))
        self._dft_ce_tokens = self._resolve_ce_tokens()
        self._check_sequence_parallel()
        self._claim_loss_kwargs()

    def _check_option_values(
        self, weighting: DFTWeight | None, transform: LogitTransform | None
    ) -> tuple[DFTWeight | None, LogitTransform | None]:
        """``weighting=`` / ``transform=`` values: the one documented spelling; they replace the ``dft_*`` weight
        fields, so those next to them (or a preset that is itself a weighting) are refused, naming both."""
        if weighting is not None and not isinstance(weighting, DFTWeight):
            raise TypeError(f"weighting must be a dft.DFTWeight, got {type(weighting).__name__}.")
        if transform is not None and not isinstance(transform, LogitTransform):
            raise TypeError(f"transform must be a dft.LogitTransform, got {type(transform).__name__}.")
        if weighting is None:
            return None, transform
        args = self._dft_args()
        if args.loss_type not in ("dft", "asft"):
            raise ValueError(
                f"weighting={weighting!r} next to loss_type={args.loss_type!r}, itself a weighting: use "
                "loss_type='dft' (or 'asft' for the KL anchor) with a weighting value."
            )
        given = args.weight_fields_given() if isinstance(self.args, DFTArguments) else []
        if given:
            fields = ", ".join(f"{name}={getattr(args, name)!r}" for name in given)
            raise ValueError(f"weighting={weighting!r} replaces the dft_* weight fields; got {fields} too: give one.")
        if weighting.ce_token_ids is not None and self._dft_option("dft_ce_tokens", None):
            raise ValueError("weighting.ce_token_ids and dft_ce_tokens both given: give one.")
        return weighting, transform

    def _reduced_prior(self) -> TokenStats | None:
        """Step 0's statistics (the base model's), summed over ranks once; None before step 0 ran."""
        if self._dft_prior_reduced is None and self._dft_prior is not None:
            packed = self.accelerator.reduce(self._dft_prior.pack(), reduction="sum")
            self._dft_prior_reduced, self._dft_prior = TokenStats.unpack(packed), None
        return self._dft_prior_reduced

    def check_prior(self) -> tuple[str, str] | None:
        """Before the first optimizer step: warn when the base's prior on step 0's batches says this DFT-family
        run cannot learn the data (the rule of `dft inspect`, [`dft.prior.RULE`][dft.prior.RULE]), naming the
        loss it recommends. Returns ``(recommendation, reason)``, or None when there is nothing to say."""
        weighting = self.run_weighting()
        dft_like = self._dft_option("loss_type", "dft") in ("dft", "asft") and weighting.alpha > 0
        prior = self._reduced_prior()
        if not dft_like or prior is None or weighting.weight_fn is not None:
            return None
        config = getattr(unwrap_model(self.model), "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text, "vocab_size", None)
        n = int(prior.num_tokens.item())
        name, reason = recommend_loss(
            n, prior.mean_p.item() if n else None, prior.frac_low_p.item() if n else None, vocab
        )
        ramp = self.current_dft_beta() < weighting.beta  # a CE -> DFT warm-up: the documented remedy
        mitigated = {"mix": ramp or weighting.beta < 1 or weighting.min_weight is not None, "sft": ramp}
        if name not in mitigated or mitigated[name]:
            return None
        loss = self._dft_option("loss_type", "dft")
        warnings.warn(
            f"dft: step 0's batches, before any update: {reason} This run trains with DFT (loss_type={loss!r}); "
            f"`dft inspect` would recommend {name!r} (loss_type='sft' / --loss sft"
            + (", or dft_beta=0.5 / --dft_beta 0.5" if name == "mix" else "")
            + ").",
            UserWarning,
            stacklevel=2,
        )
        return name, reason

    def _is_nft(self) -> bool:
        return self._dft_option("loss_type", "dft") == "nft"

    def _prepare_nft_data(self) -> dict[str, int]:
        """NFT's rows: each prompt's acceptance rate from the training rows (``nft_rhat``), uniform prompts dropped
        unless kept ([`dft.batches.nft_dataset`][dft.batches.nft_dataset]); the evaluation rows' rates from
        themselves, every prompt kept."""
        keep = bool(self._dft_option("nft_keep_uniform_prompts", False))
        self.train_dataset, counts = nft_dataset(self.train_dataset, keep)
        # evaluation rows keep every prompt (a held-out split of a few prompts may hold no contrast; r is clamped)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: nft_dataset(v, True)[0] for k, v in self.eval_dataset.items()}
        elif self.eval_dataset is not None:
            self.eval_dataset = nft_dataset(self.eval_dataset, True)[0]
        logger.info(
            "dft: NFT on %d rows of %d prompts; %d prompts whose samples share one verdict %s (%d rows).",
            counts["rows"], counts["prompts"], counts["uniform_prompts"], "kept" if keep else "dropped",
            counts["rows_dropped"],
        )  # fmt: skip
        return counts

    def _set_signature_columns_if_needed(self) -> None:
        """Trainer keeps the columns ``model.forward`` takes; the loss's own columns
        ([`dft.batches.LOSS_COLUMNS`][dft.batches.LOSS_COLUMNS]) are kept too."""
        super()._set_signature_columns_if_needed()
        columns = self._signature_columns
        if columns is not None:
            self._signature_columns = [*columns, *(c for c in LOSS_COLUMNS if c not in columns), "prompt_index"]

    def nft_weight(self) -> NFTWeight | None:
        """The run's [`dft.NFTWeight`][dft.NFTWeight] (``loss_type="nft"``), else None."""
        return self._dft_args().nft_weight() if self._is_nft() else None

    def _loss_transform(self) -> LogitTransform | None:
        """The caller's transform; under NFT divided by the sampling temperature (both policies' logits)."""
        transform = getattr(self, "_dft_transform", None)
        temperature = self._dft_option("nft_temperature", None) if self._is_nft() else None
        if not temperature or temperature == 1.0:
            return transform
        return (transform or LogitTransform()).then(LogitTransform(temperature=float(temperature)))

    def _resolve_ce_tokens(self) -> tuple[int, ...] | None:
        spec = self._dft_option("dft_ce_tokens", None)
        if spec and "special" in str(spec) and self.processing_class is None:
            raise ValueError("dft_ce_tokens='special' needs the tokenizer: pass processing_class=tokenizer.")
        return ce_token_ids(spec, self.processing_class if spec else None)

    def _prepare_reference(self, ref_model: nn.Module | None) -> nn.Module | None:
        """ASFT's reference: frozen, in eval mode, placed by the accelerator; under DeepSpeed ZeRO-3 and FSDP2
        sharded like the model (a ZeRO-3 inference engine; accelerate's FSDP2 preparation)."""
        if self.dft_kl_coef() > 0 and ref_model is None and not hasattr(self.model, "disable_adapter"):
            raise ValueError(
                "kl_coef > 0 (loss_type='asft') needs a reference: DFTTrainer(..., ref_model=frozen copy of the base "
                "model), or a PEFT model (its reference is itself with the adapters disabled)."
            )
        if ref_model is None:
            return None
        ref_model.eval().requires_grad_(False)
        if getattr(self, "is_deepspeed_enabled", False):
            return _deepspeed_reference(ref_model, self.accelerator)
        if getattr(self.accelerator, "is_fsdp2", False):  # sharded like the policy (TRL's prepare_fsdp does too)
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            ref_model = fsdp2_prepare_model(self.accelerator, ref_model.to(self.accelerator.device))
            return ref_model.eval()
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def dft_kl_coef(self) -> float:
        return self._dft_args().effective_kl_coef()

    def _dft_args(self) -> DFTArguments:
        """``self.args`` when it carries the DFT options; plain ``TrainingArguments``: the DFT defaults."""
        return self.args if isinstance(self.args, DFTArguments) else DFTArguments()

    def _dft_option(self, name: str, default: Any) -> Any:
        return getattr(self.args, name, default)

    def current_dft_beta(self) -> float:
        """``beta`` at the current optimizer step (the CE -> DFT warm-up; restored on resume)."""
        steps = self._dft_option("dft_warmup_steps", 0)
        ratio = self._dft_option("dft_warmup_ratio", 0.0)
        if not steps and ratio:
            steps = int(ratio * max(self.state.max_steps, 1) + 0.5)
        return beta_schedule(self.state.global_step, self.run_weighting().beta, steps)

    def run_weighting(self) -> DFTWeight:
        """The run's [`dft.DFTWeight`][dft.DFTWeight] (the warm-up's final ``beta``): the same value whether a
        ``weighting=`` value or the ``dft_*`` fields spelled it."""
        value = getattr(self, "_dft_weighting_value", None)
        if value is None:
            return self._dft_args().dft_weighting(ce_tokens=getattr(self, "_dft_ce_tokens", None))
        tokens = getattr(self, "_dft_ce_tokens", None)
        return value if tokens is None else dataclasses.replace(value, ce_token_ids=tokens)

    def dft_weighting(self) -> DFTWeight:
        """The [`dft.DFTWeight`][dft.DFTWeight] of the current step (warm-up applied)."""
        return dataclasses.replace(self.run_weighting(), beta=self.current_dft_beta())

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        weighting = self.dft_weighting()
        want_logits = return_outputs and getattr(self, "_dft_want_logits", False)
        out = causal_lm_loss(
            model,
            inputs,
            weighting,
            transform=self._loss_transform(),
            num_items_in_batch=num_items_in_batch,
            chunk_size=self._dft_option("loss_chunk_size", None),
            fused=self._dft_option("fused_lm_head", True) and not want_logits,
            ref_model=self.ref_model,
            kl_coef=self.dft_kl_coef(),
            nft=self.nft_weight(),
        )
        mode = "train" if model.training else "eval"
        if out.nft is not None:
            packed = out.nft.pack().to(out.loss.device)
            self._dft_nft[mode] = packed if self._dft_nft.get(mode) is None else self._dft_nft[mode] + packed
        if mode == "train" and self._dft_option("loss_type", "dft") in ("dft", "asft"):
            self._dft_beta_used = weighting.beta
        self._dft_stats[mode] = TokenStats.accumulate(self._dft_stats.get(mode), out.stats)
        if mode == "train" and self.state.global_step == 0 and self._dft_prior_reduced is None:
            self._dft_prior = TokenStats.accumulate(self._dft_prior, out.stats)  # before any update: the base
        if out.aux_loss is not None:
            new = torch.stack([out.aux_loss.float(), torch.ones((), device=out.aux_loss.device)])
            previous_aux = self._dft_aux.get(mode)
            self._dft_aux[mode] = new if previous_aux is None else previous_aux + new
        loss = self._undo_rank_average(out.head_loss, num_items_in_batch, training=mode == "train")
        if out.router_loss is not None:
            loss = loss + out.router_loss / self._router_loss_steps(num_items_in_batch)
        if not return_outputs:
            return loss
        return loss, (out.outputs if want_logits else {})  # the fused head's outputs hold one position only

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[Tensor | None, Any, Any]:
        """Evaluation steps: the fused head when only the loss is needed; the logits path (full logits, the
        model's own outputs) when ``compute_metrics`` / ``preprocess_logits_for_metrics`` / ``predict()`` need them."""
        self._dft_want_logits = not prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._dft_want_logits = False

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        for mode, prefix, key in (("train", "", "loss"), ("eval", "eval_", "eval_loss")):
            stats = self._dft_stats.get(mode)
            if key in logs and stats is not None:
                packed = self.accelerator.reduce(stats.pack(), reduction="sum")
                logs.update(TokenStats.unpack(packed).as_dict(prefix, kl=self.dft_kl_coef() > 0))
                self._dft_stats[mode] = None
            nft = getattr(self, "_dft_nft", {}).get(mode)
            if key in logs and nft is not None:  # NFT's parts, ratio and clamp fractions over the logged steps
                logs.update(NFTTally.unpack(self.accelerator.reduce(nft, reduction="sum")).as_dict(f"{prefix}nft/"))
                self._dft_nft[mode] = None
            aux = self._dft_aux.get(mode)
            if key in logs and aux is not None:  # MoE router load-balancing loss, mean over micro-batches
                total, count = self.accelerator.reduce(aux, reduction="sum").tolist()
                logs[f"{prefix}aux_loss"] = total / max(count, 1.0)
                self._dft_aux[mode] = None
        if "loss" in logs and self.state.global_step > 0 and self._dft_option("dft_log_prior", True):
            prior = self._reduced_prior()
            if prior is not None and not self._dft_prior_logged:
                logs["prior/mean_p"] = prior.mean_p.item()
                logs["prior/frac_below_0.01"] = prior.frac_low_p.item()
                self._dft_prior_logged = True
        if "loss" in logs and self._dft_beta_used is not None:
            logs["dft_beta"] = self._dft_beta_used  # the beta of the last step the logged loss covers
        super().log(logs, *args, **kwargs)


class _PriorCheck(TrainerCallback):
    """Calls [`DFTTrainerMixin.check_prior`][dft.trainer.DFTTrainerMixin.check_prior] before the first optimizer
    step (every rank: the statistics are reduced over them)."""

    def __init__(self, trainer: DFTTrainerMixin) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 0:
            self.trainer.check_prior()


class DFTTrainer(DFTTrainerMixin, Trainer):
    """``transformers.Trainer`` whose loss is DFT on the fused LM head.

    Logs ``loss`` (the DFT loss), ``ce``, ``mean_p``, ``token_accuracy``, ``entropy``, ``dft_beta`` (and
    ``aux_loss`` for MoE models with a router loss, which is added to the loss as the model does)
    during training, and ``eval_loss`` (DFT), ``eval_ce``, ``eval_mean_p``, ``eval_token_accuracy``,
    ``eval_entropy`` from ``evaluate()`` (which needs no logits). Gradient accumulation and
    ``average_tokens_across_devices`` give the same update as one big batch, packed batches included.
    """


def _zero3_sums_sp_ranks() -> bool:
    """DeepSpeed >= 0.20.2 (deepspeedai/DeepSpeed#8854): ZeRO-3 sums the sequence-parallel ranks' gradients on
    every reduction path, as ZeRO 0-2 do; before, its reduce-scatter averaged them. (Not testable here: the
    newest DeepSpeed on the package index this project can reach is 0.19.8.)"""
    import importlib.metadata

    from packaging.version import Version

    try:
        return Version(importlib.metadata.version("deepspeed")) >= Version("0.20.2")
    except importlib.metadata.PackageNotFoundError:
        return False
