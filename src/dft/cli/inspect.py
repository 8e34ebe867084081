"""``dft inspect``: should I switch? The base model's p on the supervised tokens and a recommendation
([`dft.prior`][dft.prior])."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import _loading
from ._loading import SHIPPED_TRAIN, TOY_MODEL, ModelSource, _asset, _prepare
from ._parsing import UsageError, _parser, check_writable, parse_command
from ._processes import _single_process

__all__ = ["InspectScriptArguments", "run_inspect"]


@dataclass
class InspectScriptArguments:
    model: str | None = field(
        default=None, metadata={"help": "Model folder or hub id (as dft train). Default: the built-in tiny Llama."}
    )
    data: str | None = field(
        default=None, metadata={"help": "Data file or save_to_disk folder (as dft train). Default: shipped arithmetic."}
    )
    max_examples: int = field(default=1000, metadata={"help": "Examples to read (the first N)."})
    max_length: int = field(default=128, metadata={"help": "Truncate examples to this many tokens (as dft train)."})
    batch_size: int = field(default=16, metadata={"help": "Examples per forward pass."})
    output_dir: str = field(default="dft-inspect", metadata={"help": "Where inspect.json and inspect.png go."})
    torch_dtype: str = field(default="float32", metadata={"help": "Load dtype: float32, bfloat16, float16 or auto."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own code."})


def run_inspect(argv: list[str]) -> int:
    """``dft inspect``: the base model's p on the supervised tokens, and whether DFT fits (dft.prior)."""
    parser = _parser((InspectScriptArguments,), "dft inspect")
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    args = parse_command(parser, argv, "dft inspect")
    _single_process("dft inspect")
    for name in ("max_examples", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    out = Path(args.output_dir)
    check_writable(out)
    import torch  # the flags are good: now the heavy parts

    from ..arguments import ce_token_ids
    from ..data import collator, load_local_dataset
    from ..prior import inspect_prior
    from ._reporting import plot_prior

    script = ModelSource(model=args.model, torch_dtype=args.torch_dtype, trust_remote_code=args.trust_remote_code)
    model, tokenizer = _loading._load_model_and_tokenizer(script)
    raw = load_local_dataset(args.data or _asset("arithmetic_train.jsonl"))
    raw = raw.select(range(min(args.max_examples, len(raw))))
    prepared = _prepare(raw, tokenizer, args.max_length, "inspect")
    # the base's p on the supervised tokens, unweighted: a "weight" of 0 already left its tokens unsupervised
    # (labels -100), weights > 0 say how much a token trains, not how likely the base finds it
    prepared = prepared.select_columns(["input_ids", "labels"])
    loader = torch.utils.data.DataLoader(prepared, batch_size=args.batch_size, collate_fn=collator(tokenizer))
    special = ce_token_ids("special", tokenizer)  # the ids --dft_ce_tokens special would keep on CE
    report = inspect_prior(model, loader, special_ids=special).as_dict()
    report["model"] = args.model or TOY_MODEL
    report["data"] = args.data or SHIPPED_TRAIN
    out.mkdir(parents=True, exist_ok=True)
    (out / "inspect.json").write_text(json.dumps(report, indent=1))
    plot_prior(out / "inspect.png", report)
    fig = report["frac_below"]
    sp = report["special_tokens"]
    print(
        f"{report['supervised_tokens']} supervised tokens: mean p {report['mean_p']:.3f}, median "
        f"{report['quantiles']['0.5']:.3g}; p < 0.01 for {fig['0.01']:.1%} (DFT keeps under 1% of SFT's update "
        f"there), p < 0.001 for {fig['0.001']:.1%}"
    )
    if sp["supervised_tokens"]:
        print(
            f"special tokens: {sp['supervised_tokens']} targets, mean p {sp['mean_p']:.3g}, "
            f"p < 0.01 for {sp['frac_below']['0.01']:.1%}"
        )
    print(f"recommendation: {report['recommendation']} ({report['reason']})")
    print(f"wrote {out}/inspect.json and inspect.png")
    return 0
