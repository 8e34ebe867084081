"""Context parallelism (torch's ring attention through accelerate ``ParallelismConfig(cp_size=...)`` + FSDP2).

Each torchrun case (tests/dist/cp_cases.py) trains 2 optimizer steps in float64 and compares the
parameters with one process on the global batch (full attention); it also checks that the sequence was
really sharded (the embedding saw half the length), that torch's ring attention ran forward and backward
(tests/dist/cp_shim.py adds the CPU kernel to it), and that the fused head ran (no ``dft:`` warning).
The plain loop also tries the two mistakes the recipe of :func:`dft.global_num_items` documents.
"""

import sys
from pathlib import Path

import accelerate
import pytest
import torch
import transformers
from packaging.version import Version

import dft
from dft.labels import in_context_parallel as _in_context_parallel
from tests.dist.cp_cases import build_model, rows, single_process
from tests.dist.launch import run_bounded

WORKER = Path(__file__).parent / "dist" / "cp_worker.py"


def _skip_without_cp() -> None:
    if Version(accelerate.__version__) < Version("1.11"):
        pytest.skip("accelerate < 1.11's FSDP plugin refuses a machine without GPUs (even with the CPU shim)")
    if not hasattr(transformers.Trainer, "_prepare_context_parallel_inputs"):
        pytest.skip(f"transformers {transformers.__version__}'s Trainer has no context parallelism")
    pytest.importorskip("torch.distributed.tensor.experimental._context_parallel._attention")


def _torchrun(out_dir: Path, case: str, ranks: int) -> dict:
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), str(WORKER)]
    run_bounded([sys.executable, *cmd, str(out_dir), case], timeout=180)
    return torch.load(out_dir / "cp.pt")


def _assert_equals_single_process(got: dict, mesh: dict) -> None:
    assert got["mesh"] == mesh
    assert got["warnings"] == []  # the fused head ran: the logits path warns
    assert got["seq_lengths"] == [rows()["input_ids"].shape[1] // mesh["cp"]]  # each rank saw its shard only
    assert got["ring_calls"]["forward"] > 0 and got["ring_calls"]["backward"] > 0
    expected = single_process()
    start = dict(build_model().named_parameters())
    assert sorted(got["params"]) == sorted(expected)
    moved = 0.0
    for name, p in expected.items():
        assert got["params"][name].dtype == torch.float64
        torch.testing.assert_close(got["params"][name], p, atol=1e-6, rtol=0, msg=name)
        moved = max(moved, (p - start[name]).abs().max().item())
    assert moved > 1e-3  # two real steps


def test_trainer_context_parallel_equals_single_process(tmp_path):
    """DFTTrainer + DFTConfig(fsdp=..., fsdp_config={"version": 2}, parallelism_config=ParallelismConfig(cp_size=2))."""
    _skip_without_cp()
    _assert_equals_single_process(_torchrun(tmp_path, "trainer-cp2", 2), {"cp": 2})


def test_trainer_context_and_data_parallel_equals_single_process(tmp_path):
    """2-D: ParallelismConfig(cp_size=2, dp_shard_size=2) on 4 ranks (FSDP2 over dp_shard x cp)."""
    _skip_without_cp()
    _assert_equals_single_process(_torchrun(tmp_path, "trainer-cp2-dp2", 4), {"dp_shard": 2, "cp": 2})


def test_plain_loop_recipe_equals_single_process_and_mistakes_raise(tmp_path):
    """accelerate loop: shift_labels sharded, global_num_items inside maybe_context_parallel -> exact;
    counting outside the context (0.5x gradients) and sharding unshifted labels raise ValueError."""
    _skip_without_cp()
    got = _torchrun(tmp_path, "loop-cp2", 2)
    assert got["fused"] == [True] * 4
    _assert_equals_single_process(got, {"cp": 2})
    mistakes = got["mistakes"]
    assert "cp_size=2" in mistakes["early_count"] and "outside the context-parallel context" in mistakes["early_count"]
    assert "0.5x gradients" in mistakes["early_count"]
    assert mistakes["unshifted_loss"].startswith("batch['labels']: unshifted labels inside a context-parallel")
    assert mistakes["unshifted_count"].startswith("global_num_items(labels tensor, shift=True) (for shift_labels")
    assert "unshifted labels inside a context-parallel context" in mistakes["unshifted_count"]
    assert "shift_labels" in mistakes["unshifted_loss"]


def test_count_outside_the_context_with_cp_configured_raises(monkeypatch):
    """accelerate's (process-wide) state says cp_size=2 and no CP context is on: the count is refused;
    without a ParallelismConfig, or with cp_size=1, the same call counts (no false alarm)."""
    ParallelismConfig = pytest.importorskip("accelerate.parallelism_config").ParallelismConfig  # noqa: N806
    from accelerate.state import AcceleratorState

    batch = {k: v[:2] for k, v in rows().items()}
    expected = int((dft.causal_targets(batch) != -100).sum())
    assert not _in_context_parallel()
    monkeypatch.setitem(AcceleratorState._shared_state, "parallelism_config", None)
    assert dft.global_num_items(batch).item() == expected
    monkeypatch.setitem(AcceleratorState._shared_state, "parallelism_config", ParallelismConfig(cp_size=1))
    assert dft.global_num_items(batch).item() == expected
    monkeypatch.setitem(AcceleratorState._shared_state, "parallelism_config", ParallelismConfig(cp_size=2))
    with pytest.raises(ValueError, match=r"cp_size=2, but this is called outside the context-parallel context"):
        dft.global_num_items(batch)
    assert dft.causal_targets(batch).shape == batch["labels"].shape  # the loss's targets: CP is not on here
