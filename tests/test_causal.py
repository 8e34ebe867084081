import warnings

import pytest
import torch

import dft
from dft.causal import causal_lm_loss
from tests.helpers.tiny_models import VOCAB, tiny_model, token_batch


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "gemma2"])
@pytest.mark.parametrize("options", [{}, {"alpha": 0.5, "min_weight": 0.01, "beta": 0.7}])
def test_fused_path_equals_logits_path(kind, options):
    model = tiny_model(kind)
    batch = token_batch(3, 11)
    fused = causal_lm_loss(model, batch, **options)
    logits = causal_lm_loss(model, batch, fused=False, **options)
    assert fused.fused and not logits.fused
    g_fused = torch.autograd.grad(fused.loss, list(model.parameters()), allow_unused=True)
    g_logits = torch.autograd.grad(logits.loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(fused.loss, logits.loss, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_fused, g_logits):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # and the logits path is the model's own logits + dft.causal_dft_loss
    with torch.no_grad():
        model_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(
        logits.loss.detach(), dft.causal_dft_loss(model_logits, batch["labels"], **options), atol=1e-6, rtol=1e-5
    )


def test_packed_batch_equals_separate_sequences():
    """Padding-free packing (position_ids) gives the same loss as the two sequences in a padded batch."""
    model = tiny_model("llama")
    a, b = torch.randint(0, VOCAB, (5,)), torch.randint(0, VOCAB, (7,))
    packed = {
        "input_ids": torch.cat([a, b])[None],
        "labels": torch.cat([a, b])[None],
        "position_ids": torch.cat([torch.arange(5), torch.arange(7)])[None],
    }
    separate = [causal_lm_loss(model, {"input_ids": x[None], "labels": x[None]}, reduction="sum") for x in (a, b)]
    got = causal_lm_loss(model, packed, reduction="sum")
    torch.testing.assert_close(got.loss, separate[0].loss + separate[1].loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_sequence_reduction_of_packed_rows_is_per_sequence(fused):
    """reduction='sequence' on a padding-free packed row: the mean of the two sequences' means, as unpacked."""
    model = tiny_model("llama")
    a, b = torch.randint(0, VOCAB, (5,)), torch.randint(0, VOCAB, (9,))
    packed = {
        "input_ids": torch.cat([a, b])[None],
        "labels": torch.cat([a, b])[None],
        "position_ids": torch.cat([torch.arange(5), torch.arange(9)])[None],
    }
    means = [causal_lm_loss(model, {"input_ids": x[None], "labels": x[None]}, fused=fused).loss for x in (a, b)]
    got = causal_lm_loss(model, packed, reduction="sequence", fused=fused)
    torch.testing.assert_close(got.loss, (means[0] + means[1]) / 2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_items", [0.5, torch.tensor(0.25)])
def test_fractional_num_items_is_not_clamped(num_items):
    """A global count over ranks may be < 1 per rank (1 target, 2 ranks): dividing by it, not by 1."""
    model = tiny_model("llama")
    batch = token_batch(2, 6)
    total = causal_lm_loss(model, batch, reduction="sum").loss
    for fused in (True, False):
        got = causal_lm_loss(model, batch, num_items_in_batch=num_items, fused=fused).loss
        torch.testing.assert_close(got, total / float(num_items), atol=1e-5, rtol=1e-5)


def test_unknown_model_falls_back_with_one_warning():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 8)
            self.out = torch.nn.Linear(8, VOCAB)

        def forward(self, input_ids, attention_mask=None):
            return {"logits": self.out(self.emb(input_ids))}

    model = Bare()
    batch = token_batch()
    with pytest.warns(RuntimeWarning, match="Bare"):
        out = causal_lm_loss(model, batch)
    assert not out.fused
    logits = model(batch["input_ids"])["logits"]
    torch.testing.assert_close(out.loss, dft.causal_dft_loss(logits, batch["labels"]))


def test_no_warning_for_known_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        causal_lm_loss(tiny_model("qwen2"), token_batch())


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_same_gradients(use_reentrant):
    """Both checkpointing kinds (transformers < 5 defaults to reentrant) train with the fused head."""
    batch = token_batch(2, 10)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.train()
        causal_lm_loss(model, batch).loss.backward()  # .backward(): reentrant checkpointing refuses autograd.grad
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_both_paths_take_the_same_arguments(kind):
    """temperature, chunk_size, reduction and a weighting object mean the same on both paths."""
    model = tiny_model(kind)
    batch = token_batch(3, 11)
    kwargs = {"temperature": 1.7, "chunk_size": 4, "reduction": "sequence"}
    w = dft.DFTWeight(alpha=0.5, beta=0.8)
    fused = causal_lm_loss(model, batch, w, **kwargs)
    logits = causal_lm_loss(model, batch, w, fused=False, **kwargs)
    assert fused.fused and not logits.fused
    torch.testing.assert_close(fused.loss, logits.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused.stats.ce, logits.stats.ce, atol=1e-6, rtol=1e-5)


def test_softcap_on_a_softcapped_model_is_refused():
    with pytest.raises(ValueError, match="soft-cap twice"):
        causal_lm_loss(tiny_model("gemma2"), token_batch(), softcap=3.0)


def test_compiled_model_no_recompile_per_step():
    """causal_lm_loss under torch.compile(model): one deliberate graph break (the fused head runs outside
    the graph: data-dependent chunking), no new graphs and no new breaks after the first step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(tiny_model("llama"))
    seen = []
    for step in range(3):
        out = causal_lm_loss(compiled, token_batch(2, 12, seed=step))
        out.loss.backward()
        seen.append((counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())))
    assert seen[0][0] >= 1 and seen[1:] == [seen[0]] * 2, seen
    eager = causal_lm_loss(tiny_model("llama"), token_batch(2, 12, seed=2))
    torch.testing.assert_close(out.loss, eager.loss, atol=1e-5, rtol=1e-5)


def _model_ce(model, batch) -> float:
    with torch.no_grad():
        return model(**batch).loss.item()  # the model's own CE: its head, hooks and all


@pytest.mark.parametrize("hook", ["pre_scale", "forward_add", "global_forward", "global_backward"])
def test_user_hooks_on_the_head_send_the_loss_to_the_logits_path(hook):
    """A hook the fused head would skip: one warning naming it, and the model's own numbers."""
    model = tiny_model("llama")
    batch = token_batch(2, 9)
    if hook == "pre_scale":
        handle = model.lm_head.register_forward_pre_hook(lambda _m, args: (args[0] * 2,))
    elif hook == "forward_add":

        def add_three(_m, _args, out):
            out = out.clone()
            out[..., 3] += 3.0
            return out

        handle = model.lm_head.register_forward_hook(add_three)
    elif hook == "global_forward":
        handle = torch.nn.modules.module.register_module_forward_hook(lambda _m, _a, _o: None)
    else:
        handle = torch.nn.modules.module.register_module_full_backward_hook(lambda _m, _gi, _go: None)
    try:
        with pytest.warns(RuntimeWarning, match="hook") as caught:
            out = causal_lm_loss(model, batch, alpha=0.0)
        assert not out.fused and len([w for w in caught if "dft:" in str(w.message)]) == 1
        assert out.stats.ce.item() == pytest.approx(_model_ce(model, batch), rel=1e-5)
    finally:
        handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert causal_lm_loss(model, batch).fused  # the hook removed: fused again, no warning


class BareLogits(torch.nn.Module):
    """A model whose forward returns the logits tensor itself (no ModelOutput, no tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_model("llama")

    def forward(self, input_ids, attention_mask=None, **_kw):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


def test_model_returning_bare_logits_uses_them():
    model = BareLogits()
    batch = token_batch(3, 8)
    with pytest.warns(RuntimeWarning, match="dft:"):
        out = causal_lm_loss(model, batch)
    logits = model(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(out.loss, dft.causal_dft_loss(logits, batch["labels"]))
    with pytest.raises(TypeError, match="cannot find logits"):
        dft.compute_loss_func({"scores": logits}, batch["labels"])


def test_hook_owners_are_packages_not_prefixes():
    """Hooks from torch/transformers/... are plumbing; a user package whose name starts alike ('trlx') is not."""
    from dft.models import foreign_hooks

    head = torch.nn.Linear(4, 5)

    def hook(_m, _a, _o):
        return None

    for module, foreign in (("trlx.hooks", 1), ("torch.distributed.fsdp", 0), ("transformers_extra", 1)):
        hook.__module__ = module
        handle = head.register_forward_hook(hook)
        try:
            assert len(foreign_hooks(head)) == foreign, module
        finally:
            handle.remove()


def test_data_parallel_over_several_devices_takes_the_logits_path():
    """nn.DataParallel replicas share the head's hooks across threads: the fused head is never used there."""
    from dft.causal import _route

    model = tiny_model("llama")
    parallel = torch.nn.DataParallel(model)
    parallel.device_ids = [0, 1]  # as on a 2-GPU machine (CPU here: only the routing is checked)
    route = _route(parallel, True, None, 0.0, dft.LogitTransform())
    assert (
        route.parts is None
        and "DataParallel runs its replicas in threads" in route.reason
        and "torchrun" in route.reason
    )
    assert _route(model, True, None, 0.0, dft.LogitTransform()).parts is not None
