"""Fetching image URLs (palitorch/server/fetch.py): link-local and metadata addresses never, loopback and private
ones only when allowed, checked on every address a name resolves to and on every redirect, and the connection made
to the address checked; failures give a short reason."""

import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from serverkit import png_bytes, serving

from palitorch.server import fetch
from palitorch.server.fetch import check_address, fetch_url
from palitorch.server.openai import ApiError

PNG = png_bytes(Image.new("RGB", (4, 3), "red"))


def refusal(url, allow_private=False) -> str:
    with pytest.raises(ApiError) as e:
        fetch_url(url, allow_private=allow_private)
    assert e.value.status == 400 and e.value.param == "messages"
    return e.value.message


@pytest.mark.parametrize("address", ["169.254.169.254", "169.254.0.1", "fe80::1", "::ffff:169.254.169.254",
                                     "fd00:ec2::254", "100.100.100.200", "fd00:ec2::254%eth0",
                                     "fe80::1%lo"])
def test_link_local_and_metadata_addresses_are_never_fetched(address):
    """(A zone, %eth0, is no part of the address: the metadata address with one is still the metadata address.)"""
    for allow_private in (False, True):
        with pytest.raises(ApiError) as e:
            check_address("host", address, allow_private)
        assert "never fetches" in e.value.message


@pytest.mark.parametrize("address", ["127.0.0.1", "127.1.2.3", "::1", "10.1.2.3", "172.16.0.1", "172.31.255.1",
                                     "192.168.1.1", "fd12::1", "0.0.0.0", "::ffff:127.0.0.1", "100.64.0.1"])
def test_loopback_and_private_addresses_only_when_allowed(address):
    with pytest.raises(ApiError) as e:
        check_address("host", address, allow_private=False)
    assert e.value.message == (f"the image URL's host host is at a private address ({address.removeprefix('::ffff:')})"
                               ": send the image as a data URL, or start the server with --fetch-private to let it "
                               "fetch private addresses")
    check_address("host", address, allow_private=True)


def test_public_addresses_are_fetched():
    for address in ("8.8.8.8", "172.32.0.1", "2606:4700::1111"):
        check_address("host", address, allow_private=False)


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/a.png", "http://localhost:1/a.png", "http://[::1]:1/a.png",
                                 "http://10.0.0.1/a.png", "https://192.168.0.1/a.png"])
def test_private_urls_are_refused_before_connecting(url):
    assert "is at a private address" in refusal(url)


def test_every_address_a_name_resolves_to_is_checked(monkeypatch):
    monkeypatch.setattr(fetch, "resolve", lambda host, port: ["93.184.216.34", "127.0.0.1"])
    assert "host images.test is at a private address (127.0.0.1)" in refusal("http://images.test/a.png")


BIG = bytes(1 << 20) + b"!"  # one byte over 1 MiB


class Site(BaseHTTPRequestHandler):
    """/a.png: an image; /big: 1 MiB and a byte; /to?URL: a redirect (302) to URL, /to307?URL a 307, and so on;
    /uri?URL: a 302 that names URL in a URI header; anything else: 404 with a talkative reason. `agents`: the
    User-Agent of each request."""

    agents = []

    def do_GET(self):
        Site.agents.append(self.headers.get("User-Agent"))
        if self.path in ("/a.png", "/big"):
            body = PNG if self.path == "/a.png" else BIG
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/to"):
            code, target = self.path[len("/to"):].split("?", 1)
            self.send_response(int(code or 302))
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path.startswith("/uri?"):  # the obsolete URI header, which urllib follows where Location is absent
            self.send_response(302)
            self.send_header("URI", self.path[len("/uri?"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(404, "secret internal detail")
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site():
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Site)) as srv:
        yield srv.server_address[1]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost,images.test")


def test_a_loopback_site_when_allowed(site):
    assert fetch_url(f"http://127.0.0.1:{site}/a.png", allow_private=True) == PNG
    assert "is at a private address" in refusal(f"http://127.0.0.1:{site}/a.png")


def test_the_connection_goes_to_the_address_checked(site, monkeypatch):
    """images.test is no name the system can resolve: the fetch works only if it connects to the address that
    `resolve` gave and the check passed, without a second lookup."""
    looked_up = []

    def resolve(host, port):
        looked_up.append(host)
        return ["127.0.0.1"]

    monkeypatch.setattr(fetch, "resolve", resolve)
    assert fetch_url(f"http://images.test:{site}/a.png", allow_private=True) == PNG
    assert looked_up == ["images.test"]


@pytest.mark.parametrize("target, message", [
    ("http://169.254.169.254/latest/meta-data/", "at a link-local address (169.254.169.254), which this server never"),
    ("http://[fe80::1]/", "link-local address"),
    ("ftp://127.0.0.1/a.png", "redirects to a URL that is not http(s)"),
    ("file:///etc/passwd", "redirects to a URL that is not http(s)"),
])
def test_redirects_are_checked_too(site, target, message):
    assert message in refusal(f"http://127.0.0.1:{site}/to?{target}", allow_private=True)
    assert fetch_url(f"http://127.0.0.1:{site}/to?/a.png", allow_private=True) == PNG  # an allowed one is followed


def test_failures_give_a_short_reason_not_the_remote_s_words(site):
    assert refusal(f"http://127.0.0.1:{site}/missing.png", allow_private=True) == \
        f"cannot fetch the image at http://127.0.0.1:{site}/missing.png: HTTP 404"
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert refusal(f"http://127.0.0.1:{port}/a.png", allow_private=True).endswith(": could not connect")
    long = f"http://127.0.0.1:{site}/missing.png?" + "q" * 200  # the URL is cut short in the message
    assert refusal(long, allow_private=True) == f"cannot fetch the image at {long[:80]}: HTTP 404"


def test_fetch_url_refuses_private_addresses_by_default():
    """Library callers that leave `allow_private` out get the safe default."""
    with pytest.raises(ApiError) as e:
        fetch_url("http://127.0.0.1:1/a.png")
    assert "is at a private address" in e.value.message


@pytest.mark.parametrize("url", ["http://:8000/a.png", "http://127.0.0.1:99999/a.png", "http://127.0.0.1:x/a.png",
                                 "http:///a.png", "https://"])
def test_a_url_without_a_valid_host_and_port_is_refused_as_such(url):
    """Not looked up (no host: getaddrinfo would answer with this machine's own addresses) and not connected to."""
    assert refusal(url, allow_private=True) == f"the image URL {url} has no valid host and port"


@pytest.mark.parametrize("url", ["http://[::1/a.png", "http://[127.0.0.1]/a.png", "http://127.0.0.1/a b\r\nX: y"])
def test_a_url_that_does_not_parse_is_a_400_not_a_server_error(url):
    """urllib's Request parses the URL when it is made (an unclosed IPv6 bracket raised ValueError out of fetch_url:
    a 500 and a traceback), and http.client refuses control characters: both are the client's error."""
    assert refusal(url, allow_private=True) == f"cannot fetch the image at {url}: not a valid URL"


def test_a_host_that_does_not_resolve_is_an_unknown_host(monkeypatch):
    name = "a" * 64 + ".example"  # a label over 63 characters: the IDNA encoding fails before any lookup
    assert refusal(f"http://{name}/a.png").endswith(f": unknown host {name}")

    def unknown(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(fetch, "resolve", unknown)
    assert refusal("http://images.test/a.png") == "cannot fetch the image at http://images.test/a.png: unknown host " \
        "images.test"


def test_other_schemes_are_refused_by_fetch_url_itself():
    """No ftp:, file: or data: handler in the opener: a 400, never a file read or an exception out of fetch_url."""
    for url in ("file:///etc/hostname", "ftp://127.0.0.1/a.png", "data:image/png;base64,AAAA"):
        assert refusal(url, allow_private=True) == f"cannot fetch the image at {url}: the fetch failed"


def test_a_host_name_in_capitals_still_connects_to_the_address_checked(site, monkeypatch):
    """Host names are case-insensitive: the connection for Images.TEST is pinned to what images.test resolved to
    (a second lookup of a name no system resolves would fail)."""
    monkeypatch.setattr(fetch, "resolve", lambda host, port: ["127.0.0.1"])
    assert fetch_url(f"http://Images.TEST:{site}/a.png", allow_private=True) == PNG


def test_each_address_checked_is_tried_in_turn(site, monkeypatch):
    """A name with several addresses: one that refuses the connection (nothing listens on ::1 at the site's port;
    without IPv6 it fails at once too) does not end the fetch while another is left."""
    monkeypatch.setattr(fetch, "resolve", lambda host, port: ["::1", "127.0.0.1"])
    assert fetch_url(f"http://images.test:{site}/a.png", allow_private=True) == PNG


@pytest.mark.parametrize("code", [301, 303, 307, 308])
def test_redirects_of_every_kind_are_checked(site, code):
    """Every redirect code urllib follows, and its URI header as well as Location."""
    for to in (f"to{code}", "uri"):
        assert "redirects to a URL that is not http(s)" in refusal(f"http://127.0.0.1:{site}/{to}?ftp://127.0.0.1/",
                                                                   allow_private=True)
    assert "never fetches" in refusal(f"http://127.0.0.1:{site}/to{code}?http://169.254.169.254/", allow_private=True)
    assert fetch_url(f"http://127.0.0.1:{site}/to{code}?/a.png", allow_private=True) == PNG


def test_the_size_limit_is_inclusive_and_said_in_mib(site):
    url = f"http://127.0.0.1:{site}/a.png"
    assert fetch_url(url, allow_private=True, limit=len(PNG)) == PNG  # exactly at the limit: taken
    with pytest.raises(ApiError) as e:
        fetch_url(url, allow_private=True, limit=len(PNG) - 1)
    assert "is over" in e.value.message
    with pytest.raises(ApiError) as e:
        fetch_url(f"http://127.0.0.1:{site}/big", allow_private=True, limit=1 << 20)  # 1 MiB and a byte
    assert e.value.message == f"the image at http://127.0.0.1:{site}/big is over 1 MiB"


def test_the_fetch_says_who_it_is(site):
    """Some image hosts refuse urllib's own User-Agent (Python-urllib/3.x) with a 403."""
    Site.agents.clear()
    fetch_url(f"http://127.0.0.1:{site}/a.png", allow_private=True)
    assert Site.agents == ["palitorch"]


class Silent(socketserver.BaseRequestHandler):
    """Reads the request, then answers nothing until `release` is set (5 s at most), and closes the connection."""

    release = threading.Event()

    def handle(self):
        self.request.recv(65536)
        Silent.release.wait(5)


def test_a_site_that_does_not_answer_times_out_then_one_that_hangs_up(monkeypatch):
    """The fetch's timeout covers the wait for an answer (without it this test takes the 5 s the site waits, and
    then reads a hang-up); a connection closed without an answer is no HTTP answer, though it is an OSError too."""
    with serving(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Silent)) as silent:
        url = f"http://127.0.0.1:{silent.server_address[1]}/a.png"
        Silent.release.clear()
        try:
            with pytest.raises(ApiError) as e:
                fetch_url(url, allow_private=True, timeout=0.3)
            assert e.value.message == f"cannot fetch the image at {url}: timed out"
        finally:
            Silent.release.set()
        assert refusal(url, allow_private=True).endswith(": no HTTP answer")  # (released: it hangs up at once)


class Trickle(socketserver.BaseRequestHandler):
    """Answers a byte every 20 ms, never finishing, until the client hangs up or `stop` is set: of a body (after a
    complete header) or of a header, as the path asks."""

    stop = threading.Event()

    def handle(self):
        first = self.request.recv(65536)
        self.request.sendall(b"HTTP/1.1 200 OK\r\n" + (b"Content-Length: 100000\r\n\r\n" if b" /body " in first
                                                       else b"X-Slow: "))
        try:
            while not Trickle.stop.wait(0.02):
                self.request.sendall(b"a")
        except OSError:  # the client has gone
            pass


@pytest.mark.parametrize("path", ["body", "header"])
def test_a_site_that_trickles_its_answer_times_out_all_the_same(path):
    """The fetch's timeout bounds the whole fetch, not each wait for the next bytes: a site that sends a byte every
    20 ms (of its body, or of a header) would otherwise hold the request, and its handler thread, for as long as it
    likes (here until the test's 10 s safety net; at the default 15 s timeout, a 20 MiB body could take years)."""
    Trickle.stop.clear()
    with serving(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Trickle)) as trickle:
        url = f"http://127.0.0.1:{trickle.server_address[1]}/{path}"
        timer = threading.Timer(10, Trickle.stop.set)
        timer.start()
        start = time.monotonic()
        try:
            with pytest.raises(ApiError) as e:
                fetch_url(url, allow_private=True, timeout=0.5)
        finally:
            timer.cancel()
            Trickle.stop.set()
        assert e.value.message == f"cannot fetch the image at {url}: timed out"
        assert time.monotonic() - start < 5


def test_https_to_a_site_that_does_not_speak_tls_is_a_tls_error(site):
    assert refusal(f"https://127.0.0.1:{site}/a.png", allow_private=True).endswith(": TLS error")


@pytest.mark.parametrize("error, reason", [(TimeoutError("timed out"), "timed out"),
                                           (socket.gaierror(socket.EAI_NONAME, "unknown"), "unknown host"),
                                           (ConnectionRefusedError(111, "refused"), "could not connect")])
def test_a_connection_that_fails_says_how(site, monkeypatch, error, reason):
    """What went wrong under urllib's URLError: a connection that timed out, a name that did not resolve (a
    proxy's), one refused."""

    def fail(*args, **kw):
        raise error

    monkeypatch.setattr(socket, "create_connection", fail)
    assert refusal(f"http://127.0.0.1:{site}/a.png", allow_private=True).endswith(f": {reason}")


class Proxy(BaseHTTPRequestHandler):
    """A forward proxy that answers every request with the image; `asked`: the URLs it was asked for."""

    asked = []

    def do_GET(self):
        Proxy.asked.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)

    def log_message(self, *args):
        pass


def test_a_proxy_in_the_environment_is_used_and_the_connection_goes_to_it(monkeypatch):
    """http_proxy set: the name is still checked, but the connection is to the proxy, which looks the name up
    itself (pinned to the address checked, ::1, the connection would find nothing listening there)."""
    monkeypatch.setattr(fetch, "resolve", lambda host, port: ["::1"])
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Proxy)) as proxy:
        for name in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.server_address[1]}")
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name)
        Proxy.asked.clear()
        assert fetch_url(f"http://images.test:{port}/a.png", allow_private=True) == PNG
    assert Proxy.asked == [f"http://images.test:{port}/a.png"]
