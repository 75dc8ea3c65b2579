"""Where a detector's boxes go wrong: per shape and per box edge, on the easy-VQA test detection prompts.

    python benchmarks/detect_errors.py [--model DIR] [--data data/easyvqa/test.jsonl] [--limit N]

Greedy answers for every `detect ...` line; prints, per shape, the mean IoU (0 when no box comes out), the share
without a usable box, and the mean absolute error of each edge in pixels (y0 x0 y1 x1, on boxes that parsed) and
how often it is exact to the loc grid's pixel.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import palitorch  # noqa: E402
from palitorch.tasks import parse_detections  # noqa: E402
from palitorch.train.evaluate import iou  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default="data/easyvqa/test.jsonl")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    pipe = palitorch.load(args.model)
    root = Path(args.data).parent
    rows = [r for r in map(json.loads, open(args.data)) if r["prefix"].startswith("detect ")][: args.limit]
    size = 64
    stats = defaultdict(lambda: {"iou": [], "err": [], "fail": 0})
    for i in range(0, len(rows), args.batch):
        chunk = rows[i:i + args.batch]
        images = [Image.open(root / r["image"]).convert("RGB") for r in chunk]
        size = images[0].width
        results = pipe.generate(images, [r["prefix"] for r in chunk], max_new_tokens=12)
        for r, res in zip(chunk, results):
            shape = r["suffix"].split(">")[-1].strip()
            target = parse_detections(r["suffix"], size, size)[0]
            got = parse_detections(res.text, size, size)
            s = stats[shape]
            if not got or got[0].label != target.label:
                s["fail"] += 1
                s["iou"].append(0.0)
                continue
            a, b = got[0].box, target.box  # (x0, y0, x1, y1) in pixels
            s["iou"].append(iou(a, b))
            s["err"].append([a[1] - b[1], a[0] - b[0], a[3] - b[3], a[2] - b[2]])  # y0 x0 y1 x1
    print(f"{'shape':<10}{'n':>5}{'mean IoU':>10}{'no box':>8}   mean |error| px y0 x0 y1 x1   exact y0 x0 y1 x1")
    for shape, s in sorted(stats.items()):
        err = np.abs(np.array(s["err"])) if s["err"] else np.zeros((1, 4))
        exact = (err < 0.5).mean(0)
        print(f"{shape:<10}{len(s['iou']):>5}{np.mean(s['iou']):>10.3f}{s['fail']:>8}   "
              + " ".join(f"{v:5.2f}" for v in err.mean(0)) + "   " + " ".join(f"{v:4.0%}" for v in exact))
    allv = [v for s in stats.values() for v in s["iou"]]
    print(f"{'all':<10}{len(allv):>5}{np.mean(allv):>10.3f}{sum(s['fail'] for s in stats.values()):>8}")


if __name__ == "__main__":
    main()
