"""A vocabulary-sharded LM head (tensor parallel): which columns this rank holds, and the combine step.

Under tensor parallelism the head weight is split on the vocabulary: rank ``k`` of the group holds
rows ``[offset_k, offset_k + V_k)`` of ``W [V, H]`` (a ``Shard(0)`` DTensor from transformers'
``tp_plan="auto"`` or torch's ``ColwiseParallel``; Megatron's ``VocabParallelEmbedding`` layout).
The hidden states are the same on every rank of the group. Per chunk of rows the fused head then

1. reduces its own ``[C, V_k]`` block: row max ``m_k``, ``s_k = sum exp(u - m_k)``, the target logit
   where this rank owns the target column (0 elsewhere), and the statistics' partials;
2. **combines** them over the group ([`combine`][dft.vocab_parallel.combine], one ``all_gather`` of a
   ``[fields, C]`` block): ``M = max_k m_k``, ``s = sum_k exp(m_k - M) s_k``, ``u_y = sum_k u_y,k``, the entropy's
   ``t = sum_k exp(m_k - M) (t_k + (m_k - M) s_k)``, the argmax of the first rank holding ``M``;
   ASFT's reference partials the same way;
3. finishes as on one rank: ``log p_y = u_y - M - log s``, the weights, the loss, the statistics —
   identical on every rank — and its own ``dz`` block, ``dW_k`` (its shard only) and a partial ``dh``
   that is summed over the group once per call (the head's input is replicated).

So per rank the head costs ``1/tp`` of the FLOPs and memory; no rank ever holds the full weight or
full logits. Without a shard (``None``) every step is the identity.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["RowPartials", "VocabShard", "combine", "localize_head"]


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of a vocabulary-sharded head: rows ``[offset, offset + weight.shape[0])`` of ``[V, H]``.

    Pass it to [`dft.linear_dft_loss`][dft.linear_dft_loss] (``vocab_shard=``) with the *local* weight ``[V_k, H]`` when
    the head is sharded by hand (Megatron-style); a ``Shard(0)`` DTensor weight is recognised without it.

    Attributes:
        offset: the first vocabulary id this rank's weight rows stand for.
        vocab_size: ``V``, the full vocabulary (labels are checked against it).
        group: the tensor-parallel process group over which the vocabulary is split (None: the world).
            Every rank of it must call the loss with the same hidden states and labels.
    """

    offset: int
    vocab_size: int
    group: Any = None

    def __post_init__(self) -> None:
        for name in ("offset", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"VocabShard.{name} must be an int >= 0, got {value!r}.")
        if self.offset >= self.vocab_size:
            raise ValueError(f"VocabShard.offset ({self.offset}) must be < vocab_size ({self.vocab_size}).")

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def max_local(self) -> int:
        """The largest shard (``ceil(V / tp)``): the chunk policy uses it so every rank chunks alike."""
        return -(-self.vocab_size // self.world_size)


def _dtensor_type() -> type | None:
    """``DTensor`` if torch's DTensor module is loaded (nothing can be a DTensor otherwise); import stays light."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t: object) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _shard_of(weight: Any) -> VocabShard | None:
    """The [`VocabShard`][dft.VocabShard] of a DTensor head weight (None when it is replicated on every mesh dim).

    Raises:
        ValueError: a placement the fused head cannot use (sharded on the hidden dim, partial sums,
            the vocabulary split over more than one mesh dimension).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = weight.device_mesh, weight.placements
    vocab_dims = []
    for dim, placement in enumerate(placements):
        if isinstance(placement, Shard) and placement.dim in (0, -weight.dim()):
            vocab_dims.append(dim)
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"the LM head weight is a DTensor with placements {placements}: the fused head supports a weight "
                "sharded on the vocabulary (Shard(0), e.g. ColwiseParallel / tp_plan='auto') or replicated; use "
                "fused_lm_head=False (the logits path) for this layout."
            )
    if not vocab_dims:
        return None
    if len(vocab_dims) > 1:
        raise ValueError(
            f"the LM head weight is split on the vocabulary over {len(vocab_dims)} mesh dimensions {placements}; "
            "the fused head supports one (the tensor-parallel dimension)."
        )
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    return VocabShard(offset=int(offset[0]), vocab_size=int(weight.shape[0]), group=mesh.get_group(vocab_dims[0]))


def _local(t: Any, what: str) -> Any:
    """A DTensor's local tensor (differentiably: its gradient flows back with the same placements)."""
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate

    if what == "hidden" and not all(isinstance(p, Replicate) for p in t.placements):
        raise ValueError(
            f"hidden is a DTensor with placements {t.placements}: a vocabulary-sharded head needs the hidden states "
            "replicated over the tensor-parallel group (gather a sequence-parallel activation first)."
        )
    return t.to_local()


def localize_head(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab_shard: VocabShard | None
) -> tuple[Tensor, Tensor, Tensor | None, VocabShard | None]:
    """Local tensors and the vocabulary shard of a head: DTensors become their local parts.

    ``vocab_shard`` given: ``weight`` must be the local ``[V_k, H]`` block (not a DTensor).
    """
    if is_dtensor(weight):
        if vocab_shard is not None:
            raise ValueError("vocab_shard is for a local weight shard; the weight is a DTensor (its shard is known).")
        vocab_shard = _shard_of(weight)
        if bias is not None and is_dtensor(bias) and tuple(bias.placements) != tuple(weight.placements):
            raise ValueError(f"bias placements {bias.placements} must match the weight's {weight.placements}.")
        if bias is not None and not is_dtensor(bias) and vocab_shard is not None:
            raise ValueError(
                f"bias is a plain tensor of {bias.shape[0]} entries but the weight is a DTensor split on the "
                f"vocabulary (placements {tuple(weight.placements)}): pass the bias as a DTensor with the same "
                "placements (distribute_tensor(bias, mesh, weight.placements))."
            )
    elif vocab_shard is None:
        _refuse_bare_local_shard(weight)
    else:
        if not isinstance(vocab_shard, VocabShard):
            raise TypeError(f"vocab_shard must be a dft.VocabShard, got {type(vocab_shard).__name__}.")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("vocab_shard needs an initialised torch.distributed process group.")
        if vocab_shard.offset + weight.shape[0] > vocab_shard.vocab_size:
            raise ValueError(
                f"vocab_shard: offset {vocab_shard.offset} + weight rows {weight.shape[0]} exceed vocab_size "
                f"{vocab_shard.vocab_size}."
            )
    return _local(hidden, "hidden"), _local(weight, "weight"), _local(bias, "bias"), vocab_shard


def _refuse_bare_local_shard(weight: Tensor) -> None:
    """``W.to_local()`` of a vocabulary-sharded DTensor passed as if it were the whole head would be a softmax
    over this rank's rows only. Its autograd node (``_ToTorchTensor``) still carries the DTensor's spec: refuse.
    (A frozen ``to_local()`` has no node and cannot be told from a small head.)"""
    spec = getattr(weight.grad_fn, "dtensor_spec", None) if weight.grad_fn is not None else None
    placements = getattr(spec, "placements", ())
    if any(type(p).__name__ == "Shard" and getattr(p, "dim", None) == 0 for p in placements):
        raise ValueError(
            f"weight is the local shard of a DTensor split on the vocabulary (placements {tuple(placements)}, "
            f"{weight.shape[0]} of {spec.shape[0]} rows): a softmax over it alone is wrong. Pass the DTensor weight "
            "itself (its shard is read from it), or vocab_shard=dft.VocabShard(offset, vocab_size, group)."
        )


def vocab_size_of(weight: Tensor, shard: VocabShard | None) -> int:
    """``V``: the full vocabulary (a DTensor's ``shape`` is global; a local shard's is not)."""
    return weight.shape[0] if shard is None else shard.vocab_size


class RefPartials(NamedTuple):
    """ASFT's reference over this rank's columns: ``m_r``, ``s_r``, ``d = sum exp(r_u - m_r)(r_u - u)``, ``r_u[y]``."""

    m: Tensor
    s: Tensor
    d: Tensor
    u_y: Tensor


class RowPartials(NamedTuple):
    """Per-row reductions of one chunk over this rank's columns (``[C]`` each; all columns without a shard).

    ``u_y`` is 0 on ranks that do not hold the target column; ``argmax`` is a global column index.
    """

    m: Tensor
    s: Tensor
    u_y: Tensor
    argmax: Tensor | None = None  # stats
    t: Tensor | None = None  # stats: sum exp(u - m) (u - m)
    ref: RefPartials | None = None  # ASFT


def combine(part: RowPartials, shard: VocabShard | None) -> RowPartials:
    """The partials of every rank of the vocabulary group merged into the full row's (identity without one).

    One ``all_gather`` of ``[fields, C]`` per chunk (C <= 8192 rows: a few hundred KB), then the merge
    runs on every rank alike, so every rank holds the same row values afterwards.
    """
    if shard is None:
        return part
    fields = [part.m, part.s, part.u_y]
    if part.argmax is not None:
        fields += [part.argmax.to(part.m.dtype), part.t]
    if part.ref is not None:
        fields += list(part.ref)
    local = torch.stack(fields)
    gathered = [torch.empty_like(local) for _ in range(shard.world_size)]
    dist.all_gather(gathered, local.contiguous(), group=shard.group)
    g = torch.stack(gathered)  # [tp, fields, C]
    m_k, s_k, uy_k = g[:, 0], g[:, 1], g[:, 2]
    m = m_k.amax(0)
    scale = (m_k - m).exp()  # [tp, C]
    s = (scale * s_k).sum(0)
    argmax = t = None
    i = 3
    if part.argmax is not None:
        first = (m_k == m).to(torch.int8).argmax(0, keepdim=True)  # the first rank holding the row max
        argmax = g[:, i].gather(0, first).squeeze(0).round().long()
        t = (scale * (g[:, i + 1] + (m_k - m) * s_k)).sum(0)
        i += 2
    ref = None
    if part.ref is not None:
        mr_k, sr_k, d_k, ruy_k = g[:, i], g[:, i + 1], g[:, i + 2], g[:, i + 3]
        m_r = mr_k.amax(0)
        scale_r = (mr_k - m_r).exp()
        ref = RefPartials(m_r, (scale_r * sr_k).sum(0), (scale_r * d_k).sum(0), ruy_k.sum(0))
    return RowPartials(m, s, uy_k.sum(0), argmax, t, ref)


def gather_topk(u_local: Tensor, k: int, shard: VocabShard | None) -> Tensor:
    """The candidates for a row's global top-``k``: every rank's local top-``k`` (``[C, tp * k]``).

    The global top-``k`` of a row is among the union of the local ones, so EAFT's top-``k`` entropy
    computed on these equals the one on the full row. Without a shard: ``u_local`` itself.
    """
    if shard is None:
        return u_local
    k_local = min(k, u_local.shape[1])
    top = torch.topk(u_local, k_local, dim=1, sorted=False).values
    if k_local < k:  # pad to the same width on every rank
        top = torch.cat([top, top.new_full((top.shape[0], k - k_local), float("-inf"))], 1)
    gathered = [torch.empty_like(top) for _ in range(shard.world_size)]
    dist.all_gather(gathered, top.contiguous(), group=shard.group)
    candidates = torch.cat(gathered, 1)
    if shard.vocab_size < k:  # a row has fewer than k entries: its V real ones (never the -inf padding)
        candidates = torch.topk(candidates, shard.vocab_size, dim=1, sorted=False).values
    return candidates


def all_reduce_(t: Tensor | None, shard: VocabShard | None) -> Tensor | None:
    """In place sum over the vocabulary group (the partial ``dh`` of every rank's columns)."""
    if t is not None and shard is not None:
        dist.all_reduce(t, group=shard.group)
    return t


def check_group(
    labels: Tensor,
    hidden: Tensor,
    local_rows: int,
    shard: VocabShard | None,
    plan_inputs: tuple[int, int] = (0, 0),
) -> None:
    """The vocabulary group is consistent: every rank passes the same labels and hidden states, the ranks'
    rows ``[offset, offset + V_k)`` tile ``[0, V)`` exactly (no gap, no overlap), and every rank plans the same
    rows per chunk (its per-chunk collectives pair up only then). One tiny all_gather.

    Compares the label count, an order-sensitive checksum of the labels, the sum of the hidden states
    (identical tensors reduce identically), each rank's offset and row count, and ``plan_inputs``: the
    ``chunk_size`` given (0: none) and the chunk budget in bytes it is planned within (0 when given). With
    the same supervised rows and the largest shard's width (both checked here), these fix the plan: under a
    shard it is made for the eager epilogue, whatever each rank's compile does.
    """
    if shard is None:
        return
    flat = labels.reshape(-1).to(torch.float64)
    position = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
    key = torch.stack(
        [
            torch.tensor(float(flat.numel()), device=flat.device, dtype=torch.float64),
            (flat * position).sum(),
            hidden.detach().sum(dtype=torch.float64).to(flat.device),
            torch.tensor(float(shard.offset), device=flat.device, dtype=torch.float64),
            torch.tensor(float(local_rows), device=flat.device, dtype=torch.float64),
            torch.tensor(float(plan_inputs[0]), device=flat.device, dtype=torch.float64),
            torch.tensor(float(plan_inputs[1]), device=flat.device, dtype=torch.float64),
        ]
    )
    gathered = [torch.empty_like(key) for _ in range(shard.world_size)]
    dist.all_gather(gathered, key, group=shard.group)
    keys = torch.stack(gathered).tolist()  # one host read
    if any(k[:2] != keys[0][:2] for k in keys):
        raise ValueError(
            "a vocabulary-sharded head needs the same labels and hidden states on every rank of its group "
            "(tensor parallel replicates the batch); got different labels on different ranks. Is the weight "
            "sharded over a data-parallel group (e.g. an FSDP shard read outside the module's forward)?"
        )
    if any(k[2] != keys[0][2] for k in keys):
        raise ValueError(
            "a vocabulary-sharded head needs the same hidden states on every rank of its group; the ranks' "
            "hidden states differ (same labels). Replicate the head's input over the tensor-parallel group."
        )
    plans = [(int(k[5]), int(k[6])) for k in keys]
    if any(p != plans[0] for p in plans):
        named = ", ".join(
            f"rank {i}: " + (f"chunk_size={c}" if c else f"chunk budget {b / 2**20:.0f} MiB")
            for i, (c, b) in enumerate(plans)
        )
        raise ValueError(
            f"the ranks of a vocabulary group must run one chunk plan (their per-chunk all_gathers pair up); got {named}. "
            "Pass the same chunk_size on every rank."
        )
    tiles = sorted((int(k[3]), int(k[4])) for k in keys)
    end = 0
    for offset, rows in tiles:
        if offset != end:
            raise ValueError(
                f"the ranks' vocabulary shards must tile [0, {shard.vocab_size}) exactly; got (offset, rows) "
                f"{tiles}: {'a gap' if offset > end else 'an overlap'} at id {min(offset, end)}."
            )
        end = offset + rows
    if end != shard.vocab_size:
        raise ValueError(
            f"the ranks' vocabulary shards {tiles} cover [0, {end}), not the vocab_size [0, {shard.vocab_size})."
        )
