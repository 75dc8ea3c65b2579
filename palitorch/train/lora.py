"""LoRA: fine-tune small low-rank matrices beside frozen weights (Hu et al., 2021), merged in when saved.

A chosen linear layer y = x W^T (+ b) becomes y = x W^T (+ b) + s (dropout(x) A^T) B^T, with A [r, in] drawn as in
the paper's reference code (Kaiming-uniform), B [out, r] zero (so training starts from the checkpoint's own
function) and s = alpha / r. Only A and B train (and what `[lora] also_train` names), so the optimizer holds two
small matrices per layer instead of two copies of every weight: a 3B PaliGemma fine-tunes in the memory of its
bfloat16 weights plus activations. The model code knows nothing of it: LoRA wraps nn.Linear modules from outside.

Every folder a run writes holds the merged weights W + s B A in the Hub layout, so it loads anywhere as a plain
PaliGemma (palitorch, transformers); beside them `adapter.safetensors` holds A and B, which `--resume` puts back on
top of the run's `[model] init` (whose weights stay the frozen W).
"""

from __future__ import annotations

import fnmatch
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from palitorch.errors import CheckpointError, ConfigError

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


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
        """A plain linear layer with W + s B A (in W's dtype), sharing the bias."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device="meta", dtype=self.base.weight.dtype)
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
        out.weight = nn.Parameter((self.base.weight.float() + delta).to(self.base.weight.dtype), requires_grad=False)
        if self.base.bias is not None:
            out.bias = self.base.bias
        return out


def apply(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, seed: int) -> list[str]:
    """Wrap every nn.Linear whose module name matches a glob of `targets` (in name order, A drawn from `seed`);
    returns the wrapped names. The base weights are frozen."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and any(fnmatch.fnmatchcase(n, t) for t in targets)]
    if not names:
        raise ConfigError(f"[lora] targets {targets} match no linear layer (names such as "
                          "language_model.layers.0.attn.q_proj)")
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        base = getattr(owner, leaf)
        base.requires_grad_(False)
        setattr(owner, leaf, LoRALinear(base, rank, alpha, dropout, generator))
    return names


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


def save_adapter(model: nn.Module, folder: Path) -> dict[str, Path]:
    """Write A and B (float32) and their settings into `folder`; {file name: path} to copy into a checkpoint
    ({} when the model has no LoRA layers)."""
    layers = wrapped(model)
    if not layers:
        return {}
    tensors = {f"{n}.{k}": getattr(m, k).detach().float().contiguous().cpu() for n, m in layers
               for k in ("lora_a", "lora_b")}
    save_file(tensors, str(folder / ADAPTER_FILE))
    first = layers[0][1]
    (folder / ADAPTER_CONFIG).write_text(json.dumps(
        {"r": first.lora_a.shape[0], "scale": first.scale, "target_modules": [n for n, _ in layers],
         "note": "palitorch LoRA: the model weights beside this file are already merged (W + scale * B @ A)"},
        indent=2))
    return {ADAPTER_FILE: folder / ADAPTER_FILE, ADAPTER_CONFIG: folder / ADAPTER_CONFIG}


@torch.no_grad()
def load_adapter(model: nn.Module, folder: Path) -> None:
    """Put a checkpoint's A and B back into the wrapped layers (the same targets and rank)."""
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
