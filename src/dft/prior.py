"""Should I switch? The base model's probabilities on the supervised tokens, before any training.

DFT scales each token's cross-entropy gradient by ``p`` (the model's probability of the target), so
it keeps ``p`` of SFT's update on that token: tokens the model already finds plausible train as under
SFT, tokens it finds unlikely (new facts, a new format, a new stop token) barely train. Whether DFT
fits a data set is therefore visible from one no-grad pass of the base over it:

```python
report = dft.inspect_prior(model, batches, special_ids=tokenizer.all_special_ids)
report.recommendation, report.reason, report.as_dict()   # the keys of `dft inspect`'s inspect.json
```

The pass uses the fused head (``causal_lm_loss(..., reduction="none")`` with the cross-entropy weight):
no ``[tokens, vocab]`` logits. [`RULE`][dft.prior.RULE] holds the thresholds of the recommendation and where they
come from (docs: Choosing a loss).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .advice import RULE, recommend_loss
from .causal import causal_lm_loss
from .labels import causal_targets
from .weights import DFTWeight

__all__ = ["RULE", "PriorReport", "inspect_prior", "prior_figures", "recommend"]

QUANTILES = (0.1, 0.5, 0.9)
THRESHOLDS = (0.001, 0.01, 0.1)
BINS = [-8.0 + 0.5 * i for i in range(17)]  # log10 p bin edges: p from 1e-8 to 1 (lower values in the first bin)


@dataclass
class PriorReport:
    """The figures of [`inspect_prior`][dft.inspect_prior]; [`as_dict`][dft.PriorReport.as_dict] gives
    ``inspect.json``'s keys."""

    supervised_tokens: int
    mean_p: float | None
    quantiles: dict[str, float | None]
    frac_below: dict[str, float | None]
    special_tokens: dict[str, Any]
    recommendation: str
    reason: str
    histogram: dict[str, list] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Every field as a plain dict (``dataclasses.asdict``): the keys of ``inspect.json``."""
        return asdict(self)


def prior_figures(p: Tensor) -> dict[str, Any]:
    """``supervised_tokens``, ``mean_p``, ``quantiles`` and ``frac_below`` of target probabilities ``p [n]``."""
    p = p.double().reshape(-1)
    n = int(p.numel())
    if n == 0:
        return {
            "supervised_tokens": 0,
            "mean_p": None,
            "quantiles": {str(q): None for q in QUANTILES},
            "frac_below": {str(t): None for t in THRESHOLDS},
        }
    ordered = p.sort().values
    quantiles = {}
    for q in QUANTILES:  # linear interpolation between order statistics (numpy's default)
        pos = q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        quantiles[str(q)] = float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return {
        "supervised_tokens": n,
        "mean_p": float(p.mean()),
        "quantiles": quantiles,
        "frac_below": {str(t): float((p < t).double().mean()) for t in THRESHOLDS},
    }


def recommend(
    figures: Mapping[str, Any], vocab_size: int | None = None, special: Mapping[str, Any] | None = None
) -> tuple[str, str]:
    """``(recommendation, reason)`` from [`prior_figures`][dft.prior.prior_figures] (the thresholds of
    [`RULE`][dft.prior.RULE]); when most special-token targets (``special``: their figures) are at ``p < 0.01`` the
    reason says to keep them on cross-entropy (``dft_ce_tokens="special"``): a new stop token DFT would not learn."""
    name, reason = _recommend(figures, vocab_size)
    if special and special.get("supervised_tokens") and special["frac_below"]["0.01"] > 0.5:
        reason += (
            f" The special tokens (EOS, ...) are new to the model (mean p {special['mean_p']:.2g}): keep them on"
            " cross-entropy (dft_ce_tokens='special', --dft_ce_tokens special)."
        )
    return name, reason


def _recommend(figures: Mapping[str, Any], vocab_size: int | None) -> tuple[str, str]:
    return recommend_loss(figures["supervised_tokens"], figures["mean_p"], figures["frac_below"]["0.01"], vocab_size)


def _histogram(logp10: Tensor, special: Tensor, p: Tensor) -> dict[str, list]:
    edges = torch.tensor(BINS, dtype=torch.float64)
    index = torch.bucketize(logp10.clamp(BINS[0], BINS[-1] - 1e-12), edges, right=True) - 1
    counts = torch.bincount(index, minlength=len(BINS) - 1)
    special_counts = torch.bincount(index[special], minlength=len(BINS) - 1)
    p_sum = torch.bincount(index, weights=p, minlength=len(BINS) - 1)
    keep = [float(s / c) if c else None for s, c in zip(p_sum.tolist(), counts.tolist())]
    return {
        "log10_p_edges": BINS,
        "counts": counts.tolist(),
        "special_counts": special_counts.tolist(),
        "dft_share_of_ce_update": keep,  # mean p in the bin: the share of SFT's update DFT keeps there
    }


@torch.no_grad()
def inspect_prior(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    special_ids: Iterable[int] = (),
    ignore_index: int = -100,
) -> PriorReport:
    """The model's target probabilities ``p_t`` on the supervised tokens of ``batches``, summarised.

    Args:
        model: a causal LM (Hugging Face or any model [`dft.causal_lm_loss`][dft.causal_lm_loss] takes), in eval mode.
        batches: ``input_ids`` ``[B, T]``, ``labels`` ``[B, T]`` (``-100`` where not supervised),
            optionally ``attention_mask`` / ``position_ids``: the batches training would see.
        special_ids: token ids reported separately (the tokenizer's special tokens, EOS included).

    Returns:
        [`PriorReport`][dft.PriorReport]: ``supervised_tokens``, ``mean_p``, ``quantiles`` (0.1/0.5/0.9 of ``p``),
            ``frac_below`` (share with ``p`` < 0.001/0.01/0.1), the same for ``special_tokens``, the
            ``recommendation`` (``dft``, ``dft_floor``, ``mix`` or ``sft``) with its ``reason``, and a
            histogram of ``log10 p``.
    """
    was_training = model.training
    model.eval()
    logps, targets = [], []
    try:
        for batch in batches:
            out = causal_lm_loss(model, batch, DFTWeight(alpha=0.0), reduction="none", ignore_index=ignore_index)
            tgt = causal_targets(batch, ignore_index)
            valid = tgt != ignore_index
            logps.append((-out.head_loss)[valid].double().cpu())
            targets.append(tgt[valid].cpu())
    finally:
        model.train(was_training)
    logp = torch.cat(logps) if logps else torch.zeros(0, dtype=torch.float64)
    tgt = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    p = logp.exp()
    special = torch.isin(tgt, torch.tensor(sorted(set(special_ids)), dtype=torch.long))
    figures = prior_figures(p)
    special_figures = prior_figures(p[special])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or (head.weight.shape[0] if head else None)
    recommendation, reason = recommend(figures, vocab, special_figures)
    return PriorReport(
        **figures,
        special_tokens=special_figures,
        recommendation=recommendation,
        reason=reason,
        histogram=_histogram(logp / math.log(10), special, p),
    )
