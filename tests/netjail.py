"""A socket-level jail for tests: no connection leaves the machine, even by mistake.

``install()`` wraps ``socket.socket.connect``/``connect_ex``/``sendto``/``sendmsg`` so that any
attempt to reach an address other than loopback (127.0.0.0/8, ::1) raises ``JailViolation``
*before* a packet is sent (Unix and other non-IP sockets pass), and wraps the name-service
functions ``socket.getaddrinfo``, ``gethostbyname``, ``gethostbyname_ex``, ``gethostbyaddr`` and
``getnameinfo`` so that nothing but ``localhost`` and loopback addresses is ever looked up,
forward or reverse (a DNS query is traffic too; the one exception, a reverse lookup of the
machine's own name as ``socket.getfqdn()`` does, is answered without a lookup). A broken SSRF guard therefore fails its test
instead of contacting a private, link-local or public address.

Test subprocesses inherit the jail through ``tests/jail_site/sitecustomize.py`` when
``WIT_TEST_NET_JAIL=1`` is set (``conftest.py`` sets it).
"""

from __future__ import annotations

import ipaddress
import socket

_ORIGINALS: dict[str, object] = {}
_SOCKET_METHODS = ("connect", "connect_ex", "sendto", "sendmsg")
_LOOKUPS = ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo")
violations: list[str] = []


class JailViolation(OSError):
    """Raised instead of connecting to, sending to or looking up a non-loopback address."""


def _is_loopback_host(host: str) -> bool:
    if host in ("localhost", "localhost.", ""):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _refuse(msg: str) -> None:
    violations.append(msg)
    raise JailViolation(msg)


def _check(address: object, what: str) -> None:
    if (
        isinstance(address, tuple)
        and address
        and isinstance(address[0], str)
        and not _is_loopback_host(address[0])
    ):
        _refuse(f"network jail: {what} to non-loopback address {address!r} refused")


def _check_name(host: object, what: str) -> None:
    h = host.decode() if isinstance(host, bytes) else host
    if h is not None and not _is_loopback_host(str(h)):
        _refuse(f"network jail: {what} of {h!r} refused")


def install() -> None:
    if _ORIGINALS:
        return
    sock_cls = socket.socket
    _ORIGINALS.update({name: getattr(sock_cls, name) for name in _SOCKET_METHODS})
    _ORIGINALS.update({name: getattr(socket, name) for name in _LOOKUPS})
    _ORIGINALS["gethostname"] = socket.gethostname

    def is_ip(sock) -> bool:
        return sock.family in (socket.AF_INET, socket.AF_INET6)

    def connect(self, address):
        if is_ip(self):
            _check(address, "connect")
        return _ORIGINALS["connect"](self, address)

    def connect_ex(self, address):
        if is_ip(self):
            _check(address, "connect")
        return _ORIGINALS["connect_ex"](self, address)

    def sendto(self, data, *args):
        if is_ip(self):
            _check(args[-1], "sendto")
        return _ORIGINALS["sendto"](self, data, *args)

    def sendmsg(self, buffers, *args):
        # sendmsg(buffers[, ancdata[, flags[, address]]]): without an address it sends on the
        # connected peer, which connect() already checked.
        if is_ip(self) and len(args) >= 3:
            _check(args[2], "sendmsg")
        return _ORIGINALS["sendmsg"](self, buffers, *args)

    def getaddrinfo(host, *args, **kwargs):
        _check_name(host, "name resolution")
        return _ORIGINALS["getaddrinfo"](host, *args, **kwargs)

    def gethostbyname(host):
        _check_name(host, "name resolution")
        return _ORIGINALS["gethostbyname"](host)

    def gethostbyname_ex(host):
        _check_name(host, "name resolution")
        return _ORIGINALS["gethostbyname_ex"](host)

    def gethostbyaddr(host):
        # socket.getfqdn() (Beam's portable runner calls it) looks up the machine's own name:
        # answered here, without a lookup, as the name itself on loopback.
        if host == _ORIGINALS["gethostname"]():
            return (host, [], ["127.0.0.1"])
        _check_name(host, "reverse lookup")
        return _ORIGINALS["gethostbyaddr"](host)

    def getnameinfo(sockaddr, flags):
        host = sockaddr[0] if isinstance(sockaddr, tuple) and sockaddr else sockaddr
        _check_name(host, "reverse lookup")
        return _ORIGINALS["getnameinfo"](sockaddr, flags)

    for fn in (connect, connect_ex, sendto, sendmsg):
        setattr(sock_cls, fn.__name__, fn)
    for fn in (getaddrinfo, gethostbyname, gethostbyname_ex, gethostbyaddr, getnameinfo):
        setattr(socket, fn.__name__, fn)


def uninstall() -> None:
    if not _ORIGINALS:
        return
    for name in _SOCKET_METHODS:
        setattr(socket.socket, name, _ORIGINALS[name])
    for name in _LOOKUPS:
        setattr(socket, name, _ORIGINALS[name])
    _ORIGINALS.clear()
