"""HTTP through the SSRF guard: the download stage's ``urllib`` opener and ``requests`` session.

- ``urllib.request`` (what img2dataset 1.47 downloads with): :func:`build_opener` returns an
  opener whose HTTP(S) handlers use guarded connections (``netguard.Guard.connect``), that
  follows at most ``max_redirects`` http(s)-only redirects, refuses proxies and non-http(s)
  schemes, retries only retryable errors, enforces a total deadline per attempt, a body size
  limit, per-host concurrency and rate limits (:class:`HostLimiter`), sends our User-Agent,
  passes every redirect target to a check before requesting it (``hop_check``:
  ``policy.RedirectCheck``, robots.txt and tdmrep.json of new origins, takedown entries) and
  refuses ``X-Robots-Tag`` and ``tdm-reservation`` opt-outs before reading the body (the refusal
  names the signal, the URL and the time: ``optout.with_policy``). It is installed process-wide with
  ``urllib.request.install_opener``, the hook ``urllib.request.urlopen`` (and so img2dataset's
  ``download_image``) goes through. The download DoFn acquires it from :data:`PROCESS_OPENER`
  in ``setup()`` (one opener and one per-host limiter per worker process, reference counted,
  so that no instance's ``teardown()`` can switch the guard off under another) and re-checks
  it before every shard.
- ``requests`` (robots.txt, tdmrep.json): :func:`requests_session` returns a session whose
  adapters use the same guarded connections; :func:`get_small` fetches such a policy file
  with its redirects followed hop by hop.

Errors are ``netguard.FetchError`` with a stable reason, as for the guard itself.
"""

from __future__ import annotations

import datetime
import email.utils
import http.client
import io
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from wit_pipeline import optout
from wit_pipeline.stages.download.netguard import (
    BlockedAddressError,
    DeadlineExceeded,
    FetchError,
    Guard,
    classify,
    ssl_context,
)

# ---------------------------------------------------------------------------------------------
# Per-host limits


class HostLimiter:
    """Per-host concurrency and request-rate limits shared by the threads of one process.

    ``concurrency`` requests at most in flight per host (0: no limit); requests to one host
    start at least ``1 / rate`` seconds apart (0: no limit); :meth:`set_interval` sets a longer
    spacing for one host (robots.txt ``Crawl-delay``); :meth:`defer` holds every request to a
    host until a time it asked for (``Retry-After``).
    """

    def __init__(
        self,
        concurrency: int = 0,
        rate: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.concurrency = concurrency
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._clock = clock  # injectable so that tests can check the spacing without timing
        self._sleep = sleep
        self._lock = threading.Lock()
        self._sems: dict[str, threading.BoundedSemaphore] = {}
        self._next: dict[str, float] = {}
        self._intervals: dict[str, float] = {}
        self._deferred: dict[str, tuple[float, str]] = {}  # host -> (not before, why)

    def set_interval(self, host: str, seconds: float) -> None:
        with self._lock:
            self._intervals[host] = max(seconds, self._intervals.get(host, 0.0))

    def defer(self, host: str, seconds: float, why: str) -> None:
        """Hold requests to ``host`` for ``seconds`` from now (a later end wins); ``why`` is
        the reason its answer gave (``http_429``, ...)."""
        with self._lock:
            until = self._clock() + max(0.0, seconds)
            if until > self._deferred.get(host, (0.0, ""))[0]:
                self._deferred[host] = (until, why)

    def deferred(self, host: str) -> tuple[float, str]:
        """``(seconds left, why)`` of the hold on ``host`` (``(0, "")`` when none)."""
        with self._lock:
            until, why = self._deferred.get(host, (0.0, ""))
            left = until - self._clock()
        return (left, why) if left > 0 else (0.0, "")

    def pause(self, seconds: float) -> None:
        """Sleep (through the injected ``sleep``: tests count the waits instead of waiting)."""
        if seconds > 0:
            self._sleep(seconds)

    @contextmanager
    def slot(self, host: str) -> Iterator[None]:
        sem = None
        if self.concurrency > 0:
            with self._lock:
                sem = self._sems.get(host)
                if sem is None:
                    sem = self._sems[host] = threading.BoundedSemaphore(self.concurrency)
            sem.acquire()
        try:
            interval = max(self.interval, self._intervals.get(host, 0.0))
            with self._lock:
                now = self._clock()
                start = max(now, self._deferred.get(host, (0.0, ""))[0])
                if interval:
                    start = max(start, self._next.get(host, 0.0))
                    self._next[host] = start + interval
            if start > now:
                self._sleep(start - now)
            yield
        finally:
            if sem is not None:
                sem.release()


# ---------------------------------------------------------------------------------------------
# urllib: what img2dataset downloads with


@dataclass(frozen=True)
class FetchOptions:
    """How one download attempt behaves (built from ``DownloadConfig``)."""

    timeout: float = 10.0  # total seconds per attempt: connect, redirects, headers and body
    connect_timeout: float = 5.0
    retries: int = 2
    retry_backoff: float = 0.5
    max_redirects: int = 5
    max_bytes: int = 50_000_000
    user_agent: str = "wit-pipeline"
    user_agent_token: str = "wit-pipeline"
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    per_host_concurrency: int = 0
    per_host_rate: float = 0.0
    ca_bundle: str = ""
    # Agents besides user_agent_token whose X-Robots-Tag directives apply to us.
    opt_out_agents: tuple[str, ...] = ()
    respect_tdmrep: bool = False  # a tdm-reservation: 1 response header opts out (TDMRep)
    max_retry_wait: float = 60.0  # seconds one URL may wait for its retries (Retry-After)


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host, *, guard: Guard, deadline: float | None, **kwargs):
        super().__init__(host, **kwargs)
        self._wit_guard = guard
        self._wit_deadline = deadline

    def connect(self):
        self.sock = self._wit_guard.connect(
            self.host, self.port, deadline=self._wit_deadline, op_timeout=self.timeout
        )


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, *, guard: Guard, deadline: float | None, **kwargs):
        super().__init__(host, **kwargs)
        self._wit_guard = guard
        self._wit_deadline = deadline

    def connect(self):
        sock = self._wit_guard.connect(
            self.host, self.port, deadline=self._wit_deadline, op_timeout=self.timeout
        )
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: Guard):
        super().__init__()
        self._guard = guard

    def http_open(self, req):
        def factory(host, **kwargs):
            return _GuardedHTTPConnection(
                host, guard=self._guard, deadline=getattr(req, "wit_deadline", None), **kwargs
            )

        return self.do_open(factory, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: Guard, context: ssl.SSLContext):
        super().__init__(context=context)
        self._guard = guard
        self._ctx = context

    def https_open(self, req):
        def factory(host, **kwargs):
            kwargs.pop("context", None)
            return _GuardedHTTPSConnection(
                host,
                guard=self._guard,
                deadline=getattr(req, "wit_deadline", None),
                context=self._ctx,
                **kwargs,
            )

        return self.do_open(factory, req)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow at most ``max_redirects`` hops, to http(s) URLs only, keeping the deadline.

    ``hop_check(url, first_url)``, when given, is called with every target (and the URL the
    request started from) before the target is requested, and refuses it by raising a
    ``FetchError`` (a takedown entry, the robots.txt or tdmrep.json of a new origin:
    ``policy.RedirectCheck``).
    """

    max_repeats = 1_000
    max_redirections = 1_000

    def __init__(self, max_redirects: int, hop_check: Callable[[str, str], None] | None = None):
        super().__init__()
        self.max_redirects = max_redirects
        self.hop_check = hop_check

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError("bad_redirect", f"redirect to non-http(s) URL {newurl[:200]}")
        hops = getattr(req, "wit_hops", 0) + 1
        if hops > self.max_redirects:
            raise FetchError("too_many_redirects", f"more than {self.max_redirects} redirects")
        first = getattr(req, "wit_first_url", req.full_url)
        if self.hop_check is not None:
            self.hop_check(newurl, first)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.wit_hops = hops
            new.wit_first_url = first
            new.wit_deadline = getattr(req, "wit_deadline", None)
            new.wit_redirect = True
        return new


class _ErrorProcessor(urllib.request.HTTPErrorProcessor):
    pass


class GuardedOpener(urllib.request.OpenerDirector):
    """An ``OpenerDirector`` that fetches only through the guard (see the module docstring).

    ``open()`` returns a response whose body is already read (within the deadline and size
    limit), so that the caller's ``read()`` cannot block; redirect hops re-enter ``open()`` and
    are passed straight to the handlers.
    """

    def __init__(
        self,
        guard: Guard,
        options: FetchOptions,
        hop_check: Callable[[str, str], None] | None = None,
    ):
        super().__init__()
        self.guard = guard
        self.options = options
        self.limiter = HostLimiter(options.per_host_concurrency, options.per_host_rate)
        self.directives = frozenset(d.strip().lower() for d in options.disallowed_header_directives)
        self.agents = frozenset(
            a.strip().lower() for a in (options.user_agent_token, *options.opt_out_agents) if a
        )
        for handler in (
            _GuardedHTTPHandler(guard),
            _GuardedHTTPSHandler(guard, ssl_context(options.ca_bundle)),
            _RedirectHandler(options.max_redirects, hop_check),
            urllib.request.HTTPDefaultErrorHandler(),
            _ErrorProcessor(),
            urllib.request.UnknownHandler(),
        ):
            self.add_handler(handler)

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):  # type: ignore[attr-defined]
        if getattr(fullurl, "wit_redirect", False):
            return super().open(fullurl, data, timeout)
        if isinstance(fullurl, urllib.request.Request):
            req = fullurl
        else:
            req = urllib.request.Request(str(fullurl), data=data)
        parts = urlsplit(req.full_url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError("invalid_url", f"scheme {scheme!r} refused")
        host = (parts.hostname or "").lower()
        op_timeout = self.options.timeout
        if isinstance(timeout, int | float) and timeout > 0:
            op_timeout = min(op_timeout, float(timeout))
        req.add_header("User-Agent", self.options.user_agent)
        return self._open_with_retries(req, data, op_timeout, host)

    def _open_with_retries(self, req, data, op_timeout: float, host: str) -> FetchedResponse:
        """Attempts, retrying retryable errors after ``retry_backoff`` (doubling) or the
        ``Retry-After`` a 429/5xx answer asks for, whichever is longer. ``Retry-After`` also
        holds every other request to the host (:meth:`HostLimiter.defer`). A URL waits at most
        ``max_retry_wait`` seconds in all: a longer wait fails it now with its retryable reason
        (``--retry-failed`` fetches it again later), and a request to a host held longer than
        that fails without being sent."""
        limit = self.options.max_retry_wait
        attempt = 0
        waited = 0.0
        while True:
            left, why = self.limiter.deferred(host)
            if left > limit - waited:
                raise FetchError(
                    why,
                    f"not requested: {host} asked to wait {left:.0f}s more (Retry-After), "
                    f"beyond max_retry_wait {limit:g}s",
                    retryable=True,
                )
            waited += left  # slot() sleeps it
            retry_after = None
            try:
                with self.limiter.slot(host):
                    return self._attempt(req, data, op_timeout)
            except Exception as e:
                if isinstance(e, urllib.error.HTTPError):
                    retry_after = retry_after_seconds(e.headers.get("Retry-After"), time.time())
                    e.close()
                err = classify(e)
            if not err.retryable:
                raise err
            if retry_after is not None:
                self.limiter.defer(host, retry_after, err.reason)
            if attempt >= self.options.retries:
                raise err
            backoff = self.options.retry_backoff * (2**attempt)
            wait = max(backoff, retry_after or 0.0)
            if waited + wait > limit:
                asked = f"Retry-After {retry_after:g}s" if retry_after else f"backoff {backoff:g}s"
                raise FetchError(
                    err.reason,
                    f"{err.detail}; not retried: {asked} beyond max_retry_wait {limit:g}s",
                    retryable=True,
                )
            attempt += 1
            self.limiter.pause(backoff)  # the rest of a longer Retry-After: in slot()
            waited += backoff

    def _attempt(self, req: urllib.request.Request, data, op_timeout: float) -> FetchedResponse:
        # A fresh deadline and redirect history for every attempt.
        req.wit_deadline = time.monotonic() + self.options.timeout
        req.wit_hops = 0
        if hasattr(req, "redirect_dict"):
            del req.redirect_dict
        resp = super().open(req, data, op_timeout)
        try:
            signal = self._opt_out(resp.headers)
            if signal is not None:
                note = optout.with_policy(signal, resp.url, optout.utc_now())
                raise FetchError(optout.OPT_OUT, note)
            body = read_body(resp, self.options.max_bytes)
        finally:
            resp.close()
        return FetchedResponse(body, resp.headers, resp.url, resp.status)

    def _opt_out(self, headers) -> str | None:
        """The response's opt-out signal, read before its body: ``X-Robots-Tag`` (for every
        agent or one of ours, as img2dataset reads it) or TDMRep's ``tdm-reservation: 1``."""
        directive = optout.x_robots_tag(
            headers.get_all("X-Robots-Tag") or (), self.agents, self.directives
        )
        if directive is not None:
            return f"x-robots-tag:{directive}"
        reserved = optout.tdm_reservation(headers.get("tdm-reservation")) == 1
        return optout.TDM_HEADER if self.options.respect_tdmrep and reserved else None


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """The wait a ``Retry-After`` header asks for, in seconds from ``now`` (a Unix time): its
    delay-seconds, or its HTTP-date minus ``now`` (at least 0); ``None`` when absent or
    unreadable (RFC 9110, 10.2.3)."""
    text = (value or "").strip()
    if not text:
        return None
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - now)


class FetchedResponse:
    """A response whose body has been read: what ``GuardedOpener.open`` returns.

    It has the parts of ``http.client.HTTPResponse`` that urllib callers use (``read``,
    ``headers``, ``status``, ``url``, ``geturl``, ``info``, ``getcode``, context manager).
    """

    def __init__(self, body: bytes, headers, url: str, status: int):
        self._body = io.BytesIO(body)
        self.headers = headers
        self.url = url
        self.status = status
        self.code = status

    def read(self, amt: int | None = None) -> bytes:
        return self._body.read() if amt is None else self._body.read(amt)

    def info(self):
        return self.headers

    def geturl(self) -> str:
        return self.url

    def getcode(self) -> int:
        return self.status

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> FetchedResponse:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_body(resp: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """Read a response body with ``read1`` (one socket read at a time) and a size limit."""
    length = resp.length
    if length is not None and length > max_bytes:
        raise FetchError("too_large", f"Content-Length {length} > {max_bytes} bytes")
    chunks = []
    total = 0
    while True:
        chunk = resp.read1(1 << 16)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise FetchError("too_large", f"body larger than {max_bytes} bytes")
        chunks.append(chunk)
    if resp.length:  # bytes announced by Content-Length that never came
        raise FetchError("truncated", f"body ended {resp.length} bytes early ({total} read)")
    return b"".join(chunks)


def build_opener(
    guard: Guard, options: FetchOptions, hop_check: Callable[[str, str], None] | None = None
) -> GuardedOpener:
    return GuardedOpener(guard, options, hop_check)


def install_urllib_opener(guard: Guard, options: FetchOptions) -> GuardedOpener:
    """Route ``urllib.request.urlopen`` in this process through a :class:`GuardedOpener`.

    A bare install for one-off callers; the download stage uses :data:`PROCESS_OPENER`, which
    shares one opener between all its DoFn instances of a process and puts the previous one
    back only after the last of them is done.
    """
    opener = build_opener(guard, options)
    urllib.request.install_opener(opener)
    return opener


class GuardConflictError(RuntimeError):
    """Another owner's guarded opener is active in this process (see :class:`ProcessOpener`)."""


class ProcessOpener:
    """The process-wide guarded urllib opener, shared by every user in the process.

    ``urllib.request.install_opener`` sets one opener for the whole process, while a Beam
    worker process runs several instances of a DoFn on several threads and tears idle ones
    down on its own schedule. So the opener is reference counted: :meth:`acquire` builds and
    installs it for the first user of an ``owner`` (a key shared by all instances of one
    transform) and counts the others, who get the same opener and so the same
    :class:`HostLimiter` (per-host limits hold per process); :meth:`release` puts the previous
    opener back only when the last user is done. The guard is therefore never off while any
    user is active. While one owner's opener is active, another owner (other settings) is
    refused with :class:`GuardConflictError` rather than silently sharing or replacing it.
    All state is behind one lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: str | None = None
        self._opener: GuardedOpener | None = None
        self._previous: Any = None
        self._users = 0

    def acquire(
        self,
        owner: str,
        guard: Guard,
        options: FetchOptions,
        hop_check: Callable[[], Callable[[str, str], None] | None] | None = None,
    ) -> GuardedOpener:
        """The owner's opener, installed (reinstalled if replaced); count one more user.

        ``hop_check`` makes the redirect check of a new opener (called once, by the first
        user: ``policy.RedirectCheck``, whose per-origin cache the process's threads share).
        """
        with self._lock:
            if self._opener is None:
                self._previous = installed_opener()
                self._opener = build_opener(guard, options, hop_check() if hop_check else None)
                self._owner = owner
            elif self._owner != owner:
                raise GuardConflictError(
                    "another download transform's guarded opener is active in this process; "
                    "run download transforms with different settings one after the other"
                )
            self._users += 1
            urllib.request.install_opener(self._opener)
            return self._opener

    def ensure(self, opener: GuardedOpener) -> None:
        """Fail closed: put ``opener`` (which must be active) back if something replaced it."""
        with self._lock:
            if opener is not self._opener:
                raise GuardConflictError("this opener is not the active guarded opener")
            if installed_opener() is not opener:
                urllib.request.install_opener(opener)

    def release(self, opener: GuardedOpener) -> None:
        """One user fewer; the last one gives the process its previous opener back."""
        with self._lock:
            if opener is not self._opener or self._users <= 0:
                return
            self._users -= 1
            if self._users:
                return
            if installed_opener() is opener:
                urllib.request.install_opener(self._previous)
            self._opener = self._owner = self._previous = None

    @property
    def users(self) -> int:
        with self._lock:
            return self._users


# The one piece of module-level mutable state here, on purpose: urllib's installed opener is
# process-wide, so the count of its users must be too. Small, and every access holds its lock.
PROCESS_OPENER = ProcessOpener()


def installed_opener() -> Any:
    """The opener ``urllib.request.urlopen`` currently uses (``None`` for the default)."""
    return urllib.request._opener  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# requests: robots.txt


def requests_session(guard: Guard, options: FetchOptions):
    """A ``requests.Session`` whose connections all go through ``guard``.

    Proxies from the environment are ignored (``trust_env=False``): a proxy would make the guard
    check the proxy's address instead of the origin's. Redirects are left to the caller
    (``allow_redirects=False``) so that it can apply its own hop policy; each hop it makes is
    a new request through the guard.
    """
    import requests
    import urllib3
    from requests.adapters import HTTPAdapter

    total = options.timeout

    def new_conn(conn) -> socket.socket:
        timeout = conn.timeout if isinstance(conn.timeout, int | float) else None
        return guard.connect(
            conn._dns_host, conn.port, deadline=time.monotonic() + total, op_timeout=timeout
        )

    class Conn(urllib3.connection.HTTPConnection):
        _new_conn = new_conn

    class SConn(urllib3.connection.HTTPSConnection):
        _new_conn = new_conn

    class Pool(urllib3.HTTPConnectionPool):
        ConnectionCls = Conn

    class SPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = SConn

    ctx = ssl_context(options.ca_bundle)

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
            super().init_poolmanager(connections, maxsize, block, ssl_context=ctx, **pool_kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": SPool}

        def proxy_manager_for(self, proxy, **proxy_kwargs):
            raise FetchError("invalid_url", "proxies are not used by the guarded session")

    session = requests.Session()
    session.trust_env = False
    session.proxies = {}
    session.headers["User-Agent"] = options.user_agent
    # One connection per request: robots.txt is one request per origin, and a pooled
    # keep-alive connection that the server has closed would fail the next request.
    session.headers["Connection"] = "close"
    if options.ca_bundle:
        session.verify = options.ca_bundle
    for prefix in list(session.adapters):
        del session.adapters[prefix]
    session.mount("http://", Adapter())
    session.mount("https://", Adapter())
    return session


def classify_requests_error(exc: BaseException) -> FetchError:
    """Map an exception raised by a guarded ``requests`` call to a :class:`FetchError`."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, FetchError | BlockedAddressError | DeadlineExceeded | socket.gaierror):
            return classify(e)
        for nxt in (e.__cause__, e.__context__, *getattr(e, "args", ())):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
    import requests

    if isinstance(exc, requests.Timeout):
        return FetchError("timeout", str(exc))
    if isinstance(exc, requests.exceptions.SSLError):
        return FetchError("tls_error", str(exc))
    if isinstance(exc, requests.ConnectionError):
        return FetchError("connection_error", str(exc))
    return classify(exc)


@dataclass(frozen=True)
class SmallResponse:
    """A small policy file fetched by :func:`get_small`: the final status, URL and body."""

    status: int
    url: str  # after redirects
    body: bytes  # at most ``limit`` bytes (2xx only)
    truncated: bool  # the body went on past ``limit``


class SmallFetchError(FetchError):
    """:func:`get_small` failed; ``hop`` says at which redirect hop (0: the first request)."""

    def __init__(self, err: FetchError, hop: int):
        super().__init__(err.reason, err.detail, retryable=err.retryable)
        self.hop = hop


def get_small(
    session,
    url: str,
    *,
    limit: int,
    connect_timeout: float,
    timeout: float,
    max_redirects: int,
) -> SmallResponse:
    """GET a small policy file (robots.txt, tdmrep.json) with a guarded ``requests`` session.

    Redirects are followed hop by hop, each a new guarded request, to http(s) URLs only
    (``bad_redirect`` otherwise) and at most ``max_redirects`` times (``too_many_redirects``);
    2xx bodies are read up to ``limit`` bytes. Errors raise :class:`SmallFetchError`.
    """
    from urllib.parse import urljoin

    for hop in range(max_redirects + 1):
        try:
            with session.get(
                url, timeout=(connect_timeout, timeout), allow_redirects=False, stream=True
            ) as resp:
                status = resp.status_code
                location = resp.headers.get("location")
                body, truncated = b"", False
                if 200 <= status < 300:
                    body, truncated = _read_limited(resp, limit)
                # No connection reuse between hops: a kept-alive connection that the server
                # has since closed would fail the next request.
                session.close()
        except Exception as e:
            session.close()
            raise SmallFetchError(classify_requests_error(e), hop) from None
        if 300 <= status < 400 and location:
            nxt = urljoin(url, location)
            if urlsplit(nxt).scheme.lower() not in ("http", "https"):
                raise SmallFetchError(FetchError("bad_redirect", f"redirects to {nxt[:100]}"), hop)
            url = nxt
            continue
        return SmallResponse(status, url, body, truncated)
    raise SmallFetchError(
        FetchError("too_many_redirects", f"more than {max_redirects} redirects"), max_redirects
    )


def _read_limited(resp, limit: int) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    total = 0
    for chunk in resp.iter_content(chunk_size=1 << 14):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            break
    return b"".join(chunks)[:limit], total > limit
