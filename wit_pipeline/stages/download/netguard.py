"""The SSRF guard of the download stage: checked addresses, checked connections, deadlines.

Every connection the download stage opens goes through :meth:`Guard.connect`, which resolves the
host name once, checks each resolved address against an :class:`AddressPolicy` and connects to
an address it has checked (never re-resolving), then checks the peer address of the connected
socket again. DNS rebinding (a name that resolves to a public address for the check and to a
private one for the connection) therefore cannot bypass it, and every redirect hop opens a new,
checked connection. By default only globally routable unicast addresses are allowed: loopback,
private, shared (100.64/10), link-local (169.254.169.254 included), multicast, reserved,
unspecified and documentation addresses are refused, IPv4 and IPv6, with IPv4-mapped, 6to4 and
NAT64 IPv6 addresses judged by the IPv4 address they embed. ``allow_loopback`` additionally
permits exactly 127.0.0.0/8 and ::1 (tests and the local demo).

The HTTP clients wired to the guard (``urllib`` for img2dataset, ``requests`` for robots.txt)
are in ``guarded_http``.

A "slow drip" server (one byte every few seconds) cannot hold a worker: sockets made by the
guard check a deadline before every ``recv``/``send`` and bound each blocking call by the time
left, for plain and TLS sockets alike.

Errors are :class:`FetchError` with a stable ``reason`` (see ``docs/download.md``; ``classify``
maps any fetch exception to one); their string form is ``wit:<reason>: <detail>`` so that the
reason survives img2dataset, which reports errors as ``str(exception)``.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> IP address strings, in preference order. Injectable so that tests (and users
# with their own DNS) can decide what a name resolves to without touching the network.
Resolver = Callable[[str, int], Sequence[str]]

REASON_PREFIX = "wit:"
_REASON_RE = re.compile(r"^wit:([a-z0-9_]+):\s?(.*)$", re.S)
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
RETRYABLE_REASONS = frozenset({"timeout", "connection_error", "truncated"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
_LOOPBACK_V6 = ipaddress.ip_address("::1")


# ---------------------------------------------------------------------------------------------
# Errors


class FetchError(Exception):
    """A fetch failure with a stable drop reason (``blocked_address``, ``timeout``, ...)."""

    def __init__(self, reason: str, detail: str = "", *, retryable: bool | None = None):
        super().__init__(f"{REASON_PREFIX}{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retryable = reason in RETRYABLE_REASONS if retryable is None else retryable


class BlockedAddressError(OSError):
    """The guard refused to connect: every address of the host is forbidden by the policy."""

    reason = "blocked_address"

    def __init__(self, detail: str):
        super().__init__(f"{REASON_PREFIX}blocked_address: {detail}")
        self.detail = detail


class DeadlineExceeded(TimeoutError):
    """The total time allowed for one request ran out."""


def is_retryable_reason(reason: str) -> bool:
    """True for the drop reasons of transient failures (``timeout``, ``connection_error``,
    ``truncated``, ``http_408``/``425``/``429``/``500``/``502``/``503``/``504``): what a
    request retries and what ``--retry-failed`` fetches again later."""
    if reason in RETRYABLE_REASONS:
        return True
    code = reason.removeprefix("http_")
    return code != reason and code.isdigit() and int(code) in RETRYABLE_HTTP


def parse_reason(message: str | None) -> tuple[str, str] | None:
    """``("timeout", "detail")`` from a ``wit:timeout: detail`` message, else ``None``."""
    if not message:
        return None
    m = _REASON_RE.match(message.strip())
    return (m.group(1), m.group(2)) if m else None


# ---------------------------------------------------------------------------------------------
# Address policy


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_class(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address (``"private"``, ...), or ``None`` if it is.

    IPv6 addresses that embed an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4
    ``2002:AABB:CCDD::``, NAT64 ``64:ff9b::a.b.c.d``) are judged by the embedded address too.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = _embedded_ipv4(ip)
        if v4 is not None:
            inner = address_class(v4)
            # Mapped and NAT64 addresses reach exactly the embedded IPv4 address.
            if inner is not None or ip.ipv4_mapped is not None or ip in _NAT64:
                return inner
        if ip.is_site_local:
            return "site_local"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link_local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("shared", isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    )
    for name, hit in checks:
        if hit:
            return name
    if not ip.is_global:
        return "non_global"
    return None


@functools.lru_cache(maxsize=1 << 16)
def parse_ip(text: str) -> IPAddress | None:
    """An IP literal, including legacy IPv4 forms (``127.1``, ``0x7f.0.0.1``, ``2130706433``)."""
    text = text.strip().strip("[]")
    if "%" in text:  # IPv6 zone id: fe80::1%eth0
        text = text.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text and ":" not in text and re.fullmatch(r"[0-9a-fA-FxX.]+", text):
        try:  # inet_aton only parses; it never touches the network
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses may be connected to: public unicast only, plus loopback if allowed."""

    allow_loopback: bool = False

    def refusal(self, ip: IPAddress | str) -> str | None:
        """``None`` when ``ip`` may be connected to, else the class that forbids it."""
        if isinstance(ip, str):
            return _refusal_of_text(ip, self.allow_loopback)
        return self._refusal(ip)

    def _refusal(self, ip: IPAddress) -> str | None:
        if self.allow_loopback:
            v4 = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else ip
            if v4 is not None and v4 in _LOOPBACK_V4:
                return None
            if ip == _LOOPBACK_V6:
                return None
        return address_class(ip)

    def allows(self, ip: IPAddress | str) -> bool:
        return self.refusal(ip) is None


@functools.lru_cache(maxsize=1 << 16)
def _refusal_of_text(text: str, allow_loopback: bool) -> str | None:
    # A pure function of its arguments, memoized: the same few addresses are checked for every
    # request to a host.
    parsed = parse_ip(text)
    if parsed is None:
        return "not_an_address"
    return AddressPolicy(allow_loopback)._refusal(parsed)


def system_resolver(host: str, port: int) -> list[str]:
    """IP literals (legacy IPv4 forms too) without a lookup; names through ``getaddrinfo``."""
    ip = parse_ip(host)
    if ip is not None:
        return [str(ip)]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass(frozen=True)
class StaticResolver:
    """Resolve names from a fixed table (``{"name": ["1.2.3.4", ...]}``); others fail.

    IP literals resolve to themselves. A picklable resolver for tests and pinned deployments.
    """

    table: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def of(cls, mapping: dict[str, Sequence[str]]) -> StaticResolver:
        return cls(tuple((k.lower(), tuple(v)) for k, v in sorted(mapping.items())))

    def __call__(self, host: str, port: int) -> list[str]:
        ip = parse_ip(host)
        if ip is not None:
            return [str(ip)]
        for name, addrs in self.table:
            if name == host.lower().rstrip("."):
                return list(addrs)
        raise socket.gaierror(socket.EAI_NONAME, f"{host}: name not in resolver table")


# ---------------------------------------------------------------------------------------------
# Sockets with a total deadline


class _DeadlineMixin:
    """Bound every blocking call by the per-operation timeout and the time left.

    ``settimeout`` (what HTTP libraries call) sets the per-operation timeout; the deadline
    caps it before every ``recv``/``send``.
    """

    _wit_deadline: float | None = None
    _wit_op_timeout: float | None = None

    def settimeout(self, value):
        self._wit_op_timeout = value
        super().settimeout(value)  # type: ignore[misc]

    def _wit_arm(self) -> bool:
        """Bound the next blocking call; ``True`` when the deadline, not the per-operation
        timeout, is the bound."""
        deadline = self._wit_deadline
        if deadline is None:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("total request time exceeded")
        op = self._wit_op_timeout
        by_deadline = op is None or left < op
        super().settimeout(left if by_deadline else op)  # type: ignore[misc]
        return by_deadline

    def _wit_io(self, call, *args):
        by_deadline = self._wit_arm()
        try:
            return call(*args)
        except TimeoutError:
            if by_deadline:  # report what ran out: the total time, not one read
                raise DeadlineExceeded("total request time exceeded") from None
            raise

    def recv(self, *args):
        return self._wit_io(super().recv, *args)  # type: ignore[misc]

    def recv_into(self, *args):
        return self._wit_io(super().recv_into, *args)  # type: ignore[misc]

    def send(self, *args):
        return self._wit_io(super().send, *args)  # type: ignore[misc]

    def sendall(self, *args):
        return self._wit_io(super().sendall, *args)  # type: ignore[misc]


class DeadlineSocket(_DeadlineMixin, socket.socket):
    """A TCP socket that enforces a total deadline on every read and write."""


class DeadlineSSLSocket(_DeadlineMixin, ssl.SSLSocket):
    """The TLS counterpart; set as ``SSLContext.sslsocket_class`` by the guard."""

    @classmethod
    def _create(cls, sock, *args, **kwargs):
        deadline = getattr(sock, "_wit_deadline", None)
        op = getattr(sock, "_wit_op_timeout", None)
        out = super()._create(sock, *args, **kwargs)
        out._wit_deadline = deadline
        out._wit_op_timeout = op
        return out


# ---------------------------------------------------------------------------------------------
# The guard


@dataclass(frozen=True)
class Guard:
    """Connects only to addresses the policy allows, checking the address actually used."""

    policy: AddressPolicy = AddressPolicy()
    resolver: Resolver = system_resolver
    connect_timeout: float = 5.0

    def connect(
        self,
        host: str,
        port: int,
        *,
        deadline: float | None = None,
        op_timeout: float | None = None,
    ) -> socket.socket:
        """A connected :class:`DeadlineSocket` to an allowed address of ``host``.

        Raises :class:`BlockedAddressError` when no resolved address is allowed,
        :class:`FetchError` (``dns_error``) when the name does not resolve, ``OSError`` when
        no allowed address accepts the connection.
        """
        try:
            addrs = list(self.resolver(host, port))
        except (OSError, UnicodeError) as e:
            raise FetchError("dns_error", f"{host}: {e}") from None
        if not addrs:
            raise FetchError("dns_error", f"{host}: no address")
        allowed: list[str] = []
        refused: list[str] = []
        for addr in addrs:
            why = self.policy.refusal(addr)
            if why is None:
                allowed.append(addr)
            else:
                refused.append(f"{addr} ({why})")
        if not allowed:
            raise BlockedAddressError(f"{host} -> {', '.join(refused)}")
        last: OSError | None = None
        for addr in allowed:
            ip = parse_ip(addr)
            assert ip is not None
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            sock = DeadlineSocket(family, socket.SOCK_STREAM)
            try:
                timeout = self.connect_timeout
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DeadlineExceeded("total request time exceeded")
                    timeout = min(timeout, left)
                sock.settimeout(timeout)
                try:
                    sock.connect((str(ip), port))
                except TimeoutError:  # say which bound ran out: connect_timeout or the deadline
                    raise TimeoutError(
                        f"connect to {ip} port {port}: no answer within {timeout:g}s"
                    ) from None
                peer = sock.getpeername()[0]
                why = self.policy.refusal(peer)
                if why is not None:  # the address actually connected to
                    raise BlockedAddressError(f"{host} -> {peer} ({why})")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(op_timeout)
                sock._wit_deadline = deadline
                sock._wit_arm()  # a TLS handshake that follows is bounded by the time left
                return sock
            except BlockedAddressError:
                sock.close()
                raise
            except OSError as e:
                sock.close()
                last = e
        assert last is not None
        raise last


def ssl_context(ca_bundle: str = "") -> ssl.SSLContext:
    """A verifying TLS context (system CAs, certifi's, and ``ca_bundle``'s) whose sockets
    enforce the guard's deadlines."""
    ctx = ssl.create_default_context()  # the system's CA store
    try:
        import certifi

        ctx.load_verify_locations(cafile=certifi.where())
    except (ImportError, OSError):
        pass
    if ca_bundle:  # in addition to the above, e.g. a corporate CA
        ctx.load_verify_locations(cafile=ca_bundle)
    ctx.sslsocket_class = DeadlineSSLSocket
    return ctx


# ---------------------------------------------------------------------------------------------
# Error classification


def classify(exc: BaseException) -> FetchError:
    """Map any fetch exception to a :class:`FetchError` with a stable reason."""
    if isinstance(exc, FetchError):
        return exc
    if isinstance(exc, urllib.error.HTTPError):
        code = exc.code
        msg = str(exc.reason or "")
        if 300 <= code < 400:
            if "not allowed" in msg:
                return FetchError("bad_redirect", f"HTTP {code}: {msg}")
            if "infinite loop" in msg:
                return FetchError("too_many_redirects", f"HTTP {code}: {msg}")
        return FetchError(f"http_{code}", f"HTTP {code}: {msg}", retryable=code in RETRYABLE_HTTP)
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        return classify(exc.reason)
    if isinstance(exc, BlockedAddressError):
        return FetchError("blocked_address", exc.detail)
    if isinstance(exc, socket.gaierror):
        return FetchError("dns_error", str(exc))
    if isinstance(exc, TimeoutError | socket.timeout):
        return FetchError("timeout", str(exc) or "timed out")
    if isinstance(exc, http.client.IncompleteRead):
        return FetchError("truncated", f"body ended early ({len(exc.partial)} bytes)")
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return FetchError("tls_error", str(exc))
    if isinstance(exc, ConnectionError | http.client.RemoteDisconnected):
        return FetchError("connection_error", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, http.client.HTTPException):
        return FetchError("bad_response", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, urllib.error.URLError):
        text = str(exc.reason)
        if "unknown url type" in text:
            return FetchError("invalid_url", text)
        return FetchError("connection_error", text)
    if isinstance(exc, OSError):
        return FetchError("connection_error", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, ValueError):
        return FetchError("invalid_url", str(exc))
    return FetchError("download_error", f"{type(exc).__name__}: {exc}")
