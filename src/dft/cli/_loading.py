"""``--model`` and the shipped data: a save_pretrained folder, a LoRA adapter folder on its base, a hub id,
or the built-in tiny Llama; bad paths are one line before anything loads."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ._parsing import UsageError, _one_line
from ._processes import say


@dataclass
class ModelSource:
    """What ``dft eval`` / ``inspect`` / ``sample`` load ``--model`` with (``dft train`` passes its own flags,
    which have these fields too)."""

    model: str | None = None
    torch_dtype: str = "float32"
    attn_implementation: str | None = None
    trust_remote_code: bool = False


def _asset(name: str) -> str:
    return str(resources.files("dft") / "assets" / name)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


SHIPPED_TRAIN = "shipped arithmetic_train.jsonl"


TOY_MODEL = "built-in tiny Llama (dft.toy)"
"""How run_config.json names the model of a run without --model (rebuilt by ``_toy_model``)."""


RUN_RECORD = "dft_run.json"
"""Written into every checkpoint: the run's settings, which a resumed run must match."""

EVAL_SPLIT = "eval_split.jsonl"
"""Written by ``dft train`` next to the model: the rows of its held-out split (``--eval_data``, or the
``--eval_fraction`` of ``--data`` it held out), which ``dft eval --model OUT`` scores without ``--data``. A run on
the shipped data has none: its held-out split is the shipped test split."""


def _toy_model() -> Any:
    from ..toy import toy_model

    return toy_model(hidden_size=64, num_layers=2)  # seeded: the same weights every time


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _recorded_eval_split(folder: Path) -> Path | None:
    """The held-out rows ``dft train`` wrote with the model in ``folder`` (for the ``adapter/`` of a
    ``--merge_lora`` run: in the folder above), or None."""
    for place in (folder, folder.parent) if folder.name == "adapter" else (folder,):
        if (place / EVAL_SPLIT).is_file():
            return place / EVAL_SPLIT
    return None


def _run_record(folder: Path) -> dict[str, Any] | None:
    """The ``dft train`` record of a folder: ``run_config.json`` (a finished run), or ``dft_run.json`` (written
    into each checkpoint); None when there is neither."""
    for name in ("run_config.json", RUN_RECORD):
        try:
            return json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
    return None


def _load_adapter(script: Any, folder: Path) -> tuple[Any, Any]:
    """A LoRA adapter folder (``adapter_config.json``, as ``dft train --lora_r`` writes): its base model
    (``base_model_name_or_path``; the built-in model for a run without --model) with the adapter on it,
    and the folder's tokenizer (else the base's)."""
    from dataclasses import replace

    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except ValueError as e:
        raise UsageError(f"--model {folder}: adapter_config.json is not valid JSON ({_one_line(e)}).") from None
    try:
        import peft
    except ImportError:
        raise UsageError(
            f"--model {folder} is a LoRA adapter: loading it needs peft: pip install 'dft-loss[peft]'."
        ) from None
    base = config.get("base_model_name_or_path") or None
    # the adapter/ of a --merge_lora run: the run's record is in the folder above
    record = _run_record(folder) or (_run_record(folder.parent) if folder.name == "adapter" else None) or {}
    if base is None and record.get("model") != TOY_MODEL:
        raise UsageError(
            f"--model {folder} is a LoRA adapter whose adapter_config.json names no base model "
            "(base_model_name_or_path): set it to the base model's folder or hub id."
        )
    if base is not None and base.startswith((".", "/", "~")) and not Path(base).expanduser().is_dir():
        raise UsageError(
            f"--model {folder} is a LoRA adapter on {base}, which is not found from {Path.cwd()}: run from where "
            "it was trained, or set base_model_name_or_path in its adapter_config.json."
        )
    if base is None:
        from ..toy import toy_tokenizer

        model, tokenizer = _toy_model(), toy_tokenizer()
    else:
        model, tokenizer = _load_model_and_tokenizer(replace(script, model=base), need_tokenizer=False)
    if _has_tokenizer(folder):
        tokenizer = _load_tokenizer(str(folder), script.trust_remote_code)
    elif tokenizer is None:
        raise UsageError(f"--model {folder}: neither the adapter folder nor its base {base} has a tokenizer.")
    try:
        with _peft_quietly():
            model = peft.PeftModel.from_pretrained(model, str(folder))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"cannot load the LoRA adapter {folder} on {base or TOY_MODEL}: {_one_line(e)}") from None
    return model, tokenizer


def _load_tokenizer(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model_and_tokenizer(script: Any, need_tokenizer: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``--model``: a save_pretrained folder, a LoRA adapter folder (on its base),
    a hub id, or the built-in tiny Llama. Bad paths are a ``UsageError``, before anything loads."""
    import torch
    from transformers import AutoModelForCausalLM

    path = script.model
    if path is None:
        from ..toy import toy_tokenizer

        return _toy_model(), toy_tokenizer()
    local = Path(path)
    if local.exists() and not local.is_dir():
        raise UsageError(f"--model {path} is a file; give the folder written by save_pretrained (or a hub id).")
    if local.is_dir() and not (local / "config.json").is_file() and (local / "adapter_config.json").is_file():
        return _load_adapter(script, local)
    if local.is_dir() and not (local / "config.json").is_file():
        raise UsageError(
            f"--model {path} has no config.json (nor adapter_config.json: the folder is not a saved model): "
            "save the model there with model.save_pretrained(folder)."
        )
    if need_tokenizer and local.is_dir() and not _has_tokenizer(local):
        raise UsageError(
            f"--model {path} has no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}, ...): save it there "
            "with tokenizer.save_pretrained(folder)."
        )
    if not local.is_dir() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise UsageError(f"model path not found: {path} (a local folder written by save_pretrained, or a hub id).")
    if not local.is_dir():
        _check_hub(path)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if script.torch_dtype not in dtypes:
        raise UsageError(f"--torch_dtype must be one of {sorted(dtypes)}, got {script.torch_dtype!r}.")
    kwargs: dict[str, Any] = {"dtype": dtypes[script.torch_dtype], "trust_remote_code": script.trust_remote_code}
    if script.attn_implementation:
        kwargs["attn_implementation"] = script.attn_implementation
    try:
        tokenizer = None
        if need_tokenizer or not local.is_dir() or _has_tokenizer(local):
            tokenizer = _load_tokenizer(path, script.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        where = "folder" if local.is_dir() else "hub id"
        raise UsageError(f"cannot load a causal LM and its tokenizer from {where} {path}: {_one_line(e)}") from None
    return model, tokenizer


def _check_hub(repo_id: str, timeout: float = 5.0) -> None:
    """A hub id that is not in the local cache needs the Hub: say so at once when it cannot be reached
    (huggingface_hub would retry for about a minute, then print two dozen lines)."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return  # in the cache: from_pretrained can load it
    except Exception:  # an id huggingface_hub refuses: from_pretrained will say why
        return
    if constants.HF_HUB_OFFLINE:
        reason = "it is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    else:
        url = urlparse(constants.ENDPOINT)
        error: list[str] = [f"no answer within {timeout:g}s"]

        def probe() -> None:
            try:
                socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
                error.clear()
            except OSError as e:
                error[:] = [e.strerror or type(e).__name__]

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout + 1)  # name resolution is not covered by the socket timeout
        if not error:
            return
        reason = f"it is not in the Hugging Face cache and {constants.ENDPOINT} cannot be reached ({error[0]})"
    raise UsageError(
        f"--model {repo_id}: not a local folder, so a hub id, but {reason}: give a folder written by "
        "save_pretrained, or download the model where the Hub is reachable."
    )


def _apply_lora(model: Any, script: Any) -> Any:
    if script.lora_r <= 0:
        return model
    try:
        import peft
    except ImportError:
        raise UsageError("--lora_r needs peft: pip install 'dft-loss[peft]'.") from None
    targets = script.lora_target_modules
    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = peft.LoraConfig(
        r=script.lora_r,
        lora_alpha=script.lora_alpha,
        lora_dropout=script.lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        with _peft_quietly():
            model = peft.get_peft_model(model, config)
    except ValueError as e:
        raise UsageError(f"--lora_target_modules {targets}: {_one_line(e)}") from None
    # the adapter's base as a path that works from anywhere (peft stores the --model string as given);
    # empty for the built-in model, which dft eval / inspect rebuild from the run's record
    model.peft_config["default"].base_model_name_or_path = _where(script.model) or None
    return model


@contextlib.contextmanager
def _peft_quietly() -> Iterator[None]:
    """peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning
    nobody running the CLI can act on: hidden around peft's calls (every other warning stays)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _where(path: str | None) -> str | None:
    """A local path made absolute (so that a record or an adapter works from another folder); else as given."""
    if path and Path(path).expanduser().exists():
        return str(Path(path).expanduser().resolve())
    return path


def _prepare(raw: Any, tokenizer: Any, max_length: int, name: str):
    from ..data import prepare_dataset

    prepared, report = prepare_dataset(raw, tokenizer, max_length)
    say(report.summary(name))
    if "accepted" in prepared.column_names and report.sampled_ids < report.examples_in:
        say(
            f"note: {report.examples_in - report.sampled_ids} {name} rows carry text only (no prompt_ids / "
            "completion_ids, e.g. from another generator): tokenised as dft train tokenises prompt/completion, which "
            "may differ from the sequences that were sampled."
        )
    return prepared
