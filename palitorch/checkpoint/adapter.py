"""PEFT LoRA adapters (the folder `PeftModel.save_pretrained` writes), merged into a loaded PaliGemma.

A LoRA adapter of layer W holds A [r, in] and B [out, r]; the adapted layer computes x (W + s B A)^T with
s = lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`; `alpha_pattern` and `rank_pattern` set them per module).
Merging once at load time gives the adapted model at the base model's speed. Tensors that are not LoRA pairs
(`modules_to_save`, biases trained with `bias = "all"`) replace the base model's. Adapter names are transformers
module paths (`base_model.model.` + the path), from any transformers version: the key tables (keys.py) read them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from palitorch.checkpoint.io import check_safetensors, read_json_object
from palitorch.checkpoint.keys import hf_to_ours
from palitorch.errors import CheckpointError
from palitorch.model.paligemma import PaliGemma

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
EMBED, HEAD = "language_model.embed_tokens.weight", "language_model.lm_head.weight"
_PAIR = re.compile(r"^(.*)\.lora_(A|B|embedding_A|embedding_B)(?:\.[^.]+)?(?:\.weight)?$")
_SAVED = re.compile(r"\.modules_to_save\.[^.]+\.")  # a module_to_save's copy, as some PEFT versions name it
_REFUSED = {  # settings whose adapters are not W + s B A: merging them as such would be silently wrong
    "use_dora": "a DoRA adapter", "fan_in_fan_out": "a fan_in_fan_out adapter (GPT-2-style Conv1D layers)",
    "lora_bias": "an adapter with LoRA biases", "use_qalora": "a QA-LoRA adapter",
}


def read_adapter(folder: Path) -> tuple[dict, Path]:
    """(adapter_config.json's settings, the weights file) of a PEFT LoRA adapter folder, checked."""
    if not (folder / CONFIG).is_file():
        what = "does not exist" if not folder.exists() else "is a file" if folder.is_file() else f"has no {CONFIG}"
        raise CheckpointError(f"adapter folder {str(folder)!r} {what}: give the folder PEFT's save_pretrained "
                              f"wrote ({CONFIG} and {WEIGHTS})")
    settings = read_json_object(folder / CONFIG, advice="")
    kind = settings.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{folder / CONFIG}: peft_type {kind!r}: palitorch merges LoRA adapters only")
    for key, what in _REFUSED.items():
        if settings.get(key):
            raise CheckpointError(f"{folder / CONFIG}: {key} is set: {what} is not a plain LoRA, which is all "
                                  "palitorch merges; merge it with PEFT (merge_and_unload) and save the model")
    weights = folder / WEIGHTS
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        hint = " (found adapter_model.bin: palitorch never unpickles; save it with safe_serialization)" if pickled \
            else ""
        raise CheckpointError(f"{folder} has no {WEIGHTS}{hint}")
    check_safetensors(weights, advice="")
    return settings, weights


def setting(settings: dict, name: str, module: str, default):
    """`name` (r, lora_alpha) for one adapted module (a transformers path): its `<r|alpha>_pattern` entry, matched
    as PEFT matches them, else the adapter's own value."""
    patterns = settings.get("rank_pattern" if name == "r" else "alpha_pattern") or {}
    value = next((v for p, v in patterns.items() if re.match(rf"(.*\.)?({p})$", module)), settings.get(name, default))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{CONFIG}: {name} {value!r} (for {module}) is not a number")
    return value


def scaling(settings: dict, module: str, rank: int) -> float:
    """s for one adapted module: lora_alpha (or alpha_pattern's) over r (or sqrt(r))."""
    alpha = setting(settings, "lora_alpha", module, 8)
    return alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)


def merge_adapter(model: PaliGemma, folder) -> list[str]:
    """Merge the PEFT LoRA adapter in `folder` into `model`'s weights (new tensors: the base checkpoint's mapped
    files are never written); returns the parameters changed. The adapter must be one of this base model:
    a name or a shape it does not have is a CheckpointError naming the tensor.

    With tied embeddings (every PaliGemma Google released) the output layer is the token embedding, and the result is
    what PEFT's merge_and_unload makes of the one shared tensor: an update of either (LoRA on embed_tokens or lm_head)
    changes both, but an embedding replaced whole (`modules_to_save`) leaves the output layer as it was, which
    palitorch then holds apart (unless `ensure_weight_tying`, where PEFT keeps them one)."""
    folder = Path(folder).expanduser()
    settings, file = read_adapter(folder)
    params = dict(model.named_parameters())
    tied = model.language_model.lm_head is None
    known = set(params) | ({HEAD} if tied else set())
    pairs, whole = _read(file, model.cfg.version, known)
    head_whole = None
    if tied:  # what the adapter says of lm_head, it says of the shared tensor
        head_pair, head_whole = pairs.pop(HEAD, None), whole.pop(HEAD, None)
        if head_pair is not None and not (settings.get("ensure_weight_tying") and EMBED in pairs):
            pairs[HEAD] = head_pair  # (merged into the embedding below; with tying it is the embedding's own pair)
    new: dict[str, torch.Tensor] = {}
    for name, t in whole.items():  # saved whole: they replace the base model's (before any update on top)
        w = params[name]
        if t.shape != w.shape:
            raise CheckpointError(f"{file.name}: {name} has shape {tuple(t.shape)}, the model's is {tuple(w.shape)}: "
                                  "the adapter belongs to another model")
        new[name] = t.to(w.device, w.dtype)
    for name, (module, ab) in pairs.items():
        target = EMBED if name == HEAD else name
        w = new.get(target, params[target])
        new[target] = (w.detach().float() + _update(settings, folder, file, module, ab, w).to(w.device)).to(w.dtype)
    if not new:
        raise CheckpointError(f"{file} holds no LoRA weights")
    head = None
    if tied and head_whole is not None:  # the output layer as the adapter holds it
        head = head_whole.to(params[EMBED].device, params[EMBED].dtype)
    elif tied and EMBED in whole and not settings.get("ensure_weight_tying"):
        head = params[EMBED].detach()  # PEFT swapped the input embedding only: the output layer stays as it was
    with torch.no_grad():
        for name, t in new.items():
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(t, requires_grad=False))
        if head is not None and not torch.equal(head, new.get(EMBED, params[EMBED])):
            _untie(model, head)
    return sorted(new)


def _read(file: Path, version: int, known: set[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter file's LoRA pairs ({our weight name: (module path, {"A"/"B"/"embedding_A"/...: tensor})}) and
    tensors saved whole ({our name: tensor}). A layer's own weight saved beside its pair (`base_layer`: an
    embedding's, by default) is the base model's, and is not read."""
    pairs: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    whole: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                path = _SAVED.sub(".", key.removeprefix("base_model.model."))
                if ".base_layer." in path:
                    continue
                if "trainable_tokens" in path:
                    raise CheckpointError(f"{file.name}: {key!r} is a trainable-tokens delta "
                                          "(trainable_token_indices), which palitorch does not merge: merge it with "
                                          "PEFT (merge_and_unload) and save the model")
                m = _PAIR.match(path)
                if m:
                    name = _ours(f"{m.group(1)}.weight", version, known, file, key)
                    pairs.setdefault(name, (m.group(1), {}))[1][m.group(2)] = f.get_tensor(key)
                else:
                    whole[_ours(path, version, known, file, key)] = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
    return pairs, whole


def _update(settings: dict, folder: Path, file: Path, module: str, ab: dict, w: torch.Tensor) -> torch.Tensor:
    """s B A (float32, shaped as the weight `w`) of one module's LoRA pair, checked against `w` and the settings."""
    a, b = (ab.get("A"), ab.get("B")) if "A" in ab or "B" in ab else (ab.get("embedding_A"), ab.get("embedding_B"))
    if a is None or b is None or len(ab) != 2:
        raise CheckpointError(f"{file.name}: {module} has {sorted(ab)} of a LoRA pair (lora_A and lora_B)")
    rank = a.shape[0]
    if "embedding_A" in ab:  # an embedding's update: (B A)^T, with A [r, vocab] and B [dim, r]
        delta = (b.float() @ a.float()).t() if b.dim() == 2 and b.shape[1] == rank else None
    else:  # a linear layer's (or a convolution's: A [r, in, k, k], B [out, r, 1, 1]): B A
        delta = b.float().flatten(1) @ a.float().flatten(1) if b.flatten(1).shape[1] == rank else None
    if delta is None or delta.shape[0] != w.shape[0] or delta.numel() != w.numel():
        raise CheckpointError(f"{file.name}: {module}'s LoRA pair (A {tuple(a.shape)}, B {tuple(b.shape)}) "
                              f"does not fit its weight {tuple(w.shape)}: the adapter belongs to another model")
    if setting(settings, "r", module, 8) != rank:  # (PEFT refuses such an adapter too)
        raise CheckpointError(f"{folder / CONFIG} gives {module} rank {setting(settings, 'r', module, 8)!r}, its "
                              f"weights have rank {rank}: the adapter's files do not belong together")
    return scaling(settings, module, rank) * delta.view(w.shape)


def _untie(model: PaliGemma, head: torch.Tensor) -> None:
    """Give the decoder an output layer of its own (`head` [vocab, dim]), apart from the token embedding."""
    lm = model.language_model
    layer = torch.nn.Linear(lm.cfg.hidden_size, lm.cfg.vocab_size, bias=False, device="meta")
    layer.weight = torch.nn.Parameter(head, requires_grad=False)
    lm.lm_head = layer
    lm.cfg = dataclasses.replace(lm.cfg, tie_embeddings=False)
    model.cfg = model.cfg.replace(text=lm.cfg)


def _ours(path: str, version: int, known: set[str], file: Path, key: str) -> str:
    """Our parameter name for an adapter's transformers path, else a CheckpointError naming `key`."""
    name = hf_to_ours(path, version)
    if name is None or name not in known:
        raise CheckpointError(f"{file.name}: {key!r} names no weight of this PaliGemma: the adapter belongs to "
                              "another model")
    return name
