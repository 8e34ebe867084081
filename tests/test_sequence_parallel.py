"""Ulysses sequence parallelism (DeepSpeed ALST) through ``DFTTrainer``, launched as users launch it (2 CPU ranks).

``DFTConfig(deepspeed=..., parallelism_config=ParallelismConfig(sp_size=2, sp_backend="deepspeed", ...))``:
Trainer's ``UlyssesSPDataLoaderAdapter`` gives each rank half of every sequence (``shift_labels``, no
``labels``). After 2 optimizer steps the parameters equal one process on the global batch, the fused head
ran, the logged loss and statistics are those of the global batch, and so are ``evaluate()``'s after
training. See tests/dist/sp_cases.py.

The unit tests below need neither DeepSpeed nor a sequence-parallel accelerate: they pin the factors
``DFTTrainer`` derives from DeepSpeed's reduction (the class docstring of ``dft.trainer._TrainerTouchPoints``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dft
from tests.helpers.tiny_models import tiny_model

WORKER = Path(__file__).parent / "dist" / "sp_worker.py"
SP_CASES = ("sp2-zero2", "sp2-zero3", "sp2-zero3-allreduce", "sp2-zero2-logits")
# DeepSpeed sums the SP ranks' gradients (ZeRO-2, ZeRO-3's contiguous all-reduce) or averages them (ZeRO-3's
# default reduce-scatter): what DFTTrainer._sp_ranks_summed must find on each case
SUMMED = {"sp2-zero2": 2, "sp2-zero3": 1, "sp2-zero3-allreduce": 2, "sp2-zero2-logits": 2}


def _sp_unavailable() -> str | None:
    """Why Ulysses SP through Trainer cannot run here (None: it can)."""
    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (pip install deepspeed)"
    import accelerate
    from transformers import Trainer

    if "sp_size" not in getattr(getattr(accelerate, "ParallelismConfig", None), "__dataclass_fields__", {}):
        return f"accelerate {accelerate.__version__}'s ParallelismConfig has no sp_size (Ulysses SP)"
    try:
        from accelerate.utils import DeepSpeedSequenceParallelConfig  # noqa: F401
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter  # noqa: F401
    except ImportError as e:
        return f"no Ulysses SP in this accelerate/DeepSpeed: {e}"
    if not hasattr(Trainer, "get_sp_size"):
        return "this transformers' Trainer has no sequence parallelism"
    return None


@pytest.mark.parametrize("case", SP_CASES)
def test_sequence_parallel_trainer_equals_single_process(tmp_path, case):
    reason = _sp_unavailable()
    if reason:
        pytest.skip(reason)
    from tests.dist.launch import torchrun
    from tests.dist.sp_cases import SP, build_model, rows, single_process

    try:
        got = torchrun(WORKER, tmp_path, case, result="trainer.pt")
    except AssertionError as e:  # transformers >= 5.25 refuses this configuration on deepspeed < 0.20.2
        if case.endswith("-allreduce") and "requires `reduce_scatter: true`" in str(e):
            pytest.skip("this transformers refuses ZeRO-3 reduce_scatter: false under SP on deepspeed < 0.20.2")
        raise
    assert got["warnings"] == []  # the fused head ran (the logits path warns unless asked for, as in -logits)
    assert got["engine"] == ("deepspeed-zero3" if "zero3" in case else "deepspeed")
    assert got["sp_ranks_summed"] == SUMMED[case]
    width = rows()["input_ids"].shape[1]
    # the loss saw the adapter's slices: pre-shifted targets, no labels, half of each sequence
    assert {(tuple(keys), shape[1]) for keys, shape in got["seen"]} == {
        (("input_ids", "position_ids", "shift_labels"), width // SP)
    }
    expected = single_process()
    start = dict(build_model("zero2").named_parameters())
    assert sorted(got["params"]) == sorted(expected["params"])
    moved = 0.0
    for name, p in expected["params"].items():  # fp32 (DeepSpeed refuses fp64): measured ~4e-9
        torch.testing.assert_close(got["params"][name], p, atol=1e-5, rtol=1e-4, msg=name)
        moved = max(moved, (p - start[name]).abs().max().item())
    assert moved > 3e-3  # two real steps: 2x or 0.5x the update would be off by more than the tolerance
    assert len(got["logs"]) == len(expected["logs"])
    for logged, ref in zip(got["logs"], expected["logs"]):  # the global batch's loss and statistics
        for key, value in ref.items():
            assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for key, value in expected["eval"].items():  # evaluate(): each rank its own rows, whole sequences
        assert got["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


# ---- the factors, without DeepSpeed: a trainer whose accelerator and engine are stand-ins ----


class _Engine:
    """Stands in for DeepSpeed's engine: ``zero_optimization_stage()``, the ZeRO optimizer's reduction
    options, and parameters with ``ds_numel``."""

    def __init__(self, stage: int, reduce_scatter: bool = True, contiguous: bool = True, bucket: int = 10**6):
        self.stage = stage
        self.optimizer = SimpleNamespace(
            reduce_scatter=reduce_scatter, contiguous_gradients=contiguous, reduce_bucket_size=bucket
        )
        self.module = torch.nn.Linear(4, 1000)
        for p in self.module.parameters():
            p.ds_numel = p.numel()

    def zero_optimization_stage(self) -> int:
        return self.stage


def _sp_trainer(engine=None, sp_size: int = 2, num_processes: int = 4, average: bool = True) -> dft.DFTTrainer:
    trainer = dft.DFTTrainer.__new__(dft.DFTTrainer)  # no Trainer.__init__: only what the factors read
    pc = SimpleNamespace(sp_backend="deepspeed", sp_size=sp_size)
    trainer.accelerator = SimpleNamespace(parallelism_config=pc, num_processes=num_processes)
    trainer.args = SimpleNamespace(average_tokens_across_devices=average)
    trainer.model_wrapped = engine
    trainer.get_tp_size = lambda: 1
    return trainer


@pytest.mark.parametrize(
    ("engine", "summed"),
    [
        (_Engine(stage=2), 2),  # stage_1_and_2 divides by world / sp: sums the SP ranks
        (_Engine(stage=3), 1),  # ZeRO-3's reduce_scatter_coalesced divides by world: averages them
        (_Engine(stage=3, reduce_scatter=False), 2),  # its contiguous all-reduce: sums them
        (_Engine(stage=3, reduce_scatter=False, contiguous=False), 1),  # reduce-scatter again
    ],
)
def test_loss_value_and_gradient_factors_follow_deepspeed(engine, summed):
    trainer = _sp_trainer(engine)
    assert trainer._sp_ranks_summed() == summed
    loss = torch.tensor(0.25, requires_grad=True)
    out = trainer._undo_rank_average(loss, torch.tensor(10), training=True)
    out.backward()
    assert out.item() == pytest.approx(0.25 * 4)  # logged: 4 ranks' mean of the returned values
    assert loss.grad.item() == pytest.approx(4 / summed)  # gradient: DeepSpeed divides by 4 / summed
    loss.grad = None
    out = trainer._undo_rank_average(loss, torch.tensor(10), training=False)  # eval: SP attention off
    out.backward()
    assert (out.item(), loss.grad.item()) == pytest.approx((1.0, 4.0))


def test_without_sequence_parallelism_the_factor_is_the_rank_count():
    trainer = _sp_trainer(_Engine(stage=2), sp_size=1)
    loss = torch.tensor(0.25, requires_grad=True)
    trainer._undo_rank_average(loss, torch.tensor(10), training=True).backward()
    assert loss.grad.item() == 4.0


def test_deepspeed_from_0_20_2_sums_sp_ranks_under_zero3(monkeypatch):
    """DeepSpeed >= 0.20.2 scales ZeRO-3's gradients over the SP group (transformers 5.25 reads it so): summed on
    every path, no per-bucket mix to refuse."""
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.20.2" if name == "deepspeed" else real(name))
    for engine in (_Engine(stage=3), _Engine(stage=3, reduce_scatter=False, bucket=1000), _Engine(stage=2)):
        assert _sp_trainer(engine)._sp_ranks_summed() == 2


def test_zero3_mixing_summed_and_averaged_buckets_is_refused():
    trainer = _sp_trainer(_Engine(stage=3, reduce_scatter=False, bucket=1000))  # weight: 4000 elements
    with pytest.raises(ValueError, match="reduce_bucket_size=1000 is smaller than weight"):
        trainer._sp_ranks_summed()


def test_sequence_parallel_needs_tokens_averaged_across_devices():
    with pytest.raises(ValueError, match="average_tokens_across_devices=False"):
        _sp_trainer(average=False)._check_sequence_parallel()
    _sp_trainer(average=False, sp_size=1)._check_sequence_parallel()  # no SP: allowed


def test_batches_with_only_shift_labels_are_counted(tmp_path):
    """The SP loader pops ``labels`` and adds ``shift_labels``: counted as they are (was a KeyError)."""
    from tests.test_trainer import _args, _dataset

    ids = torch.arange(10, 22)[None]
    shift = torch.full_like(ids, -100)
    shift[0, 3:8] = ids[0, 4:9]
    batch = {"input_ids": ids, "shift_labels": shift, "position_ids": torch.arange(12)[None]}
    trainer = dft.DFTTrainer(model=tiny_model("llama"), args=_args(tmp_path), train_dataset=_dataset(2))
    _, n = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert float(n) == 5.0
    assert float(n) == float(dft.causal_lm_loss(trainer.model, batch).stats.num_tokens)
