"""Which Host names a loopback server answers (palitorch/server/hosts.py), name by name: what `host_name` makes of a
Host header or an --allow-host value, which strings count as IP addresses, and the edges of the names allowed. The
server's own use of it (the 403) is in test_http_hardening.py."""

import socket

from palitorch.server.hosts import host_allowed, host_name, is_address


def test_host_name_drops_whitespace_case_port_and_final_dot():
    """A header parser keeps trailing whitespace (http.client does), and --allow-host values are typed by hand."""
    assert host_name("  Proxy.Example.ORG.:443 \t") == "proxy.example.org"
    assert host_name("localhost  ") == "localhost"
    assert host_allowed("localhost  ", set())


def test_a_bare_ipv6_address_keeps_its_colons():
    """Only a name with exactly one colon has a port; a bare IPv6 address (several colons) is left whole, and
    counts as an address (DNS rebinding needs a name)."""
    assert host_name("fe80::1") == "fe80::1" and host_name("[fe80::1]:8000") == "fe80::1"
    assert host_name("2001:db8::7") == "2001:db8::7"
    assert host_allowed("fe80::1", set()) and host_allowed("2001:db8::7", set())


def test_only_all_digit_short_forms_count_as_ipv4_addresses():
    """`inet_aton` also takes hex parts (0x7f.1) and, with glibc, anything after a space ("127.0.0.1 evil"): those
    are not addresses as clients write them, so they get no free pass."""
    assert is_address("127.1") and is_address("10.7") and is_address("2130706433")
    for name in ("0x7f.1", "127.0.0.1 evil.example", "1.0xcafe"):
        assert not is_address(name), name
        assert not host_allowed(name, set()), name


def test_localhost_means_localhost_or_a_name_under_it_only():
    """`.localhost` names resolve to this machine only; a name that merely ends in the letters does not."""
    assert host_allowed("api.localhost:8000", set()) and host_allowed("localhost", set())
    for name in ("evillocalhost", "evil-localhost:8000", "localhost.evil.example"):
        assert not host_allowed(name, set()), name


def test_this_machine_s_name_is_matched_whatever_its_case(monkeypatch):
    """Hostnames such as DESKTOP-AB12CD (Windows) are upper case; Host headers are compared in lower case."""
    monkeypatch.setattr(socket, "gethostname", lambda: "DESKTOP-AB12CD")
    assert host_allowed("desktop-ab12cd:8000", set()) and host_allowed("DESKTOP-AB12CD.local", set())
    assert not host_allowed("desktop-ab12cd.evil.example", set())


def test_an_empty_host_header_is_as_no_header():
    """An empty Host (HTTP/1.1 allows it where the URI has no authority) is no name a rebinding page could send."""
    assert host_allowed("", set()) and host_allowed(None, set())
