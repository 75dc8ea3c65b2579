"""One thread owns the model; the HTTP threads hand it jobs and wait for their answers.

A pipeline holds one set of KV caches, so one thread runs the model (which is also what CUDA graphs want).
Batching is continuous (live.py): requests decode together in a live batch (`Pipeline.live`), each row with its own
decoding options, and a request that arrives while it runs joins it at the next step if a row is free, rather than
waiting for the batch to end (unless the running rows are about to end: then the newcomers wait for them and join
together, see `pacing.py`); each request is answered as soon as its own rows end, and its row goes to the next
request waiting. In float32, palitorch's batched greedy output matches the one-at-a-time output token for token (the
CPU kernels a batch size selects differ only by float32 rounding, so only a near-exact tie could part them), so
batching changes only the speed (in 16-bit dtypes a batch rounds differently: answers can part at near-ties).
Sampled requests without a seed join too (each row draws its own sample; a request with n > 1 takes n rows). A
request with a seed, or a beam search, runs alone (a seed must give the same sample under any load): it waits at the
head of the queue, in arrival order, until the live batch has drained. A request whose client has left (a stream, or
one waiting for its whole answer) is dropped: from the queue, or from a live batch at the next step, its rows freed
(one that runs alone, with a seed or beams, runs to its end unless streamed).

A request whose input is refused (a prompt over the context, say) fails alone. `continuous=False` batches the old
way (the requests waiting when the model frees up, one padded batch run to its end), for `benchmarks/bench_serve.py`.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable

from PIL import Image

from palitorch.errors import PalitorchError
from palitorch.inference.answer import Result
from palitorch.server.jobs import Job, api_error, batch_rows, error_for, row_numbers
from palitorch.server.live import ContinuousBatching
from palitorch.server.metrics import Metrics
from palitorch.server.openai import ApiError, ChatRequest
from palitorch.server.pacing import Pacer


class Engine(ContinuousBatching):
    """`submit` a ChatRequest from any thread; `Job.wait()` for its results (or read `Job.pieces` for a stream)."""

    def __init__(self, pipe, max_batch: int = 8, log: Callable[[str], None] | None = None, max_queue: int = 1024,
                 continuous: bool = True):
        self.pipe, self.max_batch, self.max_queue, self.continuous = pipe, max_batch, max_queue, continuous
        self.log = log or (lambda line: None)
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="palitorch-engine", daemon=True)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "tokens": 0}
        self.pacer = Pacer()  # when a live batch takes in the requests waiting (pacing.py)
        self.metrics = Metrics()  # GET /metrics (metrics.py)
        self.running = self.held = 0  # requests being decoded now; taken by a live batch, not yet in it

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, refuse what is still queued (503), end the thread."""
        with self._cv:
            self._stopping = True
            left, self._jobs = list(self._jobs), deque()
            self._cv.notify_all()
        for job in left:
            self._fail(job, ApiError(503, "the server is shutting down"))
            if job.counted:
                self.metrics.ended(job)
            job.done.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, request: ChatRequest) -> Job:
        job = Job(request)
        with self._cv:
            if self._stopping:
                raise ApiError(503, "the server is shutting down")
            if len(self._jobs) >= self.max_queue:  # overloaded: say so now rather than answer minutes later
                raise ApiError(503, f"the server is busy ({len(self._jobs)} request"
                               f"{'s' if len(self._jobs) != 1 else ''} waiting): try again later")
            self._jobs.append(job)
            self._cv.notify()
        return job

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def warm_up(self, options: dict | None = None, batch_sizes=(1,)) -> float:
        """Answer a short request on a blank image at each batch size, with the server's default `options`, before
        any client waits (a compiled pipeline compiles its decode step for each batch size and cache length on
        first use: seconds on CPU, tens of seconds for a 3B model on a GPU). Returns the seconds taken."""
        start = time.perf_counter()
        size = self.pipe.processor.image_size
        request = ChatRequest(Image.new("RGB", (size, size)), "caption en", dict(options or {}))
        for n in batch_sizes:
            jobs = [Job(request, counted=False) for _ in range(min(n, self.max_batch))]
            with self._cv:  # queued together, so that the model's thread takes them as one batch
                self._jobs.extend(jobs)
                self._cv.notify()
            for job in jobs:
                job.wait()
        return time.perf_counter() - start

    # ------------------------------------------------------------------ the model's thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                group = self._take(self.continuous)
            group = [job for job in group if not self._left(job)]
            if not group:
                continue
            if self.continuous and group[0].batchable:
                self._live(group)
            else:
                self._batch(group)

    def _batch(self, group: list[Job]) -> None:
        """Answer a group as one padded batch, run to its end (or a job alone)."""
        start = time.perf_counter()
        for job in group:
            job.started_at = start
        self.running = len(group)
        try:
            self._run(group)
            if group[0].counted:
                self._count(group, time.perf_counter() - start)
        finally:
            self.running = 0
            for job in group:  # after the count: a client that has its answer sees it in /health and /metrics
                if job.counted:
                    self.metrics.ended(job)
                job.done.set()

    def _left(self, job: Job) -> bool:
        """Whether a job's client left while it was queued: it is then ended (cancelled) without running."""
        if job.cancelled.is_set():
            self._finish(job, None)
            self._close(job)
        return job.cancelled.is_set()

    def _close(self, job: Job) -> None:
        """Count a job that has its results or error and wake its client (after the count: a client that has its
        answer sees it in /health)."""
        if job.counted:
            self.stats["requests"] += 1
            self.stats["tokens"] += sum(len(r.token_ids) for r in (job.results or []))
            self.metrics.ended(job)
        job.done.set()

    def _log_batch(self, group: list[Job], tokens: int, seconds: float, kind: str = "") -> None:
        streams = sum(job.request.stream for job in group)
        what = f"{len(group)} request{'s' * (len(group) > 1)}" + (f" ({streams} streamed)" if streams else "")
        self.log(f"answered {what}{' in ' + kind if kind else ''}: {tokens} tokens in {seconds:.2f} s")

    # ------------------------------------------------------------------ one padded batch

    def _count(self, group: list[Job], seconds: float) -> None:
        tokens = sum(len(r.token_ids) for job in group for r in (job.results or []))
        self.stats["requests"] += len(group)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
        self.stats["tokens"] += tokens
        self._log_batch(group, tokens, seconds)

    def _take(self, live: bool) -> list[Job]:
        """The next job, and the waiting jobs that can share its batch, in arrival order: batchable jobs up to the
        first that must run alone (none overtakes it) and, for a live batch, up to the first that does not fit
        (the rows free up later); a static batch takes only those with the same options, and leaves the others
        queued in their order."""
        first = self._jobs.popleft()
        if not first.batchable:
            return [first]
        group, rest, key, rows = [first], deque(), first.key(), first.rows
        while self._jobs:  # a live batch takes any options (each row has its own); a static one, equal ones
            job = self._jobs[0]
            fits = rows + job.rows <= self.max_batch
            if not job.batchable or (live and not fits):
                break
            self._jobs.popleft()
            if fits and (live or job.key() == key):
                group.append(job)
                rows += job.rows
            else:
                rest.append(job)
        self._jobs = rest + self._jobs
        return group

    def _run(self, group: list[Job]) -> None:
        try:
            if any(job.request.stream for job in group):
                self._stream(group)
            else:
                self._generate(group)
        except Exception as e:  # a bug, not the request's fault: tell the clients, keep serving
            error = error_for(e)
            for job in group:
                if not job.finished:
                    self._fail(job, error)

    def _collect(self, job: Job, result: Result, row: int) -> None:
        """Row `row` of a job is done (a stream hears of it now); with the last row the job is finished (greedy: its
        n alike copies; a beam search: its n best beams)."""
        job.send(row, result)
        (got := job.done_rows).append(result)
        if len(got) == job.rows:
            more = (got[0].beams or [])[1:job.request.n]
            self._finish(job, got + more + [copy.copy(got[0]) for _ in range(job.request.n - len(got) - len(more))])

    def _generate(self, group: list[Job]) -> None:
        """Answer jobs as one batch. If an input in it is refused, the jobs are answered one by one (to find which);
        a job alone gets the error."""
        images, prompts, owners = batch_rows(group)
        try:
            results = self.pipe.generate(images, prompts, **group[0].request.options)
        except PalitorchError as e:
            if len(group) == 1:
                return self._fail(group[0], api_error(e))
            for job in group:
                self._generate([job])
            return
        for job, row, result in zip(owners, row_numbers(owners), results):
            self._collect(job, result, row)

    def _stream(self, group: list[Job]) -> None:
        """Decode a group with streams in it as one batch: each stream gets its pieces as they come and each job
        its answer as soon as its row ends. A stream whose client left gets nothing more, and the decoding stops
        once no job in the group is still wanted. A refused input before anything was sent: one by one."""
        images, prompts, owners = batch_rows(group)
        rows = row_numbers(owners)

        def wanted() -> bool:
            return any(not job.finished and not job.cancelled.is_set() for job in group)

        sent = False
        try:
            events = self.pipe.stream_batch(images, prompts, keep_going=wanted, **group[0].request.options)
            for i, item in events:
                job, sent = owners[i], True
                if job.first_token_at is None:
                    job.first_token_at = time.perf_counter()
                if isinstance(item, str):
                    job.send(rows[i], item)
                else:
                    self._collect(job, item, rows[i])
        except PalitorchError as e:
            if len(group) > 1 and not sent:
                for job in group:  # find which input it was
                    self._stream([job])
                return
            for job in group:
                if not job.finished:
                    self._fail(job, api_error(e))
        for job in group:
            if not job.finished:  # decoding stopped: every client still waiting had gone
                self._finish(job, None)

    @staticmethod
    def _finish(job: Job, results: list[Result] | None) -> None:
        job.results = results
        job.pieces.put(None)  # (the loop sets job.done once the batch is counted)

    @staticmethod
    def _fail(job: Job, error: ApiError) -> None:
        job.error = error
        job.pieces.put(None)
