"""A socket-level jail for tests: no connection leaves the machine, even by mistake.

``install()`` wraps ``socket.socket.connect``/``connect_ex``/``sendto`` and ``socket.getaddrinfo``
so that any attempt to reach an address other than loopback (127.0.0.0/8, ::1) or a Unix socket
raises ``JailViolation`` *before* a packet is sent, and so that host names other than
``localhost`` are never resolved (a DNS query is traffic too). A broken SSRF guard therefore
fails its test instead of contacting a private, link-local or public address.

Test subprocesses inherit the jail through ``tests/jail_site/sitecustomize.py`` when
``WIT_TEST_NET_JAIL=1`` is set (``conftest.py`` sets it).
"""

from __future__ import annotations

import ipaddress
import socket

_ORIGINALS: dict[str, object] = {}
violations: list[str] = []


class JailViolation(OSError):
    """Raised instead of connecting to a non-loopback address."""


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


def _check(address: object, what: str) -> None:
    if (
        isinstance(address, tuple)
        and address
        and isinstance(address[0], str)
        and not _is_loopback_host(address[0])
    ):
        msg = f"network jail: {what} to non-loopback address {address!r} refused"
        violations.append(msg)
        raise JailViolation(msg)


def install() -> None:
    if _ORIGINALS:
        return
    sock_cls = socket.socket
    _ORIGINALS.update(
        connect=sock_cls.connect,
        connect_ex=sock_cls.connect_ex,
        sendto=sock_cls.sendto,
        getaddrinfo=socket.getaddrinfo,
    )

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address, "connect")
        return _ORIGINALS["connect"](self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address, "connect")
        return _ORIGINALS["connect_ex"](self, address)

    def sendto(self, data, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(args[-1], "sendto")
        return _ORIGINALS["sendto"](self, data, *args)

    def getaddrinfo(host, *args, **kwargs):
        h = host.decode() if isinstance(host, bytes) else host
        if h is not None and not _is_loopback_host(str(h)):
            msg = f"network jail: name resolution of {h!r} refused"
            violations.append(msg)
            raise JailViolation(msg)
        return _ORIGINALS["getaddrinfo"](host, *args, **kwargs)

    sock_cls.connect = connect
    sock_cls.connect_ex = connect_ex
    sock_cls.sendto = sendto
    socket.getaddrinfo = getaddrinfo


def uninstall() -> None:
    if not _ORIGINALS:
        return
    socket.socket.connect = _ORIGINALS["connect"]
    socket.socket.connect_ex = _ORIGINALS["connect_ex"]
    socket.socket.sendto = _ORIGINALS["sendto"]
    socket.getaddrinfo = _ORIGINALS["getaddrinfo"]
    _ORIGINALS.clear()
