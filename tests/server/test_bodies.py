"""read_body at its limits: a body of exactly the server's limit is read, one byte more is refused (413), with a
Content-Length or in chunks."""

import io

import pytest

from palitorch.server.bodies import read_body
from palitorch.server.openai import ApiError


class Handler:
    def __init__(self, headers: dict, data: bytes):
        self.headers, self.rfile, self.close_connection = headers, io.BytesIO(data), False


def chunked(body: bytes, size: int) -> bytes:
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("size", [100, 101])
def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(size):
    body = b"x" * size
    for headers, data in (({"Content-Length": str(size)}, body),
                          ({"Transfer-Encoding": "chunked"}, chunked(body, 30))):
        handler = Handler(headers, data)
        if size <= 100:
            assert read_body(handler, 100) == body
        else:
            with pytest.raises(ApiError) as e:
                read_body(handler, 100)
            assert e.value.status == 413 and handler.close_connection
