import pytest
import torch

import dft
from dft.labels import causal_targets, count_targets


def test_packed_boundaries_are_not_supervised():
    labels = torch.tensor([[5, 6, 7, 8, 9, 10]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])  # two packed sequences
    got = causal_targets({"labels": labels, "position_ids": position_ids})
    assert got.tolist() == [[6, 7, -100, 9, 10, -100]]
    assert causal_targets({"labels": labels}).tolist() == [[6, 7, 8, 9, 10, -100]]


PACKED_POSITIONS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]])  # three packed sequences: 4 + 3 + 5 tokens


def _packed_batch():
    ids = torch.arange(10, 22)[None]
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": PACKED_POSITIONS}


def test_packed_count_equals_what_the_loss_averages():
    from tests.helpers.tiny_models import tiny_model

    batch = _packed_batch()
    assert int(count_targets(causal_targets(batch))) == 9  # 3 + 2 + 4 next-token targets
    assert float(dft.global_num_items(batch)) == 9.0
    assert float(dft.global_num_items([batch, batch])) == 18.0
    out = dft.causal_lm_loss(tiny_model("llama"), batch)
    assert float(out.stats.num_tokens) == 9.0
    # a bare labels tensor knows nothing of packing: it counts the plain shift (documented)
    assert float(dft.global_num_items(batch["labels"])) == 11.0


def test_shift_labels_are_taken_as_given():
    shifted = torch.tensor([[3, -100, 4, 5]])
    batch = {"labels": torch.zeros(1, 4, dtype=torch.long), "shift_labels": shifted}
    assert causal_targets(batch) is shifted
    assert float(dft.global_num_items(batch)) == 3.0


def test_bad_batches_raise_clear_errors():
    with pytest.raises(ValueError, match="no 'labels'"):
        causal_targets({"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(TypeError, match="mapping"):
        causal_targets([1, 2])
    with pytest.raises(TypeError, match="batches"):
        dft.global_num_items([object()])
    with pytest.raises(ValueError, match="at least one"):
        dft.global_num_items([])
