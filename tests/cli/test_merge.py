"""`palitorch merge`: what it checks before the (slow) load, each a one-line error (exit 2) that names the option,
and --dtype, which sets the merged model's dtype."""

import json
import os

import pytest
import torch
from conftest import cli  # tests/cli/conftest.py
from safetensors import safe_open
from safetensors.torch import save_file

import palitorch.checkpoint


@pytest.fixture
def adapter(pg1, tmp_path):
    """A LoRA adapter of pg1 written by hand (the names and shapes PEFT writes): q_proj of the first decoder layer,
    A [2, in] and B [out, 2], B non-zero so that the merge changes the weight."""
    model = palitorch.checkpoint.load_model(pg1[0], "cpu", torch.float32)
    out, d = model.language_model.layers[0].attn.q_proj.weight.shape
    folder = tmp_path / "adapter"
    folder.mkdir()
    name = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    save_file({f"{name}.lora_A.weight": torch.ones(2, d), f"{name}.lora_B.weight": torch.full((out, 2), 0.5)},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    return folder


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(palitorch.checkpoint, "load_model", refuse)


def test_bad_options_fail_in_one_line_before_loading(pg1, adapter, tmp_path, no_load, monkeypatch, capsys):
    """Each mistake is said before the model loads (a checkpoint of gigabytes), naming the option."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "locked").mkdir()
    import tempfile

    made = tempfile.mkdtemp

    def mkdtemp(prefix, dir):  # (tests run as root, whom permissions do not stop; /proc refuses root too)
        if dir == tmp_path / "locked":
            raise PermissionError(13, "Permission denied")
        return made(prefix=prefix, dir=dir)

    monkeypatch.setattr("palitorch.cli.merge.tempfile.mkdtemp", mkdtemp)
    cases = [(["--out", tmp_path / "a-file"], "a-file is a file: give a new folder"),
             (["--out", tmp_path / "no" / "out"], "out: folder '" + str(tmp_path / "no") + "' does not exist"),
             (["--out", tmp_path / "a-file" / "out"], "' is not a folder"),
             (["--out", tmp_path / "locked" / "out"], "cannot write in its folder"),
             (["--out", tmp_path / "out", "--max-shard-size", "-1"], "--max-shard-size must be >= 0 (0: one file)"),
             *([(["--out", "/proc/merged"], "cannot write in its folder '/proc'")] if os.path.isdir("/proc/self")
               else []),  # (a pseudo file system, which refuses root too: its permissions said writable)
             (["--out", tmp_path / "out", "--adapter", tmp_path / "nowhere"], "nowhere' does not exist"),
             (["--out", tmp_path / "out", "--model", tmp_path / "no-model"], "no-model"),
             ]
    for extra, message in cases:
        argv = ["merge", "--model", pg1[0], "--adapter", adapter, *extra]
        rc, out, err = cli(argv, capsys)
        assert rc == 2 and out == "" and err.count("\n") == 1 and message in err, (extra, err)
        assert err.startswith("palitorch merge: error: "), err
        assert not (tmp_path / "out").exists()


def test_dtype_sets_the_merged_model_s_dtype(pg1, adapter, tmp_path, capsys):
    """--dtype bfloat16 on a float32 checkpoint: every merged tensor is BF16, and the merged q_proj is the float32
    merge rounded to bfloat16 (W + s B A with s = 4 / 2; one bfloat16 rounding: within 2^-8 relative)."""
    rc, _, err = cli(["merge", "--model", pg1[0], "--adapter", adapter, "--out", tmp_path / "m", "--dtype",
                      "bfloat16"], capsys)
    assert rc == 0 and "(1 weights changed, bfloat16)" in err, err
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
        q = f.get_tensor("model.language_model.layers.0.self_attn.q_proj.weight")
    base = palitorch.checkpoint.load_model(pg1[0], "cpu", torch.float32).language_model.layers[0].attn.q_proj.weight
    torch.testing.assert_close(q.float(), base + 2.0, rtol=2 ** -8, atol=0)  # s B A: 2 * (2 * 0.5) each
