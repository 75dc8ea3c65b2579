"""config.json -> PaliGemmaConfig with transformers' defaults, and back."""

import dataclasses

import pytest

from palitorch.config import PRESETS, PaliGemmaConfig, preset
from palitorch.errors import ConfigError

# A PaliGemma-1 config.json as published on the Hub (most fields left at their defaults).
HUB_PG1 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "ignore_index": -100, "image_token_index": 257152, "model_type": "paligemma",
    "pad_token_id": 0, "projection_dim": 2048,
    "text_config": {"hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2048, "intermediate_size": 16384,
                    "model_type": "gemma", "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                    "num_key_value_heads": 1, "torch_dtype": "float32", "vocab_size": 257216},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2048, "projector_hidden_act": "gelu_fast", "vision_use_head": False},
}


def test_hub_pg1_defaults():
    cfg = PaliGemmaConfig.from_hf(HUB_PG1)
    assert cfg == preset("paligemma-3b-224")
    assert cfg.vision.image_size == 224 and cfg.num_image_tokens == 256
    assert cfg.text.head_dim == 256 and cfg.text.rope_theta == 10000 and cfg.version == 1


def test_an_image_token_past_the_vocabulary_is_allowed():
    """mlx-vlm's and openpi's configs give vocab_size 257152 and image_token_index 257152: the image token's
    embedding is never looked up, so (as in transformers) it need not be a row of the table. Other ids must be."""
    d = dict(HUB_PG1, text_config=dict(HUB_PG1["text_config"], vocab_size=257152))
    assert PaliGemmaConfig.from_hf(d).image_token_id == 257152
    with pytest.raises(ConfigError, match="pad_token_id is 257152: it must be a token id below"):
        PaliGemmaConfig.from_hf(dict(d, pad_token_id=257152))


def test_image_token_id_is_read_over_image_token_index_as_transformers_reads_it():
    """transformers' PaliGemmaConfig maps `image_token_id` onto `image_token_index`, so a config.json with both (in
    either order) has the image token that `image_token_id` names; palitorch read `image_token_index`, and refused
    the folder (its tokenizer's <image> then differed from the config's). EOS ids nowhere (neither generation nor
    config.json) are none, as in transformers' generation config."""
    from transformers import PaliGemmaConfig as HF

    base = {k: v for k, v in HUB_PG1.items() if k != "image_token_index"}
    for d in ({**base, "image_token_index": 5, "image_token_id": 7}, {**base, "image_token_id": 7,
                                                                      "image_token_index": 5},
              {**base, "image_token_id": 9}, {**base, "image_token_index": 9}):
        assert PaliGemmaConfig.from_hf(d).image_token_id == HF.from_dict(d).image_token_id, d
    with pytest.raises(ConfigError, match="image_token_id is -1: it must be an integer >= 0"):
        PaliGemmaConfig.from_hf({**base, "image_token_index": 5, "image_token_id": -1})
    bare = {**HUB_PG1, "text_config": {k: v for k, v in HUB_PG1["text_config"].items()}}
    bare.pop("eos_token_id")
    assert PaliGemmaConfig.from_hf(bare).eos_token_ids == ()
    assert PaliGemmaConfig.from_hf(PaliGemmaConfig.from_hf(bare).to_hf()).eos_token_ids == ()


def test_pg2_text_defaults_and_eos_list():
    d = dict(HUB_PG1, hidden_size=2048, projection_dim=2304)
    d["text_config"] = {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                        "vocab_size": 257216, "eos_token_id": [1, 107]}
    d["vision_config"] = dict(HUB_PG1["vision_config"], image_size=448, projection_dim=2304)
    cfg = PaliGemmaConfig.from_hf(d)
    assert cfg == preset("paligemma2-3b-448").replace(image_token_id=257152, eos_token_ids=(1,))
    assert cfg.text.attn_softcap == 50 and cfg.text.final_softcap == 30 and cfg.text.query_pre_attn_scalar == 256
    assert cfg.text.is_sliding(0) and not cfg.text.is_sliding(1)
    # EOS where transformers' generate finds it: generation_config.json, else the top level, else text_config
    assert cfg.eos_token_ids == (1,)  # the top level's 1 hides text_config's [1, 107], as in transformers
    assert PaliGemmaConfig.from_hf({k: v for k, v in d.items() if k != "eos_token_id"}).eos_token_ids == (1, 107)
    assert PaliGemmaConfig.from_hf(d, {"eos_token_id": [1, 107]}).eos_token_ids == (1, 107)
    assert PaliGemmaConfig.from_hf(d, {"eos_token_id": 107}).eos_token_ids == (107,)
    # a generation_config.json without EOS ids has none: transformers does not read config.json's then
    assert PaliGemmaConfig.from_hf(d, {"bos_token_id": 2}).eos_token_ids == ()


def test_fields_read_as_transformers_reads_them():
    """Found by fuzzing against transformers: Gemma 1 reads `hidden_act` ("gelu" meaning the tanh approximation)
    and ignores `hidden_activation`, Gemma 2 the reverse; a final soft-cap applies to Gemma 1 too; the top level's
    tie_word_embeddings unties the LM head; RoPE scaling and attention biases, which palitorch does not implement,
    are refused rather than ignored."""
    text = HUB_PG1["text_config"]
    for fields, act in [({"hidden_act": "gelu"}, "gelu_pytorch_tanh"), ({"hidden_activation": "gelu"},
                                                                         "gelu_pytorch_tanh"),
                        ({"hidden_act": "gelu_new", "hidden_activation": "gelu"}, "gelu_new")]:
        t = {k: v for k, v in text.items() if k != "hidden_activation"} | fields
        assert PaliGemmaConfig.from_hf(dict(HUB_PG1, text_config=t)).text.hidden_act == act
    t2 = dict(text, model_type="gemma2", hidden_act="gelu_new", hidden_activation="gelu")
    assert PaliGemmaConfig.from_hf(dict(HUB_PG1, text_config=t2)).text.hidden_act == "gelu"
    t2.pop("hidden_activation")
    assert PaliGemmaConfig.from_hf(dict(HUB_PG1, text_config=t2)).text.hidden_act == "gelu_pytorch_tanh"
    capped = PaliGemmaConfig.from_hf(dict(HUB_PG1, text_config=dict(text, final_logit_softcapping=2.0)))
    assert capped.text.final_softcap == 2.0 and capped.version == 1
    assert PaliGemmaConfig.from_hf(capped.to_hf()) == capped
    untied = PaliGemmaConfig.from_hf(dict(HUB_PG1, tie_word_embeddings=False))
    assert not untied.text.tie_embeddings and PaliGemmaConfig.from_hf(untied.to_hf()) == untied
    for t in (dict(text, rope_scaling={"type": "linear", "factor": 4.0}),
              dict(text, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4})):
        with pytest.raises(ConfigError, match="RoPE scaling 'linear'"):
            PaliGemmaConfig.from_hf(dict(HUB_PG1, text_config=t))
    plain = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e4}, rope_scaling=None)
    assert PaliGemmaConfig.from_hf(dict(HUB_PG1, text_config=plain)) == PaliGemmaConfig.from_hf(HUB_PG1)
    with pytest.raises(ConfigError, match="attention_bias is true"):
        PaliGemmaConfig.from_hf(dict(HUB_PG1, text_config=dict(text, attention_bias=True)))


@pytest.mark.parametrize("name", list(PRESETS))
def test_round_trip(name):
    cfg = preset(name)
    assert PaliGemmaConfig.from_hf(cfg.to_hf()) == cfg


def test_rope_fields_and_empty_subconfigs_as_transformers_reads_them():
    """Found by an audit against transformers: `rope_scaling` (transformers 4's name) replaces rope_parameters
    whenever it is set, its theta included; a sub-config given as {} has its own class's defaults (SigLIP's, Gemma's),
    not PaliGemma's, which only an absent one gets."""
    from transformers import PaliGemmaConfig as HF

    text = HUB_PG1["text_config"]
    cases = [dict(HUB_PG1, text_config=dict(text, rope_scaling={"rope_type": "default", "rope_theta": 321.0})),
             dict(HUB_PG1, text_config=dict(text, rope_scaling={"rope_type": "default"}, rope_theta=500.0,
                                            rope_parameters={"rope_type": "default", "rope_theta": 42.0})),
             dict(HUB_PG1, text_config=dict(text, rope_parameters={"rope_type": "default", "rope_theta": 77.0})),
             dict(HUB_PG1, vision_config={}), dict(HUB_PG1, text_config={}, projection_dim=3072),
             {"model_type": "paligemma"}]
    for d in cases:
        ours, theirs = PaliGemmaConfig.from_hf(d), HF.from_dict(d)
        t, v = theirs.text_config, theirs.vision_config
        assert ours.text.rope_theta == t.rope_parameters["rope_theta"], d
        assert (ours.text.hidden_size, ours.text.num_layers, ours.text.num_heads, ours.text.num_kv_heads) == \
            (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads), d
        assert (ours.vision.hidden_size, ours.vision.num_layers, ours.vision.patch_size) == \
            (v.hidden_size, v.num_hidden_layers, v.patch_size), d
    scaled = dict(text, rope_parameters={"rope_type": "default"}, rope_scaling={"rope_type": "linear", "factor": 4})
    with pytest.raises(ConfigError, match="RoPE scaling 'linear'"):
        PaliGemmaConfig.from_hf(dict(HUB_PG1, text_config=scaled))
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.5"):
        PaliGemmaConfig.from_hf(dict(HUB_PG1, text_config=dict(text, partial_rotary_factor=0.5)))


def test_absent_subconfigs_use_paligemma_defaults():
    cfg = PaliGemmaConfig.from_hf({"model_type": "paligemma"})
    assert cfg.text.num_layers == 18 and cfg.vision.num_layers == 27 and cfg.image_token_id == 256000


def test_errors():
    with pytest.raises(ConfigError, match="not 'paligemma'"):
        PaliGemmaConfig.from_hf({"model_type": "llama"})
    with pytest.raises(ConfigError, match="not supported"):
        PaliGemmaConfig.from_hf({"model_type": "paligemma", "text_config": {"model_type": "gemma3"}})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("paligemma-1b")


def test_every_field_of_a_sparse_config_as_transformers_reads_it():
    """Every field the model uses, for configs that leave most out (a sub-config given as {}: its own class's
    defaults; an absent one: PaliGemma's) or set Gemma 2's optional features to null (no soft-cap, no window), against
    transformers' reading of the same dict. Found by mutation testing: the vision num_attention_heads and
    intermediate_size defaults, and null attn_logit_softcapping / sliding_window read as 50 / 4096, were unchecked."""
    from transformers import PaliGemmaConfig as HF

    text = HUB_PG1["text_config"]
    g2 = dict(text, model_type="gemma2", num_key_value_heads=1)
    cases = [dict(HUB_PG1, vision_config={}), dict(HUB_PG1, text_config={}, projection_dim=3072),
             {"model_type": "paligemma"}, dict(HUB_PG1, text_config={"model_type": "gemma2"}, projection_dim=2304),
             dict(HUB_PG1, text_config=dict(g2, attn_logit_softcapping=None, final_logit_softcapping=None,
                                            sliding_window=None))]
    for d in cases:
        ours, theirs = PaliGemmaConfig.from_hf(d), HF.from_dict(d)
        t, v = theirs.text_config, theirs.vision_config
        g2 = t.model_type == "gemma2"
        assert dataclasses.astuple(ours.vision) == (
            v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size,
            v.num_channels, v.layer_norm_eps, v.hidden_act), d
        want = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                    num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
                    num_kv_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
                    rope_theta=t.rope_parameters["rope_theta"], max_position_embeddings=t.max_position_embeddings,
                    attn_softcap=t.attn_logit_softcapping if g2 else None,
                    final_softcap=getattr(t, "final_logit_softcapping", None),
                    query_pre_attn_scalar=t.query_pre_attn_scalar if g2 else None,
                    sliding_window=t.sliding_window if g2 else None)
        assert {k: getattr(ours.text, k) for k in want} == want, d
