"""A chat completion streamed as server-sent events: what `POST /v1/chat/completions` with `"stream": true` sends.

    data: {chunk: choice 0's role}  ...  data: {chunk: a text piece of choice i}  ...  data: {chunk: choice i ends}
    ...  (data: {chunk: usage})  data: [DONE]

Each event is one `data:` line of JSON and a blank line; the connection's end is the stream's end.
"""

from __future__ import annotations

import json

from palitorch.server.responses import chunk, finish_reason, joined, token_entry, usage
from palitorch.tasks import task_outputs

_NEXT = object()  # `stream`'s first item: the next one in the job's queue


def stream(handler, job, rid: str, created: int, first=_NEXT) -> None:
    """Send a job's answer through `handler` (the request's http.Handler) as it comes: a role chunk for each of the
    n choices, their text pieces (the chunks of different choices interleave, each naming its index), each choice's
    finish chunk as soon as its answer ends, (usage), [DONE]. The status line waits for the first piece, so a
    refused input is still an ordinary error response. With logprobs, each piece's chunk carries its tokens'
    entries (`Piece.tokens`), and the finish chunk those of tokens that brought no text of their own after the last
    piece. A client that leaves cancels the job (the engine frees its rows at the next step). `first`: the job's
    first item if the caller has taken it already (waiting for it, the handler watches for a client that leaves)."""
    if first is _NEXT:
        first = job.pieces.get()
    if first is None and job.error is not None:
        raise job.error
    model = handler.server.model_id
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header("Connection", "close")  # the stream's end is the connection's end: no length needed
    handler.end_headers()
    handler.close_connection = True
    handler._streaming = True  # from here an error goes into the stream, not into a second status line
    tokenizer = handler.server.engine.pipe.processor.tokenizer
    req = job.request
    sent = [0] * req.n  # token entries sent so far, per choice
    extra = {"usage": None} if req.include_usage else {}  # (as OpenAI: every chunk has usage, null until the last)

    def entries(tokens, text: str, i: int) -> list[dict] | None:
        if not req.logprobs:
            return None
        out = [token_entry(tokenizer, t, lp, alt) for t, lp, alt in tokens]
        return joined(out, text) if sent[i] == 0 else out  # the answer's first token, as its text begins

    try:
        for i in range(req.n):
            event(handler, chunk(rid, created, model, {"role": "assistant", "content": ""}, index=i) | extra)
        item = first
        while item is not None:
            i, got = item
            if isinstance(got, str):  # a text piece
                tokens = getattr(got, "tokens", ())
                event(handler, chunk(rid, created, model, {"content": got}, logprobs=entries(tokens, got, i),
                                     index=i) | extra)
                sent[i] += len(tokens)
            else:  # choice i's Result: it has ended (a detect / segment prompt's objects ride on this chunk)
                alternatives = got.top_logprobs or [None] * len(got.token_ids)
                rest = list(zip(got.token_ids, got.logprobs, alternatives))[sent[i]:]
                event(handler, chunk(rid, created, model, {}, finish_reason(got), index=i,
                                     logprobs=entries(rest, got.text, i) if rest else None,
                                     extra=task_outputs(req.prompt, got.text, *req.size) if req.size else {}) | extra)
            item = job.pieces.get()
        # None came: the job's results or error are set (before it, as the engine finishes a job)
        if job.error is not None:  # failed after the status line went out: say so in the stream
            event(handler, job.error.body())
        elif job.results and req.include_usage:  # (no results when the job was cancelled: the stream just ends)
            event(handler, chunk(rid, created, model, {}, usage_=usage(job.results), choices=False))
        handler.wfile.write(b"data: [DONE]\n\n")
        handler.wfile.flush()
    except OSError:  # the client went away: stop generating for it
        job.cancelled.set()


def event(handler, obj: dict) -> None:
    handler.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
    handler.wfile.flush()
