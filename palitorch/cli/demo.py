"""`palitorch demo`: the bundled model on the easy-VQA test images that ship with palitorch.

For each image it answers the shipped question, writes a caption, and detects the shape, printing the expected
answers beside the model's (a box is right with the right label at IoU >= 0.5 with the true box, the usual
detection criterion); the detections are drawn into OUT/ (default: ./demo-output).
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
    from palitorch.train.evaluate import box_score

    examples = json.loads((ASSETS_DIR / "demo.json").read_text())["examples"]
    device, dtype = check_model_options(args)
    if args.out == "":  # (Path("") is the current folder)
        raise InputError("--out is empty: name the folder for the drawn detections, or leave --out out")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, ...
        raise InputError(f"--out {args.out}: cannot make that folder ({e.strerror}); choose another") from None
    pipe = load_pipeline(args, device, dtype)
    images = [load_image(ASSETS_DIR / e["image"]) for e in examples]
    tasks = (("answer en " + e["question"], e["answer"]) for e in examples), \
        (("caption en", e["caption"]) for e in examples), ((e["detect"], e["detection"]) for e in examples)
    rows, right, ious = [], {"answer": 0, "caption": 0, "detect": 0}, []
    for kind, pairs in zip(("answer", "caption", "detect"), tasks):
        prompts, expected = zip(*pairs)
        results = pipe.generate(images, list(prompts), max_new_tokens=16)
        for e, img, prompt, want, r in zip(examples, images, prompts, expected, results):
            if kind == "detect":
                found = parse_detections(r.text, *img.size)
                path = out / f"detect-{Path(e['image']).stem}.png"
                draw_detections(img.resize((256, 256)), parse_detections(r.text, 256, 256)).save(path)
                got = f"{r.text}  -> {[round(v) for v in found[0].box] if found else 'no box'}  ({path})"
                overlap, same_label = box_score(r.text, want)
                ious.append(overlap)
                ok = overlap >= 0.5 and same_label > 0
                verdict = f"IoU {overlap:.2f}" + ("" if same_label else ", wrong label" if found else ", no box")
            else:
                got = r.text.replace("\n", "\\n")
                ok = r.text.strip() == want
                verdict = "ok" if ok else "expected " + want
            rows.append(f"{e['image']:<22} {prompt:<45} {got}  [{verdict}]")
            right[kind] += ok
    n = len(examples)
    print("\n".join(rows))
    print(f"\nanswers {right['answer']}/{n} and captions {right['caption']}/{n} exactly as expected; boxes "
          f"{right['detect']}/{n} with the right label at IoU >= 0.5 (mean IoU {sum(ious) / n:.2f})\n"
          f"model: {pipe.path}")
    return 0
