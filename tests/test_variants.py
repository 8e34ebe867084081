"""ASFT (KL anchor to a reference) and EAFT (top-k entropy weight) on both paths, against float64 references."""

import pytest
import torch
import torch.nn.functional as F

import dft
from tests.helpers.reference import ref_dft_loss, ref_topk_entropy

V = 101  # odd vocabulary
REDUCTIONS = ["mean", "sum", "none", "sequence"]


def _head(gen, batch=3, seq=11, hidden=16, ref_hidden=12, dtype=torch.float64):
    def t(*shape, s=1.0):
        return (torch.randn(*shape, dtype=torch.float64, generator=gen) * s).to(dtype)

    h, w, b = t(batch, seq, hidden), t(V, hidden, s=3 / hidden**0.5), t(V)
    y = torch.randint(0, V, (batch, seq), generator=gen)
    y[torch.rand(batch, seq, generator=gen) < 0.25] = -100
    rh, rw, rb = t(batch, seq, ref_hidden), t(V, ref_hidden, s=3 / ref_hidden**0.5), t(V)
    return [x.requires_grad_() for x in (h, w, b)], y, (rh, rw, rb)


def _grads(loss, tensors):
    out = loss if loss.dim() == 0 else (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum()
    return torch.autograd.grad(out, tensors)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighting", [{}, {"alpha": 0.0}, {"alpha": 0.5, "min_weight": 0.05}])
def test_asft_materialised_equals_reference(gen, reduction, weighting):
    (h, w, b), y, (rh, rw, rb) = _head(gen)
    ref = F.linear(rh, rw, rb)
    got = dft.dft_loss(F.linear(h, w, b), y, reduction=reduction, ref_logits=ref, kl_coef=0.3, **weighting)
    want = ref_dft_loss(F.linear(h, w, b), y, reduction=reduction, ref_logits=ref, kl_coef=0.3, **weighting)
    torch.testing.assert_close(got, want)
    for a, r in zip(_grads(got, [h, w, b]), _grads(want, [h, w, b])):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [4, 7, None])
def test_asft_fused_equals_materialised(gen, reduction, chunk_size):
    (h, w, b), y, (rh, rw, rb) = _head(gen)
    t = dft.LogitTransform(softcap=4.0, temperature=1.3)
    rt = dft.LogitTransform(logit_scale=0.8)
    fused = dft.linear_dft_loss(
        h, w, y, bias=b, transform=t, reduction=reduction, chunk_size=chunk_size,
        ref_hidden=rh, ref_weight=rw, ref_bias=rb, ref_transform=rt, kl_coef=0.25,
    )  # fmt: skip
    naive = ref_dft_loss(
        t.apply(F.linear(h, w, b)), y, reduction=reduction, ref_logits=rt.apply(F.linear(rh, rw, rb)), kl_coef=0.25
    )
    torch.testing.assert_close(fused, naive)
    for a, r in zip(_grads(fused, [h, w, b]), _grads(naive, [h, w, b])):
        torch.testing.assert_close(a, r)


def test_asft_reference_value_equals_flat_keywords(gen):
    """dft.Reference(hidden, weight, bias, transform) is the four flat ref_* keywords as one value."""
    (h, w, b), y, (rh, rw, rb) = _head(gen)
    rt = dft.LogitTransform(logit_scale=0.8)
    flat = dft.linear_dft_loss(h, w, y, ref_hidden=rh, ref_weight=rw, ref_bias=rb, ref_transform=rt, kl_coef=0.25)
    value = dft.linear_dft_loss(h, w, y, reference=dft.Reference(rh, rw, rb, rt), kl_coef=0.25)
    naive = ref_dft_loss(F.linear(h, w), y, ref_logits=rt.apply(F.linear(rh, rw, rb)), kl_coef=0.25)
    assert value.item() == flat.item()
    torch.testing.assert_close(value, naive)
    for a, r in zip(_grads(value, [h, w]), _grads(naive, [h, w])):
        torch.testing.assert_close(a, r)
    without = dft.linear_dft_loss(h, w, y, reference=dft.Reference(rh, rw), kl_coef=0.25)  # no bias: differs
    assert not torch.allclose(without, value)


def test_asft_reference_given_twice_or_half_is_refused(gen):
    (h, w, b), y, (rh, rw, rb) = _head(gen)
    with pytest.raises(ValueError, match=r"either reference=dft.Reference\(...\) or \['ref_bias'\]"):
        dft.linear_dft_loss(h, w, y, reference=dft.Reference(rh, rw), ref_bias=rb, kl_coef=0.1)
    with pytest.raises(TypeError, match="reference must be a dft.Reference, got tuple"):
        dft.linear_dft_loss(h, w, y, reference=(rh, rw), kl_coef=0.1)
    with pytest.raises(ValueError, match="without ref_hidden and ref_weight"):
        dft.linear_dft_loss(h, w, y, ref_bias=rb)
    with pytest.raises(ValueError, match="needs the reference model's reference"):
        dft.linear_dft_loss(h, w, y, kl_coef=0.1)


@pytest.mark.parametrize("path", ["materialised", "fused"])
@pytest.mark.parametrize(
    "options", [{"alpha": 0.0, "eaft_alpha": 1.0}, {"alpha": 1.0, "eaft_alpha": 0.5, "eaft_top_k": 5}]
)
def test_eaft_both_paths_equal_reference(gen, path, options):
    (h, w, b), y, _ = _head(gen)
    want = ref_dft_loss(F.linear(h, w, b), y, **options)
    if path == "fused":
        got = dft.linear_dft_loss(h, w, y, bias=b, chunk_size=5, **options)
    else:
        got = dft.dft_loss(F.linear(h, w, b), y, **options)
    torch.testing.assert_close(got, want)
    for a, r in zip(_grads(got, [h, w, b]), _grads(want, [h, w, b])):
        torch.testing.assert_close(a, r)


def test_topk_entropy_ratio_range():
    from dft.weights import topk_entropy_ratio

    flat = torch.zeros(2, 50, dtype=torch.float64)
    assert torch.allclose(topk_entropy_ratio(flat, 20), torch.ones(2, dtype=torch.float64))  # uniform top-k: 1
    peaked = torch.tensor([[100.0] + [0.0] * 49], dtype=torch.float64)
    assert topk_entropy_ratio(peaked, 20).item() < 1e-30
    x = torch.randn(4, 30, dtype=torch.float64)
    torch.testing.assert_close(topk_entropy_ratio(x, 7), ref_topk_entropy(x, 7))


def test_asft_stats_report_mean_kl(gen):
    (h, w, b), y, (rh, rw, rb) = _head(gen)
    _, stats = dft.linear_dft_loss(
        h, w, y, bias=b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, kl_coef=0.1, return_stats=True
    )
    logp, logq = F.log_softmax(F.linear(h, w, b).double(), -1), F.log_softmax(F.linear(rh, rw, rb).double(), -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)[y != -100].mean()
    torch.testing.assert_close(stats.kl.double(), kl.detach(), atol=1e-6, rtol=1e-6)
    assert "kl" in stats.as_dict()


@pytest.mark.parametrize("path", ["materialised", "fused"])
def test_asft_all_masked_is_finite_zero(gen, path):
    (h, w, b), y, (rh, rw, rb) = _head(gen)
    y = torch.full_like(y, -100)
    if path == "fused":
        loss = dft.linear_dft_loss(h, w, y, bias=b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, kl_coef=0.1)
    else:
        loss = dft.dft_loss(F.linear(h, w, b), y, ref_logits=F.linear(rh, rw, rb), kl_coef=0.1)
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(loss, [h, w, b]))


def test_asft_accumulation_equals_big_batch(gen):
    (h, w, b), y, (rh, rw, rb) = _head(gen, batch=4)
    kw = {"bias": b, "ref_bias": rb, "kl_coef": 0.2}
    big = dft.linear_dft_loss(h, w, y, ref_hidden=rh, ref_weight=rw, **kw)
    n = int((y != -100).sum())
    parts = [
        dft.linear_dft_loss(
            h[i : i + 2], w, y[i : i + 2], ref_hidden=rh[i : i + 2], ref_weight=rw, num_items_in_batch=n, **kw
        )
        for i in (0, 2)
    ]
    for a, r in zip(_grads(parts[0] + parts[1], [h, w, b]), _grads(big, [h, w, b])):
        torch.testing.assert_close(a, r)


def llama_factory_asft(logits, ref_logits, labels, asft_alpha):
    """LLaMA-Factory's ASFT as its docs define it, written from the formula: per supervised token
    -sg(p) log p + alpha * KL(q_ref || p), averaged over this micro-batch's tokens (a token mean)."""
    shift_logits, shift_ref, shift_labels = logits[:, :-1], ref_logits[:, :-1], labels[:, 1:]
    mask = shift_labels != -100
    logp_all = F.log_softmax(shift_logits.float(), -1)
    logp = logp_all.gather(-1, shift_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logq = F.log_softmax(shift_ref.float(), -1)
    kl = (logq.exp() * (logq - logp_all)).sum(-1)
    per_token = -logp.exp().detach() * logp + asft_alpha * kl
    return per_token[mask].sum() / mask.sum()  # 0/0 = NaN on an all-masked micro-batch


def test_llama_factory_formula_and_our_normalisation(gen):
    from tests.helpers.tiny_models import tiny_model, token_batch

    model, reference = tiny_model("llama", seed=0), tiny_model("llama", seed=1).eval()
    batches = [token_batch(2, 10, seed=s) for s in (0, 1)]
    batches[1]["labels"][:, :8] = -100  # very uneven supervision between the two micro-batches
    params = list(model.parameters())
    with torch.no_grad():
        refs = [reference(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits for mb in batches]
    # one micro-batch: our token mean is LLaMA-Factory's formula
    lf = llama_factory_asft(
        model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).logits,
        refs[0],
        batches[0]["labels"],
        0.1,
    )
    ours = dft.causal_lm_loss(model, batches[0], ref_model=reference, kl_coef=0.1).loss
    torch.testing.assert_close(ours, lf, atol=1e-6, rtol=1e-5)
    # two accumulation steps: ours (num_items over the step) equals the big batch; the sum of micro-batch
    # means (what Trainer does with LLaMA-Factory's loss) does not
    n = dft.global_num_items(batches)
    acc = [dft.causal_lm_loss(model, mb, ref_model=reference, kl_coef=0.1, num_items_in_batch=n).loss for mb in batches]
    big_batch = {k: torch.cat([mb[k] for mb in batches]) for k in batches[0]}
    big = dft.causal_lm_loss(model, big_batch, ref_model=reference, kl_coef=0.1).loss
    g_acc, g_big = torch.autograd.grad(acc[0] + acc[1], params), torch.autograd.grad(big, params)
    for a, r in zip(g_acc, g_big):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)
    lf_sum = sum(
        llama_factory_asft(
            model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits, r, mb["labels"], 0.1
        )
        for mb, r in zip(batches, refs)
    )
    g_lf = torch.autograd.grad(lf_sum, params)
    assert max((a - r).abs().max().item() for a, r in zip(g_lf, g_big)) > 1e-3


@pytest.mark.parametrize("fused", [True, False])
def test_causal_lm_loss_asft_paths_agree(fused):
    from tests.helpers.tiny_models import tiny_model, token_batch

    model, reference = tiny_model("gemma2", seed=0), tiny_model("gemma2", seed=1)
    batch = token_batch(3, 11)
    got = dft.causal_lm_loss(model, batch, ref_model=reference, kl_coef=0.1, fused=fused)
    with torch.no_grad():
        ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = ref_dft_loss(logits, dft.causal_targets(batch), ref_logits=ref_logits, kl_coef=0.1)
    torch.testing.assert_close(got.loss.double(), want, atol=1e-6, rtol=1e-5)
    assert got.fused == fused and got.stats.kl > 0


def test_peft_disabled_adapter_reference_equals_frozen_copy():
    import copy

    peft = pytest.importorskip("peft")
    from tests.helpers.tiny_models import tiny_model, token_batch

    base = tiny_model("llama", seed=0)
    frozen = copy.deepcopy(base).eval()
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = token_batch(2, 10)
    implicit = dft.causal_lm_loss(lora, batch, kl_coef=0.2)
    explicit = dft.causal_lm_loss(lora, batch, ref_model=frozen, kl_coef=0.2)
    torch.testing.assert_close(implicit.loss, explicit.loss)
    assert implicit.stats.kl > 0  # the adapters (random init) really moved the policy away
    trainable = [p for p in lora.parameters() if p.requires_grad]
    for a, r in zip(torch.autograd.grad(implicit.loss, trainable), torch.autograd.grad(explicit.loss, trainable)):
        torch.testing.assert_close(a, r)


def test_asft_needs_a_reference():
    from tests.helpers.tiny_models import tiny_model, token_batch

    with pytest.raises(ValueError, match="needs a reference"):
        dft.causal_lm_loss(tiny_model("llama"), token_batch(), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        dft.dft_loss(torch.randn(2, 5), torch.tensor([1, 2]), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef must be"):
        dft.dft_loss(torch.randn(2, 5), torch.tensor([1, 2]), ref_logits=torch.randn(2, 5), kl_coef=-1.0)
    with pytest.raises(ValueError, match="ref_logits must have"):
        dft.dft_loss(torch.randn(2, 5), torch.tensor([1, 2]), ref_logits=torch.randn(2, 4), kl_coef=0.1)
    with pytest.raises(ValueError, match="eaft_top_k"):
        dft.DFTWeight(eaft_alpha=1.0, eaft_top_k=1)
