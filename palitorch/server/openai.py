"""The OpenAI chat-completions API as PaliGemma can answer it: a request's JSON in, a `ChatRequest` out (results go
back out as completion objects and stream chunks: responses.py). Plain data only (no model, no sockets), so every
rule here is tested alone.

PaliGemma answers one prompt about an image and keeps no conversation, so a request holds one user message whose
content is an image part (a base64 `data:` URL, or an http(s) URL the server fetches), or several for a prompt about
several images (in order, as checkpoints transferred to NLVR2 or video frames take them), and text parts (the
prompt, e.g. "caption en" or "detect cat"). Requests the model cannot honour (a system prompt, several turns, tools,
presence penalties, ...) are refused with a message saying what to change, never silently ignored.

Decoding follows palitorch, not OpenAI's defaults: greedy unless `temperature` > 0 (or a top_p/top_k/min_p filter
is set), as PaliGemma's own evaluations decode. Extensions beside OpenAI's names: top_k, min_p, min_tokens,
repetition_penalty, num_beams, length_penalty, early_stopping.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import hashlib
import io
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from palitorch.errors import InputError
from palitorch.inference.images import load_image
from palitorch.inference.processor import MAX_IMAGES
from palitorch.inference.sampling import GenerationOptions


class ApiError(Exception):
    """An error the client gets as OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {401: "authentication_error", 500: "server_error", 503: "server_error"}  # else invalid_request_error

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})  # sent with the response, e.g. Allow with a 405
        if status == 503:  # busy or stopping: a client that retries should wait a little first
            self.headers.setdefault("Retry-After", "1")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


# OpenAI's name -> palitorch's decoding keyword (GenerationOptions).
DECODING = {
    "max_completion_tokens": "max_new_tokens", "max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens",
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "num_beams": "num_beams", "length_penalty": "length_penalty",
    "early_stopping": "early_stopping", "seed": "seed", "stop": "stop", "top_logprobs": "top_logprobs",
}
API_NAME = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}  # for error messages
NO_TOOLS = "PaliGemma calls no tools: put the task in the prompt (e.g. 'detect cat', 'answer en what is this?')"
# Accepted only at the value that asks for nothing PaliGemma cannot do.
NEUTRAL = {
    "presence_penalty": (0, "use repetition_penalty (> 1 discourages repeats)"),
    "frequency_penalty": (0, "use repetition_penalty (> 1 discourages repeats)"),
    "logit_bias": ({}, None), "tools": ([], NO_TOOLS), "tool_choice": ("none", NO_TOOLS),
    "parallel_tool_calls": (False, NO_TOOLS),
    "response_format": ({"type": "text"}, "PaliGemma writes plain text"), "modalities": (["text"], None),
}
# Bookkeeping that does not change the answer (OpenAI replaces `user` by safety_identifier and prompt_cache_key).
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
           "prompt_cache_retention"}
ASKS = {"model", "messages", "n", "stream", "stream_options", "logprobs", "ignore_eos"} | set(DECODING)  # (any value)
KNOWN = ASKS | set(NEUTRAL) | IGNORED
# Other tools' names (transformers', vLLM's, Anthropic's) for what this API names otherwise.
FOREIGN = {
    "do_sample": "temperature (> 0 samples)", "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
    "max_length": "max_tokens (new tokens only)", "min_length": "min_tokens (new tokens only)",
    "num_return_sequences": "n", "stop_sequences": "stop", "beam_size": "num_beams",
    "best_of": "n (answers), or num_beams (beam search)",
}
MAX_N = 16
MAX_BEAMS = 16  # each beam is a row of KV cache: a bound, so that one request cannot take the server's memory


@dataclass
class ChatRequest:
    image: Image.Image | list[Image.Image]  # (a list: the prompt's several images, in order)
    prompt: str
    options: dict  # decoding keywords for Pipeline.generate / stream, validated, the server's defaults included
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) of the request's one image, which detect/segment boxes are in; None for several."""
        return None if isinstance(self.image, list) else self.image.size

    @functools.cached_property
    def greedy(self) -> bool:  # asked for every queued job each time the engine forms a batch
        return not GenerationOptions.from_kwargs(**self.options).do_sample


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # json's parser recurses once per nested [ or {
        raise bad("the request body is not valid JSON (nested too deeply)") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_chat(body: dict, model_id: str, defaults: dict | None = None,
               fetch: Callable[[str], bytes] | None = None, images: ImageCache | None = None) -> ChatRequest:
    """A chat-completions request -> ChatRequest, or ApiError saying what to change. `defaults`: the server's
    decoding keywords, under the request's own. `fetch(url) -> bytes` reads http(s) image URLs (None: refused).
    `images`: decoded images by content, shared by requests that send the same image. A key whose value is null is
    taken as absent (SDKs send unset fields so), even one this server does not know."""
    body = {k: v for k, v in body.items() if v is not None}
    unknown = sorted(set(body) - KNOWN)
    if unknown:  # a near miss of a name taken at a neutral value, or ignored, must be close to count
        near = difflib.get_close_matches(unknown[0], sorted(KNOWN - ASKS), n=1, cutoff=0.75) or \
            difflib.get_close_matches(unknown[0], sorted(ASKS), n=1)
        hint = f": use {FOREIGN[unknown[0]]}" if unknown[0] in FOREIGN else f" (did you mean {near[0]!r}?)" if near \
            else ""
        raise bad(f"unknown parameter {unknown[0]!r}{hint}", unknown[0])
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model must be a string (the served model's id, {model_id!r}), got {json.dumps(model)[:40]}",
                  "model")
    if model is not None and model != model_id:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {model_id!r}", "model",
                       "model_not_found")
    for name, (neutral, advice) in NEUTRAL.items():
        if name in body and body[name] != neutral:
            raise bad(f"{name} is not supported by palitorch" + (f": {advice}" if advice else ""), name)
    options = dict(defaults or {})
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise bad("give max_completion_tokens or max_tokens, not both", "max_tokens")
    for name, key in DECODING.items():
        if name in body:
            options[key] = body[name]
    if options.get("temperature") == 0:  # OpenAI's way to ask for greedy decoding, whatever else is set
        options = {k: v for k, v in options.items() if k not in ("top_p", "top_k", "min_p")}
    if flag_or_int(body, "ignore_eos", False):  # vLLM's: every answer max_tokens long (benchmark tools send it)
        options["min_new_tokens"] = options.get("max_new_tokens", GenerationOptions.max_new_tokens)
    # (an error names the length as the client did; giving both is refused above)
    check_options(options, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens")
    n = flag_or_int(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise bad(f"n must be an integer from 1 to {MAX_N}, got {n}", "n")
    if options.get("num_beams", 1) > MAX_BEAMS:
        raise bad(f"num_beams must be at most {MAX_BEAMS} on this server, got {options['num_beams']}", "num_beams")
    if 1 < options.get("num_beams", 1) < n:  # (n <= num_beams: the n best of the beams, best first)
        raise bad(f"n ({n}) is more than num_beams ({options['num_beams']}): a beam search answers with its best "
                  "num_beams sequences at most", "n")
    stream = flag_or_int(body, "stream", False)
    if stream and options.get("num_beams", 1) > 1:  # (the beams' best answer is known only at the end)
        raise bad("a beam search cannot stream: its answer is chosen only at the end; use num_beams = 1, or "
                  "stream: false", "stream")
    want_logprobs = flag_or_int(body, "logprobs", False)
    if options.get("top_logprobs") and not want_logprobs:
        raise bad("top_logprobs come in each token's logprobs entry: set logprobs: true too", "top_logprobs")
    usage = body.get("stream_options") or {}
    if isinstance(usage, dict) and usage.get("include_usage") is None:  # null counts as absent, as at the top
        usage = {k: v for k, v in usage.items() if k != "include_usage"}
    if not isinstance(usage, dict) or not isinstance(usage.get("include_usage", False), bool):
        raise bad('stream_options must be an object like {"include_usage": true}', "stream_options")
    # include_obfuscation pads chunks against length side channels; this server sends none to leave out.
    if unknown := sorted(set(usage) - {"include_usage", "continuous_usage_stats", "include_obfuscation"}):
        raise bad(f"unknown stream_options field {unknown[0]!r} (known: include_usage)", "stream_options")
    if usage.get("continuous_usage_stats"):
        raise bad("stream_options.continuous_usage_stats is not served: usage comes once, at the end (include_usage)",
                  "stream_options")
    if body.get("stream_options") is not None and not stream:  # as OpenAI answers
        raise bad("stream_options is only allowed when stream is true", "stream_options")
    image, prompt = parse_messages(body.get("messages"), fetch, images)  # last: fetching an image is the slow part
    return ChatRequest(image, prompt, options, n, stream, usage.get("include_usage", False), want_logprobs)


def flag_or_int(body: dict, name: str, default):
    """body[name] (or `default` when absent or null), of the default's type; bool and int are told apart."""
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not type(default):
        raise bad(f"{name} must be {'true or false' if isinstance(default, bool) else 'an integer'}, got "
                  f"{json.dumps(value)}", name)
    return value


def check_options(options: dict, max_name: str = "max_tokens") -> None:
    """ApiError 400 if GenerationOptions refuses the options, in OpenAI's names (`max_name`: the one the request
    gave the length in), with `param` the option its message starts with ("top_p must be ...": top_p)."""
    names = {**API_NAME, "max_new_tokens": max_name}
    try:
        GenerationOptions.from_kwargs(**options)
    except InputError as e:  # "max_new_tokens must be ..." -> "max_tokens must be ..."
        msg = re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: names[m.group(0)], str(e))
        first = re.match(r"\w*", msg).group(0)
        param = first if first in DECODING else "num_beams" if msg.startswith("beam search") else None
        raise bad(msg, param) from None


def parse_messages(messages, fetch, images: ImageCache | None = None) -> tuple[Image.Image | list[Image.Image], str]:
    """One user message of text and images -> (image, or the list of its images in order; prompt). Text parts are
    joined with spaces."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list with one user message", "messages")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if any(r in ("system", "developer") for r in roles):
        raise bad("PaliGemma takes no system prompt: put the task in the user message (e.g. 'caption en', "
                  "'answer en what is this?', 'detect cat')", "messages")
    if roles != ["user"]:
        raise bad("PaliGemma answers one prompt about one image and keeps no conversation: send exactly one "
                  f"message, with role 'user' (got roles {roles})", "messages")
    content = messages[0].get("content")
    if isinstance(content, str):
        raise bad("the message has no image: give content as a list with an image_url part and a text part",
                  "messages")
    if not isinstance(content, list):
        raise bad("the message's content must be a list of parts (text and image_url)", "messages")
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad('an image_url part needs {"image_url": {"url": "data:image/png;base64,..."}}', "messages")
            urls.append(url)
        else:
            raise bad(f"unsupported content part {json.dumps(part)[:80]}: use text and image_url parts", "messages")
    if not urls:
        raise bad("the message has no image: add an image_url part", "messages")
    if len(urls) > MAX_IMAGES:
        raise bad(f"a request takes at most {MAX_IMAGES} images (their tokens share the model's context), got "
                  f"{len(urls)}: send fewer", "messages")
    got = [read_image(url, fetch, images) for url in urls]
    return got[0] if len(got) == 1 else got, " ".join(texts)


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+/-]*)(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)", re.S)
_URL_SAFE = str.maketrans("-_", "+/")


class ImageCache:
    """The last images decoded (at most `size` of them and `max_bytes` of pixels), by a hash of their bytes.
    Requests that send the same image get the same image object, so that a batch of questions about one image
    encodes it once (Pipeline.generate shares the vision pass between rows that show the same object), and it is
    decoded once. Images are kept as decoded, at full size (the model's resize must start from them), so the bound
    is in bytes too: a 9000 x 9000 PNG of a few hundred KB decodes to ~240 MB, and one bigger than the whole budget
    is not kept. Thread-safe."""

    def __init__(self, size: int = 32, max_bytes: int = 256 << 20):
        self.size, self.max_bytes = size, max_bytes
        self._images, self._bytes, self._lock = OrderedDict(), 0, threading.Lock()

    @staticmethod
    def nbytes(image: Image.Image) -> int:
        return image.width * image.height * len(image.getbands())

    def get(self, data: bytes, decode: Callable[[bytes], Image.Image]) -> Image.Image:
        key = hashlib.sha256(data).digest()
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        image = decode(data)  # outside the lock: decoding is the slow part, and handler threads run it in parallel
        if self.nbytes(image) > self.max_bytes:
            return image
        with self._lock:
            if key not in self._images:
                self._images[key] = image
                self._bytes += self.nbytes(image)
            image = self._images[key]  # one object even if two threads decoded it at once
            self._images.move_to_end(key)
            while len(self._images) > self.size or self._bytes > self.max_bytes:
                _, old = self._images.popitem(last=False)
                self._bytes -= self.nbytes(old)
        return image


def read_image(url: str, fetch: Callable[[str], bytes] | None, images: ImageCache | None = None) -> Image.Image:
    url = url.strip()
    scheme = url.split(":", 1)[0].lower()  # URL schemes are case-insensitive: DATA:, HTTP:
    if scheme in ("data", "http", "https"):
        url = scheme + url[len(scheme):]
    match = _DATA_URL.fullmatch(url) if url.startswith("data:") else None
    if match:
        text = re.sub(r"\s+", "", match["data"])
        text = text.translate(_URL_SAFE) + "=" * (-len(text) % 4)  # URL-safe base64, and padding left out: accepted
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise bad("the image data URL's base64 is damaged", "messages") from None
    elif url.startswith("data:"):
        raise bad("an image data URL must be base64: data:image/png;base64,...", "messages")
    elif url.startswith(("http://", "https://")):
        if fetch is None:
            raise bad("this server does not fetch image URLs: send the image as a data URL "
                      "(data:image/png;base64,...)", "messages")
        data = fetch(url)
    else:
        raise bad(f"image_url must be a data URL (data:image/png;base64,...) or an http(s) URL, got {url[:40]!r}",
                  "messages")
    return images.get(data, decode_image) if images is not None else decode_image(data)


# Decoded by running another program (Ghostscript, with a history of code-execution bugs): Pillow's advice is to block.
REFUSED_FORMATS = {"EPS": "Pillow renders EPS with Ghostscript, which this server does not run on a client's file"}


def decode_image(data: bytes) -> Image.Image:
    too_big = bad(f"the image has too many pixels (over {Image.MAX_IMAGE_PIXELS:,}): send a smaller one", "messages")
    if not data:
        raise bad("cannot decode the image: it is empty (0 bytes)", "messages")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # the header only: a huge image is refused before it is decoded
            pixels, kind = probe.width * probe.height, probe.format
    except Image.DecompressionBombError:
        raise too_big from None
    except OSError:  # (UnidentifiedImageError too) load_image says what is wrong with it
        pixels, kind = 0, None
    if kind in REFUSED_FORMATS:  # (load_image opens the same bytes with the same plugins: it would find the same)
        raise bad(f"{kind} images are not accepted ({REFUSED_FORMATS[kind]}): send PNG, JPEG or WebP", "messages")
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:  # (load_image refuses only twice as many)
        raise too_big
    try:
        return load_image(data)
    except InputError as e:  # "cannot decode image bytes: it is not in a format ...", "...: image file is truncated"
        raise bad(str(e).replace("image bytes", "the image"), "messages") from None
