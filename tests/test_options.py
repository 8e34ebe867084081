"""One spelling per option: DFTTrainer(weighting=..., transform=...) values, the DFTConfig fields for YAML and the
CLI, presets that refuse what they would ignore, numeric fields parsed or refused at construction."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

import dft
from tests.helpers.tiny_models import tiny_model, uneven_dataset

_dataset = uneven_dataset


def _args(tmp_path, **kw) -> dft.DFTConfig:
    base = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "learning_rate": 0.5,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_steps": 2,
        "max_grad_norm": 0.0,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
        "dataloader_drop_last": True,
    }
    return dft.DFTConfig(**{**base, **kw})


def test_weighting_value_trains_as_causal_lm_loss_in_a_loop(tmp_path):
    """DFTTrainer(weighting=DFTWeight(p_max=0.6, min_weight=0.05)): after 2 SGD steps, float64, the parameters of
    a plain loop over the same batches with causal_lm_loss(model, batch, that weighting) (1e-10)."""
    weighting = dft.DFTWeight(p_max=0.6, min_weight=0.05)
    data = _dataset(8)
    model = tiny_model("llama").double()
    trainer = dft.DFTTrainer(model=model, args=_args(tmp_path), train_dataset=data, weighting=weighting)
    batches = list(trainer.get_train_dataloader())[:2]  # the order Trainer uses (seeded sampler)
    trainer.train()
    loop = tiny_model("llama").double()
    opt = torch.optim.SGD(loop.parameters(), lr=0.5)
    for batch in batches:
        loss = dft.causal_lm_loss(loop, batch, weighting).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    moved = 0.0
    for (name, a), b, c in zip(model.named_parameters(), loop.parameters(), tiny_model("llama").double().parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)
        moved = max(moved, (a - c).abs().max().item())
    assert moved > 1e-4


def test_both_spellings_record_one_weighting(tmp_path):
    by_value = dft.DFTTrainer(
        model=tiny_model("llama"),
        args=_args(tmp_path, dft_warmup_ratio=0.5),
        train_dataset=_dataset(),
        weighting=dft.DFTWeight(alpha=0.5, p_min=0.01, p_max=0.9, beta=0.8),
    )
    by_fields = dft.DFTTrainer(
        model=tiny_model("llama"),
        args=_args(tmp_path, dft_warmup_ratio=0.5, dft_alpha=0.5, dft_p_min=0.01, dft_p_max=0.9, dft_beta=0.8),
        train_dataset=_dataset(),
    )
    assert by_value.run_weighting() == by_fields.run_weighting()
    assert by_value.dft_weighting() == by_fields.dft_weighting()  # step 0 of the warm-up: beta 0 in both
    assert by_value.dft_weighting().beta == 0.0


def test_transform_value_reaches_the_loss(tmp_path):
    data = _dataset(4)
    plain = dft.DFTTrainer(model=tiny_model("llama"), args=_args(tmp_path), train_dataset=data)
    capped = dft.DFTTrainer(
        model=tiny_model("llama"), args=_args(tmp_path), train_dataset=data, transform=dft.LogitTransform(softcap=1.0)
    )
    batch = next(iter(plain.get_train_dataloader()))
    a, b = plain.compute_loss(plain.model, batch), capped.compute_loss(capped.model, batch)
    want = dft.causal_lm_loss(capped.model, batch, transform=dft.LogitTransform(softcap=1.0)).loss
    torch.testing.assert_close(b, want)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "sft", "dft_min_weight": 0.1}, r"loss_type='sft' ignores dft_min_weight=0.1"),
        ({"loss_type": "sft", "dft_warmup_ratio": 0.2}, r"loss_type='sft' ignores dft_warmup_ratio"),
        ({"loss_type": "eaft", "dft_beta": 0.5}, r"loss_type='eaft' ignores dft_beta=0.5"),
        ({"loss_type": "eaft", "dft_warmup_steps": 10}, r"loss_type='eaft' ignores dft_warmup_steps"),
        ({"loss_type": "dft", "eaft_top_k": 5}, r"loss_type='dft' ignores eaft_top_k=5"),
        ({"learning_rate": "abc"}, r"learning_rate must be a number, got 'abc'"),
        ({"max_steps": "2.5"}, r"max_steps must be an integer"),
        ({"dft_alpha": "x"}, r"dft_alpha must be a number"),
    ],
)
def test_config_refuses_what_it_would_ignore(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **kwargs)


def test_numeric_strings_are_parsed(tmp_path):
    args = _args(tmp_path, learning_rate="1e-3", max_steps="5", dft_p_max="0.6", warmup_steps="3")
    assert args.learning_rate == 1e-3 and args.max_steps == 5 and args.dft_p_max == 0.6
    assert args.dft_weighting().p_max == 0.6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dft_min_weight": 0.1}, "replaces the dft_\\* weight fields; got dft_min_weight=0.1"),
        ({"loss_type": "sft"}, "next to loss_type='sft', itself a weighting"),
        ({"loss_type": "eaft"}, "next to loss_type='eaft'"),
    ],
)
def test_weighting_value_next_to_fields_is_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dft.DFTTrainer(
            model=tiny_model("llama"),
            args=_args(tmp_path, **kwargs),
            train_dataset=_dataset(),
            weighting=dft.DFTWeight(alpha=0.5),
        )


def test_option_values_are_type_checked(tmp_path):
    with pytest.raises(TypeError, match="weighting must be a dft.DFTWeight"):
        dft.DFTTrainer(model=tiny_model("llama"), args=_args(tmp_path), train_dataset=_dataset(), weighting={"a": 1})
    with pytest.raises(TypeError, match="transform must be a dft.LogitTransform"):
        dft.DFTTrainer(model=tiny_model("llama"), args=_args(tmp_path), train_dataset=_dataset(), transform=2.0)


def test_trl_trainer_takes_the_values(tmp_path):
    pytest.importorskip("trl")
    from dft.toy import toy_model, toy_tokenizer

    raw = Dataset.from_list([{"prompt": "12+7=", "completion": "19\n"}] * 8)
    args = dft.DFTSFTConfig(
        output_dir=str(tmp_path / "trl"), max_steps=1, max_length=32, report_to="none", use_cpu=True
    )
    trainer = dft.DFTSFTTrainer(
        model=toy_model(), args=args, train_dataset=raw, processing_class=toy_tokenizer(),
        weighting=dft.DFTWeight(min_weight=0.2),
    )  # fmt: skip
    trainer.train()
    assert trainer.run_weighting().min_weight == 0.2
