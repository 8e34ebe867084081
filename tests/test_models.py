"""Model coverage: the fused head equals the model's own loss for every family checked (the README lists them)."""

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM

import dft
from dft.models import LOGIT_RULES, find_causal_lm_parts, logit_transform_from_config
from tests.helpers.tiny_models import tiny_model

V = 257
COMMON = {
    "vocab_size": V,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
MOE = {"output_router_logits": True, "router_aux_loss_coef": 0.01, "num_experts_per_tok": 2}
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "final_logit_softcapping": 5.0},
    "gemma3_text": {"head_dim": 16, "final_logit_softcapping": 5.0},
    "cohere": {"logit_scale": 0.5},
    "granite": {"logits_scaling": 4.0},
    "phi3": {"pad_token_id": 0},
    "gpt2": {},
    "gpt_neox": {},
    "falcon": {},
    "olmo2": {},
    "stablelm": {},
    "starcoder2": {},
    "falcon_h1": {"lm_head_multiplier": 0.5},
    "minicpm3": {
        "dim_model_base": 32,
        "num_key_value_heads": 4,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "head_dim": 8,
    },
    "hyperclovax": {"logits_scaling": 0.5},
    "qwen3_moe": {**MOE, "num_experts": 4, "moe_intermediate_size": 32},
    "mixtral": {**MOE, "num_local_experts": 4},
}
_TEXT = {**COMMON, "head_dim": 16}
MULTIMODAL = {
    "gemma3": lambda: AutoConfig.for_model(
        "gemma3",
        text_config={**_TEXT, "final_logit_softcapping": 5.0},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        mm_tokens_per_image=4,
        image_token_index=250,
        boi_token_index=251,
        eoi_token_index=252,
    ),
    "qwen2_vl": lambda: AutoConfig.for_model(
        "qwen2_vl",
        text_config={
            **_TEXT,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=250,
        video_token_id=251,
        vision_start_token_id=252,
    ),
}


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # ~25% masked: a prompt and some padding
    labels[1, -2:] = -100
    return {"input_ids": ids, "labels": labels}


def _check(model):
    model = model.float().eval()
    batch = _batch()
    own = model(**batch).loss
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to the logits path
        ce = dft.causal_lm_loss(model, batch, alpha=0.0)
        fused = dft.causal_lm_loss(model, batch)
    assert ce.fused and fused.fused
    torch.testing.assert_close(ce.loss, own, atol=1e-5, rtol=1e-5)  # CE (+ router aux) == the model's own loss
    logits_path = dft.causal_lm_loss(model, batch, fused=False)
    torch.testing.assert_close(fused.loss, logits_path.loss, atol=1e-5, rtol=1e-5)
    return ce


def _needs(model_type):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"{model_type} is not in this transformers version")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_fused_equals_models_own_loss(family):
    _needs(family)
    config = AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family]})
    torch.manual_seed(0)
    out = _check(AutoModelForCausalLM.from_config(config))
    if family in ("qwen3_moe", "mixtral"):
        assert out.aux_loss is not None and out.aux_loss > 1.0  # the router loss is kept, not dropped


@pytest.mark.parametrize("family", sorted(MULTIMODAL))
def test_multimodal_text_path(family):
    _needs(family)
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the tiny configs here use transformers 5's config format (rope_parameters, text_config)")
    torch.manual_seed(0)
    _check(AutoModelForImageTextToText.from_config(MULTIMODAL[family]()))


def test_moe_aux_loss_in_gradients():
    config = AutoConfig.for_model("mixtral", **{**COMMON, **MOE, "num_local_experts": 4})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    batch = _batch()
    gate = next(p for n, p in model.named_parameters() if n.startswith("model.layers.0.") and ".gate." in n)
    g_own = torch.autograd.grad(model(**batch).loss, [gate])[0]
    out = dft.causal_lm_loss(model, batch, alpha=0.0)
    g_fused = torch.autograd.grad(out.loss, [gate])[0]
    torch.testing.assert_close(g_fused, g_own, atol=1e-6, rtol=1e-4)


def test_unknown_logit_attribute_falls_back_with_one_warning():
    config = LlamaConfig(**{**COMMON, "num_key_value_heads": 2})
    config.output_logit_scale = 2.0  # a family we do not know scales its logits
    model = LlamaForCausalLM(config)
    assert find_causal_lm_parts(model) is None
    with pytest.warns(RuntimeWarning, match="output_logit_scale") as record:
        out = dft.causal_lm_loss(model, _batch())
    assert not out.fused and len(record) == 1


def test_rule_table():
    assert {rule.attribute for rule in LOGIT_RULES} >= {"logit_scale", "logits_scaling", "final_logit_softcapping"}
    granite = AutoConfig.for_model("granite", logits_scaling=4.0)
    assert logit_transform_from_config(granite)[0].logit_scale == 0.25  # Granite divides
    _needs("hyperclovax")
    clova = AutoConfig.for_model("hyperclovax", logits_scaling=4.0)
    assert logit_transform_from_config(clova)[0].logit_scale == 4.0  # HyperCLOVA X multiplies
    neutral = AutoConfig.for_model("llama")
    neutral.some_head_multiplier = 1.0  # neutral values do not force the logits path
    assert logit_transform_from_config(neutral)[0].is_identity


def test_parts_read_softcap_and_tied_head():
    parts = find_causal_lm_parts(tiny_model("gemma2"))
    assert parts.softcap == 5.0 and parts.logit_scale == 1.0
    tied = tiny_model("llama_tied")
    assert find_causal_lm_parts(tied).head.weight is tied.get_input_embeddings().weight
