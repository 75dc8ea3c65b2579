"""Int8 weight-only quantization of the language model: `palitorch.load(..., quantize="int8")`.

Every weight matrix of the Gemma decoder (the attention and MLP projections, and the token embedding, which is also
the LM head) is stored as int8 values Q [out, in] and one scale per output row s [out]:

    W ~= Q * s[:, None],   s = max(|W_row|) / 127 (rounded to a bfloat16 value),   Q = round(W / s) in [-127, 127]

(symmetric, per output channel, round to nearest: gpt-fast's and torchao's int8 weight-only scheme). A weight then
takes 1 byte per value instead of 2 (bfloat16) or 4 (float32), and a decode step, which reads every weight once
and is bound by memory bandwidth, reads a quarter or half as many bytes. The SigLIP vision tower and the projector
keep their dtype: they run once per image, bound by arithmetic rather than by reading weights.

Products (`int8_linear`) compute x @ (Q * s).T + b, the product with the dequantized weight:
- on CPU, products of a few rows (a decode step's, up to `NATIVE_MAX_ROWS`) go through palitorch's own kernel
  (palitorch/native: it reads Q as int8, widens each value to float32 as it is read and sums in float32), then
  are multiplied by s: the float32 product with the dequantized weight, up to summation order, reading a quarter
  of float32's bytes. 8192 x 2048 at 1 / 4 / 8 / 16 rows: 0.31 / 0.68 / 1.73 / 4.6 ms, against 1.14 / 1.72 / 2.73 /
  6.5 for the float32 weight through palitorch's float route, and 0.44 / 0.90 / 2.32 / 4.8 through torch's int8
  kernel (the 2-core AMD EPYC of BENCHMARKS.md, session 32);
- where that kernel is not built (or is switched off: `use_native(False)`), and from there up to `PACK_MAX_ROWS`
  rows, torch's int8 kernel (`torch._weight_int8pack_mm`), which takes bfloat16 rows: x is rounded to bfloat16
  for the product and the result comes back rounded to bfloat16 (then cast to x's dtype), ~0.4% of a value;
- everywhere else (many rows, as a prefill's; other devices): `linear(x, Q.to(x.dtype)) * s`, which is exact in
  x's dtype. On CPU the weight is converted a block of `DEQUANT_BLOCK_ELEMENTS` at a time: a whole converted
  weight is a fresh allocation of tens or hundreds of MB per call, which glibc maps anew and which costs more to
  fault in than the product (converting an 8192 x 2048 weight: 26-30 ms into new memory, 3.6 ms into reused
  memory, on the 2-core AMD EPYC of BENCHMARKS.md; 256 rows then take 48 ms, float32 weights 42). On a GPU
  this is gpt-fast's form, whose conversion `torch.compile` may fuse into the product; eager, each weight is
  converted per call (memory is saved, time is not). GPU speed has not been measured (BENCHMARKS.md, session 32).

The scale is rounded to a bfloat16 value before Q is computed from it, so that the bfloat16 scales torch's CPU
kernel takes are the scales themselves, not an approximation of them.

`dequantized` gives the float weight a quantized layer computes with: the reference that tests compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from palitorch.model.kernels import linear

SCHEMES = ("int8",)
NATIVE_MAX_ROWS = 16  # CPU products of at most this many rows take palitorch's kernel (where it is built and agrees)
PACK_MAX_ROWS = 32  # then up to this many, torch's int8 kernel (beyond, both lose to the dequantized blocks)
PACK_K_MULTIPLE = 16  # that kernel reads rows in 16-value vectors: other input widths take the dequantized route
PACK_ALIGN = 64  # and loads them with aligned instructions: rows must start on 32-byte (bf16) / 16-byte (int8) bounds
DEQUANT_BLOCK_ELEMENTS = 1 << 21  # CPU products of many rows convert this many weights at a time (8 MB of float32:
# from kernels.ONEDNN_MIN_ELEMENTS, so the block takes oneDNN's route where it is faster, and small enough for malloc
# to reuse rather than map afresh; 2 MB blocks took MKL's slower route here, 32 MB ones faulted their pages in)
QUANTIZE_ROWS = 4096  # `quantize_rows` converts this many rows at a time (bounds its float32 temporaries)


_native: dict = {"enabled": True, "works": None}  # palitorch's kernel for int8 products: switched on, self-checked


def use_native(enabled: bool = True) -> None:
    """Let CPU int8 products of a few rows take palitorch's kernel (the default), or not (torch's int8 kernel)."""
    _native["enabled"] = enabled


def native_works() -> bool:
    """Once per process: is palitorch's kernel built and loaded here (palitorch.native, compiled on first use), and
    do its int8 products agree with the dequantized weight's (1 to 13 rows, a length that is no multiple of the
    vector width, float32 and bfloat16 rows) within float32 rounding? `prepare` asks before a model runs, so that
    a forward (a compiled one, too) only reads the verdict."""
    if _native["works"] is None:
        from palitorch import native

        ok = False
        if native.load():
            g = torch.Generator().manual_seed(0)
            q, s = quantize_rows(torch.randn(83, 72, generator=g))
            x = torch.randn(13, 72, generator=g)
            want = x.double() @ dequantized(q, s, torch.float64).T
            with torch.no_grad():
                ok = all(torch.allclose(torch.ops.palitorch.skinny_linear(a[:m], q).double() * s.double(),
                                        want[:m], rtol=tol, atol=tol)
                         for m in range(1, 14) for a, tol in ((x, 1e-5), (x.bfloat16().float(), 5e-2)))
        _native["works"] = ok
    return bool(_native["works"])


def prepare(lm: nn.Module | None = None) -> None:
    """Run now the one-time check that the CPU route of int8 products depends on (`native_works`); given a decoder
    `lm`, only if it is quantized (a Pipeline calls this with its model's)."""
    if lm is None or quantization_of(lm):
        native_works()


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [out, in] (floating point) -> (Q int8 [out, in], s bfloat16 [out]) with w ~= Q * s[:, None], |w - Q s| <=
    s / 2 + (rounding of s) per value. A row of zeros gets Q = 0 (and a tiny scale); non-finite weights raise
    ValueError (their int8 value would be undefined)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_rows takes a 2-D floating-point weight, not {w.dim()}-D {w.dtype}")
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    s = torch.empty(w.shape[0], dtype=torch.bfloat16, device=w.device)
    with torch.no_grad():
        for start in range(0, w.shape[0], QUANTIZE_ROWS):
            part = w[start:start + QUANTIZE_ROWS].to(torch.float32, copy=True)  # (a copy: w stays as it is)
            lo, hi = torch.aminmax(part, dim=1)  # (one pass, no |w| temporary: 1.5x faster than abs().amax() here)
            scale = (torch.maximum(-lo, hi) / 127).clamp_min(1e-30).to(torch.bfloat16)
            if not torch.isfinite(scale).all():
                raise ValueError("the weight holds values that are not finite (inf or nan): it cannot be quantized")
            q[start:start + QUANTIZE_ROWS] = part.div_(scale.float()[:, None]).round_().clamp_(-127, 127)
            s[start:start + QUANTIZE_ROWS] = scale
    return q, s


def dequantized(q: Tensor, scale: Tensor, dtype=torch.float32) -> Tensor:
    """Q * s[:, None] in `dtype`: the float weight that a quantized layer's products compute with."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def _aligned(t: Tensor) -> bool:
    return t.data_ptr() % PACK_ALIGN == 0


def _native_route(x: Tensor, q: Tensor, rows: int) -> bool:
    """Whether palitorch's kernel takes this product: few rows of float32 or bfloat16, no autograd (it has no
    backward), a contiguous weight, and the kernel built here and checked (`native_works`, run by `prepare`)."""
    return (rows <= NATIVE_MAX_ROWS and _native["enabled"] and bool(_native["works"]) and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled() and q.is_contiguous())


def _packed_route(x: Tensor, q: Tensor, rows: int) -> bool:
    """Whether torch's CPU int8 kernel takes this product: few rows, an input width it reads whole, no autograd
    (it has no backward), and (outside a compiled graph, whose buffers inductor aligns) a weight that starts on a
    vector boundary: the kernel does not check, and an unaligned load would crash the process."""
    return (x.device.type == "cpu" and rows <= PACK_MAX_ROWS and q.shape[1] % PACK_K_MULTIPLE == 0
            and not torch.is_grad_enabled() and (torch.compiler.is_compiling() or _aligned(q)))


def int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., in] @ (Q * s[:, None]).T + bias -> [..., out] in x's dtype (see the module docstring for the three
    routes and their rounding)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if _native_route(x, q, rows):
        y = (torch.ops.palitorch.skinny_linear(x, q) * scale.float()).to(x.dtype)
    elif _packed_route(x, q, rows):
        a = x.reshape(rows, x.shape[-1]).to(torch.bfloat16).contiguous()
        if not torch.compiler.is_compiling() and not _aligned(a):
            a = a.clone()  # (a view into a larger bfloat16 tensor: the kernel loads rows with aligned instructions)
        y = torch._weight_int8pack_mm(a, q, scale.to(torch.bfloat16)).view(*x.shape[:-1], q.shape[0]).to(x.dtype)
    else:
        y = _dequantized_product(x, q, scale)
    return y if bias is None else y + bias


def _dequantized_product(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x @ (Q * s).T as (x @ Q.T) * s in x's dtype; at CPU inference a block of Q's rows at a time (see the module
    docstring)."""
    n, per = q.shape[0], max(1, DEQUANT_BLOCK_ELEMENTS // max(1, q.shape[1]))
    if per >= n or x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    out = x.new_empty(*x.shape[:-1], n)
    for start in range(0, n, per):
        block = slice(start, start + per)
        torch.mul(linear(x, q[block].to(x.dtype)), scale[block].to(x.dtype), out=out[..., block])
    return out


def product(x: Tensor, w: Tensor, scale: Tensor | None = None) -> Tensor:
    """x @ w.T for a float weight (through `kernels.linear`), or for an int8 one with its row scales."""
    return linear(x, w) if scale is None else int8_linear(x, w, scale)


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight [out, in] and bfloat16 row scales (`weight`, `weight_scale` buffers: not
    trained) and an optional float bias."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, m: nn.Linear, device=None) -> Int8Linear:
        bias = None if m.bias is None else m.bias.detach().to(device)
        return cls(*quantize_rows(m.weight.detach().to(device)), bias)

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """An embedding table of int8 rows and bfloat16 row scales (the same rows are the tied LM head's). Looking ids
    up gives float32 rows Q[id] * s[id], exact; the model casts them to its dtype."""

    def __init__(self, q: Tensor, scale: Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)

    @classmethod
    def from_embedding(cls, m: nn.Embedding, device=None) -> Int8Embedding:
        return cls(*quantize_rows(m.weight.detach().to(device)))

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight[ids].float() * self.weight_scale[ids].float().unsqueeze(-1)  # (indexing: any device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def scale_of(m: nn.Module) -> Tensor | None:
    """A layer's row scales when its weight is int8 (Int8Linear, Int8Embedding), else None."""
    return getattr(m, "weight_scale", None)


def quantize_(lm: nn.Module, scheme: str = "int8", device=None) -> nn.Module:
    """Quantize a Gemma decoder in place (see the module docstring): its layers' projections, its token embedding
    and its LM head when untied. Each float weight is freed as its int8 copy replaces it, so the model's memory
    falls as it goes. `device`: quantize each weight there and leave its int8 copy there (`palitorch.load` loads a
    model to be quantized on the CPU and quantizes it onto its device, which then never holds the float decoder);
    the decoder's other tensors (norms) stay where they are. Do it before `fuse_projections` (a Pipeline's
    `compile`), which then fuses the int8 weights and their scales. Returns `lm`."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}: palitorch offers {', '.join(SCHEMES)}")
    if any(layer.attn.qkv is not None or layer.mlp.gate_up is not None for layer in lm.layers):
        raise ValueError("quantize the model before fusing its projections (before Pipeline.compile)")
    for layer in lm.layers:
        for parent, names in ((layer.attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                if not isinstance(getattr(parent, name), Int8Linear):
                    setattr(parent, name, Int8Linear.from_linear(getattr(parent, name), device))
    if not isinstance(lm.embed_tokens, Int8Embedding):
        lm.embed_tokens = Int8Embedding.from_embedding(lm.embed_tokens, device)
    if lm.lm_head is not None and not isinstance(lm.lm_head, Int8Linear):
        lm.lm_head = Int8Linear.from_linear(lm.lm_head, device)
    return lm


def quantize_model_(model: nn.Module, scheme: str, device) -> nn.Module:
    """A PaliGemma read on the CPU -> its decoder quantized onto `device` one weight at a time (`quantize_`: the
    device never holds the float decoder), then the rest moved there. On the CPU the parameters that stay float
    (vision tower, norms) are copied first: left as views of a checkpoint's mapped files, they would keep the pages
    that quantizing read counted in the process (PaliGemma 1 3B in bfloat16: 7.8 GB resident after loading, 3.7 GB
    with the copies). Returns `model`."""
    quantize_(model.language_model, scheme, device)
    for t in model.parameters() if torch.device(device).type == "cpu" else ():
        t.data = t.data.clone()
    return model.to(device)


def quantization_of(lm: nn.Module) -> str | None:
    """"int8" when the decoder's weights are quantized (`quantize_`), else None."""
    return "int8" if isinstance(lm.embed_tokens, Int8Embedding) else None
