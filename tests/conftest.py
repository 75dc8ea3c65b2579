"""Shared fixtures. Tiny random checkpoints are written once per session by transformers itself."""

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

    n = {"onednn": 0}
    real = kernels._pointwise

    def counting(x, w, b):
        n["onednn"] += 1
        return real(x, w, b)

    monkeypatch.setattr(kernels, "_pointwise", counting)
    monkeypatch.setattr(kernels, "ONEDNN_MIN_ELEMENTS", 0)
    monkeypatch.setattr(kernels, "ONEDNN_MIN_ROWS", 1)  # whatever this machine's calibration says
    return n
