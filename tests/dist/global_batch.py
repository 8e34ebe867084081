"""The global batch shared by the 2-rank worker and the single-process reference."""

import torch

from dft.toy import arithmetic_examples, toy_batch

ACCUM = 2
LR = 0.5


def global_examples():
    """8 sequences; the first 4 (rank 0) have far more supervised tokens than the last 4 (rank 1)."""
    long = arithmetic_examples(4, seed=1, terms=(4, 5), digits=3)
    short = arithmetic_examples(4, seed=2, terms=(2, 2), digits=1)
    return long + short


def rank_micro_batches(examples, rank, world):
    """Contiguous shard per rank, split into ACCUM micro-batches."""
    per_rank = len(examples) // world
    mine = examples[rank * per_rank : (rank + 1) * per_rank]
    step = len(mine) // ACCUM
    return [mine[i * step : (i + 1) * step] for i in range(ACCUM)]


def packed_batch(examples):
    """One padding-free row: the examples' tokens end to end, position_ids restarting at 0 for each.

    Every token is a label (text-style SFT, ``labels = input_ids``), so a naive shift would supervise
    the first token of each sequence from the last token of the previous one.
    """
    padded = toy_batch(examples)
    keep = padded["attention_mask"].bool()
    rows = [padded["input_ids"][i][keep[i]] for i in range(len(examples))]
    return {
        "input_ids": torch.cat(rows)[None],
        "labels": torch.cat(rows)[None],
        "position_ids": torch.cat([torch.arange(len(ids)) for ids in rows])[None],
    }


def micro_batches(examples, rank, world, packed):
    make = packed_batch if packed else toy_batch
    return [make(mb) for mb in rank_micro_batches(examples, rank, world)]


def with_nft_keys(batch):
    """NFT's verdicts and rates and per-token data weights, derived from the tokens (the same in any sharding)."""
    ids = batch["input_ids"]
    weights = 1.0 + 0.5 * (ids % 3).double()
    weights = weights.masked_fill(ids % 7 == 0, 0.0)  # some tokens weigh 0: not supervised, not counted
    return {
        **batch,
        "accepted": (ids.sum(-1) % 2).long(),
        "nft_rhat": 0.2 + 0.15 * (ids[:, 0] % 5).double(),
        "loss_weights": weights.float(),
    }
