"""The fused head on a vocabulary-sharded weight (tensor parallel), 2 CPU ranks (gloo).

``tests/dist/vocab_worker.py``: ``linear_dft_loss`` on a ``Shard(0)`` DTensor weight, on torch's
``ColwiseParallel`` head and on a local block with a ``dft.VocabShard``, against the float64
full-logits reference (values, stats, ``dh``, this rank's ``dW`` rows, ``db``), V = 23 split 12 / 11.
``tests/dist/trainer_worker.py`` with the ``tp`` cases: ``DFTTrainer`` on a model loaded with
``from_pretrained(..., tp_plan="auto")`` (Trainer builds ``ParallelismConfig(tp_size=2)`` itself).
"""

from __future__ import annotations

import sys
from pathlib import Path

import accelerate
import pytest
import torch
import transformers
from packaging.version import Version

import dft
from dft import VocabShard
from tests.dist.engine_cases import ROWS_PER_STEP, loss_rows, reference_kwargs
from tests.dist.launch import run_bounded
from tests.dist.tp_cases import CASES as TP_CASES
from tests.dist.tp_cases import models, single_process

VOCAB_WORKER = Path(__file__).parent / "dist" / "vocab_worker.py"
CASES = (
    "dtensor-mean",
    "dtensor-stats-softcap",
    "dtensor-bias-floor",
    "dtensor-sum",
    "dtensor-none",
    "dtensor-num-items",
    "dtensor-eaft",
    "dtensor-eaft-k-over-vocab",
    "dtensor-asft",
    "dtensor-asft-whole-ref",
    "dtensor-chunks",
    "dtensor-all-masked",
    "local-shard",
    "colwise-module",
    "bf16",
)


@pytest.fixture(scope="module")
def vocab_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("vocab")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(VOCAB_WORKER)]
    run_bounded([*cmd, str(out)], timeout=180)
    return [torch.load(out / f"vocab_rank{r}.pt", weights_only=False) for r in (0, 1)]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rank", (0, 1))
def test_vocab_parallel_head_matches_float64_full_logits(vocab_results, case, rank):
    result = vocab_results[rank][case]
    assert "error" not in result, result.get("error")
    fused, ref, single = result["fused"], result["ref"], result["single"]
    rows = fused["rows"]
    assert fused["dw_local_shape"] == (len(rows), 16)  # the accumulator is this rank's [V/tp, H] shard
    if fused["dw_placements"] != "local":
        assert fused["dw_placements"] == "(Shard(dim=0),)"
    pairs = [("loss", ref["loss"], single["loss"]), ("dh", ref["dh"], single["dh"])]
    pairs.append(("dw_local", ref["dw"][rows], single["dw"][rows]))
    if fused["stats"] is not None:
        pairs.append(("stats", ref["stats"], single["stats"]))
    if "db_local" in fused:
        pairs.append(("db_local", ref["db"][rows], None))
    for key, want, baseline in pairs:
        got = fused[key]
        if case == "bf16":  # error budget: no worse than the same call on one rank with the whole weight
            assert _err(got, want) <= 1.5 * _err(baseline, want) + 1e-3, key
            assert _err(got, baseline) <= 2e-2 * (1 + want.abs().max().item()), key
        else:
            tol = 1e-5 if key == "stats" else 1e-12  # stats are float32 sums
            assert _err(got, want) <= tol * (1 + want.abs().max().item()), (key, _err(got, want))
    if case == "dtensor-all-masked":
        assert fused["loss"] == 0 and not fused["dh"].any()


@pytest.mark.parametrize("rank", (0, 1))
def test_causal_lm_loss_on_a_colwise_parallel_head_equals_the_whole_model(vocab_results, rank):
    """torch's ``parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})``: fused (no warning), loss and
    gradients equal to the unsharded model; the head's gradient is this rank's rows only."""
    result = vocab_results[rank]["colwise-causal-lm"]
    assert "error" not in result, result.get("error")
    assert result["warnings"] == []
    assert result["head_local_shape"] == ((12, 16) if rank == 0 else (11, 16))
    for key in ("loss", "head", "embed", "mlp"):
        assert result[key] <= 1e-12, (key, result[key])


def test_different_rows_on_the_vocab_group_is_refused(vocab_results):
    for rank in (0, 1):
        error = vocab_results[rank]["different-rows"]["error"]
        assert error is not None and "same labels" in error


@pytest.mark.parametrize(
    ("case", "message"), [("overlap", "an overlap"), ("gap", "a gap"), ("different-hidden", "hidden")]
)
def test_inconsistent_vocab_group_is_refused(vocab_results, case, message):
    """Shards that overlap or leave a gap, or hidden states that differ over the group: refused, never a wrong loss."""
    for rank in (0, 1):
        error = vocab_results[rank][case]["error"]
        assert error is not None and message in error, error


def test_bare_local_shard_of_a_dtensor_is_refused(vocab_results):
    """``linear_dft_loss(hidden, W.to_local(), labels)``: a softmax over half the vocabulary, refused."""
    for rank in (0, 1):
        error = vocab_results[rank]["bare-local"]["error"]
        assert error is not None and "local shard of a DTensor" in error and "VocabShard" in error


def test_plain_bias_with_a_dtensor_weight_is_refused(vocab_results):
    for rank in (0, 1):
        error = vocab_results[rank]["plain-bias"]["error"]
        assert error is not None and "bias is a plain tensor" in error and "distribute_tensor" in error, error


def test_vocab_shard_is_validated():
    with pytest.raises(ValueError, match="offset"):
        VocabShard(offset=30, vocab_size=23)
    with pytest.raises(ValueError, match="vocab_size"):
        VocabShard(offset=0, vocab_size=-1)
    with pytest.raises(ValueError, match="process group"):  # no torch.distributed here
        dft.linear_dft_loss(
            torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3]), vocab_shard=VocabShard(0, 10)
        )


def test_local_shard_without_vocab_shard_names_it_when_labels_exceed():
    """A local shard passed as if it were the whole head: labels beyond it raise and point to vocab_shard."""
    with pytest.raises(ValueError, match="vocab_shard"):
        dft.linear_dft_loss(torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 7, 3]))


TP_WORKER = Path(__file__).parent / "dist" / "tp_worker.py"


@pytest.mark.parametrize("case", TP_CASES)
def test_trainer_with_tp_plan_auto_equals_single_process(tmp_path, case):
    """DFTTrainer on ``from_pretrained(..., tp_plan="auto")``: fused (no warning), float64 update == one process."""
    if Version(transformers.__version__) < Version("5") or Version(accelerate.__version__) < Version("1.12"):
        pytest.skip(
            "Trainer's tensor parallel (DTensor tp_plan + ParallelismConfig) needs transformers 5, accelerate 1.12"
        )
    ranks = 4 if case.startswith("tp2-fsdp2") else 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    run_bounded([*cmd, str(TP_WORKER), str(tmp_path), case], timeout=300)
    got = torch.load(tmp_path / "trainer.pt", weights_only=False)
    assert got["warnings"] == []  # the logits path warns
    assert (got["engine"], got["tp_size"]) == ("fsdp2" if ranks == 4 else "tensor-parallel", 2)
    if ranks == 2:  # the head's gradient: rank 0's [12, H] block of the Shard(0) weight (V = 23 = 12 + 11)
        assert got["head_grads"] and {g[:2] for g in got["head_grads"]} == {("DTensor", "(Shard(dim=0),)")}
        assert {tuple(g[2]) for g in got["head_grads"]} == {(12, 32)}
    expected = single_process(case)
    start = dict(models(case)[0].named_parameters())
    assert sorted(got["params"]) == sorted(expected)
    moved = 0.0
    for name, p in expected.items():
        torch.testing.assert_close(got["params"][name], p, atol=1e-6, rtol=0, msg=name)
        moved = max(moved, (p - start[name]).abs().max().item())
    assert moved > 1e-3  # two real steps
    first = {k: v[:ROWS_PER_STEP] for k, v in loss_rows(case).items()}
    model, ref = models(case)
    kw = reference_kwargs(case, ref and ref.eval())
    assert got["logs"][0]["loss"] == pytest.approx(dft.causal_lm_loss(model, first, **kw).loss.item(), rel=1e-6)
