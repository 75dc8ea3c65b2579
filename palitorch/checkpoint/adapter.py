"""PEFT LoRA adapters (the folder `PeftModel.save_pretrained` writes), merged into a loaded PaliGemma, and
written for a LoRA training run (`save_peft_adapter`).

A LoRA adapter of layer W holds A [r, in] and B [out, r]; the adapted layer computes x (W + s B A)^T with
s = lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`; `alpha_pattern` and `rank_pattern` set them per module).
Merging once at load time gives the adapted model at the base model's speed. Tensors that are not LoRA pairs
(`modules_to_save`, biases trained with `bias = "all"`) replace the base model's. Adapter names are transformers
module paths (`base_model.model.` + the path), from any transformers version: the key tables (keys.py) read them.
Variants that run as such a LoRA at inference merge too (BD-LoRA, MonteCLoRA, VeLoRA); the others, and adapters
that PEFT applies to base weights it changes when loading them (PiSSA, OLoRA... unless converted), are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from palitorch.checkpoint.hub import cached_snapshot, is_hub_id
from palitorch.checkpoint.io import check_safetensors, read_json_object, write_safetensors
from palitorch.checkpoint.keys import hf_runtime_name, hf_to_ours
from palitorch.errors import CheckpointError
from palitorch.model.paligemma import PaliGemma

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
EMBED, HEAD = "language_model.embed_tokens.weight", "language_model.lm_head.weight"
_PAIR = re.compile(r"^(.*)\.lora_(A|B|embedding_A|embedding_B)(?:\.[^.]+)?(?:\.weight)?$")
_SAVED = re.compile(r"\.modules_to_save\.[^.]+\.")  # a module_to_save's copy, as some PEFT versions name it
_REFUSED = {  # settings whose adapters are not W + s B A: merging them as such would be silently wrong
    "use_dora": "a DoRA adapter", "fan_in_fan_out": "a fan_in_fan_out adapter (GPT-2-style Conv1D layers)",
    "lora_bias": "an adapter with LoRA biases", "use_qalora": "a QA-LoRA adapter",
    "kasa_config": "a KaSA adapter (a learned diagonal between A and B, over base weights truncated by SVD)",
    "arrow_config": "an Arrow adapter (routing each token among LoRA experts)",
    "layer_replication": "an adapter of a model with replicated layers",
}
_UNMERGEABLE = {  # and those that no merged weight can stand for
    "alora_invocation_tokens": "an Activated LoRA (aLoRA) adapter, which changes only the tokens from its invocation "
                               "sequence on, so that no merged weight is its model: run it with PEFT",
}
# init_lora_weights that make PEFT change the base weights whenever it loads the adapter (it subtracts the adapter's
# initial value, or quantizes them): A and B are an update of those changed weights, not of the checkpoint's
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# variants whose forward at inference is a plain LoRA's: the tensors they save beside A and B are training state
_TRAINING_STATE = {"monteclora_config": ".lora_monteclora_sampler.", "velora_config": ".lora_velora_"}


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
    for key, what in _UNMERGEABLE.items():
        if settings.get(key):
            raise CheckpointError(f"{folder / CONFIG}: {key} is set: {what}")
    init = settings.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_MUTATING_INITS):
        raise CheckpointError(f"{folder / CONFIG}: init_lora_weights {init!r}: PEFT changes the base weights when it "
                              "loads such an adapter, so it is no update of this checkpoint's; convert it to a plain "
                              "LoRA with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)) or "
                              "merge it with PEFT (merge_and_unload) and save the model")
    weights = folder / WEIGHTS
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        hint = " (found adapter_model.bin: palitorch never unpickles; save it with safe_serialization)" if pickled \
            else ""
        raise CheckpointError(f"{folder} has no {WEIGHTS}{hint}")
    check_safetensors(weights, advice="")
    return settings, weights


def adapter_base(folder: Path) -> Path | None:
    """The base model a PEFT adapter names, as peft's AutoPeftModel finds it: adapter_config.json's
    base_model_name_or_path, a folder or a Hub id in the local Hugging Face cache (at the config's `revision`);
    None when it names none. One that is not here is a one-line CheckpointError saying to give the base model."""
    settings, _ = read_adapter(folder)
    base, revision = settings.get("base_model_name_or_path"), settings.get("revision")
    if not isinstance(base, str) or not base.strip():
        return None
    given = "; or give the base model with --model (path= in palitorch.load)"
    if not is_hub_id(base):
        path = Path(base).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{folder / CONFIG} names base model {base!r}, which is not a folder here{given}")
        return path
    try:
        return cached_snapshot(base, revision if isinstance(revision, str) and revision.strip() else None)
    except CheckpointError as e:
        raise CheckpointError(f"{folder / CONFIG} names base model {base!r}: {e}{given}") from None


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


@torch.no_grad()
def merge_adapter(model: PaliGemma, folder) -> list[str]:
    """Merge the PEFT LoRA adapter in `folder` into `model`'s weights (new tensors: the base checkpoint's mapped
    files are never written); returns the parameters changed. The adapter must be one of this base model:
    a name or a shape it does not have is a CheckpointError naming the tensor.

    Three kinds of tensors, as PEFT loads them: a layer's own weight saved beside its pair (`base_layer`: an
    embedding's, by default) is loaded into the base model; a module saved whole (`modules_to_save`) replaces it; a
    LoRA pair adds s B A on top. With tied embeddings (every PaliGemma Google released) the output layer is the token
    embedding: `_tied` says what each side becomes."""
    folder = Path(folder).expanduser()
    settings, file = read_adapter(folder)
    params = dict(model.named_parameters())
    tied = model.language_model.lm_head is None
    state = tuple(part for key, part in _TRAINING_STATE.items() if settings.get(key))
    base, whole, pairs = _read(file, model.cfg.version, set(params) | ({HEAD} if tied else set()), state)
    for name, t in [*base.items(), *whole.items()]:
        w = params[EMBED if name == HEAD and tied else name]
        if t.shape != w.shape:
            raise CheckpointError(f"{file.name}: {name} has shape {tuple(t.shape)}, the model's is {tuple(w.shape)}: "
                                  "the adapter belongs to another model")

    def cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.device, like.dtype)

    def update(name: str, w: torch.Tensor) -> torch.Tensor | None:
        if name not in pairs:
            return None
        module, ab = pairs.pop(name)
        return _update(settings, folder, file, module, ab, w).to(w.device)

    new: dict[str, torch.Tensor] = {}
    head = None
    if tied and ({EMBED, HEAD} & (base.keys() | whole.keys() | pairs.keys())):
        shared = cast(base.get(EMBED, base.get(HEAD, params[EMBED])), params[EMBED])
        inputs, outputs = _tied(settings, shared, {k: cast(whole.pop(k), shared) for k in (EMBED, HEAD) if k in whole},
                                update(EMBED, shared), update(HEAD, shared))
        new[EMBED] = inputs
        head = outputs if not torch.equal(outputs, inputs) else None
    for name in base.keys() | whole.keys() | pairs.keys():
        if name in (EMBED, HEAD) and tied:
            continue
        w = cast(whole.get(name, base.get(name, params[name])), params[name])
        delta = update(name, w)
        new[name] = w if delta is None else (w.float() + delta).to(w.dtype)
    if not new:
        raise CheckpointError(f"{file} holds no LoRA weights")
    for name, t in new.items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(t, requires_grad=False))
    if head is not None:
        _untie(model, head)
    return sorted(new)


def _tied(settings: dict, shared: torch.Tensor, saved: dict, d_in, d_out) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embedding, output layer) of a tied model under an adapter: `shared` the base tensor, `saved` the
    copies saved whole of either side ({EMBED or HEAD: tensor}), `d_in` / `d_out` the LoRA updates of either (or
    None). As PEFT has them: with `ensure_weight_tying` one tensor stays (a saved copy is both sides', the tied pair
    counts once); without, a saved copy replaces its own side only, and otherwise every update lands on the one shared
    tensor, as merge_and_unload writes it (PEFT's unmerged forward applies an embedding's LoRA to the input side
    only)."""

    def plus(t: torch.Tensor, d) -> torch.Tensor:
        return t if d is None else (t.float() + d).to(t.dtype)

    if settings.get("ensure_weight_tying"):
        one = plus(saved.get(EMBED, saved.get(HEAD, shared)), d_in if d_in is not None else d_out)
        return one, one
    if not saved:
        one = plus(plus(shared, d_in), d_out)
        return one, one
    return plus(saved.get(EMBED, shared), d_in), plus(saved.get(HEAD, shared), d_out)


def _read(file: Path, version: int, known: set[str], state: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    """An adapter file's tensors by our weight names: layers' own weights saved beside their pairs (`base_layer`),
    modules saved whole, and LoRA pairs ({name: (module path, {"A"/"B"/"embedding_A"/...: tensor})}). Tensors
    whose names hold a part of `state` (a variant's training state) are left out."""
    base: dict[str, torch.Tensor] = {}
    whole: dict[str, torch.Tensor] = {}
    pairs: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                path = _SAVED.sub(".", key.removeprefix("base_model.model."))
                if any(part in path for part in state):
                    continue
                if "trainable_tokens" in path:
                    raise CheckpointError(f"{file.name}: {key!r} is a trainable-tokens delta "
                                          "(trainable_token_indices), which palitorch does not merge: merge it with "
                                          "PEFT (merge_and_unload) and save the model")
                m = _PAIR.match(path)
                if m:
                    name = _ours(f"{m.group(1)}.weight", version, known, file, key)
                    pairs.setdefault(name, (m.group(1), {}))[1][m.group(2)] = f.get_tensor(key)
                elif ".base_layer." in path:
                    base[_ours(path.replace(".base_layer.", "."), version, known, file, key)] = f.get_tensor(key)
                else:
                    whole[_ours(path, version, known, file, key)] = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
    return base, whole, pairs


def _update(settings: dict, folder: Path, file: Path, module: str, ab: dict, w: torch.Tensor) -> torch.Tensor:
    """s B A (float32, shaped as the weight `w`) of one module's LoRA pair, checked against `w` and the settings."""
    a, b = (ab.get("A"), ab.get("B")) if "A" in ab or "B" in ab else (ab.get("embedding_A"), ab.get("embedding_B"))
    if a is None or b is None or len(ab) != 2:
        raise CheckpointError(f"{file.name}: {module} has {sorted(ab)} of a LoRA pair (lora_A and lora_B)")
    rank = a.shape[0]
    a, b = _block_diagonal(settings.get("use_bdlora"), module, a, b)
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


def _block_diagonal(bd, module: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a BD-LoRA adapter (`use_bdlora`: {target_modules_bd_a, target_modules_bd_b, nblocks}) as full
    matrices: PEFT keeps a block-diagonal factor as its `nblocks` blocks stacked ([r, in / n] for A, [out, r / n]
    for B), on the modules whose path holds one of the names given for it."""
    if not isinstance(bd, dict):
        return a, b
    n = bd.get("nblocks", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or a.dim() != 2 or b.dim() != 2:
        return a, b  # (a pair that then does not fit its weight is refused by the caller)

    def full(t: torch.Tensor, names) -> torch.Tensor:
        hit = any(name in module for name in names or ())
        return torch.block_diag(*t.chunk(n, 0)) if hit and t.shape[0] % n == 0 else t

    return full(a, bd.get("target_modules_bd_a")), full(b, bd.get("target_modules_bd_b"))


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


def save_peft_adapter(folder: Path, version: int, lora: dict, whole: dict, settings: dict,
                      tied: bool) -> dict[str, Path]:
    """Write a LoRA adapter in PEFT's layout for transformers' PaliGemma, as `PeftModel.from_pretrained` reads it.
    `lora`: our module names (`language_model.layers.0.attn.q_proj`) -> (A [r, in], B [out, r]); `whole`: our names
    of parameters trained in full -> their values (their modules are PEFT's `modules_to_save`, saved whole);
    `settings`: base_model_name_or_path, r, lora_alpha, lora_dropout. `tied`: the output layer is the embedding; an
    embedding saved whole then also replaces the output layer, which PEFT does only with `ensure_weight_tying`
    (so it is set, and the head saved as a copy). -> {file name: path}."""
    prefix = "base_model.model."  # then the module's path in a transformers 5 PaliGemmaForConditionalGeneration
    module = {n: hf_runtime_name(f"{n}.weight", version).removesuffix(".weight") for n in lora}
    tensors = {f"{prefix}{module[n]}.lora_{side}.weight": t for n, (a, b) in lora.items()
               for side, t in (("A", a), ("B", b))}
    saved = set()
    for name, t in whole.items():
        hf = hf_runtime_name(name, version)
        saved.add(hf.rpartition(".")[0])
        tensors[prefix + hf] = t
    config = {"peft_type": "LORA", "task_type": None, **settings, "target_modules": list(module.values()),
              "modules_to_save": sorted(saved) or None, "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
              "auto_mapping": {"base_model_class": "PaliGemmaForConditionalGeneration",  # (for AutoPeftModel, as
                               "parent_library": "transformers.models.paligemma.modeling_paligemma"}}  # PEFT writes)
    embed = prefix + hf_runtime_name(EMBED, version)
    if embed in tensors and tied:
        config["ensure_weight_tying"] = True
        tensors[prefix + "lm_head.weight"] = tensors[embed].clone()
    folder.mkdir(exist_ok=True)
    write_safetensors(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    return {WEIGHTS: folder / WEIGHTS, CONFIG: folder / CONFIG}
