"""Dataset preparation for the command line: local files -> tokenized, masked, truncated examples.

Formats (detected from the columns):

* ``prompt`` + ``completion``: loss on the completion only (an EOS token is appended).
* ``messages`` (chat): rendered with the tokenizer's chat template; loss on assistant turns only.
* ``text``: loss on every token.

Every example becomes ``input_ids`` and ``labels`` (``-100`` where not supervised), truncated to
``max_length``. Examples left with no supervised token are dropped and counted.

Weights in the data: an assistant turn's ``"weight"`` (``messages``, OpenAI's fine-tuning format) or a row's
``"weight"`` (``prompt_completion``, ``text``), a number ``>= 0``: ``0`` leaves those tokens unsupervised
(``labels`` ``-100``), ``w > 0`` weights their loss by ``w`` (the ``loss_weights`` column); no ``"weight"`` is 1.

Rows of ``dft sample``'s ``samples.jsonl``: ``prompt_ids`` + ``completion_ids`` (both present) are used as they
are (no EOS appended, no re-tokenisation); ``accepted`` and ``prompt_index`` are kept as columns.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from .batches import ROW_COLUMNS, TOKEN_COLUMNS, LossColumnsCollator

__all__ = [
    "ROW_COLUMNS",
    "TOKEN_COLUMNS",
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
    dropped_by_weight: int = 0
    """Dropped examples whose every target had ``"weight": 0``."""
    sampled_ids: int = 0
    """Examples (of ``examples_in``) whose ``prompt_ids`` + ``completion_ids`` were used as they are; the others
    were tokenised from their text."""

    def summary(self, name: str) -> str:
        cut = ""
        if self.dropped_by_truncation:
            cut = (
                f" ({self.dropped_by_truncation} of them lost every target to truncation at max_length "
                f"{self.max_length}: raise --max_length or shorten the prompts)"
            )
        if self.dropped_by_weight:
            cut += f" ({self.dropped_by_weight} of them with weight 0 on every target)"
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
    packing (``position_ids`` restart at 0 for each example).

    The columns of [`TOKEN_COLUMNS`][dft.data.TOKEN_COLUMNS] (per token) and [`ROW_COLUMNS`][dft.data.ROW_COLUMNS]
    (per row, broadcast over the row's positions) become float32 ``[B, T]`` tensors aligned with ``labels``: padded
    with 0.0, or under packing concatenated as the labels are into ``[1, total]`` (a per-token column's first
    position of each example 0.0, as the label there is -100). ``prompt_index`` is left out of the batch. Without
    those columns the batch is transformers' collator's."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return LossColumnsCollator(DataCollatorWithFlattening(return_position_ids=True), packing=True)
    return LossColumnsCollator(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True), packing=False)


def _first_line(e: object) -> str:
    return " ".join(str(e).split())[:300]


def _jsonl_rows(
    path: str, size: int, mtime_ns: int, prompts_only: bool = False, weights: bool = False
) -> Iterator[dict]:
    """The rows of a JSONL file, each checked; ``size`` and ``mtime_ns`` only key the datasets cache.
    ``weights`` (the file mentions ``"weight"``): every row gets its weights typed (see ``_typed_weights``)."""
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
            elif weights:
                row = _typed_weights(row, fmt, prompts_only)
            yield row


def _typed_weights(row: dict, fmt: str, prompts_only: bool) -> dict:
    """A checked row with its ``"weight"`` fields present and float in every row, so that Arrow gives them one type
    whichever rows carry them (from the first 1000 rows it would take an int type, a null type, or leave out a field
    that appears later): absent on an assistant turn or a row is 1.0, on another turn null. Prompts to sample
    from drop the turns' weights."""
    if fmt == "messages":
        turns = []
        for m in row["messages"]:
            turn = {k: v for k, v in m.items() if k != "weight"}
            if not prompts_only:  # the field last in every turn: one struct type
                given = m.get("weight")
                turn["weight"] = float(given) if given is not None else (1.0 if m["role"] == "assistant" else None)
            turns.append(turn)
        return {**row, "messages": turns}
    return {**row, "weight": _weight(row.get("weight"))}


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
    if _mentions_weight(path):  # another cache entry
        kwargs["weights"] = True
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


def _mentions_weight(path: Path) -> bool:
    """The file holds the bytes ``"weight"`` (a key, or a string value: then its rows get weights of 1.0)."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(b'"weight"') != -1


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
        if _has_sampled_ids(ex):
            for key in ("prompt_ids", "completion_ids"):
                if not isinstance(ex[key], list) or not all(_is_index(t) for t in ex[key]):
                    return f"'{key}' must be a list of token ids (integers >= 0), got {ex[key]!r:.80}."
        else:
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
            if m.get("weight") is not None:
                if m["role"] != "assistant":
                    return (
                        f"messages[{i}] ({m['role']}) has a 'weight': only assistant turns are supervised, so only "
                        "they take one."
                    )
                bad = _weight_problem(m["weight"])
                if bad:
                    return f"messages[{i}] 'weight' {bad}"
        if ex.get("weight") is not None:
            return "a 'weight' on a messages row: put it on the assistant turns (messages[i]['weight'])."
    if fmt in ("prompt_completion", "text") and ex.get("weight") is not None:
        bad = _weight_problem(ex["weight"])
        if bad:
            return f"'weight' {bad}"
    return None


def _weight_problem(weight: object) -> str | None:
    """What is wrong with a ``"weight"`` value (a number >= 0), or None."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        return f"must be a number >= 0 (0: not supervised), got {weight!r}."
    return None


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _has_sampled_ids(ex: Mapping[str, Any]) -> bool:
    """The row holds ``prompt_ids`` and ``completion_ids`` (``dft sample``'s samples), used instead of its text."""
    return ex.get("prompt_ids") is not None and ex.get("completion_ids") is not None


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


def _weight(value: Any) -> float:
    """A validated ``"weight"`` (None: absent) as a float."""
    return 1.0 if value is None else float(value)


def _encode_messages(ex: dict, tok: Any) -> tuple[list[int], list[int], list[float], bool]:
    """``input_ids``, ``labels``, per-token weights, and whether a ``"weight": 0`` turn took a target away."""
    given = ex["messages"]
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in given]  # the template sees no weights
    ids: list[int] = []
    labels: list[int] = []
    weights: list[float] = []
    zeroed = False
    for i, (message, turn) in enumerate(zip(messages, given)):
        rendered = tok.apply_chat_template(messages[: i + 1], tokenize=True, add_generation_prompt=False)
        rendered = _ids(rendered)
        if rendered[: len(ids)] != ids:
            raise DataError("the chat template does not render conversations incrementally; use prompt/completion.")
        new = rendered[len(ids) :]
        if message.get("role") == "assistant":
            prefix = tok.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True) if i else []
            prefix = _ids(prefix)
            header = max(len(prefix) - len(ids), 0)  # the assistant header is not supervised
            w = _weight(turn.get("weight"))
            if w > 0:
                labels += [-100] * header + new[header:]
                weights += [0.0] * header + [w] * len(new[header:])
            else:
                zeroed = zeroed or len(new) > header
                labels += [-100] * len(new)
                weights += [0.0] * len(new)
        else:
            labels += [-100] * len(new)
            weights += [0.0] * len(new)
        ids = rendered
    return ids, labels, weights, zeroed


def _weigh_row(ids: list[int], labels: list[int], weight: Any) -> tuple[list[int], list[int], list[float], bool]:
    """A row-level ``"weight"`` on every supervised position; 0 leaves none supervised."""
    w = _weight(weight)
    if w > 0:
        return ids, labels, [w if label != -100 else 0.0 for label in labels], False
    return ids, [-100] * len(labels), [0.0] * len(labels), any(label != -100 for label in labels[1:])


_SCHEMA = (
    "3: input_ids, labels, [loss_weights], [accepted, prompt_index], _targets, _truncated, _assistant, "
    "_had_targets, _zeroed, _weighted, _sampled; prompt_ids + completion_ids used as they are"
)
"""Part of the ``datasets.map`` cache key: datasets keys a module-level function by its name, not its code,
so a cached preparation from a version with other columns would be reused. Change it with the columns."""

_WORK_COLUMNS = ("_targets", "_truncated", "_assistant", "_had_targets", "_zeroed", "_weighted", "_sampled")
"""Per-row counts for the report, removed from the prepared dataset."""


def _encode_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    fmt: str,
    tok: Any,
    max_length: int,
    weights: bool = False,
    row_columns: bool = False,
    schema: str = _SCHEMA,
) -> dict:
    """``datasets.map`` (batched): ``input_ids``, ``labels``, ``loss_weights`` when ``weights``, ``accepted`` and
    ``prompt_index`` when ``row_columns``, and per-row counts for the report. Every batch gives the same columns."""
    keys = list(batch)
    rows = [dict(zip(keys, values)) for values in zip(*batch.values())]
    for index, ex in zip(indices, rows):
        problem = check_row(ex, fmt) or (_row_columns_problem(ex) if row_columns else None)
        if problem:
            raise DataError(f"row {index + 1}: {problem}")
    sampled = [fmt == "prompt_completion" and _has_sampled_ids(ex) for ex in rows]
    if fmt == "prompt_completion":  # one tokenizer call per column for the rows without token ids
        text_rows = [ex for ex, s in zip(rows, sampled) if not s]
        prompts = tok([ex["prompt"] for ex in text_rows])["input_ids"] if text_rows else []
        completions = (
            tok([ex["completion"] for ex in text_rows], add_special_tokens=False)["input_ids"] if text_rows else []
        )
        joined = iter([_join_prompt_completion(p, c, tok.eos_token_id) for p, c in zip(prompts, completions)])
        pairs = [
            (
                list(ex["prompt_ids"]) + list(ex["completion_ids"]),
                [-100] * len(ex["prompt_ids"]) + list(ex["completion_ids"]),
            )
            if s
            else next(joined)
            for ex, s in zip(rows, sampled)
        ]
        encoded = [_weigh_row(ids, labels, ex.get("weight")) for ex, (ids, labels) in zip(rows, pairs)]
    elif fmt == "text":
        eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
        texts = tok([ex["text"] for ex in rows])["input_ids"]
        encoded = [_weigh_row(ids + eos, ids + eos, ex.get("weight")) for ex, ids in zip(rows, texts)]
    else:
        encoded = [_encode_messages(ex, tok) for ex in rows]
    out: dict[str, list] = {"input_ids": [], "labels": []}
    if weights:
        out["loss_weights"] = []
    if row_columns:
        out["accepted"], out["prompt_index"] = [], []
    for key in _WORK_COLUMNS:
        out[key] = []
    for ex, s, (ids, labels, lw, zeroed) in zip(rows, sampled, encoded):
        out["_truncated"].append(len(ids) > max_length)
        had = any(label != -100 for label in labels[1:])
        out["_had_targets"].append(had)
        out["_zeroed"].append(zeroed and not had)
        ids, labels, lw = ids[:max_length], labels[:max_length], lw[:max_length]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        if weights:
            out["loss_weights"].append(lw)
        out["_weighted"].append(any(w != 1.0 for w, label in zip(lw, labels) if label != -100))
        if row_columns:
            out["accepted"].append(int(ex["accepted"]))
            out["prompt_index"].append(int(ex["prompt_index"]))
        out["_targets"].append(sum(1 for label in labels[1:] if label != -100))  # next-token targets
        out["_assistant"].append(fmt != "messages" or any(m["role"] == "assistant" for m in ex["messages"]))
        out["_sampled"].append(s)
    return out


def _row_columns_problem(ex: Mapping[str, Any]) -> str | None:
    """``accepted`` (0/1 or a bool) and ``prompt_index`` (an integer >= 0) of a ``samples.jsonl`` row, or None."""
    accepted = ex.get("accepted")
    if not (isinstance(accepted, (bool, int, float)) and accepted in (0, 1)):
        return f"'accepted' must be true/false or 0/1, got {accepted!r}."
    if not _is_index(ex.get("prompt_index")):
        return f"'prompt_index' must be an integer >= 0, got {ex.get('prompt_index')!r}."
    return None


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
        dropped_by_weight=int(pc.sum(pc.cast(table.column("_zeroed"), "int64")).as_py() or 0),
        sampled_ids=int(pc.sum(pc.cast(table.column("_sampled"), "int64")).as_py() or 0),
    )


def prepare_dataset(
    ds: Dataset, tokenizer: Any, max_length: int, *, num_proc: int | None = None
) -> tuple[Dataset, PrepReport]:
    """Tokenize, mask, truncate; drop examples without supervised tokens. Returns the dataset and a report.

    Runs as a batched ``datasets.map`` (Arrow in and out: memory does not grow with the rows; for data
    loaded from files the result is cached on disk next to it and reused by the next run).
    ``num_proc``: worker processes (default: up to 8 for 50k rows or more, else 1).
    Output columns: ``input_ids`` and ``labels`` (``-100`` where not supervised); ``loss_weights`` (a float per
    token: the ``"weight"`` of the turn or row on supervised positions, 0.0 elsewhere) when the data has a
    ``"weight"`` field and a kept supervised token's weight is not 1; ``accepted`` (0/1) and ``prompt_index``
    when the data has both columns (``dft sample``'s ``samples.jsonl``). Rows with ``prompt_ids`` and
    ``completion_ids`` are used as they are: the completion ids supervised, no EOS appended
    ([`PrepReport.sampled_ids`][dft.data.PrepReport.sampled_ids] counts them).
    """
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}.")
    fmt = detect_format(list(ds.column_names))
    if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
        raise DataError("the data has 'messages' but the tokenizer has no chat template.")
    import pyarrow.compute as pc

    weights = _has_weight_field(ds, fmt)
    row_columns = "accepted" in ds.column_names and "prompt_index" in ds.column_names
    if num_proc is None:
        num_proc = min(8, os.cpu_count() or 1) if len(ds) >= 50_000 else 1
    with _quiet_datasets():
        encoded = ds.map(
            _encode_batch,
            batched=True,
            with_indices=True,
            remove_columns=list(ds.column_names),
            fn_kwargs={
                "fmt": fmt,
                "tok": tokenizer,
                "max_length": max_length,
                "weights": weights,
                "row_columns": row_columns,
                "schema": _SCHEMA,
            },
            num_proc=num_proc if num_proc > 1 else None,
            desc="dft: tokenizing",
        )
        kept = encoded.filter(lambda t: [x > 0 for x in t], batched=True, input_columns=["_targets"])
    report = _report(encoded.data, len(ds), max_length)
    if report.kept == 0:
        if report.dropped_by_weight == report.examples_in:
            raise DataError(
                f"every example ({report.examples_in}) has weight 0 on every target: a 'weight' of 0 leaves "
                "its tokens unsupervised."
            )
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
    drop = list(_WORK_COLUMNS)
    table = encoded.data
    if weights and not pc.any(pc.and_(pc.greater(table.column("_targets"), 0), table.column("_weighted"))).as_py():
        drop.append("loss_weights")  # every supervised token weighs 1: the loss is the unweighted one
    kept = kept.remove_columns(drop)
    order = ["input_ids", "labels", *TOKEN_COLUMNS, "accepted", "prompt_index"]
    return kept.select_columns([c for c in order if c in kept.column_names]), report


def _has_weight_field(ds: Dataset, fmt: str) -> bool:
    """The data has a ``"weight"`` field: a column (prompt/completion, text), or a field of the messages (chat)."""
    if fmt != "messages":
        return "weight" in ds.column_names
    import pyarrow as pa

    kind = ds.data.schema.field("messages").type
    item = getattr(kind, "value_type", None)
    return item is not None and pa.types.is_struct(item) and item.get_field_index("weight") >= 0
