"""The fast path against the plain one: compiled decode steps (and the batch sizes they run at), fused q/k/v and
gate/up weights, the oneDNN and skinny-kernel routes for large CPU linears (the logsumexp logprob and the one-token
attention variants: test_fast_attention.py). Each gives transformers' greedy tokens, logprobs within
`DIVERSE_LOGPROB_TOL` (3e-4: float32 on CPU, same weights, see hf_factory); the kernel's bfloat16 products give
torch's bfloat16 tokens.
"""

import threading

import pytest
import torch
from test_generate import PROMPTS, STEPS, diverse, images

import palitorch
from palitorch.inference import generate as engine
from palitorch.inference.sampling import GenerationOptions

from hf_factory import DIVERSE_LOGPROB_TOL, hf_generate


def test_replacement_decode_steps_are_used_for_every_token(ckpt_factory):
    """The hooks `Pipeline.compile` fills (compiled step functions) run each one-token step; prefill stays eager.
    Greedy decoding calls `greedy` (forward and choice in one), sampling and repetition penalties `logits`.
    The real torch.compile takes tens of seconds on CPU, so this checks the plumbing with counting wrappers."""
    folder, _ = diverse(ckpt_factory, 2)
    pipe = palitorch.load(folder)
    imgs = images(2)
    kinds = [{}, {"temperature": 0.8, "seed": 1}, {"repetition_penalty": 1.3}]
    plain = [pipe.generate(imgs, PROMPTS[:2], max_new_tokens=6, min_new_tokens=6, **kw) for kw in kinds]
    calls = []

    def counting(name, fn):
        def step(model, tokens, *args):
            calls.append((name, tokens.shape))
            return fn(model, tokens, *args)
        return step

    pipe._steps = engine.Steps(counting("logits", engine.token_forward), counting("greedy", engine.greedy_forward))
    assert [pipe.generate(imgs, PROMPTS[:2], max_new_tokens=6, min_new_tokens=6, **kw) for kw in kinds] == plain
    assert calls == [("greedy", (2,))] * 5 + [("logits", (2,))] * 10
    assert "".join(pipe.stream(imgs[0], PROMPTS[0], max_new_tokens=6, min_new_tokens=6)) == plain[0][0].text
    assert calls[15:] == [("greedy", (1,))] * 5


def test_a_compiled_pipeline_pads_greedy_batches_to_a_size_it_has_run(ckpt_factory):
    """A compiled step compiles anew for every batch size, so greedy batches run at the smallest size already run
    at between n and 2n, else at the next of 1, 2, 3, 4, 6, 8, ..., padded with copies of the last request
    (answers dropped; the same answers as unpadded). Sampled batches and beams keep their size. Counting wrappers
    stand in for torch.compile."""
    folder, _ = diverse(ckpt_factory, 2)
    pipe = palitorch.load(folder)
    imgs, prompts = images(5), (PROMPTS * 2)[:5]
    opts = {"max_new_tokens": 4, "min_new_tokens": 4}
    plain = {n: pipe.generate(imgs[:n], prompts[:n], **opts) for n in (1, 2, 3, 5)}
    sampled = pipe.generate(imgs[:3], prompts[:3], temperature=0.8, seed=1, **opts)
    beams = pipe.generate(imgs[:3], prompts[:3], num_beams=2, **opts)
    rows, encoded = [], []

    def counting(fn):
        def step(model, tokens, *args):
            rows.append(tokens.shape[0])
            return fn(model, tokens, *args)
        return step

    encode = pipe.model.vision_tower.forward
    pipe.feature_cache.resize(0)  # (the tower sees each batch's images: none kept from earlier calls)
    pipe.model.vision_tower.forward = lambda pixels: encoded.append(len(pixels)) or encode(pixels)
    pipe._steps = engine.Steps(counting(engine.token_forward), counting(engine.greedy_forward))
    rungs = []
    for n in range(1, 14):  # with nothing compiled yet
        pipe._greedy_batches.clear()
        rungs.append(pipe._padded_size(n, GenerationOptions()))
    assert rungs == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    pipe._greedy_batches.clear()
    sizes = []
    for n in (3, 2, 5, 1, 2):
        rows.clear()
        got = pipe.generate(imgs[:n], prompts[:n], **opts)  # a list of n answers, as without padding
        assert [(r.token_ids, r.text) for r in got] == [(r.token_ids, r.text) for r in plain[n]]
        # float32 logprobs within 1e-5: BLAS may block a product differently at another batch size (Intel oneDNN)
        torch.testing.assert_close([r.logprobs for r in got], [r.logprobs for r in plain[n]], atol=1e-5, rtol=0)
        assert len(set(rows)) == 1
        sizes.append(rows[0])
    assert sizes == [3, 3, 6, 1, 3]  # 2 reuses 3; 5 has none in [5, 10]: 6, the next rung; 1 none in [1, 2]
    assert encoded[-1] == 2  # the padding row shares the last request's image: the vision tower sees 2 images
    rows.clear()
    assert pipe.generate(imgs[:3], prompts[:3], temperature=0.8, seed=1, **opts) == sampled
    assert set(rows) == {3}
    assert pipe.generate(imgs[:3], prompts[:3], num_beams=2, **opts) == beams
    assert pipe.generate(imgs[0], prompts[0], **opts) == plain[1][0]  # one input, one answer


@pytest.mark.parametrize("version", [1, 2])
def test_fused_projections_match_transformers_and_stay_trainable(ckpt_factory, tmp_path, version):
    """`fuse_projections` (what `Pipeline.compile` runs): q/k/v and gate/up as one matmul each. Greedy tokens equal
    transformers', logprobs within 3e-4; the separate weights become views of the fused ones, so a training step
    on them (grad mode, which takes the unfused path) moves the fused matrices too; the model still saves."""
    folder, hf = diverse(ckpt_factory, version)
    pipe = palitorch.load(folder)
    pipe.model.language_model.fuse_projections()
    attn = pipe.model.language_model.layers[0].attn
    assert attn.qkv is not None and attn.q_proj.weight.data_ptr() == attn.qkv.data_ptr()
    imgs = images(3)
    ours = pipe.generate(imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
    ref, ref_lp = hf_generate(folder, hf, imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
    assert [r.token_ids for r in ours] == ref.tolist()
    torch.testing.assert_close(torch.tensor([r.logprobs for r in ours]), ref_lp, atol=DIVERSE_LOGPROB_TOL, rtol=0)

    before = attn.qkv.clone()
    opt = torch.optim.SGD(pipe.model.parameters(), lr=0.1)
    pipe.model.train()
    out = pipe.model(torch.tensor([[2, 5, 7, 9]]), labels=torch.tensor([[2, 5, 7, 9]]))
    out.loss.backward()
    assert attn.q_proj.weight.grad is not None and attn.v_proj.weight.grad is not None
    opt.step()
    assert not torch.equal(attn.qkv, before)
    n = attn.q_proj.weight.shape[0]
    assert torch.equal(attn.qkv[:n], attn.q_proj.weight)
    palitorch.checkpoint.save_model(pipe.model, tmp_path / "saved")  # shared storage is copied out, not refused
    again = palitorch.checkpoint.load_model(tmp_path / "saved")
    assert torch.equal(again.language_model.layers[0].attn.q_proj.weight, attn.q_proj.weight)


@pytest.mark.parametrize("route", ["onednn", "skinny"])
@pytest.mark.parametrize("version", [1, 2])
def test_linear_routes_match_transformers(ckpt_factory, request, route, version):
    """Large float32 CPU weights at inference: every linear (vision tower, projector, fused decoder projections, LM
    head) through oneDNN, or every product of at most 8 rows (the decode steps' projections and LM head, the
    prefill's last-position LM head) through palitorch's own kernel. Greedy tokens equal transformers', logprobs
    within 3e-4; eager and compiled."""
    from palitorch.model import kernels

    if route == "onednn" and not kernels._onednn_works():
        pytest.skip("oneDNN's linear is not available in this torch build")
    calls = request.getfixturevalue(f"{route}_calls")  # the route forced for every product it can take, counted
    folder, hf = diverse(ckpt_factory, version)
    imgs = images(3)
    ref, ref_lp = hf_generate(folder, hf, imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
    pipe = palitorch.load(folder)
    for _ in ("eager", "compiled"):
        ours = pipe.generate(imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
        assert [r.token_ids for r in ours] == ref.tolist()
        torch.testing.assert_close(torch.tensor([r.logprobs for r in ours]), ref_lp, atol=DIVERSE_LOGPROB_TOL,
                                   rtol=0)
        pipe.compile()
    per_step = {"onednn": 2 * STEPS, "skinny": 4 * (STEPS - 1)}[route]  # eager calls: at least these a layer
    assert calls[route] > per_step * len(pipe.model.language_model.layers)


@pytest.mark.parametrize("version", [1, 2])
def test_prefills_in_blocks_match_transformers(ckpt_factory, monkeypatch, version):
    """A prefill's and a scoring pass's MLP blocks (decoder and vision tower) in blocks of 128 rows, and Gemma 2's
    explicit attention in blocks of 16 query positions (both byte budgets set to nothing; these tiny models'
    prefills have 3 x ~265 rows): greedy tokens equal transformers', logprobs within 3e-4, scores within 3e-4 of
    the whole pass's; the blocks ran."""
    from palitorch.model import gemma, kernels, siglip

    monkeypatch.setattr(kernels, "ROW_BLOCK_BYTES", 1)
    monkeypatch.setattr(gemma, "SCORE_BLOCK_BYTES", 1)
    blocks, queries = [], []
    for cls in (gemma.DecoderLayer, siglip.VisionLayer):
        def counted(self, x, _orig=cls._mlp_block):
            blocks.append(x.shape[0] if x.dim() == 2 else -1)
            return _orig(self, x)
        monkeypatch.setattr(cls, "_mlp_block", counted)
    real_explicit = gemma.Attention._explicit

    def explicit(self, q, *args):
        queries.append(q.shape[2])
        return real_explicit(self, q, *args)

    monkeypatch.setattr(gemma.Attention, "_explicit", explicit)
    folder, hf = diverse(ckpt_factory, version)
    imgs = images(3)
    ref, ref_lp = hf_generate(folder, hf, imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
    pipe = palitorch.load(folder)
    ours = pipe.generate(imgs, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
    assert [r.token_ids for r in ours] == ref.tolist()
    torch.testing.assert_close(torch.tensor([r.logprobs for r in ours]), ref_lp, atol=DIVERSE_LOGPROB_TOL, rtol=0)
    layers = len(pipe.model.language_model.layers)
    assert blocks.count(kernels.ROW_BLOCK_MIN_ROWS) >= 2 * layers
    if version == 2:  # Gemma 2's prefill: every layer in blocks of 16 query positions (and a last, shorter one)
        assert queries.count(16) >= 2 * layers and max(queries) == 16
    scored = pipe.score(imgs[0], PROMPTS[0], "a red circle")
    monkeypatch.setattr(kernels, "ROW_BLOCK_BYTES", 1 << 40)
    monkeypatch.setattr(gemma, "SCORE_BLOCK_BYTES", 1 << 40)
    whole = pipe.score(imgs[0], PROMPTS[0], "a red circle")
    torch.testing.assert_close(torch.tensor(scored.logprobs), torch.tensor(whole.logprobs),
                               atol=DIVERSE_LOGPROB_TOL, rtol=0)


@pytest.mark.parametrize("version", [1, 2])
def test_bfloat16_products_through_the_kernel_match_torchs(ckpt_factory, skinny_calls, version):
    """bfloat16 on CPU, every product of at most 8 rows through palitorch's kernel, against the same pipeline on
    torch's bfloat16 kernels: the same greedy tokens, logprobs within 0.02 nats (both round float32 sums to bfloat16
    once, so an output may differ by one bfloat16 step; measured here: equal). Eager: a compiled bfloat16 step
    rounds differently from eager torch whatever the kernel (inductor keeps fused chains in float32); that the
    compiled graph calls the kernel is tested in tests/model/test_skinny.py."""
    from palitorch.model import kernels

    folder, _ = diverse(ckpt_factory, version)
    imgs, opts = images(3), {"max_new_tokens": STEPS, "min_new_tokens": STEPS}
    kernels.use_skinny(False)
    try:
        ref = palitorch.load(folder, dtype="bfloat16").generate(imgs, PROMPTS, **opts)
    finally:
        kernels.use_skinny(True)
    assert skinny_calls["skinny"] == 0
    pipe = palitorch.load(folder, dtype="bfloat16")
    ours = pipe.generate(imgs, PROMPTS, **opts)
    assert [r.token_ids for r in ours] == [r.token_ids for r in ref]
    torch.testing.assert_close(torch.tensor([r.logprobs for r in ours]), torch.tensor([r.logprobs for r in ref]),
                               atol=0.02, rtol=0)
    assert skinny_calls["skinny"] > 4 * (STEPS - 1) * len(pipe.model.language_model.layers)


def test_compile_puts_the_decoders_weights_in_huge_pages(ckpt_factory, monkeypatch):
    """On CPU, `Pipeline.compile` moves the decoder's 2D weights (here all of them: the size floor set to 0) into
    huge-page memory where Linux offers it, fused matrices with their views; the answers do not change (to the bit,
    against the same pipeline without huge pages). The real torch.compile is stubbed out (this is about the
    weights, not the compiler)."""
    from palitorch.model import kernels

    if not (hasattr(__import__("mmap"), "MADV_HUGEPAGE") and kernels._thp_mode() in ("always", "madvise")):
        pytest.skip("no transparent huge pages on this system")
    folder, _ = diverse(ckpt_factory, 2)
    imgs, opts = images(2), {"max_new_tokens": 6, "min_new_tokens": 6}
    monkeypatch.setattr(kernels, "HUGE_PAGES_MIN_BYTES", 0)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    with monkeypatch.context() as m:  # the same pipeline without huge pages: the reference answers
        m.setattr(kernels, "_thp_mode", lambda: "never")
        before = palitorch.load(folder).compile().generate(imgs, PROMPTS[:2], **opts)
    pipe = palitorch.load(folder).compile()
    lm = pipe.model.language_model
    weights = [t for t in [*lm.parameters(), *lm.buffers()] if t.dim() == 2]
    assert all(t.untyped_storage().data_ptr() % kernels.HUGE_PAGE == 0 for t in weights)
    attn = lm.layers[0].attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv.untyped_storage().data_ptr()
    assert pipe.generate(imgs, PROMPTS[:2], **opts) == before


def test_compile_options_merge_a_mode_with_extra_options(monkeypatch):
    from palitorch.inference.pipeline import _compile_options
    from palitorch.model import kernels

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _compile_options(cuda, "reduce-overhead") == {"mode": "reduce-overhead"}
    merged = _compile_options(cuda, "reduce-overhead", {"coordinate_descent_tuning": True})
    assert merged == {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}
    for slow_blas in (True, False):
        monkeypatch.setattr(kernels, "BLAS_ONE_ROW_SLOW", slow_blas)
        base = {"cpp_wrapper": True, **({"post_grad_fusion_options": {"decompose_mm_pass": {}}} if slow_blas else {})}
        assert _compile_options(cpu, None) == {"options": {**base, "cpp.threads": 1}}
        assert _compile_options(cpu, None, {"cpp.threads": 2}) == {"options": {**base, "cpp.threads": 2}}
        assert _compile_options(cpu, None, single_thread=False) == {"options": base}  # FlexAttention on CPU


def test_outputs_are_copied_only_under_cuda_graphs():
    """A CUDA graph's outputs live in memory its next replay overwrites, so the decode loop copies them; a compiled
    step without graphs (mode None on a GPU) need not pay for the copy."""
    from palitorch.inference.pipeline import _compile_options, _cuda_graphs

    cuda = torch.device("cuda")
    graphs = {(m, str(o)): _cuda_graphs(_compile_options(cuda, m, o)) for m, o in [
        (None, None), ("default", None), ("reduce-overhead", None), ("max-autotune", None),
        ("max-autotune-no-cudagraphs", None), ("reduce-overhead", {"coordinate_descent_tuning": True}),
        (None, {"triton.cudagraphs": True}), ("reduce-overhead", {"triton.cudagraphs": False})]}
    assert [k for k, on in graphs.items() if on] == [
        ("reduce-overhead", "None"), ("max-autotune", "None"),
        ("reduce-overhead", "{'coordinate_descent_tuning': True}"), (None, "{'triton.cudagraphs': True}")]
    assert palitorch.load().compile()._steps.copy_outputs is False  # (CPU)
    from torch._inductor import config

    with config.patch({"triton.cudagraphs": True}):  # (as TORCHINDUCTOR_CUDAGRAPHS=1 sets it)
        assert _cuda_graphs(_compile_options(cuda, None)) and _cuda_graphs(_compile_options(cuda, "default"))


def test_compiled_step_keeps_compiling_past_dynamo_limit():
    """Each batch size compiles its own static-shape graph of one code object, and past dynamo's limit (8 graphs
    by default) the step would run eagerly (a log line only); `compile()` raises the limit. Here the limit starts at 1:
    two batch sizes still give two compiled graphs, each used for its decode steps."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    from palitorch.inference.caches import _RECOMPILE_LIMIT

    torch._dynamo.reset()  # (an earlier test's model freed, this one can take its id: its graphs would be reused)
    with dynamo_config.patch(**{_RECOMPILE_LIMIT: 1}):
        pipe = palitorch.load().compile()
        assert getattr(dynamo_config, _RECOMPILE_LIMIT) == 256 and dynamo_config.accumulated_recompile_limit >= 256
        img = images(1)[0]
        before = counters["stats"]["unique_graphs"]
        for b in (1, 2):
            calls = 0
            steps = pipe._steps

            def counting(*args, step=steps.greedy):
                nonlocal calls
                calls += 1
                return step(*args)

            pipe._steps = engine.Steps(steps.logits, counting, steps.copy_outputs)
            pipe.generate([img] * b, ["caption en"] * b, max_new_tokens=3, min_new_tokens=3)
            pipe._steps = steps
            assert calls == 2
        assert counters["stats"]["unique_graphs"] - before == 2

    # dynamo's settings are per thread: one that did not call compile() (a server's model thread) gets it raised too
    seen = []

    def other_thread():
        with dynamo_config.patch(**{_RECOMPILE_LIMIT: 1}):
            pipe.generate(img, "caption en", max_new_tokens=2)
            seen.append(getattr(dynamo_config, _RECOMPILE_LIMIT))

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen == [256]

