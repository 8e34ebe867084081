"""Run under torchrun (2 CPU ranks, gloo): the vocabulary-parallel fused head against a float64 reference.

    PYTHONPATH=. python -m torch.distributed.run --nproc_per_node 2 tests/dist/vocab_worker.py OUT_DIR

Every case builds the same full head on both ranks, splits it on the vocabulary (a ``Shard(0)``
DTensor through ``distribute_tensor``, torch's ``ColwiseParallel``, or a local block with a
``dft.VocabShard``), and records per rank the loss, the stats, ``dh`` and this rank's ``dW`` rows next to
the full-logits float64 reference of ``tests/helpers/reference.py`` (log_softmax + gather on ``F.linear``, no
dft code). V = 23 does not divide by 2 (local 12 / 11 rows), labels hit both shards, ~25% are ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import dft
from dft import VocabShard
from tests.dist import exit_without_teardown
from tests.helpers.reference import ref_dft_loss, ref_stat_sums, ref_transform

V, H, B, T = 23, 16, 3, 7

CASES: dict[str, dict] = {
    "dtensor-mean": {},
    "dtensor-stats-softcap": {"transform": {"logit_scale": 0.7, "softcap": 3.0}, "stats": True},
    "dtensor-bias-floor": {"bias": True, "options": {"alpha": 0.5, "min_weight": 0.1}},
    "dtensor-sum": {"reduction": "sum"},
    "dtensor-none": {"reduction": "none"},
    "dtensor-num-items": {"num_items": 9.0},
    "dtensor-eaft": {"options": {"alpha": 0.0, "eaft_alpha": 1.0, "eaft_top_k": 15}, "stats": True},
    "dtensor-eaft-k-over-vocab": {"options": {"alpha": 0.0, "eaft_alpha": 1.0, "eaft_top_k": 30}},  # k > V
    "dtensor-asft": {"asft": "dtensor", "stats": True},
    "dtensor-asft-whole-ref": {"asft": "whole", "stats": True},
    "dtensor-chunks": {"chunk_size": 4, "stats": True},
    "dtensor-all-masked": {"all_masked": True},
    "local-shard": {"local": True, "stats": True},
    "colwise-module": {"colwise": True, "stats": True},
    "bf16": {"dtype": torch.bfloat16, "stats": True},
}


def data(case: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) if case.get("bias") else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.25] = -100
    if case.get("all_masked"):
        labels[:] = -100
    ref_hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    ref_weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    out = {"hidden": hidden, "weight": weight, "labels": labels, "ref_hidden": ref_hidden, "ref_weight": ref_weight}
    if bias is not None:
        out["bias"] = bias
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items()}


def kwargs_of(case: dict) -> dict:
    kw = dict(case.get("options", {}))
    kw["reduction"] = case.get("reduction", "mean")
    if "transform" in case:
        kw["transform"] = dft.LogitTransform(**case["transform"])
    if "num_items" in case:
        kw["num_items_in_batch"] = case["num_items"]
    return kw


def reference(case: dict, d: dict) -> dict:
    """Full logits in float64 through the independent reference of tests/helpers/reference.py."""
    hidden, weight = (d[k].to(torch.float64, copy=True).requires_grad_() for k in ("hidden", "weight"))
    bias = d["bias"].to(torch.float64, copy=True).requires_grad_() if "bias" in d else None
    logits = ref_transform(F.linear(hidden, weight, bias), **case.get("transform", {}))
    kw = {**case.get("options", {}), "reduction": case.get("reduction", "mean")}
    kw["num_items_in_batch"] = case.get("num_items")
    ref_logits = F.linear(d["ref_hidden"].double(), d["ref_weight"].double()) if case.get("asft") else None
    if ref_logits is not None:
        kw |= {"ref_logits": ref_logits, "kl_coef": 0.5}
    loss = ref_dft_loss(logits, d["labels"], **kw)
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * up).sum().backward()
    return {
        "loss": loss.detach(),
        "stats": ref_stat_sums(logits.detach(), d["labels"], ref_logits) if case.get("stats") else None,
        "dh": hidden.grad,
        "dw": weight.grad,
        "db": None if bias is None else bias.grad,
    }


def single_process(case: dict, d: dict) -> dict:
    """The same call on one rank with the whole weight (the in-dtype baseline for low precision)."""
    hidden = d["hidden"].clone().requires_grad_()
    weight = d["weight"].clone().requires_grad_()
    kw = kwargs_of(case)
    if case.get("asft"):
        kw |= {"ref_hidden": d["ref_hidden"], "ref_weight": d["ref_weight"], "kl_coef": 0.5}
    loss, stats = dft.linear_dft_loss(
        hidden, weight, d["labels"], chunk_size=case.get("chunk_size"), return_stats=True, **kw
    )
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * up).sum().backward()
    return {
        "loss": loss.detach().double(),
        "stats": stats.pack().double(),
        "dh": hidden.grad.double(),
        "dw": weight.grad.double(),
    }


def fused(case: dict, d: dict, mesh) -> dict:
    rank = dist.get_rank()
    hidden = d["hidden"].clone().requires_grad_()
    full_w = d["weight"].clone()
    kw = kwargs_of(case)
    bias = None
    if case.get("local"):  # Megatron-style: this rank's rows and a VocabShard
        rows = torch.arange(V).chunk(2)[rank]
        weight = full_w[rows].clone().requires_grad_()
        kw["vocab_shard"] = VocabShard(offset=int(rows[0]), vocab_size=V)
        param = weight
    elif case.get("colwise"):  # torch's own tensor parallel API on an nn.Linear head
        head = torch.nn.Linear(H, V, bias=False, dtype=full_w.dtype)
        head.weight.data.copy_(full_w)
        parallelize_module(head, mesh, ColwiseParallel())
        weight = param = head.weight
    else:
        weight = param = torch.nn.Parameter(distribute_tensor(full_w, mesh, [Shard(0)]))
        if "bias" in d:
            bias = torch.nn.Parameter(distribute_tensor(d["bias"].clone(), mesh, [Shard(0)]))
    if case.get("asft"):
        ref_w = d["ref_weight"]
        if case["asft"] == "dtensor":
            ref_w = distribute_tensor(ref_w, mesh, [Shard(0)])
        kw |= {"ref_hidden": d["ref_hidden"], "ref_weight": ref_w, "kl_coef": 0.5}
    loss, stats = dft.linear_dft_loss(
        hidden, weight, d["labels"], bias=bias, chunk_size=case.get("chunk_size"), return_stats=True, **kw
    )
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * up).sum().backward()
    grad_w = param.grad
    is_dtensor = isinstance(grad_w, DTensor)
    out = {
        "loss": loss.detach().double(),
        "stats": stats.pack().double() if case.get("stats") else None,
        "dh": hidden.grad.double(),
        "dw_local": (grad_w.to_local() if is_dtensor else grad_w).double(),
        "dw_placements": str(grad_w.placements) if is_dtensor else "local",
        "dw_local_shape": tuple((grad_w.to_local() if is_dtensor else grad_w).shape),
        "rows": torch.arange(V).chunk(2)[rank],
    }
    if bias is not None:
        out["db_local"] = bias.grad.to_local().double()
    return out


def colwise_causal_lm(mesh) -> dict:
    """``causal_lm_loss`` on a Llama whose ``lm_head`` went through torch's ``parallelize_module(...,
    ColwiseParallel())`` (its input hook makes the head's input a ``Replicate()`` DTensor) vs the same model
    unsharded in this process: loss, this rank's head rows, the embedding and a backbone gradient."""
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    whole = LlamaForCausalLM(config).double()
    sharded = LlamaForCausalLM(config).double()
    sharded.load_state_dict(whole.state_dict())
    parallelize_module(sharded, mesh, {"lm_head": ColwiseParallel()})
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :2] = -100
    batch = {"input_ids": ids, "labels": labels}
    dft.causal_lm_loss(whole, batch).loss.backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = dft.causal_lm_loss(sharded, batch).loss
        loss.backward()
    rows = torch.arange(V).chunk(2)[dist.get_rank()]
    head = sharded.lm_head.weight.grad
    return {
        "warnings": [str(w.message) for w in caught if "dft" in str(w.message)],
        "loss": (loss.detach() - whole_loss(whole, batch)).abs().item(),
        "head_local_shape": tuple(head.to_local().shape),
        "head": (head.to_local() - whole.lm_head.weight.grad[rows]).abs().max().item(),
        "embed": (sharded.model.embed_tokens.weight.grad - whole.model.embed_tokens.weight.grad).abs().max().item(),
        "mlp": (sharded.model.layers[0].mlp.up_proj.weight.grad - whole.model.layers[0].mlp.up_proj.weight.grad)
        .abs()
        .max()
        .item(),
    }


def whole_loss(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return dft.causal_lm_loss(model, batch).loss


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    results = {}
    for name, case in CASES.items():
        d = data(case, case.get("dtype", torch.float64))
        try:
            results[name] = {
                "fused": fused(case, d, mesh),
                "ref": reference(case, d),
                "single": single_process(case, d),
            }
        except Exception as e:  # noqa: BLE001 - recorded for the test to show
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    try:
        results["colwise-causal-lm"] = colwise_causal_lm(mesh)
    except Exception as e:  # noqa: BLE001 - recorded for the test to show
        results["colwise-causal-lm"] = {"error": f"{type(e).__name__}: {e}"}
    # a local shard whose labels differ across ranks (a data-parallel group by mistake) -> ValueError
    d = data({}, torch.float64)
    labels = d["labels"].clone()
    labels[0, 0] = dist.get_rank()
    try:
        dft.linear_dft_loss(
            d["hidden"], d["weight"][:12], labels, vocab_shard=VocabShard(offset=12 * dist.get_rank(), vocab_size=24)
        )
        results["different-rows"] = {"error": None}
    except ValueError as e:
        results["different-rows"] = {"error": str(e)}
    # local shards that overlap, leave a gap, or hidden states that differ across the group
    rank = dist.get_rank()
    hidden_other = d["hidden"] + rank  # same labels, different hidden
    for name, offset, rows, hidden in (
        ("overlap", 0, 12, d["hidden"]),
        ("gap", 0 if rank == 0 else 13, 12 if rank == 0 else 10, d["hidden"]),
        ("different-hidden", 12 * rank, 12 if rank == 0 else 11, hidden_other),
    ):
        try:
            shard = VocabShard(offset=offset, vocab_size=V)
            dft.linear_dft_loss(hidden, d["weight"][offset : offset + rows], d["labels"], vocab_shard=shard)
            results[name] = {"error": None}
        except ValueError as e:
            results[name] = {"error": str(e)}
    # the issue's reproduction: W.to_local() passed as the whole head, every label inside rank 0's shard
    weight = torch.nn.Parameter(distribute_tensor(d["weight"], mesh, [Shard(0)]))
    try:
        dft.linear_dft_loss(d["hidden"], weight.to_local(), d["labels"].clamp(max=10))
        results["bare-local"] = {"error": None}
    except ValueError as e:
        results["bare-local"] = {"error": str(e)}
    # a DTensor weight with a plain [V] bias: one clear error, not a shape error from addmm
    try:
        dft.linear_dft_loss(d["hidden"], weight, d["labels"], bias=torch.zeros(V, dtype=torch.float64))
        results["plain-bias"] = {"error": None}
    except ValueError as e:
        results["plain-bias"] = {"error": str(e)}
    torch.save(results, out_dir / f"vocab_rank{dist.get_rank()}.pt")
    dist.barrier()
    exit_without_teardown()


if __name__ == "__main__":
    main()
