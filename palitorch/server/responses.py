"""Results back out in OpenAI's shapes: the chat.completion object of a request's n answers, and the
chat.completion.chunk objects of a stream (sse.py sends them). Plain data only, as openai.py (which reads the
requests)."""

from __future__ import annotations

import math

from palitorch.inference.answer import Result
from palitorch.inference.processor import token_bytes
from palitorch.server.openai import ChatRequest
from palitorch.tasks import task_outputs


def finish_reason(result: Result) -> str:
    return "length" if result.finish_reason == "length" else "stop"  # palitorch's "eos" and "stop" are both stops


def usage(results: list[Result]) -> dict:
    prompt = results[0].prompt_tokens
    # the EOS that ended an answer was generated too, though it is not in the text
    completion = sum(len(r.token_ids) + (r.finish_reason == "eos") for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_entry(tokenizer, token: int, logprob: float, alternatives: list | None = None) -> dict:
    """One item of a choice's logprobs.content: the token's text (see `processor.token_bytes`: sentencepiece's word
    mark as a space, a byte-fallback token <0xNN> as its byte), its bytes, its logprob (-9999 for -inf, as OpenAI
    does), and its step's `alternatives` ((id, logprob) pairs, most likely first) as `top_logprobs` entries."""
    raw = token_bytes(tokenizer, token)
    return {"token": raw.decode("utf-8", errors="backslashreplace"),
            "logprob": logprob if math.isfinite(logprob) else -9999.0, "bytes": list(raw),
            "top_logprobs": [{k: v for k, v in token_entry(tokenizer, i, lp).items() if k != "top_logprobs"}
                             for i, lp in alternatives or []]}


def joined(entries: list[dict], text: str) -> list[dict]:
    """An answer's first token entries as its text begins: a tokenizer's decoder may drop the word mark (a space)
    that starts an answer (Gemma's does: "▁▁x" is " x"), so where the entries begin with more spaces than the text,
    the first token's text and bytes lose one too, and the tokens join into the content, as OpenAI's do. So do the
    first step's alternatives that begin with one (each would have begun the answer the same way): the chosen token
    reads the same in `top_logprobs` as in its entry ("yes" in both, for a client that looks it up by text)."""
    def spaces(data: bytes) -> int:
        return len(data) - len(data.lstrip(b" "))

    def unspaced(entry: dict) -> dict:
        if entry["bytes"][:1] != [32]:
            return entry
        raw = bytes(entry["bytes"][1:])
        return entry | {"token": raw.decode("utf-8", errors="backslashreplace"), "bytes": list(raw)}

    tokens = b"".join(bytes(e["bytes"]) for e in entries)
    if entries and entries[0]["bytes"][:1] == [32] and spaces(tokens) > spaces(text.encode()):
        entries[0] = unspaced(entries[0])
        if "top_logprobs" in entries[0]:
            entries[0]["top_logprobs"] = [unspaced(alt) for alt in entries[0]["top_logprobs"]]
    return entries


def completion(rid: str, created: int, model: str, req: ChatRequest, results: list[Result], tokenizer) -> dict:
    """The chat.completion object for a request's n results. Detect/segment prompts add each choice's parsed
    objects (boxes in the image's pixels) as `detections` / `segmentations` beside the message."""
    choices = []
    for i, r in enumerate(results):
        choice = {"index": i, "message": {"role": "assistant", "content": r.text, "refusal": None},
                  "finish_reason": finish_reason(r), "logprobs": None}
        if req.logprobs:
            alternatives = r.top_logprobs or [None] * len(r.token_ids)
            entries = [token_entry(tokenizer, t, p, alt) for t, p, alt in zip(r.token_ids, r.logprobs, alternatives)]
            choice["logprobs"] = {"content": joined(entries, r.text), "refusal": None}
        choice.update(task_outputs(req.prompt, r.text, *req.size) if req.size else {})
        choices.append(choice)
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(results)}


def chunk(rid: str, created: int, model: str, delta: dict, finish: str | None = None,
          usage_: dict | None = None, choices: bool = True, logprobs: list[dict] | None = None,
          extra: dict | None = None, index: int = 0) -> dict:
    """One chat.completion.chunk of a stream: a delta of choice `index` (with `logprobs`, the `token_entry`s of its
    tokens), or (choices=False) the usage chunk that ends it. `extra`: fields beside the choice's delta (the
    finishing chunk's `detections` / `segmentations`, as a completion's choice has them)."""
    content = {"content": logprobs, "refusal": None} if logprobs is not None else None
    choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": content, **(extra or {})}
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [choice] if choices else []}
    if usage_ is not None or not choices:
        out["usage"] = usage_
    return out
