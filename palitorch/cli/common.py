"""Options shared by `palitorch run`, `chat` and `batch`: the model, the device, decoding; checked before loading.

Every check that needs no model runs first, so a typo costs milliseconds rather than a checkpoint load.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
from pathlib import Path

import torch

from palitorch.errors import InputError

EARLY_STOPPING = {"true": True, "false": False, "never": "never"}
# Decoding options as (flag, keyword, type, metavar, help). The keywords are those of Pipeline.generate.
DECODING = (
    ("--max-new-tokens", "max_new_tokens", int, "N", "most tokens to generate (default 64)"),
    ("--min-new-tokens", "min_new_tokens", int, "N", "suppress the end of the answer until N tokens (default 0)"),
    ("--temperature", "temperature", float, "T", "sample at temperature T > 0; 0 means greedy, and so does unset "
     "unless --top-k, --top-p or --min-p is given (then T = 1)"),
    ("--top-k", "top_k", int, "K", "sample among the K most likely tokens"),
    ("--top-p", "top_p", float, "P", "sample from the fewest tokens with probability >= P, 0 < P <= 1"),
    ("--min-p", "min_p", float, "P", "drop tokens less likely than P times the most likely one, 0 <= P <= 1"),
    ("--repetition-penalty", "repetition_penalty", float, "R", "R > 1 discourages repeating tokens (default 1)"),
    ("--num-beams", "num_beams", int, "B", "beam search with B beams (default 1: none)"),
    ("--length-penalty", "length_penalty", float, "L", "beam scores are logprob / length ** L (default 1)"),
    ("--early-stopping", "early_stopping", lambda v: EARLY_STOPPING.get(v.lower(), v), "{true,false,never}",
     "beam search: stop a prompt once it has B answers (true), once no running beam can beat them (false, the "
     "default, as transformers), or 'never' (judged at --max-new-tokens)"),
    ("--seed", "seed", int, "S", "random seed: the same seed gives the same sample"),
    ("--top-logprobs", "top_logprobs", int, "K",
     "also report each token's K most likely alternatives with their logprobs (0-20; default 0)"),
)
ANSWER_ONLY = {"top_logprobs"}  # what a command that shows only the answer's text (chat, serve's defaults) leaves out
FLAG_OF = {key: flag for flag, key, *_ in DECODING} | {"stop": "--stop"}
_KEYWORD = re.compile(r"\b(?:" + "|".join(FLAG_OF) + r")\b")


# A negative number as an option's value: argparse's own pattern (-1, -.5) misses exponents and inf, so
# `--length-penalty -1e-3` read as a missing value followed by an unknown option.
ARGV: list[str] = []  # the command line being parsed (palitorch.cli.main sets it), for one_line_errors' hints
_NEGATIVE_NUMBER = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^-inf(?:inity)?$", re.IGNORECASE)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse report a bad option as one line (instead of the usage block) and exit 2, as PalitorchError
    does in palitorch.cli.main; palitorch.cli.main reports unknown options with the parser of their (sub)command,
    which this records as the `_parser` default."""

    def error(message: str):
        known = [o for o in parser._option_string_actions if o.startswith("--")]
        typed = [o for o in (a.split("=", 1)[0] for a in ARGV if a.startswith("--"))
                 if o != "--" and not any(k.startswith(o) for k in known)]  # (argparse takes a prefix of one)
        if message.startswith("the following arguments are required") and typed:  # (argparse checks these first:
            message = f"unrecognized arguments: {' '.join(typed)}"  # a misspelt --image would read as missing)
        if message.startswith("unrecognized arguments") and typed:
            near = difflib.get_close_matches(typed[0], known, n=1, cutoff=0.8)
            message += f"; did you mean {near[0]}?" if near else ""
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error
    parser.set_defaults(_parser=parser)
    parser._negative_number_matcher = _NEGATIVE_NUMBER  # private, but the one knob argparse has for this
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="a PaliGemma checkpoint folder (Hub layout), or the Hub id of one "
                   "in the local Hugging Face cache (google/paligemma2-3b-pt-224); default: the small model bundled "
                   "with palitorch")
    g.add_argument("--revision", metavar="REV", help="with a Hub id: the cached branch, tag or commit to read "
                   "(default: main)")
    g.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter folder of the model (adapter_config.json, "
                   "adapter_model.safetensors), or its Hub id in the cache, merged into its weights at load")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    g.add_argument("--dtype", default="float32",
                   help="float32 (default), bfloat16 or float16; bfloat16 halves the memory and is faster on GPUs and "
                        "on CPUs with AMX or AVX512-BF16 (recent Xeons: ~3x prefill, ~1.5x decode), at 16-bit "
                        "precision")
    g.add_argument("--quantize", choices=("int8",), type=str.lower,
                   help="int8: the language model's weights as 8-bit integers with a scale per row (a quarter of their "
                        "float32 memory, half of bfloat16's; on CPU, decoding reads a quarter of the bytes per token). "
                        "Answers stay close to the full-precision model's but may differ")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster per token after a one-time compilation (tens of "
                        "seconds; pays off for long jobs such as batch)")


def add_decoding_options(parser: argparse.ArgumentParser, text_only: bool = False) -> None:
    """The decoding flags; `text_only`: without those that only add to a full result (ANSWER_ONLY)."""
    g = parser.add_argument_group("decoding (greedy unless a sampling option is given)")
    for flag, key, kind, metavar, text in DECODING:
        if not (text_only and key in ANSWER_ONLY):
            g.add_argument(flag, dest=key, type=kind, metavar=metavar, help=text)
    g.add_argument("--stop", action="append", metavar="STR", help="end the answer before this text (repeatable)")


BEAM_ONLY = ("length_penalty", "early_stopping")


def decoding_options(args: argparse.Namespace, one_request: bool = False) -> dict:
    """The decoding keywords the user set, validated; errors name the command-line flag. `one_request`: the flags
    decode every answer (run, chat), so a beam-search option without --num-beams, or a seed without sampling, is
    refused rather than ignored (batch and serve keep them: a line or a request may ask for beams or sampling)."""
    kw = {key: getattr(args, key) for key in FLAG_OF if getattr(args, key, None) is not None}
    if one_request and kw.get("num_beams", 1) == 1:
        for key in BEAM_ONLY:
            if key in kw:
                raise InputError(f"{FLAG_OF[key]} applies to beam search only: add --num-beams B (B > 1), or leave "
                                 f"{FLAG_OF[key]} out")
    kw = check_decoding(kw, flags=True)
    if one_request and "seed" in kw:
        from palitorch.inference.sampling import GenerationOptions

        if not GenerationOptions.from_kwargs(**kw).do_sample:  # (greedy decoding and beams draw nothing)
            raise InputError("--seed applies to sampling only: add --temperature T (T > 0), --top-k, --top-p or "
                             "--min-p, or leave --seed out")
    return kw


def check_decoding(kw: dict, flags: bool = False) -> dict:
    """Validate decoding keywords exactly as Pipeline.generate will (InputError, one line); returns `kw`."""
    from palitorch.inference.sampling import GenerationOptions

    try:
        GenerationOptions.from_kwargs(**kw)
    except InputError as e:
        msg = str(e)
        if flags:  # "top_p must be ..." -> "--top-p must be ..."
            msg = _KEYWORD.sub(lambda m: FLAG_OF[m.group(0)], msg)
        raise InputError(msg) from None
    return kw


def resolve_device(name: str) -> str:
    """`auto` -> cuda when available, else cpu; anything unusable on this machine -> InputError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: MPS is not available here (use --device cpu)")
    elif dev.type in ("cpu", "mps") and dev.index not in (None, 0):  # torch takes cpu:3 and runs on the one CPU
        raise InputError(f"--device {name}: there is one {dev.type} device: use --device {dev.type}")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {name}: palitorch runs on cpu, cuda or mps")
    return str(dev)


def check_model_options(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    from palitorch.checkpoint import resolve_dtype

    if args.revision is not None and args.model is None:
        raise InputError("--revision applies to --model given as a Hub id: add --model OWNER/NAME, or leave "
                         "--revision out")
    return resolve_device(args.device), resolve_dtype(args.dtype)


def load_pipeline(args: argparse.Namespace, device: str, dtype: torch.dtype):
    import palitorch

    pipe = palitorch.load(args.model, device=device, dtype=dtype, adapter=getattr(args, "adapter", None),
                          revision=args.revision, quantize=getattr(args, "quantize", None))
    if getattr(args, "compile", False):
        pipe.compile(mode="reduce-overhead" if str(device).startswith("cuda") else None)
    return pipe


def not_a_folder(path: Path) -> str:
    """Why `path`, which is not a folder, cannot hold output: the end of a one-line error."""
    if path.exists():
        return f"{str(path)!r} is not a folder"
    return f"folder {str(path)!r} does not exist"


def result_fields(result, prompt: str, image_size: tuple[int, int] | None, tokenizer) -> dict:
    """A Result as JSON-ready fields; detect/segment prompts add their parsed objects in image pixels (with an
    `image_size`; None for a prompt about several images, whose boxes are in no one image's pixels), a result
    with top_logprobs adds them as {"token_id", "token", "logprob"} objects (token texts from `tokenizer`), and a
    beam search's its beams, best first."""
    from palitorch.inference.processor import token_text
    from palitorch.tasks import task_outputs

    fields = {
        "text": result.text,
        "token_ids": list(result.token_ids),
        "logprobs": [json_number(v) for v in result.logprobs],
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
    }
    if result.top_logprobs is not None:
        fields["top_logprobs"] = [[{"token_id": i, "token": token_text(tokenizer, i), "logprob": json_number(v)}
                                   for i, v in step] for step in result.top_logprobs]
    if result.beams is not None:
        fields["beams"] = [{"text": b.text, "token_ids": list(b.token_ids), "logprobs": [json_number(v) for v in
                            b.logprobs], "finish_reason": b.finish_reason, "beam_score": json_number(b.beam_score)}
                           for b in result.beams]
    return fields | (task_outputs(prompt, result.text, *image_size) if image_size else {})


def json_number(v: float) -> float | None:
    """JSON has no -inf: a token the model gave zero probability (possible when sampling) becomes null."""
    return float(v) if math.isfinite(v) else None

