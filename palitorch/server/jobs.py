"""A request on its way through the engine (`Job`), and how a palitorch error becomes an HTTP one."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from palitorch.errors import InputError, PalitorchError
from palitorch.inference.answer import Result
from palitorch.server.openai import ApiError, ChatRequest


def api_error(e: PalitorchError) -> ApiError:
    """A refused input is the client's to fix (400; by the time a request reaches the model its options have been
    checked, so what is refused is in its messages: a prompt over the context, say); NaN logits and the like are
    the model's fault (500)."""
    if isinstance(e, InputError):
        return ApiError(400, str(e), "messages")
    return ApiError(500, str(e))


def error_for(e: Exception) -> ApiError:
    """What a client gets for an exception: a PalitorchError as `api_error` says; anything else is a bug, a 500,
    with its traceback on the server's stderr (call it in the `except` block)."""
    if isinstance(e, PalitorchError):
        return api_error(e)
    traceback.print_exc(file=sys.stderr)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}")


@dataclass(eq=False)
class Job:
    request: ChatRequest
    results: list[Result] | None = None  # n results, once done
    error: ApiError | None = None
    done: threading.Event = field(default_factory=threading.Event)
    pieces: queue.Queue = field(default_factory=queue.Queue)  # a stream's (choice, piece or Result)s, then None
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away
    counted: bool = True  # False for the warm-up: not in the stats or the log
    done_rows: list[Result] = field(default_factory=list)  # its rows' results so far, in a batch
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # when a batch took it in (perf_counter), for /metrics
    first_token_at: float | None = None  # when its first token came, where the path it took tells

    @property
    def batchable(self) -> bool:
        """One sequence per row (no beam search), greedy or sampled without a seed (a seeded sample must not
        depend on what else is in its batch)."""
        r = self.request
        return r.options.get("num_beams", 1) == 1 and (r.greedy or r.options.get("seed") is None)

    @property
    def rows(self) -> int:
        """Batch rows this job needs: n samples, or one greedy answer (its n copies are all alike)."""
        return 1 if self.request.greedy else self.request.n

    def choices(self, row: int) -> range:
        """The choices (0 .. n-1) that row `row` of the job answers: its own, or all n for a greedy job (whose one
        row stands for n alike answers)."""
        return range(self.request.n) if self.request.greedy else range(row, row + 1)

    def send(self, row: int, item) -> None:
        """To a stream whose client is still there: a text piece of row `row`, or the row's finished Result, once
        for each choice it answers."""
        if self.request.stream and not self.cancelled.is_set():
            for i in self.choices(row):
                self.pieces.put((i, item))

    @property
    def finished(self) -> bool:
        return self.results is not None or self.error is not None

    def key(self) -> str:
        return json.dumps(self.request.options, sort_keys=True)

    def wait(self) -> list[Result]:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.results


def batch_rows(group: list[Job]) -> tuple[list, list[str], list[Job]]:
    """A batch's (images, prompts) row by row, and the job of each row (a job takes `Job.rows` rows)."""
    owners = [job for job in group for _ in range(job.rows)]
    return [job.request.image for job in owners], [job.request.prompt for job in owners], owners


def row_numbers(owners: list[Job]) -> list[int]:
    """For each batch row, which of its job's rows it is (0 .. rows-1)."""
    taken: dict[Job, int] = {}
    numbers = []
    for job in owners:
        numbers.append(taken.get(job, 0))
        taken[job] = numbers[-1] + 1
    return numbers
