"""Dataset preparation for the command line: local files -> tokenized, masked, truncated examples.

Formats (detected from the columns):

* ``prompt`` + ``completion``: loss on the completion only (an EOS token is appended).
* ``messages`` (chat): rendered with the tokenizer's chat template; loss on assistant turns only.
* ``text``: loss on every token.

Every example becomes ``input_ids`` and ``labels`` (``-100`` where not supervised), truncated to
``max_length``. Examples left with no supervised token are dropped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from .labels import count_targets, shift_causal_labels

__all__ = ["DataError", "PrepReport", "check_row", "collator", "detect_format", "load_local_dataset", "prepare_dataset"]

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A user-facing data problem (missing file, wrong columns, nothing left to train on)."""


@dataclass
class PrepReport:
    """What preparation kept: examples and tokens."""

    examples_in: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    supervised_tokens: int = 0

    def summary(self, name: str) -> str:
        return (
            f"{name}: {self.examples_in} examples -> kept {self.kept} ({self.truncated} truncated), "
            f"dropped {self.dropped} with no supervised token left; {self.tokens} tokens, "
            f"{self.supervised_tokens} supervised"
        )


def load_local_dataset(path: str | Path) -> Dataset:
    """A local ``.jsonl``/``.json``/``.parquet``/``.csv`` file or a ``save_to_disk`` folder (its train split)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_dir():
        try:
            ds = load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(f"{path} is a folder but not a datasets save_to_disk folder ({e}).") from None
    else:
        kind = _LOADERS.get(path.suffix.lower())
        if kind is None:
            raise DataError(
                f"unsupported data file {path.name}: use .jsonl, .json, .parquet, .csv or a save_to_disk folder."
            )
        if path.stat().st_size == 0:
            raise DataError(f"{path} holds no examples (empty file).")
        if path.suffix.lower() == ".jsonl":
            ds = _read_jsonl(path)
        else:
            try:
                ds = load_dataset(kind, data_files=str(path), split="train")
            except Exception as e:  # datasets raises several types for unreadable files
                raise DataError(f"cannot read {path} as {kind}: {type(e).__name__}: {_first_line(e)}") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path} holds splits {list(ds)}; expected a 'train' split.")
        ds = ds["train"]
    if len(ds) == 0:
        raise DataError(f"{path} holds no examples.")
    return ds


def collator(tokenizer: Any, packing: bool = False) -> Any:
    """The batch collator for prepared examples: right padding (labels padded with -100), or padding-free
    packing (``position_ids`` restart at 0 for each example)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


def _first_line(e: object) -> str:
    return " ".join(str(e).split())[:300]


def _read_jsonl(path: Path) -> Dataset:
    """One JSON object per line; errors name the line. Rows are checked against the detected format."""
    rows, lines = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}.")
            rows.append(row)
            lines.append(lineno)
    if not rows:
        raise DataError(f"{path} holds no examples.")
    fmt = detect_format(sorted({k for r in rows for k in r}))
    for row, lineno in zip(rows, lines):
        problem = check_row(row, fmt)
        if problem:
            raise DataError(f"{path}:{lineno}: {problem}")
    try:
        return Dataset.from_list(rows)
    except Exception as e:  # pyarrow type clashes between rows
        raise DataError(f"cannot read {path}: the rows' types disagree ({_first_line(e)}).") from None


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def check_row(ex: dict, fmt: str) -> str | None:
    """What is wrong with one example of format ``fmt``, or None."""
    if fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if not isinstance(ex.get(key), str):
                return f"'{key}' must be a string, got {_type_name(ex.get(key))}."
    elif fmt == "text":
        if not isinstance(ex.get("text"), str):
            return f"'text' must be a string, got {_type_name(ex.get('text'))}."
    elif fmt == "messages":
        messages = ex.get("messages")
        if not isinstance(messages, list) or not messages:
            return f"'messages' must be a non-empty list of {{'role', 'content'}} objects, got {_type_name(messages)}."
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"messages[{i}] must be an object with string 'role' and 'content', got {m!r:.80}."
    return None


def detect_format(columns: list[str]) -> str:
    """``"prompt_completion"``, ``"messages"`` or ``"text"``; DataError naming the columns otherwise."""
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "messages" in columns:
        return "messages"
    if "text" in columns:
        return "text"
    raise DataError(
        f"the dataset has columns {columns}; expected 'prompt' and 'completion', or 'messages' (chat), or 'text'."
    )


def _encode_prompt_completion(ex: dict, tok: Any) -> tuple[list[int], list[int]]:
    prompt = tok(ex["prompt"])["input_ids"]
    completion = tok(ex["completion"], add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None and (not completion or completion[-1] != tok.eos_token_id):
        completion = completion + [tok.eos_token_id]
    return prompt + completion, [-100] * len(prompt) + completion


def _ids(rendered: Any) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list or, in transformers 5, a BatchEncoding."""
    return list(rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)


def _encode_messages(ex: dict, tok: Any) -> tuple[list[int], list[int]]:
    messages = ex["messages"]
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        rendered = tok.apply_chat_template(messages[: i + 1], tokenize=True, add_generation_prompt=False)
        rendered = _ids(rendered)
        if rendered[: len(ids)] != ids:
            raise DataError("the chat template does not render conversations incrementally; use prompt/completion.")
        new = rendered[len(ids) :]
        if message.get("role") == "assistant":
            prefix = tok.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True) if i else []
            prefix = _ids(prefix)
            header = max(len(prefix) - len(ids), 0)  # the assistant header is not supervised
            labels += [-100] * header + new[header:]
        else:
            labels += [-100] * len(new)
        ids = rendered
    return ids, labels


def _encode_text(ex: dict, tok: Any) -> tuple[list[int], list[int]]:
    ids = tok(ex["text"])["input_ids"]
    if tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]
    return ids, list(ids)


_ENCODERS = {"prompt_completion": _encode_prompt_completion, "messages": _encode_messages, "text": _encode_text}


def prepare_dataset(ds: Dataset, tokenizer: Any, max_length: int) -> tuple[Dataset, PrepReport]:
    """Tokenize, mask, truncate; drop examples without supervised tokens. Returns the dataset and a report."""
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}.")
    fmt = detect_format(list(ds.column_names))
    if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
        raise DataError("the data has 'messages' but the tokenizer has no chat template.")
    encode = _ENCODERS[fmt]
    report = PrepReport(examples_in=len(ds))
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    for row, ex in enumerate(ds, 1):
        problem = check_row(ex, fmt)
        if problem:
            raise DataError(f"row {row}: {problem}")
        ids, labels = encode(ex, tokenizer)
        truncated = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        targets = int(count_targets(shift_causal_labels(torch.tensor(labels))))
        if targets == 0:  # nothing to predict after the shift
            report.dropped += 1
            continue
        report.truncated += truncated
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        report.kept += 1
        report.tokens += len(ids)
        report.supervised_tokens += targets
    if report.kept == 0:
        raise DataError(
            f"no example has a supervised token left after truncation to max_length={max_length} "
            f"({report.examples_in} examples in): raise --max_length or shorten the prompts."
        )
    return Dataset.from_dict(rows), report
