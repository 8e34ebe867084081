"""The engines as users launch them: one DFTTrainer run per case, and its single-process reference.

CASE (one per engine adapter in dft.engines; each is 2 optimizer steps, 2 ranks x 2 accumulation
steps x 2 rows = 8 rows per step, SGD, no clipping):

* ``zero2``, ``zero3``: ``DFTConfig(deepspeed={... "stage": 2|3})``; ``zero3-asft``: ZeRO-3 with a
  reference model that DFTTrainer prepares as LLaMA-Factory/TRL do (a ZeRO-3 inference engine).
* ``fsdp2-{tied|untied}-{reshard|keep}``: ``DFTConfig(fsdp=..., fsdp_config={"version": 2, ...})``
  through accelerate's own FSDP2 preparation (norm + lm_head in their own unit).
  ``fsdp2-untied-reshard-asft``: with a reference model prepared by accelerate's FSDP2 as well.
* ``zero3-nft``, ``fsdp2-untied-reshard-nft``: NFT (``loss_type="nft"``) with pi_old a second model prepared
  as ASFT's reference; rows carry ``accepted`` and ``prompt_index`` (4 prompts of 4 samples, 1 to 3 accepted), and
  DFTTrainer computes each prompt's acceptance rate from them.
* ``ddp-nokeep``: DDP with a model whose forward has no ``logits_to_keep``.
* ``moe``: a tiny Mixtral with its router loss, DDP + accumulation; every micro-batch has the same
  rows, so the mean of the micro-batch router losses equals the router loss of the global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import SequentialSampler
from transformers import LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

import dft
from dft.toy import VOCAB_SIZE, arithmetic_examples, toy_batch, toy_model

CASES = (
    "zero2",
    "zero3",
    "zero3-asft",
    "fsdp2-tied-reshard",
    "fsdp2-untied-reshard",
    "fsdp2-tied-keep",
    "fsdp2-untied-keep",
    "fsdp2-untied-reshard-asft",
    "zero3-nft",
    "fsdp2-untied-reshard-nft",
    "ddp-nokeep",
    "moe",
)
ROWS_PER_STEP, STEPS, LR, KL_COEF = 8, 2, 0.5, 0.5


class NoKeepLlama(LlamaForCausalLM):
    """A causal LM whose forward takes no ``logits_to_keep`` (like TrOCRForCausalLM or much remote code)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, use_cache=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return CausalLMOutputWithPast(logits=self.lm_head(out[0]))


def build_model(case: str, seed: int = 0) -> torch.nn.Module:
    if case == "moe":
        torch.manual_seed(seed)
        config = MixtralConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=128,
            output_router_logits=True,
            router_aux_loss_coef=0.5,
            tie_word_embeddings=False,
        )
        return MixtralForCausalLM(config)
    model = toy_model(hidden_size=32, seed=seed)
    if case == "ddp-nokeep":
        model = NoKeepLlama(model.config)
        model.load_state_dict(toy_model(hidden_size=32, seed=seed).state_dict())
    if "untied" in case:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def has_reference(case: str) -> bool:
    """ASFT's anchor or NFT's pi_old: a second model (seed 1), prepared by the engine like the policy."""
    return case.endswith(("asft", "nft"))


NFT_ACCEPTED = [1, 0, 0, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0]
"""16 rows = 4 prompts (``prompt_index`` = row // 4) of 4 samples, 1, 2, 3 and 1 of them accepted."""


def rows(case: str) -> dict[str, torch.Tensor]:
    """All rows, in the order the Trainer's sequential sampler deals them out (accelerate gives batch k
    to rank k % 2, so each step's 8 rows are consecutive); NFT's rows also carry ``accepted`` and
    ``prompt_index``."""
    if case == "moe":  # [a, b] in every micro-batch of a step
        pairs = [arithmetic_examples(2, seed=10 + s, terms=(2, 4), digits=2) for s in range(STEPS)]
        examples = [e for pair in pairs for _ in range(ROWS_PER_STEP // 2) for e in pair]
    else:  # uneven supervision: long sums and short ones, mixed
        examples = [
            e
            for s in range(STEPS)
            for pair in zip(
                arithmetic_examples(4, seed=20 + s, terms=(3, 5), digits=3),
                arithmetic_examples(4, seed=30 + s, terms=(2, 2), digits=1),
            )
            for e in pair
        ]
    batch = toy_batch(examples)
    if case.endswith("nft"):
        batch["accepted"] = torch.tensor(NFT_ACCEPTED)
        batch["prompt_index"] = torch.arange(len(NFT_ACCEPTED)) // 4
    return batch


def dataset(case: str) -> Dataset:
    return Dataset.from_dict({k: v.tolist() for k, v in rows(case).items()})


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        # 0: partition every parameter (by default ZeRO-3 keeps parameters under 1e5 elements whole,
        # which would be all of a tiny model's)
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }


def sgd_config(out_dir: Path, **overrides: Any) -> dft.DFTConfig:
    """The DFTConfig every 2-step engine run shares (tests/dist/*_worker.py): 2 rows x 2 accumulation steps a
    rank, SGD at a constant lr, no clipping, logging every step, nothing saved; ``overrides`` on top."""
    base = {
        "output_dir": str(out_dir / "run"),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": STEPS,
        "learning_rate": LR,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    return dft.DFTConfig(**{**base, **overrides})


class SequentialTrainer(dft.DFTTrainer):
    """Rows in order, so that the single-process reference sees the same global batches."""

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
        return SequentialSampler(self.train_dataset)


def trainer_kwargs(case: str) -> dict:
    if case.startswith("zero"):
        return {"deepspeed": ds_config(3 if case.startswith("zero3") else 2)}
    if case.startswith("fsdp2"):
        return {
            "fsdp": "full_shard",
            "fsdp_config": {
                "version": 2,
                "reshard_after_forward": "-reshard" in case,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            },
        }
    return {}


def loss_kwargs(case: str) -> dict:
    """The DFTConfig fields of the case's loss."""
    if case.endswith("nft"):
        return {"loss_type": "nft"}
    return {"loss_type": "asft", "kl_coef": KL_COEF} if case.endswith("asft") else {}


def nft_rows(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows as NFT's loss reads them: each prompt's acceptance rate (float32, as the collator makes it) for
    its ``prompt_index``."""
    prompts = data.pop("prompt_index")
    accepted = data["accepted"].double()
    rate = torch.stack([accepted[prompts == q].mean() for q in prompts.tolist()])
    return {**data, "nft_rhat": rate.float()}


def loss_rows(case: str) -> dict[str, torch.Tensor]:
    """``rows(case)`` as ``causal_lm_loss`` takes them."""
    return nft_rows(rows(case)) if case.endswith("nft") else rows(case)


def reference_kwargs(case: str, ref: torch.nn.Module | None) -> dict:
    """``causal_lm_loss``'s keywords for the case's loss, with ``ref`` as ASFT's anchor or NFT's pi_old."""
    if case.endswith("nft"):
        return {"ref_model": ref, "nft": dft.NFTWeight()}
    return {"ref_model": ref, "kl_coef": KL_COEF} if case.endswith("asft") else {}


def single_process(case: str) -> dict[str, torch.Tensor]:
    """The reference: one process, each step's 8 rows as one batch, the same SGD steps."""
    model = build_model(case)
    ref = build_model(case, seed=1).eval() if has_reference(case) else None
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    data, kw = loss_rows(case), reference_kwargs(case, ref)
    for step in range(STEPS):
        batch = {k: v[step * ROWS_PER_STEP : (step + 1) * ROWS_PER_STEP] for k, v in data.items()}
        optimizer.zero_grad()
        dft.causal_lm_loss(model, batch, **kw).loss.backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}
