"""One Gemma decoder for Gemma 1 and Gemma 2, chosen by `TextConfig` flags, with a static KV cache.

Gemma 2 = Gemma 1 + post-attention / post-feedforward norms, attention and final logit soft-capping, a
`query_pre_attn_scalar` attention scale, and a sliding window on alternate layers.

Axes: B batch, T query length, S key length (the cache length when a cache is set up), H hidden size,
N query heads, K key/value heads, G = N / K query heads per KV head, D head dim, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from palitorch.config import TextConfig

# Linear is nn.Linear's maths and weights; at CPU inference it may pick a faster kernel (see kernels.py)
from palitorch.model.kernels import Linear, blocks_apply, in_row_blocks
from palitorch.model.quant import product, scale_of
from palitorch.model.siglip import activation

# Devices whose fused SDPA kernels take either a mask or grouped KV heads (`enable_gqa`) but not both: there a
# masked attention over many queries (prefill, scoring, training) gets full heads, or it would fall back to the
# unfused "math" kernel, which builds the float32 score matrix [B, N, T, S] (pytorch/pytorch#154363; transformers
# repeats the KV heads for the same reason). One-token steps keep `enable_gqa` (the CUDA profile in BENCHMARKS.md:
# a fused kernel, 14 us a layer). CPU's flash kernel takes both.
FULL_HEADS_FOR_MASKED_SDPA = ("cuda",)

# `Attention._explicit_in_blocks`: at CPU inference, about this many bytes of float32 scores a block of queries.
SCORE_BLOCK_BYTES = 4 << 20

# Whether this CPU has AMX tiles, which torch's SDPA kernel uses (see `Attention._sdpa_for_one_token`).
CPU_HAS_AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def batched_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, K, M, X] @ b [B, K, X, Y]. On CPU a product of one row (M = 1: one query per KV head in a decode step)
    goes through `baddbmm`, which inductor leaves to the BLAS library, rather than `matmul`, whose one-row batched
    products inductor's CPU lowering turns into a multiply-and-sum with a's producer fused in: the query's RoPE
    recomputed for every key, by scalar code (a 6-layer Gemma 2 with one query head per KV head, batch 8: 43 ms a
    step, against 33 ms this way; see BENCHMARKS.md, session 18). Same products, in eager as compiled."""
    if a.shape[-2] != 1 or a.device.type != "cpu":
        return torch.matmul(a, b)
    a3, b3 = a.reshape(-1, 1, a.shape[-1]), b.reshape(-1, *b.shape[-2:])
    zero = a.new_zeros(()).expand(a3.shape[0], 1, b3.shape[-1])  # ignored (beta=0): baddbmm's required addend
    return torch.baddbmm(zero, a3, b3, beta=0).view(*a.shape[:-1], b.shape[-1])


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), computed in float32 and cast back (Gemma stores w as an offset from 1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def rope_table(length: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [length, D] for positions 0..length-1, float32, angles computed as transformers does.

    The rotate-half layout pairs dim i with dim i + D/2. The sin table carries the rotation's sign (-sin on the
    first half, +sin on the second), so that applying RoPE is `x * cos + roll(x, D/2) * sin` (see `apply_rope`).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq  # [L, D/2]
    emb = torch.cat((angles, angles), dim=-1)
    sin = emb.sin()
    return emb.cos(), torch.cat((-sin[:, : head_dim // 2], sin[:, head_dim // 2:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, T, D] from `rope_table`: x * cos + rotate_half(x) * sin, where
    rotate_half(x) = (-x2, x1) = roll(x, D/2) times the sign that the sin table already holds."""
    return x * cos[:, None] + x.roll(x.shape[-1] // 2, dims=-1) * sin[:, None]


def fuse_linears(*linears: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate bias-free linears' weights along the output dim -> ([sum of outputs, in], their row scales
    likewise when the weights are int8, else None); each linear's weight becomes a view into the result (no extra
    memory; in-place updates of either are seen by both)."""
    fused = torch.cat([m.weight.detach() for m in linears])
    scales = [scale_of(m) for m in linears]
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        if isinstance(m.weight, nn.Parameter):
            m.weight = nn.Parameter(fused[start:start + rows], requires_grad=m.weight.requires_grad)
        else:  # an int8 weight: a buffer
            m.weight = fused[start:start + rows]
        start += rows
    return fused, None if scales[0] is None else torch.cat(scales)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, [B, K, S, D]; `update` writes T new entries at slots `pos`."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.n, self.kv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_softcap
        self.sliding = cfg.is_sliding(layer)
        self.q_proj = Linear(cfg.hidden_size, self.n * self.d, bias=False)
        self.k_proj = Linear(cfg.hidden_size, self.kv * self.d, bias=False)
        self.v_proj = Linear(cfg.hidden_size, self.kv * self.d, bias=False)
        self.o_proj = Linear(self.n * self.d, cfg.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None
        self.register_buffer("qkv", None, persistent=False)  # [q; k; v] in one matrix, after `fuse_projections`
        self.register_buffer("qkv_scale", None, persistent=False)  # its row scales, when int8 (model/quant.py)
        self.decode_attention = "auto"  # one-token steps: "auto", "sdpa", "matmul" or "flex" (`set_decode_attention`)

    def fuse_projections(self) -> None:
        """Put the q, k and v weights in one matrix so that inference runs one matmul for the three (fewer, larger
        kernels: a one-token decode step is bound by launches and memory reads). The three projections' weights
        become views of it, so training them (which uses them one by one) keeps it up to date. (Casting or moving
        the model afterwards keeps the values equal but as separate copies; fuse after `.to(...)`.)"""
        self.qkv, self.qkv_scale = fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, cos, sin, mask, cache_pos=None, last_only=False):
        """x [B, T, H]; mask [B, 1, T, S] bool (True = may attend); cache_pos [T] slots to write, with a cache. With
        a cache, the mask covers its first S slots: all of them (a decode step), or the T just written (a prefill).

        `last_only`: keys and values for all T positions (written to the cache), queries and output for the last
        position only -> [B, 1, H] (the last layer of a prefill, where only the next token's logits are wanted).

        The reference maths is `_explicit`: softmax(mask(q k^T * scale), float32) v, Gemma 2 soft-capping the scores
        as c * tanh(s / c) before the mask; the FlexAttention and SDPA routes compute the same, faster.
        """
        b, t, _ = x.shape
        if self.qkv is not None and not torch.is_grad_enabled():  # inference: one matmul for q, k and v
            widths = (self.n * self.d, self.kv * self.d, self.kv * self.d)
            q, k, v = product(x, self.qkv, self.qkv_scale).split(widths, dim=-1)
            q = q[:, -1:] if last_only else q
        else:
            q, k, v = self.q_proj(x[:, -1:] if last_only else x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, q.shape[1], self.n, self.d).transpose(1, 2)  # [B, N, T or 1, D]
        k = k.view(b, t, self.kv, self.d).transpose(1, 2)  # [B, K, T, D]
        v = v.view(b, t, self.kv, self.d).transpose(1, 2)
        if last_only:
            q, k = apply_rope(q, cos[:, -1:], sin[:, -1:]), apply_rope(k, cos, sin)
            mask, t = mask[:, :, -1:], 1
        else:
            q, k = apply_rope(torch.cat((q, k), dim=1), cos, sin).split((self.n, self.kv), dim=1)  # one pass
        if self.kv_cache is not None and cache_pos is not None:  # a full forward (scoring) bypasses the cache
            k, v = self.kv_cache.update(cache_pos, k, v)  # [B, K, S, D]
            if mask.shape[-1] < k.shape[2]:  # a mask over the first slots only (a prefill's): the rest are unused
                k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        if t == 1 and self.decode_attention == "flex" and torch.compiler.is_compiling():
            o = self._flex(q, k, v, mask)
        elif self.softcap is None and (t > 1 or self._sdpa_for_one_token(q)):
            grouped = self.n != self.kv
            if grouped and t > 1 and q.device.type in FULL_HEADS_FOR_MASKED_SDPA:
                k, v, grouped = *self._full_heads(k, v), False
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=grouped)
        else:
            o = self._explicit_in_blocks(q, k, v, mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n * self.d))

    def _sdpa_for_one_token(self, q: torch.Tensor) -> bool:
        """Whether a one-token step attends through SDPA rather than two matmuls. "auto": SDPA, except on a CPU without
        AMX tiles, where torch's SDPA kernel for one query (torch 2.13; it uses AMX tiles where there are some) was
        the slower of the two on an AMD EPYC: in bfloat16 it made a compiled step of the mid-size benchmark model
        twice as slow at batch 8 (50.7 ms against 25.7 ms through matmuls), and in float32 the matmuls took 3-16%
        less time at batch 8 (mid-size and bundled models) and the same or less at batch 1 (BENCHMARKS.md, sessions
        17 and 20). CPUs with AMX keep SDPA (the Intel Xeon's figures of sessions 13-16 were measured through it).
        float16 keeps SDPA everywhere, as transformers' Gemma 1 attends: the matmuls round the unscaled q.k to
        float16, which overflows (65,504) at scores SDPA takes in float32 and scales first; a query whose product
        overflowed there turned a whole answer into NaN (NumericsError) where transformers' is fine."""
        if self.decode_attention == "auto":
            return q.dtype == torch.float16 or not (q.device.type == "cpu" and not CPU_HAS_AMX)
        return self.decode_attention == "sdpa"

    def _full_heads(self, k, v):
        """keys, values [B, K, S, D] -> [B, N, S, D], each KV head repeated for the G query heads that share it (a
        view without a copy when K = 1)."""
        b, _, s, d = k.shape
        g = self.n // self.kv
        return tuple(x[:, :, None].expand(b, self.kv, g, s, d).reshape(b, self.n, s, d) for x in (k, v))

    def _flex(self, q, k, v, mask):
        """One query per row [B, N, 1, D] as one FlexAttention kernel (compiled only): the key mask [B, 1, 1, S]
        and Gemma 2's soft-cap go in as a score modification (the score it gets is already scaled)."""
        from torch.nn.attention.flex_attention import flex_attention

        keep, cap = mask[:, 0, 0], self.softcap

        def score_mod(score, b, h, q_idx, kv_idx):
            if cap is not None:
                score = torch.tanh(score / cap) * cap
            return torch.where(keep[b, kv_idx], score, float("-inf"))

        return flex_attention(q, k, v, score_mod=score_mod, scale=self.scale, enable_gqa=self.n != self.kv)

    def _explicit_in_blocks(self, q, k, v, mask):
        """`_explicit` over blocks of query positions whose float32 scores [B, N, rows, S] take about
        SCORE_BLOCK_BYTES, at CPU inference (a prefill or a scoring pass; see `kernels.blocks_apply`); whole elsewhere.
        Each query's softmax is over its own row, so the blocks give the whole's numbers. Gemma 2's prefill builds
        several score-sized temporaries a layer; at 448 px (1,036 positions, 8 heads: 34 MB each) or batch 8 they
        leave the caches and, over 32 MB, come from fresh pages each time (see `kernels.in_row_blocks`). One layer on
        the AMD EPYC VM, 1,036 positions: 123 ms whole, 56 ms in blocks of 128; batch 8 of 268 positions: 41 ms whole,
        29-31 ms in blocks of 16-128 (BENCHMARKS.md, session 20)."""
        b, n, t, _ = q.shape
        per = max(16, SCORE_BLOCK_BYTES // (b * n * k.shape[2] * 4))
        if t <= per or not blocks_apply(q):
            return self._explicit(q, k, v, mask)
        return torch.cat([self._explicit(q[:, :, i:i + per], k, v, mask[:, :, i:i + per])
                          for i in range(0, t, per)], dim=2)

    def _explicit(self, q, k, v, mask):
        """Attention as two matmuls and a float32 softmax. Gemma 2 needs it (logits -> c * tanh(logits / c) before
        the mask); for one-token steps it is an option to SDPA (a compiler can fuse it with what surrounds it)."""
        b, _, t, d = q.shape
        g = self.n // self.kv
        # Textbook: k, v = self._full_heads(k, v); s = q @ k^T * scale [B, N, T, S]. Here, without repeating K, V:
        # the G query heads that share a KV head, and their T positions, as the rows of one product per KV head:
        # [B, K, G * T, D] @ [B, K, D, S]. (Broadcasting k over G instead would make products of T rows each,
        # which at T = 1 inductor's CPU lowering turns into a multiply-and-sum that recomputes q for every key.)
        q = q.reshape(b, self.kv, g * t, d)
        s = batched_product(q, k.transpose(-1, -2)).view(b, self.kv, g, t, -1) * self.scale  # [B, K, G, T, S]
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        s = s.masked_fill(~mask.unsqueeze(1), float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return batched_product(p.view(b, self.kv, g * t, -1), v).view(b, self.n, t, d)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)
        self.register_buffer("gate_up", None, persistent=False)  # [gate; up] in one matrix, after fusing
        self.register_buffer("gate_up_scale", None, persistent=False)  # its row scales, when int8

    def fuse_projections(self) -> None:
        """One matrix for the gate and up projections (see `Attention.fuse_projections`)."""
        self.gate_up, self.gate_up_scale = fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x):
        # The maths is the training line, down(act(gate(x)) * up(x)); inference fuses gate/up and multiplies in place
        if torch.is_grad_enabled():
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        if self.gate_up is not None:
            gate, up = product(x, self.gate_up, self.gate_up_scale).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate).mul_(up))  # at inference in place: one large temporary fewer


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_norm = RMSNorm(h, eps)
        self.attn = Attention(cfg, layer)
        self.pre_mlp_norm = RMSNorm(h, eps)
        self.mlp = MLP(cfg)
        # Gemma 2 normalises each branch's output too.
        self.post_attn_norm = RMSNorm(h, eps) if cfg.post_norms else nn.Identity()
        self.post_mlp_norm = RMSNorm(h, eps) if cfg.post_norms else nn.Identity()

    def forward(self, x, cos, sin, mask, cache_pos=None, last_only=False):
        h = self.attn(self.input_norm(x), cos, sin, mask, cache_pos, last_only)
        x = x[:, -1:] + self.post_attn_norm(h) if last_only else x + self.post_attn_norm(h)
        # x + post_norm(mlp(pre_norm(x))), in blocks of rows at CPU inference to bound the intermediates' memory
        return in_row_blocks(self._mlp_block, x, 2 * self.mlp.down_proj.in_features)

    def _mlp_block(self, x):
        return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))


class Gemma(nn.Module):
    """Token embedding, decoder layers, final norm and the LM head: the token embedding itself (tied, as in every
    PaliGemma Google released), or a matrix of its own (`lm_head`) when the config unties them."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) [context + 1, D], built on first use

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, D] for positions [B, T], looked up in a table over the whole context (computed in float32
        and cast once to the activations' dtype, as transformers casts them per call)."""
        if self._rope is None or self._rope[0].device != positions.device or self._rope[0].dtype != dtype:
            table = rope_table(self.cfg.max_position_embeddings + 1, self.cfg.head_dim, self.cfg.rope_theta,
                               positions.device)
            self._rope = (table[0].to(dtype), table[1].to(dtype))
        cos, sin = self._rope
        return cos[positions], sin[positions]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> [B, T, H], scaled by sqrt(H) rounded to the weights' dtype (45.25 in bf16 for H=2048).

        The scale is a host (CPU) scalar tensor, which a GPU kernel takes as an argument: a tensor made on the GPU
        from host data would wait for the GPU's queue to empty first (a stall at every decode step)."""
        dtype = self.norm.weight.dtype  # (the model's: an int8 embedding gives float32 rows, see model/quant.py)
        return self.embed_tokens(ids).to(dtype) * torch.tensor(self.cfg.hidden_size**0.5, dtype=dtype)

    def forward(self, x, positions, mask, sliding_mask=None, cache_pos=None, last_only=False) -> torch.Tensor:
        """x [B, T, H] embeddings; positions [B, T]; mask, sliding_mask [B, 1, T, S] -> normed hidden [B, T, H].

        `last_only` (prefill): the last layer computes its attention output and MLP for the last position only,
        after writing every position's keys and values to the cache; returns [B, 1, H].
        """
        cos, sin = self.rope(positions, x.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            m = sliding_mask if (layer.attn.sliding and sliding_mask is not None) else mask
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, m, cache_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, m, cache_pos, last_only and i == last)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, H] -> [B, T, V] through the LM head, soft-capped when the config sets `final_softcap` (Gemma 2)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        out = product(h, head.weight, scale_of(head))
        if self.cfg.final_softcap is not None:
            out = torch.tanh(out / self.cfg.final_softcap) * self.cfg.final_softcap
        return out

    def fuse_projections(self) -> None:
        """Fused q/k/v and gate/up weights for inference in every layer (see `Attention.fuse_projections`)."""
        for layer in self.layers:
            layer.attn.fuse_projections()
            layer.mlp.fuse_projections()

    def set_decode_attention(self, kind: str) -> None:
        """How one-token steps attend over the cache: "auto" (the default: "sdpa", except "matmul" on CPUs without
        AMX, see `Attention._sdpa_for_one_token`), "sdpa" (Gemma 2 always uses matmuls, for its
        soft-capped logits), "matmul" (two matmuls and a softmax, which a compiler may fuse further) or "flex"
        (FlexAttention with the mask and soft-cap as a score modification, in a compiled step; matmuls in eager)."""
        if kind not in ("auto", "sdpa", "matmul", "flex"):
            raise ValueError(f"decode attention must be 'auto', 'sdpa', 'matmul' or 'flex', not {kind!r}")
        for layer in self.layers:
            layer.attn.decode_attention = kind

    def setup_caches(self, batch: int, max_len: int, dtype=None, device=None) -> None:
        w = self.norm.weight  # (the model's dtype and device; the embedding may be int8)
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(
                batch, self.cfg.num_kv_heads, max_len, self.cfg.head_dim, dtype or w.dtype, device or w.device
            )

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attn.kv_cache = None
