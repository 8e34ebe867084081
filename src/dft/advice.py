"""The "should I switch?" rule: which loss fits a base model's probabilities of its training targets.

DFT keeps ``p`` of SFT's gradient on each token, so the share of supervised tokens at ``p < 0.01`` (their DFT
weight under 1%) says how much of the data DFT would barely train. One rule, read by ``dft inspect``
([`dft.inspect_prior`][dft.inspect_prior]) and by the trainers, which warn before their first optimizer step
when a DFT-family run meets data it cannot learn.
"""

from __future__ import annotations

__all__ = ["RULE", "recommend_loss"]

RULE = {
    "no_prior_mean_p_x_vocab": 5.0,  # mean p < 5 / V: the model is near uniform on this data -> SFT
    "sft_below_0.01": 0.30,  # >= 30% of the supervised tokens at p < 0.01: mostly new content -> SFT
    "mix_below_0.01": 0.10,  # >= 10%: a real share DFT would barely train -> mix in CE (beta 0.5)
    "floor_below_0.01": 0.01,  # >= 1%: a tail of hard tokens (noise, rare forms) -> DFT + floor 0.1
}
"""Thresholds on ``frac_below["0.01"]`` (the share of tokens whose DFT weight is under 0.01), set from the
study (docs: Choosing a loss, and Evidence): its reasoning data has 0.2% of tokens below 0.01 (DFT at parity with
SFT), the noisy copy 1.5% (DFT + floor the significant winner), the new fact table 27% (plain DFT
-0.146 recall vs SFT, the mix at parity)."""


def recommend_loss(
    supervised_tokens: int, mean_p: float | None, frac_below_001: float | None, vocab_size: int | None = None
) -> tuple[str, str]:
    """``(recommendation, reason)``: ``"dft"``, ``"dft_floor"``, ``"mix"`` or ``"sft"``, by [`RULE`][dft.prior.RULE].

    Args:
        supervised_tokens: how many targets the figures cover.
        mean_p: their mean probability under the base model.
        frac_below_001: the share of them with ``p < 0.01``.
        vocab_size: ``V``, to tell a model with no prior (``mean_p`` near ``1 / V``).
    """
    if not supervised_tokens or mean_p is None or frac_below_001 is None:
        return "sft", "no supervised token: nothing to decide on."
    low = frac_below_001
    numbers = f"mean p {mean_p:.3f}, {low:.1%} of the supervised tokens at p < 0.01"
    if vocab_size and mean_p < RULE["no_prior_mean_p_x_vocab"] / vocab_size:
        return (
            "sft",
            f"{numbers}, close to uniform (1/V = {1 / vocab_size:.3g}): no prior for DFT to build on; use SFT.",
        )
    if low >= RULE["sft_below_0.01"]:
        return "sft", f"{numbers}: much of the data is new to the model and DFT would barely train it; use SFT."
    if low >= RULE["mix_below_0.01"]:
        return "mix", f"{numbers}: a real share is new to the model; mix DFT with cross-entropy (dft_beta 0.5)."
    if low >= RULE["floor_below_0.01"]:
        return "dft_floor", f"{numbers}: the model has a prior, with a tail of hard tokens; DFT with a floor (0.1)."
    return "dft", f"{numbers}: the model already has a prior for this data; DFT fits."
