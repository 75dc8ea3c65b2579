"""A request's body as the HTTP server reads it: by its Content-Length, or in chunks (Transfer-Encoding: chunked),
within the server's limit. What cannot be read so is an ApiError (411, 413, 408, 400) that says what to send
instead, and the connection ends after it (its unread rest cannot be skipped)."""

from __future__ import annotations

import re

from palitorch.server.openai import ApiError

_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")  # a chunk's size
MAX_CHUNKS = 1 << 16  # a chunked body in more pieces than this (1-byte chunks, say) costs more to read than it is worth


def read_body(handler, limit: int) -> bytes:
    """The body of the request `handler` (an http.server request handler) is answering, at most `limit` bytes."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        return read_chunked(handler, limit)
    try:
        length = int(handler.headers.get("Content-Length", ""))
        if length < 0:  # rfile.read(-1) would wait for the client to close the connection
            raise ValueError
    except ValueError:
        handler.close_connection = True
        raise ApiError(411, "the request needs a Content-Length header giving the body's size in bytes") from None
    if length > limit:
        handler.close_connection = True  # the unread body cannot be skipped: end the connection
        raise ApiError(413, f"the request body is {length:,} bytes, over the server's limit of {limit:,}: send a "
                       "smaller image")
    try:
        data = handler.rfile.read(length)
    except TimeoutError:  # nothing came for the server's client timeout
        data = b""
    if len(data) < length:  # the client stopped sending, or closed its side, before the end of its body
        handler.close_connection = True
        raise ApiError(408, f"the request body ended before the {length:,} bytes its Content-Length announced: "
                       "send the whole body without pausing")
    return data


def read_chunked(handler, limit: int) -> bytes:
    """A body sent in chunks (each chunk is its size in hex, CRLF, the bytes, CRLF; a size of 0 ends it). The
    connection closes after the request: a body sent so may also carry a Content-Length, and no proxy between may
    disagree on where this request ends."""
    handler.close_connection = True
    rfile, data, chunks = handler.rfile, bytearray(), 0
    try:
        while True:
            line = rfile.readline(1024)
            if not line:  # the client closed its side
                raise TimeoutError
            digits = line.split(b";")[0].strip()  # (";name=value" chunk extensions are ignored)
            if not _HEX.fullmatch(digits) or (chunks := chunks + 1) > MAX_CHUNKS:
                raise ApiError(400, f"the chunked request body is malformed (a chunk size of {line[:20]!r}, or "
                               f"over {MAX_CHUNKS:,} chunks): send it with a Content-Length header")
            size = int(digits, 16)
            if size == 0:
                break
            if len(data) + size > limit:
                raise ApiError(413, f"the request body is over the server's limit of {limit:,} bytes: send a "
                               "smaller image")
            piece = rfile.read(size)
            if len(piece) < size:
                raise TimeoutError
            data += piece
            if rfile.readline(3).strip():
                raise ApiError(400, f"the chunked request body is malformed (a chunk longer than its size, {size}): "
                               "send it with a Content-Length header")
        while rfile.readline(8192).strip():  # trailer fields, if any, up to the blank line
            pass
    except TimeoutError:
        raise ApiError(408, "the chunked request body ended before its last (empty) chunk: send the whole body "
                       "without pausing") from None
    return bytes(data)
