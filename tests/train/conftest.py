"""Fixtures shared by the fine-tuning tests (a module that defines its own `data` keeps it)."""

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
