"""Continuous batching: sequences join and leave a running decode between its steps.

`decode` (generate.py) runs a fixed batch from one prefill to the end of its longest answer: a row that finishes
early idles, and a request that arrives meanwhile waits for the whole batch. A `LiveBatch` keeps up to B rows
decoding and lets a new sequence take a free row before any step ("continuous" or "in-flight" batching, as serving
engines do it), without giving up the static KV cache or the compiled one-token step:

- Every row still writes the same cache slot s at each step. A sequence that joins at slot s is prefilled apart
  (into a scratch cache) and its prompt's keys and values are copied into its row at the slots just below s,
  [s - T, s); its key mask hides the row's other slots, which hold whatever an earlier sequence left there. Its
  positions are its own (1..T over the prompt), so it computes what it would compute alone: its greedy tokens
  are `generate`'s (up to the float32 rounding by which the kernels of different batch sizes differ).
- When the slots left run short (or a prompt is longer than s), the slots in use are moved along the cache: each
  layer's keys and values [:, :, first:s] are copied to their new place. Keys carry their RoPE positions, and the
  masks look only at which slots are visible and how far apart they are (Gemma 2's window), which a move keeps.
- The batch grows and shrinks between steps (copying the live rows' caches) through the sizes `size_for` gives
  (on a compiled pipeline the sizes it compiles for), so a lone sequence does not pay for idle rows.

Each step calls the same one-token functions as `decode` (`Steps`), with tensors whose shapes stay fixed while the
batch size and cache length do: a compiled step (one CUDA graph on a GPU) serves a live batch too.

Axes: B rows, T prompt length, S cache slots, V vocab.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from palitorch.errors import InputError
from palitorch.inference.answer import Answer, Result, Top, alternatives_lists
from palitorch.inference.caches import ensure_caches, keep_caches, raise_recompile_limit, use_caches
from palitorch.inference.generate import (
    EAGER,
    Cursor,
    Steps,
    encode_prompts,
    eos_ids,
    prefill,
    settle,
    sliding_window,
)
from palitorch.inference.inputs import admit_inputs, check_live_options, marked_prompts
from palitorch.inference.logprobs import chosen_logprobs
from palitorch.inference.processor import Processor
from palitorch.inference.sampling import GenerationOptions, RowChooser
from palitorch.model import PaliGemma


@dataclass(eq=False)
class Seq:
    """One sequence of a live batch: the caller's handle on it (`tag` is the caller's own)."""

    tag: object
    answer: Answer  # its tokens, logprobs and text so far
    budget: int  # the most tokens it may generate
    min_new: int  # EOS is barred until it has generated this many
    stream: bool  # hand out its text in pieces as it grows
    top: int = 0  # how many alternatives to report per token (top_logprobs)
    row: int = -1  # its row in the batch (rows move when the batch is resized)
    start: int = 0  # the first cache slot of its (left-padded) prompt
    made: int = 0  # tokens generated so far
    over: bool = False  # finished, or released: its row is free


Event = tuple[Seq, "str | Result"]  # (sequence, a text piece) or, last of its events, (sequence, its Result)


class LiveCursor(Cursor):
    """A `Cursor` for rows that come and go: no prompt of its own; positions held below the RoPE table's end (a free
    row's position goes on counting, and nothing reads it)."""

    def __init__(self, model: PaliGemma, rows: int, s_len: int, device):
        self.slots = torch.arange(s_len, device=device)
        self.valid = torch.zeros(rows, s_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.slot = 0
        self.window = sliding_window(model, s_len)
        self.last_position = model.cfg.text.max_position_embeddings


def _locked(method):
    """The method under the batch's lock (and, compiled, dynamo's recompile limit raised in a thread's first call)."""
    @functools.wraps(method)
    def run(self, *args, **kw):
        with self._lock:
            if self.fns.compiled and threading.get_ident() not in self._raised:
                raise_recompile_limit()
                self._raised.add(threading.get_ident())
            return method(self, *args, **kw)
    return run


class LiveBatch:
    """Rows that join (`admit`) and leave (at EOS, their budget, a stop string, or `release`) between `step`s.

    Every sequence decodes with its own options, given when it is admitted (default: `opts`): greedy or sampled,
    its own temperature, top-k/p, min-p, repetition penalty, lengths and stop strings (`RowChooser`). Not beams,
    and no seed for a sample (its random draws would depend on the batch). Each step runs the fused greedy step
    while every row is greedy without a penalty, else the logits step and the per-row choice. `admit`, `step`,
    `release` and `end` take `lock` (the pipeline's): threads may call them, one at a time (e.g. requests admitted
    from their own threads while one thread steps). `Pipeline.live` makes one."""

    def __init__(self, model: PaliGemma, processor: Processor, opts: GenerationOptions, max_rows: int,
                 to_pixels: Callable, fns: Steps | None = None, size_for: Callable[[int], int] = lambda n: n,
                 pool: dict | None = None, lock: threading.RLock | None = None):
        self._lock = lock or threading.RLock()
        self._raised: set[int] = set()  # threads in which dynamo's recompile limit is raised (`_locked`)
        check_live_options(opts)
        self.model, self.processor, self.opts, self.fns = model, processor, opts, fns or EAGER
        self.max_rows, self.to_pixels, self.size_for = max_rows, to_pixels, size_for
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, processor)
        self.eos_t = torch.tensor(self.eos, device=self.device)
        self.seqs: list[Seq | None] = []  # by row; None = a free row
        self.cur: LiveCursor | None = None
        self._no_bar: torch.Tensor | None = None  # [B, 1] all False: no row has EOS barred
        self.s_len = 0
        # With CUDA graphs (`fns.copy_outputs`), each batch size's KV caches are kept for when the batch comes back
        # to that size: a graph recorded on them replays only on the same memory (new caches would be recorded
        # again). `Pipeline.live` passes its own pool, so that one live batch after another reuses them too; only
        # one cache length is kept. Otherwise a resize frees the old caches (a batch that grew to 8 rows kept 36
        # rows' worth).
        self.pool = ({} if pool is None else pool) if self.fns.copy_outputs else None
        self.ended = False  # `Pipeline.live`'s block is over: the caches may belong to another call now

    @_locked
    def end(self) -> None:
        """End the batch (`Pipeline.live` does, as its block ends): its sequences are dropped, and its methods raise
        InputError from now on."""
        self.ended = True
        self.seqs = []

    def _check_open(self) -> None:
        if self.ended:
            raise InputError("this live batch has ended (its with block is over): open a new one with pipe.live()")

    @property
    def active(self) -> list[Seq]:
        return [q for q in self.seqs if q is not None]

    @property
    def free_rows(self) -> int:
        """Sequences that could join now, as far as rows go."""
        return self.max_rows - len(self.active)

    # ------------------------------------------------------------------ joining

    @_locked
    @torch.inference_mode()
    def admit(self, images: list, prompts: list[str], tags: list | None = None, streams: list[bool] | None = None,
              options: list[GenerationOptions] | None = None) -> tuple[list[Seq], list[Event]] | None:
        """Start one sequence per (image, prompt) -> (their Seqs, their first events; both empty for no prompts), or
        None when they cannot all join now (too few free rows, or too few cache slots left until some sequences end:
        try again after a step).

        InputError if a prompt is refused or there are more than max_rows (none of them joins); NumericsError on NaN
        logits. `streams[i]`: hand out sequence i's text in pieces as it grows (else its text comes only in its
        Result). `options[i]`: sequence i's decoding options (default: the batch's): a GenerationOptions, or a dict of
        decoding keywords that change the batch's options."""
        self._check_open()
        options = admit_inputs(self.opts, images, prompts, tags, streams, options)
        prompts = marked_prompts(images, prompts)  # (an image may be a list of images for its prompt)
        n = len(prompts)
        if n > self.max_rows:  # it never could: not a "try again"
            raise InputError(f"{n} sequences cannot join a live batch of max_rows={self.max_rows}: admit at most "
                             f"{self.max_rows} at a time, or open it with a larger max_rows")
        if n == 0:  # nothing to start: nothing to wait for either
            return [], []
        if n > self.free_rows:
            return None
        pixels, index = self.to_pixels(images)
        batch = encode_prompts(self.model, self.processor, pixels, prompts, index)
        t = batch.ids.shape[1]
        context = self.model.cfg.text.max_position_embeddings
        budgets = [min(o.max_new_tokens, context - length) for o, length in zip(options, batch.lengths)]
        budget = max(budgets)
        live = self.active
        if not live:  # an empty batch can take any layout: start afresh
            rows = self.size_for(n)
            # room for later sequences as long, or with prompts up to 64 tokens longer, without waiting
            self.s_len = ensure_caches(self.model, rows, t + 64 + 2 * budget, compiled=self.fns.compiled)
            self._use_caches(rows)
            self.cur = LiveCursor(self.model, rows, self.s_len, self.device)
            self.seqs = [None] * rows
            self._reset_rows(rows)
        slot = self._slot_for(t, budget)
        if slot is None:
            return None
        self._move(slot)
        if n > len(self.seqs) - len(live):
            self._resize(self.size_for(len(live) + n))
        rows = [r for r, q in enumerate(self.seqs) if q is None][:n]
        logits, scratch = self._prefill_apart(batch)
        row_t = torch.tensor(rows, device=self.device)
        for layer, part in zip(self.model.language_model.layers, scratch):
            layer.attn.kv_cache.k[row_t, :, slot - t:slot] = part.k
            layer.attn.kv_cache.v[row_t, :, slot - t:slot] = part.v
        cur = self.cur
        cur.valid[row_t] = False
        cur.valid[row_t, slot - t:slot] = batch.valid
        cur.pos[row_t] = batch.valid.sum(-1, keepdim=True)
        self.chooser.start(rows, row_t, options, batch.ids, batch.valid)
        bar = torch.tensor([[o.min_new_tokens > 0] for o in options], device=self.device)
        tok = self.chooser(logits, bar, row_t)
        lp, top = chosen_logprobs(logits, tok, max(o.top_logprobs for o in options))
        self.tok[row_t] = tok
        self.done[row_t] = torch.isin(tok, self.eos_t)
        seqs = []
        for i, r in enumerate(rows):
            o = options[i]
            answer = Answer(self.processor, self.eos, o.stop, batch.lengths[i], top=o.top_logprobs > 0)
            q = Seq(tags[i] if tags else None, answer, budgets[i], o.min_new_tokens, bool(streams and streams[i]),
                    o.top_logprobs, row=r, start=slot - t)
            self.seqs[r] = q
            seqs.append(q)
        return seqs, self._events(seqs, tok, lp, by_row=False, top=top)

    def _slot_for(self, t: int, budget: int) -> int | None:
        """The slot at which sequences of padded prompt length t and `budget` tokens can join: the next one, or
        where the slots in use must move so that everyone's remaining tokens fit; None if none fits now."""
        live, s = self.active, self.cur.slot
        need = max([q.budget - q.made for q in live] + [budget])  # slots each still writes, at most
        if t <= s and s + need <= self.s_len:
            return s
        first = min((q.start for q in live), default=s)
        slot = max(s - first, t)
        return slot if slot + need <= self.s_len else None

    def _move(self, slot: int) -> None:
        """Move the slots in use, [first, s), to end at `slot`; the cursor then writes there next."""
        cur, live = self.cur, self.active
        s = cur.slot
        if slot == s:
            return
        first = min((q.start for q in live), default=s)
        n = s - first
        if n:
            for layer in self.model.language_model.layers:
                for buf in (layer.attn.kv_cache.k, layer.attn.kv_cache.v):
                    buf[:, :, slot - n:slot] = buf[:, :, first:s].clone()
            kept = cur.valid[:, first:s].clone()
            cur.valid.zero_()
            cur.valid[:, slot - n:slot] = kept
        else:
            cur.valid.zero_()
        for q in live:
            q.start += slot - s
        cur.slot = slot

    def _prefill_apart(self, batch):
        """Prefill new sequences into scratch caches of their own -> (last logits [n, V], each layer's scratch
        KVCache [n, K, T, D]); the batch's caches are untouched."""
        layers = self.model.language_model.layers
        kept = [layer.attn.kv_cache for layer in layers]
        n, t = batch.ids.shape
        try:
            self.model.setup_caches(n, t)
            logits, _ = prefill(self.model, batch, t)
            return logits, [layer.attn.kv_cache for layer in layers]
        finally:
            for layer, cache in zip(layers, kept):
                layer.attn.kv_cache = cache

    # ------------------------------------------------------------------ rows

    def _reset_rows(self, rows: int) -> None:
        """Per-row decoding state for an empty batch of `rows` rows."""
        dev = self.device
        self.tok = torch.zeros(rows, dtype=torch.long, device=dev)
        self.done = torch.ones(rows, dtype=torch.bool, device=dev)  # a free row's tokens are padding
        self.chooser = RowChooser(rows, self.model.language_model.embed_tokens.num_embeddings, self.eos, dev)

    def _use_caches(self, rows: int) -> None:
        """Give the model caches for `rows` rows of `s_len` slots: the pool's, or the model's own if they are that
        shape (then pooled), or new ones."""
        key = (rows, self.s_len)
        if self.pool is not None and key in self.pool:
            use_caches(self.model, self.pool, key)
            return
        if self.pool is not None:  # (one cache length is pooled: free the others before allocating)
            for k in [k for k in self.pool if k[1] != self.s_len]:
                del self.pool[k]
        current = self.model.language_model.layers[0].attn.kv_cache
        if current is None or tuple(current.k.shape[i] for i in (0, 2)) != key:
            with torch.inference_mode(False):  # ordinary tensors, as `ensure_caches` makes them
                self.model.setup_caches(rows, self.s_len)
        if self.pool is not None:
            keep_caches(self.model, self.pool, limit=None)

    def _resize(self, rows: int) -> None:
        """Lay the batch out in `rows` rows, the live sequences first (in row order): caches and per-row state are
        copied; a compiled step then runs at the new batch size."""
        live = self.active
        keep = torch.tensor([q.row for q in live], dtype=torch.long, device=self.device)
        k = len(live)
        old = [layer.attn.kv_cache for layer in self.model.language_model.layers]
        self._use_caches(rows)
        for layer, cache in zip(self.model.language_model.layers, old):
            layer.attn.kv_cache.k[:k] = cache.k[keep]
            layer.attn.kv_cache.v[:k] = cache.v[keep]
        cur, tok, done, chooser = self.cur, self.tok, self.done, self.chooser
        valid, pos = cur.valid, cur.pos
        self.cur = LiveCursor(self.model, rows, self.s_len, self.device)
        self.cur.slot = cur.slot
        self.cur.valid[:k], self.cur.pos[:k] = valid[keep], pos[keep]
        self._reset_rows(rows)
        self.tok[:k], self.done[:k] = tok[keep], done[keep]
        self.chooser = chooser.kept(keep, [q.row for q in live], rows)
        for i, q in enumerate(live):
            q.row = i
        self.seqs = live + [None] * (rows - k)

    # ------------------------------------------------------------------ decoding

    @_locked
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One token for every live sequence -> their events: (seq, text piece) for streamed sequences' new text,
        and (seq, Result) for each one that ended (EOS, its budget or a stop string; its row is then free)."""
        self._check_open()
        live = self.active
        if not live:
            return []
        if self.size_for(len(live)) <= len(self.seqs) // 2:  # mostly idle rows: run a smaller batch
            self._resize(self.size_for(len(live)))
        if any(q.made < q.min_new for q in live):  # EOS barred, row by row
            bar = torch.tensor([[q is not None and q.made < q.min_new] for q in self.seqs], device=self.device)
        else:
            if self._no_bar is None or len(self._no_bar) != len(self.seqs):
                self._no_bar = torch.zeros(len(self.seqs), 1, dtype=torch.bool, device=self.device)
            bar = self._no_bar
        fns, pad = self.fns, self.processor.pad_id
        k, top = max(q.top for q in live), None  # the most alternatives a row wants
        if self.chooser.fusable:
            step = fns.greedy_top if k else fns.greedy
            out = step(self.model, self.tok, *self.cur.step(), self.done, bar, self.eos_t, pad)
            tok, lp, done = out[:3]
            top = out[3:] if k else None
        else:
            self.chooser.observe(self.tok)
            logits = fns.logits(self.model, self.tok, *self.cur.step())
            tok = self.chooser(logits, bar)
            lp, top = chosen_logprobs(logits, tok, k)
            tok, lp, done = settle(tok, lp, self.done, self.eos_t, pad)
        if fns.copy_outputs:
            tok, lp, done = tok.clone(), lp.clone(), done.clone()
        self.tok, self.done = tok, done
        return self._events(self.active, tok, lp, by_row=True, top=top)

    def _events(self, seqs: list[Seq], tok: torch.Tensor, lp: torch.Tensor, by_row: bool,
                top: Top | None = None) -> list[Event]:
        """Record one token per sequence (tok, lp: [B] by row, or [n] in `seqs` order; `top`: the step's
        alternatives, ids and logprobs [B or n, k]) -> their events."""
        toks, lps = tok.tolist(), lp.tolist()
        alts = alternatives_lists(*top) if top is not None else None
        events = []
        for i, q in enumerate(seqs):
            j = q.row if by_row else i
            a = q.answer
            a.push(toks[j], lps[j], track_text=q.stream or bool(a.stop), alternatives=alts and alts[j][:q.top])
            q.made += 1
            final = a.finish is not None or q.made >= q.budget
            result = a.result() if final else None
            if q.stream:
                piece = a.new_text(final)
                if piece:
                    events.append((q, piece))
            if final:
                self.release(q)
                events.append((q, result))
        return events

    @_locked
    def release(self, seq: Seq) -> None:
        """End a sequence now (its client left, say): it gets no Result, and its row is free before the next step."""
        self._check_open()
        if not isinstance(seq, Seq):
            raise InputError(f"release takes a sequence (a Seq from admit), got {type(seq).__name__}")
        if not seq.over and not (0 <= seq.row < len(self.seqs) and self.seqs[seq.row] is seq):
            raise InputError("release: this sequence is not in this live batch")
        if not seq.over:
            seq.over = True
            self.seqs[seq.row] = None
            self.chooser.free(seq.row)
