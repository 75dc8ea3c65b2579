"""What `GET /metrics` tells a Prometheus scraper about `palitorch serve` (the text exposition format, 0.0.4).

Counters: requests the engine ended, by outcome (ok, error, cancelled: a request whose client left; one refused
before it reaches the engine, a 400 say, is only in the HTTP responses), prompt and generated tokens (the tokens the
model decoded, each answer's final EOS included; a greedy request's n alike answers are one), and HTTP responses by
status code. Gauges: requests waiting for the model and requests being decoded. Histograms, in seconds: the time a
request waited before its batch took it in, the time to its first token (prefill included), the time per token
after the first (its rows decode side by side: per step of its longest row), and the whole request, from its
arrival at the engine to its last token. Warm-up requests are not counted. The cache of image features (see
palitorch/inference/features.py): its lookups by result, and its size.

The engine's thread records and the HTTP threads read, under one lock; rendering copies nothing large.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter

# Upper bounds of the histograms' buckets, in seconds: from a GPU's millisecond steps to a CPU's long queues.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Observations counted into cumulative buckets (each bucket counts the values <= its bound), with their sum."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum, self.count = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound:g}"}} {n}' for bound, n in zip(self.bounds, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # outcome -> requests
        self.responses: Counter[int] = Counter()  # HTTP status -> responses
        self.prompt_tokens = self.generation_tokens = 0
        self.queue_time = Histogram(LATENCY_BUCKETS)
        self.first_token = Histogram(LATENCY_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)
        self.duration = Histogram(LATENCY_BUCKETS)

    def ended(self, job) -> None:
        """A request (the engine's Job) has ended: its outcome, tokens and times (the tokens its rows generated, EOS
        included: a greedy request's n alike answers are one row)."""
        left = job.cancelled.is_set()  # (its row may have run on in a padded batch)
        outcome = "error" if job.error is not None else "cancelled" if left or job.results is None else "ok"
        lengths = [len(r.token_ids) + (r.finish_reason == "eos") for r in job.done_rows]
        prompt = job.done_rows[0].prompt_tokens if job.done_rows else 0
        self.request(outcome, prompt, sum(lengths), job.queued_at, job.started_at, job.first_token_at,
                     time.perf_counter(), steps=max(lengths, default=0))

    def request(self, outcome: str, prompt_tokens: int, generated: int, queued_at: float, started_at: float | None,
                first_token_at: float | None, finished_at: float, steps: int | None = None) -> None:
        """One request has ended. Times are `time.perf_counter()` readings; None: not known on the path it took
        (a request answered as one padded batch has no first-token time of its own). `steps`: its longest row's
        tokens (its rows decode side by side; default `generated`), over which the time after the first is spread."""
        steps = generated if steps is None else steps
        with self._lock:
            self.requests[outcome] += 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generated
            self.duration.observe(finished_at - queued_at)
            if started_at is not None:
                self.queue_time.observe(started_at - queued_at)
            if first_token_at is not None:
                self.first_token.observe(first_token_at - queued_at)
                if steps > 1:
                    self.per_token.observe((finished_at - first_token_at) / (steps - 1))

    def response(self, status: int) -> None:
        with self._lock:
            self.responses[status] += 1

    def render(self, waiting: int, running: int, images=None) -> str:
        """The exposition text, with the gauges' current values (and the pipeline's FeatureCache, `images`)."""
        cached = [] if images is None else [
            ("palitorch_feature_cache_lookups_total", "counter", "Images looked up in the cache of image features, "
             "by result (a hit skips the vision tower).",
             [f'palitorch_feature_cache_lookups_total{{result="{k}"}} {n}'
              for k, n in (("hit", images.hits), ("miss", images.misses))]),
            ("palitorch_feature_cache_bytes", "gauge", "Bytes of image features in the cache.",
             [f"palitorch_feature_cache_bytes {images.bytes}"])]
        with self._lock:
            parts = [
                ("palitorch_requests_total", "counter", "Chat completion requests the engine ended, by outcome.",
                 [f'palitorch_requests_total{{outcome="{k}"}} {self.requests[k]}'
                  for k in sorted({"ok", "error", "cancelled"} | set(self.requests))]),
                ("palitorch_prompt_tokens_total", "counter", "Prompt tokens (image tokens included) of ended requests.",
                 [f"palitorch_prompt_tokens_total {self.prompt_tokens}"]),
                ("palitorch_generation_tokens_total", "counter", "Tokens generated for ended requests.",
                 [f"palitorch_generation_tokens_total {self.generation_tokens}"]),
                ("palitorch_http_responses_total", "counter", "HTTP responses, by status code.",
                 [f'palitorch_http_responses_total{{code="{k}"}} {v}' for k, v in sorted(self.responses.items())]),
                ("palitorch_requests_waiting", "gauge", "Requests waiting for the model (queued, or taken by a "
                 "batch and not yet in it).",
                 [f"palitorch_requests_waiting {waiting}"]),
                ("palitorch_requests_running", "gauge", "Requests being decoded.",
                 [f"palitorch_requests_running {running}"]),
                ("palitorch_compiled_graphs", "gauge", "Graphs torch.compile has made in this process (--compile: "
                 "one per decode function, batch size and cache length; each new one stalls the model thread).",
                 [f"palitorch_compiled_graphs {compiled_graphs()}"]),
                ("palitorch_queue_time_seconds", "histogram", "Time from arrival to joining a batch.",
                 self.queue_time.lines("palitorch_queue_time_seconds")),
                ("palitorch_time_to_first_token_seconds", "histogram", "Time from arrival to the first token.",
                 self.first_token.lines("palitorch_time_to_first_token_seconds")),
                ("palitorch_time_per_output_token_seconds", "histogram", "Time per generated token after the first.",
                 self.per_token.lines("palitorch_time_per_output_token_seconds")),
                ("palitorch_request_duration_seconds", "histogram", "Time from arrival to the last token.",
                 self.duration.lines("palitorch_request_duration_seconds")),
                *cached,
            ]
        out = []
        for name, kind, text, lines in parts:
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *lines]
        return "\n".join(out) + "\n"


def compiled_graphs() -> int:
    """How many graphs torch.compile (dynamo) has made in this process; 0 if it never ran (not imported)."""
    if "torch._dynamo.utils" not in sys.modules:
        return 0
    return int(sys.modules["torch._dynamo.utils"].counters["stats"].get("unique_graphs", 0))
