"""A stream of one answer's text, as `Pipeline.stream` returns it."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from palitorch.errors import InputError
from palitorch.inference.answer import Result
from palitorch.inference.sampling import GenerationOptions

if TYPE_CHECKING:
    from palitorch.inference.pipeline import Pipeline


class Stream:
    """The text of one answer in pieces: iterate it once (`for piece in pipe.stream(...)`); after the loop ends,
    `.result` holds the full `Result` (text, token ids, logprobs, finish reason). Breaking out early leaves
    `.result` as None. While it is being iterated it owns the pipeline's KV caches: the pipeline's other
    generations raise InputError until it ends (or is broken out of, or `close()`d)."""

    def __init__(self, pieces, pipeline: Pipeline):
        self._pieces, self._pipeline = pieces, pipeline
        self._consumed = False
        self._running = None  # a weak reference to the generator that iterates, once made
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        if self._consumed:
            raise InputError("this stream was already consumed: call pipe.stream again")
        run = self._run()
        self._running = weakref.ref(run)
        return run

    def _run(self):
        pipe = self._pipeline
        with pipe._lock:
            if self._consumed:
                raise InputError("this stream was already consumed: call pipe.stream again")
            pipe._claim()  # the KV caches are this stream's until it ends
            pipe._take()
            self._consumed = True
        try:
            self.result = yield from pipe._one_at_a_time(self._pieces)
        finally:
            try:
                self._pieces.close()
            finally:  # (even when closing is interrupted: else the pipeline would stay busy for good)
                pipe._busy = False

    def close(self) -> None:
        """End the answer now, freeing the pipeline (`.result` stays None; the stream cannot be iterated after)."""
        if self._running is not None and (run := self._running()) is not None:
            run.close()  # (a started one frees the pipeline as it ends)
        if not self._consumed:  # never started: nothing to free, but it is used up
            self._consumed = True
            self._pieces.close()

    def __repr__(self) -> str:
        state = "not started" if not self._consumed else "finished" if self.result is not None else "started"
        return f"<palitorch Stream ({state})>"


class BatchStream:
    """A batch's events as it decodes (`Pipeline.stream_batch`): iterate it once. Breaking out of the loop ends the
    decoding and frees the pipeline's KV caches, even while a name still holds this object (the loop held the only
    reference to the running generator); `close()` ends it too."""

    def __init__(self, events, n: int, pipeline: Pipeline):
        self._events, self._n, self._pipeline = events, n, pipeline
        self._running = None  # a weak reference to the generator that iterates, once started

    def __iter__(self) -> Iterator:
        if self._events is None:
            raise InputError("this stream was already consumed: call pipe.stream_batch again")
        run, self._events = self._run(self._events), None
        self._running = weakref.ref(run)
        return run

    def _run(self, events):
        pipe = self._pipeline
        with pipe._lock:
            pipe._claim()  # the KV caches are these events' until they end
            pipe._take()
        try:
            for i, item in pipe._one_at_a_time(events):
                if i < self._n:  # not a padding copy
                    yield i, item
        finally:
            try:
                events.close()
            finally:
                pipe._busy = False

    def close(self) -> None:
        """End the decoding now (the answers not finished get no Result)."""
        if self._events is not None:
            self._events.close()
            self._events = None
        elif self._running is not None and (run := self._running()) is not None:
            run.close()


def streamable(opts: GenerationOptions) -> GenerationOptions:
    """`opts`, unless they ask for beams, which cannot stream: InputError when the stream is made, not iterated."""
    if opts.num_beams > 1:
        raise InputError("streaming shows one sequence as it grows: use num_beams=1 (or generate for beams)")
    return opts
