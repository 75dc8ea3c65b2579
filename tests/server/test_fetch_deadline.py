"""An image fetch ends within its timeout in all (palitorch/server/fetch.py's Deadline): connecting included, over
TLS, through a proxy, for a connection that completes as the time runs out; and a fetch leaves no timer thread or
socket behind. (test_fetch.py has the plain trickling site, and a site that does not answer.)"""

import os
import socket
import socketserver
import ssl
import threading
import time
import warnings
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from serverkit import serving
from test_fetch import PNG, Site

from palitorch.server import fetch
from palitorch.server.fetch import fetch_url
from palitorch.server.openai import ApiError

STOP = threading.Event()  # ends every trickling site (else each goes on until its client hangs up)


class Trickle(socketserver.BaseRequestHandler):
    """Reads the request, then sends `start` and a byte every 20 ms, never finishing."""

    start = b"HTTP/1.1 200 OK\r\nX-Slow: "

    def handle(self):
        self.request.recv(65536)
        try:
            self.request.sendall(self.start)
            while not STOP.wait(0.02):
                self.request.sendall(b"a")
        except OSError:  # the client has gone
            pass


# A throwaway self-signed key and certificate for 127.0.0.1 (tests only), valid until 2126
KEY_AND_CERTIFICATE = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg5hrTU7tRVvZjA7vA
OgR6WOV2gLlPju01V2dv2692CpyhRANCAAQEvwgXJuyOzl4MZOZGfbIYS/pARnV3
SebfVcR1/LQccvj50zeu6greuW6FvXFVrk3vfEZga9Mt8rYyKfq2UiS6
-----END PRIVATE KEY-----
-----BEGIN CERTIFICATE-----
MIIBfzCCASWgAwIBAgIUARhCFJ5RR6dLeEHb+EdNI5IzIBswCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJMTI3LjAuMC4xMCAXDTI2MTIwNzE4NTYyOFoYDzIxMjYxMTEz
MTg1NjI4WjAUMRIwEAYDVQQDDAkxMjcuMC4wLjEwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAQEvwgXJuyOzl4MZOZGfbIYS/pARnV3SebfVcR1/LQccvj50zeu6gre
uW6FvXFVrk3vfEZga9Mt8rYyKfq2UiS6o1MwUTAdBgNVHQ4EFgQUqD6DBwgG+2uT
5+SuOq8uXubOBrIwHwYDVR0jBBgwFoAUqD6DBwgG+2uT5+SuOq8uXubOBrIwDwYD
VR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiEA2yyKKElxJT2ecXSSpA3i
jsLAFUoD//p2pAukD/wPxtYCIHQhNwTi1UayXhtoOzKCtn9Bo1B9N/QY3vgJXl6N
RA6B
-----END CERTIFICATE-----
"""


class TlsTrickle(Trickle):
    """Over TLS: a complete header, then a body of 100000 bytes that trickles."""

    start = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    context = None

    def setup(self):
        self.request = self.context.wrap_socket(self.request, server_side=True)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost,images.test")


@contextmanager
def trickling(handler=Trickle):
    """A trickling site's port; after the block, it stops (and the test's safety net: 10 s at most)."""
    STOP.clear()
    timer = threading.Timer(10, STOP.set)
    timer.start()
    try:
        with serving(socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)) as site:
            yield site.server_address[1]
            STOP.set()
    finally:
        timer.cancel()
        STOP.set()


def timed_out(url: str, timeout: float = 0.5) -> float:
    """Seconds the fetch of `url` took to be refused as timed out."""
    start = time.monotonic()
    with pytest.raises(ApiError) as e:
        fetch_url(url, allow_private=True, timeout=timeout)
    assert e.value.message == f"cannot fetch the image at {url}: timed out"
    return time.monotonic() - start


def test_an_https_site_that_trickles_its_answer_times_out_all_the_same(tmp_path, monkeypatch):
    """http.client wraps the socket it connected for TLS (that socket is then detached): the deadline's own duplicate
    still ends the connection. (A TLS read's timeout bounds each read, as a plain socket's does.)"""
    (tmp_path / "site.pem").write_text(KEY_AND_CERTIFICATE)
    TlsTrickle.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    TlsTrickle.context.load_cert_chain(tmp_path / "site.pem")
    monkeypatch.setattr(ssl, "_create_default_https_context", ssl._create_unverified_context)  # (self-signed)
    with trickling(TlsTrickle) as port:
        assert timed_out(f"https://127.0.0.1:{port}/a.png") < 5


def test_a_fetch_through_a_proxy_times_out_all_the_same(monkeypatch):
    """The connection to the proxy (not pinned to the image host's address) is the deadline's too."""
    monkeypatch.setattr(fetch, "resolve", lambda host, port: ["127.0.0.1"])
    with trickling() as port:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
        monkeypatch.delenv("no_proxy")
        monkeypatch.delenv("NO_PROXY")
        assert timed_out("http://images.test/a.png") < 5


def test_a_connection_made_as_the_time_runs_out_is_cut_off_at_once(monkeypatch):
    """Connected while the timer fired (the socket not yet the deadline's): it is shut down as it is handed over."""
    connect = socket.create_connection

    def late(address, timeout=None, source_address=None):
        sock = connect(address, timeout, source_address)
        time.sleep(0.8)  # past the 0.5 s
        return sock

    monkeypatch.setattr(socket, "create_connection", late)
    with trickling() as port:
        assert timed_out(f"http://127.0.0.1:{port}/a.png") < 5


def test_connecting_counts_against_the_timeout_too(monkeypatch):
    """A name with several addresses: one that refuses the connection after 0.6 s, then some that take none (their
    packets dropped). Each attempt waited the whole timeout, one after another (here 3.6 s for a 1 s timeout; at
    15 s, a minute): the second now waits what is left of the second, and none is made after."""
    monkeypatch.setattr(fetch, "resolve", lambda host, port: ["93.184.216.1", "93.184.216.2", "93.184.216.3",
                                                              "93.184.216.4"])
    waits = []

    def connect(address, timeout=None, source_address=None):
        waits.append(timeout)
        if address[0] == "93.184.216.1":
            time.sleep(0.6)
            raise ConnectionRefusedError(111, "refused")
        time.sleep(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", connect)
    assert timed_out("http://images.test/a.png", timeout=1.0) < 3  # (~1 s; each attempt waiting 1 s: 3.6 s)
    assert len(waits) == 2 and 0.5 < waits[0] <= 1.0 and 0 < waits[1] <= 0.4


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="Linux's /proc/self/fd")
def test_a_fetch_leaves_no_timer_thread_or_socket_behind():
    threads = set(threading.enumerate())
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Site)) as site:
        url = f"http://127.0.0.1:{site.server_address[1]}/a.png"
        assert fetch_url(url, allow_private=True) == PNG  # (the first fetch imports what it needs)
        fds = len(os.listdir("/proc/self/fd"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for _ in range(3):
                assert fetch_url(url, allow_private=True) == PNG
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)]  # (a socket left to be collected)
        for _ in range(100):  # (the site's handler threads close their sides)
            if len(os.listdir("/proc/self/fd")) <= fds:
                break
            time.sleep(0.02)
        assert len(os.listdir("/proc/self/fd")) <= fds, "a fetch left a socket open"
    timers = [t for t in threading.enumerate() if t not in threads and isinstance(t, threading.Timer)]
    for t in timers:
        t.join(2)
    assert not any(t.is_alive() for t in timers), "a fetch's timer waits on (15 s, the default timeout)"


def test_a_name_lookup_that_does_not_answer_counts_against_the_timeout(monkeypatch):
    """The system's resolver has no timeout of its own (a DNS server that drops the query: ~5 s per try, several
    tries); the fetch is refused when its time is up, its lookup left to finish alone, and a lookup that fails in
    time is still an unknown host."""
    answered = threading.Event()

    def stuck(host, port):
        answered.wait(30)  # (answers when the test ends)
        return ["93.184.216.34"]

    monkeypatch.setattr(fetch, "resolve", stuck)
    try:
        assert timed_out("http://images.test/a.png") < 5
    finally:
        answered.set()

    def unknown(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(fetch, "resolve", unknown)
    with pytest.raises(ApiError) as e:
        fetch_url("http://images.test/a.png", timeout=5)
    assert e.value.message.endswith(": unknown host images.test")
