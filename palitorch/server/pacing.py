"""When a live batch should take in the requests that wait: now, or once its running rows have ended.

Admitting requests runs their prefill, and every running row waits for it. When answers are long, that pause is
small against what the newcomers would wait for the batch to drain, so they join at once. When answers are short
(a VQA answer is a few tokens), the running rows would be done in less time than one admission takes, and a
stream of one-request admissions holds them up again and again, where one admission of all that waited costs
little more than one of a single request (measured in BENCHMARKS.md, session 13). The pacer compares the two
costs, from what the server's live batches have actually taken:

- the time to drain: the steps the running rows are still expected to take (up to the typical answer length,
  within each row's budget) times the time of a step;
- the time of an admission.

It holds the waiting requests while draining is the cheaper, and never longer than two admissions' time (a row
can outrun what was expected of it: a long answer among short ones delays the others by at most that). The
figures are medians of the last few observations, so that a first call's compilation, or one long answer, does
not sway them for long.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable


class Pacer:
    """Recent step times, admission times and answer lengths of a server's live batches; `hold` says whether the
    requests waiting should let the running rows end first."""

    def __init__(self, window: int = 15):
        self.steps: deque[float] = deque(maxlen=window)  # seconds
        self.admissions: deque[float] = deque(maxlen=window)  # seconds
        self.answers: deque[int] = deque(maxlen=window)  # tokens

    def stepped(self, seconds: float) -> None:
        self.steps.append(seconds)

    def admitted(self, seconds: float) -> None:
        self.admissions.append(seconds)

    def answered(self, tokens: int) -> None:
        self.answers.append(tokens)

    def drain_steps(self, rows: Iterable[tuple[int, int]]) -> int:
        """Steps until the running rows (tokens made, budget) are expected to have ended: the longest of them. A
        row short of the typical answer length is expected to reach it; one that has outlived it, to need about as
        many steps again. Never past a row's budget."""
        typical = statistics.median(self.answers) if self.answers else 0
        return max((min(budget - made, typical - made if made < typical else typical) for made, budget in rows),
                   default=0)

    def hold(self, rows: Iterable[tuple[int, int]], waited_s: float) -> bool:
        """Whether the requests waiting (the oldest for `waited_s`) should wait for the running rows to end. False
        until there is one observation of each kind."""
        if not (self.steps and self.admissions and self.answers):
            return False
        admit_s = statistics.median(self.admissions)
        if waited_s >= 2 * admit_s:
            return False
        return self.drain_steps(rows) * statistics.median(self.steps) < admit_s
