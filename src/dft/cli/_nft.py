"""``dft train --loss nft``: the checks and the record of ``dft sample``'s output it trains on.

``--data S/samples.jsonl`` (every sample with its verdict) next to ``S/summary.json`` (the sampling record): the
sampling temperature becomes ``nft_temperature`` unless given; temperature 0 is refused (no ratio to learn from);
``top_p < 1`` / ``top_k > 0`` are said (``pi_old`` is then not the sampler); the token ids were written by the same
tokenizer (its fingerprint), else the run stops. The held-out split is by ``prompt_index``: a prompt's samples stay
on one side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._parsing import UsageError
from ._processes import say

NFT_COLUMNS = ("accepted", "prompt_index")

SAMPLE_ROW_KEYS = frozenset({"reward", "accepted", "sample_index"})
"""The columns by which ``dft sample``'s ``samples.jsonl`` (every sample, rejected ones too) is recognised."""


def check_nft_data(script: Any, config: Any) -> dict | None:
    """Before anything loads: the data's columns, and the sampling record (returned; None without one)."""
    from ..data import first_jsonl_row

    if script.data is None:
        raise UsageError(
            "--loss nft trains on dft sample's samples.jsonl (every sample with its verdict): give --data S/samples.jsonl."
        )
    row = first_jsonl_row(script.data) if str(script.data).endswith(".jsonl") else None
    if row is not None and not set(NFT_COLUMNS) <= row.keys():
        missing = [c for c in NFT_COLUMNS if c not in row]
        raise UsageError(
            f"--loss nft needs the columns {missing} in --data {script.data} (dft sample's samples.jsonl has them); "
            f"its rows have {sorted(row)}."
        )
    summary_path = Path(script.data).with_name("summary.json")
    record = None
    if summary_path.is_file():
        try:
            record = json.loads(summary_path.read_text()).get("generation")
        except (OSError, ValueError):
            record = None
    if record:
        temperature = record.get("temperature")
        if config.nft_temperature is None and temperature is not None:
            config.nft_temperature = float(temperature)
        if config.nft_temperature is not None and config.nft_temperature <= 0:
            raise UsageError(
                f"--loss nft: the samples were drawn at temperature {config.nft_temperature:g} (greedy): there is no "
                "ratio to learn from; sample with --temperature > 0."
            )
        if (record.get("top_p") or 1.0) < 1.0 or (record.get("top_k") or 0) > 0:
            say(
                f"note: the samples were drawn with top_p={record.get('top_p')}, top_k={record.get('top_k')}: NFT's "
                "pi_old is the model's full distribution at the temperature, not the truncated sampler."
            )
    return record


def check_tokenizer(record: dict | None, tokenizer: Any, data: str) -> None:
    """The token ids in the samples were written by this tokenizer (the sampling record's fingerprint)."""
    expected = (record or {}).get("tokenizer")
    if not expected:
        return
    from ..sampling import tokenizer_fingerprint

    got = tokenizer_fingerprint(tokenizer)
    if got != expected:
        raise UsageError(
            f"--data {data}: its token ids come from another tokenizer (fingerprint {expected}, this model's {got}); "
            "train the model that sampled, or drop the prompt_ids / completion_ids columns to re-tokenise the text."
        )


def split_by_prompt(rows: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Hold out ``fraction`` of the prompts (every sample of a held-out prompt), seeded."""
    import random

    prompts = sorted(set(rows["prompt_index"]))
    if len(prompts) < 2:
        raise UsageError(f"--loss nft: the data has {len(prompts)} prompt: too few to hold out an eval split.")
    held = set(random.Random(seed).sample(prompts, max(1, round(fraction * len(prompts)))))
    train = rows.filter(lambda q: q not in held, input_columns="prompt_index")
    test = rows.filter(lambda q: q in held, input_columns="prompt_index")
    return train, test


def describe(config: Any, ref_model: str | None = None) -> str:
    text = f"nft (neg_weight={config.nft_neg_weight}, temperature={config.nft_temperature or 1.0:g}"
    if config.nft_dft_positive:
        text += ", DFT-weighted positives"
    if config.nft_keep_uniform_prompts:
        text += ", one-verdict prompts kept"
    return text + f"; pi_old = {ref_model or 'the initial model'})"


def exact_match_rows(rows: Any) -> Any:
    """The rows exact match scores: ``dft sample``'s rows (``accepted`` and ``prompt_index``, what ``--loss nft``
    trains on) as ``reference_rows`` gives them; any other rows as they are."""
    return reference_rows(rows) if set(NFT_COLUMNS) <= set(rows.column_names) else rows


def reference_rows(rows: Any) -> Any:
    """The held-out prompts for exact match: one row per prompt, its ``reference`` as the completion (the samples'
    completions are the model's own answers, right or wrong); without references, the accepted samples. For
    ``dft train --loss nft``'s held-out split and ``dft eval`` on ``dft sample``'s rows alike."""
    from datasets import Dataset

    if "reference" not in rows.column_names:
        return rows.filter(lambda a: bool(a), input_columns="accepted")
    seen: dict[Any, dict] = {}
    for row in rows:
        if row["prompt_index"] in seen or row["reference"] is None:
            continue
        prompt = row["prompt"]
        if isinstance(prompt, list):  # a conversation: its reference is the assistant turn that ends it
            turns = [{"role": m["role"], "content": m["content"]} for m in prompt]
            seen[row["prompt_index"]] = {"messages": [*turns, {"role": "assistant", "content": row["reference"]}]}
        else:
            seen[row["prompt_index"]] = {"prompt": prompt, "completion": row["reference"]}
    return Dataset.from_list(list(seen.values()))


def counts_line(counts: dict[str, int], config: Any) -> str:
    uniform = counts["uniform_prompts"]
    if config.nft_keep_uniform_prompts:
        return (
            f"nft: {counts['rows']} samples of {counts['prompts']} prompts, {uniform} of them with one verdict "
            "(kept: --nft_keep_uniform_prompts)"
        )
    return (
        f"nft: {counts['rows']} samples of {counts['prompts'] - uniform} prompts; {uniform} prompts whose samples "
        f"share one verdict dropped ({counts['rows_dropped']} samples)"
    )
