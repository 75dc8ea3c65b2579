"""`palitorch eval`: how well a model answers held-out data, measured as the trainer measures it.

The data is the training layout, a JSONL of `{"image": path, "prefix": text, "suffix": text, ...}` (image paths
relative to the file, or a list of them for an example about several images, answered as `generate([[a, b]], ...)`
answers it; other fields such as `task` or `qtype` name groups). Each prefix is answered greedily and the
answer compared with the suffix, or with the line's "answers" list where it has one (`train/evaluate.py`): exact
match (whitespace runs counted as one space) or the `--metrics` PaliGemma's transfers are reported in (VQAv2
accuracy, ANLS, ChartQA's relaxed accuracy, CIDEr: `tasks/metrics.py`), overall and per value of each `--group-by`
field, and for suffixes that are boxes (`<loc>` x 4 + label) the mean IoU of the first predicted box and the share
with the label right and IoU >= 0.5 (examples about one image); with `--vae`, segmentation answers' masks too.

    palitorch eval --model DIR --data data/easyvqa/test.jsonl
    palitorch eval --data test.jsonl --max-examples 500 --json --predictions predictions.jsonl
    palitorch eval --model DIR --data vqav2-val.jsonl --metrics vqa      # lines with "answers": [ten answers]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

from palitorch.cli.common import add_model_options, check_model_options, load_pipeline, not_a_folder, one_line_errors
from palitorch.cli.results import open_output, output_target
from palitorch.errors import InputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="measure a model on held-out JSONL data (exact match, VQA accuracy, ANLS, CIDEr, ...; per "
                     "group, box IoU)",
        description="Answer every prefix of a JSONL file of {\"image\", \"prefix\", \"suffix\"} (the training "
                    "data's layout; \"image\" may list several images for one prompt) greedily and compare with "
                    "its suffix, or with its \"answers\" list where it has one: exact match (or --metrics) overall "
                    "and per group, and for box answers about one image the mean IoU and the share with the label "
                    "right and IoU >= 0.5.",
    )
    one_line_errors(p)
    p.add_argument("--data", required=True, metavar="TEST.jsonl", help="the held-out examples")
    p.add_argument("--max-examples", type=int, default=0, metavar="N",
                   help="a fixed random subset of N examples, in file order (default 0: all)")
    p.add_argument("--seed", type=int, default=0, help="which subset --max-examples takes (default 0)")
    p.add_argument("--metrics", default="exact", metavar="NAMES",
                   help="comma-separated: exact (default), vqa (VQAv2 accuracy), anls (DocVQA), relaxed (ChartQA), "
                        "cider (COCO captions); each answer is compared with its line's \"answers\" list where it "
                        "has one (VQAv2's ten human answers, several captions), else with its suffix")
    p.add_argument("--group-by", default="task,qtype", metavar="FIELDS",
                   help="comma-separated JSONL fields to report exact match per value of (default task,qtype; "
                        "fields no example has are left out)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="examples per forward pass (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="longest answer generated (default 32)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--predictions", metavar="OUT.jsonl",
                   help="also write each example with its prediction and whether it matched")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--vae", metavar="vae-oid.npz",
                   help="big_vision's VQ-VAE weights: segmentation answers (4 <loc> + 16 <seg> + label, about one "
                        "image) are also scored by their masks' IoU, mean and overall (RefCOCO's mIoU and oIoU)")
    p.add_argument("--given", metavar="FIELD",
                   help="score each line's FIELD as its answer instead of generating one (answers made elsewhere, or "
                        "an earlier --predictions file's \"prediction\", under other --metrics; suffix: the data's own "
                        "answers against its \"answers\" lists): no model is loaded")
    add_model_options(p)
    p.set_defaults(func=evaluate)


def evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from palitorch.inference import load_image
    from palitorch.inference.images import check_image_file
    from palitorch.train import ddp
    from palitorch.train.config import METRIC_NAMES, metric_error
    from palitorch.train.data import read_jsonl
    from palitorch.train.evaluate import answer_tokens, cut_answers, exact_match, subset

    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_examples < 0:
        raise InputError(f"--max-examples must be >= 0 (0: all), got {args.max_examples}")
    if args.predictions == "":  # ("$OUT" unset: was taken for no option)
        raise InputError("--predictions is empty: give a file name (- for standard output), or leave it out")
    # As batch's --output: a link to a file updates the file; a device, a pipe or /dev/stdout is written as a stream
    out, streamed = output_target(args.predictions) if args.predictions else (None, False)
    if out is not None:
        if out.is_dir() or args.predictions.endswith(("/", os.sep)):
            raise InputError(f"--predictions {args.predictions} is a folder: give a file name")
        if not out.parent.is_dir():
            raise InputError(f"--predictions {args.predictions}: {not_a_folder(out.parent)}")
        if Path(args.data).exists() and out.resolve() == Path(args.data).resolve():
            raise InputError("--predictions must not be the data file")
        if not streamed:
            _check_writable(out.with_name(out.name + ".part"), args.predictions)  # before hours of evaluation
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if wrong := metric_error(metrics):
        raise InputError(f"--metrics: {wrong}")
    examples = read_jsonl(args.data)
    idx = subset(len(examples), args.max_examples, args.seed)
    groups = [g.strip() for g in args.group_by.split(",") if g.strip()]
    if taken := [g for g in groups if g in METRIC_NAMES]:
        raise InputError(f"--group-by {taken[0]!r} is the name of an overall metric: group by other fields")
    vae = _load_vae(args.vae)
    if args.given is not None:
        return _score_given(args, examples, idx, metrics, groups, out, streamed, vae)
    device, dtype = check_model_options(args)
    missing = [(examples[i], p) for i in idx for p in examples[i].images if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        what = "is a folder" if missing[0][1].is_dir() else "does not exist"
        raise InputError(f"{missing[0][0].where}: image {str(missing[0][1])!r} {what}{more}")
    for i in idx:  # every header before the model loads (a file damaged further in is named with its line at its turn)
        try:
            for p in examples[i].images:
                check_image_file(p)
        except InputError as e:
            raise InputError(f"{examples[i].where}: {e}") from None

    pipe = load_pipeline(args, device, dtype)
    if cut := cut_answers(answer_tokens(pipe.processor, [examples[i] for i in idx]), args.max_new_tokens,
                          "--max-new-tokens"):
        print(f"palitorch eval: warning: {cut}", file=sys.stderr)
    answers: list[str] = []
    with tqdm(total=len(idx), unit="ex", desc="eval", file=sys.stderr, disable=args.quiet,
              dynamic_ncols=True) as bar:
        where = {p: examples[i].where for i in reversed(idx) for p in examples[i].images}  # each image's first line

        sizes: dict = {}  # each image's (upright) size, for its masks

        def load(path):
            try:
                image = load_image(path)
            except InputError as e:
                raise InputError(f"{where.get(path, path)}: {e}") from None
            sizes[path] = image.size
            return image

        def size_of(path):
            return sizes[path] if path in sizes else load(path).size

        def generate(paths, prompts, max_new_tokens):  # (a tuple of paths: one example's several images)
            images = [[load(p) for p in path] if isinstance(path, tuple) else load(path) for path in paths]
            texts = [r.text for r in pipe.generate(images, prompts, max_new_tokens=max_new_tokens)]
            answers.extend(texts)
            bar.update(len(texts))
            return texts

        scores: dict = {}
        figures = exact_match(pipe.model, pipe.processor, examples, idx, args.batch_size, args.max_new_tokens,
                              groups, ddp.Dist(), generate=generate, metrics=metrics, per_example=scores, vae=vae,
                              image_size=size_of)
    _report(args, figures, examples, idx, answers, scores, out, streamed)
    return 0


def _load_vae(path: str | None) -> dict | None:
    """--vae's weights (before any model loads), or None."""
    if path is None:
        return None
    if not path:
        raise InputError("--vae is empty: give the path of vae-oid.npz, or leave it out")
    from palitorch.tasks import load_vae_params

    return load_vae_params(path)


def _score_given(args, examples, idx, metrics, groups, out, streamed, vae=None) -> int:
    """--given FIELD: each example's FIELD scored as its answer, without a model."""
    from palitorch.train import ddp
    from palitorch.train.evaluate import exact_match

    for name in ("model", "adapter", "revision", "compile", "quantize"):
        if getattr(args, name, None):
            raise InputError(f"--given scores the answers the data holds: leave out --{name}")
    answers = []
    for i in idx:
        e = examples[i]  # (the suffix too: what the data's own answers score against its "answers")
        answer = {"prefix": e.prefix, "suffix": e.suffix}[args.given] if args.given in ("prefix", "suffix") else \
            e.meta.get(args.given)
        if not isinstance(answer, str):
            raise InputError(f"{examples[i].where}: --given {args.given!r}: the line has no string field of that name "
                             f"(got {json.dumps(answer)[:40]})")
        answers.append(answer)
    ahead = iter(answers)
    scores: dict = {}
    figures = exact_match(None, None, examples, idx, len(idx), 1, groups, ddp.Dist(),
                          generate=lambda images, prompts, k: [next(ahead) for _ in prompts], metrics=metrics,
                          per_example=scores, vae=vae)
    _report(args, figures, examples, idx, answers, scores, out, streamed)
    return 0


def _report(args, figures, examples, idx, answers, scores, out, streamed) -> None:
    """The figures on stdout (or stderr), then the predictions file if one was asked for."""
    from palitorch.tasks.metrics import METRICS
    from palitorch.train.evaluate import summary

    # first: the metrics are not lost if the predictions cannot be written after all; to stderr when the
    # predictions go to standard output (or to the file it was sent to), which then holds JSON lines only
    report = sys.stderr if out is not None and _is_stdout(out) else sys.stdout
    if args.json:
        print(json.dumps({"data": str(args.data), **figures}, ensure_ascii=False), file=report, flush=True)
    else:
        print(summary(str(args.data), figures), file=report, flush=True)
    if out is not None:  # one process answers every example, in the order of idx
        data_folder = Path(args.data).parent.resolve()

        def image_field(e) -> str | list[str]:
            """The image(s) as the data file names them; in a file in another folder, a relative path is made
            relative to that folder, so that the predictions read as data too."""
            given = e.given_image if isinstance(e.given_image, list) else [e.given_image]
            paths = [g if streamed or Path(g).is_absolute() or out.parent.resolve() == data_folder else
                     os.path.relpath(p.resolve(), out.parent.resolve()) for g, p in zip(given, e.images)]
            return paths if isinstance(e.given_image, list) else paths[0]

        lines = []
        for k, (i, answer) in enumerate(zip(idx, answers)):
            e = examples[i]
            # each metric's score of this example (exact match and relaxed accuracy as true / false)
            own = {METRICS[m]: bool(v[k]) if m in ("exact", "relaxed") else v[k] for m, v in scores.items()
                   if m in METRICS}
            if k in scores.get("segments", {}):
                own["mask_iou"] = scores["segments"][k]
            # (an earlier run's scores, in a predictions file scored again with --given, are not this run's)
            meta = {key: v for key, v in e.meta.items() if key not in METRICS.values()}
            lines.append(json.dumps({"image": image_field(e), "prefix": e.prefix, "suffix": e.suffix, **meta,
                                     "prediction": answer, **own}, ensure_ascii=False))
        text = "".join(line + "\n" for line in lines)
        if streamed:
            sys.stdout.flush()
            with open_output(out) as f:  # (after the metrics, when stdout is a file)
                f.write(text.encode("utf-8"))
        else:
            part = out.with_name(out.name + ".part")
            try:
                part.write_text(text, encoding="utf-8")
            except OSError as e:  # (a full disk: the part would keep holding the space)
                part.unlink(missing_ok=True)
                raise OSError(e.errno, e.strerror, str(part)) from None
            os.replace(part, out)  # all of it or none


def _is_stdout(out: Path) -> bool:
    """Whether a stream target is this process's standard output (`-`, /dev/stdout, or what it is connected to)."""
    if str(out) in ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"):
        return True
    try:
        return os.path.samestat(os.stat(out), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # (no real stdout, e.g. captured)
        return False


def _check_writable(part: Path, given: str) -> None:
    """InputError unless the predictions' temporary file can be created where they go (made and removed)."""
    try:
        with open(part, "x"):
            pass
        part.unlink()
    except FileExistsError:
        pass  # (left by an earlier run: it is overwritten)
    except OSError as e:
        raise InputError(f"--predictions {given}: cannot write there ({e.strerror}): choose another path") from None
