"""The fused head under every engine, launched the way users launch it (2 CPU ranks, gloo).

Each case runs ``DFTTrainer`` for 2 optimizer steps (2 ranks x 2 accumulation steps) with the
engine configured through ``DFTConfig`` (``deepspeed=``, ``fsdp_config`` version 2 through
accelerate's own FSDP2 preparation, plain DDP) and compares the parameters with one process on the
global batch, and checks that the fused head ran (no logits-path warning) and how the engine held
the head. See tests/dist/engine_cases.py for the cases.
"""

import os
import re
import sys
from pathlib import Path

import accelerate
import pytest
import torch
from packaging.version import Version

import dft
from dft.engines import detect_engine, unwrap_model
from dft.models import inspect_causal_lm
from tests.dist.engine_cases import CASES, ROWS_PER_STEP, build_model, has_reference, rows, single_process
from tests.dist.launch import run_bounded, torchrun

TRAINER_WORKER = Path(__file__).parent / "dist" / "trainer_worker.py"


class DeepSpeedEngine(torch.nn.Module):
    """Stands in for deepspeed's engine (a module wrapper with its own, non-HF ``config``)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.config = {"zero_optimization": {"stage": 2}}  # a dict: reading it as the HF config crashed

    def forward(self, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        return self.module(**kwargs)


def test_deepspeed_engine_is_unwrapped_and_its_config_never_read():
    model = build_model("zero2")
    engine = DeepSpeedEngine(model)
    assert unwrap_model(engine) is model
    assert detect_engine(engine).name == "deepspeed"
    batch = {k: v[:ROWS_PER_STEP] for k, v in rows("zero2").items()}
    out = dft.causal_lm_loss(engine, batch)
    assert out.fused and engine.calls == 1  # through the engine's forward
    torch.testing.assert_close(out.loss, dft.causal_lm_loss(model, batch, fused=False).loss)


def test_model_without_logits_to_keep_runs_through_the_wrapper():
    """The wrapper's forward runs (DDP arms its reducer there), the head sees one position only."""
    model = build_model("ddp-nokeep")
    wrapper = DeepSpeedEngine(model)
    seen = []
    forward = model.lm_head.forward  # a wrapper, not a hook: a user's hook on the head means the logits path
    model.lm_head.forward = lambda x: (seen.append(x.shape[1]), forward(x))[1]
    batch = {k: v[:ROWS_PER_STEP] for k, v in rows("ddp-nokeep").items()}
    out = dft.causal_lm_loss(wrapper, batch)
    assert out.fused and wrapper.calls == 1 and seen == [1]
    ref = dft.causal_lm_loss(build_model("ddp-nokeep"), batch, fused=False)
    torch.testing.assert_close(out.loss, ref.loss)


def test_config_inspection_is_cached_and_follows_changes():
    model = build_model("zero2")
    parts, _ = inspect_causal_lm(model)
    assert parts.transform.softcap is None
    model.config.final_logit_softcapping = 5.0
    assert inspect_causal_lm(model)[0].transform.softcap == 5.0
    model.config.my_logit_scale = 2.0  # unknown head transform: logits path
    assert inspect_causal_lm(model)[0] is None


EXPECTED = {  # (engine adapter, how the engine holds the head)
    "zero2": ("deepspeed", "whole"),
    "zero3": ("deepspeed-zero3", "partitioned"),
    "zero3-asft": ("deepspeed-zero3", "partitioned"),
    "fsdp2-tied-reshard": ("fsdp2", "own FSDP2 unit"),
    "fsdp2-untied-reshard": ("fsdp2", "own FSDP2 unit"),
    "fsdp2-tied-keep": ("fsdp2", "own FSDP2 unit"),
    "fsdp2-untied-keep": ("fsdp2", "own FSDP2 unit"),
    "fsdp2-untied-reshard-asft": ("fsdp2", "own FSDP2 unit"),
    "zero3-nft": ("deepspeed-zero3", "partitioned"),
    "fsdp2-untied-reshard-nft": ("fsdp2", "own FSDP2 unit"),
    "ddp-nokeep": ("ddp", "whole"),
    "moe": ("ddp", "whole"),
}


def _skip_if_unavailable(engine: str) -> None:
    if engine.startswith("zero") or engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    if engine.startswith("fsdp2") and Version(accelerate.__version__) < Version("1.11"):
        pytest.skip("accelerate < 1.11's FSDP plugin refuses a machine without GPUs (even with the CPU shim)")


@pytest.mark.parametrize("case", CASES)
def test_trainer_engine_equals_single_process(tmp_path, case):
    _skip_if_unavailable(case)
    got = torchrun(TRAINER_WORKER, tmp_path, case, result="trainer.pt")
    assert got["warnings"] == []  # the fused head ran: the logits path warns
    assert (got["engine"], got["head"]) == EXPECTED[case]
    if has_reference(case):  # ASFT's reference and NFT's pi_old are sharded like the policy
        assert got["ref_engine"] == EXPECTED[case][0]
    expected = single_process(case)
    start = dict(build_model(case).named_parameters())
    assert sorted(got["params"]) == sorted(expected)
    moved = 0.0
    for name, p in expected.items():
        torch.testing.assert_close(got["params"][name], p, atol=1e-6, rtol=1e-5, msg=name)
        moved = max(moved, (p - start[name]).abs().max().item())
    assert moved > 1e-3  # two real steps
    if case == "moe":  # logged aux_loss: the router loss of the batch (mean over micro-batches and ranks)
        first = {k: v[:ROWS_PER_STEP] for k, v in rows(case).items()}
        aux = dft.causal_lm_loss(build_model(case), first).aux_loss.item()
        assert got["logs"][0]["aux_loss"] == pytest.approx(aux, rel=1e-5)


YAMLS = {  # config -> (engine the example reports, ranks it runs on here)
    "ddp.yaml": ("ddp", 2),
    "fsdp2.yaml": ("fsdp2", 2),
    # On a machine without GPUs accelerate gives DeepSpeed no process-group backend, so these run one
    # rank (DeepSpeed's engine, hooks and ZeRO-3 partitioning still apply); 2-rank DeepSpeed exactness is
    # test_trainer_engine_equals_single_process above.
    "deepspeed_zero2.yaml": ("deepspeed", 1),
    "deepspeed_zero3.yaml": ("deepspeed-zero3", 1),
}


@pytest.mark.parametrize("config", sorted(YAMLS))
def test_shipped_accelerate_configs_run_the_fused_head(config):
    """`accelerate launch --config_file examples/accelerate/<config> examples/accelerate_train.py` as users run it."""
    engine, ranks = YAMLS[config]
    _skip_if_unavailable(engine)
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": f"{root / 'tests' / 'dist' / 'cpu_site'}{os.pathsep}{root}", "DFT_TEST_CPU_FSDP": "1"}
    if ranks == 2:
        env["ACCELERATE_USE_CPU"] = "true"  # gloo ranks (`--cpu` would start one process)
    # this interpreter's accelerate (`python -m`), not whichever `accelerate` is first on PATH
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"examples/accelerate/{config}"]
    if ranks == 1:
        cmd += ["--num_processes", "1"]
    output = run_bounded([*cmd, "examples/accelerate_train.py", "4"], env=env)
    assert f"engine: {engine}" in output
    assert "dft:" not in output  # no logits-path warning
    steps = re.findall(r"step +(\d+) \| ranks (\d) \| ce ([0-9.]+)", output)
    assert [(s, r) for s, r, _ in steps] == [("0", str(ranks)), ("3", str(ranks))], output[-2000:]
    assert float(steps[1][2]) < float(steps[0][2])
