"""Which Host names a server on a loopback address answers: a guard against DNS rebinding.

A web page on evil.example can make its name resolve to 127.0.0.1 and then call a server there as its own origin,
reading the answers (the browser sees no cross-origin request). Such a request still says `Host: evil.example`.
"""

from __future__ import annotations

import ipaddress
import socket

PRIVATE_SUFFIXES = (".localhost", ".local", ".internal")  # reserved: no public DNS name ends so


def host_allowed(host: str | None, allowed: set[str]) -> bool:
    """Whether a request to a loopback server with this Host header may be answered: no header (not a browser), an
    IP address (DNS rebinding needs a name), localhost, a name under a suffix that no public site can have
    (.localhost, .local, .internal: e.g. host.docker.internal from a container), this machine's hostname, or a name
    in `allowed` (`palitorch serve --allow-host`; "*": any)."""
    if not host or "*" in allowed:
        return True
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1:name.find("]")]
    elif name.count(":") == 1:  # localhost:8000 (a bare IPv6 address has several colons)
        name = name.rsplit(":", 1)[0]
    name = name.rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name == "localhost" or name.endswith(PRIVATE_SUFFIXES) or name == socket.gethostname().lower() \
        or name in allowed
