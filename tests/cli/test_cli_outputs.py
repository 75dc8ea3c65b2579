"""What `palitorch run` and `chat` print, byte for byte where a script reads it (found by mutation testing): JSON
in UTF-8 as batch writes it, null for a -inf logprob, `/q` as short for `/quit`, the token counts chat reports, and
one error line for an image chat cannot load."""

import io
import json
import sys

import pytest
from conftest import cli  # tests/cli/conftest.py

from palitorch.inference.answer import Result


def test_run_json_keeps_non_ascii_text_as_utf8(fake_pipe, images, capsys):
    fake_pipe(lambda im, p: "café ☕")
    rc, out, err = cli(["run", "--image", images / "red.png", "--prompt", "caption en", "--json"], capsys)
    assert rc == 0, err
    assert '"text": "café ☕"' in out and json.loads(out)["text"] == "café ☕"


def run_chat(script, capsys, monkeypatch, images, extra=()):
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))  # StringIO.isatty() is False: a pipe
    return cli(["chat", "--image", images / "red.png", *extra], capsys)


def test_chat_q_quits_and_says_how_many_tokens_each_answer_had(fake_pipe, images, capsys, monkeypatch):
    fake_pipe(lambda im, p: "four")  # the stand-in's answer has one token per character
    rc, out, err = run_chat("caption en\n/q\nnever asked\n", capsys, monkeypatch, images)
    assert rc == 0 and out == "four\n", err
    assert "[4 tokens in " in err and ", eos]" in err


def test_run_json_gives_a_zero_probability_token_a_null_logprob(fake_pipe, images, capsys):
    """JSON has no -inf (a sampled token the model gave zero probability): strict parsers get null instead."""
    pipe = fake_pipe(lambda im, p: "ab")
    pipe._result = lambda image, prompt: Result("ab", [0, 1], [float("-inf"), -0.5], "eos", 7)
    rc, out, err = cli(["run", "--image", images / "red.png", "--prompt", "caption en", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))["logprobs"] == [None, -0.5]


def test_chat_an_image_that_fails_to_load_is_one_error_and_the_chat_goes_on(fake_pipe, images, capsys, monkeypatch):
    fake_pipe(lambda im, p: f"{im.width}x{im.height}")
    rc, out, err = run_chat(f"/image {images / 'broken.png'}\nocr\n", capsys, monkeypatch, images)
    assert rc == 0 and out == "300x200\n", err
    lines = [x for x in err.splitlines() if "tokens in" not in x]
    assert len(lines) == 1 and "cannot read image" in lines[0] and "still on the previous image" in lines[0], err
