"""Decoding options and the choice of the next token, on the device.

`GenerationOptions` holds every decoding knob; `Chooser` (one set of options) and `RowChooser` (per-row options)
turn one step's logits into the next tokens. The reference semantics is `Chooser.__call__`; `RowChooser` is the same
per row (continuous batching); `generate.greedy_forward` is its greedy case fused into the compiled step. Everything
here works on tensors where they live: no `.item()`, no `.tolist()`, so a GPU never waits for the host to pick a
token. Sampling uses the exponential trick (gpt-fast): `argmax(p / q)` with `q ~ Exp(1)` draws from `p` exactly,
because `P(p_i / q_i is largest) = p_i / sum(p)` for independent exponentials.

Processing order follows transformers: repetition penalty, EOS suppression (min_new_tokens), then the warpers
temperature, top-k, top-p, min-p, each applied to the distribution left by the previous one.

Axes: B batch, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

from palitorch.errors import InputError

MAX_LENGTH_PENALTY = 20  # length ** 20 stays finite for any context length; useful values are about -2 to 2
MAX_TOP_LOGPROBS = 20  # OpenAI's limit: enough to see a step's close alternatives, few enough to copy each step
MAX_NUM_BEAMS = 128  # each beam is a row of KV cache: far above useful widths (1-16), far below a runaway


@dataclass
class GenerationOptions:
    """How to decode. Greedy unless temperature > 0, or temperature is None and a top-k/p or min-p filter is set."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0  # EOS is suppressed until this many tokens have been generated
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the answer
    num_beams: int = 1
    length_penalty: float = 1.0  # beam scores are sum(logprob) / length ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False or "never", as in transformers (beam.py)
    seed: int | None = None
    stop: list[str] | None = None  # stop strings: the text ends before the first one found
    top_logprobs: int = 0  # also report each step's k most likely tokens (Result.top_logprobs), k <= 20

    @classmethod
    def from_kwargs(cls, options: GenerationOptions | dict | None = None, **kw) -> GenerationOptions:
        """Checked options from keyword arguments, on top of `options` (a GenerationOptions, or a dict of the same
        keywords); a copy: `options` is not changed. Unknown names raise InputError; integers may be any integral
        type (numpy's too), and are stored as Python ints."""
        if isinstance(options, dict):
            options, kw = None, {**options, **kw}
        elif options is not None and not isinstance(options, cls):
            raise InputError(f"options must be a GenerationOptions or a dict of decoding options, got "
                             f"{type(options).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - names, key=str)
        if unknown:
            raise InputError(f"unknown decoding option {unknown[0]!r}; known options: {', '.join(sorted(names))}")
        opts = dataclasses.replace(options or cls(), **kw)
        if isinstance(opts.stop, str):
            opts.stop = [opts.stop]
        if opts.early_stopping is None:  # (null in JSON: the default, as for the other options)
            opts.early_stopping = False
        elif isinstance(opts.early_stopping, str) and opts.early_stopping.lower() == "never":
            opts.early_stopping = "never"
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "num_beams", "seed", "top_logprobs"):
            if _is_int(getattr(opts, name)):
                setattr(opts, name, int(getattr(opts, name)))  # np.int64(2) -> 2: JSON, torch and ranges take it
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "length_penalty"):
            value = getattr(opts, name)
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
                setattr(opts, name, float(value))  # np.float32(0.7) -> 0.7
        return opts.validate()

    @property
    def do_sample(self) -> bool:
        if self.temperature is not None:
            return self.temperature > 0
        return any(v is not None for v in (self.top_k, self.top_p, self.min_p))

    def validate(self) -> GenerationOptions:
        def bad(msg: str):
            raise InputError(msg)

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            bad(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if self.min_new_tokens > self.max_new_tokens:
            bad(f"min_new_tokens ({self.min_new_tokens}) is more than max_new_tokens ({self.max_new_tokens}): lower it "
                "or raise max_new_tokens")
        if self.temperature is not None and (not _is_num(self.temperature) or self.temperature < 0):
            bad(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            bad(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (not _is_num(self.top_p) or not 0 < self.top_p <= 1):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and (not _is_num(self.min_p) or not 0 <= self.min_p <= 1):
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be a finite number > 0 (1 means none), got {self.repetition_penalty!r}")
        if not _is_int(self.num_beams) or not 1 <= self.num_beams <= MAX_NUM_BEAMS:
            bad(f"num_beams must be an integer from 1 to {MAX_NUM_BEAMS}, got {self.num_beams!r}")
        if not _is_num(self.length_penalty) or abs(self.length_penalty) > MAX_LENGTH_PENALTY:
            bad(f"length_penalty must be a number from -{MAX_LENGTH_PENALTY} to {MAX_LENGTH_PENALTY} (beam scores "
                f"are logprob / length ** length_penalty), got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never") or type(self.early_stopping) not in (bool, str):
            bad(f"early_stopping must be true, false or \"never\" (beam search), got {self.early_stopping!r}")
        if self.num_beams > 1 and self.do_sample:
            bad("beam search is deterministic: use num_beams > 1 without temperature/top_k/top_p/min_p")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            bad(f"seed must be an integer from -2**63 to 2**64 - 1 (torch's generator), got {self.seed!r}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {self.top_logprobs!r}")
        if self.stop is not None and (
            not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop)
        ):
            bad("stop must be a list of non-empty strings")
        return self


def _is_int(v) -> bool:
    """An integer of any integral type (int, numpy's int64, ...), not a bool; floats such as 2.0 are not."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # numpy's bool_ is no Integral


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------- logits processing


# float32's smallest normal number: the least temperature logits are divided by (a smaller one is subnormal, or 0,
# in a float32 tensor).
TINY = torch.finfo(torch.float32).tiny


def finite_above(x: torch.Tensor) -> torch.Tensor:
    """+inf -> the dtype's largest number (-inf, a filtered token, stays): a logit divided by an extreme temperature
    or penalty would otherwise make softmax compute inf - inf = NaN. No change to finite values."""
    return x.clamp(max=torch.finfo(x.dtype).max)


# Below this temperature logits / t could overflow float32 (|logit| > 3.4e38 * t); above it no model's logits do.
SHIFT_BELOW = 1e-20


def divide_by_temperature(logits: torch.Tensor, t: float | torch.Tensor, tiny: bool) -> torch.Tensor:
    """logits / t for any temperature t > 0 (a float, at least `TINY` here; or each row's [B, 1], already so). With
    `tiny` (some t below `SHIFT_BELOW`, known on the host) each row's largest logit is subtracted first: the same
    distribution, whose largest logit is 0 and the others fall to -inf as t -> 0 (greedy in the limit, not a tie
    of infinities), at the cost of one more pass, which only such temperatures pay."""
    if tiny:
        logits = logits - logits.amax(-1, keepdim=True)
    return logits / (t if isinstance(t, torch.Tensor) else max(t, TINY))


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL's repetition penalty as transformers applies it: seen tokens' logits divided by `penalty` if positive,
    multiplied if negative. logits [B, V] float; seen [B, V] bool; penalty a float or each row's [B, 1]."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return finite_above(torch.where(seen, penalized, logits))


def top_k_filter(logits: torch.Tensor, k: int | torch.Tensor, k_max: int | None = None) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th kept too), the rest -inf. `k`: an int, or a long
    tensor [B, 1] of each row's k, with `k_max` its largest value (known on the host: no sync to find it)."""
    if isinstance(k, torch.Tensor):
        k = k.clamp(max=logits.shape[-1])
        kth = torch.topk(logits, min(k_max, logits.shape[-1]), dim=-1).values.gather(-1, k - 1)
    else:
        k = min(k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the most probable tokens whose total probability first reaches p (always at least one).
    `p`: a float, or a tensor [B, 1] of each row's 1 - p (`tail_column`: made from the floats on the host, as
    transformers' Python float is; a row with p = 1 is left as it is). Computed as transformers' TopPLogitsWarper
    does (ascending sort; drop while the total from the bottom is <= 1 - p), so that ties at the edge (common in
    bfloat16) keep the same tokens."""
    if not isinstance(p, torch.Tensor) and p >= 1.0:
        return logits
    tail = p if isinstance(p, torch.Tensor) else 1 - p
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= tail
    drop_sorted[..., -1:] = False  # the most probable token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def tail_column(top_p: list[float], device) -> torch.Tensor:
    """[B, 1] float32 of each row's 1 - top_p, for `top_p_filter`: 1 - 0.9 in float64, then float32, is 0.1; in
    float32 it would be 0.100000024, and a token exactly at the edge would fall on the other side."""
    return torch.tensor([1 - p for p in top_p], dtype=torch.float32, device=device)[:, None]


def min_p_filter(logits: torch.Tensor, min_p: float | torch.Tensor) -> torch.Tensor:
    """Keep tokens whose probability is at least `min_p` times the most probable token's (`min_p`: a float, or a
    tensor [B, 1] of each row's)."""
    probs = logits.softmax(-1)
    floor = probs.amax(-1, keepdim=True) * min_p
    return logits.masked_fill(probs < floor, float("-inf"))


def warp(logits: torch.Tensor, opts: GenerationOptions) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p in that order (sampling only). logits [B, V] float32."""
    t = opts.temperature if opts.temperature is not None else 1.0
    if t != 1.0:
        logits = divide_by_temperature(logits, t, t < SHIFT_BELOW)
    if opts.top_k is not None:
        logits = top_k_filter(logits, opts.top_k)
    if opts.top_p is not None:
        logits = top_p_filter(logits, opts.top_p)
    if opts.min_p is not None:
        logits = min_p_filter(logits, opts.min_p)
    return logits


def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from softmax(logits) [B, V] -> [B], by argmax(p / q), q ~ Exp(1), without leaving the device.

    q is kept above the smallest normal float so that a filtered token (p = 0) can never become 0 / 0 = NaN."""
    probs = logits.softmax(-1)
    q = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / q).argmax(-1)


def seen_tokens(prompt_ids: torch.Tensor, prompt_valid: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] bool: the tokens of each prompt [B, T] where `prompt_valid` (transformers counts its padding seen too,
    which penalises only the pad token, in padded rows)."""
    # Padding goes to an extra column V that is then dropped, so it marks nothing.
    seen = torch.zeros(prompt_ids.shape[0], vocab + 1, dtype=torch.bool, device=prompt_ids.device)
    seen.scatter_(1, prompt_ids.masked_fill(~prompt_valid.bool(), vocab), True)
    return seen[:, :vocab].contiguous()


def batch_seed(seed: int | None, k: int) -> int | None:
    """The seed of batch k of a seeded request run in batches (`Pipeline.generate(..., batch_size=N)`): the seed
    itself for the first, then one far from it per batch (a multiple of the golden ratio's 64-bit fraction apart),
    so that every batch draws different random numbers. None stays None (unseeded)."""
    if seed is None or k == 0:
        return seed
    return (seed + k * 0x9E3779B97F4A7C15) % 2**64


class Chooser:
    """Picks the next tokens from raw logits, with the state a decode needs (seen tokens, the RNG, the step).

    `__call__(logits [B, V], step) -> tokens [B]`; `observe(tokens [B])` records them for the repetition penalty.
    The prompt's real tokens (`prompt_ids` [B, T] where `prompt_valid`) count as seen, as in transformers.
    """

    def __init__(self, opts: GenerationOptions, eos_ids, vocab_size: int, prompt_ids: torch.Tensor,
                 prompt_valid: torch.Tensor):
        self.opts = opts
        device = prompt_ids.device
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        self.generator = None
        if opts.do_sample and opts.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(opts.seed)
        self.seen = None
        if opts.repetition_penalty != 1.0:
            self.seen = seen_tokens(prompt_ids, prompt_valid, vocab_size)

    def process(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Raw logits [B, V] -> the float32 logits the choice is made from (before the sampling warpers)."""
        x = logits.float()
        if self.seen is not None:
            x = penalize_repeats(x, self.seen, self.opts.repetition_penalty)
        if step < self.opts.min_new_tokens:
            x = x.index_fill(-1, self.eos, float("-inf"))
        return x

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        x = self.process(logits, step)
        if self.opts.do_sample:
            return sample(warp(x, self.opts), self.generator)
        return x.argmax(-1)

    def observe(self, tokens: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)


class RowChooser:
    """Picks each row's next token by that row's own options: the rows of a continuous batch are different requests.

    A greedy row takes the largest processed logit (as `Chooser` does); a sampled row draws with its own temperature,
    top-k, top-p and min-p, and every row has its own repetition penalty and EOS bar. The per-row settings are
    [B, 1] tensors, rebuilt when rows change. Sampling draws are unseeded (a seeded sample depends on its batch).
    `seen` [B, V] holds each row's prompt and answer tokens, for the repetition penalty."""

    def __init__(self, rows: int, vocab: int, eos_ids, device):
        self.opts: list[GenerationOptions | None] = [None] * rows  # None: a free row (greedy, no penalty)
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        self._table: dict | None = None

    def start(self, rows: list[int], row_t: torch.Tensor, opts: list[GenerationOptions], prompt_ids: torch.Tensor,
              prompt_valid: torch.Tensor) -> None:
        """Rows `rows` (as a tensor, `row_t`) begin new sequences with these options and prompts [n, T]."""
        for r, o in zip(rows, opts):
            self.opts[r] = o
        self.seen[row_t] = seen_tokens(prompt_ids, prompt_valid, self.seen.shape[1])
        self._table = None

    def free(self, row: int) -> None:
        self.opts[row] = None
        self._table = None

    def kept(self, keep: torch.Tensor, rows: list[int], size: int) -> RowChooser:
        """A chooser for `size` rows holding rows `rows` (as a tensor, `keep`) of this one first."""
        new = RowChooser(size, self.seen.shape[1], [], self.seen.device)
        new.eos = self.eos
        new.opts[:len(rows)] = [self.opts[r] for r in rows]
        new.seen[:len(rows)] = self.seen[keep]
        return new

    @property
    def fusable(self) -> bool:
        """Every row greedy without a repetition penalty: the choice can be fused into the compiled step."""
        t = self._settings()
        return not t["sampled_any"] and not t["penalty_any"]

    def _settings(self) -> dict:
        if self._table is None:
            device = self.seen.device
            opts = [o or GenerationOptions() for o in self.opts]

            def col(values, dtype=torch.float32):
                return torch.tensor(values, dtype=dtype, device=device)[:, None]

            sampled = [o.do_sample for o in opts]
            top_k = [o.top_k if (s and o.top_k) else self.seen.shape[1] for o, s in zip(opts, sampled)]
            self._table = {
                "sampled": col(sampled, torch.bool)[:, 0], "sampled_any": any(sampled),
                "temperature": col([max(o.temperature, TINY) if s and o.temperature else 1.0
                                    for o, s in zip(opts, sampled)]),
                "tiny_temperature": any(s and o.temperature and o.temperature < SHIFT_BELOW
                                        for o, s in zip(opts, sampled)),
                "top_k": col(top_k, torch.long), "top_k_max": max(top_k),
                "top_k_any": any(s and o.top_k for o, s in zip(opts, sampled)),
                "top_p": tail_column([o.top_p if s and o.top_p is not None else 1.0 for o, s in zip(opts, sampled)],
                                     device),
                "top_p_any": any(s and o.top_p is not None and o.top_p < 1 for o, s in zip(opts, sampled)),
                "min_p": col([o.min_p if s and o.min_p else 0.0 for o, s in zip(opts, sampled)]),
                "min_p_any": any(s and o.min_p for o, s in zip(opts, sampled)),
                "penalty": col([o.repetition_penalty for o in opts]),
                "penalty_any": any(o.repetition_penalty != 1.0 for o in opts),
            }
        return self._table

    def observe(self, tokens: torch.Tensor) -> None:
        """Record a step's tokens [B] as seen (only while some row has a repetition penalty: a row's own history
        matters only to itself, and such a row records all of it from its start)."""
        if self._settings()["penalty_any"]:
            self.seen.scatter_(1, tokens[:, None], True)

    def __call__(self, logits: torch.Tensor, bar: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits [n, V] of all rows (or of `rows` [n]); bar [n, 1]: EOS barred -> tokens [n]."""
        t = self._settings()
        pick = (lambda v: v) if rows is None else (lambda v: v[rows])
        x = logits.float()
        if t["penalty_any"]:
            x = penalize_repeats(x, pick(self.seen), pick(t["penalty"]))
        x = torch.where(bar, x.index_fill(-1, self.eos, float("-inf")), x)
        tok = x.argmax(-1)
        if not t["sampled_any"]:
            return tok
        x = divide_by_temperature(x, pick(t["temperature"]), t["tiny_temperature"])
        if t["top_k_any"]:
            x = top_k_filter(x, pick(t["top_k"]), t["top_k_max"])
        if t["top_p_any"]:
            x = top_p_filter(x, pick(t["top_p"]))
        if t["min_p_any"]:
            x = min_p_filter(x, pick(t["min_p"]))
        return torch.where(pick(t["sampled"]), sample(x), tok)
