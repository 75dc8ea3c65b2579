"""The one-token decode steps: compiled greedy (forward and choice in one graph), sampling and repetition-penalty
steps against eager, and that a step never makes the host wait for the device.

Tolerances: tokens equal; logprobs within 1e-4 (float32 on CPU, same weights, compiled vs eager).
"""

import dataclasses

import pytest
import torch
from test_generate import PROMPTS, images, windowed
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import palitorch
from palitorch.config import preset
from palitorch.inference import generate as engine
from palitorch.model import PaliGemma


def test_compiled_steps_match_eager_with_a_sliding_window(ckpt_factory, tmp_path):
    """Gemma 2 with a window (100) shorter than the sequence, so that the sliding mask matters. Greedy (the fused
    step, with and without min_new_tokens), seeded sampling, a repetition penalty and beam search (the logits
    step, choice outside): the compiled pipeline gives eager's tokens and logprobs."""
    folder, _ = windowed(ckpt_factory, tmp_path)
    imgs = images(2)
    kinds = [{"min_new_tokens": 20}, {}, {"temperature": 0.9, "seed": 3}, {"repetition_penalty": 1.5},
             {"num_beams": 2}]
    pipe = palitorch.load(folder)
    eager = [pipe.generate(imgs, PROMPTS[:2], max_new_tokens=20, **kw) for kw in kinds]
    pipe.compile()
    compiled = [pipe.generate(imgs, PROMPTS[:2], max_new_tokens=20, **kw) for kw in kinds]
    for want, got in zip(eager, compiled):
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        for w, g in zip(want, got):
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-4, rtol=0)
    assert len(eager[0][0].token_ids) == 20
    assert eager[2] != eager[1] and eager[3] != eager[1]  # the options changed the answers


def test_compiled_cpu_step_at_batch_1_calls_no_blas():
    """`compile()` on CPU has inductor write its own kernels for one-row products with small matrices (the bundled
    model's are all under 2048 x 2048), in place of BLAS calls whose fixed cost exceeds the work: the decode steps
    make no aten::mm / addmm call (prefill, eager, does)."""
    from torch.profiler import ProfilerActivity, profile

    pipe = palitorch.load().compile()
    img = images(1)[0]

    def blas_calls(n: int) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pipe.generate(img, "caption en", max_new_tokens=n, min_new_tokens=n)
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))

    pipe.generate(img, "caption en", max_new_tokens=8, min_new_tokens=8)  # compiles
    assert blas_calls(2) > 0
    assert blas_calls(8) == blas_calls(2)


class HostWaits(TorchDispatchMode):
    """Records every operation that would make the host wait for a GPU: reading a device value on the host
    (`.item()`, `bool()`, `.tolist()`), and device tensors made from host data (`torch.tensor(..., device=...)`,
    which copies and then synchronises; it happens below this mode, so it shows up as an operand that no
    operation seen here produced). CPU scalars (0-dim) are allowed: a kernel takes them as arguments."""

    def __init__(self, known):
        super().__init__()
        self.seen = {id(t): t for t in known}
        self.waits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if "_local_scalar_dense" in name:
            self.waits.append(f"{name}: a device value read on the host")
        for t in tree_leaves((args, kwargs)):
            if not isinstance(t, torch.Tensor):
                continue
            if t.device.type == "cpu" and t.dim() > 0:
                self.waits.append(f"{name}: a host tensor of shape {tuple(t.shape)} as an operand")
            elif t.device.type != "cpu" and id(t) not in self.seen:
                self.waits.append(f"{name}: a device tensor {tuple(t.shape)} made outside the step's operations")
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.seen[id(t)] = t
        return out


@pytest.mark.parametrize("version", [1, 2])
def test_a_decode_step_never_waits_for_the_device(version):
    """Both step functions and the cursor's bookkeeping, on the meta device (no data: every operation must be a
    device operation). Real PaliGemma layer shapes and vocabulary, 2 layers; Gemma 2 with a sliding window."""
    cfg = preset("paligemma-3b-224" if version == 1 else "paligemma2-3b-224")
    text = dataclasses.replace(cfg.text, num_layers=2, layer_types=cfg.text.layer_types and cfg.text.layer_types[:2],
                               sliding_window=cfg.text.sliding_window and 8)
    with torch.device("meta"):
        model = PaliGemma(cfg.replace(text=text)).eval()
    b, t, s = 2, 5, 16
    model.setup_caches(b, s)
    prompts = engine.Prompts(torch.zeros(b, t, dtype=torch.long, device="meta"),
                             torch.ones(b, t, dtype=torch.bool, device="meta"), None, [t] * b)
    with torch.inference_mode():
        cur = engine.Cursor(model, prompts, s)
        assert (cur.window is not None) == (version == 2)
        tok = torch.zeros(b, dtype=torch.long, device="meta")
        done = torch.zeros(b, dtype=torch.bool, device="meta")
        no_eos, eos = torch.zeros(1, dtype=torch.bool, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
        engine.token_forward(model, tok, *cur.step())  # builds the RoPE table once
        known = [*model.parameters(), *model.buffers(), *model.language_model._rope, tok, done, no_eos, eos,
                 cur.valid, cur.pos, cur.slots]
        spy = HostWaits(known)
        with spy:
            for _ in range(2):
                tok, lp, done = engine.greedy_forward(model, tok, *cur.step(), done, no_eos, eos, 0)
                logits = engine.token_forward(model, tok, *cur.step())
    assert spy.waits == []
    assert tok.shape == lp.shape == done.shape == (b,) and logits.shape == (b, cfg.text.vocab_size)


def test_the_wait_detector_sees_host_waits():
    """The detector above, on the two kinds of wait it must catch (the step once made the first at each token)."""
    w = torch.empty(3, device="meta")
    spy = HostWaits([w])
    with spy:
        w * torch.tensor(2.0, device="meta")
        w * torch.tensor(2.0)  # a host scalar: allowed
    assert len(spy.waits) == 1 and "made outside" in spy.waits[0]
    spy = HostWaits([w])
    with spy, pytest.raises(RuntimeError):  # a meta tensor has no value to read, but the attempt is seen
        w.sum().item()
    assert len(spy.waits) == 1 and "read on the host" in spy.waits[0]


@pytest.mark.parametrize("gpu_speed", ["keeps up", "lags"])
def test_done_watch_on_cuda_reads_flags_late_but_never_the_current_one(gpu_speed):
    """The CUDA policy with stand-in flags (on CPU): a flag is read when it has arrived, or waited for once 4 steps
    old, never when just made; a batch that finished at step 10 is stopped at most 7 steps later."""
    reads = []

    class Flag:
        def __init__(self, flag, step):
            self.flag, self.step = bool(flag), step

        def ready(self):
            return gpu_speed == "keeps up"

        def value(self):
            reads.append((self.step, now))
            return self.flag

    watch = engine.DoneWatch(torch.device("cuda"), make_flag=Flag)
    for now in range(64):
        if watch.finished(torch.tensor([now >= 10, True]), now):
            break
    assert 10 < now <= 17
    assert all(made < at for made, at in reads)
    assert all(at - made == (1 if gpu_speed == "keeps up" else 4) for made, at in reads)
    cpu = engine.DoneWatch(torch.device("cpu"))
    assert not cpu.finished(torch.tensor([True, False]), 0) and cpu.finished(torch.tensor([True, True]), 1)


def test_under_cuda_graphs_a_shape_seen_before_decodes_into_its_earlier_caches(ckpt_factory, tmp_path):
    """Steps as CUDA graphs run them (`copy_outputs`, a cache pool; eager here): greedy, a beam search (one cache
    row per beam), then both again: each decodes into the caches it had the first time (a graph replays only on the
    memory it was recorded on; new caches would be recorded anew). Answers as without a pool; at most POOLED
    shapes are kept."""
    from palitorch.inference import caches

    folder, _ = windowed(ckpt_factory, tmp_path)
    pipe = palitorch.load(folder)
    imgs, kinds = images(2), [{}, {"num_beams": 3}, {"temperature": 0.8, "seed": 1}]
    want = [pipe.generate(imgs, PROMPTS[:2], max_new_tokens=12, **kw) for kw in kinds]
    pool: dict = {}
    pipe._steps = engine.Steps(copy_outputs=True, caches=pool)
    used = []
    for _ in range(2):
        for kw, answers in zip(kinds, want):
            assert pipe.generate(imgs, PROMPTS[:2], max_new_tokens=12, **kw) == answers
            used.append(pipe.model.language_model.layers[0].attn.kv_cache.k.data_ptr())
    assert used[3:] == used[:3] and used[0] == used[2] != used[1]  # (sampling: greedy's shape, greedy's caches)
    assert sorted(rows for rows, _ in pool) == [2, 6]
    for n in (3, 4, 8):  # other batch sizes (as a compiled pipeline pads them): the least recently used goes
        pipe.generate(images(n), PROMPTS[:1] * n, max_new_tokens=4)
    assert [rows for rows, _ in pool] == [2, 3, 4, 8] and len(pool) == caches.POOLED
    t = pipe.model.language_model.layers[0].attn.kv_cache.k.shape[2]
    for key in ((2, t + 128), (2, t + 64)):  # of the pooled caches that fit, the fewest slots (each step reads all)
        pipe.model.setup_caches(*key)
        caches.keep_caches(pipe.model, pool)
    pipe.model.setup_caches(1, 64)
    assert caches.ensure_caches(pipe.model, 2, t - 32, pool) == t + 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_matches_cpu_and_stops_early():
    """On a GPU (run where one is lent): the bundled model under `compile(mode="reduce-overhead")` (CUDA graphs,
    whose outputs the next step overwrites) gives the CPU's tokens, and a batch whose answers all end early stops
    within a few steps of it without a blocking read (`DoneFlag`)."""
    from PIL import Image

    imgs = [Image.new("RGB", (64, 64), c) for c in [(200, 30, 30), (30, 160, 40), (40, 40, 200)]]
    prompts = ["answer en what color is the shape?", "caption en", "answer en what color is the shape?"]
    want = palitorch.load().generate(imgs, prompts, max_new_tokens=64)
    pipe = palitorch.load(device="cuda").compile(mode="reduce-overhead")
    for _ in range(2):  # the first call records the graphs, the second replays them
        got = pipe.generate(imgs, prompts, max_new_tokens=64)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all(r.finish_reason == "eos" for r in got)
    calls = 0
    steps = pipe._steps

    def counting(*args):
        nonlocal calls
        calls += 1
        return steps.greedy(*args)

    pipe._steps = engine.Steps(steps.logits, counting, steps.copy_outputs)
    pipe.generate(imgs, prompts, max_new_tokens=64)
    # the worst case: a flag made just before the last row ended, read 4 steps later, then the next 4 after that
    assert calls <= max(len(r.token_ids) for r in want) + 7


def test_a_compiled_pipeline_decodes_at_few_shapes_whatever_the_lengths():
    """A compiled step is a static-shape graph per batch size and cache length: varied prompts, max_new_tokens and
    batch sizes (greedy, samples, a live batch) must land on few cache lengths (64 x 1, 2, 3, 4, 6, ... slots) and
    greedy batches on the batch ladder (1, 2, 3, 4, 6, 8), so that a server stops compiling; 64-slot rounding alone
    kept making new ones."""
    import random

    from palitorch.inference import caches

    assert [caches.cache_length(n, compiled=True) for n in (1, 64, 65, 129, 193, 257, 300, 385, 600, 8000)] == \
        [64, 64, 128, 192, 256, 384, 384, 512, 768, 8192]
    assert [caches.cache_length(n) for n in (1, 65, 300, 8000)] == [64, 128, 320, 8000]  # (eager: 64-slot rounding)
    pipe = palitorch.load()
    shapes = set()

    def recording(fn):
        def step(model, tokens, pos, slot, valid, *rest):
            shapes.add((fn.__name__, *valid.shape))  # [B, S]
            return fn(model, tokens, pos, slot, valid, *rest)
        return step

    pipe._steps = engine.Steps(recording(engine.token_forward), recording(engine.greedy_forward),
                               greedy_top=recording(engine.greedy_top_forward), compiled=True)
    rng = random.Random(0)
    words = "what is the colour and shape of this thing in the picture".split()
    for _ in range(40):
        n = rng.randint(1, 8)
        prompts = [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(n)]
        kw = rng.choice([{}, {"temperature": 0.8}, {"top_logprobs": 2}])
        pipe.generate(images(n), prompts, max_new_tokens=rng.randint(1, 64), min_new_tokens=1, **kw)
    with pipe.live(max_rows=4) as live:
        live.admit(images(2), ["caption en", " ".join(words * 3)], options=[{"max_new_tokens": 50}] * 2)
        while live.active:
            live.step()
    assert {b for fn, b, _ in shapes if fn != "token_forward"} <= {1, 2, 3, 4, 6, 8}  # (sampled: any size)
    assert all(caches.cache_length(s, compiled=True) == s for _, _, s in shapes), shapes
    assert len({s for _, _, s in shapes}) <= 4 and len(shapes) <= 40, shapes
