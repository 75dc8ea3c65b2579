"""One pipeline shared by threads, as a web app or a notebook with a background thread shares it: a live batch
admitted to from several threads while one steps, a stream_batch left in a variable after `break`, a stream closed
as the busy error says, a stream that ends while being closed is interrupted, one dropped in a reference cycle,
and the error another thread meets."""

import threading

import pytest
from test_continuous import ASKS
from test_generate import images

import palitorch
from palitorch.errors import InputError
from palitorch.inference.stream import BatchStream


@pytest.fixture(scope="module")
def pipe():
    return palitorch.load()


def test_a_live_batch_takes_admissions_from_other_threads_while_one_steps(pipe):
    """Request threads admit while the model's thread steps (the calls take turns under the pipeline's lock; a step
    ran while an admission swapped in its scratch caches, and failed): every answer is `generate`'s."""
    imgs, opts = images(len(ASKS)), {"max_new_tokens": 12}
    want = [r.text for r in pipe.generate(imgs, ASKS, **opts)]
    got, errors, joined = {}, [], []
    with pipe.live(max_rows=3, **opts) as live:
        def ask(i):
            try:
                while (admitted := live.admit([imgs[i]], [ASKS[i]], tags=[i])) is None:
                    threading.Event().wait(0.001)  # (no row free: try again after a step)
                joined.append(admitted)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(ASKS))]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) or live.active:
            first = joined[:]
            del joined[:len(first)]  # (an admission may append meanwhile)
            for seq, item in live.step() + [e for seqs, events in first for e in events]:
                if not isinstance(item, str):
                    got[seq.tag] = item.text
        for t in threads:
            t.join()
    assert errors == [] and got == dict(enumerate(want))


def test_a_stream_batch_in_a_variable_is_over_after_break(pipe):
    imgs = images(2)
    events = pipe.stream_batch(imgs, ASKS[:2], max_new_tokens=8)
    assert isinstance(events, BatchStream)
    for _ in events:
        break
    assert pipe.generate(imgs[0], ASKS[0], max_new_tokens=2).text is not None  # (was: "still open")
    with pytest.raises(InputError, match="already consumed"):
        iter(events)
    unstarted = pipe.stream_batch(imgs, ASKS[:2], max_new_tokens=8)
    unstarted.close()
    running = iter(pipe.stream_batch(imgs, ASKS[:2], max_new_tokens=8))
    next(running)
    with pytest.raises(InputError, match="still open: finish it"):
        pipe.generate(imgs[0], ASKS[0])
    running.close()
    assert pipe.generate(imgs[0], ASKS[0], max_new_tokens=2) is not None


def test_a_stream_closes_as_the_busy_error_says(pipe):
    """The error names close() for an open stream: a Stream had none (AttributeError), only a BatchStream."""
    stream = pipe.stream(images(1)[0], "caption en", max_new_tokens=8)
    for _ in stream:  # the loop holds its generator: close() ends it inside the loop
        with pytest.raises(InputError, match=r"close\(\) it"):
            pipe.generate(images(1)[0], "caption en")
        stream.close()
        assert pipe.generate(images(1)[0], "caption en", max_new_tokens=2) is not None
    assert stream.result is None
    with pytest.raises(InputError, match="already consumed"):
        iter(stream)
    unstarted = pipe.stream(images(1)[0], "caption en", max_new_tokens=8)
    unstarted.close()
    with pytest.raises(InputError, match="already consumed"):
        iter(unstarted)
    assert pipe.generate(images(1)[0], "caption en", max_new_tokens=2) is not None


def test_an_interrupted_close_still_frees_the_pipeline(pipe):
    """Ctrl-C while a stream closes its decoding left the pipeline busy for good."""
    def events():
        try:
            yield 0, "a"
            yield 0, "b"
        finally:
            raise KeyboardInterrupt

    running = iter(BatchStream(events(), 1, pipe))
    assert next(running) == (0, "a") and pipe._busy
    with pytest.raises(KeyboardInterrupt):
        running.close()
    assert not pipe._busy


def test_a_stream_dropped_in_a_reference_cycle_does_not_block_the_pipeline(pipe):
    class Holder:
        pass

    holder = Holder()
    holder.me, holder.pieces = holder, iter(pipe.stream(images(1)[0], "caption en", max_new_tokens=8))
    next(holder.pieces)
    del holder  # (only the cycle collector frees it)
    assert pipe.generate(images(1)[0], "caption en", max_new_tokens=2) is not None


def test_another_thread_is_told_whose_stream_is_open(pipe):
    pieces = iter(pipe.stream(images(1)[0], "caption en", max_new_tokens=8))
    next(pieces)
    seen = []

    def other():
        try:
            pipe.generate(images(1)[0], "caption en")
        except InputError as e:
            seen.append(str(e))

    thread = threading.Thread(target=other, name="worker-7")
    thread.start()
    thread.join()
    pieces.close()
    me = threading.current_thread().name
    assert seen and f"still open in thread {me!r} (other threads: try again once it ends)" in seen[0]


def test_a_compiled_live_batch_stepped_in_another_thread_raises_the_recompile_limit_there():
    """dynamo's recompile limit is per thread (a new one starts at the default, 8): past it a compiled step would
    run eagerly. The thread that admits and steps gets it raised, as the one that called live() did."""
    import torch._dynamo.config as dynamo_config

    from palitorch.inference.caches import _RECOMPILE_LIMIT

    compiled, seen = palitorch.load().compile(), []
    with compiled.live(max_rows=2) as live:
        def other():
            with dynamo_config.patch(**{_RECOMPILE_LIMIT: 1}):
                live.admit(images(1), ["caption en"])
                live.step()
                seen.append(getattr(dynamo_config, _RECOMPILE_LIMIT))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen == [256]
