"""Evaluation of a trained causal LM: exact match of greedy answers, token statistics of a dataset."""

from __future__ import annotations

from typing import Any

from .stats import TokenStats

__all__ = ["exact_match", "token_ce"]


def _reference_and_prompt(ex: dict, tokenizer: Any) -> tuple[str, Any] | None:
    if "prompt" in ex and "completion" in ex:
        return ex["completion"].strip(), tokenizer(ex["prompt"], return_tensors="pt")["input_ids"]
    if "messages" in ex and ex["messages"] and ex["messages"][-1].get("role") == "assistant":
        ids = tokenizer.apply_chat_template(ex["messages"][:-1], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return ex["messages"][-1]["content"].strip(), ids
    return None


def exact_match(
    model: Any, tokenizer: Any, raw: Any, limit: int, max_new_tokens: int = 64
) -> tuple[float | None, list[dict[str, Any]]]:
    """Greedy answers on the first ``limit`` examples: ``(fraction equal to the reference after stripping,
    predictions)``; ``(None, [])`` for plain-text data (no reference). Each prediction is
    ``{"index", "reference", "prediction", "correct"}``."""
    import torch

    model.eval()
    predictions: list[dict[str, Any]] = []
    with torch.no_grad():
        for index, ex in enumerate(raw.select(range(min(limit, len(raw))))):
            pair = _reference_and_prompt(ex, tokenizer)
            if pair is None:
                return None, []
            reference, ids = pair
            out = model.generate(
                ids.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
            predictions.append(
                {"index": index, "reference": reference, "prediction": text, "correct": text == reference}
            )
    return sum(p["correct"] for p in predictions) / max(len(predictions), 1), predictions


def token_ce(model: Any, tokenizer: Any, prepared: Any, batch_size: int) -> dict[str, float]:
    """Mean token CE / p / accuracy / entropy over a prepared dataset (fused head, no logits)."""
    import torch

    from .causal import causal_lm_loss
    from .data import collator

    collate = collator(tokenizer)
    stats = None
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prepared), batch_size):
            batch = collate([prepared[i] for i in range(start, min(start + batch_size, len(prepared)))])
            out = causal_lm_loss(model, {k: v.to(model.device) for k, v in batch.items()}, alpha=0.0)
            stats = TokenStats.accumulate(stats, out.stats)
    return stats.as_dict()
