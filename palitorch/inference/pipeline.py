"""The user-facing object: a loaded model with its processor. `palitorch.load(path)` returns one."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from palitorch.checkpoint import load_model, merge_adapter, read_adapter, read_config, resolve_dtype
from palitorch.errors import CheckpointError, InputError
from palitorch.inference import generate as engine
from palitorch.inference.answer import Result
from palitorch.inference.caches import batch_rung_below, ladder, raise_recompile_limit
from palitorch.inference.continuous import LiveBatch
from palitorch.inference.features import FeatureCache, Images, distinct_images
from palitorch.inference.inputs import (
    as_batch,
    check_compile_args,
    check_count,
    check_images,
    check_quantize,
    check_strings,
    chunks,
    flat_images,
    marked_prompts,
    model_paths,
    resolve_device,
)
from palitorch.inference.processor import Processor
from palitorch.inference.sampling import GenerationOptions, batch_seed
from palitorch.inference.stream import BatchStream, Stream, streamable
from palitorch.model import PaliGemma, kernels, quant


@dataclass
class ScoreResult:
    token_ids: list[int]  # the suffix tokens followed by <eos>
    logprobs: list[float]  # log p(token | image, prefix, earlier suffix tokens), one per token

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


class Pipeline:
    """A loaded PaliGemma and its processor (`palitorch.load` makes one): `generate`, `stream`, `stream_batch`,
    `live` (continuous batching), `score`, and `compile` for a faster decode step.

    The KV caches live on the model, so a pipeline runs one call at a time: calls from several threads wait for
    each other (a lock; it is safe to share a pipeline between threads, though they do not run in parallel). A
    stream, a `stream_batch` or a live batch owns the caches from its start to its end, also while it waits between
    pieces: meanwhile the pipeline's other generations (from any thread) raise InputError rather than wait, since
    its consumer may be the one calling. `score` does not use the caches and runs between a stream's pieces."""

    def __init__(self, model: PaliGemma, processor: Processor, path: str | Path | None = None):
        self.model = model
        self.processor = processor
        self.path = Path(path) if path is not None else None
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._lock = threading.RLock()  # one call at a time: the KV caches, compiled steps and batch sizes are shared
        self._busy = False  # a stream or live batch is open (maybe suspended between pieces): it owns the KV caches
        self._owner: tuple[int, str] = (0, "")  # the thread that opened it (ident, name)
        self._collected = False  # whether a refusal has run the cycle collector since it opened
        self._steps: engine.Steps | None = None  # compiled one-token decode steps, once `compile()` is called
        self._greedy_batches: set[int] = set()  # batch sizes greedy decoding has run at since `compile()`
        self._cache_pool: dict = {}  # live batches' KV caches by (rows, slots), reused (see `LiveBatch.pool`)
        self.feature_cache = FeatureCache()  # recent images' features (`feature_cache.resize(0)` turns it off)
        kernels.prepare(model.parameters())  # which CPU kernel each linear takes (checks and timings, once a process)
        quant.prepare(model.language_model)  # and each int8 product, if the decoder is quantized

    @property
    def cfg(self):
        return self.model.cfg

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "(no folder)"
        dtype = str(self.dtype).removeprefix("torch.")
        q = quant.quantization_of(self.model.language_model)
        return f"Pipeline({where}, PaliGemma {self.cfg.version}, device={self.device}, dtype={dtype}" + (
            f", quantize={q})" if q else ")")

    def _pixels(self, images) -> tuple[Images, torch.Tensor | None]:
        """Each input's image(s) -> (the U distinct images, resized on the host, their features computed by the
        prefill that needs them, through `feature_cache`; index [N] of the inputs' N images in order (see
        `flat_images`), or None when all N are distinct). An image given more than once (the same object, or the
        same path) is preprocessed once; one seen lately (`FeatureCache`) skips the vision tower."""
        check_images(images)
        distinct, index = distinct_images(flat_images(images))
        pixels = Images(self.processor.resized_batch(distinct), self.model, self.processor, self.feature_cache)
        return pixels, None if index is None else torch.tensor(index, device=self.device)

    def score(self, image, prefix, suffix, batch_size: int | None = None) -> ScoreResult | list[ScoreResult]:
        """Log-probabilities of `suffix + <eos>` given the image and prefix; lists give a list. Without `batch_size`
        a list is one padded batch (its memory grows with the list); with it, batches of that many at a time."""
        images, prefixes, suffixes, single = as_batch(image, prefix, suffix)
        check_strings(prefixes, "a prompt (prefix)")
        prefixes = marked_prompts(images, prefixes)
        check_strings(suffixes, "an answer to score (suffix)")
        parts = chunks(len(prefixes), batch_size)
        with self._lock:  # no KV cache: this may run between a stream's pieces
            results = [r for part in parts for r in self._score(images[part], prefixes[part], suffixes[part])]
        return results[0] if single else results

    @torch.inference_mode()
    def _score(self, images: list, prefixes: list[str], suffixes: list[str]) -> list[ScoreResult]:
        enc = [self.processor.encode(p, s) for p, s in zip(prefixes, suffixes)]
        batch = self.processor.collate(enc, padding_side="right")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        pixels, index = self._pixels(images)
        out = self.model(batch["input_ids"], pixels.features(), batch["attention_mask"], batch["token_type_ids"],
                         image_index=index)
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        target = batch["input_ids"][:, 1:]
        picked = logp.gather(-1, target[..., None])[..., 0]  # [B, T-1]: log p(token t+1 | tokens <= t)
        engine.check_finite(picked[batch["attention_mask"][:, 1:].bool()])  # real tokens only, not the padding
        results = []
        for i, e in enumerate(enc):
            n_prefix = e.types.index(1)
            ids = e.ids[n_prefix:]
            lp = picked[i, n_prefix - 1: len(e.ids) - 1].tolist()
            results.append(ScoreResult(token_ids=ids, logprobs=lp))
        return results

    # ------------------------------------------------------------------ generation

    def compile(self, mode: str | None = None, options: dict | None = None, fuse: bool = True) -> Pipeline:
        """Compile the one-token decode step with `torch.compile` (opt-in; returns the pipeline).

        Decoding then runs as one fused graph per step: the token's embedding, the forward and, when greedy, the
        choice of the next token and its logprob (the bundled model: ~3x faster per token on CPU than eager; on
        GPU `mode="reduce-overhead"` makes each step one CUDA graph). With `fuse`, the q/k/v and gate/up weights
        are each fused into one matrix; on CPU the decoder's large weights move to memory in transparent huge pages
        where Linux offers them (`kernels.use_huge_pages`). The first call for each batch size and cache length pays
        the compilation (tens of seconds on CPU, ~20-35 s for the 3B models on an H200); the results are the same
        tokens as without it. Greedy batches are padded to sizes, and caches sized to lengths, that keep
        compilations few (see `_padded_size` and `caches.cache_length`).
        `options`: inductor settings on top of the mode's, e.g. {"coordinate_descent_tuning": True}.
        Compile again after changing the model's structure (e.g. `set_decode_attention`).
        """
        check_compile_args(mode, options)  # (before anything changes: fusing, huge pages)
        with self._lock:
            self._claim()  # a stream or live batch may be mid-step in another thread: not under its feet
            return self._compile(mode, options, fuse)

    def _compile(self, mode: str | None, options: dict | None, fuse: bool) -> Pipeline:
        lm = self.model.language_model
        if fuse:
            lm.fuse_projections()  # fewer, larger matmuls per step
        if self.device.type == "cpu":  # the decoder's weights in huge pages: fewer TLB misses as each step reads them
            kernels.use_huge_pages([t for t in [*lm.parameters(), *lm.buffers()] if t.dim() == 2])
        raise_recompile_limit()
        kernels.prepare([*self.model.parameters(), *self.model.buffers()])  # (the fused matrices are buffers)
        # inductor's CPU FlexAttention kernel, compiled single-threaded, frees memory twice (torch 2.13): let it be
        flex = any(layer.attn.decode_attention == "flex" for layer in lm.layers)
        settings = _compile_options(self.device, mode, options, single_thread=not flex)
        self._greedy_batches.clear()
        graphs = self.device.type != "cpu" and _cuda_graphs(settings)
        self._steps = engine.Steps(
            logits=torch.compile(engine.token_forward, dynamic=False, **settings),
            greedy=torch.compile(engine.greedy_forward, dynamic=False, **settings),
            copy_outputs=graphs,  # (their output memory is reused)
            greedy_top=torch.compile(engine.greedy_top_forward, dynamic=False, **settings),  # compiled on first use
            caches={} if graphs else None,  # (a graph replays on the caches it was recorded on)
            compiled=True,
        )
        return self

    def _claim(self) -> None:
        """Before a generation (under `_lock`): refuse while a stream or live batch owns the caches; on a compiled
        pipeline, raise dynamo's recompile limit in this thread (a server's model thread is not the one that called
        `compile`)."""
        if self._busy and not self._collected:  # (once: ~0.1 s under the lock, which the owner's steps wait for)
            self._collected = True
            gc.collect()  # one dropped inside a reference cycle ends when the cycle is collected
        if self._busy:
            where = "" if self._owner[0] == threading.get_ident() else \
                f" in thread {self._owner[1]!r} (other threads: try again once it ends)"
            raise InputError(f"a stream or live batch from this pipeline is still open{where}: finish it (break out "
                             "of the stream, close() it, or leave the live batch's with block) first")
        if self._steps is not None:
            raise_recompile_limit()

    def _take(self) -> None:
        """(Under `_lock`, after `_claim`) a stream or live batch now owns the KV caches."""
        self._busy, self._collected = True, False
        self._owner = (threading.get_ident(), threading.current_thread().name)

    def _one_at_a_time(self, events):
        """Run a generator's steps under the lock (yielding outside it) -> its return value: a pipeline's calls from
        other threads wait for a step to end."""
        while True:
            with self._lock:
                try:
                    item = next(events)
                except StopIteration as stop:
                    return stop.value
            yield item

    def generate(self, image, prompt, options: GenerationOptions | dict | None = None, batch_size: int | None = None,
                 **kw) -> Result | list[Result]:
        """Answer a prompt about an image; lists of images and prompts give a list; one image with a list of prompts,
        or one prompt with a list of images, pairs it with each. In a list, an item that is itself a list of images
        is one prompt's several images (`[[a, b], c]`: two inputs). Without `batch_size` a list runs as one left-padded
        batch (its memory grows with the list); with it, as batches of that many at a time, in order (greedy
        answers are the same; a seeded sample depends on its batch, and batch k draws its own random numbers, from
        `batch_seed(seed, k)`: copies of one input in different batches get different samples).

        Decoding options are keyword arguments (or a GenerationOptions, or a dict of them): max_new_tokens=64,
        min_new_tokens=0, temperature, top_k, top_p, min_p, repetition_penalty=1.0, num_beams=1, length_penalty=1.0,
        early_stopping=False (beam search: True, False or "never", as transformers),
        seed, stop, and top_logprobs=0 (k: also report each step's k most likely tokens). Greedy by default. Returns
        a `Result` (text, token_ids, logprobs, finish_reason, prompt_tokens, and top_logprobs when asked for).
        Calls from several threads run one at a time (see `Pipeline`).
        """
        opts = GenerationOptions.from_kwargs(options, **kw)
        images, prompts, single = as_batch(image, prompt)
        prompts = marked_prompts(images, prompts)
        parts = chunks(len(prompts), batch_size)
        results = []
        with self._lock:
            self._claim()
            for k, part in enumerate(parts):
                o = opts if k == 0 or not opts.do_sample else replace(opts, seed=batch_seed(opts.seed, k))
                pixels, index, padded = self._padded(images[part], prompts[part], o)
                out = engine.generate(self.model, self.processor, pixels, padded, o, self._steps, index)
                results += out[:len(prompts[part])]  # not the padding copies
        return results[0] if single else results

    def _padded(self, images: list, prompts: list[str], opts: GenerationOptions):
        """(pixels, image index, prompts) of a batch padded to `_padded_size` with copies of its last request, whose
        answers are dropped; the copies share its image, so it is encoded once."""
        extra = self._padded_size(len(prompts), opts) - len(prompts)
        pixels, index = self._pixels(images + images[-1:] * extra)
        return pixels, index, prompts + prompts[-1:] * extra

    def _padded_size(self, n: int, opts: GenerationOptions) -> int:
        """The batch size at which to decode `n` rows. A compiled step is compiled anew for every batch size (tens of
        seconds for a 3B model), so on a compiled pipeline a greedy batch runs at the smallest size already run at
        between n and 2n, else at the first of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3 * 2^k) from n up,
        padded with copies of its last request. So the sizes compiled are at most two per doubling, a new size
        makes a batch at most 1.5x larger (17 rows run as 24) and a reused one at most doubles it. Greedy rows do
        not depend on one another and a copy ends with its original; sampled rows' random draws depend on the batch
        size (and a sampled copy would decode on to its own end), and beams have their own layout, so those are
        never padded."""
        if self._steps is None or opts.do_sample or opts.num_beams > 1:
            return n
        size = min((b for b in self._greedy_batches if n <= b <= 2 * n), default=batch_rung(n))
        self._greedy_batches.add(size)
        return size

    def stream(self, image, prompt: str, options: GenerationOptions | dict | None = None, **kw) -> Stream:
        """Like `generate` for one image (or a list of images for the one prompt) and one prompt, yielding text
        pieces as they are decoded; see `Stream`."""
        opts = streamable(GenerationOptions.from_kwargs(options, **kw))
        if isinstance(image, Iterator) or not isinstance(prompt, str):
            raise InputError("stream takes one image and one prompt string (or a list of images for that one "
                             "prompt); use generate or stream_batch for a batch")
        prompt = marked_prompts([image], [prompt])[0]
        pixels, index = self._pixels([image])
        return Stream(engine.stream(self.model, self.processor, pixels, prompt, opts, self._steps, index), self)

    def stream_batch(self, images, prompts, options: GenerationOptions | dict | None = None, keep_going=None, **kw):
        """Like `generate` for a batch, as events while it decodes: (i, text piece) for input i, then (i, Result) as
        soon as input i's answer is finished (rows end at different steps). Greedy batches of a compiled pipeline
        are padded as `generate` pads them. `keep_going()`, asked once per step, stops the decoding when it returns
        False (the answers not finished then get no Result). The text pieces of input i concatenate to its
        Result's text; each equals `generate`'s answer for the same input."""
        opts = streamable(GenerationOptions.from_kwargs(options, **kw))
        if keep_going is not None and not callable(keep_going):  # (else a TypeError at the first step)
            raise InputError(f"keep_going must be a function of no arguments that returns a bool (or None), got "
                             f"{type(keep_going).__name__}")
        images, prompts, _ = as_batch(images, prompts)
        prompts = marked_prompts(images, prompts)
        with self._lock:  # the batch sizes a compiled pipeline has run at
            pixels, index, padded = self._padded(images, prompts, opts)
        events = engine.stream_batch(self.model, self.processor, pixels, padded, opts, self._steps, index, keep_going)
        return BatchStream(events, len(prompts), self)

    @contextmanager
    def live(self, max_rows: int = 8, options: GenerationOptions | dict | None = None, **kw):
        """A `LiveBatch` for continuous batching, as a context manager (it owns the KV caches until the block ends):
        sequences join with `admit(images, prompts)` whenever a row is free and leave as they end, while `step()`
        decodes one token for each. Every sequence decodes with its own options (`admit(..., options=[...])`;
        default: these): greedy or sampled without a seed, its own lengths and stop strings. Each greedy answer
        equals `generate`'s. On a compiled pipeline the batch runs at the sizes `generate` pads greedy batches to
        (so at most `batch_rung_below(max_rows)` rows). After the block the live batch has ended: its methods raise
        InputError."""
        opts = GenerationOptions.from_kwargs(options, **kw)
        max_rows = check_count(max_rows, "max_rows")
        with self._lock:
            self._claim()
            compiled = self._steps is not None
            live = LiveBatch(self.model, self.processor, opts, batch_rung_below(max_rows) if compiled else max_rows,
                             self._pixels, self._steps, batch_rung if compiled else (lambda n: n), self._cache_pool,
                             self._lock)  # (its calls from several threads take turns, as the pipeline's do)
            self._take()
        try:
            yield live
        finally:
            try:
                live.end()
            finally:
                self._busy = False


batch_rung = ladder  # the batch sizes at which a compiled pipeline runs new batches (`Pipeline._padded_size`)


def _compile_options(device: torch.device, mode: str | None, options: dict | None = None,
                     single_thread: bool = True) -> dict:
    """torch.compile's mode / options arguments (it takes one or the other: a mode plus options become the mode's
    options plus these). CPU defaults, from measurements at batch 1 (BENCHMARKS.md):
    - a C++ wrapper: the compiled graph calls its kernels from C++ rather than from generated Python, which saves
      ~2-3 us a kernel (the bundled model's step: 0.44 -> 0.35 ms on the Intel VM; mid-size: 30.1 -> 29.3 ms);
    - one thread for inductor's fused kernels: a one-token step's elementwise work is a few thousand numbers, and an
      OpenMP team's start-up and barriers cost more than that (matmuls keep torch's threads);
    - where BLAS's one-row calls carry a large fixed cost (`kernels.blas_one_row_is_slow`, measured once per
      process), products of one row by a matrix of at most 2048 x 2048 (inductor's "decompose_mm_pass" thresholds
      on CPU) become inductor's own multiply-and-sum kernels. Larger float32 weights take oneDNN's route
      (`model/kernels.py`) where it wins."""
    if device.type == "cpu" and mode is None:
        cpu: dict = {"cpp_wrapper": True}
        if kernels.blas_one_row_is_slow():
            cpu["post_grad_fusion_options"] = {"decompose_mm_pass": {}}
        if single_thread:
            cpu["cpp.threads"] = 1
        options = {**cpu, **(options or {})}
    if not options:
        return {"mode": mode}
    from torch._inductor import list_mode_options

    return {"options": {**(list_mode_options(mode) if mode else {}), **options}}


def _cuda_graphs(settings: dict) -> bool:
    """Whether `_compile_options`'s settings record CUDA graphs, whose outputs live in memory that the next replay
    reuses (modes "reduce-overhead" and "max-autotune", the option "triton.cudagraphs", or else inductor's global
    setting, e.g. TORCHINDUCTOR_CUDAGRAPHS=1)."""
    from torch._inductor import config, list_mode_options

    mode = settings.get("mode")
    options = settings.get("options") or (list_mode_options(mode) if mode else {})
    return bool(options.get("triton.cudagraphs", config.triton.cudagraphs))


def load(path=None, device="cpu", dtype="float32", adapter=None, revision=None, quantize=None) -> Pipeline:
    """Load a Hub-layout PaliGemma folder ("~" is expanded), or when `path` is None the base model that `adapter`
    names, else the bundled default model.

    `device`: "cpu" (the default), "cuda", "cuda:N" (or the index N), "mps", or a torch.device; one that this
    machine lacks is an InputError before anything is read. `dtype`: "float32" (the default), "bfloat16" ("bf16"),
    "float16" ("fp16", "half"), or the torch dtype. palitorch does not download: give a folder, or a Hub id
    ("google/paligemma2-3b-pt-224") already in the local Hugging Face cache (`hf download` puts it there), read at
    `revision` (a branch, tag or commit; default "main"); one not there is answered with the command that downloads
    it. `adapter`: a PEFT LoRA adapter folder of this model (adapter_config.json, adapter_model.safetensors), or the
    Hub id of one in the cache, merged into the weights as they load; with no `path`, its base model is the one its
    adapter_config.json names (base_model_name_or_path: a folder, or a Hub id in the cache), as peft's AutoPeftModel
    reads it. `quantize="int8"`: the language model's weights as int8 with a scale per row, after any adapter is
    merged (~4x less memory than float32 for them, faster CPU decoding; palitorch/model/quant.py)."""
    path, adapter = model_paths(path, revision, adapter)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    quantize = check_quantize(quantize)
    cfg = read_config(path)
    processor = Processor.from_folder(path, cfg.vision.image_size, cfg.num_image_tokens,
                                      max_length=cfg.text.max_position_embeddings)
    check_tokenizer(cfg, processor, path)
    if adapter is not None:
        read_adapter(adapter)  # before the (slow) load: a wrong folder fails at once
    model = load_model(path, device="cpu" if quantize else device, dtype=dtype)  # (int8: quantized onto `device`)
    if adapter is not None:
        merge_adapter(model, adapter)
    if quantize is not None:
        quant.quantize_model_(model, quantize, device)
    return Pipeline(model, processor, path)


def check_tokenizer(cfg, processor: Processor, path) -> None:
    """CheckpointError unless the tokenizer belongs with config.json: its <image> is the config's image token, and
    every other token has a row in the embedding (else the first prompt would fail deep inside the model)."""
    if processor.image_id != cfg.image_token_id:
        raise CheckpointError(f"{path}: config.json's image_token_index is {cfg.image_token_id}, the tokenizer's "
                              f"<image> is {processor.image_id}: the tokenizer and config.json do not belong together")
    size, vocab = processor.tokenizer.get_vocab_size(with_added_tokens=True), cfg.text.vocab_size
    if any(i != processor.image_id for i in range(vocab, size)):
        raise CheckpointError(f"{path}: the tokenizer has {size} tokens, config.json's text_config.vocab_size is "
                              f"{vocab}: the tokenizer and the weights do not belong together")
