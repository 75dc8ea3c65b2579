"""Which Host names a server on a loopback address answers: a guard against DNS rebinding.

A web page on evil.example can make its name resolve to 127.0.0.1 and then call a server there as its own origin,
reading the answers (the browser sees no cross-origin request). Such a request still says `Host: evil.example`, so a
server meant for this machine answers only names that mean this machine. A server on another address (0.0.0.0) is
meant to be reached by any name and has no such check.
"""

from __future__ import annotations

import ipaddress
import socket

# Names that containers give the machine they run on (Docker Desktop, Podman): no public DNS name ends so.
CONTAINER_HOSTS = {"host.docker.internal", "gateway.docker.internal", "host.containers.internal"}


def host_name(host: str) -> str:
    """A Host header's (or --allow-host value's) name: lowercase, without its port or a final dot."""
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1:name.find("]")]
    elif name.count(":") == 1:  # localhost:8000 (a bare IPv6 address has several colons)
        name = name.rsplit(":", 1)[0]
    return name.rstrip(".")


def is_address(name: str) -> bool:
    """An IP address as clients write it: 127.0.0.1, ::1, and the short IPv4 forms (127.1) that clients pass on."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    try:
        socket.inet_aton(name)  # (a DNS name cannot be all digits and dots: no such top-level domain exists)
        return all(part.isdigit() for part in name.split("."))
    except OSError:
        return False


def host_allowed(host: str | None, allowed: set[str]) -> bool:
    """Whether a request to a loopback server with this Host header may be answered: no header (not a browser), an
    IP address (DNS rebinding needs a name), localhost or a name under .localhost (which resolve to this machine
    only), this machine's hostname (also under .local), a container's name for its host (host.docker.internal), or
    a name in `allowed` (`palitorch serve --allow-host`, as `host_name` gives them; "*": any)."""
    if not host or "*" in allowed:
        return True
    name = host_name(host)
    if is_address(name):
        return True
    me = socket.gethostname().lower()
    return name == "localhost" or name.endswith(".localhost") or name in (me, f"{me}.local") \
        or name in CONTAINER_HOSTS or name in allowed
