"""The SSRF guard: address policy, checked connections, guarded urllib and requests.

Every test runs under the socket-level network jail (tests/netjail.py): if the guard let a
connection through to a non-loopback address, the jail would raise and record a violation and
the autouse fixture in conftest.py would fail the test. The guard must refuse first.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import urllib.request

import pytest
from download_server import JPEG, redirect, send
from tlsutil import make_ca_and_cert

import netjail
from wit_pipeline.loopback import ImageServer
from wit_pipeline.stages.download import guarded_http, netguard

STRICT = netguard.AddressPolicy()
LOOPBACK_OK = netguard.AddressPolicy(allow_loopback=True)


@pytest.mark.parametrize(
    "address, klass",
    [
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "shared"),
        ("169.254.169.254", "link_local"),
        ("fe80::1", "link_local"),
        ("fd00::1", "private"),
        ("fec0::1", "site_local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "private"),
        ("255.255.255.255", "private"),
        ("192.0.2.1", "private"),  # documentation (TEST-NET-1)
        ("198.18.0.1", "private"),  # benchmarking
        ("::ffff:169.254.169.254", "link_local"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:8.8.8.8", None),
        ("2002:a9fe:a9fe::1", "link_local"),  # 6to4 around 169.254.169.254
        ("2002:0808:0808::1", None),  # 6to4 around 8.8.8.8
        ("64:ff9b::a9fe:a9fe", "link_local"),  # NAT64 around 169.254.169.254
        ("64:ff9b::808:808", None),
        ("2001:db8::1", "private"),  # documentation
    ],
)
def test_address_class(address, klass):
    assert netguard.address_class(ipaddress.ip_address(address)) == klass
    assert STRICT.allows(address) is (klass is None)


@pytest.mark.parametrize(
    "address, allowed",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("::", False),
        ("fe80::1", False),
        ("::ffff:169.254.169.254", False),
        ("8.8.8.8", True),
    ],
)
def test_allow_loopback_permits_exactly_loopback(address, allowed):
    assert LOOPBACK_OK.allows(address) is allowed


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("2852039166", "169.254.169.254"),
        ("0251.0376.0251.0376", "169.254.169.254"),  # octal
        ("[::1]", "::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("example.com", None),
        ("deadbeef", None),
        ("1.2.3.4.5", None),
    ],
)
def test_parse_ip_reads_legacy_ipv4_forms(text, expected):
    got = netguard.parse_ip(text)
    assert (str(got) if got is not None else None) == expected


def test_system_resolver_never_looks_up_ip_literals():
    # The jail refuses getaddrinfo for anything but localhost: literals must not reach it.
    assert netguard.system_resolver("2852039166", 80) == ["169.254.169.254"]
    assert netguard.system_resolver("::1", 80) == ["::1"]


@pytest.fixture
def server():
    with ImageServer() as srv:
        srv.route("/ok.jpg", lambda req: send(req, 200, JPEG))
        yield srv


def test_guard_refuses_every_forbidden_address_without_connecting(server):
    resolver = netguard.StaticResolver.of(
        {
            "metadata.test": ["169.254.169.254"],
            "mixed.test": ["10.0.0.1", "fd00::1", "::ffff:192.168.0.1"],
            "loop.test": ["127.0.0.1"],
        }
    )
    guard = netguard.Guard(policy=STRICT, resolver=resolver, connect_timeout=2)
    for host in ("metadata.test", "mixed.test", "loop.test", "2852039166", "0.0.0.0", "::"):
        with pytest.raises(netguard.BlockedAddressError):
            guard.connect(host, server.port)
    # Not even loopback without allow_loopback.
    with pytest.raises(netguard.BlockedAddressError):
        guard.connect("127.0.0.1", server.port)
    with pytest.raises(netguard.FetchError) as e:
        guard.connect("unknown.test", server.port)
    assert e.value.reason == "dns_error"


def test_guard_connects_to_the_address_it_checked():
    """DNS rebinding: the guard resolves once per connection and connects to what it checked."""
    calls = []

    def rebinding_resolver(host, port):
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["169.254.169.254"]

    with ImageServer() as srv:
        guard = netguard.Guard(policy=LOOPBACK_OK, resolver=rebinding_resolver)
        sock = guard.connect("rebind.test", srv.port)
        assert sock.getpeername()[0] == "127.0.0.1"
        assert calls == ["rebind.test"]  # resolved exactly once for this connection
        sock.close()
        with pytest.raises(netguard.BlockedAddressError, match=r"169\.254\.169\.254"):
            guard.connect("rebind.test", srv.port)
        assert calls == ["rebind.test", "rebind.test"]


def test_guard_skips_refused_addresses_of_a_mixed_answer(server):
    resolver = netguard.StaticResolver.of({"mixed.test": ["10.9.9.9", "127.0.0.1"]})
    guard = netguard.Guard(policy=LOOPBACK_OK, resolver=resolver)
    with guard.connect("mixed.test", server.port) as sock:
        assert sock.getpeername()[0] == "127.0.0.1"


def _opener(**kw):
    resolver = kw.pop("resolver", None) or netguard.system_resolver
    guard = netguard.Guard(policy=LOOPBACK_OK, resolver=resolver, connect_timeout=2)
    opts = dict(timeout=3.0, retries=1, retry_backoff=0.01, user_agent="wit-test/1.0")
    opts.update(kw)
    return guarded_http.build_opener(guard, guarded_http.FetchOptions(**opts))


def _reason(opener, url):
    with pytest.raises(netguard.FetchError) as e:
        opener.open(url)
    return e.value.reason


def test_opener_refuses_redirects_to_internal_addresses(server):
    targets = {
        "/meta": "http://169.254.169.254/latest/meta-data/iam/",
        "/priv": "http://192.168.0.1/admin",
        "/v6": "http://[fd00::1]:8080/",
        "/mapped": "http://[::ffff:a9fe:a9fe]/",
        "/zero": f"http://0.0.0.0:{server.port}/ok.jpg",
        "/octal": "http://0251.0376.0251.0376/",
    }
    for path, target in targets.items():
        server.route(path, lambda req, t=target: redirect(req, t))
    opener = _opener()
    for path in targets:
        assert _reason(opener, server.url(path)) == "blocked_address", path
    # The same hops to loopback are fine with allow_loopback.
    server.route("/local", lambda req: redirect(req, server.url("/ok.jpg", "localhost")))
    with opener.open(server.url("/local")) as r:
        assert r.read() == JPEG


def test_opener_refuses_other_schemes_and_proxies(server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://10.0.0.1:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://10.0.0.1:3128")
    opener = _opener()
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/x", "data:,hello", "gopher://x/"):
        assert _reason(opener, url) == "invalid_url"
    with opener.open(server.url("/ok.jpg")) as r:  # no proxy is used
        assert r.read() == JPEG


def test_urlopen_goes_through_the_installed_guard(server):
    """What img2dataset calls (urllib.request.urlopen) is guarded once the opener is installed."""
    server.route("/meta", lambda req: redirect(req, "http://169.254.169.254/"))
    before = urllib.request._opener
    try:
        opener = guarded_http.install_urllib_opener(
            netguard.Guard(policy=LOOPBACK_OK), guarded_http.FetchOptions(retries=0)
        )
        assert guarded_http.installed_opener() is opener
        with pytest.raises(netguard.FetchError) as e:
            urllib.request.urlopen(urllib.request.Request(server.url("/meta")), timeout=3)
        assert e.value.reason == "blocked_address"
        assert str(e.value).startswith("wit:blocked_address: ")
    finally:
        urllib.request.install_opener(before)


def test_retries_only_retryable_errors(server):
    hits = {"/404": 0, "/503": 0, "/flaky": 0}

    def handler(path, status_fn):
        def h(req):
            hits[path] += 1
            status = status_fn(hits[path])
            send(req, status, JPEG if status == 200 else b"x", "image/jpeg")

        return h

    server.route("/404", handler("/404", lambda n: 404))
    server.route("/503", handler("/503", lambda n: 503))
    server.route("/flaky", handler("/flaky", lambda n: 503 if n == 1 else 200))
    opener = _opener(retries=2)
    assert _reason(opener, server.url("/404")) == "http_404"
    assert _reason(opener, server.url("/503")) == "http_503"
    with opener.open(server.url("/flaky")) as r:
        assert r.read() == JPEG
    assert hits == {"/404": 1, "/503": 3, "/flaky": 2}


def test_slow_drip_is_cut_at_the_total_deadline(server):
    def drip(req):
        req.close_connection = True
        req.send_response(200)
        req.send_header("Content-Length", "1000")
        req.end_headers()
        for _ in range(1000):
            req.wfile.write(b"x")
            req.wfile.flush()
            time.sleep(0.05)

    server.route("/drip", drip)
    opener = _opener(timeout=1.0, retries=0)
    with pytest.raises(netguard.FetchError) as e:
        opener.open(server.url("/drip"))
    # Each byte arrives well within the per-read timeout (also 1 s): only the total deadline
    # can stop it, and the error says that it did.
    assert (e.value.reason, e.value.detail) == ("timeout", "total request time exceeded")


def test_connect_timeout_ends_a_connection_nobody_accepts():
    """A listener whose backlog is full never completes the handshake: the connect timeout,
    not the (much longer) total deadline, ends the attempt."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: the kernel queues one connection, then drops SYNs
        port = listener.getsockname()[1]
        queued = []
        try:
            for _ in range(8):
                s = socket.socket()
                s.settimeout(0.5)
                try:
                    s.connect(("127.0.0.1", port))
                except TimeoutError:
                    s.close()
                    break
                queued.append(s)
            else:
                pytest.fail("the listen backlog never filled up")
            guard = netguard.Guard(policy=LOOPBACK_OK, connect_timeout=0.25)
            opener = guarded_http.build_opener(
                guard, guarded_http.FetchOptions(timeout=60.0, retries=0)
            )
            with pytest.raises(netguard.FetchError) as e:
                opener.open(f"http://127.0.0.1:{port}/x.jpg")
        finally:
            for s in queued:
                s.close()
    assert (e.value.reason, e.value.detail) == (
        "timeout",
        f"connect to 127.0.0.1 port {port}: no answer within 0.25s",
    )


def test_size_limit_and_user_agent(server):
    seen = {}

    def big(req):
        seen["ua"] = req.headers.get("User-Agent")
        send(req, 200, b"\xff" * 5000)

    server.route("/big", big)
    assert _reason(_opener(max_bytes=1000), server.url("/big")) == "too_large"
    assert seen["ua"] == "wit-test/1.0"


def test_opt_out_header_is_refused_before_the_body(server):
    server.route("/noai", lambda req: send(req, 200, JPEG, X_Robots_Tag="noai"))
    server.route("/other", lambda req: send(req, 200, JPEG, X_Robots_Tag="otherbot: noai"))
    server.route("/ours", lambda req: send(req, 200, JPEG, X_Robots_Tag="wit-test: noimageai"))
    opener = _opener(user_agent_token="wit-test")
    assert _reason(opener, server.url("/noai")) == "opt_out"
    assert _reason(opener, server.url("/ours")) == "opt_out"
    with opener.open(server.url("/other")) as r:
        assert r.read() == JPEG


def test_https_through_the_guard(tmp_path):
    ca, cert, key = make_ca_and_cert(tmp_path, ["localhost", "127.0.0.1"])
    with ImageServer(tls=(cert, key)) as srv:
        srv.route("/ok.jpg", lambda req: send(req, 200, JPEG))
        srv.route("/meta", lambda req: redirect(req, "https://169.254.169.254/"))
        opener = _opener(ca_bundle=ca)
        with opener.open(srv.url("/ok.jpg", "localhost")) as r:
            assert r.read() == JPEG
        assert _reason(opener, srv.url("/meta", "localhost")) == "blocked_address"
        # Without our CA the certificate is refused.
        assert _reason(_opener(retries=0), srv.url("/ok.jpg", "localhost")) == "tls_error"
        session = guarded_http.requests_session(
            netguard.Guard(policy=LOOPBACK_OK),
            guarded_http.FetchOptions(ca_bundle=ca, user_agent="wit-test/1.0"),
        )
        assert session.get(srv.url("/ok.jpg", "localhost"), timeout=3).content == JPEG


def test_requests_session_is_guarded(server):
    resolver = netguard.StaticResolver.of({"metadata.test": ["169.254.169.254"]})
    session = guarded_http.requests_session(
        netguard.Guard(policy=LOOPBACK_OK, resolver=resolver), guarded_http.FetchOptions()
    )
    assert session.get(server.url("/ok.jpg"), timeout=3).content == JPEG
    for url in ("http://169.254.169.254/", "http://metadata.test/", "http://[::ffff:a00:1]/"):
        with pytest.raises(Exception) as e:
            session.get(url, timeout=3)
        assert guarded_http.classify_requests_error(e.value).reason == "blocked_address"
    strict = guarded_http.requests_session(
        netguard.Guard(policy=STRICT), guarded_http.FetchOptions()
    )
    with pytest.raises(Exception) as e:
        strict.get(server.url("/ok.jpg"), timeout=3)
    assert guarded_http.classify_requests_error(e.value).reason == "blocked_address"


def test_jail_would_catch_an_unguarded_fetch():
    """Control: the same request without the guard reaches the jail (so the tests above mean
    something)."""
    start = len(netjail.violations)
    with pytest.raises(OSError):
        urllib.request.build_opener().open("http://169.254.169.254/", timeout=1)
    assert len(netjail.violations) == start + 1
    del netjail.violations[start:]  # provoked on purpose


def test_deadline_socket_raises_once_time_is_up():
    a, b = socket.socketpair()
    with a, b:
        s = netguard.DeadlineSocket(fileno=a.detach())
        s._wit_deadline = time.monotonic() - 1
        with pytest.raises(TimeoutError):
            s.recv(1)
        s.close()


def test_ipv6_loopback_only_with_allow_loopback():
    with ImageServer(host="::1") as srv:
        srv.route("/ok.jpg", lambda req: send(req, 200, JPEG))
        url = srv.url("/ok.jpg")
        assert url.startswith("http://[::1]:")
        with _opener().open(url) as r:
            assert r.read() == JPEG
        strict = guarded_http.build_opener(
            netguard.Guard(policy=STRICT), guarded_http.FetchOptions()
        )
        assert _reason(strict, url) == "blocked_address"


def test_per_host_concurrency_and_rate(server):
    import threading

    state = {"now": 0, "max": 0, "served": 0}
    lock = threading.Lock()

    def slow(req):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            state["served"] += 1
        time.sleep(0.2)
        with lock:
            state["now"] -= 1
        send(req, 200, JPEG)

    server.route("/slow", slow)
    opener = _opener(per_host_concurrency=2)
    threads = [
        threading.Thread(target=lambda: opener.open(server.url("/slow")).read()) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= state["max"] <= 2 and state["served"] == 8
    # Rate: requests to one host start 1/rate apart, or Crawl-delay apart where longer; other
    # hosts are not held up. A fake clock that only sleeping advances makes the spacing exact.
    clock = {"now": 100.0}
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        clock["now"] += seconds

    limiter = guarded_http.HostLimiter(rate=4.0, clock=lambda: clock["now"], sleep=sleep)
    limiter.set_interval("slow.test", 0.5)
    starts = []
    for host in ("fast.test", "slow.test", "fast.test", "slow.test", "fast.test", "other.test"):
        with limiter.slot(host):
            starts.append((host, clock["now"]))
    assert starts == [
        ("fast.test", 100.0),
        ("slow.test", 100.0),
        ("fast.test", 100.25),
        ("slow.test", 100.5),
        ("fast.test", 100.5),
        ("other.test", 100.5),
    ]
    assert sleeps == [0.25, 0.25]
