"""Sample completions from a causal LM, verify them, keep the accepted ones: the data step of offline RL
(rejection-sampling fine-tuning, RFT; the paper's offline setting trains DFT on these accepted samples).

```python
rows = dft.sampling.sample(model, tokenizer, prompts, num_samples=4, temperature=1.0, verifier="exact")
dft.sampling.write(rows, "samples")   # samples.jsonl (every sample), accepted.jsonl, pairs.jsonl, summary.json
# then: dft train --data samples/accepted.jsonl ...   or TRL's DPOTrainer on samples/pairs.jsonl
```

``prompts`` are rows in the formats ``dft train`` reads ([`dft.data`][dft.data]):
``{"prompt", "completion"}`` (the completion is the reference answer) or ``{"messages": [...]}`` (chat: the
conversation before the last assistant turn is the prompt, rendered with the tokenizer's chat template and its
generation prompt; that turn is the reference), a list of them or a ``datasets.Dataset``; a bare string is a prompt
without a reference. Each returned row is a dict:

```python
{"prompt_index": 3, "sample_index": 1,           # prompt's position in the input, 0..num_samples-1
 "prompt": "Q: 2+3=?\\n" | [messages...],         # as in the data
 "completion": "2+3=5. A: 5",                    # the generated text, up to (not including) EOS
 "reference": "2+3=5. A: 5\\n" | None,
 "finished": True,                               # stopped at EOS (False: hit max_new_tokens)
 "num_tokens": 12,                               # generated tokens, EOS included
 "prompt_ids": [1, 35, 30, ...],                 # the prompt's token ids as generation saw them (no padding)
 "completion_ids": [14, 29, ..., 22],            # the generated ids: up to and including the stop id when
                                                 # finished; all max_new_tokens of them, no EOS, when cut
 "reward": 1.0, "accepted": True}                # reward >= threshold and finished
```

``prompt_ids + completion_ids`` is the sequence the model generated, token for token: training on them (NFT,
DPO on token ids) sees exactly the sampled tokens, with no decode/re-encode round trip. ``completion`` is
``completion_ids`` decoded without special tokens.

A sample cut by ``max_new_tokens`` is never accepted: ``dft train`` appends EOS to every completion, so
training on it would teach the model to stop mid-answer (its reward is still recorded).

[`pairs`][dft.sampling.pairs] turns the verdicts into preference pairs (TRL's ``{"prompt", "chosen", "rejected"}``
rows, ``pairs.jsonl``): per prompt, its accepted samples zipped with its finished rejected ones.
[`generation_record`][dft.sampling.generation_record] is what ``summary.json`` records of the generation
(settings, stop ids, [`tokenizer_fingerprint`][dft.sampling.tokenizer_fingerprint]).

Generation: batches of ``batch_size`` prompts, left padding, the KV cache, ``num_samples`` sequences per
prompt, ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (0 = off: the model's own distribution, not
transformers' default top-50). Each batch is seeded from ``(seed, batch number)`` inside
``torch.random.fork_rng`` (the caller's RNG state is left alone), so a run is reproducible and, under
``torch.distributed``, each rank samples every ``world_size``-th batch with the same seeds one process
would use: the gathered rows are those of one process, in the same order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .distributed import rank_and_world_size
from .verifiers import Verifier, VerifierError, load_verifier, needs_reference, reward_of

__all__ = [
    "Prompt",
    "accepted",
    "check",
    "check_chat_template",
    "check_options",
    "generate",
    "generation_record",
    "pairs",
    "pass_at_k",
    "read_prompts",
    "sample",
    "score",
    "summarize",
    "tokenizer_fingerprint",
    "write",
]


@dataclass(frozen=True)
class Prompt:
    """One input row: ``prompt`` as in the data (text or messages), its ``reference`` (or None), ``chat``."""

    index: int
    prompt: str | list[dict]
    reference: str | None
    chat: bool


def read_prompts(data: Iterable[Any]) -> list[Prompt]:
    """The rows of ``data`` as [`Prompt`][dft.sampling.Prompt]s; [`dft.data.DataError`][dft.data.DataError] for
    a row with no prompt."""
    from .data import DataError, check_row

    out = []
    for index, row in enumerate(data):
        if isinstance(row, str):
            out.append(Prompt(index, row, None, False))
            continue
        if not isinstance(row, dict):
            raise DataError(f"row {index + 1}: a prompt is a string or a dict, got {type(row).__name__}")
        if "messages" in row and "prompt" not in row:
            problem = check_row(row, "messages")
            if problem:
                raise DataError(f"row {index + 1}: {problem}")
            messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            if messages[-1]["role"] == "assistant":
                prompt, reference = messages[:-1], messages[-1]["content"]
            else:
                prompt, reference = messages, None
            if not prompt:
                raise DataError(f"row {index + 1}: the conversation has nothing before its last assistant turn")
            out.append(Prompt(index, prompt, reference, True))
        elif "prompt" in row:
            if not isinstance(row["prompt"], str):
                raise DataError(f"row {index + 1}: 'prompt' must be a string, got {type(row['prompt']).__name__}.")
            reference = row.get("completion")
            if reference is not None and not isinstance(reference, str):
                raise DataError(f"row {index + 1}: 'completion' must be a string, got {type(reference).__name__}.")
            out.append(Prompt(index, row["prompt"], reference, False))
        else:
            raise DataError(
                f"row {index + 1} has columns {sorted(row)}: sampling needs prompts, rows with 'prompt' "
                "(+ 'completion', the reference) or 'messages' (chat), not plain 'text'."
            )
    if not out:
        raise DataError("no prompts to sample from")
    return out


def _verifier_name(spec: Any) -> str:
    return spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))


def check(
    prompts: Sequence[Prompt],
    verifier: str | Verifier,
    *,
    num_samples: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    threshold: float = 1.0,
    answer_regex: str | None = None,
    tokenizer: Any = None,
) -> Verifier:
    """Everything that can be wrong before generating, as one ``ValueError`` line; returns the verifier.

    Checks the numbers, loads the verifier ([`VerifierError`][dft.verifiers.VerifierError]), requires a
    reference in every row when the verifier needs one (``exact``, ``math``), a chat template when rows are chat, and
    calls the verifier once on the first row (its reference as the completion): it must return a finite number.
    """
    from .data import DataError

    check_options(
        num_samples=num_samples, temperature=temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, batch_size=batch_size, threshold=threshold,
    )  # fmt: skip
    fn = load_verifier(verifier, answer_regex=answer_regex)
    if needs_reference(fn):
        missing = next((p for p in prompts if p.reference is None), None)
        if missing is not None:
            what = "a last assistant turn" if missing.chat else "a 'completion' column"
            raise DataError(
                f"row {missing.index + 1} has no reference answer ({what}): the {_verifier_name(verifier)} verifier "
                "compares against it; add references or use a MODULE:FUNCTION verifier."
            )
    if tokenizer is not None:
        check_chat_template(prompts, tokenizer)
    first = prompts[0]
    try:
        reward_of(fn, first.prompt, first.reference if first.reference is not None else "", first.reference)
    except VerifierError as e:
        raise VerifierError(f"{e} (on row {first.index + 1}, its reference as the completion)") from None
    return fn


def check_options(
    *,
    num_samples: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    threshold: float = 1.0,
) -> None:
    """The generation and acceptance numbers: ``ValueError`` naming the first one out of range."""
    values = {"num_samples": num_samples, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    values |= {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "threshold": threshold}
    rules = [
        ("num_samples", num_samples >= 1, ">= 1"),
        ("temperature", temperature >= 0 and math.isfinite(temperature), ">= 0 (0 = greedy)"),
        ("top_p", 0 < top_p <= 1, "in (0, 1]"),
        ("top_k", top_k >= 0, ">= 0 (0 = off)"),
        ("max_new_tokens", max_new_tokens >= 1, ">= 1"),
        ("batch_size", batch_size >= 1, ">= 1"),
        ("threshold", math.isfinite(threshold), "a finite number"),
    ]
    for name, ok, rule in rules:
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {values[name]}.")


def check_chat_template(prompts: Sequence[Prompt], tokenizer: Any) -> None:
    """Chat rows need a tokenizer with a chat template ([`dft.data.DataError`][dft.data.DataError] otherwise)."""
    from .data import DataError

    if any(p.chat for p in prompts) and not getattr(tokenizer, "chat_template", None):
        raise DataError("the data has 'messages' but the tokenizer has no chat template.")


def _ids(tokenizer: Any, p: Prompt) -> list[int]:
    if p.chat:
        from .data import _ids as template_ids

        return template_ids(tokenizer.apply_chat_template(p.prompt, tokenize=True, add_generation_prompt=True))
    return list(tokenizer(p.prompt)["input_ids"])  # as dft.data tokenizes a prompt (special tokens included)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def _batch_seed(seed: int, batch: int) -> int:
    return int(hashlib.sha256(f"{seed}:{batch}".encode()).hexdigest()[:15], 16)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Iterable[Any],
    *,
    num_samples: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Sampled completions, one row per sample (the module docstring's rows, without reward/accepted).

    Under ``torch.distributed`` every rank generates its batches and all ranks return every row
    (``all_gather_object``), sorted by ``(prompt_index, sample_index)``.
    """
    import torch
    from transformers import GenerationConfig

    given = prompts if isinstance(prompts, list) else list(prompts)
    items = given if given and all(isinstance(p, Prompt) for p in given) else read_prompts(given)
    check_options(
        num_samples=num_samples, temperature=temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )  # fmt: skip
    rank, world = rank_and_world_size(launcher=False)  # a group to gather over, or one process
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if temperature else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples if temperature else 1,  # greedy: one sequence, copied K times
        pad_token_id=pad,
        eos_token_id=eos or None,
        do_sample=bool(temperature),
        **sampling,
    )
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    mine = [(b, chunk) for b, chunk in enumerate(batches) if b % world == rank]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="dft sample", unit="prompt", dynamic_ncols=True)
    t0 = time.time()
    try:
        for b, chunk in mine:
            encoded = [_ids(tokenizer, p) for p in chunk]
            width = max(map(len, encoded))
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for i, e in enumerate(encoded):  # left padding: every prompt ends where generation starts
                ids[i, width - len(e) :] = torch.tensor(e, dtype=torch.long)
                mask[i, width - len(e) :] = 1
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(_batch_seed(seed, b))
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            new = out[:, width:].tolist()
            if not temperature:
                new = [tokens for tokens in new for _ in range(num_samples)]
            for r, tokens in enumerate(new):
                p = chunk[r // num_samples]
                stop = next((k for k, t in enumerate(tokens) if t in eos), None)
                kept = tokens if stop is None else tokens[:stop]
                generated = tokens if stop is None else tokens[: stop + 1]  # the stop id, not the pads after it
                rows.append(
                    {
                        "prompt_index": p.index,
                        "sample_index": r % num_samples,
                        "prompt": p.prompt,
                        "completion": tokenizer.decode(kept, skip_special_tokens=True),
                        "reference": p.reference,
                        "finished": stop is not None,
                        "num_tokens": len(generated),
                        "prompt_ids": [int(t) for t in encoded[r // num_samples]],
                        "completion_ids": [int(t) for t in generated],
                    }
                )
            if bar is not None:
                bar.update(min(len(chunk) * world, bar.total - bar.n))  # an estimate of every rank's; never past
                bar.set_postfix(samples_per_s=f"{len(rows) * world / max(time.time() - t0, 1e-9):.1f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if world > 1:
        import torch.distributed as dist

        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, rows)
        rows = [row for part in parts for row in part]
    rows.sort(key=lambda row: (row["prompt_index"], row["sample_index"]))
    return rows


def score(
    rows: Iterable[dict], verifier: str | Verifier = "exact", *, answer_regex: str | None = None, threshold: float = 1.0
) -> list[dict]:
    """Copies of ``rows`` with ``reward`` (the verifier's) and ``accepted`` (``reward >= threshold`` and
    ``finished``; a row without ``finished``, e.g. written by another generator, counts as finished).

    Rows need ``prompt``, ``completion`` and ``reference`` (``None`` allowed for user verifiers):
    ``samples.jsonl`` from any generator (vLLM, ...) can be verified this way. A verifier that raises or
    returns a non-number raises [`VerifierError`][dft.verifiers.VerifierError] naming the row.
    """
    fn = load_verifier(verifier, answer_regex=answer_regex)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}.")
    out = []
    for i, row in enumerate(rows):
        for key in ("prompt", "completion"):
            if key not in row:
                raise ValueError(f"sample {i + 1} has no {key!r}")
        reference = row.get("reference")
        if reference is None and needs_reference(fn):
            raise VerifierError(f"sample {i + 1} has no reference: the {_verifier_name(verifier)} verifier needs one")
        try:
            reward = reward_of(fn, row["prompt"], row["completion"], reference)
        except VerifierError as e:
            raise VerifierError(f"{e} (on sample {i + 1}: {row['completion']!r:.60})") from None
        out.append({**row, "reward": reward, "accepted": bool(reward >= threshold and row.get("finished", True))})
    return out


def sample(
    model: Any,
    tokenizer: Any,
    prompts: Iterable[Any],
    *,
    num_samples: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    verifier: str | Verifier = "exact",
    answer_regex: str | None = None,
    threshold: float = 1.0,
    progress: bool = False,
) -> list[dict]:
    """[`generate`][dft.sampling.generate] then [`score`][dft.sampling.score]: every sample with its reward; everything
    is checked ([`check`][dft.sampling.check]) before the first token is generated."""
    items = read_prompts(prompts)
    fn = check(
        items, verifier, num_samples=num_samples, temperature=temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, batch_size=batch_size, threshold=threshold, answer_regex=answer_regex,
        tokenizer=tokenizer,
    )  # fmt: skip
    rows = generate(
        model, tokenizer, items, num_samples=num_samples, temperature=temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=progress,
    )  # fmt: skip
    return score(rows, fn, threshold=threshold)


def accepted(rows: Iterable[dict]) -> list[dict]:
    """The accepted samples as training rows ``dft train --data`` takes: ``{"prompt", "completion"}``, or
    ``{"messages": prompt + [assistant completion]}`` for chat prompts."""
    out = []
    for row in rows:
        if not row.get("accepted"):
            continue
        if isinstance(row["prompt"], list):
            out.append({"messages": [*row["prompt"], {"role": "assistant", "content": row["completion"]}]})
        else:
            out.append({"prompt": row["prompt"], "completion": row["completion"]})
    return out


def _turn(row: dict) -> str | list[dict]:
    """A sample as a preference row's ``chosen`` / ``rejected``: the text, or one assistant turn for a chat prompt."""
    if isinstance(row["prompt"], list):
        return [{"role": "assistant", "content": row["completion"]}]
    return row["completion"]


def pairs(rows: Iterable[dict]) -> tuple[list[dict], dict]:
    """Preference pairs from scored rows, in TRL's format (``DPOTrainer`` takes them as they are), and their counts.

    Per prompt (its ``prompt_index``, else the prompt itself), in order of first appearance: the accepted samples
    and the finished rejected samples, each in ``sample_index`` order, zipped: ``min(accepted, rejected)`` pairs,
    no sample in two. A rejected sample cut by ``max_new_tokens`` is left out (DPO appends EOS to a text
    completion, which would turn a cut answer into a finished one). A text prompt gives
    ``{"prompt": str, "chosen": str, "rejected": str}``; a chat prompt (a list of messages) gives
    ``{"prompt": messages, "chosen": [assistant turn], "rejected": [assistant turn]}``.

    The counts: ``pairs``, ``prompts_with_pairs``, and ``unfinished_rejected_left_out`` (the unfinished rejected
    samples of prompts with an accepted sample: the ones that could otherwise have been paired).
    """
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        key = row.get("prompt_index", json.dumps(row["prompt"], sort_keys=True))
        groups.setdefault(key, []).append(row)
    out: list[dict] = []
    prompts_with_pairs = left_out = 0
    for group in groups.values():
        ordered = sorted(group, key=lambda row: row.get("sample_index", 0))  # stable: file order without an index
        chosen = [row for row in ordered if row.get("accepted")]
        rejected = [row for row in ordered if not row.get("accepted") and row.get("finished", True)]
        if not chosen:
            continue
        left_out += sum(not row.get("accepted") and not row.get("finished", True) for row in ordered)
        prompt = chosen[0]["prompt"]
        made = [{"prompt": prompt, "chosen": _turn(c), "rejected": _turn(r)} for c, r in zip(chosen, rejected)]
        prompts_with_pairs += bool(made)
        out += made
    return out, {"pairs": len(out), "prompts_with_pairs": prompts_with_pairs, "unfinished_rejected_left_out": left_out}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hex digest of what maps text to ids: the vocabulary (added tokens included), the special-token ids and
    the tokenizer's class. The same tokenizer loaded twice gives the same string; token ids recorded under one
    fingerprint mean the same tokens under another tokenizer only when the fingerprints match."""
    specials = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad", "sep", "cls")
    }
    record = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])),
        "special_ids": specials,
        "all_special_ids": sorted(int(i) for i in getattr(tokenizer, "all_special_ids", []) or []),
    }
    return hashlib.sha256(json.dumps(record, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def generation_record(
    model: Any,
    tokenizer: Any,
    *,
    num_samples: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
) -> dict:
    """What [`generate`][dft.sampling.generate] sampled under, as ``summary.json``'s ``"generation"``:
    ``{"temperature", "top_p", "top_k", "max_new_tokens", "num_samples", "stop_ids", "tokenizer"}`` (``stop_ids``:
    the ids that end a sample, the model's generation config's EOS and the tokenizer's; ``tokenizer``: its
    [`tokenizer_fingerprint`][dft.sampling.tokenizer_fingerprint]).

    ```python
    record = dft.sampling.generation_record(model, tokenizer, num_samples=4, temperature=1.0, max_new_tokens=256)
    dft.sampling.write(rows, "samples", extra={"generation": record})
    ```
    """
    return {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "num_samples": num_samples,
        "stop_ids": _eos_ids(model, tokenizer),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with ``c`` of ``n`` samples verified: ``1 - C(n-c, k) / C(n, k)``."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(rows: Sequence[dict], threshold: float = 1.0) -> dict:
    """Acceptance rate, pass@k (k = 1, 2, 4, ... up to the samples per prompt; a sample passes when its
    reward is ``>= threshold``, finished or not), the prompts with no accepted sample, mean reward."""
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        key = row.get("prompt_index", json.dumps(row["prompt"], sort_keys=True))
        groups.setdefault(key, []).append(row)
    n_min = min((len(g) for g in groups.values()), default=0)
    ks = sorted({1, n_min} | {2**i for i in range(1, 20) if 2**i < n_min}) if n_min else []
    passes = {k: [pass_at_k(len(g), sum(r["reward"] >= threshold for r in g), k) for g in groups.values()] for k in ks}
    without = [key for key, g in groups.items() if not any(r["accepted"] for r in g)]
    n_acc = sum(bool(r["accepted"]) for r in rows)
    return {
        "prompts": len(groups),
        "samples": len(rows),
        "samples_per_prompt": n_min if all(len(g) == n_min for g in groups.values()) else None,
        "accepted": n_acc,
        "acceptance_rate": n_acc / len(rows) if rows else 0.0,
        "mean_reward": sum(r["reward"] for r in rows) / len(rows) if rows else 0.0,
        "unfinished": sum(not r.get("finished", True) for r in rows),
        "verified_but_unfinished": sum(r["reward"] >= threshold and not r.get("finished", True) for r in rows),
        "pass_at_k": {str(k): sum(v) / len(v) for k, v in passes.items()},
        "prompts_with_accepted": len(groups) - len(without),
        "prompts_without_accepted": len(without),
        "prompt_indices_without_accepted": without,
        "distinct_accepted": len({(str(r["prompt"]), r["completion"]) for r in rows if r["accepted"]}),
        "threshold": threshold,
    }


def _jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write(rows: Sequence[dict], output_dir: str | Path, *, threshold: float = 1.0, extra: dict | None = None) -> dict:
    """Write ``samples.jsonl`` (every row), ``accepted.jsonl`` ([`accepted`][dft.sampling.accepted]), ``pairs.jsonl``
    ([`pairs`][dft.sampling.pairs]) and ``summary.json`` ([`summarize`][dft.sampling.summarize], ``"pairs"``: the
    pairs' counts, + ``extra``, e.g. ``{"generation": generation_record(...)}``,
    [`generation_record`][dft.sampling.generation_record]) into ``output_dir``, each with an atomic rename (summary
    last). Returns the summary."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    preference, counts = pairs(rows)
    summary = {**summarize(rows, threshold), "pairs": counts, **(extra or {})}
    files = {
        "samples.jsonl": _jsonl(rows),
        "accepted.jsonl": _jsonl(accepted(rows)),
        "pairs.jsonl": _jsonl(preference),
        "summary.json": json.dumps(summary, indent=1) + "\n",
    }
    for name, text in files.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out / name)
    return summary
