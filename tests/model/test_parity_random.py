"""Parity on configurations drawn at random: shapes and settings no hand-written variant combines.

The other parity tests use a few fixed configurations chosen by hand. Here each seed draws a whole one: patch and
image size (4 to 80 pixels, 4 to 25 patches a side), query and KV heads (MHA, GQA, MQA), a head_dim unrelated to
the hidden size, 1 to 4 layers, and for PaliGemma 2 the attention scale, a sliding window shorter than the
sequence or not, and either soft-cap present or absent; RoPE theta and the norms' eps vary too. The checkpoint is
written by transformers in one of the key layouts found on the Hub, in one file or in shards, with weights that
make every greedy token depend on the input (hf_factory.diverse_weights).

Tolerances: greedy tokens equal to transformers' `generate` on a left-padded batch; logprobs (generated and
scored) within `DIVERSE_LOGPROB_TOL` (3e-4, float32 rounding on these chaotic weights; see hf_factory).
"""

import random

import numpy as np
import pytest
import torch
from PIL import Image

import palitorch

from hf_factory import (
    DIVERSE_LOGPROB_TOL,
    diverse_weights,
    hf_generate,
    hf_processor,
    hf_suffix_logprobs,
    write_checkpoint,
)

PROMPTS = ["caption en", "answer en is there a blue circle in the image?", "detect cat ; dog", "ocr"]
SEEDS = (0, 1, 3, 4, 5, 7, 11)  # drawn from range(12) so that the guard below holds


def draw(seed: int) -> dict:
    """One configuration for `write_checkpoint` (and its layout and shards), from a seeded generator."""
    r = random.Random(seed)
    version, patch = r.choice([1, 2]), r.choice([4, 8, 14, 16])
    heads = r.choice([2, 4, 8])
    head_dim = r.choice([8, 16, 32])
    text = {"rope_theta": r.choice([10000.0, 500.0]), "rms_norm_eps": r.choice([1e-6, 1e-5])}
    if version == 2:
        text.update(query_pre_attn_scalar=r.choice([head_dim, 24, 144]), sliding_window=r.choice([4096, 8, 20]),
                    attn_logit_softcapping=r.choice([50.0, 5.0, None]),
                    final_logit_softcapping=r.choice([30.0, 3.0, None]))
    vision_hidden = r.choice([32, 48, 64])
    return dict(version=version, patch_size=patch, image_size=patch * r.choice([1, 2, 3, 5]), heads=heads,
                kv_heads=r.choice([d for d in (1, 2, 4, 8) if heads % d == 0]), head_dim=head_dim,
                hidden=r.choice([32, 48, 64, 96]), layers=r.choice([1, 2, 3, 4]), vision_hidden=vision_hidden,
                vision_heads=r.choice([2, 4]), vision_layers=r.choice([1, 2, 3]), text_extra=text,
                layout=r.choice(["v5", "new", "old"]), shards=r.choice([1, 2]))


def test_the_draws_cover_the_space():
    """Guard: the seeds used must reach what this file claims to test, or a passing run proves less than it says."""
    cfgs = [draw(s) for s in SEEDS]
    assert {c["version"] for c in cfgs} == {1, 2}
    assert any(c["kv_heads"] == 1 for c in cfgs) and any(1 < c["kv_heads"] < c["heads"] for c in cfgs)
    assert any(c["head_dim"] * c["heads"] != c["hidden"] for c in cfgs)
    v2 = [c["text_extra"] for c in cfgs if c["version"] == 2]
    assert any(t["sliding_window"] < 40 for t in v2) and any(t["query_pre_attn_scalar"] == 144 for t in v2)
    assert any(t["attn_logit_softcapping"] is None for t in v2)
    assert {c["layout"] for c in cfgs} >= {"new", "old"} and {c["shards"] for c in cfgs} == {1, 2}
    assert any(c["image_size"] == c["patch_size"] for c in cfgs), "an image of one patch"


@pytest.mark.parametrize("seed", SEEDS)
def test_a_drawn_configuration_generates_and_scores_as_transformers(tmp_path, seed):
    cfg = draw(seed)
    folder, hf = write_checkpoint(tmp_path / "ckpt", seed=seed, init=diverse_weights, **cfg)
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray(rng.integers(0, 256, (30 + 11 * i, 47, 3), dtype=np.uint8)) for i in range(3)]
    steps = 24

    ref, ref_lp = hf_generate(folder, hf, imgs, PROMPTS[:3], max_new_tokens=steps, min_new_tokens=steps)

    pipe = palitorch.load(folder)
    got = pipe.generate(imgs, PROMPTS[:3], max_new_tokens=steps, min_new_tokens=steps)
    assert len({tuple(r.token_ids) for r in got}) > 1, "the answers should depend on the input"
    for r, want, want_lp in zip(got, ref.tolist(), ref_lp):
        assert r.token_ids == want, cfg
        torch.testing.assert_close(torch.tensor(r.logprobs), want_lp, atol=DIVERSE_LOGPROB_TOL, rtol=0)

    suffix = "<loc0010><loc0020><loc0500><loc0600> cat ; a dog"
    scored = pipe.score(imgs[1], PROMPTS[3], suffix)
    ids, want = hf_suffix_logprobs(hf_processor(folder), hf, imgs[1], PROMPTS[3], suffix)
    assert scored.token_ids == ids
    torch.testing.assert_close(torch.tensor(scored.logprobs), want, atol=DIVERSE_LOGPROB_TOL, rtol=0)
