"""Fetching image URLs (palitorch/server/fetch.py): link-local and metadata addresses never, loopback and private
ones only when allowed, checked on every address a name resolves to and on every redirect, and the connection made
to the address checked; failures give a short reason."""

import socket
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
                                     "fd00:ec2::254", "100.100.100.200"])
def test_link_local_and_metadata_addresses_are_never_fetched(address):
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


class Site(BaseHTTPRequestHandler):
    """/a.png: an image; /to?URL: a redirect to URL; anything else: 404 with a talkative reason."""

    def do_GET(self):
        if self.path == "/a.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path.startswith("/to?"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to?"):])
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
