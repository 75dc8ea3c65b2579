"""Two things the server asks of a connected socket: end it from this side, and whether the other side has."""

from __future__ import annotations

import socket


def shutdown(connection: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """Shut a connection down (`how`: socket.SHUT_RD, SHUT_WR or SHUT_RDWR); one the other side has closed already
    is left as it is. A read blocked on it returns at once."""
    try:
        connection.shutdown(how)
    except OSError:  # already closed by the client
        pass


def peer_closed(connection: socket.socket) -> bool:
    """Whether the other side has closed its side of the connection (it reads as at its end: a timed-out SDK does
    so, and so would one that only shut down its sending side) or reset it. A peek that does not wait."""
    timeout = connection.gettimeout()
    try:
        connection.settimeout(0)
        return connection.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):  # nothing to read: still there
        return False
    except OSError:  # reset
        return True
    finally:
        connection.settimeout(timeout)
