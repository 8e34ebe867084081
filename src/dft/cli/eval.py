"""``dft eval``: token CE / p / accuracy and exact match of a trained model on held-out data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _loading
from ._evaluation import _exact_match_metrics, _table_notes, exact_match, token_ce
from ._loading import SHIPPED_TRAIN, ModelSource, _asset, _prepare, _recorded_eval_split, _run_record, _where
from ._nft import exact_match_rows
from ._parsing import UsageError, _parser, check_writable, parse_command
from ._processes import _single_process
from ._reporting import format_table

__all__ = ["EvalScriptArguments", "run_eval"]


@dataclass
class EvalScriptArguments:
    model: str = field(metadata={"help": "Model folder (with its tokenizer), e.g. a `dft train` output_dir."})
    data: str | None = field(
        default=None,
        metadata={
            "help": "Data file or save_to_disk folder. Default: the held-out split the model's dft train run wrote "
            "(MODEL/eval_split.jsonl), else the shipped arithmetic test split."
        },
    )
    max_length: int = field(default=128, metadata={"help": "Truncate examples to this many tokens."})
    max_eval_examples: int = field(default=100, metadata={"help": "Examples for the exact match (as dft train)."})
    batch_size: int = field(default=32, metadata={"help": "Batch size for the CE pass."})
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy generation length."})
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Write eval_results.json and predictions.jsonl here (default: MODEL/eval for a local model)."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own code."})


def run_eval(argv: list[str]) -> int:
    parser = _parser((EvalScriptArguments,), "dft eval")
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    args = parse_command(parser, argv, "dft eval")
    _single_process("dft eval")
    for name in ("max_eval_examples", "max_new_tokens", "batch_size", "max_length"):
        if getattr(args, name) < 1:  # 0 would score nothing and report exact match None
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.output_dir is None and Path(args.model).is_dir():
        args.output_dir = str(Path(args.model) / "eval")
    if args.output_dir:
        check_writable(Path(args.output_dir))
    from ..data import load_local_dataset  # the flags are good: now the heavy parts

    script = ModelSource(model=args.model, trust_remote_code=args.trust_remote_code)
    model, tokenizer = _loading._load_model_and_tokenizer(script)
    split = _recorded_eval_split(Path(args.model)) if not args.data and Path(args.model).is_dir() else None
    if args.data:
        data = source = _where(args.data)
        print(f"eval data: {source}", flush=True)
    elif split is not None:  # the held-out rows its dft train run wrote
        data = source = str(split.resolve())
        record = _run_record(split.parent) or {}
        how = record.get("eval_split") or "its held-out rows"
        how = f"--eval_data {record.get('eval_data')}" if how == "--eval_data" and record.get("eval_data") else how
        print(
            f"eval data: the held-out split of the dft train run in {args.model} ({split.name}: {how}; --data FILE "
            "scores other data)",
            flush=True,
        )
    else:
        data, source = _asset("arithmetic_test.jsonl"), "shipped arithmetic_test.jsonl"
        trained_on = (_run_record(Path(args.model)) or {}).get("data") if Path(args.model).is_dir() else None
        hint = f"; {args.model} was trained on {trained_on}" if trained_on and trained_on != SHIPPED_TRAIN else ""
        print(
            f"eval data: the shipped arithmetic test split (dft's built-in toy task; --data FILE scores your "
            f"own{hint})",
            flush=True,
        )
    raw = load_local_dataset(data)
    prepared = _prepare(raw, tokenizer, args.max_length, "eval")
    metrics: dict[str, Any] = {f"eval_{k}": v for k, v in token_ce(model, tokenizer, prepared, args.batch_size).items()}
    match_rows = exact_match_rows(raw)
    if match_rows is not raw:  # dft sample's rows (an NFT run's split): the references are scored
        print(
            f"exact match: {len(match_rows)} prompts against their reference answers (the rows are dft sample's: "
            "their completions are the model's own answers, right or wrong)",
            flush=True,
        )
    match = exact_match(model, tokenizer, match_rows, args.max_eval_examples, args.max_new_tokens)
    metrics.update(_exact_match_metrics(match))
    metrics["num_examples"] = len(prepared)
    table = {k: v for k, v in metrics.items() if k != "eval_exact_match_note"}
    print(format_table(table, _table_notes(args.max_eval_examples)))
    if match.note:
        print(f"exact match: {match.note}")
    metrics.update(model=_where(args.model), data=source)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_results.json").write_text(json.dumps(metrics, indent=1))
        (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in match.predictions))
        print(f"\nwrote {out}/eval_results.json and predictions.jsonl")
    return 0
