"""A request's `Job` on its own (palitorch/server/jobs.py): which exceptions are the client's (400) and which are a
bug (500, with a traceback for the server's log), what a job sends to a stream, and the key that static batching
groups jobs by. The engine's use of them is in test_engine.py."""

import pytest
from PIL import Image

from palitorch.errors import CheckpointError, InputError, NumericsError
from palitorch.server.jobs import Job, error_for
from palitorch.server.openai import ChatRequest

IMAGE = Image.new("RGB", (4, 3), "red")


def job(options=None, n=1, stream=True) -> Job:
    return Job(ChatRequest(IMAGE, "caption en", options or {}, n, stream))


def raised(e: Exception):
    try:
        raise e
    except Exception as caught:  # (error_for is called in the except block, where the traceback is)
        return error_for(caught)


def test_a_bug_is_a_500_that_names_it_with_a_traceback_on_stderr(capsys):
    """The client gets the exception's type and words; the server's log gets where it came from."""
    error = raised(KeyError("pixel_values"))
    assert (error.status, error.message) == (500, "internal error: KeyError: 'pixel_values'")
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "KeyError: 'pixel_values'" in err


@pytest.mark.parametrize("e, status, param", [(InputError("the prompt is too long"), 400, "messages"),
                                              (NumericsError("NaN logits"), 500, None),
                                              (CheckpointError("a missing tensor"), 500, None)])
def test_a_palitorch_error_is_said_as_it_is_without_a_traceback(capsys, e, status, param):
    """Refused input is the client's to fix (400, in its messages); the model's own failures are a 500. Neither is
    a bug: no traceback, no "internal error"."""
    error = raised(e)
    assert (error.status, error.message, error.param) == (status, str(e), param)
    assert capsys.readouterr().err == ""


def test_a_stream_gets_each_piece_once_per_choice_its_row_answers():
    """A greedy job's one row stands for its n alike choices; a sampled job's row r answers choice r only."""
    greedy, sampled = job(n=3), job({"temperature": 1.5}, n=3)
    greedy.send(0, "a ")
    sampled.send(2, "b ")
    assert [greedy.pieces.get_nowait() for _ in range(3)] == [(0, "a "), (1, "a "), (2, "a ")]
    assert sampled.pieces.get_nowait() == (2, "b ") and sampled.pieces.empty() and greedy.pieces.empty()


def test_nothing_is_queued_for_a_client_that_left_or_does_not_stream():
    """Pieces no one will read must not pile up (a long answer's for each request) while the batch runs on."""
    left, whole = job(), job(stream=False)
    left.cancelled.set()
    for j in (left, whole):
        j.send(0, "a ")
        assert j.pieces.empty()


def test_the_batching_key_does_not_depend_on_the_order_of_the_options():
    """Static batching groups jobs by key: the same options, gathered in another order (the server's defaults come
    first, ignore_eos adds min_new_tokens last), are one group."""
    a = job({"max_new_tokens": 5, "min_new_tokens": 5, "repetition_penalty": 1.2})
    b = job({"max_new_tokens": 5, "repetition_penalty": 1.2, "min_new_tokens": 5})
    assert a.key() == b.key() and a.key() != job({"max_new_tokens": 5}).key()
