"""Loading Hub folders: every layout, shards, dtypes, and one-line errors for every kind of broken folder."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import palitorch
from palitorch.checkpoint import load_model, save_model
from palitorch.config import PaliGemmaConfig
from palitorch.errors import CheckpointError


@pytest.fixture(scope="module")
def reference(ckpt_factory):
    folder, _ = ckpt_factory("layout-v5", version=2, kv_heads=2, seed=7)
    return {k: v.clone() for k, v in load_model(folder).state_dict().items()}


@pytest.mark.parametrize("layout,shards,lm_head", [("v5", 1, False), ("new", 1, True), ("old", 1, False),
                                                   ("new", 3, False), ("old", 2, True)])
def test_layouts_and_shards_load_the_same_weights(ckpt_factory, reference, layout, shards, lm_head):
    folder, _ = ckpt_factory(f"layout-{layout}-{shards}-{lm_head}", version=2, kv_heads=2, seed=7, layout=layout,
                             shards=shards, lm_head=lm_head)
    state = load_model(folder).state_dict()
    assert state.keys() == reference.keys()
    for k in state:
        assert torch.equal(state[k], reference[k]), k


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, "float32"])
def test_dtypes(pg1, dtype):
    pipe = palitorch.load(pg1[0], dtype=dtype)
    assert all(p.dtype == palitorch.checkpoint.resolve_dtype(dtype) for p in pipe.model.parameters())
    from PIL import Image

    r = pipe.score(Image.new("RGB", (50, 50), "red"), "caption en", "red")
    assert all(torch.isfinite(torch.tensor(r.logprobs)))


def test_save_round_trip_loads_in_both(pg2, tmp_path):
    from transformers import PaliGemmaForConditionalGeneration

    folder, hf = pg2
    model = load_model(folder)
    out = save_model(model, tmp_path / "saved", extra_files={"tokenizer.json": folder / "tokenizer.json"},
                     max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").exists()
    again = load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    hf2 = PaliGemmaForConditionalGeneration.from_pretrained(out).eval()
    for (k1, v1), (k2, v2) in zip(sorted(hf.state_dict().items()), sorted(hf2.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2), k1
    assert PaliGemmaConfig.from_hf(json.loads((out / "config.json").read_text())) == model.cfg


def test_a_saved_folder_has_the_modes_the_umask_gives(pg2, tmp_path):
    """Others may read a saved model as they may read the user's other files (it was 0700: a server under another
    uid could not load a run's model/)."""
    import os
    import stat

    model = load_model(pg2[0])
    mask = os.umask(0o022)
    try:
        out = save_model(model, tmp_path / "saved", extra_files={"tokenizer.json": pg2[0] / "tokenizer.json"})
    finally:
        os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _error(folder) -> str:
    with pytest.raises(palitorch.PalitorchError) as e:
        palitorch.load(folder)
    msg = str(e.value)
    assert "\n" not in msg, "errors are one line"
    return msg


def test_missing_tensor(pg1, tmp_path):
    d = _copy(pg1[0], tmp_path / "c")
    t = load_file(d / "model.safetensors")
    key = next(k for k in t if "layers.1.mlp.up_proj" in k)
    del t[key]
    save_file(t, d / "model.safetensors")
    msg = _error(d)
    assert "lacks" in msg and repr(key) in msg  # the Hub's name for it, as in the file
    for key in [k for k in t if "post_attention_layernorm" in k]:  # a name palitorch does not use itself
        del t[key]
    save_file(t, d / "model.safetensors")
    assert "post_attention_layernorm" in _error(d)


def test_wrong_shape(pg1, tmp_path):
    d = _copy(pg1[0], tmp_path / "c")
    t = load_file(d / "model.safetensors")
    key = next(k for k in t if "layers.0.self_attn.k_proj.weight" in k and "vision" not in k)
    t[key] = t[key][:, :-1].contiguous()
    save_file(t, d / "model.safetensors")
    msg = _error(d)
    assert key in msg and "shape" in msg


def test_unexpected_tensor(pg1, tmp_path):
    d = _copy(pg1[0], tmp_path / "c")
    t = load_file(d / "model.safetensors")
    t["language_model.model.layers.7.mlp.up_proj.weight"] = torch.zeros(2)
    save_file(t, d / "model.safetensors")
    assert "unexpected tensor 'language_model.model.layers.7.mlp.up_proj.weight'" in _error(d)


def test_the_patch_positions_older_transformers_saved_are_skipped(pg1, tmp_path):
    """`embeddings.position_ids` (a buffer of 0, 1, 2, ... that transformers once saved) is not a weight:
    transformers skips it, and so does palitorch."""
    d = _copy(pg1[0], tmp_path / "c")
    t = load_file(d / "model.safetensors")
    vision = next(k for k in t if "patch_embedding.weight" in k).split("embeddings.")[0]
    t[vision + "embeddings.position_ids"] = torch.arange(256)[None]
    save_file(t, d / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(palitorch.load(d).model.state_dict().values(),
                                                  palitorch.load(pg1[0]).model.state_dict().values()))


def test_the_rotary_frequencies_older_transformers_saved_are_skipped(pg1, tmp_path):
    """`rotary_emb.inv_freq` (RoPE's frequencies, a buffer older transformers saved in every decoder layer) is not a
    weight: palitorch computes them, and skips the stored ones as transformers does."""
    d = _copy(pg1[0], tmp_path / "c")
    t = load_file(d / "model.safetensors")
    text = next(k for k in t if k.endswith("embed_tokens.weight")).removesuffix("embed_tokens.weight")
    for i in range(2):
        t[f"{text}layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    save_file(t, d / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(palitorch.load(d).model.state_dict().values(),
                                                  palitorch.load(pg1[0]).model.state_dict().values()))


def test_truncated_file(pg1, tmp_path):
    d = _copy(pg1[0], tmp_path / "c")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(d)


def test_garbage_file(pg1, tmp_path):
    d = _copy(pg1[0], tmp_path / "c")
    (d / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not json")
    assert "not a valid safetensors" in _error(d)


def test_not_paligemma(pg1, tmp_path):
    d = _copy(pg1[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llava"
    (d / "config.json").write_text(json.dumps(cfg))
    assert "not 'paligemma'" in _error(d)


def test_no_tokenizer(pg1, tmp_path):
    d = _copy(pg1[0], tmp_path / "c")
    (d / "tokenizer.json").unlink()
    assert "no tokenizer.json" in _error(d)


def test_no_weights_and_pickles_refused(pg1, tmp_path):
    d = _copy(pg1[0], tmp_path / "c")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    msg = _error(d)
    assert "no model.safetensors" in msg and "never unpickles" in msg


def test_missing_shard(ckpt_factory, tmp_path):
    folder, _ = ckpt_factory("layout-new-3-False", version=2, kv_heads=2, seed=7, layout="new", shards=3)
    d = _copy(folder, tmp_path / "c")
    (d / "model-00002-of-00003.safetensors").unlink()
    assert "missing shard model-00002-of-00003.safetensors" in _error(d)


def test_a_single_file_beside_a_stale_index_is_loaded_as_transformers_does(ckpt_factory, reference, tmp_path):
    """`save_pretrained` re-saving a sharded folder as one file leaves the old index behind (its shards deleted);
    transformers then loads model.safetensors, and so must palitorch, not stop at the index's missing shards."""
    folder, _ = ckpt_factory("layout-new-3-False", version=2, kv_heads=2, seed=7, layout="new", shards=3)
    d = _copy(folder, tmp_path / "c")
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    merged = {k: v for f in shards for k, v in load_file(f).items()}
    for f in shards:
        f.unlink()
    save_file(merged, d / "model.safetensors")
    state = load_model(d).state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_missing_folder_and_config(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope")
    (tmp_path / "requests.jsonl").write_text("{}")
    assert "is a file, not a checkpoint folder" in _error(tmp_path / "requests.jsonl")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(tmp_path / "empty")


def test_bad_dtype(pg1):
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        palitorch.load(pg1[0], dtype="int8")


def test_a_bad_eos_in_generation_config_json_is_named_there(pg1, tmp_path):
    d = _copy(pg1[0], tmp_path / "c")
    (d / "generation_config.json").write_text('{"eos_token_id": "one"}')
    msg = _error(d)
    assert "generation_config.json: eos_token_id" in msg and "fix generation_config.json" in msg


def test_a_full_disk_inside_safetensors_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """safetensors reports I/O failures as its own error with the OS's number in the text: a full disk while a
    checkpoint was written was a traceback; now it is the OSError the command line says in one line."""
    from safetensors import SafetensorError

    import palitorch.checkpoint.io as io
    from palitorch.cli import os_error_line

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(io, "save_file", full)
    path = tmp_path / "model.safetensors"
    with pytest.raises(OSError) as e:
        io.write_safetensors({"x": torch.zeros(1)}, path)
    assert e.value.errno == 28 and e.value.filename == str(path)
    assert os_error_line(e.value) == f"cannot use {path}: No space left on device (free some space, or write elsewhere)"


def test_an_untied_head_equal_to_the_embedding_stays_the_untied_head(pg1, tmp_path):
    """An untied model (tie_word_embeddings false) whose lm_head.weight happens to equal the embedding (a head
    copied from it and not trained yet): it is that model's head, loaded as such (only a TIED config compares the
    two and drops a copy)."""
    d = _copy(pg1[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    t = load_file(d / "model.safetensors")
    embed = next(k for k in t if k.endswith("embed_tokens.weight"))
    t["lm_head.weight"] = t[embed].clone()
    save_file(t, d / "model.safetensors")
    model = load_model(d)
    assert not model.cfg.text.tie_embeddings
    lm = model.language_model
    assert torch.equal(lm.lm_head.weight, t[embed]) and torch.equal(lm.embed_tokens.weight, t[embed])
    assert lm.lm_head.weight.data_ptr() != lm.embed_tokens.weight.data_ptr()


def test_a_file_cut_short_by_a_few_bytes_is_truncated(pg1, tmp_path):
    """The header's offsets count from the end of the 8-byte length and the header: a file short by fewer bytes
    than those 8 is truncated too (its last tensor's bytes are not all there)."""
    d = _copy(pg1[0], tmp_path / "c")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-4])
    msg = _error(d)
    assert "is truncated" in msg and f"{len(data) - 4} bytes, needs {len(data)}" in msg


def test_saving_over_a_folder_replaces_it_and_leaves_nothing_beside(pg1, tmp_path):
    model = load_model(pg1[0])
    out = tmp_path / "m"
    save_model(model, out)
    (out / "stale.txt").write_text("from the first save")
    with torch.no_grad():
        model.language_model.norm.weight.add_(1.0)
    save_model(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no m.old, no temporary folder
    assert not (out / "stale.txt").exists()
    assert torch.equal(load_model(out).language_model.norm.weight, model.language_model.norm.weight)


def _resident_kb(folder) -> int:
    """Resident kB of this process's mappings of the files under `folder` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if parts and not parts[0].endswith(":"):  # a mapping: address perms offset dev inode [path]
            inside = len(parts) > 5 and parts[5].startswith(str(folder))
        elif parts[:1] == ["Rss:"] and inside:
            total += int(parts[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux's /proc/self/smaps")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_tied_duplicate_head_is_compared_without_paging_in_the_weights(pg1, tmp_path, dtype):
    """Loading maps the weights and pages none of them in. The LM head a tied checkpoint stores beside the
    embedding (google/paligemma-3b-pt-224 does: 1 GB) is compared with it by plain file reads: through the mapping,
    its pages would stay resident, a second copy of the embedding, as long as the model uses any tensor of its file
    (here, with an 8 MB embedding, both were paged in; small weights may be). An equal head is dropped, a different
    one unties."""
    import dataclasses

    d = _copy(pg1[0], tmp_path / "c")
    cfg = PaliGemmaConfig.from_hf(json.loads((d / "config.json").read_text()))
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=32768))
    (d / "config.json").write_text(json.dumps(cfg.to_hf()))
    t = load_file(d / "model.safetensors")
    embed = next(k for k in t if k.endswith("embed_tokens.weight"))
    t[embed] = torch.randn(32768, t[embed].shape[1], generator=torch.Generator().manual_seed(0))
    t["lm_head.weight"] = t[embed].clone()
    save_file(t, d / "model.safetensors")
    model = load_model(d, dtype=dtype)
    assert _resident_kb(d) < 4096, "the embedding or the head was paged in while loading"  # (each is 8 MB)
    assert model.cfg.text.tie_embeddings
    assert torch.equal(model.language_model.embed_tokens.weight, t[embed].to(getattr(torch, dtype)))
    t["lm_head.weight"][-1, -1] += 1  # one value differs: the stored head is the model's own
    save_file(t, d / "model.safetensors")
    del model
    model = load_model(d, dtype=dtype)
    assert not model.cfg.text.tie_embeddings
    assert torch.equal(model.language_model.lm_head.weight, t["lm_head.weight"].to(getattr(torch, dtype)))
