"""GET /metrics: Prometheus' text format, with counts that agree with what the requests were answered, and
latency histograms for the paths that know each time."""

import re
import urllib.request

import pytest
from serverkit import TIMEOUT, call, chat, demo_examples, live_server, post, stream_events

from palitorch.server.metrics import Histogram, Metrics

SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")


def scrape(server) -> tuple[str, dict[str, float]]:
    """GET /metrics -> (content type, {name{labels}: value}), each sample line checked against the format and each
    metric family announced by # HELP and # TYPE before its samples."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=TIMEOUT) as r:
        kind, text = r.headers["Content-Type"], r.read().decode()
    samples, declared = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
        elif not line.startswith("# HELP "):
            m = SAMPLE.match(line)
            assert m, line
            family = re.sub(r"_(bucket|sum|count)$", "", m[1]) if m[1] not in declared else m[1]
            assert family in declared, line
            samples[m[1] + (m[2] or "")] = float(m[3])
    return kind, samples


def test_histogram_buckets_are_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="0.1"} 1', 'x_bucket{le="1"} 2', 'x_bucket{le="+Inf"} 3', "x_sum 5.550000",
                            "x_count 3"]
    m = Metrics()  # a request of 4 rows of 10 tokens decoded side by side in 1 s after its first: 1/9 s a step
    m.request("ok", 7, 40, queued_at=0.0, started_at=0.5, first_token_at=1.0, finished_at=2.0, steps=10)
    assert m.per_token.sum == pytest.approx(1 / 9) and m.generation_tokens == 40
    text = Metrics().render(waiting=2, running=1)
    assert "palitorch_requests_waiting 2" in text and "palitorch_requests_running 1" in text
    assert 'palitorch_requests_total{outcome="cancelled"} 0' in text


@pytest.fixture(scope="module")
def demo():
    return demo_examples()


def test_metrics_count_what_was_answered(demo):
    with live_server() as server:
        _, before = scrape(server)
        assert before["palitorch_requests_total{outcome=\"ok\"}"] == 0
        usages = []
        status, out, _ = post(server, chat(demo[0]["path"], "caption en"))  # greedy: a live batch
        assert status == 200
        usages.append(out["usage"])
        _, events = stream_events(server, chat(demo[1]["path"], "caption en", stream=True,
                                               stream_options={"include_usage": True}))
        usages.append(events[-2]["usage"])
        status, out, _ = post(server, chat(demo[2]["path"], "caption en", n=2, temperature=1.0, max_tokens=5))
        usages.append(out["usage"])
        status, out, _ = post(server, chat(demo[3]["path"], "caption en", seed=3, temperature=1.0, max_tokens=5))
        usages.append(out["usage"])  # a seeded request runs alone, as one batch: no first-token time of its own
        assert post(server, chat(demo[0]["path"], "caption en", temprature=1))[0] == 400  # refused before the model
        assert call(server.url + "/metrics", {})[0] == 405
        kind, m = scrape(server)
    assert kind.startswith("text/plain") and "version=0.0.4" in kind
    assert m['palitorch_requests_total{outcome="ok"}'] == 4
    assert m['palitorch_requests_total{outcome="error"}'] == m['palitorch_requests_total{outcome="cancelled"}'] == 0
    assert m["palitorch_generation_tokens_total"] == sum(u["completion_tokens"] for u in usages)
    assert m["palitorch_prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usages)
    assert m['palitorch_http_responses_total{code="400"}'] == 1 and m['palitorch_http_responses_total{code="405"}'] == 1
    assert m['palitorch_http_responses_total{code="200"}'] >= 5  # the answers and the first scrape
    assert m["palitorch_request_duration_seconds_count"] == m["palitorch_queue_time_seconds_count"] == 4
    assert m["palitorch_time_to_first_token_seconds_count"] == 3  # the seeded one's is not known
    assert m['palitorch_request_duration_seconds_bucket{le="+Inf"}'] == 4
    assert m["palitorch_request_duration_seconds_sum"] >= m["palitorch_time_to_first_token_seconds_sum"] > 0
    assert m["palitorch_requests_waiting"] == m["palitorch_requests_running"] == 0


def test_compiled_graphs_are_counted():
    """--compile: each new (decode function, batch size, cache length) is a compilation that stalls the model
    thread; /metrics says how many torch.compile has made in the process."""
    import torch

    def graphs():
        return int(re.search(r"^palitorch_compiled_graphs (\d+)$", Metrics().render(waiting=0, running=0), re.M)[1])

    before = graphs()
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))  # (a new function: one new graph)
    assert graphs() == before + 1


def test_a_value_on_a_bound_is_in_its_bucket_and_each_histogram_gets_its_own_time():
    """Prometheus' buckets count values <= their bound (le); the queue time is arrival to joining a batch, the time
    per token spreads what followed the first token over the steps after it, and a one-token answer has none."""
    h = Histogram((0.1, 1.0))
    for v in (0.1, 1.0):
        h.observe(v)
    assert h.counts == [1, 2] and h.count == 2
    m = Metrics()
    m.request("ok", 3, 5, queued_at=1.0, started_at=1.25, first_token_at=1.5, finished_at=3.5, steps=5)
    assert (m.queue_time.sum, m.first_token.sum, m.duration.sum) == (0.25, 0.5, 2.5)
    assert m.per_token.sum == 0.5 and m.per_token.count == 1
    m.request("ok", 3, 1, queued_at=1.0, started_at=1.25, first_token_at=1.5, finished_at=1.75, steps=1)
    assert m.per_token.count == 1 and m.first_token.count == 2


def test_a_request_whose_client_left_is_cancelled_even_with_its_answer():
    """A job that was cancelled (its client hung up) counts as cancelled although its rows ran to an answer (in a
    padded batch they may); its tokens, the final EOS each included, are still generated tokens."""
    import threading
    from types import SimpleNamespace

    def job(cancelled: bool):
        event = threading.Event()
        if cancelled:
            event.set()
        rows = [SimpleNamespace(token_ids=[5, 6], finish_reason="eos", prompt_tokens=9),
                SimpleNamespace(token_ids=[5, 6, 7], finish_reason="length", prompt_tokens=9)]
        return SimpleNamespace(cancelled=event, error=None, results=rows, done_rows=rows, queued_at=0.0,
                               started_at=0.0, first_token_at=0.1)

    m = Metrics()
    m.ended(job(cancelled=True))
    m.ended(job(cancelled=False))
    assert (m.requests["cancelled"], m.requests["ok"]) == (1, 1)
    assert (m.generation_tokens, m.prompt_tokens) == (2 * (3 + 3), 2 * 9)


def test_metrics_count_the_image_feature_cache(demo):
    """A request about an image the server saw lately takes its features from the pipeline's cache: one more hit,
    no more misses, and the same answer."""
    with live_server() as server:
        status, first, _ = post(server, chat(demo[0]["path"], "caption en"))
        _, m = scrape(server)
        hits, misses = (m[f'palitorch_feature_cache_lookups_total{{result="{k}"}}'] for k in ("hit", "miss"))
        assert status == 200 and misses >= 1 and m["palitorch_feature_cache_bytes"] > 0
        status, again, _ = post(server, chat(demo[0]["path"], "answer en what shape is it?"))
        status, same, _ = post(server, chat(demo[0]["path"], "caption en"))
        _, m = scrape(server)
    assert status == 200 and same["choices"][0]["message"] == first["choices"][0]["message"]
    assert m['palitorch_feature_cache_lookups_total{result="hit"}'] == hits + 2
    assert m['palitorch_feature_cache_lookups_total{result="miss"}'] == misses
