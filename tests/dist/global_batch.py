"""The global batch shared by the 2-rank worker and the single-process reference."""

from dft.toy import arithmetic_examples

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
