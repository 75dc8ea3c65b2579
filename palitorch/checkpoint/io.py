"""Read and write Hub-layout PaliGemma folders: config.json, safetensors (single or sharded), tokenizer files.

Loading builds the model on the meta device and assigns the memory-mapped tensors straight into it, so a
checkpoint already in the requested dtype is never copied. Weights come only from safetensors.

A weight that is cast or sent to another device, and the tied LM head some checkpoints store beside the embedding
(compared with it, then dropped), are read with plain file reads instead (stored.py): peak memory stays near the
size of the loaded weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from palitorch.checkpoint.keys import LM_HEAD, hf_name_as_in, hf_to_ours, ours_to_hf, unused
from palitorch.checkpoint.stored import Stored
from palitorch.config import PaliGemmaConfig
from palitorch.errors import CheckpointError, ConfigError
from palitorch.model.paligemma import PaliGemma

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise CheckpointError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")


def read_json_object(file: Path, advice: str = "; download it again") -> dict:
    """A JSON file that must hold an object (config.json, an index, preprocessor_config.json, a training state);
    else CheckpointError, ending in `advice` (a training checkpoint of one's own is not downloaded)."""
    try:
        d = json.loads(file.read_bytes())
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e.msg} at line {e.lineno}){advice}") from None
    except ValueError:  # bytes that are not UTF-8/16/32 text
        raise CheckpointError(f"{file} is not a JSON text file{advice}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file} holds {_json_type(d)}, not an object{advice}")
    return d


def _json_type(x) -> str:
    names = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return f"a JSON {names.get(type(x), 'null')}"


def check_checkpoint_folder(folder: Path) -> None:
    """A one-line CheckpointError unless `folder` is a folder with a config.json (a training run's folder, given
    instead of its model/, is named as such)."""
    if not folder.is_dir():
        what = "is a file, not a checkpoint folder" if folder.exists() else "does not exist"
        raise CheckpointError(f"checkpoint folder {str(folder)!r} {what}")
    if not (folder / "config.json").is_file():
        _check_link(folder / "config.json")
        if (folder / "adapter_config.json").is_file():
            raise CheckpointError(f"{folder} is a PEFT adapter folder, not a checkpoint: give it with --adapter "
                                  "(adapter= in palitorch.load), and its base model with --model")
        if (folder / "config.toml").is_file() or (folder / "metrics.jsonl").is_file():
            raise CheckpointError(f"{folder} is a training run folder: use {folder / 'model'} (its final weights) "
                                  "or one of its checkpoint-NNNNNNN folders")
        raise CheckpointError(f"{folder} is not a checkpoint folder (no config.json): give a Hub-layout folder "
                              "with config.json, the weights and tokenizer.json")


def read_config(path: str | os.PathLike) -> PaliGemmaConfig:
    folder = Path(path)
    check_checkpoint_folder(folder)
    cfg_file, gen_file = folder / "config.json", folder / "generation_config.json"
    generation = read_json_object(gen_file) if gen_file.is_file() else None  # its EOS ids, as `generate` reads them
    try:
        return PaliGemmaConfig.from_hf(read_json_object(cfg_file), generation)
    except ConfigError as e:  # a bad EOS id that generation_config.json gave is that file's
        from_gen = (generation or {}).get("eos_token_id") is not None and str(e).startswith("eos_token_id")
        why = str(e).replace("fix config.json", "fix generation_config.json") if from_gen else e
        raise CheckpointError(f"{gen_file if from_gen else cfg_file}: {why}") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single model.safetensors, or else the shards an index lists.
    (transformers' order: re-saving a sharded folder unsharded with `save_pretrained` leaves the old index beside
    the new model.safetensors, and transformers loads the single file.)"""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    _check_link(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map from tensor names to shard files; download it again")
        names = sorted(set(weight_map.values()))
        outside = [n for n in names if Path(n).is_absolute() or ".." in Path(n).parts]
        if outside:  # (a shard is a file of this checkpoint: an index must not reach elsewhere on the disk)
            raise CheckpointError(f"{index} lists shard {outside[0]!r}, outside {folder}; download it again")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            _check_link(folder / missing[0])
            raise CheckpointError(f"{folder} is missing shard {missing[0]} listed in {index.name}; download it again")
        return [folder / n for n in names]
    others = sorted(folder.glob("*.safetensors"))
    for file in others:
        _check_link(file)
    if others:
        return others
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = f" (found {pickles[0]}: palitorch never unpickles; convert it to safetensors)" if pickles else ""
    raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json{hint}")


def _check_link(file: Path) -> None:
    """A CheckpointError if `file` is a link to nothing (a Hugging Face cache whose blob was deleted)."""
    if file.is_symlink() and not file.exists():
        raise CheckpointError(f"{file} is a link to a file that is gone ({os.readlink(file)}): download it again")


def weights_dtype(folder: Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (its first file's first tensor's; float32 if not one of
    float32, bfloat16, float16)."""
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    file = weight_files(folder)[0]
    check_safetensors(file)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            return names.get(f.get_slice(keys[0]).get_dtype(), torch.float32) if keys else torch.float32
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); download it again") from None


def load_model(path, device="cpu", dtype="float32") -> PaliGemma:
    """Build a PaliGemma from a Hub folder. Every tensor is checked by name and shape; errors name the key."""
    folder = Path(path)
    cfg = read_config(folder)
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    with torch.device("meta"):
        model = PaliGemma(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    seen: list[str] = []  # the HF names read, whose layout an error names a missing tensor in
    head = None  # an LM head stored beside a tied embedding: a copy of it, as a rule (see `_stored_head`)
    where: dict[str, Stored] = {}  # our name -> where its bytes lie, for a cast or a comparison
    for file in weight_files(folder):
        start, header = check_safetensors(file)
        try:
            f = safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); download it again") from None
        with f:
            for key in f.keys():
                seen.append(key)
                if key in LM_HEAD and cfg.text.tie_embeddings:
                    if head is not None:
                        raise CheckpointError(f"{file.name}: the checkpoint holds two LM heads ({key!r} too)")
                    head = Stored(file, key, start + header[key]["data_offsets"][0], _read(f, file, key))
                    if not head.mapped.is_floating_point():
                        raise CheckpointError(f"{file.name}: tensor {key!r} is not floating-point; download it again")
                    continue
                if unused(key):
                    continue
                ours = hf_to_ours(key, cfg.version)
                if ours is None or ours not in expected:
                    raise CheckpointError(f"{file.name}: unexpected tensor {key!r} for this config.json")
                if ours in state:
                    raise CheckpointError(f"{file.name}: tensor {key!r} appears twice in the checkpoint")
                t = _read(f, file, key)
                if tuple(t.shape) != expected[ours]:
                    raise CheckpointError(
                        f"{file.name}: tensor {key!r} has shape {tuple(t.shape)}, config.json implies "
                        f"{expected[ours]}: the weights do not match config.json (download both again)"
                    )
                if not t.is_floating_point():  # an integer tensor would be silently cast to float
                    raise CheckpointError(
                        f"{file.name}: tensor {key!r} has dtype {str(t.dtype).removeprefix('torch.')}, "
                        "not a floating-point type; download the file again"
                    )
                where[ours] = Stored(file, key, start + header[key]["data_offsets"][0], t)
                state[ours] = where[ours].load(device, dtype)
    if head is not None:
        cfg, model, expected = _stored_head(cfg, model, expected, state, head, where, device, dtype)
    missing = [k for k in expected if k not in state]
    if missing:  # named as the Hub names it (the name to look for in the files)
        name = hf_name_as_in(missing[0], cfg.version, seen)
        raise CheckpointError(f"{folder}: the checkpoint lacks tensor {name!r} ({len(missing)} missing): download "
                              "its safetensors files again")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _read(f, file: Path, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file.name}: cannot read {key!r} ({e}); the file may be truncated") from None


def _stored_head(cfg: PaliGemmaConfig, model: PaliGemma, expected: dict, state: dict, head: Stored,
                 where: dict[str, Stored], device: torch.device, dtype: torch.dtype):
    """A checkpoint that ties the LM head to the embedding but stores the head too, as transformers reads it: a
    copy of the embedding is not needed (compared by file reads, it is never loaded); alone, it is the embedding
    (tying goes both ways); different from the embedding (an untied model saved by a transformers that kept
    `tie_word_embeddings: false` in its text_config only), it is the head, untied. -> (cfg, model, expected) to
    load `state` into."""
    embed, lm_head = "language_model.embed_tokens.weight", "language_model.lm_head.weight"
    shape = tuple(head.mapped.shape)
    if shape != expected[embed]:
        raise CheckpointError(f"the checkpoint's lm_head.weight has shape {shape}, config.json implies "
                              f"{expected[embed]}: the weights do not match config.json (download both again)")
    if embed not in state:
        state[embed] = head.load(device, dtype)
    elif not head.equal(where[embed], dtype):
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, tie_embeddings=False))
        with torch.device("meta"):
            model = PaliGemma(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state[lm_head] = head.load(device, dtype)
    return cfg, model, expected


def check_safetensors(file: Path, advice: str = "; download it again") -> tuple[int, dict]:
    """Check the header ourselves: safe_open maps lazily (truncation would fail at first use) and reads any damage
    as a Rust error. Layout: an 8-byte little-endian length n, n bytes of JSON object
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the tensor data.
    `advice` ends the error message (a training checkpoint of one's own is not downloaded).
    -> (where the tensor data begins, the header)."""

    def invalid(why: str) -> CheckpointError:
        return CheckpointError(f"{file} is not a valid safetensors file ({why}){advice}")

    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            # checked before reading n bytes: random bytes give n ~ 1e18
            header = json.loads(fh.read(n)) if 8 + n <= size else None
    except (OSError, ValueError):
        raise invalid("unreadable header") from None
    if size < 8 or 8 + n > size:
        raise invalid(f"header length {n} in a file of {size} bytes")
    if not isinstance(header, dict):
        raise invalid(f"the header is {_json_type(header)}, not an object")
    offsets = [v.get("data_offsets") if isinstance(v, dict) else None for k, v in header.items() if k != "__metadata__"]
    if not all(isinstance(o, list) and len(o) == 2 and all(type(i) is int for i in o) for o in offsets):
        raise invalid("a tensor entry in the header has no data_offsets [begin, end]")
    end = max((o[1] for o in offsets), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{file} is truncated ({size} bytes, needs {8 + n + end}){advice}")
    return 8 + n, header


def preprocessor_config(cfg: PaliGemmaConfig) -> dict:
    """The preprocessor_config.json transformers' PaliGemmaProcessor reads (PIL bicubic, mean/std 0.5)."""
    s = cfg.vision.image_size
    return {
        "image_processor_type": "SiglipImageProcessor", "processor_class": "PaliGemmaProcessor",
        "do_resize": True, "size": {"height": s, "width": s}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "do_convert_rgb": True, "image_seq_length": cfg.num_image_tokens,
    }


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that shares memory with no other (safetensors refuses shared storage; fused
    projections make weights views of one matrix)."""
    t = t.detach().contiguous().cpu()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def write_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    """safetensors' save_file, whose I/O failures (a full disk) come as an OSError naming the file: safetensors
    raises its own error with the OS's number in the text ("... (os error 28)"), which read as a bug."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _permit_as_umask(folder: Path) -> None:
    """Give a folder written under mkdtemp (mode 0700) and its files (safetensors writes 0600) the modes of files
    made as usual, under the umask: another user, or a server under another uid, can read the model."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def save_model(model: PaliGemma, path, extra_files: dict[str, str | os.PathLike] | None = None,
               max_shard_bytes: int | None = None) -> Path:
    """Write `model` as a Hub-layout folder (newer key layout), atomically: a temp folder, then a rename.

    `extra_files` maps names in the new folder to files to copy in (tokenizer.json, tokenizer_config.json, ...);
    a preprocessor_config.json is written from the config unless one is given there.
    With `max_shard_bytes`, weights are split into shards with a `model.safetensors.index.json`.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        version = model.cfg.version
        tensors = {ours_to_hf(k, version): _own_storage(v) for k, v in model.state_dict().items()}
        if max_shard_bytes is None:
            write_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            shards, cur, size = [], {}, 0
            for k, v in tensors.items():
                nbytes = v.numel() * v.element_size()
                if cur and size + nbytes > max_shard_bytes:
                    shards.append(cur)
                    cur, size = {}, 0
                cur[k], size = v, size + nbytes
            shards.append(cur)
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(model.cfg), indent=2))
        hf_cfg = model.cfg.to_hf()
        hf_cfg["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        for name, src in (extra_files or {}).items():  # (a name may hold a subfolder: peft/adapter_config.json)
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / name)
        _permit_as_umask(tmp)
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
