"""`palitorch data DATASET ...`: turn a dataset into training JSONL (`easyvqa`; `vqav2` and `coco-captions` from
their official annotation files, with every reference answer for `palitorch eval --metrics`)."""

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

COCO_EPILOG = """examples:
  palitorch data vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json \\
      --annotations v2_mscoco_val2014_annotations.json --images val2014 --out vqav2-val.jsonl
  palitorch eval --model DIR --data vqav2-val.jsonl --metrics vqa --group-by answer_type
  palitorch data coco-captions --annotations captions_val2014.json --images val2014 --out coco-val.jsonl
  palitorch eval --model DIR --data coco-val.jsonl --metrics cider"""


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
    v = datasets.add_parser(
        "vqav2", help="VQAv2 from its questions and annotations JSON and a folder of COCO images",
        description="Write one JSONL line per answered question: `answer en <question>` -> the most common answer, "
        "with all ten in \"answers\" (for `palitorch eval --metrics vqa`), and question_id, answer_type, "
        "question_type. Image paths are relative to the JSONL's folder.",
        epilog=COCO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    one_line_errors(v)
    v.add_argument("--questions", required=True, metavar="Q.json", help="the questions file (v2_OpenEnded_...)")
    v.add_argument("--annotations", required=True, metavar="A.json", help="the annotations file (v2_mscoco_...)")
    c = datasets.add_parser(
        "coco-captions", help="COCO Captions from its annotations JSON and a folder of COCO images",
        description="Write one JSONL line per image: `caption en` -> its first caption, with all of them in "
        "\"answers\" (for `palitorch eval --metrics cider`), and image_id. Image paths are relative to the JSONL's "
        "folder.", epilog=COCO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    one_line_errors(c)
    c.add_argument("--annotations", required=True, metavar="A.json", help="the captions file (captions_val2014.json)")
    for q in (v, c):
        q.add_argument("--images", required=True, metavar="DIR", help="the folder of the split's COCO images")
        q.add_argument("--out", required=True, metavar="FILE.jsonl", help="the JSONL to write (replaced)")
        q.add_argument("--lang", default="en", help="the prompts' language code (default en)")
        q.add_argument("--limit", type=int, metavar="N", help="only the first N lines (quick tests)")
        q.add_argument("--skip-missing", action="store_true",
                       help="leave out the lines whose image is not in --images (default: an error)")
    v.set_defaults(func=run_coco, kind="vqav2")
    c.set_defaults(func=run_coco, kind="coco-captions")


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


def run_coco(args) -> int:
    from pathlib import Path

    from palitorch.train.coco import coco_caption_lines, vqav2_lines, write_jsonl

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    if not args.lang or any(ch.isspace() for ch in args.lang):
        raise InputError(f"--lang must be a language code such as en, got {args.lang!r}")
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", "\\")):
        raise InputError(f"--out {args.out} is a folder: give a file name such as {out / (args.kind + '.jsonl')}")
    if not out.parent.is_dir():
        raise InputError(f"--out {args.out}: its folder {out.parent} does not exist")
    common = dict(images=args.images, out=out, lang=args.lang, limit=args.limit, skip_missing=args.skip_missing)
    if args.kind == "vqav2":
        lines = vqav2_lines(args.questions, args.annotations, **common)
    else:
        lines = coco_caption_lines(args.annotations, **common)
    write_jsonl(lines, out)
    print(f"wrote {len(lines)} line{'s' * (len(lines) != 1)} to {out}")
    return 0
