"""Answers as the host assembles them, one token at a time: ids, logprobs, the most likely alternatives, text, stop
strings and the finish reason; and the `Result` they end in. Plain Python on host values: the engines
(`generate.generate` / `generate.stream_batch`, `continuous.LiveBatch`, `beam.beam_search`) move each step's tokens
off the device and push them here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from palitorch.errors import NumericsError
from palitorch.inference.processor import Processor

# A step's alternatives: the k most likely tokens as (token id, logprob) pairs, most likely first.
Alternatives = list[tuple[int, float]]
Top = tuple[torch.Tensor, torch.Tensor]  # the same for a batch, on the device: ids [B, k], logprobs [B, k]


@dataclass
class Result:
    text: str  # special tokens dropped except <locNNNN>/<segNNN>; cut before a stop string
    token_ids: list[int]  # generated ids, without the stopping EOS (with a stop string: up to the token ending it)
    logprobs: list[float]  # log p(token) under the model's raw distribution, one per token id
    finish_reason: str  # "eos", "length" or "stop"
    prompt_tokens: int  # prompt length in tokens, image tokens included
    # With `top_logprobs=k`: one list per token id, the k most likely tokens at that step (whatever was chosen)
    # under the same raw distribution, as (id, logprob), most likely first. None when not asked for.
    top_logprobs: list[Alternatives] | None = None
    # Beam search: the finished hypotheses kept, best first (this answer first), each with its `beam_score`,
    # sum(logprobs) / length ** length_penalty (its length counting a final EOS). None otherwise.
    beams: list[Result] | None = None
    beam_score: float | None = None


def top_alternatives(logprobs: torch.Tensor, k: int) -> Top:
    """The k largest of raw logprobs [B, V] (k clamped to V) -> (ids [B, k], logprobs [B, k]), largest first."""
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return ids, values


def alternatives_lists(ids: torch.Tensor, values: torch.Tensor) -> list[Alternatives]:
    """One step's alternatives, ids and logprobs [B, k] (on any device) -> each row's (id, logprob) pairs."""
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def alternatives_by_row(tops: list[Top]) -> list[list[Alternatives]]:
    """n steps' alternatives (each [B, k] on the device) -> per row, per step, with one transfer of each."""
    ids, values = torch.stack([t[0] for t in tops], 1).tolist(), torch.stack([t[1] for t in tops], 1).tolist()
    return [[list(zip(i, v)) for i, v in zip(row_ids, row_values)] for row_ids, row_values in zip(ids, values)]


class Piece(str):
    """A piece of an answer's text as it streams (a str like any other), carrying the generated tokens that came with
    it: `tokens`, one (id, logprob, alternatives or None) per token pushed since the previous piece. Tokens that
    bring no text of their own (half of a multi-byte character, a hidden special token) ride with the next piece;
    those after the last piece are in the final `Result` only."""

    tokens: tuple = ()

    def __new__(cls, text: str, tokens=()):
        piece = super().__new__(cls, text)
        piece.tokens = tuple(tokens)
        return piece


class Answer:
    """One row's answer assembled on the host, step by step: ids, logprobs, text, stop strings, finish reason.
    `top`: also keep each step's alternatives (`push(..., alternatives=...)`) for `Result.top_logprobs`;
    `budget`: the answer ends ("length") at this many tokens (the batch may decode on for longer answers)."""

    def __init__(self, processor: Processor, eos: list[int], stop: list[str] | None, prompt_tokens: int,
                 top: bool = False, budget: int | None = None):
        self.processor, self.eos, self.stop = processor, set(eos), stop or []
        self.prompt_tokens, self.budget = prompt_tokens, budget
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[Alternatives] | None = [] if top else None
        self.finish: str | None = None
        self.text = ""
        self.sent = ""  # the text handed out so far by `new_text`
        self.handed = 0  # the tokens handed out with it
        self._settled: int | None = None  # with a run of byte tokens at the end: the length of the text before it
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # chars that may begin a stop string

    def push(self, token: int, logprob: float, track_text: bool, alternatives: Alternatives | None = None) -> None:
        """Record one generated token (and, when kept, that step's alternatives); with `track_text` decode the text
        and look for stop strings. NumericsError for a NaN or infinite logprob: the step's logits were not finite
        (the prefill's are checked where they are computed; a decode step's, which the engines keep on the device,
        here, where its token reaches the host), rather than an answer of pad tokens with NaN logprobs."""
        if self.finish is not None:
            return
        if not math.isfinite(logprob):
            raise NumericsError("the model computed NaN or infinite logits at a decode step: are its weights damaged? "
                                "(float16 can overflow in Gemma: try bfloat16 or float32)")
        if token in self.eos:
            self.finish = "eos"
            return
        self.ids.append(token)
        self.logprobs.append(logprob)
        if self.top is not None:
            self.top.append(alternatives or [])
        if track_text:
            # (an incomplete character decodes to one U+FFFD per byte, so completing it shortens the text: only what
            # came before those stays put)
            before = len(self.text.rstrip("\ufffd"))
            if not (self.processor.is_byte(token) or self.processor.is_hidden(token)):  # (hidden: not in the text)
                self._settled = None
            elif self._settled is None:  # a run of byte tokens begins: the text before it is settled
                self._settled = len(self.processor.decode(self.ids[:-1]))
            self.text = self.processor.decode(self.ids)
            self._find_stop(max(0, before - self._hold - 1))
        if self.finish is None and self.budget is not None and len(self.ids) >= self.budget:
            self.finish = "length"

    def _find_stop(self, start: int) -> None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish = "stop"

    def safe_text(self) -> str:
        """Text that later tokens cannot change: none of a trailing run of byte tokens (the tokenizer decodes a run
        as a whole: a byte that cannot continue it turns the run's characters, complete ones too, into U+FFFDs), no
        trailing U+FFFD, and none of the last characters that could still begin a stop string."""
        if self.finish is not None:
            return self.text
        text = self.text if self._settled is None else self.text[:self._settled]
        text = text.rstrip("\ufffd")
        return text[: len(text) - self._hold] if self._hold else text

    def new_text(self, final: bool = False) -> str:
        """The text that can no longer change and has not been handed out yet ("" if none), as a `Piece` with the
        tokens pushed since the last one. `final`: the answer is over (call `result()` first), so all of it can go."""
        text = self.text if final else self.safe_text()
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        start, self.handed = self.handed, len(self.ids)
        alternatives = self.top[start:] if self.top is not None else [None] * (self.handed - start)
        piece, self.sent = text[len(self.sent):], text
        return Piece(piece, zip(self.ids[start:], self.logprobs[start:], alternatives))

    def result(self) -> Result:
        if self.finish is None:
            self.finish = "length"
        if self.finish != "stop":
            self.text = self.processor.decode(self.ids)
        return Result(self.text, self.ids, self.logprobs, self.finish, self.prompt_tokens, self.top)
