"""CLI fixtures: image files, a helper that runs `palitorch ...` in-process, and a scripted stand-in pipeline.

The stand-in lets tests give the CLI answers a random tiny model never produces (boxes, distinct texts) and
count what the CLI asks of the model; the real tiny checkpoint (`pg1`) covers the wiring end to end.
"""

import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image
from run_cli import cli  # noqa: F401 (the tests here import it from this module)

from palitorch.cli import common
from palitorch.inference.answer import Result

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def images(tmp_path):
    """Two images of different sizes in tmp_path/imgs, plus a file that is not an image."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (300, 200), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (120, 160), (30, 30, 200)).save(folder / "blue.png")
    (folder / "broken.png").write_bytes(b"this is not a png")
    return folder


def cli_subprocess(argv, stdin=None, timeout=300):
    """Run `python -m palitorch ARGV` as a user would -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "palitorch", *map(str, argv)], input=stdin, capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, check=False)


class FakePipe:
    """Answers `answer(image, prompt) -> text` for every request; records each generate/stream call."""

    def __init__(self, answer):
        self.answer = answer
        # token texts: only for top_logprobs, never asked here; suffix_ids: one token per answer character, + <eos>
        self.processor = types.SimpleNamespace(tokenizer=None, suffix_ids=lambda suffix: [0] * (len(suffix) + 1))
        self.calls = []  # (kind, [image sizes], [prompts], options)
        self.images = []  # the images of each call, as given

    def _result(self, image, prompt):
        text = self.answer(image, prompt)
        return Result(text, list(range(len(text))), [-0.5] * len(text), "eos", 7)

    def generate(self, image, prompt, **kw):
        single = isinstance(prompt, str)
        images, prompts = ([image], [prompt]) if single else (image, prompt)
        self.calls.append(("generate", [im.size for im in images], list(prompts), kw))
        self.images.append(list(images))
        results = [self._result(im, p) for im, p in zip(images, prompts)]
        return results[0] if single else results

    def stream(self, image, prompt, **kw):
        self.calls.append(("stream", [image.size], [prompt], kw))
        pipe = self

        class Stream:
            result = None

            def __iter__(self):
                r = pipe._result(image, prompt)
                for i in range(0, len(r.text), 3):
                    yield r.text[i:i + 3]
                self.result = r

        return Stream()


@pytest.fixture
def fake_pipe(monkeypatch):
    """install(answer) -> FakePipe that every command gets instead of loading a model."""

    def install(answer):
        pipe = FakePipe(answer)
        for name in ("run", "chat", "batch", "eval"):  # imported first: one imported after the patch keeps the stand-in
            monkeypatch.setattr(f"palitorch.cli.{name}.load_pipeline", lambda *a, **k: pipe)
        monkeypatch.setattr(common, "load_pipeline", lambda *a, **k: pipe)
        return pipe

    return install


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model (for checks that must come first)."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    for name in ("run", "chat", "batch", "eval"):
        monkeypatch.setattr(f"palitorch.cli.{name}.load_pipeline", refuse)
