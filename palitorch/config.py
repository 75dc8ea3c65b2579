"""Model configuration: plain dataclasses, named presets, and the mapping to and from Hugging Face config.json.

`PaliGemmaConfig.from_hf(d)` reads a Hub `config.json` dict and applies the same defaults transformers applies to
fields a checkpoint leaves out; `to_hf()` writes a dict that both palitorch and transformers read back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from palitorch.config_keys import (
    ACTIVATIONS,
    GEMMA2_DEFAULTS,
    GEMMA_DEFAULTS,
    LAYER_TYPES,
    PG_TEXT_DEFAULTS,
    PG_VISION_DEFAULTS,
    Keys,
)
from palitorch.errors import ConfigError


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (no pooling head)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TextConfig:
    """Gemma decoder. Gemma 2 is Gemma 1 plus the flags in the second block of fields (of which a Gemma 1
    text_config may set `final_softcap` too)."""

    vocab_size: int = 257216
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_layers: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    hidden_act: str = "gelu_pytorch_tanh"
    tie_embeddings: bool = True  # the LM head is the token embedding (else a matrix of its own, `lm_head`)
    # Gemma 2
    post_norms: bool = False  # post-attention and post-feedforward RMSNorms
    attn_softcap: float | None = None  # attention logits -> c * tanh(x / c)
    final_softcap: float | None = None  # output logits -> c * tanh(x / c)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (else head_dim ** -0.5)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # "sliding_attention" / "full_attention" per layer

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return (
            self.sliding_window is not None
            and self.layer_types is not None
            and self.layer_types[layer] == "sliding_attention"
        )


def _alternating_layers(n: int) -> tuple[str, ...]:
    """Gemma 2's default `layer_types`: sliding attention on even layers (0, 2, ...), full on odd ones."""
    return tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n))


@dataclass(frozen=True)
class PaliGemmaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 257152
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def version(self) -> int:
        """1 for a Gemma decoder, 2 for a Gemma 2 decoder."""
        return 2 if self.text.post_norms else 1

    def replace(self, **changes) -> PaliGemmaConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json

    @classmethod
    def from_hf(cls, d: dict, generation: dict | None = None) -> PaliGemmaConfig:
        """Read a Hub PaliGemma `config.json` dict, applying transformers' defaults for absent fields.

        Every value the model uses is checked for type and range here, so a damaged config.json fails with a
        ConfigError naming the key as config.json spells it, not deep inside the model. `generation`: the
        folder's generation_config.json, whose EOS ids come first, as transformers' `generate` reads them.
        """
        if d.get("model_type") != "paligemma":
            raise ConfigError(
                f"config.json has model_type {d.get('model_type')!r}, not 'paligemma': "
                "point palitorch at a PaliGemma checkpoint folder"
            )
        top = Keys(d)
        v, t = top.section("vision_config", PG_VISION_DEFAULTS), top.section("text_config", PG_TEXT_DEFAULTS)
        vision = VisionConfig(
            hidden_size=v.integer("hidden_size", 768),
            intermediate_size=v.integer("intermediate_size", 3072),
            num_layers=v.integer("num_hidden_layers", 12),
            num_heads=v.integer("num_attention_heads", 12),
            image_size=v.integer("image_size", 224),
            patch_size=v.integer("patch_size", 16),
            num_channels=v.integer("num_channels", 3),
            layer_norm_eps=v.number("layer_norm_eps", 1e-6),
            hidden_act=v.choice("hidden_act", "gelu_pytorch_tanh", ACTIVATIONS),
        )
        text_type = t.d.get("model_type", "gemma")
        if text_type not in ("gemma", "gemma2"):
            raise ConfigError(f"text_config.model_type {text_type!r} is not supported (gemma or gemma2)")
        g2 = text_type == "gemma2"
        defaults = GEMMA2_DEFAULTS if g2 else GEMMA_DEFAULTS
        num_layers = t.integer("num_hidden_layers", defaults["num_hidden_layers"])
        # RoPE: `rope_scaling` (transformers 4's name) replaces `rope_parameters` whenever it is set, as transformers
        # reads them; a theta missing there comes from text_config itself
        rope = t.section("rope_scaling" if t.d.get("rope_scaling") else "rope_parameters", {})
        theta = rope.number("rope_theta", 10000.0) if "rope_theta" in rope.d else t.number("rope_theta", 10000.0)
        kind = rope.d.get("rope_type", rope.d.get("type"))
        if kind not in (None, "default"):
            raise ConfigError(f"text_config asks for RoPE scaling {kind!r}, which palitorch does not implement "
                              "(PaliGemma uses plain RoPE)")
        partial = rope.d.get("partial_rotary_factor", t.d.get("partial_rotary_factor", 1.0))
        if partial != 1:
            raise ConfigError(f"text_config asks for partial_rotary_factor {partial!r}, which palitorch does not "
                              "implement (PaliGemma rotates every dimension of a head)")
        if t.d.get("attention_bias"):
            raise ConfigError("text_config.attention_bias is true: palitorch's Gemma has no attention biases, as "
                              "PaliGemma's has none")
        if g2:  # transformers' Gemma 2 reads only `hidden_activation`
            act = t.choice("hidden_activation", "gelu_pytorch_tanh", ACTIVATIONS)
        else:  # its Gemma reads only `hidden_act`, where "gelu" is a legacy spelling of the tanh approximation
            act = t.choice("hidden_act", "gelu_pytorch_tanh", ACTIVATIONS)
            act = "gelu_pytorch_tanh" if act == "gelu" else act
        tie = d.get("tie_word_embeddings", True)
        if not isinstance(tie, bool):
            top.fail("tie_word_embeddings", tie, "true or false")
        layer_types = t.d.get("layer_types")
        if g2 and layer_types is None:
            layer_types = list(_alternating_layers(num_layers))
        if g2 and not (isinstance(layer_types, list) and len(layer_types) == num_layers
                       and all(x in LAYER_TYPES for x in layer_types)):
            t.fail("layer_types", layer_types, f"a list of {num_layers} (num_hidden_layers) {'/'.join(LAYER_TYPES)}")
        text = TextConfig(
            vocab_size=t.integer("vocab_size", defaults["vocab_size"]),
            hidden_size=t.integer("hidden_size", defaults["hidden_size"]),
            intermediate_size=t.integer("intermediate_size", defaults["intermediate_size"]),
            num_layers=num_layers,
            num_heads=t.integer("num_attention_heads", defaults["num_attention_heads"]),
            num_kv_heads=t.integer("num_key_value_heads", defaults["num_key_value_heads"]),
            head_dim=t.integer("head_dim", 256),
            rms_norm_eps=t.number("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=t.integer("max_position_embeddings", 8192),
            hidden_act=act,
            post_norms=g2,
            attn_softcap=t.number("attn_logit_softcapping", 50.0, optional=True) if g2 else None,
            # (PaliGemma applies a final soft-cap that any text_config sets, Gemma 1's too)
            final_softcap=t.number("final_logit_softcapping", 30.0 if g2 else None, optional=True),
            query_pre_attn_scalar=t.number("query_pre_attn_scalar", 256, optional=True) if g2 else None,
            sliding_window=t.integer("sliding_window", 4096, optional=True) if g2 else None,
            layer_types=tuple(layer_types) if (g2 and layer_types) else None,
            tie_embeddings=tie,
        )
        if vision.hidden_size % vision.num_heads:
            v.fail("num_attention_heads", vision.num_heads, f"a divisor of hidden_size {vision.hidden_size}")
        if vision.image_size < vision.patch_size:
            v.fail("image_size", vision.image_size, f"at least patch_size {vision.patch_size}")
        if text.num_heads % text.num_kv_heads:
            t.fail("num_key_value_heads", text.num_kv_heads, f"a divisor of num_attention_heads {text.num_heads}")
        if text.head_dim % 2:
            t.fail("head_dim", text.head_dim, "even (RoPE rotates pairs of dimensions)")
        # EOS, an id or a list of ids, where transformers' `generate` finds it: a folder's generation_config.json
        # alone (one without eos_token_id has none: config.json's are not read then), else the top level of
        # config.json, else text_config (read only when the top level has none), else none. (Generation also stops
        # at the tokenizer's <eos>, inference.generate.eos_ids.)
        sources = [generation] if generation is not None else [d, t.d]
        eos = next((x for x in (s.get("eos_token_id") for s in sources) if x is not None), [])
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        pad = d.get("pad_token_id", 0)
        # with both set, transformers reads `image_token_id` (its alias of `image_token_index`)
        image_key = "image_token_id" if "image_token_id" in d else "image_token_index"
        tokens = {image_key: d.get(image_key, 256000), "pad_token_id": 0 if pad is None else pad,
                  "bos_token_id": d.get("bos_token_id", 2) or 2}
        for key, i in [*tokens.items(), *(("eos_token_id", i) for i in eos)]:
            # The image token may lie past the vocabulary (mlx-vlm and openpi configs: 257152 of 257152): its
            # embedding is never looked up (`PaliGemma.embed`), as in transformers. The others are looked up.
            limit = math.inf if key == image_key else text.vocab_size
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < limit:
                top.fail(key, i, "an integer >= 0" if key == image_key else
                         f"a token id below text_config.vocab_size, {text.vocab_size}")
        cfg = cls(
            vision=vision,
            text=text,
            image_token_id=tokens[image_key],
            pad_token_id=tokens["pad_token_id"],
            bos_token_id=tokens["bos_token_id"],
            eos_token_ids=tuple(dict.fromkeys(eos)),
        )
        projection_dim = top.integer("projection_dim", 2048)
        if projection_dim != text.hidden_size:
            raise ConfigError(
                f"projection_dim {projection_dim} differs from text hidden_size {text.hidden_size}: "
                "the checkpoint's config.json is inconsistent"
            )
        return cfg

    def to_hf(self) -> dict:
        """A config.json dict in the layout transformers writes (round-trips through `from_hf`)."""
        v, t = self.vision, self.text
        text = {
            "model_type": "gemma2" if self.version == 2 else "gemma",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": t.hidden_act,  # the name transformers' Gemma reads
            "hidden_activation": t.hidden_act,  # and Gemma 2's
            "num_image_tokens": self.num_image_tokens,
        }
        if t.final_softcap is not None:
            text["final_logit_softcapping"] = t.final_softcap
        if self.version == 2:
            text.update(
                attn_logit_softcapping=t.attn_softcap,
                final_logit_softcapping=t.final_softcap,
                query_pre_attn_scalar=t.query_pre_attn_scalar,
                sliding_window=t.sliding_window,
                layer_types=list(t.layer_types) if t.layer_types else None,
                eos_token_id=list(self.eos_token_ids) or None,
            )
        return {
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "model_type": "paligemma",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids) or None,
            "pad_token_id": self.pad_token_id,
            "image_token_index": self.image_token_id,
            "hidden_size": t.hidden_size,
            "projection_dim": t.hidden_size,
            "vocab_size": t.vocab_size,
            "tie_word_embeddings": t.tie_embeddings,
            "text_config": text,
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.num_channels,
                "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": v.hidden_act,
                "projection_dim": t.hidden_size,
                "num_image_tokens": self.num_image_tokens,
                "vision_use_head": False,
            },
        }


def _pg1(image_size: int) -> PaliGemmaConfig:
    return PaliGemmaConfig(vision=VisionConfig(image_size=image_size), text=TextConfig())


def _pg2(image_size: int, size: str) -> PaliGemmaConfig:
    text = {
        "3b": dict(hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8, num_kv_heads=4,
                   query_pre_attn_scalar=256),
        "10b": dict(hidden_size=3584, intermediate_size=14336, num_layers=42, num_heads=16, num_kv_heads=8,
                    query_pre_attn_scalar=256),
        "28b": dict(hidden_size=4608, intermediate_size=36864, num_layers=46, num_heads=32, num_kv_heads=16,
                    head_dim=128, query_pre_attn_scalar=144),
    }[size]
    return PaliGemmaConfig(
        vision=VisionConfig(image_size=image_size),
        text=TextConfig(
            **text, post_norms=True, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096,
            layer_types=_alternating_layers(text["num_layers"]),
        ),
        eos_token_ids=(1, 107),
    )


def _tiny(vocab_size: int, version: int = 1, image_size: int = 64, patch_size: int = 8,
          hidden: int = 128, layers: int = 2, heads: int = 4) -> PaliGemmaConfig:
    """The small from-scratch shape used for the bundled easy-VQA model (~1M parameters with the defaults).

    Both towers get `layers` layers of width `hidden`, MLP x4, `heads` heads; the decoder has 1 KV head.
    """
    n = layers
    g2 = version == 2
    d = hidden // heads
    return PaliGemmaConfig(
        vision=VisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers, num_heads=heads,
                            image_size=image_size, patch_size=patch_size),
        text=TextConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_layers=n, num_heads=heads,
            num_kv_heads=1, head_dim=d, max_position_embeddings=512, post_norms=g2,
            attn_softcap=50.0 if g2 else None, final_softcap=30.0 if g2 else None,
            query_pre_attn_scalar=d if g2 else None, sliding_window=4096 if g2 else None,
            layer_types=_alternating_layers(n) if g2 else None,
        ),
    )


PRESETS = {
    "paligemma-3b-224": lambda: _pg1(224),
    "paligemma-3b-448": lambda: _pg1(448),
    "paligemma-3b-896": lambda: _pg1(896),
    "paligemma2-3b-224": lambda: _pg2(224, "3b"),
    "paligemma2-3b-448": lambda: _pg2(448, "3b"),
    "paligemma2-3b-896": lambda: _pg2(896, "3b"),
    "paligemma2-10b-224": lambda: _pg2(224, "10b"),
    "paligemma2-28b-224": lambda: _pg2(224, "28b"),
}


# Named from-scratch shapes for `palitorch train` ([model] preset): arguments of `_tiny` besides vocab and image.
SMALL_PRESETS = {
    "tiny": {"hidden": 128, "layers": 2, "heads": 4},  # 1.1M parameters (the bundled easy-VQA model, 1,543-token vocab)
    "small": {"hidden": 256, "layers": 4, "heads": 4},  # 7.5M
    "base": {"hidden": 384, "layers": 6, "heads": 6},  # 24M
}


def small_preset(name: str, vocab_size: int, version: int = 1, image_size: int = 64,
                 patch_size: int = 8) -> PaliGemmaConfig:
    """A small from-scratch configuration, e.g. `small_preset("tiny", vocab_size=1500)`."""
    if name not in SMALL_PRESETS:
        raise ConfigError(f"unknown small preset {name!r}; choose one of: {', '.join(SMALL_PRESETS)}")
    return _tiny(vocab_size, version, image_size, patch_size, **SMALL_PRESETS[name])


def preset(name: str) -> PaliGemmaConfig:
    """A named full-size configuration, e.g. `preset("paligemma2-3b-448")`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
