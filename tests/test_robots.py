"""robots.txt: RFC 9309 matching, and the fetch policy against servers on 127.0.0.1."""

from __future__ import annotations

import time

import pytest
from download_server import redirect, send

from wit_pipeline.loopback import ImageServer
from wit_pipeline.stages.download import guarded_http, netguard, robots

UA = "wit-pipeline/0.1 (+https://example.org/bot)"

ROBOTS = """\
# comment
User-agent: Googlebot
Disallow: /

User-agent: *
Disallow: /private/
Disallow: /*.gif$
Allow: /private/public/
Disallow: /search?q=
Crawl-delay: 2

user-agent: WIT-Pipeline
user-agent: otherbot
disallow: /only-wit/
allow: /only-wit/yes.jpg
disallow: /fish*.php
"""


@pytest.mark.parametrize(
    "agent, path, allowed",
    [
        # Our group (matched case-insensitively by product token) replaces the * group.
        (UA, "/private/x.jpg", True),
        (UA, "/only-wit/x.jpg", False),
        (UA, "/only-wit/yes.jpg", True),  # longer allow wins
        (UA, "/fish.php", False),
        (UA, "/fishheads/catfish.php?parameters", False),
        (UA, "/Fish.PHP", True),  # paths are case-sensitive
        (UA, "/robots.txt", True),
        # An agent without its own group gets the * group.
        ("somebot/2.0", "/private/x.jpg", False),
        ("somebot/2.0", "/private/public/x.jpg", True),
        ("somebot/2.0", "/a/b.gif", False),
        ("somebot/2.0", "/a/b.gif?x=1", True),  # $ anchors the end
        ("somebot/2.0", "/search?q=cats", False),
        ("somebot/2.0", "/search", True),
        ("somebot/2.0", "/", True),
        ("Googlebot/2.1", "/anything", False),
    ],
)
def test_rules(agent, path, allowed):
    assert robots.parse(ROBOTS, agent).can_fetch(f"http://h.test{path}") is allowed


def test_parse_details():
    star = robots.parse(ROBOTS, "somebot")
    assert star == robots.Rules(
        allow=("/private/public/",),
        disallow=("/private/", "/*.gif$", "/search?q="),
        crawl_delay=2.0,
    )
    # Empty robots.txt, empty Disallow, and rules before any user-agent allow everything.
    assert robots.parse("", UA).can_fetch("http://h.test/x")
    assert robots.parse("User-agent: *\nDisallow:\n", UA).can_fetch("http://h.test/x")
    assert robots.parse("Disallow: /\n", UA).can_fetch("http://h.test/x")


def test_tie_goes_to_allow_and_percent_encoding_is_normalized():
    rules = robots.parse("User-agent: *\nDisallow: /a\nAllow: /a\nDisallow: /%7Ejoe/\n", UA)
    assert rules.can_fetch("http://h.test/a")
    assert not rules.can_fetch("http://h.test/~joe/pic.jpg")
    assert not rules.can_fetch("http://h.test/%7ejoe/pic.jpg")
    uni = robots.parse("User-agent: *\nDisallow: /café/\n", UA)
    assert not uni.can_fetch("http://h.test/caf%C3%A9/x.jpg")


def test_merged_groups_for_the_same_agent():
    text = "User-agent: a\nDisallow: /x/\n\nUser-agent: b\nDisallow: /y/\n\nUser-agent: a\nDisallow: /z/\n"
    rules = robots.parse(text, "a")
    assert rules.disallow == ("/x/", "/z/")


def test_origin():
    assert robots.origin("http://h.test:8080/a/b.jpg?x") == "http://h.test:8080"
    assert robots.origin("https://user@h.test/a") == "https://h.test"


@pytest.fixture
def server():
    with ImageServer() as srv:
        yield srv


def _fetch(server, host="127.0.0.1", resolver=None, timeout=2.0):
    guard = netguard.Guard(
        policy=netguard.AddressPolicy(allow_loopback=True),
        resolver=resolver or netguard.system_resolver,
        connect_timeout=2,
    )
    session = guarded_http.requests_session(guard, guarded_http.FetchOptions(user_agent=UA))
    return robots.fetch_robots(
        session,
        f"http://{host}:{server.port}",
        user_agent=UA,
        connect_timeout=2,
        timeout=timeout,
    )


def test_fetch_policy(server):
    url = "http://x.test/private/a.jpg"

    def robots_route(status, body=b"User-agent: *\nDisallow: /private/\n"):
        server.route("/robots.txt", lambda req: send(req, status, body, "text/plain"))

    robots_route(200)
    v = _fetch(server)
    assert v.kind == robots.RULES and v.check(url) == ("robots", "disallowed by robots.txt")
    assert v.check("http://x.test/public/a.jpg") is None
    for status in (404, 401, 403, 410):  # unavailable: allow all
        robots_route(status)
        assert _fetch(server).kind == robots.ALLOW, status
    for status in (429, 500, 503):  # unreachable: disallow all
        robots_route(status)
        v = _fetch(server)
        assert v.kind == robots.DISALLOW_ALL, status
        assert v.check(url) == ("robots", f"robots.txt unreachable: HTTP {status}")


def test_fetch_follows_redirects_through_the_guard(server):
    server.route("/robots.txt", lambda req: redirect(req, "/real-robots.txt"))
    server.route(
        "/real-robots.txt",
        lambda req: send(req, 200, b"User-agent: *\nDisallow: /\n", "text/plain"),
    )
    v = _fetch(server)
    assert v.kind == robots.RULES and v.check("http://x.test/a.jpg")[0] == "robots"
    server.route("/robots.txt", lambda req: redirect(req, "http://169.254.169.254/robots.txt"))
    v = _fetch(server)
    assert v.kind == robots.DISALLOW_ALL
    assert v.detail.startswith("robots.txt unreachable: blocked_address")
    server.route("/robots.txt", lambda req: redirect(req, "/robots.txt"))
    assert _fetch(server).kind == robots.ALLOW  # more than 5 redirects: unavailable


def test_fetch_timeout_is_unreachable(server):
    def slow(req):
        time.sleep(3)
        send(req, 200, b"", "text/plain")

    server.route("/robots.txt", slow)
    v = _fetch(server, timeout=0.5)
    assert v.kind == robots.DISALLOW_ALL
    assert v.detail.startswith("robots.txt unreachable: timeout")


def test_blocked_or_unresolvable_origin(server):
    resolver = netguard.StaticResolver.of({"meta.test": ["169.254.169.254"]})
    v = _fetch(server, host="meta.test", resolver=resolver)
    assert (v.kind, v.reason) == (robots.BLOCKED, "blocked_address")
    assert v.check("http://meta.test/a.jpg")[0] == "blocked_address"
    v = _fetch(server, host="nowhere.test", resolver=resolver)
    assert (v.kind, v.reason) == (robots.BLOCKED, "dns_error")


def test_body_is_capped(server):
    big = b"User-agent: *\n" + b"Allow: /x\n" * 60_000 + b"Disallow: /\n"
    server.route("/robots.txt", lambda req: send(req, 200, big, "text/plain"))
    v = _fetch(server)
    # The Disallow line lies beyond 500 KiB and is ignored.
    assert len(big) > robots.MAX_ROBOTS_BYTES
    assert v.check("http://x.test/y.jpg") is None
