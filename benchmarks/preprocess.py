"""Image preprocessing time: palitorch's batch path (resize on threads, normalise in torch) against the
numpy path it replaced (the float32 operations of transformers' processor, one image at a time), same outputs.

    python benchmarks/preprocess.py                 # 16 images of 640x480 to 224, 448 and 896 px, CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import palitorch  # noqa: E402


def numpy_pixels(proc, image) -> torch.Tensor:
    """The previous implementation: resize, then numpy float32 rescale and normalise, HWC -> CHW."""
    img = image.resize((proc.image_size, proc.image_size), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32) * np.float32(proc.rescale)
    x = (x - proc.mean) / proc.std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--source", default="640x480", help="WxH of the input images")
    ap.add_argument("--sizes", default="224,448,896")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    w, h = (int(v) for v in args.source.split("x"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(args.images)]
    pipe = palitorch.load()  # any pipeline: only its processor's resolution matters
    proc = pipe.processor
    print(f"{args.images} images of {args.source}, {torch.get_num_threads()} torch threads")
    for size in (int(s) for s in args.sizes.split(",")):
        proc.image_size = size
        before = torch.stack([numpy_pixels(proc, im) for im in images])
        if not torch.equal(before, pipe._pixels(images)[0]):
            raise SystemExit(f"{size} px: the two paths differ")
        old = median_ms(lambda: torch.stack([numpy_pixels(proc, im) for im in images]), args.reps)
        new = median_ms(lambda: pipe._pixels(images), args.reps)
        print(f"{size} px: numpy one by one {old:.1f} ms, palitorch {new:.1f} ms ({old / new:.2f}x), same values")


if __name__ == "__main__":
    main()
