"""A tiny offline task for examples and tests: multi-step arithmetic with worked solutions.

Character-level, so no tokenizer download is needed:

```text
prompt:     "Q: 23+58+7=?\\n"
completion: "23+58=81; 81+7=88. A: 88\\n"
```

``toy_batch`` turns examples into ``input_ids``/``attention_mask``/``labels`` with the prompt masked
(labels = -100 on the prompt and on padding), ready for [`dft.causal_lm_loss`][dft.causal_lm_loss].
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

__all__ = ["CHARS", "arithmetic_examples", "decode", "encode", "toy_batch", "toy_model", "toy_tokenizer"]

PAD, BOS = 0, 1
CHARS = "0123456789+-=?;.:QA \n"
"""The toy vocabulary's characters, ids 2 and up (0 = pad, 1 = bos); ``"\\n"`` (the EOS token) ends a completion."""
_INDEX = {c: i + 2 for i, c in enumerate(CHARS)}
VOCAB_SIZE = len(CHARS) + 2


def encode(text: str) -> list[int]:
    """Characters -> ids (0 = pad, 1 = bos)."""
    try:
        return [_INDEX[c] for c in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the toy vocabulary {CHARS!r}") from None


def decode(ids: list[int]) -> str:
    """Ids -> characters, the inverse of [`encode`][dft.toy.encode] (pad and bos ids are dropped)."""
    return "".join(CHARS[i - 2] for i in ids if i >= 2)


def arithmetic_examples(n: int, *, seed: int = 0, terms: tuple[int, int] = (2, 3), digits: int = 2) -> list[dict]:
    """``n`` examples ``{"prompt", "completion"}`` of sums of ``terms`` numbers with ``digits`` digits."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        nums = [rng.randint(0, 10**digits - 1) for _ in range(rng.randint(*terms))]
        steps, acc = [], nums[0]
        for x in nums[1:]:
            steps.append(f"{acc}+{x}={acc + x}")
            acc += x
        out.append({"prompt": f"Q: {'+'.join(map(str, nums))}=?\n", "completion": f"{'; '.join(steps)}. A: {acc}\n"})
    return out


def toy_batch(
    examples: list[dict], max_length: int = 64, *, encode: Callable[[str], list[int]] = encode
) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels supervise the completion only.

    ``encode`` maps text to ids (default: this module's characters); any vocabulary that keeps
    ``PAD = 0`` and ``BOS = 1`` works (the study's larger character set does). Returns ``input_ids``,
    ``attention_mask`` and ``labels``, each ``[len(examples), min(longest row, max_length)]``.
    """
    rows = [([BOS] + encode(e["prompt"]), encode(e["completion"])) for e in examples]
    width = min(max(len(p) + len(c) for p, c in rows), max_length)
    ids = torch.full((len(rows), width), PAD)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = (p + c)[:width]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = ids[i, len(p) : len(seq)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def toy_model(hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny Llama built from config (no download) for the toy vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=_INDEX["\n"],
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def toy_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` with the same ids as [`encode`][dft.toy.encode] (built locally).

    ``<pad>`` = 0, ``<bos>`` = 1 (prepended to every encoded text), the newline doubles as ``eos``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<bos>": BOS, **_INDEX}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="\n", padding_side="right"
    )
