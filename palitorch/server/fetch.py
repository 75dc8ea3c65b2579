"""Fetching an image URL for a request, without letting clients reach what only the server can reach.

A server that fetches any URL it is given is a proxy into its own network (SSRF): a client could read cloud metadata
(169.254.169.254), services bound to localhost, or map a private network's open ports from the errors. So:

- link-local addresses (169.254/16, fe80::/10: cloud metadata lives there) and known metadata addresses are never
  fetched;
- loopback and private addresses (127/8, ::1, 10/8, 172.16/12, 192.168/16, fc00::/7, ...: anything not global) are
  fetched only when `allow_private` (`palitorch serve --fetch-private`): off by default, even for a server bound
  to 127.0.0.1, which a reverse proxy or a tunnel may open to anyone.

The host name is resolved once, every address it resolves to is checked, and the connection goes to a checked
address (no second lookup that could answer otherwise). Each redirect is checked the same way, and only http(s) is
opened. The whole fetch (name lookups, connections, redirects, headers and body) must end within its timeout: a site
that trickles its answer a byte at a time is cut off then, as each read waiting less than the timeout would not be, a
name with many addresses that take no connection is not tried for a timeout each, and a resolver that does not
answer is not waited for. Errors give a short
reason, not the remote's own words.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from palitorch.server.openai import bad
from palitorch.server.sockets import shutdown

MAX_IMAGE_BYTES = 20 << 20
# Metadata services outside 169.254/16: AWS's IPv6 one, Alibaba's.
METADATA = {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an IP literal: itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def lookup(host: str, port: int, wait: float | None = None) -> list[str]:
    """`resolve`, within `wait` seconds (None: as long as it takes). The system's resolver has no timeout of its
    own, so the lookup runs on a daemon thread that is left to finish alone once the time is up: TimeoutError."""
    if wait is None:
        return resolve(host, port)
    found: list = []

    def run():
        try:
            found.append(resolve(host, port))
        except BaseException as e:  # (handed to the waiting thread)
            found.append(e)

    thread = threading.Thread(target=run, name="palitorch-resolve", daemon=True)
    thread.start()
    thread.join(max(0.0, wait))
    if not found:
        raise TimeoutError("timed out")
    if isinstance(found[0], BaseException):
        raise found[0]
    return found[0]


def check_address(host: str, address: str, allow_private: bool) -> None:
    """ApiError 400 if the server must not connect to `address` (one of `host`'s)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # fe80::1%eth0: the zone is not part of the address
    ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
    if ip.is_link_local or ip in METADATA:
        raise bad(f"the image URL's host {host} is at a link-local address ({ip}), which this server never fetches: "
                  "send the image as a data URL", "messages")
    if not ip.is_global and not allow_private:
        raise bad(f"the image URL's host {host} is at a private address ({ip}): send the image as a data URL, or "
                  "start the server with --fetch-private to let it fetch private addresses", "messages")


class _Check(urllib.request.BaseHandler):
    """Before each request the opener makes (the first and every redirect's): resolve its host, check every address,
    and keep them on the request for the connection (`_Pinned`)."""

    def __init__(self, allow_private: bool, deadline: Deadline | None = None):
        self.allow_private, self.deadline = allow_private, deadline

    def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
        parts = urllib.parse.urlsplit(req.full_url)
        try:
            host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
            if not host:
                raise ValueError
        except ValueError:
            raise bad(f"the image URL {req.full_url[:80]} has no valid host and port", "messages") from None
        try:
            addresses = lookup(host, port, None if self.deadline is None else self.deadline.left(None))
        except TimeoutError:  # (the fetch's time ran out while the name was looked up)
            raise bad(f"cannot fetch the image at {req.full_url[:80]}: timed out", "messages") from None
        except (OSError, UnicodeError):
            raise bad(f"cannot fetch the image at {req.full_url[:80]}: unknown host {host[:80]}", "messages") from None
        for address in addresses:
            check_address(host, address, self.allow_private)
        req.checked = (host, addresses)
        return req

    https_request = http_request


class Deadline:
    """The connections of one fetch, shut down when its time is up (`expire`, by a timer): a read blocked on a site
    that trickles its answer returns at once, where a socket's own timeout bounds only each wait for the next bytes.
    It keeps a duplicate of each socket (shutting one down shuts the connection down, TLS or not, and the duplicate
    stays valid after http.client wraps or closes its own); `close` once the fetch ends. `timeout`: the seconds it
    has, which bound each connection attempt too (`left`)."""

    def __init__(self, timeout: float | None = None):
        self.expired, self._sockets, self._lock = False, [], threading.Lock()
        self._end = None if timeout is None else time.monotonic() + timeout

    def left(self, wait):
        """A connection attempt's timeout `wait` (None: none), cut to the time the fetch has left; TimeoutError when
        none is left."""
        if self._end is None:
            return wait
        left = self._end - time.monotonic()
        if self.expired or left <= 0:
            raise TimeoutError("timed out")
        return min(wait, left) if isinstance(wait, (int, float)) else left

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock.dup())
            if self.expired:
                shutdown(self._sockets[-1])

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                shutdown(sock)

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets = []


def _pinned(connection_class, req, deadline: Deadline | None = None):
    """`connection_class`, connecting to the addresses `_Check` checked for `req` instead of looking its host up
    again. Through a proxy the connection is to the proxy, which resolves the host itself: it stays as it is. Each
    connection goes to `deadline`, and each attempt to connect waits no longer than the time it has left."""

    def make(host, **kw):
        conn = connection_class(host, **kw)
        name, addresses = getattr(req, "checked", (None, ()))
        pinned = name is not None and conn.host.lower() == name.lower()

        def attempt(address, timeout, source_address):
            wait = timeout if deadline is None else deadline.left(timeout)
            return socket.create_connection(address, wait, source_address)

        def connect(address, timeout, source_address=None):
            if not pinned:
                sock = attempt(address, timeout, source_address)
            else:
                error = OSError(f"cannot connect to {name}")
                for ip in addresses:
                    try:
                        sock = attempt((ip, address[1]), timeout, source_address)
                        break
                    except OSError as e:
                        error = e
                else:
                    raise error
            if deadline is not None:
                deadline.add(sock)
            return sock

        conn._create_connection = connect  # http.client's hook: HTTPS wraps this socket for `name`
        return conn

    return make


class _Pinning:
    """An http(s) handler whose connections go to `_pinned`'s checked addresses, and to `deadline`."""

    def __init__(self, deadline: Deadline | None = None):
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class, req, **kw):
        return super().do_open(_pinned(http_class, req, self.deadline), req, **kw)


class _PinnedHTTP(_Pinning, urllib.request.HTTPHandler):
    pass


class _PinnedHTTPS(_Pinning, urllib.request.HTTPSHandler):
    pass


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Redirects to http(s) only (urllib's own also follows ftp); the new URL's address is checked by `_Check`."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = urllib.parse.urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
        if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
            fp.close()
            raise bad(f"the image at {req.full_url[:80]} redirects to a URL that is not http(s)", "messages")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def opener(allow_private: bool, deadline: Deadline | None = None) -> urllib.request.OpenerDirector:
    """urllib's opener for http(s) only (no ftp:, file: or data:), every connection checked (and its socket given to
    `deadline`)."""
    director = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), _PinnedHTTP(deadline),
                    _PinnedHTTPS(deadline),
                    urllib.request.HTTPDefaultErrorHandler(), _Redirects(), urllib.request.HTTPErrorProcessor(),
                    _Check(allow_private, deadline)):
        director.add_handler(handler)
    return director


def _reason(e: Exception) -> str:
    """A short reason for a failed fetch: what kind of failure, not the remote's own words."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError):
        e = e.reason  # what went wrong underneath (an exception, or a string)
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, socket.gaierror):
        return "unknown host"
    if isinstance(e, ssl.SSLError):
        return "TLS error"
    if isinstance(e, (ValueError, http.client.InvalidURL)):  # (InvalidURL: control characters, a bad port)
        return "not a valid URL"
    if isinstance(e, http.client.HTTPException):  # before OSError: a connection closed without an answer is both
        return "no HTTP answer"
    if isinstance(e, OSError):
        return "could not connect"
    return "the fetch failed"


def fetch_url(url: str, allow_private: bool = False, timeout: float = 15.0, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes at an http(s) URL, at most `limit` of them, all within `timeout` seconds; ApiError 400 on any
    failure or refused address."""
    deadline = Deadline(timeout)
    timer = threading.Timer(timeout, deadline.expire)
    timer.daemon = True
    timer.start()
    try:  # (Request parses the URL: an unclosed IPv6 bracket is its ValueError)
        request = urllib.request.Request(url, headers={"User-Agent": "palitorch"})
        if request.type in ("http", "https") and not request.host:  # http:///a.png (urllib: "no host given")
            raise bad(f"the image URL {url[:80]} has no valid host and port", "messages")
        with opener(allow_private, deadline).open(request, timeout=timeout) as response:
            data = response.read(limit + 1)
        if deadline.expired:  # (a body without a length reads as ended when its socket is shut down)
            raise TimeoutError
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:  # e.g. not HTTP at all
        reason = "timed out" if deadline.expired else _reason(e)
        raise bad(f"cannot fetch the image at {url[:80]}: {reason}", "messages") from None
    finally:
        timer.cancel()
        deadline.close()
    if len(data) > limit:
        raise bad(f"the image at {url[:80]} is over {limit >> 20} MiB", "messages")
    return data
