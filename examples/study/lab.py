"""Model, batches, the training loop and the metrics shared by pretrain.py, study.py and the notebooks."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import torch
from tasks import BOS, EOS, PAD, VOCAB_SIZE, answer, decode, encode

import dft
from dft.toy import toy_batch

BASE_DIR = Path(__file__).resolve().parent / "base"


def new_model(seed: int = 0, hidden: int = 128, layers: int = 4) -> torch.nn.Module:
    """A tiny Llama for the study vocabulary (0.6 M parameters at the defaults)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def load_base(path: str | Path = BASE_DIR) -> torch.nn.Module:
    """The shipped base (examples/study/base, made by pretrain.py)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path)


def batch(examples: list[dict], max_length: int = 80) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (labels supervise the completion only)."""
    return toy_batch(examples, max_length, encode=encode)


def ids_batch(rows: list[dict], max_length: int = 80) -> dict[str, torch.Tensor]:
    """:func:`batch` from token ids: rows carry ``prompt_ids`` (``BOS`` included) and ``completion_ids`` (trained on
    as they are: a sampled completion's stop id is in them when it finished). The same layout as :func:`batch`."""
    width = min(max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows), max_length)
    ids = torch.full((len(rows), width), PAD)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        seq = (list(r["prompt_ids"]) + list(r["completion_ids"]))[:width]
        start = len(r["prompt_ids"])
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, start : len(seq)] = ids[i, start : len(seq)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def optimizer(model, *, lr: float, steps: int, warmup: int = 10, cosine: bool = True):
    """:func:`train`'s AdamW (no weight decay) and its schedule, linear warm-up then cosine decay, per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))) if cosine else 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(
    model,
    data,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup: int = 10,
    loss=None,
    ref_model=None,
    kl_coef: float = 0.0,
    cosine: bool = True,
    log=None,
    log_every: int = 0,
    nft=None,
):
    """AdamW (no weight decay), linear warm-up then cosine decay, grad-norm clip 1.0, fused DFT head.

    ``data`` is a list of examples (sampled with replacement, seeded) or a callable ``(n, rng) -> examples``
    (fresh examples every step). ``loss`` is a :class:`dft.DFTWeight` (``None`` = cross-entropy).
    ``log(step, stats_dict)`` is called every ``log_every`` steps; training stops early when it returns True.
    Rows that carry ``prompt_ids`` / ``completion_ids`` are batched from those ids (:func:`ids_batch`).
    ``nft`` (a :class:`dft.NFTWeight`): NFT, with ``ref_model`` as pi_old and rows that carry ``accepted`` and
    ``nft_rhat`` (their prompt's acceptance rate).
    """
    weighting = loss if loss is not None else dft.DFTWeight(alpha=0.0)
    rng = random.Random(seed)
    opt, sched = optimizer(model, lr=lr, steps=steps, warmup=warmup, cosine=cosine)
    model.train()
    stats = None
    for step in range(steps):
        rows = data(batch_size, rng) if callable(data) else [rng.choice(data) for _ in range(batch_size)]
        b = ids_batch(rows) if "completion_ids" in rows[0] else batch(rows)
        if nft is not None:  # each row's verdict and its prompt's acceptance rate
            b["accepted"] = torch.tensor([float(r["accepted"]) for r in rows])
            b["nft_rhat"] = torch.tensor([float(r["nft_rhat"]) for r in rows])
        out = dft.causal_lm_loss(model, b, weighting, ref_model=ref_model, kl_coef=kl_coef, nft=nft)
        out.loss.backward()
        stats = dft.TokenStats.accumulate(stats, out.stats)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log is not None and log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            stop = log(step + 1, stats.as_dict())
            stats = None
            if stop:  # the callback asked to stop here
                break
    model.eval()
    return model


@torch.no_grad()
def generate(model, examples: list[dict], max_new_tokens: int = 48, chunk: int = 200) -> list[str]:
    """Greedy completions (batched, left padding), cut at the first newline."""
    model.eval()
    texts = []
    for start in range(0, len(examples), chunk):
        prompts = [[BOS] + encode(e["prompt"]) for e in examples[start : start + chunk]]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), PAD)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=EOS
        )
        texts += [decode(row).split("\n")[0] for row in out[:, width:].tolist()]
    return texts


def exact_match(model, examples: list[dict], max_new_tokens: int = 48) -> float:
    """Share of examples whose generated final answer (after the last 'A: ') equals the reference's."""
    got = generate(model, examples, max_new_tokens)
    return sum(answer(g) == answer(e["completion"]) for g, e in zip(got, examples)) / len(examples)


def result_spans(completion: str) -> list[tuple[int, int]]:
    """Character spans of the tokens a model must *compute* in a completion: every step result (the digits
    after '=') or, in a completion without steps (a fact, a direct answer), the answer after 'A: '. The final
    'A: 88' of a worked solution copies the last step result, so scoring it would measure copying."""
    spans = [m.span(1) for m in re.finditer(r"=(\d+)", completion)]
    return spans or [m.span(1) for m in re.finditer(r"A: (.+)", completion)]


@torch.no_grad()
def teacher_forced(model, examples: list[dict]) -> dict[str, float]:
    """Teacher-forced scores of the computed tokens (:func:`result_spans`), given the reference prefix:
    ``result_logp`` = their mean log-probability, ``result_acc`` = the share whose argmax is the reference."""
    model.eval()
    b = batch(examples, max_length=10**6)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double()
    targets = b["input_ids"][:, 1:]  # targets[:, k - 1] is input position k
    keep = torch.zeros_like(targets, dtype=torch.bool)
    for i, e in enumerate(examples):
        offset = len(encode(e["prompt"]))  # completion character j is input position 1 + offset + j
        for start, end in result_spans(e["completion"]):
            keep[i, offset + start : offset + end] = True
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    hit = logits.argmax(-1) == targets
    return {"result_logp": float(logp[keep].mean()), "result_acc": float(hit[keep].float().mean())}
