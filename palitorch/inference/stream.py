"""A stream of one answer's text, as `Pipeline.stream` returns it."""

from __future__ import annotations

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
    generations raise InputError until it ends (or is broken out of)."""

    def __init__(self, pieces, pipeline: Pipeline):
        self._pieces, self._pipeline = pieces, pipeline
        self._consumed = False
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        if self._consumed:
            raise InputError("this stream was already consumed: call pipe.stream again")
        return self._run()

    def _run(self):
        pipe = self._pipeline
        with pipe._lock:
            if self._consumed:
                raise InputError("this stream was already consumed: call pipe.stream again")
            pipe._claim()  # the KV caches are this stream's until it ends
            pipe._busy, self._consumed = True, True
        try:
            self.result = yield from pipe._one_at_a_time(self._pieces)
        finally:
            self._pieces.close()
            pipe._busy = False

    def __repr__(self) -> str:
        state = "not started" if not self._consumed else "finished" if self.result is not None else "started"
        return f"<palitorch Stream ({state})>"


def streamable(opts: GenerationOptions) -> GenerationOptions:
    """`opts`, unless they ask for beams, which cannot stream: InputError when the stream is made, not iterated."""
    if opts.num_beams > 1:
        raise InputError("streaming shows one sequence as it grows: use num_beams=1 (or generate for beams)")
    return opts
