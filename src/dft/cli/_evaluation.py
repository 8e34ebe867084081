"""Evaluation of a trained causal LM (``dft train``'s last step, ``dft eval``): exact match of greedy answers,
token statistics of a dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..stats import TokenStats

__all__ = ["ExactMatch", "exact_match", "token_ce"]


@dataclass
class ExactMatch:
    """What ``exact_match`` scored.

    ``score``: the share of ``predictions`` equal to their reference after stripping (``None`` when no row
    had a reference); ``skipped``: rows without a reference answer (plain text, a chat ending with a user
    turn); ``note``: why ``score`` is ``None`` or rows were skipped, else ``None``.
    """

    score: float | None
    predictions: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    note: str | None = None


def _reference_and_prompt(ex: dict, tokenizer: Any) -> tuple[str, Any] | str:
    """``(reference, prompt ids [1, T])``, or why the row has no reference answer."""
    if isinstance(ex.get("prompt"), str) and isinstance(ex.get("completion"), str):
        return ex["completion"].strip(), tokenizer(ex["prompt"], return_tensors="pt")["input_ids"]
    messages = ex.get("messages")
    if isinstance(messages, list) and messages:
        last = messages[-1].get("role")
        if last != "assistant":
            return f"ends with a {last!r} turn"
        ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return messages[-1]["content"].strip(), ids
    return "is plain text"


def _note(reasons: dict[str, int], rows: int, scored: int) -> str | None:
    if not reasons:
        return None
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
    head = f"{rows - scored} of {rows} rows have no reference answer ({why})"
    rule = "exact match compares the greedy answer with a completion or a final 'assistant' turn"
    return f"{head}: {rule}" + ("" if scored else "; nothing to score")


def exact_match(
    model: Any,
    tokenizer: Any,
    raw: Any,
    limit: int,
    max_new_tokens: int = 64,
    *,
    rank: int = 0,
    world_size: int = 1,
    synced_gpus: bool = False,
) -> ExactMatch:
    """Greedy answers on those of the first ``limit`` rows of ``raw`` that have a reference answer
    (prompt/completion rows, chats ending with an assistant turn; the others are counted in ``skipped``). Each prediction is ``{"index", "reference", "prediction",
    "correct"}``, in row order.

    With ``world_size > 1`` (torch.distributed initialised, every rank calling) each rank generates
    rows ``rank::world_size`` and every rank returns the gathered result. ``synced_gpus=True`` (for
    engines that gather parameters per module: ZeRO-3, FSDP2, tensor parallel) makes every rank run the
    same number of ``generate`` calls, each kept in step until the longest answer ends.
    """
    import torch

    rows = raw.select(range(min(limit, len(raw))))
    work, reasons = [], {}
    for index, ex in enumerate(rows):
        pair = _reference_and_prompt(ex, tokenizer)
        if isinstance(pair, str):
            reasons[pair] = reasons.get(pair, 0) + 1
        else:
            work.append((index, *pair))
    mine = work[rank::world_size]
    calls = -(-len(work) // world_size) if synced_gpus else len(mine)  # synced: the same on every rank
    model.eval()
    predictions: list[dict[str, Any]] = []
    with torch.no_grad():
        for k in range(calls):
            index, reference, ids = mine[min(k, len(mine) - 1)] if mine else work[0]
            out = model.generate(
                ids.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **({"synced_gpus": True} if synced_gpus else {}),
            )
            if k < len(mine):  # a rank with fewer rows repeats its last one, to keep the ranks in step
                text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
                predictions.append(
                    {"index": index, "reference": reference, "prediction": text, "correct": text == reference}
                )
    if world_size > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, predictions)
        predictions = sorted((p for part in gathered for p in part), key=lambda p: p["index"])
    score = sum(p["correct"] for p in predictions) / len(predictions) if predictions else None
    return ExactMatch(score, predictions, len(rows) - len(work), _note(reasons, len(rows), len(work)))


def token_ce(model: Any, tokenizer: Any, prepared: Any, batch_size: int) -> dict[str, float]:
    """Mean token CE / p / accuracy / entropy over a prepared dataset (fused head, no logits)."""
    import torch

    from ..causal import causal_lm_loss
    from ..data import collator

    collate = collator(tokenizer)
    stats = None
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prepared), batch_size):
            batch = collate([prepared[i] for i in range(start, min(start + batch_size, len(prepared)))])
            out = causal_lm_loss(model, {k: v.to(model.device) for k, v in batch.items()}, alpha=0.0)
            stats = TokenStats.accumulate(stats, out.stats)
    return stats.as_dict()


def _exact_match_on_ranks(trainer: Any, tokenizer: Any, raw: Any, limit: int) -> Any:
    """Exact match once per job: the rows spread over the ranks when each holds the whole model (DDP,
    ZeRO-1/2), the same rows on every rank, kept in step, when the engine gathers parameters per module
    (FSDP2, ZeRO-3, tensor parallel)."""
    from ..engines import detect_engine

    args = trainer.args
    if args.world_size == 1:
        return exact_match(trainer.model, tokenizer, raw, limit)
    whole = detect_engine(trainer.model_wrapped).name in ("plain", "ddp", "deepspeed")
    if whole:
        return exact_match(trainer.model, tokenizer, raw, limit, rank=args.process_index, world_size=args.world_size)
    return exact_match(trainer.model, tokenizer, raw, limit, synced_gpus=True)


def _table_notes(limit: int) -> dict[str, str]:
    """What the console table says next to the two counts: exact match scores at most the first ``limit`` rows
    (those with a reference answer), the token metrics every row."""
    return {
        "eval_exact_match_examples": f"capped by --max_eval_examples={limit}",
        "num_examples": "every row, for the token metrics",
    }


def _exact_match_metrics(match: Any) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "eval_exact_match": match.score,
        "eval_exact_match_examples": len(match.predictions),
    }
    if match.note:
        metrics["eval_exact_match_note"] = match.note
    return metrics
