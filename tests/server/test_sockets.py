"""The server's two socket helpers (palitorch/server/sockets.py): shutdown, and peer_closed, the check that a client
waiting for its answer is still there (a pipelined request's bytes must stay for the handler to read)."""

import select
import socket
import struct

from palitorch.server.sockets import peer_closed, shutdown


def test_peer_closed_peeks_without_taking_a_byte_or_changing_the_timeout():
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(7.0)
        assert not peer_closed(a) and a.gettimeout() == 7.0
        b.sendall(b"GET / HTTP/1.1\r\n")  # the client's next request, pipelined
        assert not peer_closed(a) and a.gettimeout() == 7.0
        b.close()
        assert not peer_closed(a)  # its bytes wait to be read before the end
        assert a.recv(100) == b"GET / HTTP/1.1\r\n"  # all of them
        assert peer_closed(a) and a.gettimeout() == 7.0


def test_a_connection_reset_is_closed_at_the_first_check():
    """A reset reads as an error once (ECONNRESET), then as the end: the first check must say so."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with conn:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # a reset, not a close
            assert select.select([conn], [], [], 5)[0], "the reset did not arrive"
            assert peer_closed(conn)


def test_shutdown_ends_the_directions_asked_and_leaves_a_closed_connection_alone():
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        shutdown(a)  # both: the other side reads the end, and a read on this side returns at once
        assert b.recv(1) == b"" and a.recv(1) == b""
        b.close()
        shutdown(a)  # (again, the other side gone: no error)
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        shutdown(a, socket.SHUT_RD)  # the reading side only: an answer still goes out
        assert a.recv(1) == b""
        a.sendall(b"reply")
        assert b.recv(5) == b"reply"
