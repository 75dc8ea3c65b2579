"""`palitorch data DATASET --out DIR`: turn a dataset into training JSONL (today: `easyvqa`)."""

from __future__ import annotations

import argparse
import sys

from palitorch.cli.common import one_line_errors
from palitorch.errors import InputError

EPILOG = """\
examples:
  palitorch data easyvqa --out data/easyvqa                  # train.jsonl, test.jsonl, images/, summary.json
  palitorch data easyvqa --out data/easyvqa --extra 4000     # + 4,000 generated training images
  palitorch data easyvqa --out /tmp/evqa --limit 20          # the first 20 images of each split, for a quick look"""


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare training data (JSONL)",
                       description="Convert a dataset into palitorch training JSONL.")
    one_line_errors(p)
    datasets = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    e = datasets.add_parser(
        "easyvqa", help="the easy-VQA package (pip install easy-vqa): questions, captions, detection boxes",
        description="Write train.jsonl and test.jsonl (the official test split, untouched) from the easy-vqa "
        "package: `answer en <question>`, `caption en` -> `<colour> <shape>` and `detect <shape>` -> 4 <loc> tokens "
        "+ label. Image paths are relative to the JSONL's folder.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    one_line_errors(e)
    e.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files in it are replaced)")
    e.add_argument("--limit", type=int, metavar="N", help="only the first N images of each split (quick tests)")
    e.add_argument("--extra", type=int, default=0, metavar="N",
                   help="also generate N training images in the easy-VQA style (default 0)")
    e.add_argument("--no-copy", dest="copy", action="store_false",
                   help="point at the installed package's images by absolute path instead of copying them into DIR")
    e.add_argument("--seed", type=int, default=0, help="seed for the generated images and their questions")
    e.add_argument("--balanced-yesno", dest="balanced", action="store_true",
                   help="add 8 yes/no questions per training image whose answers the text cannot predict "
                        "(half yes for colour and shape, plain and negated)")
    e.set_defaults(func=run_easyvqa)


def run_easyvqa(args) -> int:
    from palitorch.train.easyvqa import convert
    from palitorch.train.runfolder import check_can_create, check_out_folder

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    if args.extra < 0:
        raise InputError(f"--extra must be 0 or more, got {args.extra}")
    check_out_folder(args.out, "--out")
    check_can_create(args.out, "--out")
    summary = convert(args.out, limit=args.limit, extra=args.extra, seed=args.seed, copy_images=args.copy,
                      progress=True, balanced=args.balanced)
    print(summary.text())
    print(f"wrote {args.out}/train.jsonl, {args.out}/test.jsonl and {args.out}/summary.json")
    if summary.conflicts:  # the files are written, but a label the pixels and the answers disagree on needs a look
        print(f"palitorch data: {len(summary.conflicts)} label conflicts, listed in {args.out}/summary.json",
              file=sys.stderr)
        return 1
    return 0
