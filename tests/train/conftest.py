"""Fixtures shared by the fine-tuning tests (a module that defines its own `data` keeps it)."""

import signal

import pytest

from hf_factory import write_checkpoint
from trainkit import make_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Small caption and colour-question JSONL data (trainkit.make_data)."""
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 32 px checkpoint with 8 px patches: 16 image tokens (a from-scratch model of the defaults has 64)."""
    folder, _ = write_checkpoint(tmp_path_factory.mktemp("base") / "base", image_size=32, patch_size=8)
    return folder


class SignalNotHandled(Exception):
    """Raised by the test's own SIGTERM handler: `palitorch train` did not put its own in place."""


@pytest.fixture
def sigterm_guard():
    """SIGTERM would kill the test process unless palitorch handles it: make an unhandled one a test failure."""
    def unhandled(signum, frame):
        raise SignalNotHandled

    before = signal.signal(signal.SIGTERM, unhandled)
    yield unhandled
    assert signal.getsignal(signal.SIGTERM) is unhandled  # palitorch put the handler back
    signal.signal(signal.SIGTERM, before)
