"""Parity against transformers where the other parity tests hold a value fixed: config fields left at their defaults
or equal to one another there (query_pre_attn_scalar = head_dim, rope_theta 10000, norm epsilons 1e-6, SigLIP's
tanh GELU, Gemma 2's attention soft-cap always on), bfloat16's rounding (every other comparison runs in float32),
and a sequence as long as the context. Each test fails on a mutant of palitorch that the rest of the suite let
live (named in its docstring; see the mutation-testing report).

Tolerances: float32 logits within 1e-4 and loss within 1e-5, as in test_parity; bfloat16 pieces bit for bit (the
same operations in the same order).
"""

import dataclasses

import pytest
import torch
from test_parity import LOSS_TOL, _images, assert_training_batch_parity

import palitorch
from palitorch.config import small_preset
from palitorch.model import PaliGemma
from palitorch.model.gemma import Gemma, RMSNorm

from hf_factory import hf_processor

VARIANTS = {
    # PaliGemma 2 28B's shape of scale: query_pre_attn_scalar (144) differs from head_dim (128). Also a RoPE base and
    # norm epsilons large enough to matter at float32's precision.
    "pg2-qpas-theta-eps": dict(version=2, kv_heads=2, text_extra=dict(query_pre_attn_scalar=24, rope_theta=100.0,
                                                                       rms_norm_eps=0.3),
                               vision_extra=dict(layer_norm_eps=0.3)),
    # Gemma 2 without attention soft-capping: its attention takes the SDPA route, which must take the scale too.
    "pg2-nocap-qpas": dict(version=2, kv_heads=2, text_extra=dict(query_pre_attn_scalar=24,
                                                                   attn_logit_softcapping=None)),
    # Gemma 1 with another RoPE base and epsilons; SigLIP with `gelu` (exact GELU in transformers' SigLIP).
    "pg1-theta-eps-gelu": dict(version=1, text_extra=dict(rope_theta=500.0, rms_norm_eps=0.1),
                               vision_extra=dict(hidden_act="gelu", layer_norm_eps=0.2)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_fields_that_other_tests_leave_at_defaults(ckpt_factory, name):
    """Mutants killed: the attention scale ignoring query_pre_attn_scalar (config.attn_scale), SDPA called without
    `scale=`, RoPE's theta ignored, SigLIP's LayerNorms without the config's eps, `gelu` read as the tanh GELU in
    SigLIP. A right-padded training batch: logits at real tokens and the loss."""
    folder, hf = ckpt_factory(name, **VARIANTS[name])
    pipe, proc = palitorch.load(folder), hf_processor(folder)
    inputs = proc(images=_images(2), text=["caption en", "answer en what color is the shape?"],
                  suffix=["a cat sitting on a bench", "red"], return_tensors="pt", padding="longest")
    assert_training_batch_parity(pipe, hf, inputs)


def vivid(ckpt_factory, name: str, **kw):
    """A tiny checkpoint whose vision tower works in GELU's curved range: hf_factory's weights (LayerNorm weights
    around 0, projections of std 0.08) keep SigLIP's activations within +-0.2, where the exact and tanh GELUs agree
    to 1e-6 and a LayerNorm's eps hardly matters. LayerNorm weights around 1 and projections of about twice the
    1/sqrt(fan_in) scale instead. -> (folder, transformers' model)."""
    folder, hf = ckpt_factory(name + "-vivid", **kw)
    if not (folder / ".vivid").exists():
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for n, p in hf.model.vision_tower.named_parameters():
                if "layer_norm" in n or "layernorm" in n:
                    p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
                elif p.ndim == 2 and "position" not in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 2 / p.shape[1] ** 0.5)
        hf.save_pretrained(folder)
        (folder / ".vivid").touch()
    return folder, hf


@pytest.mark.parametrize("name", ["pg1", *VARIANTS])
def test_image_features_match_transformers(ckpt_factory, name):
    """The projected image features themselves, before the decoder, on `vivid` vision weights. With hf_factory's
    weights the image tokens are small beside the text embeddings (scaled by sqrt(hidden)) and SigLIP's activations
    small too, so changes inside SigLIP moved the logits by less than their tolerance: GELU exact vs tanh (either
    way round) and layer_norm1 without the config's eps passed every other test. Within 1e-5 of the features'
    largest value (float32 rounding)."""
    folder, hf = vivid(ckpt_factory, name, **(dict(version=1) if name == "pg1" else VARIANTS[name]))
    pipe, proc = palitorch.load(folder), hf_processor(folder)
    pixels = proc(images=_images(3), text=["caption en"] * 3, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = hf.model.get_image_features(pixels).pooler_output
        ours = pipe.model.embed_image(pixels)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


def test_bfloat16_rms_norm_is_transformers_bit_for_bit():
    """Gemma's RMSNorm in a bfloat16 model: normalised in float32, times (1 + w) in float32, then rounded once, as
    transformers' GemmaRMSNorm / Gemma2RMSNorm. Mutants killed: the norm computed in bfloat16, and rounding before
    the weight (Llama's order). (float32 runs cannot tell them apart.)"""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 17, 96, generator=g) * 7).bfloat16()
    w = (torch.randn(96, generator=g) * 0.5).bfloat16()
    for eps in (1e-6, 0.25):
        ours = RMSNorm(96, eps).bfloat16()
        with torch.no_grad():
            ours.weight.copy_(w)
        for cls in (GemmaRMSNorm, Gemma2RMSNorm):
            theirs = cls(96, eps=eps).bfloat16()
            with torch.no_grad():
                theirs.weight.copy_(w)
                assert torch.equal(ours(x), theirs(x)), (cls.__name__, eps)


def test_bfloat16_embedding_scale_is_rounded_as_transformers_rounds_it():
    """sqrt(hidden) rounded to bfloat16 before it multiplies a bfloat16 embedding (sqrt(48) = 6.93 -> 6.9375), as
    transformers' GemmaTextScaledWordEmbedding does. Mutant killed: the scale kept in float32, which moves about a
    quarter of the embedding's values by one bfloat16 step."""
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

    cfg = small_preset("tiny", vocab_size=50).text
    cfg = dataclasses.replace(cfg, hidden_size=48, num_layers=0)
    ours = Gemma(cfg).bfloat16()
    theirs = GemmaTextScaledWordEmbedding(50, 48, padding_idx=0, embed_scale=48**0.5).bfloat16()
    with torch.no_grad():
        ours.embed_tokens.weight.normal_(generator=torch.Generator().manual_seed(1))
        theirs.weight.copy_(ours.embed_tokens.weight)
        ids = torch.arange(50)[None]
        assert torch.equal(ours.embed(ids), theirs(ids))


def test_a_sequence_as_long_as_the_context():
    """Positions count from 1 (transformers' PaliGemma convention), so a sequence of max_position_embeddings tokens
    reaches position max_position_embeddings: the RoPE table needs one entry more than the context. Mutant killed:
    a table of max_position_embeddings entries (an IndexError at the last position of a full context). The logits
    equal those of the same weights with a longer context (the same angles)."""
    base = small_preset("tiny", vocab_size=300)
    context = base.num_image_tokens + 8
    cfg = base.replace(text=dataclasses.replace(base.text, max_position_embeddings=context))
    torch.manual_seed(0)
    model = PaliGemma(cfg).eval()
    longer = PaliGemma(base).eval()
    longer.load_state_dict(model.state_dict())
    ids = torch.randint(3, 300, (2, context))
    ids[:, :cfg.num_image_tokens] = cfg.image_token_id
    pixels = torch.rand(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    types = torch.zeros_like(ids)
    types[:, -4:] = 1
    with torch.no_grad():
        full = model(ids, pixels, token_type_ids=types).logits
        ref = longer(ids, pixels, token_type_ids=types).logits
    assert full.shape == (2, context, 300)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)


def test_training_forward_loss_and_gradients_match_transformers(pg2):
    """With autograd on (training), the decoder takes other code than at inference (the MLP's training line, the
    attention's separate q/k/v products); every other parity test runs under no_grad. Mutant killed: the training
    line's MLP applying GELU to the up projection instead of the gate. The loss within 1e-5 (float32), and the
    gradients of a decoder and a SigLIP weight within 1e-4 of their largest value."""
    from palitorch.checkpoint.keys import hf_runtime_name

    folder, hf = pg2
    pipe, proc = palitorch.load(folder), hf_processor(folder)
    inputs = proc(images=_images(2), text=["caption en", "ocr"], suffix=["a cat sitting on a bench", "red"],
                  return_tensors="pt", padding="longest")
    model = pipe.model.train()
    names = ["language_model.layers.0.mlp.gate_proj.weight", "vision_tower.layers.1.self_attn.q_proj.weight"]
    try:
        for return_logits in (True, False):
            model.zero_grad()
            hf.zero_grad()
            ours = model(**inputs, return_logits=return_logits)
            ref = hf(**inputs)
            assert abs(ours.loss.item() - ref.loss.item()) < LOSS_TOL
            ours.loss.backward()
            ref.loss.backward()
            theirs = dict(hf.named_parameters())
            for name in names:
                got, want = dict(model.named_parameters())[name].grad, theirs[hf_runtime_name(name, 2)].grad
                torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)
    finally:
        model.eval().zero_grad()
        hf.zero_grad()
