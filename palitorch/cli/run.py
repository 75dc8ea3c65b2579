"""`palitorch run`: answer one prompt about an image (or several); plain text, streamed text, or one JSON object.

    palitorch run --model DIR --image cat.jpg --prompt "caption en"
    palitorch run --model DIR --image cat.jpg --prompt "detect cat" --json --draw boxes.png
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

from PIL import Image

from palitorch.cli.common import (
    add_decoding_options,
    add_model_options,
    check_model_options,
    decoding_options,
    load_pipeline,
    not_a_folder,
    one_line_errors,
    result_fields,
)
from palitorch.errors import InputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="answer one prompt about an image",
        description="Answer one prompt about an image (or several: --image again). PaliGemma prompts: "
                    "'caption en', 'answer en QUESTION', "
                    "'detect cat ; dog', 'segment cat', 'ocr'.",
    )
    one_line_errors(p)
    p.add_argument("--image", required=True, metavar="PATH", action="append",
                   help="the image file; given again, the prompt's further images, in order (a prompt about "
                        "several images, for checkpoints transferred to such tasks, e.g. NLVR2's pairs)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt (prefix), e.g. 'caption en'")
    out = p.add_argument_group("output").add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print the answer piece by piece as it is generated")
    out.add_argument("--json", action="store_true",
                     help="print one JSON object: text, token_ids, logprobs, finish_reason, prompt_tokens "
                          "(and detections/segmentations for detect/segment prompts, top_logprobs with "
                          "--top-logprobs K, beams, best first, with --num-beams B)")
    p.add_argument("--draw", metavar="OUT.png",
                   help="write the image with the boxes and labels found in the answer (detect/segment prompts)")
    p.add_argument("--vae", metavar="vae-oid.npz",
                   help="big_vision's segmentation VQ-VAE weights: --draw then also paints segment masks")
    add_model_options(p)
    add_decoding_options(p)
    p.set_defaults(func=run)


def check_output_image(path: str) -> Path:
    """--draw's target must be writable as an image: a suffix PIL can write an RGB image as, in an existing folder
    we may write in, and not a folder itself. Checked before the model loads, not after the answer."""
    out = Path(path)
    if out.is_dir():  # (first: a folder's name has no image suffix, which is not what is wrong with it)
        raise InputError(f"--draw {path} is a folder: give a file name")
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None:
        raise InputError(f"--draw {path}: unknown image format {out.suffix!r}; use a .png or .jpg name")
    try:  # PIL reads more formats than it writes (.psd), and some it writes take no RGB image (.xbm)
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except (KeyError, OSError, ValueError):
        raise InputError(f"--draw {path}: cannot write {fmt} images; use a .png or .jpg name") from None
    if not out.parent.is_dir():
        raise InputError(f"--draw {path}: {not_a_folder(out.parent)}")
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise InputError(f"--draw {path}: permission denied: choose a file in a folder you can write to")
    return out


def draw(image: Image.Image, text: str, out: Path, vae: dict | None = None) -> None:
    from palitorch.tasks import decode_mask, draw_detections, parse_detections, parse_segmentations

    found, masks = parse_detections(text, image.width, image.height), None
    if vae is not None:  # the same objects, with a mask for each that has its 16 codes
        found = parse_segmentations(text, image.width, image.height)
        masks = [None if s.codes is None else decode_mask(s.codes, s.box, vae, image.size) for s in found]
    try:
        draw_detections(image, found, masks).save(out)
    except OSError as e:
        raise InputError(f"cannot write {out}: {e}") from None
    if not found:  # (said once it is true)
        print(f"palitorch run: no boxes in the answer; {out} is the image unchanged", file=sys.stderr)


def alternatives_table(result, tokenizer) -> str:
    """--top-logprobs without --json: a line per generated token, its logprob and its step's alternatives."""

    from palitorch.inference.processor import token_text

    def shown(token: int) -> str:
        return json.dumps(token_text(tokenizer, token), ensure_ascii=False)

    rows = [(shown(t), f"{lp:8.3f}", "  ".join(f"{shown(i)} {v:.3f}" for i, v in alts))
            for t, lp, alts in zip(result.token_ids, result.logprobs, result.top_logprobs)]
    width = max([len("token")] + [len(r[0]) for r in rows])
    lines = [f"{'token':<{width}}  {'logprob':>8}  most likely tokens at that step"]
    return "\n".join(lines + [f"{a:<{width}}  {b}  {c}" for a, b, c in rows])


def run(args: argparse.Namespace) -> int:
    from palitorch.inference import load_image
    from palitorch.inference.processor import MAX_IMAGES

    # Everything the user can get wrong is checked before the (slow) model load.
    if len(args.image) > MAX_IMAGES:  # as batch lines, server requests and training data
        raise InputError(f"--image is given {len(args.image)} times; a prompt takes at most {MAX_IMAGES} images "
                         "(their tokens share the model's context)")
    opts = decoding_options(args, one_request=True)
    if args.stream and opts.get("num_beams", 1) > 1:
        raise InputError("--stream shows one sequence as it grows; beam search (--num-beams > 1) cannot stream")
    device, dtype = check_model_options(args)
    for flag, value in (("--draw", args.draw), ("--vae", args.vae)):  # ("$OUT" unset: was taken for no option)
        if value == "":
            raise InputError(f"{flag} is empty: give a file name, or leave {flag} out")
    images = [load_image(path) for path in args.image]
    image = images[0] if len(images) == 1 else images
    out = check_output_image(args.draw) if args.draw else None
    if out is not None and len(images) > 1:
        raise InputError("--draw draws the boxes on the one image they are in: give one --image, or leave --draw "
                         "out")
    if out is not None and out.resolve() == Path(args.image[0]).resolve():
        raise InputError("--draw must not be the input image (it would be overwritten): give another file name")
    vae = None
    if args.vae:
        from palitorch.tasks import load_vae_params

        if out is None:
            raise InputError("--vae paints masks on the --draw image: give --draw OUT.png too")
        vae = load_vae_params(args.vae)

    pipe = load_pipeline(args, device, dtype)
    if args.stream:
        stream = pipe.stream(image, args.prompt, **opts)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        result = stream.result
    else:
        result = pipe.generate([image], [args.prompt], **opts)[0]  # (a list of images is one row's: in a list)
        if args.json:
            size = image.size if len(images) == 1 else None  # (several images: no one image holds the boxes)
            print(json.dumps(result_fields(result, args.prompt, size, pipe.processor.tokenizer),
                             ensure_ascii=False))
        else:
            print(result.text)
    if result.top_logprobs is not None and not args.json:
        print(alternatives_table(result, pipe.processor.tokenizer))
    if out is not None:
        draw(image, result.text, out, vae)
    return 0
