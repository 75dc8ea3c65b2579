"""`palitorch demo`: the bundled model on the easy-VQA test images that ship with palitorch.

For each image it answers the shipped question, writes a caption, and detects the shape, printing the expected
answers beside the model's; the detections are drawn into OUT/ (default: ./demo-output).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from palitorch.cli.common import add_model_options, check_model_options, load_pipeline, one_line_errors
from palitorch.errors import InputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="answer, caption and detect on the bundled easy-VQA test images",
                              description=__doc__)
    one_line_errors(p)
    add_model_options(p)
    p.add_argument("--out", default="demo-output", metavar="DIR", help="folder for the drawn detections")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from palitorch.assets import ASSETS_DIR
    from palitorch.inference import load_image
    from palitorch.tasks import draw_detections, parse_detections

    examples = json.loads((ASSETS_DIR / "demo.json").read_text())["examples"]
    device, dtype = check_model_options(args)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, ...
        raise InputError(f"--out {args.out}: cannot make that folder ({e.strerror}); choose another") from None
    pipe = load_pipeline(args, device, dtype)
    images = [load_image(ASSETS_DIR / e["image"]) for e in examples]
    tasks = (("answer en " + e["question"], e["answer"]) for e in examples), \
        (("caption en", e["caption"]) for e in examples), ((e["detect"], e["detection"]) for e in examples)
    rows, right, total = [], 0, 0
    for kind, pairs in zip(("answer", "caption", "detect"), tasks):
        prompts, expected = zip(*pairs)
        results = pipe.generate(images, list(prompts), max_new_tokens=16)
        for e, img, prompt, want, r in zip(examples, images, prompts, expected, results):
            ok = r.text.strip() == want
            if kind == "detect":
                found = parse_detections(r.text, *img.size)
                path = out / f"detect-{Path(e['image']).stem}.png"
                draw_detections(img.resize((256, 256)), parse_detections(r.text, 256, 256)).save(path)
                got = f"{r.text}  -> {[round(v) for v in found[0].box] if found else 'no box'}  ({path})"
            else:
                got = r.text.replace("\n", "\\n")
            rows.append(f"{e['image']:<22} {prompt:<45} {got}  [{'ok' if ok else 'expected ' + want}]")
            right, total = right + ok, total + 1
    print("\n".join(rows))
    print(f"\n{right}/{total} exactly as expected (model: {pipe.path})")
    return 0
