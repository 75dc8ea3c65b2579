"""config.json -> PaliGemmaConfig with transformers' defaults, and back."""

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


def test_pg2_text_defaults_and_eos_list():
    d = dict(HUB_PG1, hidden_size=2048, projection_dim=2304)
    d["text_config"] = {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                        "vocab_size": 257216, "eos_token_id": [1, 107]}
    d["vision_config"] = dict(HUB_PG1["vision_config"], image_size=448, projection_dim=2304)
    cfg = PaliGemmaConfig.from_hf(d)
    assert cfg == preset("paligemma2-3b-448").replace(image_token_id=257152)
    assert cfg.text.attn_softcap == 50 and cfg.text.final_softcap == 30 and cfg.text.query_pre_attn_scalar == 256
    assert cfg.text.is_sliding(0) and not cfg.text.is_sliding(1)
    assert cfg.eos_token_ids == (1, 107)


@pytest.mark.parametrize("name", list(PRESETS))
def test_round_trip(name):
    cfg = preset(name)
    assert PaliGemmaConfig.from_hf(cfg.to_hf()) == cfg


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
