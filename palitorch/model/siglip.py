"""SigLIP vision tower: patchify, add learned positions, a stack of pre-LN transformer layers, a final LayerNorm.

Axes: B batch, R image side (pixels [B, 3, R, R]), P patches, C hidden size, N heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from palitorch.config import VisionConfig

# Linear is nn.Linear's maths and weights; at CPU inference it may pick a faster kernel (see kernels.py)
from palitorch.model.kernels import Linear, in_row_blocks


def activation(name: str):
    """The few GELU flavours that PaliGemma configs name."""
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast", "gelu_accurate"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name in ("gelu", "gelu_python"):
        return F.gelu
    raise ValueError(f"unsupported activation {name!r}")


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj = Linear(c, c), Linear(c, c), Linear(c, c)
        self.out_proj = Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, P, C] -> [B, P, C]
        b, p, _ = x.shape

        def heads(t):  # [B, P, C] -> [B, N, P, D]
            return t.view(b, p, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = F.scaled_dot_product_attention(q, k, v)  # full attention over the patches, scale D^-0.5
        return self.out_proj(o.transpose(1, 2).reshape(b, p, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        # x + mlp(layer_norm2(x)), in blocks of rows at CPU inference to bound the intermediates' memory
        return in_row_blocks(self._mlp_block, x, self.mlp.fc1.out_features)

    def _mlp_block(self, x):
        return x + self.mlp(self.layer_norm2(x))


class SigLIP(nn.Module):
    """pixels [B, 3, R, R] -> patch features [B, P, C], P = (R / patch)^2.

    No pooling head: PaliGemma uses every patch.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [B, C, R/p, R/p]
        x = x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # [B, P, C]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.post_layernorm(x)
