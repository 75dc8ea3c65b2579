"""The generation engine: prefill once, then one token per step through a static KV cache.

`decode` is a Python generator (litgpt style) yielding each step's tokens for the whole batch, still on the device;
`generate` (lists in, `Result`s out) and `stream` (text pieces of one answer) are built on it.

How a batch is laid out: prompts are left-padded to a common length T, so every row writes the same cache slot at
each step (slot T + i for the i-th generated token). Positions count real tokens from 1 (`cumsum(valid)`, as
transformers does), so a padded row computes the same numbers as the same prompt alone. The prompt is all prefix:
prefill attends bidirectionally over it with padding hidden, and computes logits for the last position only.
Each decode step then attends over every cache slot, with a key-validity mask (real prompt tokens + generated
slots so far) that also makes it causal, and Gemma 2's sliding window on its sliding layers.

Axes: B batch, T prompt length (padded), S cache slots, V vocab, R image side (pixels [B, 3, R, R]).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from palitorch.errors import InputError, NumericsError
from palitorch.inference.answer import (
    Alternatives,
    Answer,
    Result,
    Top,
    alternatives_by_row,
    alternatives_lists,
)
from palitorch.inference.caches import ensure_caches
from palitorch.inference.done import DoneWatch
from palitorch.inference.features import Images, image_input

# (logsumexp_logprobs and raw_logprobs are also this module's names, as they were before logprobs.py)
from palitorch.inference.logprobs import chosen_logprobs, logsumexp_logprobs, raw_logprobs, token_logprobs  # noqa: F401
from palitorch.inference.processor import Processor, image_words
from palitorch.inference.sampling import MAX_TOP_LOGPROBS, Chooser, GenerationOptions
from palitorch.model import PaliGemma
from palitorch.model.paligemma import prefix_lm_mask


@dataclass
class Prompts:
    """A left-padded batch of encoded prompts, on the model's device."""

    ids: torch.Tensor  # [B, T] long
    valid: torch.Tensor  # [B, T] bool, False on the left padding
    pixels: torch.Tensor | Images  # [N, 3, R, R], the rows' images in order (a row may have several); [U, ...] with
    # index; or their `Images`, whose features the prefill asks for
    lengths: list[int]  # real tokens per row
    image_index: torch.Tensor | None = None  # [N]: the n-th image is pixels[image_index[n]] (rows may share one)
    images: list[int] | None = None  # images per row (None: one each)


def encode_prompts(model: PaliGemma, processor: Processor, pixels: torch.Tensor, prompts: list[str],
                   image_index: torch.Tensor | None = None) -> Prompts:
    """Tokenise and left-pad `prompts` (one per image in pixels [B, 3, R, R], or a prompt starting with k `<image>`
    markers per k images; `image_index` [N]: the images in order as indices into pixels [U, 3, R, R] of U distinct
    images, see `PaliGemma.embed`); InputError if one cannot fit."""
    enc = [processor.encode(p) for p in prompts]
    context = model.cfg.text.max_position_embeddings
    longest = max(len(e.ids) for e in enc)
    if longest >= context:
        k = max(enc, key=lambda e: len(e.ids)).images
        raise InputError(
            f"the prompt is {longest} tokens with {image_words(k, processor.num_image_tokens)}, which leaves no "
            f"room in the model's context of {context}; shorten it{' or give fewer images' * (k > 1)}"
        )
    batch = processor.collate(enc, padding_side="left")
    device = pixels.device
    return Prompts(batch["input_ids"].to(device), batch["attention_mask"].to(device).bool(), pixels,
                   [len(e.ids) for e in enc], image_index, [e.images for e in enc])


def rows_images(prompts: Prompts, rows: list[int], image_index: torch.Tensor | None):
    """The image index [N'] of some `rows` of a batch of `prompts`: their images, in order, as indices into its
    pixels."""
    counts = prompts.images or [1] * len(prompts.lengths)
    index = image_index.tolist() if image_index is not None else list(range(sum(counts)))
    starts = [sum(counts[:i]) for i in range(len(counts))]
    picked = [index[starts[i] + j] for i in rows for j in range(counts[i])]
    return torch.tensor(picked, dtype=torch.long, device=prompts.ids.device)


def eos_ids(model: PaliGemma, processor: Processor) -> list[int]:
    """The checkpoint's EOS ids (PaliGemma 2 lists two) plus the tokenizer's <eos>."""
    return sorted({*model.cfg.eos_token_ids, processor.eos_id})


def ragged(budgets: list[int]) -> dict:
    """`decode`'s row_steps keyword when the rows' budgets differ (else none: every row runs to the same end)."""
    return {"row_steps": budgets} if len(set(budgets)) > 1 else {}


def row_budgets(model: PaliGemma, prompts: Prompts, opts: GenerationOptions) -> list[int]:
    """Each row's max_new_tokens, cut so that it does not run past the model's context. A row's room is counted
    from its own prompt (positions count real tokens), so a short prompt batched with a long one is not cut short:
    its answer does not depend on the batch."""
    context = model.cfg.text.max_position_embeddings
    return [min(opts.max_new_tokens, context - length) for length in prompts.lengths]


class Cursor:
    """Where a cached decode stands: which cache slots hold visible keys, the next slot, the next positions."""

    def __init__(self, model: PaliGemma, prompts: Prompts, s_len: int):
        b, t = prompts.ids.shape
        device = prompts.ids.device
        self.slots = torch.arange(s_len, device=device)
        self.valid = torch.zeros(b, s_len, dtype=torch.bool, device=device)  # keys a query may see
        self.valid[:, :t] = prompts.valid
        self.positions = prompts.valid.long().cumsum(-1)  # 1-based over real tokens; left padding stays at 0
        self.pos = self.positions[:, -1:]  # [B, 1] the last prompt token's position
        self.slot = t  # the next token's cache slot, the same for every row
        self.window = sliding_window(model, s_len)
        # A row past its own token budget (a long prompt batched with shorter ones near the context's end) is still
        # stepped, its tokens unused: its positions stop at the context's last, inside the RoPE table.
        context = model.cfg.text.max_position_embeddings
        self.last_position = context if max(prompts.lengths) + s_len - t > context else None

    def step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Claim the next slot for one token per row -> the step's (positions [B, 1], slot [1], keys it may see
        [B, S], the same within the sliding window [B, S] or None): `token_forward`'s arguments after the tokens."""
        s = self.slot
        self.valid[:, s] = True  # the new token is a key for itself and every later step: causal by construction
        self.pos = self.pos + 1
        if self.last_position is not None:
            self.pos.clamp_(max=self.last_position)
        self.slot += 1
        sliding = (self.valid & (self.slots > s - self.window)) if self.window else None
        return self.pos, self.slots[s:s + 1], self.valid, sliding


def sliding_window(model: PaliGemma, s_len: int) -> int | None:
    """The window of the model's sliding-window layers, when a cache of `s_len` slots is longer than it."""
    window = model.cfg.text.sliding_window
    sliding = any(layer.attn.sliding for layer in model.language_model.layers)
    return window if (window is not None and sliding and s_len > window) else None


def prefill(model: PaliGemma, prompts: Prompts, s_len: int) -> tuple[torch.Tensor, Cursor]:
    """Run the whole prompt in one forward, bidirectional over its real tokens -> (last logits [B, V], cursor).

    The caches must hold at least `s_len` slots for the batch (see `ensure_caches`)."""
    t = prompts.ids.shape[1]
    cur = Cursor(model, prompts, s_len)
    mask = prefix_lm_mask(torch.zeros_like(prompts.ids), prompts.valid)  # [B, 1, T, T]: attends over slots 0..T-1
    x = model.embed(prompts.ids, image_input(prompts.pixels), prompts.image_index)  # the tower: once per image
    # No sliding mask: the prompt is all prefix, and prefix_lm_mask's window never hides keys from a prefix query
    logits = model.forward_cached(x, cur.positions, cur.slots[:t], mask, last_only=True)[:, -1]
    check_finite(logits)
    return logits, cur


def check_finite(logits: torch.Tensor) -> None:
    """NumericsError unless every logit is finite. One host sync per call (a prefill or a scoring pass, not per
    decode step): NaN logits would otherwise turn into an empty or arbitrary answer that looks like a real one."""
    if not bool(torch.isfinite(logits).all()):
        dtype = str(logits.dtype).removeprefix("torch.")
        hint = "; float16 can overflow in Gemma: try bfloat16 or float32" if logits.dtype == torch.float16 else ""
        raise NumericsError(f"the model computed NaN or infinite logits ({dtype}): are its weights damaged?{hint}")


def advance(model: PaliGemma, cur: Cursor, tokens: torch.Tensor, fns: Steps | None = None) -> torch.Tensor:
    """Feed one token per row (tokens [B]) at the cursor's slot -> next logits [B, V]; moves the cursor on."""
    return (fns or EAGER).logits(model, tokens, *cur.step())


def token_forward(model: PaliGemma, tokens: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                  valid: torch.Tensor, sliding: torch.Tensor | None) -> torch.Tensor:
    """One decode forward: tokens [B] at positions pos [B, 1], written at cache slot `slot` [1], attending to the
    keys `valid` [B, S] (and `sliding` [B, S] on sliding-window layers) -> logits [B, V].

    Every tensor it gets has the same shape at every step, so a `torch.compile`d version compiles once."""
    x = model.language_model.embed(tokens[:, None])
    mask = valid[:, None, None, :]
    return model.forward_cached(x, pos, slot, mask, None if sliding is None else sliding[:, None, None, :])[:, -1]


def greedy_forward(model: PaliGemma, tokens: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                   valid: torch.Tensor, sliding: torch.Tensor | None, done: torch.Tensor, no_eos: torch.Tensor,
                   eos: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_forward` and the greedy choice in one function (one compiled graph: on a GPU one CUDA graph a step)
    -> (next tokens [B], their logprobs [B], done [B]).

    The choice is `Chooser`'s without a repetition penalty or sampling: the largest logit, with the EOS ids
    (`eos` [E]) excluded while `no_eos` is True (min_new_tokens): [1] for the whole batch (`decode`), or [B, 1]
    for each row's own (a live batch). Rows already `done` get `pad_id`."""
    x = token_forward(model, tokens, pos, slot, valid, sliding).float()
    tok = torch.where(no_eos, x.index_fill(-1, eos, float("-inf")), x).argmax(-1)
    return settle(tok, token_logprobs(x, tok), done, eos, pad_id)


def greedy_top_forward(model: PaliGemma, tokens: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                       valid: torch.Tensor, sliding: torch.Tensor | None, done: torch.Tensor, no_eos: torch.Tensor,
                       eos: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, ...]:
    """`greedy_forward` that also gives the step's `MAX_TOP_LOGPROBS` most likely tokens -> (tokens, logprobs, done,
    alternative ids [B, k], their logprobs [B, k]), k = min(20, V): greedy decoding with `top_logprobs` stays one
    compiled graph (the caller keeps the first k it was asked for; one k for every request, so one compilation)."""
    x = token_forward(model, tokens, pos, slot, valid, sliding).float()
    tok = torch.where(no_eos, x.index_fill(-1, eos, float("-inf")), x).argmax(-1)
    # log_softmax at the chosen and the likeliest tokens as logit - logsumexp: no [B, V] of logprobs written
    lse = torch.logsumexp(x, -1)
    values, ids = x.topk(min(MAX_TOP_LOGPROBS, x.shape[-1]), dim=-1)
    lp = x.gather(-1, tok[:, None])[:, 0] - lse
    return *settle(tok, lp, done, eos, pad_id), ids, values - lse[:, None]


def settle(tok: torch.Tensor, lp: torch.Tensor, done: torch.Tensor, eos: torch.Tensor,
           pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's chosen tokens [B] and logprobs [B] -> (tokens with `pad_id` on rows already `done`, logprobs,
    rows done after this step: before, or now at one of the `eos` ids [E])."""
    tok = tok.masked_fill(done, pad_id)
    return tok, lp, done | torch.isin(tok, eos)


@dataclass(frozen=True)
class Steps:
    """The one-token functions the decode loop calls: `logits` (`token_forward`: sampling, beams, repetition
    penalty), `greedy` (`greedy_forward`) and `greedy_top` (`greedy_top_forward`: greedy with top_logprobs). Eager
    by default; `Pipeline.compile` puts `torch.compile`d versions in. `copy_outputs`: their outputs live in memory
    that the next call reuses (CUDA graphs), so copy what is kept; `caches`: then also the KV caches kept for reuse
    (see `ensure_caches`); `compiled`: each function is compiled per shape, so the caches keep to few lengths."""

    logits: Callable = token_forward
    greedy: Callable = greedy_forward
    copy_outputs: bool = False
    greedy_top: Callable = greedy_top_forward
    caches: dict | None = None
    compiled: bool = False  # static-shape graphs: caches sized on a ladder (caches.cache_length)


EAGER = Steps()


@torch.inference_mode()
def decode(model: PaliGemma, prompts: Prompts, opts: GenerationOptions, eos: list[int], pad_id: int,
           steps: int, fns: Steps | None = None,
           row_steps: list[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, Top | None]]:
    """Yield (tokens [B], logprobs [B], alternatives) for up to `steps` steps, all on the device.

    logprobs are log_softmax of the raw logits at the chosen token; alternatives, with `opts.top_logprobs` = k,
    the k most likely tokens under the same distribution (ids [B, k], logprobs [B, k]), else None. A row that has
    produced an EOS yields `pad_id` afterwards. The loop ends early once every row has: on CPU checked every step
    (a check is free), on CUDA within a few steps, without emptying the GPU's queue; see `DoneWatch`.
    Greedy decoding runs the forward and the choice as one function, `fns.greedy` (`fns.greedy_top` with
    alternatives); sampling and repetition penalties choose from `fns.logits` outside it. `fns`: see `Steps`.
    `row_steps`: each row's own budget (`row_budgets`, when they differ): a row counts as done once it is spent.
    """
    fns = fns or EAGER
    b, t = prompts.ids.shape
    device = prompts.ids.device
    budgets = torch.tensor(row_steps, device=device) if row_steps else None
    logits, cur = prefill(model, prompts, ensure_caches(model, b, t + steps, fns.caches, fns.compiled))
    chooser = Chooser(opts, eos, logits.shape[-1], prompts.ids, prompts.valid)
    eos_t = torch.tensor(eos, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    k = opts.top_logprobs
    fused = chooser.seen is None and not opts.do_sample  # greedy without a penalty: one function a step
    no_eos = [torch.full((1,), flag, device=device) for flag in (False, True)]  # min_new_tokens not yet reached
    watch = DoneWatch(device)

    def pick(logits: torch.Tensor, i: int, done: torch.Tensor):
        tok = chooser(logits, i)
        lp, top = chosen_logprobs(logits, tok, k)
        return *settle(tok, lp, done, eos_t, pad_id), top

    tok, lp, done, top = pick(logits, 0, done)
    for i in range(steps):
        if i > 0 and fused:
            step = fns.greedy_top if k else fns.greedy
            out = step(model, tok, *cur.step(), done, no_eos[i < opts.min_new_tokens], eos_t, pad_id)
            if fns.copy_outputs:
                out = [t.clone() for t in out]
            tok, lp, done = out[:3]
            top = (out[3][:, :k], out[4][:, :k]) if k else None
        elif i > 0:
            chooser.observe(tok)
            tok, lp, done, top = pick(fns.logits(model, tok, *cur.step()), i, done)
        if budgets is not None:
            done = done | (budgets <= i + 1)
        yield tok, lp, top
        if i + 1 == steps or watch.finished(done, i):
            return


def generate(model: PaliGemma, processor: Processor, pixels: torch.Tensor, prompts: list[str],
             opts: GenerationOptions, fns: Steps | None = None,
             image_index: torch.Tensor | None = None) -> list[Result]:
    """Answers for a batch: B prompts and their images, pixels [B, 3, R, R] (or see `encode_prompts`). One padded
    batch, one decode loop."""
    batch = encode_prompts(model, processor, pixels, prompts, image_index)
    eos = eos_ids(model, processor)
    budgets = row_budgets(model, batch, opts)
    if opts.num_beams > 1:  # the beams of a padded batch share one budget: rows with less room run apart
        from palitorch.inference.beam import beam_search

        if len(set(budgets)) == 1:
            return beam_search(model, processor, batch, opts, eos, budgets[0], fns)
        results: list[Result] = [None] * len(prompts)
        for budget in sorted(set(budgets)):  # (prompts near the end of the context: each room a batch of its own)
            rows = [i for i, b in enumerate(budgets) if b == budget]
            part = encode_prompts(model, processor, pixels, [prompts[i] for i in rows],
                                  rows_images(batch, rows, image_index))
            for i, r in zip(rows, beam_search(model, processor, part, opts, eos, budget, fns)):
                results[i] = r
        return results
    answers = [Answer(processor, eos, opts.stop, n, top=opts.top_logprobs > 0, budget=budget)
               for n, budget in zip(batch.lengths, budgets)]
    toks, lps, tops = [], [], []
    for tok, lp, top in decode(model, batch, opts, eos, processor.pad_id, max(budgets), fns, **ragged(budgets)):
        if opts.stop:  # stop strings need the text: one host sync per step
            for a, t, p, alt in zip(answers, tok.tolist(), lp.tolist(), row_alternatives(top, len(answers))):
                a.push(t, p, track_text=True, alternatives=alt)
            if all(a.finish is not None for a in answers):
                break
        else:  # keep the tokens on the device; one transfer at the end
            toks.append(tok)
            lps.append(lp)
            tops.append(top)
    if toks:
        alts = alternatives_by_row(tops) if tops[0] is not None else [[None] * len(toks)] * len(answers)
        for a, ts, ps, row_alts in zip(answers, torch.stack(toks, 1).tolist(), torch.stack(lps, 1).tolist(), alts):
            for t, p, alt in zip(ts, ps, row_alts):
                a.push(t, p, track_text=False, alternatives=alt)
    return [a.result() for a in answers]


def row_alternatives(top: Top | None, rows: int) -> list[Alternatives | None]:
    """A step's alternatives (ids, logprobs [B, k] on the device, or None) -> one list of pairs per row (or None)."""
    return [None] * rows if top is None else alternatives_lists(*top)


def stream(model: PaliGemma, processor: Processor, pixels: torch.Tensor, prompt: str,
           opts: GenerationOptions, fns: Steps | None = None, image_index: torch.Tensor | None = None) -> Iterator[str]:
    """Yield the text of one answer (pixels [1, 3, R, R], or its several images) in pieces as tokens arrive; returns
    the `Result`. See `stream_batch`."""
    result = None
    for _, item in stream_batch(model, processor, pixels, [prompt], opts, fns, image_index):
        if isinstance(item, str):
            yield item
        else:
            result = item
    return result


def stream_batch(model: PaliGemma, processor: Processor, pixels: torch.Tensor, prompts: list[str],
                 opts: GenerationOptions, fns: Steps | None = None, image_index: torch.Tensor | None = None,
                 keep_going: Callable[[], bool] | None = None) -> Iterator[tuple[int, str | Result]]:
    """Answers for a batch (as `generate`), as events while they are decoded: (row, text piece), and (row, Result)
    as soon as that row has finished (every row's Result comes, last of its events).

    A piece is emitted only when it can no longer change: never half of a multi-byte character whose bytes come
    as separate byte-fallback tokens, never the beginning of a possible stop string. A row's pieces concatenate to
    its `Result.text`. `keep_going()`, asked once per step, ends the decoding early when it returns False (every
    client has gone): the rows not finished then get no Result.
    """
    if opts.num_beams > 1:
        raise InputError("streaming shows one sequence as it grows: use num_beams=1 (or generate for beams)")
    batch = encode_prompts(model, processor, pixels, prompts, image_index)
    eos = eos_ids(model, processor)
    budgets = row_budgets(model, batch, opts)
    answers = [Answer(processor, eos, opts.stop, n, top=opts.top_logprobs > 0, budget=budget)
               for n, budget in zip(batch.lengths, budgets)]
    done = [False] * len(answers)

    def events(i: int, final: bool):
        result = answers[i].result() if final else None
        piece = answers[i].new_text(final)
        if piece:
            yield i, piece
        if final:
            done[i] = True
            yield i, result

    for tok, lp, top in decode(model, batch, opts, eos, processor.pad_id, max(budgets), fns, **ragged(budgets)):
        alts = row_alternatives(top, len(answers))
        for i, (a, t, p) in enumerate(zip(answers, tok.tolist(), lp.tolist())):
            if not done[i]:
                a.push(t, p, track_text=True, alternatives=alts[i])
                yield from events(i, final=a.finish is not None)
        if all(done) or (keep_going is not None and not keep_going()):
            break
    else:  # the token budget ran out: the rows still going end at their length
        for i in range(len(answers)):
            if not done[i]:
                yield from events(i, final=True)
