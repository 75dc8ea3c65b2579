"""LoRA: fine-tune small low-rank matrices beside frozen weights (Hu et al., 2021), merged in when saved.

A chosen linear layer y = x W^T (+ b) becomes y = x W^T (+ b) + s (dropout(x) A^T) B^T, with A [r, in] drawn as in
the paper's reference code (Kaiming-uniform), B [out, r] zero (so training starts from the checkpoint's own
function) and s = alpha / r. Only A and B train (and what `[lora] also_train` names), so the optimizer holds two
small matrices per layer instead of two copies of every weight: a 3B PaliGemma fine-tunes in the memory of its
bfloat16 weights plus activations. The model code knows nothing of it: LoRA wraps nn.Linear modules from outside.

Every folder a run writes holds the merged weights W + s B A in the Hub layout, so it loads anywhere as a plain
PaliGemma (palitorch, transformers; with bfloat16 weights the merged update is rounded to bfloat16, which
adapter.safetensors does not do); beside them `adapter.safetensors` holds A and B, and `peft/` the same as a PEFT
adapter of [model] init (for transformers + PEFT users). `--resume` builds the model from the checkpoint (the parts
trained in full included), takes the adapted layers' frozen W from `[model] init` again and puts A and B back, after
checking that W + s B A is the checkpoint's merged weight (the same init and settings). With dropout > 0 the
adapters' random masks depend on how a batch is split (micro-batches, processes), so such runs do not follow one
loss curve exactly.
"""

from __future__ import annotations

import fnmatch
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from palitorch.checkpoint import load_model
from palitorch.checkpoint.adapter import save_peft_adapter
from palitorch.checkpoint.hub import snapshot_id
from palitorch.checkpoint.io import write_safetensors
from palitorch.errors import CheckpointError, ConfigError

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "lora_config.json"  # (not PEFT's adapter_config.json: transformers would load the folder as one)
PEFT_FOLDER = "peft"  # the same adapters in PEFT's layout, for the [model] init checkpoint loaded by transformers


class LoRALinear(nn.Module):
    """`base` (frozen) plus the scaled low-rank update; reads like the nn.Linear it wraps."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        a = torch.empty(rank, base.in_features)
        bound = 1 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and the reference code
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x) @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype)
        return self.base(x) + update * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain linear layer with W + s B A (in W's dtype, on the CPU, where a checkpoint is written from),
        sharing the bias."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device="meta", dtype=self.base.weight.dtype)
        out.weight = nn.Parameter(merge(self.base.weight.cpu(), self.lora_a.cpu(), self.lora_b.cpu(), self.scale),
                                  requires_grad=False)
        if self.base.bias is not None:
            out.bias = self.base.bias
        return out


def merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A, computed in float32, in W's dtype."""
    return (w.float() + (b.float() @ a.float()) * scale).to(w.dtype)


def apply(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, seed: int) -> list[str]:
    """Wrap every nn.Linear whose module name matches a glob of `targets` (in name order, A drawn from `seed`);
    returns the wrapped names. The base weights are frozen. An untied LM head is never wrapped (the decoder reads
    its weight directly)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    for t in targets:  # each glob must mean something (a typo such as "vison_tower.*")
        if not any(fnmatch.fnmatchcase(n, t) for n in linear):
            raise ConfigError(f"[lora] target {t!r} matches no linear layer (names such as {linear[0]!r}; globs "
                              "such as language_model.layers.* or vision_tower.layers.*)")
    names = [n for n in linear if any(fnmatch.fnmatchcase(n, t) for t in targets)]
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        base = getattr(owner, leaf)
        base.requires_grad_(False)
        setattr(owner, leaf, LoRALinear(base, rank, alpha, dropout, generator))
    return names


def setup(model: nn.Module, cfg, resume_from: Path | None) -> None:
    """Wrap the layers `cfg.lora` (a TrainConfig's) names; resuming, make them the checkpoint's run (`resume`)."""
    lo = cfg.lora
    apply(model, lo.targets, lo.rank, lo.alpha, lo.dropout, cfg.train.seed)
    if resume_from is not None:  # the checkpoint holds the adapted weights merged: their W are init's
        init = Path(cfg.model.init)
        if not init.is_dir():
            raise ConfigError(f"--resume: a LoRA run reads its frozen weights from [model] init {str(init)!r}, "
                              "which is not there any more")
        resume(model, resume_from, load_model(init, "cpu", cfg.model.dtype))


def check_frozen(model: nn.Module) -> None:
    """The adapted layers' own weights stay frozen: a part named to train in full must not hold them."""
    for name, layer in wrapped(model):
        if any(p.requires_grad for p in layer.base.parameters()):
            raise ConfigError(f"[lora] also_train selects {name}'s own weights, which its adapter trains beside: "
                              "name parts without adapters (e.g. projector), or leave those layers out of targets")


def wrapped(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def merged(model: nn.Module):
    """Within the block the wrapped layers are plain ones with merged weights (what a checkpoint saves); after it,
    the wrappers are back."""
    swapped = []
    for name, module in wrapped(model):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, module.merged())
        swapped.append((owner, leaf, module))
    try:
        yield model
    finally:
        for owner, leaf, module in swapped:
            setattr(owner, leaf, module)


def save_adapter(model: nn.Module, folder: Path, base: str | None = None) -> dict[str, Path]:
    """Write A and B (float32) and their settings into `folder`, and the same in PEFT's layout (`save_peft`); {file
    name in a checkpoint: path} to copy into one ({} when the model has no LoRA layers). `base`: the run's
    [model] init, which the PEFT files name as their base model."""
    layers = wrapped(model)
    if not layers:
        return {}
    tensors = {f"{n}.{k}": getattr(m, k).detach().float().contiguous().cpu() for n, m in layers
               for k in ("lora_a", "lora_b")}
    write_safetensors(tensors, folder / ADAPTER_FILE)
    first = layers[0][1]
    (folder / ADAPTER_CONFIG).write_text(json.dumps(
        {"r": first.lora_a.shape[0], "scale": first.scale, "target_modules": [n for n, _ in layers],
         "note": "palitorch LoRA: the model weights beside this file are already merged (W + scale * B @ A)"},
        indent=2))
    peft = save_peft(model, folder / PEFT_FOLDER, base)
    return {ADAPTER_FILE: folder / ADAPTER_FILE, ADAPTER_CONFIG: folder / ADAPTER_CONFIG,
            **{f"{PEFT_FOLDER}/{name}": path for name, path in peft.items()}}


def save_peft(model: nn.Module, folder: Path, base: str | None) -> dict[str, Path]:
    """The run as a PEFT LoRA adapter of its [model] init (checkpoint.adapter.save_peft_adapter):
    `PeftModel.from_pretrained(PaliGemmaForConditionalGeneration.from_pretrained(init), folder)` is the trained
    model. The parameters trained in full (`[lora] also_train`) are saved whole. An init read from the local Hugging
    Face cache is named as PEFT names it, by its Hub id (with the commit as `revision`), not by this machine's cache
    folder."""
    layers = wrapped(model)
    lora = {name: (layer.lora_a.detach().float().contiguous().cpu(), layer.lora_b.detach().float().contiguous().cpu())
            for name, layer in layers}
    owners = sorted({p.rpartition(".")[0] for p, t in model.named_parameters()
                     if t.requires_grad and not p.endswith((".lora_a", ".lora_b"))})
    whole = {f"{owner}.{leaf}": t.detach().contiguous().cpu()
             for owner in owners for leaf, t in model.get_submodule(owner).named_parameters(recurse=False)}
    first = layers[0][1]
    rank = first.lora_a.shape[0]
    hub = snapshot_id(base) if base else None  # a Hub id's cached snapshot goes by the id, at its commit
    named = {"base_model_name_or_path": hub[0], "revision": hub[1]} if hub else {"base_model_name_or_path": base}
    settings = {**named, "r": rank, "lora_alpha": first.scale * rank, "lora_dropout": getattr(first.dropout, "p", 0.0)}
    return save_peft_adapter(folder, model.cfg.version, lora, whole, settings,
                             tied=model.language_model.lm_head is None)


@torch.no_grad()
def resume(model: nn.Module, folder: Path, init: nn.Module) -> None:
    """Make a model built from checkpoint `folder` and wrapped by `apply` the run it was: A and B from the
    checkpoint's adapter file, each wrapped layer's frozen W from `init` (the run's [model] init), after checking
    that W + s B A gives the checkpoint's merged weight (else its init, alpha, rank or targets were others)."""
    file = folder / ADAPTER_FILE
    if not file.is_file():
        raise CheckpointError(f"{folder} has no {ADAPTER_FILE}: it was not written by a run with [lora] rank > 0")
    tensors = load_file(str(file))
    layers = wrapped(model)
    want = {f"{n}.{k}": getattr(m, k) for n, m in layers for k in ("lora_a", "lora_b")}
    if set(tensors) != set(want) or any(tensors[k].shape != p.shape for k, p in want.items()):
        raise ConfigError(f"--resume: {file} holds other LoRA layers or ranks than [lora] targets and rank give "
                          "now: resume with the settings of the run that wrote it")
    for k, p in want.items():
        p.copy_(tensors[k])
    frozen = dict(init.named_parameters())
    for name, layer in layers:
        w, saved = frozen[f"{name}.weight"].to(layer.base.weight.device, layer.base.weight.dtype), layer.base.weight
        tol = 4 * torch.finfo(saved.dtype).eps * (1 + float(saved.abs().max()))  # the merge's rounding
        if float((merge(w, layer.lora_a, layer.lora_b, layer.scale).float() - saved.float()).abs().max()) > tol:
            raise ConfigError(f"--resume: {folder.name}'s {name} is not [model] init's weight plus its adapter at "
                              "[lora] alpha / rank now: resume with the init and [lora] settings of the run that "
                              "wrote it")
        saved.copy_(w)
