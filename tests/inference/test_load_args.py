"""`palitorch.load`'s arguments: a device this machine lacks, a path that is empty, starts with "~" or reads as a
Hub id. Each is a one-line error before anything heavy is read."""

import os

import pytest
import torch

import palitorch
from palitorch.errors import CheckpointError, InputError
from palitorch.inference import pipeline


@pytest.fixture
def nothing_read(monkeypatch):
    """Fail the test if load gets as far as reading config.json."""
    def read_config(path):
        raise AssertionError("config.json was read before the arguments were checked")

    monkeypatch.setattr(pipeline, "read_config", read_config)


@pytest.mark.parametrize("device,message", [
    ("gpu", "unknown device 'gpu'"),
    ("CPU", "unknown device 'CPU'.*lower case"),
    ("meta", "device 'meta' holds no data"),
    (None, "device must be a string"),
    (1.5, "device must be a string"),
])
def test_a_device_that_is_no_device_is_one_line(nothing_read, device, message):
    with pytest.raises(InputError, match=message):
        palitorch.load(device=device)


def test_cuda_without_cuda_and_an_index_past_the_last_gpu(nothing_read, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", 0, torch.device("cuda")):
        with pytest.raises(InputError, match="is not available on this machine.*use device='cpu'"):
            palitorch.load(device=device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match=r"'cuda:2' does not exist: this machine has 2 cuda devices \(cuda:0 to"):
        palitorch.load(device="cuda:2")


def test_a_cpu_device_loads():
    for device in ("cpu", torch.device("cpu")):
        assert palitorch.load(device=device).device.type == "cpu"


def test_paths_empty_of_the_wrong_type_or_a_hub_id(nothing_read, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="path is empty"):
        palitorch.load("")
    with pytest.raises(InputError, match="path must be a checkpoint folder.*got int"):
        palitorch.load(123)
    monkeypatch.chdir(tmp_path)  # no such folder here, nor in the (empty) Hugging Face cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="palitorch does not download.*hf download google/paligemma-3b-pt-224 "
                                              ".*--local-dir DIR"):
        palitorch.load("google/paligemma-3b-pt-224")


def test_a_hub_id_that_is_a_folder_here_loads_from_it_and_tilde_is_home(tmp_path, monkeypatch):
    (tmp_path / "google").mkdir()
    os.symlink(palitorch.default_model_path(), tmp_path / "google" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert palitorch.load("google/tiny").cfg.version == 1
    monkeypatch.setenv("HOME", str(tmp_path))
    pipe = palitorch.load("~/google/tiny")
    assert pipe.path == tmp_path / "google" / "tiny"


def test_a_device_type_torch_has_no_module_for_is_not_supported(nothing_read):
    with pytest.raises(InputError, match=r"device 'xla' is not supported: use 'cpu', 'cuda' or 'mps'"):
        palitorch.load(device="xla")


def test_mps_and_cuda_where_there_are_none_say_why(nothing_read, monkeypatch):
    """mps without an Apple GPU is refused (it got as far as loading onto it); cuda says whether this torch lacks
    it or the machine does; a one-GPU machine names its only device. Found by mutation testing."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InputError, match=r"device 'mps' \(Apple GPU\) is not available on this machine"):
        palitorch.load(device="mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None)
    for cuda, why in ((None, "this torch was built without it"), ("12.4", "no such device is visible")):
        monkeypatch.setattr(torch.version, "cuda", cuda)
        with pytest.raises(InputError, match=rf"device 'cuda' is not available on this machine \({why}\)"):
            palitorch.load(device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match=r"'cuda:1' does not exist: this machine has 1 cuda device \(cuda:0\)$"):
        palitorch.load(device="cuda:1")


def test_a_blank_path_is_empty(nothing_read):
    with pytest.raises(InputError, match="path is empty"):
        palitorch.load("   ")


def test_a_missing_folder_of_three_parts_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """Only "owner/name" reads as a Hub id: a missing "runs/exp1/ckpt" is just a folder that does not exist."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        palitorch.load("runs/exp1/ckpt")
    assert "'runs/exp1/ckpt' does not exist" in str(e.value) and "download" not in str(e.value)
