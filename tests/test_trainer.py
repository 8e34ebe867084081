import functools
import math

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments, default_data_collator

import dft
from dft.models import find_causal_lm_parts
from tests.helpers.tiny_models import VOCAB, tiny_model, token_batch, uneven_dataset

_dataset = uneven_dataset


def _args(tmp_path, **kw) -> dft.DFTConfig:
    base = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 2,
        "learning_rate": 0.5,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_steps": 1,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
    }
    base.update(kw)
    return dft.DFTConfig(**base)


def test_gradient_accumulation_equals_big_batch(tmp_path):
    data = _dataset(8)
    big = tiny_model("llama")
    DFTTrainer = dft.DFTTrainer
    DFTTrainer(model=big, args=_args(tmp_path, per_device_train_batch_size=8), train_dataset=data).train()
    acc = tiny_model("llama")
    DFTTrainer(
        model=acc,
        args=_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4),
        train_dataset=data,
    ).train()
    start = tiny_model("llama")
    moved = 0.0
    for (name, p_big), p_acc, p0 in zip(big.named_parameters(), acc.parameters(), start.parameters()):
        torch.testing.assert_close(p_acc, p_big, atol=1e-6, rtol=1e-5, msg=name)
        moved = max(moved, (p_big - p0).abs().max().item())
    assert moved > 1e-4  # the step really changed the parameters


def test_all_masked_micro_batch_trains_on(tmp_path):
    data = _dataset(4)
    rows = data.to_dict()
    rows["labels"][0] = [-100] * len(rows["labels"][0])
    rows["labels"][1] = [-100] * len(rows["labels"][1])
    data = Dataset.from_dict(rows)
    args = _args(tmp_path, per_device_train_batch_size=2, max_steps=2, gradient_accumulation_steps=1)
    trainer = dft.DFTTrainer(model=tiny_model("llama"), args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_logs_diagnostics_and_eval_without_logits(tmp_path):
    data = _dataset(8)
    args = _args(tmp_path, max_steps=3, dft_warmup_steps=2, per_device_eval_batch_size=4)
    trainer = dft.DFTTrainer(model=tiny_model("qwen2"), args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("ce", "mean_p", "token_accuracy", "entropy", "dft_beta"):
        assert key in train_logs[0], key
    assert [h["dft_beta"] for h in train_logs] == [0.0, 0.5, 1.0]  # beta used by steps 1, 2, 3
    assert train_logs[0]["loss"] == pytest.approx(
        train_logs[0]["ce"], rel=1e-4
    )  # beta=0 is CE (4.x rounds logs to 4 digits)
    assert train_logs[2]["loss"] < 0.1 * train_logs[2]["ce"]  # DFT: each token scaled by p
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_ce", "eval_mean_p", "eval_token_accuracy", "eval_entropy"):
        assert key in metrics and math.isfinite(metrics[key]), key
    # eval CE equals the cross-entropy computed on materialised logits
    model = trainer.model.eval()
    batch = default_data_collator([data[i] for i in range(8)])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want_ce = dft.causal_dft_loss(logits, batch["labels"], alpha=0.0).item()
    assert metrics["eval_ce"] == pytest.approx(want_ce, rel=1e-4)


def test_sft_loss_type_is_cross_entropy(tmp_path):
    model = tiny_model("llama")
    args = _args(tmp_path, loss_type="sft")
    trainer = dft.DFTTrainer(model=model, args=args, train_dataset=_dataset(2))
    batch = token_batch()
    loss = trainer.compute_loss(model, dict(batch))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)


def test_resume_reproduces_loss_trajectory(tmp_path):
    data = _dataset(8)
    common = {"max_steps": 6, "dft_warmup_steps": 4, "learning_rate": 0.1, "save_strategy": "steps", "save_steps": 3}
    full = dft.DFTTrainer(model=tiny_model("llama"), args=_args(tmp_path / "a", **common), train_dataset=data)
    full.train()
    resumed = dft.DFTTrainer(
        model=tiny_model("llama", seed=1), args=_args(tmp_path / "a", **common), train_dataset=data
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-3"))

    def trajectory(trainer):
        return {h["step"]: (h["loss"], h["dft_beta"]) for h in trainer.state.log_history if "loss" in h}

    want, got = trajectory(full), trajectory(resumed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come back from the checkpoint's state
    for step in (4, 5, 6):
        assert got[step][0] == pytest.approx(want[step][0], rel=1e-5)
        assert got[step][1] == want[step][1]


def test_lora_trains_only_adapters(tmp_path):
    peft = pytest.importorskip("peft")  # dev extra: installed by .ci/run
    model = tiny_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    assert find_causal_lm_parts(lora) is not None
    trainer = dft.DFTTrainer(model=lora, args=_args(tmp_path, max_steps=2), train_dataset=_dataset(4))
    trainer.train()
    changed = {n for n, p in lora.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def _plain_args(tmp_path, **kw) -> TrainingArguments:
    """transformers' own TrainingArguments (no DFT fields), the settings of _args."""
    base = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "learning_rate": 0.5,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_steps": 1,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
    }
    return TrainingArguments(**{**base, **kw})


def test_compute_loss_func_with_plain_trainer(tmp_path):
    data = _dataset(8)
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    plain_args = _plain_args(tmp_path)
    plain = tiny_model("llama")
    Trainer(
        model=plain, args=plain_args, train_dataset=data, compute_loss_func=functools.partial(dft.compute_loss_func)
    ).train()
    ours = tiny_model("llama")
    dft.DFTTrainer(model=ours, args=args, train_dataset=data).train()
    for a, b in zip(plain.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_mixin_on_a_plain_trainer_trains_dft(tmp_path):
    """The documented ``class MyTrainer(dft.DFTTrainerMixin, transformers.Trainer)`` with plain
    TrainingArguments: the DFT defaults (alpha=1), DFTTrainer's update over two accumulated steps, DFT's logs."""

    class MyTrainer(dft.DFTTrainerMixin, Trainer):
        pass

    data = _dataset(8)
    mine = tiny_model("llama")
    trainer = MyTrainer(model=mine, args=_plain_args(tmp_path, max_steps=2), train_dataset=data)
    trainer.train()
    ours = tiny_model("llama")
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=2)
    dft.DFTTrainer(model=ours, args=args, train_dataset=data).train()
    for (name, a), b in zip(mine.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6, msg=name)
    start = tiny_model("llama")
    assert max((a - s).abs().max().item() for a, s in zip(mine.parameters(), start.parameters())) > 1e-4
    log = trainer.state.log_history[0]
    assert log["loss"] < 0.1 * log["ce"]  # each token scaled by its p (~1/VOCAB here): DFT, not cross-entropy


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "dpo"}, "loss_type must be one of"),
        ({"dft_alpha": -1.0}, "alpha must be >= 0"),
        ({"dft_beta": 2.0}, "beta must be <= 1"),
        ({"dft_min_weight": 1.5}, "min_weight must be <= 1"),
        ({"dft_warmup_steps": -3}, "dft_warmup_steps"),
        ({"dft_warmup_ratio": 1.5}, "dft_warmup_ratio"),
        ({"loss_chunk_size": 0}, "loss_chunk_size"),
    ],
)
def test_config_rejects_bad_values(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dft.DFTConfig(output_dir=str(tmp_path), **kwargs)


def test_trainer_counts_packed_batches_like_the_loss(tmp_path):
    """Trainer's own count (labels[..., 1:]) would give 11 here; the loss averages over 9 targets."""
    ids = torch.arange(10, 22)[None]
    batch = {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]]),
    }
    trainer = dft.DFTTrainer(model=tiny_model("llama"), args=_args(tmp_path), train_dataset=_dataset(2))
    _, n = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert float(n) == 9.0
    assert float(n) == float(dft.causal_lm_loss(trainer.model, batch).stats.num_tokens)


def test_bf16_head_matmuls_run_in_bf16(tmp_path, monkeypatch):
    """DFTTrainer(bf16=True) on an fp32 model: the fused head's matmuls run in bf16, as Trainer's own CE."""
    # bf16=True leaves ACCELERATE_MIXED_PRECISION and accelerate's state behind: tests/conftest.py restores both
    from tests.test_fused import _MatmulDtypes

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    trainer = dft.DFTTrainer(model=tiny_model("llama"), args=_args(tmp_path, bf16=True), train_dataset=_dataset(4))
    with _MatmulDtypes(VOCAB) as rec:
        trainer.train()
    # logits and dh of the fused head (and the model's one-position head) in bf16; the dW update accumulates
    # into float32 (on CUDA one GEMM on the bf16 operands; on CPU, which has no such GEMM, the chunk's
    # bf16 operands are cast up and added in place: exact products, no [V, H] temporary)
    head = [dtypes for name, dtypes in rec.calls if name != "addmm_"]
    dw = [dtypes for name, dtypes in rec.calls if name == "addmm_"]
    assert len(head) >= 2 and len(dw) >= 1, rec.calls
    assert all(dtype == torch.bfloat16 for dtypes in head for dtype in dtypes), rec.calls
    assert all(dtypes == (torch.float32,) * 3 for dtypes in dw), rec.calls
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_moe_router_aux_loss_is_trained_and_logged(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
    )
    torch.manual_seed(0)
    trainer = dft.DFTTrainer(
        model=MixtralForCausalLM(config), args=_args(tmp_path, max_steps=2), train_dataset=_dataset(4)
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("aux_loss" in h and h["aux_loss"] > 1.0 for h in logged)


@pytest.mark.parametrize("loss_type", ["asft", "eaft"])
def test_variants_train_and_log(tmp_path, loss_type):
    """DFTConfig(loss_type="asft") with a frozen reference, and "eaft": trains, logs kl for ASFT."""
    import copy

    model = tiny_model("llama")
    kwargs = {"ref_model": copy.deepcopy(model)} if loss_type == "asft" else {}
    args = _args(tmp_path, loss_type=loss_type, max_steps=2, learning_rate=20.0)
    trainer = dft.DFTTrainer(model=model, args=args, train_dataset=_dataset(4), **kwargs)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(math.isfinite(h["loss"]) for h in logged)
    if loss_type == "asft":
        assert abs(logged[0]["kl"]) < 1e-5 and logged[1]["kl"] > 1e-4  # policy == reference at step 0, then drifts
        assert all(not p.requires_grad for p in trainer.ref_model.parameters())
    else:
        assert "kl" not in logged[0] and "dft_beta" not in logged[0]


def test_asft_without_reference_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs a reference"):
        dft.DFTTrainer(model=tiny_model("llama"), args=_args(tmp_path, loss_type="asft"), train_dataset=_dataset(2))


def test_asft_trainer_accumulation_equals_big_batch(tmp_path):
    """kl_coef > 0 with gradient accumulation: same update as one big batch (LLaMA-Factory sums means)."""
    import copy

    data = _dataset(8)
    base = tiny_model("llama")
    runs = {}
    for name, bs, accum in (("big", 4, 1), ("accum", 1, 4)):
        model = copy.deepcopy(base)
        args = _args(
            tmp_path / name,
            loss_type="asft",
            kl_coef=0.5,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=accum,
            max_steps=2,
        )
        dft.DFTTrainer(model=model, args=args, train_dataset=data, ref_model=tiny_model("llama", seed=3)).train()
        runs[name] = model
    for (n, a), b in zip(runs["big"].named_parameters(), runs["accum"].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_dft_ce_tokens_special_trains_special_targets_with_ce(tmp_path):
    """dft_ce_tokens='special': the tokenizer's special ids (EOS included) get weight 1; the loss equals the
    reference with those ids on CE; a bad spec or 'special' without a tokenizer fails at construction."""
    from tests.helpers.reference import ref_dft_loss
    from tests.helpers.tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    trainer = dft.DFTTrainer(
        model=tiny_model("llama"),
        args=_args(tmp_path, dft_ce_tokens="special,7"),
        train_dataset=_dataset(4),
        processing_class=tok,
    )
    ids = tuple(sorted({*tok.all_special_ids, tok.eos_token_id, 7}))
    assert trainer.dft_weighting().ce_token_ids == ids
    batch = token_batch(2, 10, seed=1)
    batch["labels"][:, ::3] = tok.eos_token_id
    out = dft.causal_lm_loss(trainer.model, batch, trainer.dft_weighting())
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    want = ref_dft_loss(logits, batch["labels"][:, 1:], ce_token_ids=ids)
    torch.testing.assert_close(out.loss.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dft_ce_tokens: 'eos' is neither 'special' nor a token id"):
        _args(tmp_path, dft_ce_tokens="eos")
    with pytest.raises(ValueError, match="needs the tokenizer"):
        dft.DFTTrainer(
            model=tiny_model("llama"), args=_args(tmp_path, dft_ce_tokens="special"), train_dataset=_dataset(4)
        )


@pytest.mark.parametrize("log_prior", [True, False])
def test_prior_figures_logged_once_from_the_first_step(tmp_path, log_prior):
    """prior/mean_p and prior/frac_below_0.01 come from the first optimizer step's batches (the base model,
    before any update: with logging_steps=1 they equal that step's own mean_p), logged once; off with
    dft_log_prior=False."""
    trainer = dft.DFTTrainer(
        model=tiny_model("llama"),
        args=_args(tmp_path, max_steps=3, logging_steps=1, dft_log_prior=log_prior),
        train_dataset=_dataset(8),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    priors = [h for h in trainer.state.log_history if "prior/mean_p" in h]
    if not log_prior:
        assert not priors
        return
    assert len(priors) == 1 and priors[0] is logs[0]
    assert priors[0]["prior/mean_p"] == pytest.approx(logs[0]["mean_p"], rel=1e-6)
    assert 0.0 <= priors[0]["prior/frac_below_0.01"] <= 1.0


def test_compute_metrics_and_predict_get_the_logits(tmp_path):
    """evaluate() with compute_metrics and predict() receive the model's logits [rows, T, V] (the logits path
    for those steps); evaluate() without compute_metrics stays on the fused head."""
    model, data = tiny_model("llama"), _dataset(n=6)
    seen = {}

    def metrics(pred):
        seen["shape"] = tuple(pred.predictions.shape)
        return {"n": float(pred.predictions.shape[0])}

    trainer = dft.DFTTrainer(
        model=model,
        args=_args(tmp_path, per_device_eval_batch_size=3),
        eval_dataset=data,
        data_collator=default_data_collator,
        compute_metrics=metrics,
    )
    result = trainer.evaluate()
    assert seen["shape"] == (6, 10, VOCAB) and result["eval_n"] == 6.0
    out = trainer.predict(data)
    assert out.predictions.shape == (6, 10, VOCAB)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(data["input_ids"])).logits
    torch.testing.assert_close(torch.as_tensor(out.predictions), logits, atol=1e-5, rtol=1e-5)
    fused_only = dft.DFTTrainer(
        model=model, args=_args(tmp_path), eval_dataset=data, data_collator=default_data_collator
    ).evaluate()
    assert fused_only["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-5)
    argmax = dft.DFTTrainer(  # preprocess_logits_for_metrics gets the same logits
        model=model,
        args=_args(tmp_path, per_device_eval_batch_size=3),
        eval_dataset=data,
        data_collator=default_data_collator,
        compute_metrics=metrics,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
    )
    argmax.evaluate()
    assert seen["shape"] == (6, 10)
    assert (argmax.predict(data).predictions == logits.argmax(-1).numpy()).all()


def test_data_parallel_is_refused_at_construction(tmp_path):
    """One process with several GPUs visible: Trainer would wrap nn.DataParallel (shared hooks, threads)."""
    args = _args(tmp_path)
    args._n_gpu = 2  # what Trainer sees with 2 GPUs visible in one process
    with pytest.raises(ValueError, match="torchrun"):
        dft.DFTTrainer(
            model=tiny_model("llama"), args=args, train_dataset=_dataset(), data_collator=default_data_collator
        )


def test_checkpointing_kwargs_set_without_a_future_warning(tmp_path):
    """DFTConfig fills the non-reentrant checkpointing kwargs itself: in the field transformers 5 names
    (activation_checkpointing_kwargs), so none of the FutureWarnings is about a field the library set."""
    import warnings

    name = (
        "activation_checkpointing"
        if hasattr(TrainingArguments, "activation_checkpointing")
        else "gradient_checkpointing"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = _args(tmp_path, **{name: True})
    assert getattr(args, f"{name}_kwargs") == {"use_reentrant": False}
    assert not [w for w in caught if issubclass(w.category, FutureWarning) and "checkpointing" in str(w.message)]
