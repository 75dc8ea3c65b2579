"""`palitorch batch`: a JSON-lines file of requests in, a JSON-lines file of results out; resumable.

Input, one request per line (image paths relative to the input file's folder, a list of them for a prompt about
several images; any other fields are kept):
    {"image": "cats/1.jpg", "prompt": "caption en"}
    {"image": "cats/2.jpg", "prompt": "detect cat", "max_new_tokens": 32, "id": "x7"}
    {"image": ["pair/left.jpg", "pair/right.jpg"], "prompt": "answer en are there two dogs?"}
Output, one line per request: its fields, "index" (its line number in the input, from 1), "decoding" (the
decoding options it ran with: the command line's and its own), "generated_by" (the model folder, adapter,
dtype and quantization) and either the result (text, token_ids, logprobs,
finish_reason, prompt_tokens; detections/segmentations for detect/segment prompts) or "error". Requests sharing
decoding options run together in batches, so results are written in completion order; once every request has
run, the file is put in input order. A request field that looks like a misspelled option ("temprature") is an
error rather than silently ignored; fields named like result fields are not copied.

Durability: each batch's lines are appended, flushed and fsync'ed before the next batch starts. Started again
with the same output, the command skips every index already answered (after dropping a line cut short by a
crash) and runs again the ones that ended in an error. It refuses an output whose answers came from other
images, prompts or decoding options, or from another model (--model, --adapter, --dtype, --quantize). Exit
status 0 when every request got an answer, 1 when some got an error. An output that is not a regular file
(/dev/null, /dev/stdout, a pipe) gets the lines in completion order, and a run there cannot resume.

`torchrun --nproc-per-node N -m palitorch batch ...` shares the requests among N processes (one GPU each with
--device cuda), each writing its part beside the output, folded into it at the end (ranks.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import threading
from pathlib import Path

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
from palitorch.cli.ranks import Ranks
from palitorch.cli.requests import Request, check_same_request, make_request, read_fields
from palitorch.cli.results import (
    Writer,
    check_writable,
    fold_parts,
    is_stream,
    output_lock,
    output_target,
    read_done,
    sort_by_index,
)
from palitorch.errors import InputError, PalitorchError

FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # the errors of a full disk (or quota)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "batch", help="run a JSON-lines file of requests (resumable)",
        description="Answer every request of a JSON-lines file ({\"image\": PATH, \"prompt\": TEXT, ...decoding "
                    "options}) into a JSON-lines file of results. Image paths are relative to the input file. "
                    "Started again, it skips requests already in the output. Decoding options given here are "
                    "defaults that a request's own fields override. Under torchrun (torchrun --nproc-per-node N -m "
                    "palitorch batch ...) the N processes share the requests, one GPU each with --device cuda.",
    )
    one_line_errors(p)
    p.add_argument("--input", required=True, metavar="REQUESTS.jsonl",
                   help="one JSON request per line (- : standard input, relative image paths then from here)")
    p.add_argument("--output", required=True, metavar="RESULTS.jsonl",
                   help="one result line per request, written as each batch finishes and put in input order at the "
                        "end; an existing output from the same input is resumed (its error lines run again). "
                        "- or /dev/stdout: standard output, in the order answers finish, never resumed")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="requests per forward pass (default 8; with --compile, rounded down to 1, 2, 3, 4, 6, 8, 12, "
                        "16, 24, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_model_options(p)
    add_decoding_options(p)
    p.set_defaults(func=batch)


def run_chunk(pipe, chunk: list[Request], writer: Writer, pad_to: int | None = None, model: dict | None = None) -> None:
    """Generate one batch (same options) and write a line per request; an input the model rejects (a prompt
    over the context, ...) is retried alone so that only that request gets the error. Seeded samples run one at a
    time, so that a line's seed gives its sample whatever the other lines and --batch-size.

    `pad_to` (with --compile): a compiled decode step is compiled anew for every batch size, so a smaller greedy
    chunk (the last one, or a group with its own options) is padded to that size with copies of its last request,
    whose answers are dropped. The copies share its image, so the vision tower does not run for them, and greedy
    rows do not depend on one another. Sampled chunks are not padded: their random draws depend on the batch."""
    from palitorch.inference import GenerationOptions, load_image

    ready, loaded = [], {}  # an image that several requests name is read once (and so encoded once)
    for req in chunk:
        try:
            for path in req.image if isinstance(req.image, tuple) else [req.image]:
                if path not in loaded:
                    loaded[path] = load_image(path)
            ready.append((req, [loaded[p] for p in req.image] if isinstance(req.image, tuple) else loaded[req.image]))
        except PalitorchError as e:
            writer.add(req.fields, req.index, error=f"line {req.index}: {e}")
    if not ready:
        return
    opts = ready[0][0].options
    images, prompts = [im for _, im in ready], [r.prompt for r, _ in ready]
    decoding = GenerationOptions.from_kwargs(**opts)
    greedy = not decoding.do_sample and decoding.num_beams == 1
    extra = max(0, pad_to - len(ready)) if pad_to and greedy else 0
    if decoding.do_sample and decoding.seed is not None:  # alone, as `run --seed` and the server give it
        results = _one_by_one(pipe, ready, opts)
    else:
        try:
            results = pipe.generate(images + images[-1:] * extra, prompts + prompts[-1:] * extra, **opts)
            results = results[:len(ready)]
        except PalitorchError:
            results = _one_by_one(pipe, ready, opts)
    for (req, im), res in zip(ready, results):
        if isinstance(res, Exception):
            writer.add(req.fields, req.index, error=f"line {req.index}: {res}")
        else:
            size = None if isinstance(im, list) else im.size  # (several images: no one image holds the boxes)
            fields = result_fields(res, req.prompt, size, pipe.processor.tokenizer)
            by = {"generated_by": model} if model else {}
            writer.add(req.fields, req.index, decoding=req.options, **by, **fields)


def _one_by_one(pipe, ready: list, opts: dict) -> list:
    """Each (request, image) of `ready` generated alone: its Result, or the error that request alone meets."""
    results = []
    for req, im in ready:
        try:
            results.append(pipe.generate([im], [req.prompt], **opts)[0])  # (im may be a list: one row's images)
        except PalitorchError as e:
            results.append(e)
    return results


def batch(args: argparse.Namespace) -> int:
    defaults = decoding_options(args)
    device, dtype = check_model_options(args)
    ranks = Ranks.from_env()  # several processes under torchrun (ranks.py)
    device = ranks.device(device)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    src, (dst, streamed) = Path("/dev/stdin" if args.input == "-" else args.input), output_target(args.output)
    piped = is_stream(src)  # `-`, /dev/stdin, a pipe: image paths are then from this folder
    if src.is_dir() or not (src.is_file() or (piped and src.exists())):
        raise InputError(f"input file {args.input!r} {'is not a file' if src.exists() else 'does not exist'}")
    if dst.is_dir() or str(args.output).endswith(("/", os.sep)):
        raise InputError(f"--output {args.output} is a folder: give a file name")
    if not dst.parent.is_dir():
        raise InputError(f"--output {args.output}: {not_a_folder(dst.parent)}")
    if not streamed and dst.resolve() == src.resolve():
        raise InputError("--output must not be the input file")
    if ranks.world > 1 and (streamed or piped):
        raise InputError("with several processes (torchrun) --input and --output must be files: each process reads "
                         "the input and writes its part beside the output")
    if ranks.world > 1 and not os.access(dst.parent, os.W_OK | os.X_OK):
        raise InputError(f"--output {args.output}: cannot write in its folder {str(dst.parent)!r}, where each "
                         "process writes its part: choose another folder")
    try:
        data = src.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the input file {str(src)!r}: {e.strerror}") from None
    if b"\0" in data:
        raise InputError(f"input file {str(src)!r} is not text: give a JSON-lines file, one request per line")
    # SIGTERM (Slurm, Kubernetes, docker stop) ends the job as Ctrl-C does: the answers written are kept, and the
    # line says how to go on; the exit status is 143 (128 + SIGTERM)
    terminated = []

    def terminate(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    # One run at a time on an output (a second would answer the same requests again, or lose lines to the first's
    # rewrite in input order); under torchrun the processes share it by their parts.
    lock = output_lock(dst) if ranks.world == 1 and not streamed else contextlib.nullcontext()
    try:
        with ranks.joined(), lock:
            return run_requests(args, data.splitlines(), src.parent if not piped else Path.cwd(), dst, streamed,
                                defaults, ranks, device, dtype)
    except KeyboardInterrupt:
        if terminated:
            return 128 + signal.SIGTERM
        raise
    except OSError as e:  # a full disk: what is written is kept (the line cut short is dropped on the next run)
        if streamed or e.errno not in FULL:
            raise
        raise InputError(f"--output {args.output}: no space left on its device ({e.strerror}); the results written "
                         "so far are kept: free some space and run the same command again") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, before)


def run_requests(args, lines: list[bytes], folder: Path, dst: Path, streamed: bool, defaults: dict, ranks: Ranks,
                 device: str, dtype) -> int:
    """Check every request against the output (resuming it), answer those to do (this process's share of them),
    and put the output in input order."""
    from tqdm import tqdm

    # Every check before the output changes: an output that belongs to other requests is refused untouched.
    regular = not streamed  # else /dev/null, /dev/stdout, a pipe: written, never read back
    if regular and ranks.main:
        fold_parts(dst)  # an earlier multi-process run's parts, left when it stopped early
    ranks.barrier()
    done, tidy = read_done(dst) if regular else ({}, lambda: None)
    model = model_record(args, dtype)
    requests: list[Request] = []
    bad: list[tuple[dict, int, str]] = []
    for index, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        fields = {}
        try:
            fields = read_fields(index, raw)
            req = make_request(index, fields, folder, defaults)
        except InputError as e:
            if index not in done:
                bad.append((fields, index, str(e)))
            continue
        if index in done:
            check_same_request(done[index], req, dst, model)
        else:
            requests.append(req)
    if beyond := sorted(i for i in done if i > len(lines)):
        raise InputError(f"--output {dst} holds results for lines {beyond[0]}-{beyond[-1]}, which {args.input} does "
                         "not have: it belongs to a longer input; choose another --output")
    if regular:
        check_writable(dst)
    if ranks.main:
        tidy()
    mine = requests[ranks.rank::ranks.world]
    writer = Writer(part_of(dst, ranks), stream=streamed)
    ranks.barrier()  # every process has made its part
    try:
        if missing := [r for r in range(ranks.world) if not part_of(dst, Ranks(r, ranks.world)).exists()]:
            raise InputError(f"the parts of process {', '.join(map(str, missing))} are not in {str(dst.parent)!r}: "
                             "the processes must share the output's folder (on several machines, a shared file "
                             "system)")
        for fields, index, error in bad if ranks.main else ():
            writer.add(fields, index, error=error)
        writer.commit()  # bad lines are on disk before the model loads
        if mine:
            size = chunk_size(args)
            pipe = load_pipeline(args, device, dtype)
            groups: dict[str, list[Request]] = {}
            for req in mine:
                groups.setdefault(json.dumps(req.options, sort_keys=True), []).append(req)
            if ranks.world == 1:
                total = sum(1 for raw in lines if raw.strip())
                shown = {"desc": "batch", "total": total, "initial": total - len(requests)}
            else:  # the bar of the first process, for its own share
                shown = {"desc": f"batch (process 1 of {ranks.world})", "total": len(mine)}
            with tqdm(unit="req", file=sys.stderr, dynamic_ncols=True, disable=args.quiet or not ranks.main,
                      **shown) as bar:
                for group in groups.values():
                    for i in range(0, len(group), size):
                        chunk = group[i:i + size]
                        run_chunk(pipe, chunk, writer, pad_to=size if args.compile else None, model=model)
                        writer.commit()
                        bar.update(len(chunk))
    except KeyboardInterrupt:
        if writer.regular and ranks.main:
            n = len(done) + writer.results  # (those of earlier runs too: a resumed run may have added none yet)
            kept = f"the results written so far (in {dst.name}.rank0 ... beside the output)" if ranks.world > 1 \
                else f"the {n} result{'s' * (n != 1)} written to {dst}"
            print(f"\npalitorch batch: interrupted; {kept} are kept: run the same command again to go on",
                  file=sys.stderr)
        raise
    finally:
        writer.close()
    results, errors = ranks.sum(writer.results, writer.errors)
    ranks.barrier()  # every part is complete
    if regular and ranks.main:
        if fold_parts(dst) == 0:
            sort_by_index(dst)
    ranks.barrier()  # processes leave together: gloo can abort one whose peer tears down its connections early
    if not args.quiet and ranks.main:
        said = f"{errors} error{'s' * (errors != 1)} (lines with an \"error\" field)" if errors else "no errors"
        by = f" by {ranks.world} processes" if ranks.world > 1 else ""
        print(f"palitorch batch: {results} result{'s' * (results != 1)} and {said} written to {dst}{by}; "
              f"{len(done)} already there", file=sys.stderr)
    # Under torchrun the first process's status says it: another one exiting 1 first would have torchrun stop the
    # first one, perhaps while it folds the parts.
    return 1 if errors and ranks.main else 0


def part_of(dst: Path, ranks: Ranks) -> Path:
    """Where this process writes: the output itself, or with several processes its own part beside it."""
    return dst if ranks.world == 1 else dst.with_name(f"{dst.name}.rank{ranks.rank}")


def chunk_size(args: argparse.Namespace) -> int:
    """Requests per forward pass: --batch-size, or with --compile the largest of the sizes a compiled pipeline runs
    at (1, 2, 3, 4, 6, 8, 12, 16, ...) not above it. Another size would run padded up to the next one on every
    chunk (10 requests as 12 rows: more memory than asked for, and a sixth of the work wasted)."""
    from palitorch.inference.caches import batch_rung_below

    if not args.compile:
        return args.batch_size
    size = batch_rung_below(args.batch_size)
    if size != args.batch_size and not args.quiet:
        print(f"palitorch batch: with --compile, batches of {size} instead of {args.batch_size} (a compiled decode "
              "step runs at 1, 2, 3, 4, 6, 8, 12, 16, 24, ... rows; give one of those to silence this)",
              file=sys.stderr)
    return size


def model_record(args: argparse.Namespace, dtype) -> dict:
    """What a result line says of the model that wrote it (`generated_by`): its folder ("palitorch-default" for the
    bundled one), the adapter merged into it, the dtype, and "quantize" when its weights were quantized (a resumed
    run with or without --quantize is another model's)."""
    from palitorch.assets import DEFAULT_MODEL_DIR
    from palitorch.inference.inputs import model_paths

    path, adapter = model_paths(args.model, args.revision, args.adapter)  # (a Hub id: its snapshot, named by commit)
    path = path.resolve()
    record = {"path": "palitorch-default" if path == DEFAULT_MODEL_DIR.resolve() else str(path)}
    if adapter is not None:
        record["adapter"] = str(adapter.resolve())
    record["dtype"] = str(dtype).removeprefix("torch.")
    if getattr(args, "quantize", None):  # (a Namespace of another command, or of tests, may lack it)
        record["quantize"] = args.quantize
    return record
