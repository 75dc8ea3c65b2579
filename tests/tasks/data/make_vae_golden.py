"""Writes vae_big_vision_golden.npz: masks from big_vision's own decoder (JAX / Flax) for test_segmentation.py.

big_vision decodes PaliGemma's 16 `<seg>` codes with a Flax module and converts vae-oid.npz's PyTorch weights
for it (big_vision/evaluators/proj/paligemma/transfers/segmentation.py: `_get_params`, `Decoder`). This script
rebuilds that module and conversion, runs it on the deterministic weights of `vae_weights` (the real shapes,
embedding dim 512) and saves the codes and the decoded 64 x 64 logits. palitorch's PyTorch decoder must give the
same numbers: the check that its transposed convolutions, padding and code layout are big_vision's.

Needs jax and flax, which palitorch does not (written with jax 0.10.2, flax 0.12.8); the test imports only the
weights and codes from here (numpy):
    pip install "jax[cpu]" flax && python tests/tasks/data/make_vae_golden.py
"""

from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
# vae-oid.npz's tensors (a PyTorch state dict: convs [out, in, kh, kw], transposed convs [in, out, kh, kw])
SHAPES = {"_vq_vae._embedding": (128, 512), "decoder.0.weight": (128, 512, 1, 1), "decoder.0.bias": (128,),
          **{f"decoder.{b}.net.{i}.{w}": ((128, 128, k, k) if w == "weight" else (128,))
             for b in (2, 3) for i, k in ((0, 3), (2, 3), (4, 1)) for w in ("weight", "bias")},
          **{f"decoder.{n}.{w}": ((a, o, 4, 4) if w == "weight" else (o,))
             for n, a, o in ((4, 128, 128), (6, 128, 64), (8, 64, 32), (10, 32, 16)) for w in ("weight", "bias")},
          "decoder.12.weight": (1, 16, 1, 1), "decoder.12.bias": (1,)}


def hashed(shape, salt: int, scale: float) -> np.ndarray:
    """Uniform in [-scale, scale), from integer arithmetic only: the same weights on every machine and numpy."""
    i = np.arange(int(np.prod(shape)), dtype=np.uint64) + np.uint64(salt) * np.uint64(1000003)
    h = (i * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(2**32)
    h = (h ^ (h >> np.uint64(13))) * np.uint64(2246822519) % np.uint64(2**32)
    return ((h.astype(np.float64) / 2**32 - 0.5) * 2 * scale).astype(np.float32).reshape(shape)


def vae_weights() -> dict:
    """Weights of vae-oid.npz's names and shapes, at He-uniform-like scales."""
    out = {}
    for salt, (name, shape) in enumerate(sorted(SHAPES.items())):
        if name == "_vq_vae._embedding":
            scale = 1.0
        elif len(shape) == 1:
            scale = 0.1
        elif shape[-1] == 4:  # a transposed conv [in, out, 4, 4] at stride 2: in x 4 inputs per output
            scale = np.sqrt(6 / (shape[0] * 4))
        else:
            scale = np.sqrt(6 / int(np.prod(shape[1:])))
        out[name] = hashed(shape, salt, scale)
    return out


def codes() -> np.ndarray:
    c = np.array([[(7 * i + 3 * j) % 128 for i in range(16)] for j in (1, 2)], dtype=np.int64)
    c[1, :8], c[1, 8:] = 127, 0  # the codebook's two ends
    return c


def flax_params(ck: dict) -> dict:
    """big_vision's conversion: PyTorch [out, in, kh, kw] (transposed convs [in, out, kh, kw]) -> [kh, kw, ., .]."""
    def conv(name):
        return {"bias": ck[name + ".bias"], "kernel": np.transpose(ck[name + ".weight"], (2, 3, 1, 0))}

    def res(name):
        return {"Conv_0": conv(name + ".0"), "Conv_1": conv(name + ".2"), "Conv_2": conv(name + ".4")}

    return {"Conv_0": conv("decoder.0"), "ResBlock_0": res("decoder.2.net"), "ResBlock_1": res("decoder.3.net"),
            **{f"ConvTranspose_{i}": conv(f"decoder.{4 + 2 * i}") for i in range(4)}, "Conv_1": conv("decoder.12")}


def flax_decode(ck: dict, c: np.ndarray) -> np.ndarray:
    """big_vision's decoder, codes [B, 16] -> logits [B, 64, 64]."""
    import flax.linen as nn
    import jax.numpy as jnp

    class ResBlock(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            y = nn.relu(nn.Conv(self.features, (3, 3), padding=1)(x))
            y = nn.relu(nn.Conv(self.features, (3, 3), padding=1)(y))
            return x + nn.Conv(self.features, (1, 1), padding=0)(y)

    class Decoder(nn.Module):
        @nn.compact
        def __call__(self, x):  # [B, 4, 4, D] -> [B, 64, 64, 1]
            dim = 128
            x = nn.relu(nn.Conv(dim, (1, 1), padding=0)(x))
            for _ in range(2):
                x = ResBlock(dim)(x)
            for _ in range(4):
                x = nn.relu(nn.ConvTranspose(dim, (4, 4), strides=(2, 2), padding=2, transpose_kernel=True)(x))
                dim //= 2
            return nn.Conv(1, (1, 1), padding=0)(x)

    grid = jnp.take(ck["_vq_vae._embedding"], c.reshape(-1), axis=0).reshape(len(c), 4, 4, -1)
    return np.asarray(Decoder().apply({"params": flax_params(ck)}, grid))[..., 0]


def main() -> None:
    c = codes()
    masks = flax_decode(vae_weights(), c)
    np.savez_compressed(HERE / "vae_big_vision_golden.npz", codes=c, masks=masks.astype(np.float32))
    print(f"wrote {HERE / 'vae_big_vision_golden.npz'}: masks {masks.shape}, mean |logit| {np.abs(masks).mean():.3f}")


if __name__ == "__main__":
    main()
