"""`palitorch chat` driven through stdin: streamed answers on stdout, /image switching, errors that keep going."""

import io
import sys

from conftest import cli, cli_subprocess  # tests/cli/conftest.py
from PIL import Image

import palitorch
from palitorch.errors import InputError


def test_chat_through_a_pipe_end_to_end(pg1, images):
    folder, _ = pg1
    script = "caption en\n/image missing.png\n\n/image {blue}\nanswer en what color?\n/quit\nnever asked\n"
    p = cli_subprocess(["chat", "--model", folder, "--image", images / "red.png", "--max-new-tokens", "5"],
                       stdin=script.format(blue=images / "blue.png"))
    assert p.returncode == 0, p.stderr
    pipe = palitorch.load(folder)
    first = pipe.generate(Image.open(images / "red.png"), "caption en", max_new_tokens=5).text
    second = pipe.generate(Image.open(images / "blue.png"), "answer en what color?", max_new_tokens=5).text
    assert p.stdout == first + "\n" + second + "\n"  # answers only: no prompt decoration in a pipe
    err = p.stderr.splitlines()
    assert sum("tokens/s" in line for line in err) == 2
    assert any("missing.png" in line and "does not exist" in line for line in err)
    assert any("blue.png (120x160)" in line for line in err)


def run_chat(script, capsys, monkeypatch, images, extra=()):
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))  # StringIO.isatty() is False: a pipe
    return cli(["chat", "--image", images / "red.png", *extra], capsys)


def test_image_switching_reaches_the_model(fake_pipe, images, capsys, monkeypatch):
    pipe = fake_pipe(lambda im, p: f"{p} on a {im.width}x{im.height} image")
    script = f"caption en\n/image {images / 'blue.png'}\n/image {images / 'broken.png'}\n/nonsense\n/imgae x.png\nocr\n"
    rc, out, err = run_chat(script, capsys, monkeypatch, images, ["--temperature", "0.5", "--seed", "3"])
    assert rc == 0, err
    assert out == "caption en on a 300x200 image\nocr on a 120x160 image\n"  # EOF ends the chat
    assert [c[1] for c in pipe.calls] == [[(300, 200)], [(120, 160)]]  # the broken image did not replace blue
    assert all(c[0] == "stream" and c[3] == {"temperature": 0.5, "seed": 3} for c in pipe.calls)
    assert "cannot read image" in err and "unknown command /nonsense" in err
    assert "unknown command /imgae" in err  # a mistyped command with an argument is not a prompt


def test_the_status_line_counts_one_token_in_the_singular(fake_pipe, images, capsys, monkeypatch):
    fake_pipe(lambda im, p: "x" if p == "ocr" else "xy")
    rc, out, err = run_chat("ocr\ncaption en\n", capsys, monkeypatch, images)
    assert rc == 0 and out == "x\nxy\n", err
    assert "[1 token in " in err and "[2 tokens in " in err


def test_chat_refuses_a_second_image_option(images, no_model_load, capsys):
    """argparse kept the last --image silently (run reads several as one prompt's images): one line, before the
    model loads."""
    rc, _, err = cli(["chat", "--image", images / "red.png", "--image", images / "blue.png"], capsys)
    assert rc == 2 and "chat talks about one image at a time" in err and err.count("\n") == 1, err


def test_beam_search_answers_without_streaming(fake_pipe, images, capsys, monkeypatch):
    pipe = fake_pipe(lambda im, p: "best beam")
    rc, out, err = run_chat("caption en\n", capsys, monkeypatch, images, ["--num-beams", "3"])
    assert rc == 0 and out == "best beam\n", err
    assert [(c[0], c[3]) for c in pipe.calls] == [("generate", {"num_beams": 3})]


def test_a_beam_option_without_beams_is_refused(fake_pipe, images, capsys, monkeypatch):
    pipe = fake_pipe(lambda im, p: "never asked")
    rc, out, err = run_chat("caption en\n", capsys, monkeypatch, images, ["--length-penalty", "0.5"])
    assert rc == 2 and out == "" and pipe.calls == []
    assert err.count("\n") == 1 and "--length-penalty applies to beam search only" in err, err


def test_an_error_answer_does_not_end_the_chat(fake_pipe, images, capsys, monkeypatch):
    def answer(im, prompt):
        if prompt == "too long":
            raise InputError("the prompt is too long")
        return "fine"

    fake_pipe(answer)
    rc, out, err = run_chat("too long\ncaption en\n/quit\ncaption en\n", capsys, monkeypatch, images)
    assert rc == 0 and out == "\nfine\n"  # (an empty line for the error: one answer line per prompt line); /quit
    # stopped before the last line
    assert "error: the prompt is too long" in err


def test_chat_checks_its_options_before_loading(images, no_model_load, capsys, monkeypatch):
    rc, out, err = run_chat("caption en\n", capsys, monkeypatch, images, ["--top-p", "0"])
    assert rc == 2 and out == "" and err.count("\n") == 1 and "--top-p must be" in err, err
    rc, out, err = cli(["chat", "--image", images / "x.png"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and "does not exist" in err, err
