"""Dataset preparation for the command line: local files -> tokenized, masked, truncated examples.

Formats (detected from the columns):

* ``prompt`` + ``completion``: loss on the completion only (an EOS token is appended).
* ``messages`` (chat): rendered with the tokenizer's chat template; loss on assistant turns only.
* ``text``: loss on every token.

Every example becomes ``input_ids`` and ``labels`` (``-100`` where not supervised), truncated to
``max_length``. Examples left with no supervised token are dropped and counted.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

__all__ = [
    "DataError",
    "PrepReport",
    "check_row",
    "collator",
    "detect_format",
    "first_jsonl_row",
    "load_local_dataset",
    "prepare_dataset",
]

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A user-facing data problem (missing file, wrong columns, nothing left to train on)."""


@dataclass
class PrepReport:
    """What preparation kept: examples and tokens."""

    examples_in: int = 0
    kept: int = 0
    truncated: int = 0
    """Kept examples that were cut to ``max_length``."""
    dropped: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    dropped_by_truncation: int = 0
    """Dropped examples that had a supervised token before truncation (all of it lay past ``max_length``)."""
    max_length: int | None = None

    def summary(self, name: str) -> str:
        cut = ""
        if self.dropped_by_truncation:
            cut = (
                f" ({self.dropped_by_truncation} of them lost every target to truncation at max_length "
                f"{self.max_length}: raise --max_length or shorten the prompts)"
            )
        return (
            f"{name}: {self.examples_in} examples -> kept {self.kept} ({self.truncated} truncated), "
            f"dropped {self.dropped} with no supervised token left{cut}; {self.tokens} tokens, "
            f"{self.supervised_tokens} supervised"
        )


def load_local_dataset(path: str | Path, prompts_only: bool = False) -> Dataset:
    """A local ``.jsonl``/``.json``/``.parquet``/``.csv`` file or a ``save_to_disk`` folder (its train split).

    ``prompts_only`` (``dft sample``): rows with a ``prompt`` and an optional ``completion`` (the reference),
    or ``messages``; no ``text``.

    Text files must be UTF-8 (a byte-order mark is accepted); a decode error names ``file:line``.
    JSONL is parsed and checked line by line into an Arrow file in the datasets cache (memory flat
    in the number of rows; a second run on the unchanged file reuses it). The columns must be one
    of the formats of [`detect_format`][dft.data.detect_format]; an error names the file.
    """
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
        with _quiet_datasets():
            if path.suffix.lower() == ".jsonl":
                ds = _read_jsonl(path, prompts_only)
            else:
                extra: dict[str, Any] = {}
                if kind in ("csv", "json"):
                    _check_utf8(path)
                if kind == "csv":
                    extra["encoding"] = "utf-8-sig"  # a BOM is not part of the first column's name
                try:
                    ds = load_dataset(kind, data_files=str(path), split="train", **extra)
                except Exception as e:  # datasets raises several types for unreadable files
                    cause = e.__cause__ or e.__context__ or e
                    raise DataError(
                        f"cannot read {path} as {kind}: {type(cause).__name__}: {_first_line(cause)}"
                    ) from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path} holds splits {list(ds)}; expected a 'train' split.")
        ds = ds["train"]
    if len(ds) == 0:
        raise DataError(f"{path} holds no examples.")
    try:
        detect_format(list(ds.column_names), prompts_only)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return ds


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars from datasets while loading/preparing (the command prints its own summary)."""
    import datasets

    was_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8."
        ) from None


def _check_utf8(path: Path) -> None:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            _decode_line(raw, path, lineno)


def collator(tokenizer: Any, packing: bool = False) -> Any:
    """The batch collator for prepared examples: right padding (labels padded with -100), or padding-free
    packing (``position_ids`` restart at 0 for each example)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


def _first_line(e: object) -> str:
    return " ".join(str(e).split())[:300]


def _jsonl_rows(path: str, size: int, mtime_ns: int, prompts_only: bool = False) -> Iterator[dict]:
    """The rows of a JSONL file, each checked; ``size`` and ``mtime_ns`` only key the datasets cache."""
    fmt = None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, Path(path), lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}.")
            if fmt is None:
                try:
                    fmt = detect_format(sorted(row), prompts_only)
                except DataError as e:
                    raise DataError(f"{path}:{lineno}: {e}") from None
            problem = check_row(row, fmt)
            if problem:
                raise DataError(f"{path}:{lineno}: {problem}")
            if fmt == "prompt":  # every row the same columns: Arrow takes the first rows' as the schema
                row = {"prompt": row["prompt"], "completion": row.get("completion")}
            yield row


def first_jsonl_row(path: str | Path) -> dict | None:
    """The first non-empty line of a JSONL file as a dict; None when it is not one (unreadable, not JSON, not an
    object): the full reader then says what is wrong."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            row = json.loads(next((line for line in f if line.strip()), "null"))
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) else None


def _read_jsonl(path: Path, prompts_only: bool = False) -> Dataset:
    """One JSON object per line, streamed into Arrow; errors name the line."""
    from datasets.exceptions import DatasetGenerationError

    stat = path.stat()
    kwargs = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    features = None
    if prompts_only:  # other checks, another cache entry
        kwargs["prompts_only"] = True
        if "prompt" in (
            first_jsonl_row(path) or {}
        ):  # the reference may be absent from the first 1000 rows: typed up front
            from datasets import Features, Value

            features = Features({"prompt": Value("string"), "completion": Value("string")})
    try:
        return Dataset.from_generator(_jsonl_rows, gen_kwargs=kwargs, features=features)
    except DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, DataError):
            raise cause from None
        raise DataError(f"cannot read {path}: the rows' types disagree ({_first_line(cause or e)}).") from None
    except DataError:
        raise
    except Exception as e:  # pyarrow type clashes between rows
        raise DataError(f"cannot read {path}: the rows' types disagree ({_first_line(e)}).") from None


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


FORMAT_NAMES = {
    "prompt_completion": "prompt/completion",
    "messages": "'messages' (chat)",
    "text": "'text'",
    "prompt": "prompt (+ optional completion)",
}


def _row_format(ex: dict) -> str | None:
    """The format the row's own (non-null) fields make, or None (Arrow fills absent columns with null)."""
    try:
        return detect_format([k for k, v in ex.items() if v is not None])
    except DataError:
        return None


def check_row(ex: dict, fmt: str) -> str | None:
    """What is wrong with one example of format ``fmt``, or None."""
    if fmt == "prompt":  # dft sample's prompts: the completion (the reference) may be absent
        if not isinstance(ex.get("prompt"), str):
            return f"'prompt' must be a string, got {_type_name(ex.get('prompt'))}."
        if ex.get("completion") is not None and not isinstance(ex["completion"], str):
            return f"'completion' (the reference) must be a string or absent, got {_type_name(ex['completion'])}."
        return None
    own = _row_format(ex)
    if own is not None and own != fmt:
        return (
            f"a {FORMAT_NAMES[own]} row in {FORMAT_NAMES[fmt]} data (the format comes from the first row, or "
            "the columns): the rows mix formats; use one format per file (prompt/completion, messages or text)."
        )
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
            if m["role"] not in CHAT_ROLES:
                return (
                    f"messages[{i}] has role {m['role']!r}; expected one of {', '.join(CHAT_ROLES)} "
                    "(the loss is on 'assistant' turns)."
                )
    return None


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
"""Roles a chat row may use; the loss is on ``assistant`` turns only."""


def detect_format(columns: list[str], prompts_only: bool = False) -> str:
    """``"prompt_completion"``, ``"messages"`` or ``"text"``; DataError naming the columns otherwise.
    ``prompts_only``: ``"prompt"`` (a prompt, its completion optional) or ``"messages"``."""
    if prompts_only:
        if "prompt" in columns:
            return "prompt"
        if "messages" in columns:
            return "messages"
        raise DataError(
            f"the dataset has columns {columns}; expected 'prompt' (+ 'completion', the reference) or 'messages' "
            "(chat) to sample from."
        )
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "messages" in columns:
        return "messages"
    if "text" in columns:
        return "text"
    raise DataError(
        f"the dataset has columns {columns}; expected 'prompt' and 'completion', or 'messages' (chat), or 'text'."
    )


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


_SCHEMA = "2: input_ids, labels, _targets, _truncated, _assistant, _had_targets"
"""Part of the ``datasets.map`` cache key: datasets keys a module-level function by its name, not its code,
so a cached preparation from a version with other columns would be reused. Change it with the columns."""


def _encode_batch(
    batch: dict[str, list], indices: list[int], *, fmt: str, tok: Any, max_length: int, schema: str = _SCHEMA
) -> dict:
    """``datasets.map`` (batched): ``input_ids``, ``labels`` and per-row counts for the report."""
    keys = list(batch)
    rows = [dict(zip(keys, values)) for values in zip(*batch.values())]
    for index, ex in zip(indices, rows):
        problem = check_row(ex, fmt)
        if problem:
            raise DataError(f"row {index + 1}: {problem}")
    if fmt == "prompt_completion":  # one tokenizer call per column for the whole batch
        prompts = tok([ex["prompt"] for ex in rows])["input_ids"]
        completions = tok([ex["completion"] for ex in rows], add_special_tokens=False)["input_ids"]
        pairs = [_join_prompt_completion(p, c, tok.eos_token_id) for p, c in zip(prompts, completions)]
    elif fmt == "text":
        eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
        pairs = [(ids + eos, ids + eos) for ids in tok([ex["text"] for ex in rows])["input_ids"]]
    else:
        pairs = [_encode_messages(ex, tok) for ex in rows]
    out: dict[str, list] = {"input_ids": [], "labels": [], "_targets": [], "_truncated": [], "_assistant": []}
    out["_had_targets"] = []
    for ex, (ids, labels) in zip(rows, pairs):
        out["_truncated"].append(len(ids) > max_length)
        out["_had_targets"].append(any(label != -100 for label in labels[1:]))
        ids, labels = ids[:max_length], labels[:max_length]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["_targets"].append(sum(1 for label in labels[1:] if label != -100))  # next-token targets
        out["_assistant"].append(fmt != "messages" or any(m["role"] == "assistant" for m in ex["messages"]))
    return out


def _join_prompt_completion(prompt: list[int], completion: list[int], eos: int | None) -> tuple[list[int], list[int]]:
    if eos is not None and (not completion or completion[-1] != eos):
        completion = completion + [eos]
    return prompt + completion, [-100] * len(prompt) + completion


def _report(table: Any, examples_in: int, max_length: int | None = None) -> PrepReport:
    """The counts of the rows that keep a target, summed in Arrow (no Python list per row)."""
    import pyarrow.compute as pc

    keep = pc.greater(table.column("_targets"), 0)
    lost = pc.and_(pc.invert(keep), table.column("_had_targets"))

    def total(values: Any) -> int:
        return int(pc.sum(pc.if_else(keep, values, 0)).as_py() or 0)

    kept = int(pc.sum(keep).as_py() or 0)
    return PrepReport(
        examples_in=examples_in,
        kept=kept,
        truncated=total(pc.cast(table.column("_truncated"), "int64")),
        dropped=examples_in - kept,
        tokens=total(pc.list_value_length(table.column("input_ids"))),
        supervised_tokens=total(table.column("_targets")),
        dropped_by_truncation=int(pc.sum(pc.cast(lost, "int64")).as_py() or 0),
        max_length=max_length,
    )


def prepare_dataset(
    ds: Dataset, tokenizer: Any, max_length: int, *, num_proc: int | None = None
) -> tuple[Dataset, PrepReport]:
    """Tokenize, mask, truncate; drop examples without supervised tokens. Returns the dataset and a report.

    Runs as a batched ``datasets.map`` (Arrow in and out: memory does not grow with the rows; for data
    loaded from files the result is cached on disk next to it and reused by the next run).
    ``num_proc``: worker processes (default: up to 8 for 50k rows or more, else 1).
    Output columns: ``input_ids`` and ``labels`` (``-100`` where not supervised).
    """
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}.")
    fmt = detect_format(list(ds.column_names))
    if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
        raise DataError("the data has 'messages' but the tokenizer has no chat template.")
    import pyarrow.compute as pc

    if num_proc is None:
        num_proc = min(8, os.cpu_count() or 1) if len(ds) >= 50_000 else 1
    with _quiet_datasets():
        encoded = ds.map(
            _encode_batch,
            batched=True,
            with_indices=True,
            remove_columns=list(ds.column_names),
            fn_kwargs={"fmt": fmt, "tok": tokenizer, "max_length": max_length, "schema": _SCHEMA},
            num_proc=num_proc if num_proc > 1 else None,
            desc="dft: tokenizing",
        )
        kept = encoded.filter(lambda t: [x > 0 for x in t], batched=True, input_columns=["_targets"])
    report = _report(encoded.data, len(ds), max_length)
    if report.kept == 0:
        no_assistant = len(ds) - int(pc.sum(encoded.data.column("_assistant")).as_py() or 0)
        if no_assistant:
            raise DataError(
                f"{no_assistant} of {len(ds)} conversations have no 'assistant' message and the rest none left "
                "after truncation: the loss is on assistant turns (check the roles)."
            )
        raise DataError(
            f"no example has a supervised token left after truncation to max_length={max_length} "
            f"({report.examples_in} examples in): raise --max_length or shorten the prompts."
        )
    return kept.remove_columns(["_targets", "_truncated", "_assistant", "_had_targets"]), report
