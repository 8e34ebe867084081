"""The loss's own columns of a batch: per-token data weights and NFT's per-row values, carried by any collator.

[`dft.causal_lm_loss`][dft.causal_lm_loss] reads them ([`LOSS_COLUMNS`][dft.batches.LOSS_COLUMNS]);
[`dft.DFTTrainer`][dft.trainer.DFTTrainer] keeps them through Trainer's ``remove_unused_columns`` and wraps its
collator in [`LossColumnsCollator`][dft.batches.LossColumnsCollator]; ``dft.data.collator`` is one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DROPPED_COLUMNS",
    "LOSS_COLUMNS",
    "ROW_COLUMNS",
    "TOKEN_COLUMNS",
    "LossColumnsCollator",
    "nft_dataset",
    "with_loss_columns",
]

TOKEN_COLUMNS = ("loss_weights",)
"""Per-token float columns the [`LossColumnsCollator`][dft.batches.LossColumnsCollator] carries into the batch as float32 ``[B, T]`` tensors
aligned with ``labels`` (``loss_weights``: each supervised token's loss weight, from the data's ``"weight"``)."""

ROW_COLUMNS = ("accepted", "nft_rhat")
"""Per-row scalar columns the [`LossColumnsCollator`][dft.batches.LossColumnsCollator] broadcasts over the row's positions: float32
``[B, T]`` tensors aligned with ``labels`` (``accepted``: 0/1, from ``samples.jsonl``; ``nft_rhat``: the share of
the row's prompt's samples that were accepted, added to the prepared dataset before training)."""

DROPPED_COLUMNS = ("prompt_index",)
"""Prepared columns the [`LossColumnsCollator`][dft.batches.LossColumnsCollator] leaves out of the batch."""

LOSS_COLUMNS = (*TOKEN_COLUMNS, *ROW_COLUMNS)
"""Every batch key the loss reads besides ``labels``."""


def with_loss_columns(collator: Any) -> LossColumnsCollator:
    """``collator`` wrapped in a [`LossColumnsCollator`][dft.batches.LossColumnsCollator] (packing when it is
    transformers' ``DataCollatorWithFlattening``); an already wrapped one is returned as it is."""
    if isinstance(collator, LossColumnsCollator):
        return collator
    return LossColumnsCollator(collator, packing=type(collator).__name__ == "DataCollatorWithFlattening")


def _as_list(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


class LossColumnsCollator:
    """A collator (transformers', TRL's, yours) on ``input_ids`` / ``labels`` and the other columns, then the loss's
    float columns ([`TOKEN_COLUMNS`][dft.batches.TOKEN_COLUMNS], [`ROW_COLUMNS`][dft.batches.ROW_COLUMNS]) as float32
    ``[B, T]`` tensors aligned with ``labels``: padded with 0.0 on the side the tokenizer pads, or, with
    ``packing``, concatenated as the labels are into ``[1, total]``. Without those columns: the inner collator's
    batch, unchanged.

    The float columns are popped before the inner collator sees the rows (neither ``DataCollatorForSeq2Seq``,
    whose ``tokenizer.pad`` would try to pad or tensorise them, nor ``DataCollatorWithFlattening``, which drops
    unknown keys, is relied on) and built here from the rows' lengths."""

    def __init__(self, inner: Any, *, packing: bool) -> None:
        self.inner = inner
        self.packing = packing

    def __getattr__(self, name: str) -> Any:  # the inner collator's attributes (Trainer reads ``tokenizer``)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, features: list[Mapping[str, Any]], return_tensors: str | None = None) -> Any:
        import torch

        first = features[0] if features else {}
        tokens = [k for k in TOKEN_COLUMNS if k in first]
        row = [k for k in ROW_COLUMNS if k in first]
        drop = {*tokens, *row, *(k for k in DROPPED_COLUMNS if k in first)}
        if not drop:
            return self.inner(features) if return_tensors is None else self.inner(features, return_tensors)
        if self.packing:  # DataCollatorWithFlattening leaves out empty examples
            features = [f for f in features if len(f["input_ids"]) > 0]
        columns: dict[str, list[list[float]]] = {}
        for key in tokens:
            columns[key] = [[float(v) for v in _as_list(f[key])] for f in features]
        for key in row:
            columns[key] = [[_row_value(f[key], key)] * len(f["input_ids"]) for f in features]
        for key in tokens:
            for f, values in zip(features, columns[key]):
                if len(values) != len(f["input_ids"]):
                    raise ValueError(f"'{key}' has {len(values)} values for {len(f['input_ids'])} input_ids.")
        stripped = [{k: v for k, v in f.items() if k not in drop} for f in features]
        batch = self.inner(stripped) if return_tensors is None else self.inner(stripped, return_tensors)
        width = batch["input_ids"].shape[-1]
        left = getattr(getattr(self.inner, "tokenizer", None), "padding_side", "right") == "left"  # as the labels
        for key, rows in columns.items():
            if self.packing:
                flat = [v for values in rows for v in ([0.0, *values[1:]] if key in tokens else values)]
                out = torch.tensor([flat], dtype=torch.float32)
            else:
                out = torch.zeros(len(rows), width, dtype=torch.float32)
                for i, values in enumerate(rows):
                    if values:
                        span = slice(width - len(values), width) if left else slice(0, len(values))
                        out[i, span] = torch.tensor(values, dtype=torch.float32)
            batch[key] = out.numpy() if (return_tensors or "pt") == "np" else out
        return batch


def _row_value(value: Any, key: str) -> float:
    if isinstance(value, (bool, int, float)) and math.isfinite(value):
        return float(value)
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        return _row_value(value.item(), key)
    raise ValueError(f"'{key}' must be a finite number per row, got {value!r}.")


def nft_dataset(dataset: Any, keep_uniform_prompts: bool = False) -> tuple[Any, dict[str, int]]:
    """Rows for NFT: each row's prompt's acceptance rate as ``nft_rhat``, from the rows themselves.

    Args:
        dataset: a ``datasets.Dataset`` whose rows carry ``accepted`` (0/1) and ``prompt_index`` (``dft sample``'s
            ``samples.jsonl`` columns), pre-tokenised (``input_ids``, ``labels``) or with ``dft sample``'s
            ``prompt_ids`` and ``completion_ids`` (then ``input_ids`` / ``labels`` are built from them: the prompt
            unsupervised, the completion as sampled).
        keep_uniform_prompts: keep the prompts whose samples all got one verdict (their rate is clamped by the loss);
            by default they are dropped, as the official runs' ``filter_groups`` does.

    Returns:
        ``(dataset, counts)`` with ``counts``: ``prompts``, ``uniform_prompts``, ``rows_dropped``, ``rows``.

    Raises:
        ValueError: a column is missing, a verdict is not 0/1, or (dropping) every prompt has one verdict.
    """
    columns = list(getattr(dataset, "column_names", None) or [])
    missing = [c for c in ("accepted", "prompt_index") if c not in columns]
    if missing:
        raise ValueError(
            f"loss_type='nft' needs the columns {missing} in the training rows (dft sample's samples.jsonl has "
            f"them: every sample with its verdict); got columns {columns}."
        )
    verdicts, prompts = dataset["accepted"], dataset["prompt_index"]
    bad = next((i for i, a in enumerate(verdicts) if a not in (0, 1)), None)  # True/False compare equal to 1/0
    if bad is not None:
        raise ValueError(f"row {bad + 1}: 'accepted' must be 0 or 1, got {verdicts[bad]!r}.")
    totals: dict[Any, list[int]] = {}
    for q, a in zip(prompts, verdicts):
        n = totals.setdefault(q, [0, 0])
        n[0] += 1
        n[1] += int(a)
    rate = {q: accepted / n for q, (n, accepted) in totals.items()}
    uniform = {q for q, r in rate.items() if r in (0.0, 1.0)}
    rows_in = len(prompts)
    if not keep_uniform_prompts and uniform:
        if len(uniform) == len(rate):
            raise ValueError(
                f"every prompt's samples ({len(rate)} prompts) got one verdict: NFT learns from the contrast between "
                "a prompt's accepted and rejected samples. Sample more per prompt (dft sample --num_samples), or keep "
                "them (nft_keep_uniform_prompts=True / --nft_keep_uniform_prompts: their rate is clamped)."
            )
        dataset = dataset.filter(lambda q: q not in uniform, input_columns="prompt_index")
    dataset = dataset.add_column("nft_rhat", [rate[q] for q in dataset["prompt_index"]])
    if "input_ids" not in columns and {"prompt_ids", "completion_ids"} <= set(columns):
        dataset = dataset.map(_sampled_tokens, input_columns=["prompt_ids", "completion_ids"])
    counts = {
        "prompts": len(rate),
        "uniform_prompts": len(uniform),
        "rows_dropped": rows_in - len(dataset),
        "rows": len(dataset),
    }
    return dataset, counts


def _sampled_tokens(prompt_ids: list[int], completion_ids: list[int]) -> dict[str, list[int]]:
    return {"input_ids": [*prompt_ids, *completion_ids], "labels": [-100] * len(prompt_ids) + list(completion_ids)}
