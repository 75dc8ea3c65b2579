"""16-bit inference against transformers in the same dtype, on CPU: float16's range and non-finite logits.

A float16 model must not overflow where transformers' does not: Gemma 1's one-query attention (every decode step,
and the last layer of a prefill) took two matmuls on CPUs without AMX, whose float16 product q.k overflows at
65,504 before it is scaled, where transformers' SDPA (and palitorch's own prefill) computes the scores in float32.
And NaN or infinite logits at a decode step (not only at the prefill) are a NumericsError, not an answer of pad
tokens with NaN logprobs.
"""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import palitorch

from hf_factory import diverse_weights, hf_generate, write_checkpoint

PROMPTS = ["caption en", "answer en is there a blue circle in the image?", "detect cat ; dog"]

# float16 logprobs of these chaotic weights (hf_factory.diverse_weights), palitorch against transformers in float16:
# both round every product's output to float16 (~2^-11 relative), in different orders (palitorch's decode kernels,
# transformers' SDPA), and the weights amplify it. Measured here (AMD EPYC): 1.1e-5 over 3 x 8 tokens; on the other
# checkpoints of this kind, up to 7e-3 over 16 tokens. A wrong token, or NaN, is what this catches.
FLOAT16_LOGPROB_TOL = 0.01


def images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (30 + 11 * i, 47, 3), dtype=np.uint8)) for i in range(n)]


def large_attention_scores(model, seed):
    """`diverse_weights` with the decoder's q and k projections 10x larger: unscaled q.k reaches ~1e5, over float16's
    65,504, while the scaled scores (head_dim 64: x 1/8) stay in range."""
    diverse_weights(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and ("q_proj" in name or "k_proj" in name):
                p.mul_(10)


def test_float16_gemma1_attention_does_not_overflow_where_transformers_does_not(tmp_path):
    """PaliGemma 1 in float16 whose unscaled q.k exceed float16's range: greedy tokens of a left-padded batch equal
    transformers' float16 `generate` (SDPA), logprobs within FLOAT16_LOGPROB_TOL. Before, the one-query attention's
    float16 matmul gave inf scores on CPUs without AMX, and every answer was a NumericsError."""
    from transformers import PaliGemmaForConditionalGeneration

    folder, _ = write_checkpoint(tmp_path / "ckpt", version=1, head_dim=64, heads=4, kv_heads=1, hidden=64,
                                 init=large_attention_scores, dtype=torch.float16)
    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float16).eval()
    imgs = images(3)
    ref, ref_lp = hf_generate(folder, hf, imgs, PROMPTS, max_new_tokens=8, min_new_tokens=8)
    assert torch.isfinite(ref_lp).all()

    got = palitorch.load(folder, dtype="float16").generate(imgs, PROMPTS, max_new_tokens=8, min_new_tokens=8)
    assert len({tuple(r.token_ids) for r in got}) > 1, "the answers should depend on the input"
    for r, want, want_lp in zip(got, ref.tolist(), ref_lp):
        assert r.token_ids == want
        torch.testing.assert_close(torch.tensor(r.logprobs), want_lp, atol=FLOAT16_LOGPROB_TOL, rtol=0)


@pytest.fixture(scope="module")
def nan_at_decode(tmp_path_factory):
    """An untied checkpoint (LM head not the embedding) whose embedding row of the first answer token is NaN: the
    prefill's logits are finite (the prompt does not hold that token), the first decode step's are NaN."""
    folder, _ = write_checkpoint(tmp_path_factory.mktemp("nan"), version=1, init=diverse_weights,
                                 top_extra={"tie_word_embeddings": False},
                                 text_extra={"tie_word_embeddings": False})
    first = palitorch.load(folder).generate(images(1)[0], PROMPTS[0], max_new_tokens=1).token_ids[0]
    damaged = folder.parent / "damaged"
    shutil.copytree(folder, damaged)
    weights = load_file(damaged / "model.safetensors")
    (key,) = [k for k in weights if k.endswith("embed_tokens.weight")]
    weights[key][first] = float("nan")
    save_file(weights, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    return damaged


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_nan_logits_at_a_decode_step_are_an_error_not_an_answer(nan_at_decode, dtype):
    """NaN logits at a decode step: greedy (with and without top_logprobs), sampled, penalised, beam, streamed and
    live-batch decoding raise NumericsError. Before, only the prefill's logits were checked: greedy answered pad
    tokens with NaN logprobs (finish_reason "length"), and a beam search an empty answer."""
    pipe = palitorch.load(nan_at_decode, dtype=dtype)
    img = images(1)[0]
    calls = [dict(), dict(top_logprobs=2), dict(temperature=1.0, seed=0), dict(repetition_penalty=1.2),
             dict(num_beams=2)]
    for kw in calls:
        with pytest.raises(palitorch.NumericsError, match="NaN or infinite logits") as e:
            pipe.generate(img, PROMPTS[0], max_new_tokens=4, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(palitorch.NumericsError, match="NaN or infinite logits"):
        "".join(pipe.stream(img, PROMPTS[0], max_new_tokens=4))
    with pytest.raises(palitorch.NumericsError, match="NaN or infinite logits"):
        with pipe.live(max_rows=2, max_new_tokens=4) as live:
            live.admit([img], [PROMPTS[0]])
            for _ in range(4):
                live.step()
