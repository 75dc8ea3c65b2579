"""One tensor of a safetensors file read with plain file reads (palitorch/checkpoint/stored.py): in pieces of
CHUNK // 4 elements, cast or not, compared piece by piece; safetensors' own load_file is the reference for the
values. CHUNK is made small here so that tensors of a few elements span several pieces, as a large weight does."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from palitorch.checkpoint.io import check_safetensors
from palitorch.checkpoint.stored import Stored
from palitorch.errors import CheckpointError


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(Stored, "CHUNK", 16)  # 4 elements a piece


def stored(path, key) -> Stored:
    start, header = check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        mapped = f.get_tensor(key)
    return Stored(path, key, start + header[key]["data_offsets"][0], mapped)


@pytest.fixture
def weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file({"head": torch.randn(3, 3, generator=g), "w": torch.randn(2, 5, generator=g),
               "f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
               "h": torch.randn(7, generator=g).to(torch.bfloat16)}, path)
    return path


def test_a_tensor_read_in_pieces_is_the_file_s_tensor_in_the_dtype_asked(weights):
    reference = load_file(weights)
    for key, sizes in (("w", [4, 4, 2]), ("f8", [4, 4, 1]), ("h", [4, 3]), ("head", [4, 4, 1])):
        s = stored(weights, key)
        assert [p.numel() for p in s.pieces()] == sizes, key
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            if reference[key].dtype == dtype:
                continue
            got = s.load(torch.device("cpu"), dtype)
            assert got.dtype == dtype and got.shape == reference[key].shape
            assert torch.equal(got, reference[key].to(dtype)), (key, dtype)


def test_the_dtype_it_is_stored_in_on_the_cpu_is_the_mapped_view_itself(weights):
    s = stored(weights, "w")
    assert s.load(torch.device("cpu"), torch.float32) is s.mapped
    on = s.load(torch.device("meta"), torch.float32)  # another device: a tensor of its own there
    assert on.device.type == "meta" and on.dtype == torch.float32 and on.shape == (2, 5)


def test_equal_is_equality_in_the_dtype_asked_over_every_piece(tmp_path):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 6, generator=g)
    near = a.clone()
    near[0, 0] = torch.nextafter(a[0, 0], torch.tensor(10.0))  # the same number once rounded to bfloat16
    last = a.clone()
    last[-1, -1] += 1  # differs in the last piece only
    path = tmp_path / "m.safetensors"
    save_file({"a": a, "near": near, "last": last, "r": a.reshape(3, 4).clone(), "same": a.clone()}, path)
    sa = stored(path, "a")
    assert sa.equal(stored(path, "same"), torch.float32)
    assert sa.equal(stored(path, "near"), torch.bfloat16) and not sa.equal(stored(path, "near"), torch.float32)
    assert not sa.equal(stored(path, "last"), torch.bfloat16)
    assert not sa.equal(stored(path, "r"), torch.float32)  # the same 12 numbers in order, another shape


def test_a_file_cut_short_or_gone_is_one_checkpoint_error(weights, tmp_path):
    """(The folder's checks find a short file before loading: this is a file that changes while it is read.)"""
    s = stored(weights, "w")
    short = tmp_path / "short.safetensors"
    short.write_bytes(weights.read_bytes()[:s.offset + 30])  # 7 of the 10 floats
    with pytest.raises(CheckpointError, match=r"^short.safetensors: cannot read 'w' \(the file ends early\); the "
                                              r"file may be truncated$"):
        Stored(short, "w", s.offset, s.mapped).load(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"^gone.safetensors: cannot read 'w' \(No such file or directory\)"):
        Stored(tmp_path / "gone.safetensors", "w", s.offset, s.mapped).load(torch.device("cpu"), torch.bfloat16)
