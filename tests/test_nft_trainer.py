"""DFTTrainer(loss_type="nft") against a float64 port of NFT's official formula, and its data checks."""

import copy

import pytest
import torch
from datasets import Dataset

import dft
from dft.batches import nft_dataset
from tests.helpers.reference import ref_nft_loss
from tests.helpers.tiny_models import VOCAB, tiny_model

PROMPTS = [0, 0, 0, 1, 1, 2, 1]
ACCEPTED = [1, 0, 0, 1, 0, 1, 0]  # prompt 2: one verdict only (dropped by default)


def _rows(seed=0, width=9):
    """dft sample's rows as DFTTrainer takes them: token ids (uneven lengths), verdicts, prompt indices."""
    g = torch.Generator().manual_seed(seed)
    rows = {"prompt_ids": [], "completion_ids": [], "accepted": ACCEPTED, "prompt_index": PROMPTS}
    for i in range(len(PROMPTS)):
        rows["prompt_ids"].append(torch.randint(3, VOCAB, (2 + i % 3,), generator=g).tolist())
        rows["completion_ids"].append(torch.randint(3, VOCAB, (width - 2 - i % 4,), generator=g).tolist())
    return Dataset.from_dict(rows)


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), loss_type="nft", per_device_train_batch_size=8, learning_rate=0.3,
        optim="sgd", lr_scheduler_type="constant", max_steps=2, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, max_grad_norm=0.0, weight_decay=0.0,
    )  # fmt: skip
    base.update(kw)
    return dft.DFTConfig(**base)


def _official_two_steps(start, old, rows, lr, temperature=1.0):
    """Two full-batch SGD steps on the float64 port (pi_old fixed: the model as training starts)."""
    model = copy.deepcopy(start)
    width = max(len(p) + len(c) for p, c in zip(rows["prompt_ids"], rows["completion_ids"]))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (p, c) in enumerate(zip(rows["prompt_ids"], rows["completion_ids"])):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p) : n] = torch.tensor(c)
        mask[i, :n] = 1
    targets = dft.shift_causal_labels(labels)
    acc = torch.tensor(rows["accepted"])[:, None].expand_as(targets)
    rhat = torch.tensor(rows["nft_rhat"], dtype=torch.float32).double()[:, None].expand_as(targets)  # as batched
    with torch.no_grad():
        old_logits = old(input_ids=ids, attention_mask=mask).logits.double() / temperature
        old_logp = torch.log_softmax(old_logits, -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    for _ in range(2):
        logits = model(input_ids=ids, attention_mask=mask).logits / temperature
        loss = ref_nft_loss(logits, targets, old_logp, rhat, acc)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p.sub_(lr * g)
    return model


@pytest.mark.parametrize("temperature", [None, 0.8])
def test_two_sgd_steps_equal_the_official_formula(tmp_path, temperature):
    start = tiny_model("llama", seed=3).double()
    model = copy.deepcopy(start)
    args = _args(tmp_path, nft_temperature=temperature)
    trainer = dft.DFTTrainer(model=model, args=args, train_dataset=_rows(), data_collator=_pad)
    trainer.train()
    rows = trainer.train_dataset
    assert rows["prompt_index"] == [0, 0, 0, 1, 1, 1] and rows["nft_rhat"] == [1 / 3] * 3 + [1 / 3] * 3
    want = _official_two_steps(start, start.eval(), rows, 0.3, temperature or 1.0)
    moved = max((a - b).abs().max().item() for a, b in zip(start.parameters(), want.parameters()))
    assert moved > 1e-3  # the steps did something
    for (name, a), b in zip(model.named_parameters(), want.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged[0]["nft/ratio"] == pytest.approx(1.0) and logged[1]["nft/ratio"] != pytest.approx(1.0)
    assert 0 < logged[0]["nft/rejected_tokens"] < 1


def _pad(features):
    """A plain right-padding collator (DFTTrainer adds the loss's columns around it)."""
    width = max(len(f["input_ids"]) for f in features)
    out = {"input_ids": [], "labels": [], "attention_mask": []}
    for f in features:
        n = len(f["input_ids"])
        out["input_ids"].append(list(f["input_ids"]) + [0] * (width - n))
        out["labels"].append(list(f["labels"]) + [-100] * (width - n))
        out["attention_mask"].append([1] * n + [0] * (width - n))
    return {k: torch.tensor(v) for k, v in out.items()}


def test_nft_dataset_rates_and_refusals():
    rows, counts = nft_dataset(_rows())
    assert counts == {"prompts": 3, "uniform_prompts": 1, "rows_dropped": 1, "rows": 6}
    assert rows["nft_rhat"] == [1 / 3] * 6 and rows["labels"][0][: len(rows["prompt_ids"][0])] == [-100] * 2
    kept, counts = nft_dataset(_rows(), keep_uniform_prompts=True)
    assert counts["rows_dropped"] == 0 and kept["nft_rhat"][5] == 1.0
    with pytest.raises(ValueError, match=r"needs the columns \['accepted'\]"):
        nft_dataset(_rows().remove_columns("accepted"))
    with pytest.raises(ValueError, match="every prompt's samples .3 prompts. got one verdict"):
        nft_dataset(Dataset.from_dict({"accepted": [1, 0, 1], "prompt_index": [0, 1, 2]}))
    with pytest.raises(ValueError, match=r"row 2: 'accepted' must be 0 or 1, got 2"):
        nft_dataset(Dataset.from_dict({"accepted": [1, 2], "prompt_index": [0, 0]}))


def test_nft_config_refusals(tmp_path):
    with pytest.raises(ValueError, match="loss_type='dft' ignores nft_neg_weight=2.0"):
        _args(tmp_path, loss_type="dft", nft_neg_weight=2.0)
    with pytest.raises(ValueError, match="nft_rhat_max must be < 1"):
        _args(tmp_path, nft_rhat_max=1.0)
    with pytest.raises(ValueError, match="nft_temperature must be > 0"):
        _args(tmp_path, nft_temperature=0.0)


def test_trainer_weights_tokens_from_the_loss_weights_column(tmp_path):
    """A loss_weights column survives remove_unused_columns and any collator: one SGD step == the float64 weighted
    token mean (weight 0: not supervised, not counted)."""
    from tests.helpers.reference import ref_dft_loss
    from tests.helpers.tiny_models import uneven_dataset

    rows = uneven_dataset(4, seq=8)
    weights = [[0.0 if (i + t) % 5 == 0 else 1.0 + 0.5 * ((i * t) % 3) for t in range(8)] for i in range(4)]
    rows = rows.add_column("loss_weights", weights)
    start = tiny_model("llama", seed=1).double()
    model = copy.deepcopy(start)
    args = _args(tmp_path, loss_type="sft", max_steps=1, per_device_train_batch_size=4)
    dft.DFTTrainer(model=model, args=args, train_dataset=rows, data_collator=_pad).train()
    ids = torch.tensor(rows["input_ids"])
    labels = dft.shift_causal_labels(torch.tensor(rows["labels"]))
    w = torch.tensor(weights, dtype=torch.float64)
    w = torch.cat([w[:, 1:], torch.zeros(4, 1, dtype=torch.float64)], 1)
    kept = labels.masked_fill(w == 0, -100)
    per_token = ref_dft_loss(start(input_ids=ids).logits, kept, alpha=0.0, reduction="none")
    loss = (per_token * w).sum() / (kept != -100).sum()
    grads = torch.autograd.grad(loss, list(start.parameters()))
    for (name, a), p, g in zip(model.named_parameters(), start.parameters(), grads):
        torch.testing.assert_close(a, p - 0.3 * g, rtol=0, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
