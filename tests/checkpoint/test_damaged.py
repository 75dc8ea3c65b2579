"""Damaged checkpoint folders: each is a copy of the bundled model with one file broken, and each must fail with a
one-line CheckpointError that names the file and what is wrong (never a traceback from deep inside, never a warning).
test_load.py covers the cases that were already handled (missing files, missing shard, truncation, wrong shapes)."""

import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import palitorch
from palitorch.cli import main
from palitorch.errors import CheckpointError

IMAGE = Path(palitorch.__file__).parent / "assets" / "easyvqa_test_0.png"


@pytest.fixture
def folder(tmp_path):
    return Path(shutil.copytree(palitorch.default_model_path(), tmp_path / "model"))


def _error(folder: Path, file: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "Initializing zero-element tensors" for 0 heads
        with pytest.raises(CheckpointError) as e:
            palitorch.load(folder)
    msg = str(e.value)
    assert "\n" not in msg and file in msg, msg
    return msg


def _header_only(header: bytes) -> bytes:
    """A safetensors file holding just this header: 8-byte little-endian length, then the header."""
    return len(header).to_bytes(8, "little") + header


# ------------------------------------------------------------------ model.safetensors


@pytest.mark.parametrize("data,expected", [
    (random.Random(0).randbytes(5000), "header length"),  # reads as ~1e18 bytes: was a MemoryError
    (_header_only(b"[1,2]"), "header is a JSON array"),
    (_header_only(b'{"w": 1}'), "no data_offsets"),
    (_header_only(b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": "0,4"}}'), "no data_offsets"),
], ids=["random-bytes", "header-array", "entry-not-object", "offsets-string"])
def test_damaged_safetensors(folder, data, expected):
    (folder / "model.safetensors").write_bytes(data)
    msg = _error(folder, "model.safetensors")
    assert "not a valid safetensors file" in msg and expected in msg and "download it again" in msg


def _edit_tensors(folder: Path, edit) -> str:
    t = load_file(folder / "model.safetensors")
    key = next(k for k in t if k.endswith("language_model.layers.0.self_attn.q_proj.weight"))
    t[key] = edit(t[key])
    save_file(t, folder / "model.safetensors")
    return key


def test_integer_tensor(folder):
    key = _edit_tensors(folder, lambda w: w.to(torch.int32))  # was cast to float and loaded silently
    msg = _error(folder, "model.safetensors")
    assert f"{key!r} has dtype int32, not a floating-point type" in msg


def test_wrong_shape_says_what_to_do(folder):
    key = _edit_tensors(folder, lambda w: w[:3])
    msg = _error(folder, "model.safetensors")
    assert key in msg and "(3, 128)" in msg and "do not match config.json" in msg


# ------------------------------------------------------------------ config.json


def _edit_config(folder: Path, section: str | None, key: str, value) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (cfg[section] if section else cfg)[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("data,expected", [
    ("[1, 2]", "holds a JSON array, not an object"),
    (b"\xff\xfe\x00 not text", "is not"),
])
def test_config_not_an_object(folder, data, expected):
    (folder / "config.json").write_bytes(data if isinstance(data, bytes) else data.encode())
    assert expected in _error(folder, "config.json")


@pytest.mark.parametrize("section,key,value,expected", [
    ("text_config", "num_hidden_layers", "two", 'text_config.num_hidden_layers is "two": it must be an integer'),
    ("vision_config", "num_hidden_layers", True, "vision_config.num_hidden_layers is true"),
    ("text_config", "num_attention_heads", 0, "text_config.num_attention_heads is 0: it must be an integer >= 1"),
    ("vision_config", "num_attention_heads", 0, "vision_config.num_attention_heads is 0"),
    ("vision_config", "num_attention_heads", 3, "a divisor of hidden_size 128"),
    ("text_config", "num_key_value_heads", 3, "a divisor of num_attention_heads 4"),
    ("text_config", "intermediate_size", -5, "text_config.intermediate_size is -5"),
    ("text_config", "hidden_size", 128.0, "text_config.hidden_size is 128.0: it must be an integer"),
    ("text_config", "head_dim", 31, "even"),
    ("text_config", "rms_norm_eps", "x", 'text_config.rms_norm_eps is "x": it must be a number > 0'),
    ("text_config", "rope_theta", -1.0, "text_config.rope_theta is -1.0"),
    ("text_config", "hidden_act", "relu", 'text_config.hidden_act is "relu": it must be one of'),  # (Gemma 1's name)
    (None, "tie_word_embeddings", "no", 'tie_word_embeddings is "no": it must be true or false'),
    ("vision_config", "image_size", "64", 'vision_config.image_size is "64"'),
    ("vision_config", "patch_size", 0, "vision_config.patch_size is 0"),
    ("text_config", "rope_parameters", [1], "text_config.rope_parameters is [1]: it must be a JSON object"),
    (None, "text_config", [1], "text_config is [1]: it must be a JSON object"),
    (None, "eos_token_id", "1", 'eos_token_id is "1": it must be a token id below text_config.vocab_size'),
    (None, "image_token_index", -1, "image_token_index is -1: it must be an integer >= 0"),
    (None, "projection_dim", "128", 'projection_dim is "128": it must be an integer'),
])
def test_config_values(folder, section, key, value, expected):
    _edit_config(folder, section, key, value)
    msg = _error(folder, "config.json")
    assert expected in msg and "fix config.json or download it again" in msg


def test_gemma2_layer_types(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"].update(model_type="gemma2", layer_types=["full_attention"])
    (folder / "config.json").write_text(json.dumps(cfg))
    assert "text_config.layer_types is [\"full_attention\"]: it must be a list of 2" in _error(folder, "config.json")


# ------------------------------------------------------------------ preprocessor_config.json, tokenizer.json


@pytest.mark.parametrize("data,expected", [
    ("{nope", "is not valid JSON"),
    ("[1]", "holds a JSON array, not an object"),
    ('{"image_mean": "x"}', "image_mean is 'x', it must be 3 numbers"),
    ('{"image_std": [0, 0, 0]}', "image_std is [0, 0, 0], it must be 3 numbers > 0"),  # was a silent divide by 0
    ('{"rescale_factor": "x"}', "rescale_factor is 'x', it must be a number > 0"),
])
def test_damaged_preprocessor_config(folder, data, expected):
    (folder / "preprocessor_config.json").write_text(data)
    msg = _error(folder, "preprocessor_config.json")
    assert expected in msg and "download it again" in msg


def test_truncated_tokenizer(folder):
    tok = folder / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:1000])
    msg = _error(folder, "tokenizer.json")
    assert "cannot be read by the tokenizers library" in msg and "download it again" in msg


def test_a_tokenizer_that_does_not_belong_with_config_json(folder):
    """An image token id other than the tokenizer's <image>, or tokens past the embedding's rows, failed at the first
    prompt with a ValueError / IndexError from inside the model; now at load, naming the folder."""
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, image_token_index=5)))
    assert "the tokenizer's <image> is" in _error(folder, "image_token_index is 5")
    vocab = cfg["text_config"]["vocab_size"]
    small = dict(cfg, text_config=dict(cfg["text_config"], vocab_size=vocab - 10))
    (folder / "config.json").write_text(json.dumps(small))
    assert f"vocab_size is {vocab - 10}" in _error(folder, "the tokenizer has")


# ------------------------------------------------------------------ model.safetensors.index.json


def _shard(folder: Path, index: str | None = None) -> None:
    """Split model.safetensors into a.safetensors and b.safetensors with an index (or `index` as its text)."""
    t = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(t)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_file({k: t[k] for k in names}, folder / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    text = index if index is not None else json.dumps({"metadata": {}, "weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_text(text)


def test_sharded_copy_loads(folder):
    _shard(folder)
    assert palitorch.load(folder).model is not None


@pytest.mark.parametrize("index,expected", [
    ("{nope", "is not valid JSON"),
    ("[1]", "holds a JSON array, not an object"),
    ("{}", "has no weight_map"),
    ('{"weight_map": {"w": 1}}', "has no weight_map"),
    ('{"weight_map": {"w": "/etc/hostname"}}', "lists shard '/etc/hostname', outside"),
    ('{"weight_map": {"w": "../model.safetensors"}}', "lists shard '../model.safetensors', outside"),
])
def test_damaged_index(folder, index, expected):
    _shard(folder, index)
    msg = _error(folder, "model.safetensors.index.json")
    assert expected in msg and "download it again" in msg


# ------------------------------------------------------------------ what the user sees


def test_cli_prints_one_line(folder, capsys):
    (folder / "model.safetensors").write_bytes(random.Random(0).randbytes(5000))
    rc = main(["run", "--model", str(folder), "--image", str(IMAGE), "--prompt", "caption en"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("palitorch run: error: ") and err.count("\n") == 1, err
    assert "model.safetensors is not a valid safetensors file" in err
