from pathlib import Path

import pytest
import torch

import dft
from dft.toy import toy_batch, toy_model
from tests.dist.global_batch import LR, global_examples, micro_batches, with_nft_keys
from tests.dist.launch import torchrun

WORKER = Path(__file__).parent / "dist" / "worker.py"
FSDP2_WORKER = Path(__file__).parent / "dist" / "fsdp2_worker.py"


def _torchrun(out_dir: Path, mode: str, worker: Path = WORKER, result: str = "dist.pt") -> dict:
    return torchrun(worker, out_dir, mode, result=result)


def _single_process(packed: bool = False, asft: bool = False, nft: bool = False):
    """One process, the global batch: padded rows in one batch, or every packed row summed / all targets."""
    model = toy_model(hidden_size=32, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    if packed:
        rows = [mb for rank in range(2) for mb in micro_batches(global_examples(), rank, 2, packed=True)]
        total = sum(int((dft.causal_targets(mb) != -100).sum()) for mb in rows)
        for mb in rows:
            (dft.causal_lm_loss(model, mb, reduction="sum").loss / total).backward()
    elif nft:
        ref = toy_model(hidden_size=32, seed=1).eval()
        batch = with_nft_keys(toy_batch(global_examples()))
        dft.causal_lm_loss(model, batch, ref_model=ref, nft=dft.NFTWeight()).loss.backward()
    elif asft:
        ref = toy_model(hidden_size=32, seed=1).eval()
        dft.causal_lm_loss(model, toy_batch(global_examples()), ref_model=ref, kl_coef=0.5).loss.backward()
    else:
        dft.causal_lm_loss(model, toy_batch(global_examples())).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    return grads, dict(model.named_parameters())


def _assert_same_step(got, grads, params):
    """Gradients and updated parameters of the 2-rank run == the single process, to 1e-6."""
    for name, g in grads.items():
        torch.testing.assert_close(got["grads"][name], g, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(got["params"][name], params[name].detach(), atol=1e-6, rtol=1e-5, msg=name)


def test_two_ranks_with_accumulation_equal_single_process(tmp_path):
    got = _torchrun(tmp_path, "exact")
    a, b = got["tokens_per_rank"]
    assert a > 2 * b  # really uneven supervision across ranks
    grads, params = _single_process()
    _assert_same_step(got, grads, params)


def test_mean_of_means_differs(tmp_path):
    """The same harness detects the per-rank / per-micro-batch mean bug: the exactness test can fail."""
    got = _torchrun(tmp_path, "naive")
    grads, _ = _single_process()
    diff = max((got["grads"][n] - g).abs().max().item() for n, g in grads.items())
    assert diff > 1e-4


def test_two_ranks_packed_rows_equal_single_process(tmp_path):
    """Padding-free packing: global_num_items counts what the loss averages (no target across a boundary)."""
    got = _torchrun(tmp_path, "packed")
    grads, params = _single_process(packed=True)
    _assert_same_step(got, grads, params)


def test_packed_count_by_labels_only_differs(tmp_path):
    """Counting packed rows as plain shifted labels (the old count) is caught by the same comparison."""
    got = _torchrun(tmp_path, "packed_naive")
    grads, _ = _single_process(packed=True)
    diff = max((got["grads"][n] - g).abs().max().item() for n, g in grads.items())
    assert diff > 1e-6


@pytest.mark.parametrize(
    "case", ["tied-reshard", "untied-reshard", "tied-keep", "untied-keep", "untied-reshard-bf16", "tied-reshard-none"]
)
def test_fsdp2_fused_head_equals_single_process(tmp_path, case):
    """FSDP2 (fully_shard on each layer and the root, 2 gloo ranks): the fused head inside the forward.

    reshard_after_forward=True used to crash (SIGSEGV) when the head weight was gathered outside
    the forward; bf16 is MixedPrecisionPolicy(param_dtype=bfloat16), checked against fp32.
    """
    got = _torchrun(tmp_path, case, worker=FSDP2_WORKER, result="fsdp2.pt")["grads"]
    model = toy_model(hidden_size=32, seed=0)
    if case.startswith("untied"):
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    dft.causal_lm_loss(model, toy_batch(global_examples())).loss.backward()
    assert sorted(got) == sorted(n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        if case.endswith("bf16"):
            rel = ((got[name] - p.grad).norm() / p.grad.norm()).item()
            assert rel < 3e-2, (name, rel)
        else:
            torch.testing.assert_close(got[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_two_ranks_asft_equal_single_process(tmp_path):
    """ASFT (kl_coef > 0): the KL term is normalised like the DFT term, exact over ranks and accumulation."""
    got = _torchrun(tmp_path, "asft")
    grads, params = _single_process(asft=True)
    _assert_same_step(got, grads, params)


def test_two_ranks_nft_with_data_weights_equal_single_process(tmp_path):
    """NFT (pi_old a frozen reference) with per-token data weights, some 0: the token mean over the step's
    supervised tokens (global_num_items leaves the weight-0 ones out), exact over ranks and accumulation."""
    got = _torchrun(tmp_path, "nft")
    grads, params = _single_process(nft=True)
    _assert_same_step(got, grads, params)
    plain, _ = _single_process()
    assert max((grads[n] - g).abs().max().item() for n, g in plain.items()) > 1e-4  # NFT + weights changed it
