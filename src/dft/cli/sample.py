"""``dft sample``: generate K completions per prompt, verify them, keep the accepted ones
([`dft.sampling`][dft.sampling]).

    dft sample --model M --data prompts.jsonl --num_samples 4 --temperature 1.0 --verifier exact --output_dir S
    dft train --model M --data S/accepted.jsonl ...          # RFT (--loss sft) or DFT on the accepted samples

Writes ``S/samples.jsonl`` (every sample: prompt, completion, reference, reward, sample index, the prompt's and
the completion's token ids), ``S/accepted.jsonl`` (rows ``dft train --data`` takes as they are), ``S/pairs.jsonl``
(accepted vs rejected samples of a prompt, rows TRL's ``DPOTrainer`` takes as they are) and ``S/summary.json``
(acceptance rate, pass@k, prompts with no accepted sample, the pairs' counts, the generation's settings, stop ids
and tokenizer fingerprint; also printed). Everything that can be wrong is checked before the
model is loaded: one line, exit status 2. Under ``torchrun`` / ``accelerate launch`` each rank samples its
share of the batches and the main process verifies and writes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..distributed import join_launcher_group
from . import _loading
from ._loading import ModelSource
from ._parsing import UsageError, _one_line, _parser, check_writable, parse_command
from ._processes import _exit_without_gloo_teardown, _is_main, _quiet_progress_bars, say

__all__ = ["SampleScriptArguments", "run_sample"]


@dataclass
class SampleScriptArguments:
    model: str = field(metadata={"help": "Model folder (save_pretrained, with its tokenizer) or hub id."})
    data: str = field(
        metadata={
            "help": "Prompts: .jsonl/.json/.parquet/.csv or save_to_disk folder with prompt+completion (the "
            "completion is the reference) or messages (the last assistant turn is the reference)."
        }
    )
    num_samples: int = field(default=4, metadata={"help": "Samples per prompt (K)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the top tokens of this mass."})
    top_k: int = field(default=0, metadata={"help": "Keep the k most likely tokens (0 = off, the full softmax)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest completion; longer ones are not accepted."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate call (each gives K sequences)."})
    seed: int = field(
        default=0, metadata={"help": "Seed of the sampling (per batch: the same rows on any world size)."}
    )
    verifier: str = field(
        default="exact",
        metadata={
            "help": "exact (final answers equal: \\boxed{}, else the last number, else the text), math "
            "(math-verify, pip install 'dft-loss[math]') or MODULE:FUNCTION, a reward(prompt, completion, "
            "reference) -> float (a module importable from here or path/to/file.py)."
        },
    )
    answer_regex: str | None = field(
        default=None, metadata={"help": "exact only: the final answer is this regex's last match (its group 1)."}
    )
    threshold: float = field(default=1.0, metadata={"help": "A sample is accepted when its reward is >= this."})
    max_prompts: int | None = field(default=None, metadata={"help": "Sample from the first N prompts only."})
    output_dir: str = field(
        default="dft-samples", metadata={"help": "Where samples.jsonl, accepted.jsonl, pairs.jsonl go."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing, non-empty output_dir."})
    torch_dtype: str = field(default="float32", metadata={"help": "Load dtype: float32, bfloat16, float16 or auto."})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own code."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})


def _fresh(out: Path, overwrite: bool) -> None:
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def parse_sample_args(argv: list[str]) -> SampleScriptArguments:
    parser = _parser((SampleScriptArguments,), "dft sample")
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        raise SystemExit(0)
    args = parse_command(parser, argv, "dft sample")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise UsageError(f"--max_prompts must be >= 1, got {args.max_prompts}.")
    return args


def run_sample(argv: list[str]) -> int:
    args = parse_sample_args(argv)
    from .. import sampling  # the flags are good: now the heavy parts
    from ..data import DataError, load_local_dataset
    from ..verifiers import VerifierError

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file, not a folder.")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"output_dir {out} exists and is not empty: choose another, or pass --overwrite.")
    check_writable(out)
    raw = load_local_dataset(args.data, prompts_only=True)
    if args.max_prompts is not None:
        raw = raw.select(range(min(args.max_prompts, len(raw))))
    try:
        prompts = sampling.read_prompts(raw)
    except DataError as e:
        raise DataError(f"{args.data}: {e}") from None
    options = {
        "num_samples": args.num_samples,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
    }
    try:
        verifier = sampling.check(
            prompts, args.verifier, threshold=args.threshold, answer_regex=args.answer_regex, **options
        )
    except DataError as e:
        raise DataError(f"{args.data}: {e}") from None
    except (VerifierError, ValueError) as e:
        message = _one_line(e)
        named = message.split(" ", 1)[0] in {*options, "threshold"}  # "num_samples must be >= 1, got 0."
        raise UsageError(f"--{message}" if named else message) from None
    script = ModelSource(
        model=args.model,
        torch_dtype=args.torch_dtype,
        attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code,
    )
    if not _is_main():
        _quiet_progress_bars()
    model, tokenizer = _loading._load_model_and_tokenizer(script)
    try:
        sampling.check_chat_template(prompts, tokenizer)
    except DataError as e:
        raise DataError(f"{args.data}: {e}") from None
    rank, world, device = join_launcher_group()
    model.to(device)
    say(
        f"sampling {args.num_samples} x {len(prompts)} prompts at temperature {args.temperature:g} "
        f"(top_p {args.top_p:g}, top_k {args.top_k or 'off'}, max {args.max_new_tokens} new tokens) on "
        f"{device} x {world} process{'es' if world > 1 else ''}; verifier {args.verifier}"
    )
    rows = sampling.generate(
        model, tokenizer, prompts, seed=args.seed, progress=not args.disable_tqdm and rank == 0, **options
    )
    if rank != 0:  # every rank holds every row now; the main process verifies and writes
        _exit_without_gloo_teardown()
        return 0
    extra = {
        "model": args.model,
        "data": args.data,
        "verifier": args.verifier,
        "answer_regex": args.answer_regex,
        "seed": args.seed,
        "world_size": world,
        **options,
        "generation": sampling.generation_record(
            model, tokenizer, **{k: v for k, v in options.items() if k != "batch_size"}
        ),
    }
    try:
        rows = sampling.score(rows, verifier, threshold=args.threshold)
    except VerifierError as e:  # keep the generation: it can be verified again with dft.sampling.score
        _fresh(out, args.overwrite)
        (out / "samples.jsonl").write_text("".join(json.dumps({**r, "reward": None}) + "\n" for r in rows))
        raise UsageError(f"{_one_line(e)}; the unverified samples are in {out}/samples.jsonl") from None
    _fresh(out, args.overwrite)
    summary = sampling.write(rows, out, threshold=args.threshold, extra=extra)
    k = summary["samples_per_prompt"]
    say(
        f"{summary['samples']} samples of {summary['prompts']} prompts: {summary['accepted']} accepted "
        f"({summary['acceptance_rate']:.1%}); pass@1 {summary['pass_at_k'].get('1', 0):.3f}"
        + (f", pass@{k} {summary['pass_at_k'][str(k)]:.3f}" if k and k > 1 else "")
        + f"; {summary['prompts_without_accepted']} prompts with no accepted sample"
        + (f"; {summary['unfinished']} cut at --max_new_tokens (never accepted)" if summary["unfinished"] else "")
    )
    say(
        f"wrote {out}/samples.jsonl, accepted.jsonl ({summary['accepted']} rows for dft train --data), pairs.jsonl "
        f"({summary['pairs']['pairs']} pairs for DPO), summary.json"
    )
    _exit_without_gloo_teardown()  # gloo: leave without the teardown that can abort a rank (_processes.py)
    return 0
