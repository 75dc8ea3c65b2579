"""The server engine's continuous batching (engine.py's `Engine` runs it; this is its half that keeps a live batch).

Requests decode together in a live batch (`Pipeline.live`); a request that reaches the head of the queue joins at the
next step when rows are free (unless the pacer holds it back until the running rows end, pacing.py); each request is
answered and counted as soon as its own rows end, and a request whose client has left frees its rows.
"""

from __future__ import annotations

import time
from collections import deque

from palitorch.inference.sampling import GenerationOptions
from palitorch.server.jobs import Job, batch_rows, error_for
from palitorch.server.openai import ApiError


class ContinuousBatching:
    """`Engine`'s live-batch loop. It uses the engine's pipe, max_batch, queue (`_jobs` under `_cv`, `_stopping`),
    pacer, stats and running/held counts, and its job endings (`_finish`, `_fail`, `_close`, `_left`, `_collect`),
    and runs a job that cannot join alone with `_batch`."""

    def _live(self, group: list[Job]) -> None:
        """Decode `group` in a live batch; the jobs that come to the head of the queue join it as rows free up
        (unless one must run alone), until no job is left in it. Each job is answered, counted and released as it
        ends."""
        start = time.perf_counter()
        waiting, running, served = deque(group), {}, []  # taken, not yet in; job -> its Seqs; all that joined
        self.stats["batches"] += group[0].counted
        try:
            with self.pipe.live(self.max_batch) as live:
                while True:
                    self._top_up(waiting, live.free_rows)
                    if not (waiting and self._hold(waiting, running)):
                        self._join(live, waiting, running, served)
                    self.running, self.held = len(running), len(waiting)
                    if group[0].counted:
                        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(running))
                    if not running:  # (a job left waiting now cannot join even an empty batch: n > its rows)
                        break
                    step_start = time.perf_counter()
                    events = live.step()
                    self.pacer.stepped(time.perf_counter() - step_start)
                    for seq, item in events:
                        self._deliver(seq, item, running)
                    for job in [j for j in running if j.cancelled.is_set()]:
                        for seq in running.pop(job):  # its client has gone: free its rows
                            live.release(seq)
                        self._finish(job, None)
                        self._close(job)
        except Exception as e:  # the options refused, NaN logits, or a bug: every job in the batch gets the error
            error = error_for(e)
            for job in [job for job in (*running, *waiting) if not job.finished]:
                self._fail(job, error)
                self._close(job)
        self.running = self.held = 0
        if served and served[0].counted:
            tokens = sum(len(r.token_ids) for job in served for r in (job.results or []))
            self._log_batch(served, tokens, time.perf_counter() - start, "a continuous batch")
        for job in waiting:
            if not job.finished and not self._left(job):
                self._batch([job])

    def _hold(self, waiting: deque, running: dict) -> bool:
        """Whether the jobs waiting should let the running rows end first (`pacing.Pacer`); never for an empty batch."""
        rows = [(q.made, q.budget) for seqs in running.values() for q in seqs if not q.over]
        return bool(rows) and self.pacer.hold(rows, time.perf_counter() - waiting[0].queued_at)

    def _top_up(self, waiting: deque, free_rows: int) -> None:
        """Move jobs from the head of the queue to `waiting` while they can share the batch and rows are free (a
        job that must run alone at the head stops it: no job overtakes another). While the server stops, the jobs
        not yet in the batch are refused. Jobs whose clients left, waiting or at the head, are ended unrun."""
        left = [job for job in waiting if job.cancelled.is_set()]  # (held back by the pacer, then abandoned)
        for job in left:
            waiting.remove(job)
        with self._cv:
            rows = sum(job.rows for job in waiting)
            while self._jobs and self._jobs[0].cancelled.is_set():
                left.append(self._jobs.popleft())
            while self._jobs and self._jobs[0].batchable and \
                    rows + self._jobs[0].rows <= free_rows and not self._stopping:
                rows += self._jobs[0].rows
                waiting.append(self._jobs.popleft())
            stopping = self._stopping
        for job in left:
            self._left(job)
        while stopping and waiting:
            job = waiting.popleft()
            self._fail(job, ApiError(503, "the server is shutting down"))
            self._close(job)

    def _join(self, live, waiting: deque, running: dict, served: list) -> None:
        """Admit the waiting jobs that fit, in order, with one prefill. If an input is refused, they are admitted one
        by one: the one refused gets its error (400), the others join."""
        jobs, rows = [], 0
        for job in waiting:
            if rows + job.rows > live.free_rows:
                break
            jobs.append(job)
            rows += job.rows
        if not jobs:
            return
        try:
            if not self._admit(live, jobs, running, served):
                return  # no room in the cache until some rows end: again after the next step
        except Exception as e:  # noqa: BLE001 (a refused input, or a bug that one input meets: only its job fails)
            if len(jobs) == 1:
                self._refuse(jobs[0], e)
            else:
                for job in jobs:
                    try:
                        if not self._admit(live, [job], running, served):
                            break
                    except Exception as e:  # noqa: BLE001
                        self._refuse(job, e)
        while waiting and (waiting[0].finished or waiting[0] in running):
            waiting.popleft()

    def _refuse(self, job: Job, e: Exception) -> None:
        """A job whose admission failed gets the error (`error_for`); the batch goes on without it."""
        self._fail(job, error_for(e))
        self._close(job)

    def _admit(self, live, jobs: list[Job], running: dict, served: list) -> bool:
        """Jobs join the live batch (True), or there is no room for them now (False)."""
        images, prompts, owners = batch_rows(jobs)
        options = {job: GenerationOptions.from_kwargs(**job.request.options) for job in jobs}
        start = time.perf_counter()
        got = live.admit(images, prompts, tags=owners, streams=[job.request.stream for job in owners],
                         options=[options[job] for job in owners])
        if got is None:
            return False
        now = time.perf_counter()
        self.pacer.admitted(now - start)
        seqs, events = got
        for job in jobs:
            running[job] = [q for q in seqs if q.tag is job]
            served.append(job)
            job.started_at, job.first_token_at = start, now  # (the prefill gives each row its first token)
        for seq, item in events:
            self._deliver(seq, item, running)
        return True

    def _deliver(self, seq, item, running: dict) -> None:
        """A text piece of `seq` (to its job's stream, if the client is still there) or its Result (the job's last
        one finishes the job)."""
        job = seq.tag
        row = next((i for i, q in enumerate(running.get(job, ())) if q is seq), 0)  # which of the job's rows
        if isinstance(item, str):
            job.send(row, item)
            return
        self.pacer.answered(len(item.token_ids))
        self._collect(job, item, row)
        if job.finished:
            running.pop(job, None)
            self._close(job)
