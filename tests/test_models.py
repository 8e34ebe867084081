from dft.models import find_causal_lm_parts
from tests.helpers.tiny_models import tiny_model


def test_parts_read_softcap_and_tied_head():
    parts = find_causal_lm_parts(tiny_model("gemma2"))
    assert parts.softcap == 5.0 and parts.logit_scale == 1.0
    tied = tiny_model("llama_tied")
    assert find_causal_lm_parts(tied).head.weight is tied.get_input_embeddings().weight
