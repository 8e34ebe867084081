"""GPU-only checks of the fused head (skipped without CUDA): what CPU runs cannot show.

On a GPU machine::

    python -m pytest -q tests/test_cuda.py -rA
    python benchmarks/lm_head.py --device cuda --dtypes bfloat16 --h 1536 --v 151936 --n 8192 \\
        --cases naive torch_ce dft floor

* the in-place ``addmm(out_dtype=float32)`` probe and the dW path for bf16 and fp16 (no ``[V, H]``
  float32 temporary per chunk);
* bf16 and fp16 fused vs the materialised path of the same dtype, against float64 (relative-norm error budget);
* the compiled (Triton) epilogue == the eager one, in bf16;
* peak ``torch.cuda.max_memory_allocated`` of ``linear_dft_loss`` at a Qwen2.5-1.5B head vs what
  ``benchmarks/roofline.py`` predicts for the same call (after a warm-up call);

Warnings of the library (a compile failure, a dW fallback) fail these tests; ROCm is skipped.
* one ``DFTTrainer`` step in bf16 on the fused head.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dft
from dft import epilogue, fused

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        torch.version.hip is not None, reason="ROCm: hipBLAS has no in-place out_dtype GEMM checked here"
    ),
    pytest.mark.filterwarnings("error::RuntimeWarning"),  # a compile failure or a dW fallback fails the test itself
]
ROOT = Path(__file__).resolve().parents[1]


def _data(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(v, h, device="cuda", generator=g) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[torch.rand(n, device="cuda", generator=g) < 0.2] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dw_accumulates_in_place_on_cuda(dtype):
    device = torch.device("cuda")
    assert fused._addmm_out_dtype(device, dtype), "cuBLAS addmm(out_dtype=float32) probe failed on this GPU"
    assert fused.dw_update_path(device, dtype) == "addmm_out_dtype"


def _grads(hidden, weight, labels, fn):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w)
    loss.backward()
    return loss.double(), h.grad.double(), w.grad.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_fused_within_the_materialised_error(dtype):
    hidden, weight, labels = _data(2048, 256, 32003, dtype)
    exact = _grads(hidden.double(), weight.double(), labels, lambda h, w: dft.dft_loss(F.linear(h, w), labels))
    naive = _grads(hidden, weight, labels, lambda h, w: dft.dft_loss(F.linear(h, w), labels))
    got = _grads(hidden, weight, labels, lambda h, w: dft.linear_dft_loss(h, w, labels))
    for name, e, n, g in zip(("loss", "dh", "dW"), exact, naive, got):
        # relative norms: fp16's materialised gradients underflow, so a max-abs budget would be ~max|exact|
        budget = 2 * ((n - e).norm() / e.norm()).item() + 1e-3
        assert ((g - e).norm() / e.norm()).item() <= min(budget, 5e-2), (name, budget)


def test_compiled_epilogue_equals_eager_in_bf16(monkeypatch):
    hidden, weight, labels = _data(4096, 256, 50000, torch.bfloat16)
    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("DFT_COMPILE_EPILOGUE", mode)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, stats = dft.linear_dft_loss(h, w, labels, return_stats=True, softcap=30.0)
        loss.backward()
        out[mode] = (loss.double(), stats.pack().double(), h.grad.double(), w.grad.double())
    assert epilogue._compiled is not None and not epilogue._compile_failed
    for eager, compiled in zip(out["0"], out["1"]):
        torch.testing.assert_close(compiled, eager, atol=2e-2 * eager.abs().max().item() + 1e-6, rtol=2e-2)


def _roofline():
    spec = importlib.util.spec_from_file_location("roofline", ROOT / "benchmarks" / "roofline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["roofline"] = module
    spec.loader.exec_module(module)
    return module


def test_peak_memory_matches_the_roofline_model():
    """Qwen2.5-1.5B head (H=1536, V=151936), N=8192 bf16 with stats: the measured peak beyond the inputs is
    within 25% of benchmarks/roofline.py's prediction (which assumes an 80 GB card's chunk budget)."""
    roofline = _roofline()
    predicted = roofline.model_case("qwen2.5-1.5b", "stats", masked=False)["peak_extra_gb"] * 1e9
    hidden, weight, labels = _data(8192, 1536, 151936, torch.bfloat16)
    labels.fill_(1)  # every row supervised, as in the modelled case
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    budget = fused.budget_for_memory(80 * 10**9)
    original = fused.chunk_budget_bytes
    fused.chunk_budget_bytes = lambda device: budget
    try:
        warm_h, warm_w = hidden[:256].clone().requires_grad_(), weight.clone().requires_grad_()
        dft.linear_dft_loss(warm_h, warm_w, labels[:256], return_stats=True)[0].backward()  # cuBLAS workspaces,
        del warm_h, warm_w  # the compile: outside the measured window
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, _ = dft.linear_dft_loss(h, w, labels, return_stats=True)
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    finally:
        fused.chunk_budget_bytes = original
    assert peak <= 1.25 * predicted, (peak / 1e9, predicted / 1e9)


def test_trainer_step_in_bf16_uses_the_fused_head(tmp_path):
    from datasets import Dataset
    from transformers import default_data_collator

    from dft.toy import toy_model

    model = toy_model(hidden_size=64).cuda()
    ids = torch.randint(0, model.config.vocab_size, (8, 32))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = dft.DFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        bf16=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = dft.DFTTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    with _NoDftWarning():  # the fused head ran (the logits path warns)
        trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)


class _NoDftWarning:
    """Records warnings; fails if any came from dft (e.g. the logits-path fallback)."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        dft_warnings = [str(w.message) for w in self._caught if str(w.message).startswith("dft:")]
        assert not dft_warnings, dft_warnings
        return False
