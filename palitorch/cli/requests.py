"""`palitorch batch`'s input lines: each parsed (`read_fields`), checked and made a `Request` with its decoding
options (`make_request`), and matched against the result line an earlier run wrote for it (`check_same_request`).
"""

from __future__ import annotations

import codecs
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from palitorch.cli.common import DECODING, FLAG_OF, check_decoding
from palitorch.cli.results import RESULT_FIELDS
from palitorch.errors import InputError
from palitorch.inference.processor import MAX_IMAGES


@dataclass
class Request:
    index: int  # line number in the input file, from 1
    fields: dict  # the request as given
    image: Path | tuple[Path, ...]  # (a tuple: the prompt's several images, in order)
    prompt: str
    options: dict  # decoding keywords: the command line's defaults updated by the request's own


def _bare(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def _finite(text: str) -> float:
    """A JSON number as a float; ValueError for one beyond float's range (1e400), which would be written back as
    Infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond a float's range")
    return value


def _not_json(name: str):
    """NaN, Infinity and -Infinity, which Python's json reads but JSON has not (the output would carry them on to
    stricter parsers)."""
    raise ValueError(f"{name} is not a JSON value (write null or a number)")


def read_fields(index: int, raw: bytes) -> dict:
    """One input line -> its JSON object, or InputError."""
    if index == 1:
        raw = raw.removeprefix(codecs.BOM_UTF8)  # Windows tools start UTF-8 files with one
    try:
        fields = json.loads(raw.decode("utf-8"), parse_constant=_not_json, parse_float=_finite)
    except ValueError as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise InputError(f"line {index} is not valid JSON: {e}") from None
    if not isinstance(fields, dict):
        raise InputError(f"line {index} is not a JSON object")
    return fields


# Decoding options as the HTTP API (OpenAI, vLLM) and transformers name them: a line with one would otherwise be
# answered with the defaults, the field kept as the request's own.
FOREIGN = {
    "max_tokens": '"max_new_tokens"', "max_completion_tokens": '"max_new_tokens"',
    "max_length": '"max_new_tokens" (new tokens only)', "min_tokens": '"min_new_tokens"',
    "min_length": '"min_new_tokens" (new tokens only)', "ignore_eos": '"min_new_tokens" equal to "max_new_tokens"',
    "do_sample": '"temperature" (> 0 samples)', "stop_sequences": '"stop"',
    "beam_size": '"num_beams"', "n": "one line per answer (with their own seeds)",
    "num_return_sequences": "one line per answer (with their own seeds)",
}


def make_request(index: int, fields: dict, folder: Path, defaults: dict) -> Request:
    """A request's fields -> Request, or InputError saying what is wrong with them."""
    image, prompt = fields.get("image"), fields.get("prompt")
    paths = image if isinstance(image, list) and image else [image]  # a list: a prompt about several images
    if not all(isinstance(p, str) and p for p in paths):
        raise InputError(f'line {index} has no "image" path (a path, or a list of paths for a prompt about several '
                         "images)")
    if not isinstance(prompt, str):
        raise InputError(f'line {index} has no "prompt" string')
    if len(paths) > MAX_IMAGES:
        raise InputError(f'line {index}: {len(paths)} images for one prompt; at most {MAX_IMAGES} (their tokens '
                         "share the model's context)")
    if any(p.lower().startswith(("http://", "https://")) for p in paths):
        raise InputError(f'line {index}: the "image" is a URL: palitorch batch reads image files (download them '
                         "first and give their paths)")
    if not all(_encodable(p) for p in paths):
        raise InputError(f'line {index}: the "image" path is not valid Unicode (a lone surrogate such as \\ud800)')
    for name in fields.keys() - FLAG_OF.keys() - RESULT_FIELDS - {"image", "prompt"}:  # kept as they are, unless...
        if name in FOREIGN and not (name == "n" and fields[name] == 1):
            raise InputError(f"line {index}: {name!r} is another tool's decoding option, which palitorch batch "
                             f"does not read: use {FOREIGN[name]}")
        # an option in another spelling (top-k, topk, Seed), or a near miss of a long one: short fields such as
        # "step", "speed" or "seed_id" are the user's own
        if like := [k for k in FLAG_OF if _bare(k) == _bare(name)] or \
                (len(name) >= 6 and difflib.get_close_matches(name, FLAG_OF, n=1, cutoff=0.85)):
            raise InputError(f"line {index}: unknown field {name!r}; did you mean the decoding option {like[0]!r}?")
    options = dict(defaults)
    options.update({k: _whole(k, v) for k, v in fields.items() if k in FLAG_OF and v is not None})  # (null: unset,
    # as pandas writes a missing value)
    try:
        check_decoding(options)
    except InputError as e:
        raise InputError(f"line {index}: {e}") from None
    found = tuple(Path(p) if Path(p).is_absolute() else folder / p for p in paths)
    return Request(index, fields, found if isinstance(image, list) else found[0], prompt, options)


INTEGER_OPTIONS = frozenset(key for _, key, kind, *_ in DECODING if kind is int)


def _whole(key: str, value):
    """4.0 -> 4 for an integer option (pandas writes whole numbers so); 4.5 stays, for the check to refuse."""
    if key in INTEGER_OPTIONS and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_same_request(record: dict, req: Request, output: Path, model: dict) -> None:
    """A result line whose image or prompt differs from its input line means the output belongs to another input
    file; one whose decoding options or model differ, to another command line (lines written before palitorch
    recorded them are not checked)."""
    if "generated_by" in record and record["generated_by"] != model:
        raise InputError(f"{output} holds results of another model ({record['generated_by']} then, {model} now): "
                         "give the same --model, --adapter and --dtype, or another --output")
    for name in ("image", "prompt"):
        if name in record and record[name] != req.fields[name]:
            raise InputError(f"{output} holds results for another input (line {req.index}'s {name} differs): "
                             "choose another --output")
    recorded = {k: v for k, v in record.get("decoding", {}).items() if v is not None}  # (older outputs kept nulls)
    if "decoding" in record and recorded != json.loads(json.dumps(req.options)):
        raise InputError(f"{output} holds results made with other decoding options (line {req.index}: "
                         f"{record['decoding']} then, {req.options} now): give the same options, or another --output")
