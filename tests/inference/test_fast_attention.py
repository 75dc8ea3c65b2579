"""The fast path's attention against the plain one and transformers: the one-token step's variants (SDPA, matmuls,
FlexAttention), which one runs by default, how the explicit products are laid out, and the logsumexp logprob.
Tolerances as in test_fast_path.py (logprobs within DIVERSE_LOGPROB_TOL, 3e-4)."""

import types

import pytest
import torch
from test_generate import PROMPTS, STEPS, diverse, images

import palitorch
from palitorch.inference import generate as engine

from hf_factory import DIVERSE_LOGPROB_TOL, hf_generate


def test_token_logprobs_equal_log_softmax_at_the_tokens():
    """Both ways of computing a chosen token's logprob: log_softmax (CPU) and logit - logsumexp (other devices)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 1000, generator=g) * 8).bfloat16()
    tokens = torch.tensor([5, 999, 0])
    want = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(engine.token_logprobs(logits, tokens), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(engine.logsumexp_logprobs(logits.float(), tokens), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,version", [("matmul", 1), ("flex", 1), ("flex", 2)])
def test_decode_attention_variants_match_transformers(ckpt_factory, monkeypatch, kind, version):
    """`set_decode_attention`: one-token steps attend with two matmuls and a softmax ("matmul"; Gemma 2 always
    does) or, compiled, one FlexAttention kernel with the mask and soft-cap as a score modification ("flex").
    Same greedy tokens as transformers, logprobs within 3e-4, eager and compiled with extra inductor options."""
    folder, hf = diverse(ckpt_factory, version)
    imgs = images(3)
    ref, ref_lp = hf_generate(folder, hf, imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
    from palitorch.model.gemma import Attention

    seen, real_flex = types.SimpleNamespace(flex=False), Attention._flex

    def spy(self, *args):
        seen.flex = True  # an attribute store: no guard on a value that changes (a list would recompile each call)
        return real_flex(self, *args)

    monkeypatch.setattr(Attention, "_flex", spy)
    pipe = palitorch.load(folder)
    pipe.model.language_model.set_decode_attention(kind)
    for _ in ("eager", "compiled"):
        ours = pipe.generate(imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
        assert [r.token_ids for r in ours] == ref.tolist()
        torch.testing.assert_close(torch.tensor([r.logprobs for r in ours]), ref_lp, atol=DIVERSE_LOGPROB_TOL,
                                   rtol=0)
        pipe.compile(options={"coordinate_descent_tuning": True})
    with pytest.raises(ValueError, match="sdpa"):
        pipe.model.language_model.set_decode_attention("flash")
    assert seen.flex == (kind == "flex")  # the compiled step went through FlexAttention


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_decode_attention_is_sdpa_except_on_cpus_without_amx(ckpt_factory, monkeypatch, dtype):
    """The default ("auto"): Gemma 1's one-token steps attend through SDPA, except on a CPU without AMX, where they
    take the two matmuls (torch's one-query SDPA kernel was the slower there, in bfloat16 and in float32); prefills
    attend through SDPA everywhere. Eager and compiled steps alike."""
    import torch.nn.functional as F

    from palitorch.model import gemma

    one_token_sdpa = gemma.CPU_HAS_AMX

    folder, _ = diverse(ckpt_factory, 1)
    seen, real = types.SimpleNamespace(one_token=False, prefill=False), F.scaled_dot_product_attention

    def spy(q, *args, **kw):
        if q.shape[-2] == 1:
            seen.one_token = True  # an attribute store, as in the test above: no guard, no recompilation
        else:
            seen.prefill = True
        return real(q, *args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    pipe = palitorch.load(folder, dtype=dtype)
    assert pipe.model.language_model.layers[0].attn.decode_attention == "auto"
    for _ in ("eager", "compiled"):
        seen.one_token = seen.prefill = False
        pipe.generate(images(1), PROMPTS[0], max_new_tokens=4, min_new_tokens=4)
        assert seen.one_token == one_token_sdpa and seen.prefill
        torch._dynamo.reset()  # a compiled step calls the spy when it is traced: trace it anew
        pipe.compile()


def test_explicit_attention_multiplies_every_query_head_of_a_kv_head_at_once(ckpt_factory, monkeypatch):
    """Gemma 2's attention (two matmuls, the soft-cap between them), in a one-token step with GQA: each product takes
    the G query heads that share a KV head as G rows against that head's keys, with no broadcasting. Broadcasting
    the keys over G made products of one row, which inductor's CPU lowering turns into a multiply-and-sum that
    recomputed the query for every key: PaliGemma 2's compiled mid-size step at batch 8 took 104 ms, 65 of them in
    that kernel (BENCHMARKS.md, session 16). Greedy tokens and logprobs stay transformers' (the tests above)."""
    folder, _ = diverse(ckpt_factory, 2)  # 4 query heads, 2 KV heads: G = 2
    pipe = palitorch.load(folder)
    g = pipe.model.cfg.text.num_heads // pipe.model.cfg.text.num_kv_heads
    assert g == 2
    shapes, real = [], torch.matmul

    def spy(a, b):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b)

    monkeypatch.setattr(torch, "matmul", spy)
    pipe.generate(images(3), PROMPTS, max_new_tokens=2, min_new_tokens=2)
    layers = pipe.model.cfg.text.num_layers
    assert len(shapes) == 2 * 2 * layers  # prefill and one step, two products a layer
    for i, (a, b) in enumerate(shapes):
        assert a[:-2] == b[:-2] and len(a) == 4, (a, b)  # [B, K, rows, .] @ [B, K, ., .]: nothing broadcast
        if i >= 2 * layers:  # the one-token step
            assert a[-2] == g, (a, b)  # its one position, for each of the G heads


def test_one_query_head_per_kv_head_multiplies_through_baddbmm_on_cpu(ckpt_factory, monkeypatch):
    """With as many KV heads as query heads (no real PaliGemma has that; test checkpoints often do), a one-token
    step's explicit attention (Gemma 2's; Gemma 1's "matmul" variant is the same code) multiplies one row per KV
    head. On CPU those products go through `baddbmm`: inductor lowers a one-row `matmul` into a multiply-and-sum
    that recomputed the rotated query for every key (BENCHMARKS.md, session 18). Eager and compiled: transformers'
    greedy tokens, logprobs within 3e-4, and the step's products through baddbmm with one row."""
    folder, hf = diverse(ckpt_factory, 2, kv_heads=4)
    imgs = images(3)
    ref, ref_lp = hf_generate(folder, hf, imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
    pipe = palitorch.load(folder)
    text = pipe.model.cfg.text
    assert text.num_heads == text.num_kv_heads == 4
    rows, real = [], torch.baddbmm

    def spy(zero, a, b, **kw):
        rows.append(a.shape[-2])
        return real(zero, a, b, **kw)

    monkeypatch.setattr(torch, "baddbmm", spy)
    for run in ("eager", "compiled"):
        rows.clear()
        ours = pipe.generate(imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
        assert [r.token_ids for r in ours] == ref.tolist(), run
        torch.testing.assert_close(torch.tensor([r.logprobs for r in ours]), ref_lp, atol=DIVERSE_LOGPROB_TOL,
                                   rtol=0)
        # Two products a layer a step, and two in the prefill's last layer, which queries one position. (A compiled
        # step replays the spy's list appends, as side effects of the traced code.)
        assert rows == [1] * (2 * text.num_layers * (STEPS - 1) + 2), (run, len(rows))
        torch._dynamo.reset()
        pipe.compile()
