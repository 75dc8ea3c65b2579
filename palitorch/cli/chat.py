"""`palitorch chat`: prompts about an image, one per line, answers streamed as they are generated.

Reads stdin, so it also works in a pipe: `printf 'caption en\\n/image dog.png\\ncaption en\\n' | palitorch chat ...`
prints one answer per line on stdout. Statistics and errors go to stderr; the `> ` prompt and the banner appear
only when stdin is a terminal.
"""

from __future__ import annotations

import argparse
import sys
import time

from palitorch.cli.common import (
    add_decoding_options,
    add_model_options,
    check_model_options,
    decoding_options,
    load_pipeline,
    one_line_errors,
)
from palitorch.errors import InputError, PalitorchError

HELP = """commands:
  /image PATH   switch to another image
  /help         this text
  /quit         leave (or end the input: Ctrl-D)
anything else is a prompt about the current image, e.g. 'caption en', 'answer en what is this?', 'detect cat'"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "chat", help="ask prompts about an image interactively",
        description="Ask prompts about an image, one per line; each answer streams as it is generated. "
                    "`/image PATH` switches image, `/quit` or end of input leaves. Tokens/s go to stderr.",
    )
    one_line_errors(p)
    p.add_argument("--image", required=True, metavar="PATH", action="append", help="the image to start with")
    add_model_options(p)
    add_decoding_options(p, text_only=True)
    p.set_defaults(func=chat)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def read_lines(interactive: bool):
    """Yield stripped input lines until EOF; a terminal gets a `> ` prompt and line editing."""
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        # The prompt belongs on the terminal: with stdout redirected, write it to stderr so the file gets answers only.
        prompt = "> " if sys.stdout.isatty() else ""
        while True:
            try:
                if not prompt:
                    sys.stderr.write("> ")
                    sys.stderr.flush()
                yield input(prompt).strip()
            except EOFError:
                print(file=sys.stderr)
                return
    else:
        for line in sys.stdin:
            yield line.strip()


def answer(pipe, image, prompt: str, opts: dict) -> None:
    """Stream one answer to stdout, then its length and speed to stderr."""
    start = time.perf_counter()
    if opts.get("num_beams", 1) > 1:  # beam search cannot stream (the best beam is known only at the end)
        r = pipe.generate(image, prompt, **opts)
        sys.stdout.write(r.text)
    else:
        stream = pipe.stream(image, prompt, **opts)
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            sys.stdout.write("\n")
            say("[interrupted]")
            return
        r = stream.result
    sys.stdout.write("\n")
    sys.stdout.flush()
    seconds = time.perf_counter() - start
    n = len(r.token_ids)
    say(f"[{n} token{'s' * (n != 1)} in {seconds:.2f} s, {n / seconds:.1f} tokens/s, {r.finish_reason}]")


def chat(args: argparse.Namespace) -> int:
    from palitorch.inference import load_image

    if len(args.image) > 1:  # (argparse would keep the last one silently; run reads them as one prompt's images)
        raise InputError("chat talks about one image at a time (/image PATH switches it): give --image once, or "
                         "use palitorch run for a prompt about several images")
    args.image = args.image[0]
    opts = decoding_options(args, one_request=True)
    device, dtype = check_model_options(args)
    image = load_image(args.image)
    pipe = load_pipeline(args, device, dtype)

    interactive = sys.stdin.isatty()
    if interactive:
        say(f"palitorch chat: {args.image} ({image.width}x{image.height}); /help for commands")
    for line in read_lines(interactive):
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            break
        if line in ("/help", "/?"):
            say(HELP)
            continue
        if line == "/image" or line.startswith("/image "):
            path = line[len("/image"):].strip().strip("'\"")
            if not path:
                say("usage: /image PATH")
                continue
            try:
                image = load_image(path)
            except PalitorchError as e:
                say(f"error: {e}; still on the previous image")
                continue
            say(f"[image: {path} ({image.width}x{image.height})]")
            continue
        if line[:1] == "/" and line[1:2].isalpha():  # a mistyped command, not a prompt (none starts so)
            say(f"unknown command {line.split()[0]}; /help lists the commands")
            continue
        try:
            answer(pipe, image, line, opts)
        except PalitorchError as e:  # e.g. a prompt longer than the context: report it and keep chatting
            say(f"error: {e}")
            if not interactive:  # an empty answer line: answers piped out stay line for line with the prompts
                print(flush=True)
    return 0
