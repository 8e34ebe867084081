"""Tiny real causal LMs built from config (no download), and token batches for them."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def tiny_model(kind: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """``llama`` (untied), ``llama_tied``, ``qwen2``, ``gemma2`` (final logit softcap 5.0, tied)."""
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=False, **overrides))
    elif kind == "llama_tied":
        model = LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True, **overrides))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=False, **overrides))
    elif kind == "gemma2":
        model = Gemma2ForCausalLM(
            Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=5.0, attn_logit_softcapping=None, **overrides)
        )
    else:
        raise ValueError(kind)
    return model.float()


def token_batch(batch: int = 2, seq: int = 12, *, prompt: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (right padding on the last row) and labels masked on the prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, seq - 3 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_tokenizer():
    """A word-level fast tokenizer over VOCAB ids ("t0" ... ), built locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def uneven_dataset(n: int = 8, seq: int = 10, seed: int = 0):
    """A pre-tokenised ``datasets.Dataset`` of ``n`` rows whose prompts (label -100) have uneven lengths."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    labels = ids.clone()
    for i in range(n):  # uneven numbers of supervised tokens per example
        labels[i, : 1 + (i * 3) % (seq - 1)] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "labels": labels.tolist()})
