"""Shared fixtures. Tiny random checkpoints are written once per session by transformers itself."""

import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from hf_factory import write_checkpoint  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """write(name, **kw) -> (folder, hf_model); cached by name for the whole session."""
    cache = {}

    def write(name: str, **kw):
        if name not in cache:
            cache[name] = write_checkpoint(tmp_path_factory.mktemp(name), **kw)
        return cache[name]

    return write


@pytest.fixture(scope="session")
def pg1(ckpt_factory):
    return ckpt_factory("pg1", version=1)


@pytest.fixture(scope="session")
def pg2(ckpt_factory):
    return ckpt_factory("pg2", version=2, kv_heads=2)


@pytest.fixture
def onednn_calls(monkeypatch):
    """Route every CPU float32 product at inference to oneDNN (no size or row floor) and count the oneDNN calls."""
    from palitorch.model import kernels

    assert kernels._onednn_works(), "oneDNN's linear is missing here or disagrees with F.linear"
    n = {"onednn": 0}
    real = kernels._pointwise

    def counting(x, w, b):
        n["onednn"] += 1
        return real(x, w, b)

    monkeypatch.setattr(kernels, "_pointwise", counting)
    monkeypatch.setattr(kernels, "ONEDNN_MIN_ELEMENTS", 0)
    monkeypatch.setattr(kernels, "ONEDNN_MIN_ROWS", 1)  # whatever this machine's calibration says
    monkeypatch.setitem(kernels._skinny, "enabled", False)  # which would take the products of few rows
    return n


@pytest.fixture
def skinny_calls(monkeypatch):
    """Route every CPU float32 product of at most 8 rows at inference through palitorch's skinny_linear kernel (no
    size floor, whatever this machine's timing says) and count its eager calls. Fails where the kernel does not
    build: on the Linux and macOS machines palitorch supports, it must."""
    from palitorch.model import kernels

    assert kernels._skinny_works(), "palitorch's native kernel did not build or disagrees with F.linear"
    n = {"skinny": 0}
    real, compiling = kernels._skinny_op, torch.compiler.is_compiling  # closure cells: dynamo traces this function,
    # and a guard on this module's globals fails when another conftest module holds the name "conftest"

    def counting(x, w, b=None):
        if not compiling():
            n["skinny"] += 1
        return real(x, w, b)

    monkeypatch.setattr(kernels, "_skinny_op", counting)
    monkeypatch.setattr(kernels, "SKINNY_MIN_ELEMENTS", 0)
    monkeypatch.setattr(kernels, "SKINNY_MAX_ROWS", 8)
    return n


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
