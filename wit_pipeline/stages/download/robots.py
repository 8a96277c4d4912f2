"""robots.txt (RFC 9309): parsing, matching, and the fetch policy of the download stage.

Matching follows RFC 9309 as Google implements it: the group whose user-agent equals our
product token (case-insensitive) applies, else the ``*`` group; several groups for one agent
are merged; among the ``allow``/``disallow`` rules that match the URL's path and query, the
longest pattern wins and ``allow`` wins a tie; ``*`` matches any run of characters and a final
``$`` anchors the end; ``/robots.txt`` itself is always allowed.

Fetch policy (:func:`fetch_robots`), per origin (scheme, host, port):

- 2xx: the rules in the first 500 KiB of the body apply.
- 3xx: up to 5 redirects are followed through the SSRF guard (http/https only); more than 5
  means "unavailable" (below).
- 4xx other than 429: "unavailable": every URL of the origin is allowed (RFC 9309 2.3.1.3).
- 429, 5xx, timeouts, connection errors, TLS errors, a redirect to a refused address:
  "unreachable": every URL of the origin is disallowed for this run (RFC 9309 2.3.1.4; Google
  does the same for 5xx), reason ``robots``.
- The origin's own address refused by the guard: every URL is ``blocked_address``; the name
  does not resolve: every URL is ``dns_error``. No image request is made in either case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from functools import lru_cache
from urllib.parse import quote, urlsplit

from wit_pipeline import optout

MAX_ROBOTS_BYTES = 500 * 1024
MAX_ROBOTS_REDIRECTS = 5

ALLOW = "allow"
DISALLOW_ALL = "disallow_all"
RULES = "rules"
BLOCKED = "blocked"


@lru_cache(maxsize=4096)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    anchored = pattern.endswith("$")
    body = pattern[:-1] if anchored else pattern
    regex = ".*".join(re.escape(part) for part in body.split("*"))
    return re.compile(regex + (r"\Z" if anchored else ""), re.S)


_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"


def _normalize_path(path: str) -> str:
    """Percent-encode non-ASCII and decode escaped unreserved characters (RFC 9309 2.2.2)."""

    def fix(m: re.Match[str]) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if ch in _UNRESERVED else m.group(0).upper()

    path = re.sub(r"%([0-9A-Fa-f]{2})", fix, path)
    return quote(path, safe="/?=&;:@!$'()*+,%-._~[]#")


@dataclasses.dataclass(frozen=True)
class Rules:
    """The allow/disallow rules that apply to one user agent."""

    allow: tuple[str, ...] = ()
    disallow: tuple[str, ...] = ()
    crawl_delay: float | None = None

    def can_fetch(self, url: str) -> bool:
        parts = urlsplit(url)
        path = parts.path or "/"
        if path == "/robots.txt":
            return True
        target = _normalize_path(path + (f"?{parts.query}" if parts.query else ""))
        best_len = -1
        best_allow = True
        for allow, patterns in ((True, self.allow), (False, self.disallow)):
            for p in patterns:
                longer = len(p) > best_len or (len(p) == best_len and allow)
                if longer and _pattern_regex(p).match(target):
                    best_len = len(p)
                    best_allow = allow
        return best_allow


def _product_token(user_agent: str) -> str:
    """``"Googlebot"`` from ``"Googlebot/2.1 (+http://...)"``, lower-cased."""
    token = re.split(r"[/\s;(]", user_agent.strip(), maxsplit=1)[0]
    return token.lower()


def parse(text: str, user_agent: str) -> Rules:
    """The rules of ``text`` that apply to ``user_agent`` (its product token is matched)."""
    token = _product_token(user_agent)
    groups: list[tuple[list[str], list[tuple[str, str]], list[float]]] = []
    agents: list[str] = []
    rules: list[tuple[str, str]] = []
    delays: list[float] = []
    in_rules = False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        key, _, value = line.partition(":")
        key = key.strip().lower().replace("_", "-")
        value = value.strip()
        if key in ("user-agent", "useragent"):
            if in_rules:
                groups.append((agents, rules, delays))
                agents, rules, delays = [], [], []
                in_rules = False
            agents.append(_product_token(value) if value != "*" else "*")
        elif key in ("allow", "disallow"):
            if not agents:
                continue  # rules before any user-agent line belong to no group
            in_rules = True
            if value:
                rules.append((key, _normalize_path(value)))
        elif key == "crawl-delay":
            if not agents:
                continue
            in_rules = True
            with contextlib.suppress(ValueError):
                delays.append(float(value))
    if agents:
        groups.append((agents, rules, delays))
    chosen = [g for g in groups if token and token in g[0]]
    if not chosen:
        chosen = [g for g in groups if "*" in g[0]]
    allow = tuple(v for g in chosen for k, v in g[1] if k == "allow")
    disallow = tuple(v for g in chosen for k, v in g[1] if k == "disallow")
    delay = next((d for g in chosen for d in g[2]), None)
    return Rules(allow=allow, disallow=disallow, crawl_delay=delay)


# A decision about one URL: (reason, detail, policy URL, when the policy was fetched).
Decision = tuple[str, str, "str | None", "str | None"]


@dataclasses.dataclass(frozen=True)
class RobotsVerdict:
    """What robots.txt says about one origin: ``kind`` is allow, rules, disallow_all, blocked.

    ``reason`` is the drop reason for disallowed URLs (``robots``, ``blocked_address``,
    ``dns_error``) and ``detail`` says why (status, error); ``url`` is the robots.txt URL the
    verdict rests on (after redirects) and ``fetched`` when it was fetched (ISO 8601 UTC).
    """

    kind: str
    rules: Rules = Rules()
    reason: str = "robots"
    detail: str = ""
    url: str = ""
    fetched: str = ""

    def check(self, url: str) -> tuple[str, str] | None:
        """``None`` if ``url`` may be fetched, else ``(reason, detail)``."""
        if self.kind == ALLOW:
            return None
        if self.kind == RULES:
            return None if self.rules.can_fetch(url) else ("robots", optout.DISALLOWED)
        return (self.reason, self.detail)

    def decide(self, url: str) -> Decision | None:
        """:meth:`check` with the policy it rests on: ``(reason, detail, robots.txt URL, when
        it was fetched)``; the policy is None for an origin the guard refused (no robots.txt)."""
        found = self.check(url)
        if found is None:
            return None
        if self.kind == BLOCKED:
            return (*found, None, None)
        return (*found, self.url or None, self.fetched or None)


def origin(url: str) -> str:
    """``scheme://host[:port]`` of a normalized URL (the unit robots.txt applies to)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


def fetch_robots(
    session,
    origin_url: str,
    *,
    user_agent: str,
    connect_timeout: float,
    timeout: float,
) -> RobotsVerdict:
    """Fetch ``origin_url/robots.txt`` with a guarded ``requests`` session; apply the policy."""
    from wit_pipeline.stages.download import guarded_http

    url = origin_url.rstrip("/") + "/robots.txt"
    fetched = optout.utc_now()
    try:
        resp = guarded_http.get_small(
            session,
            url,
            limit=MAX_ROBOTS_BYTES,
            connect_timeout=connect_timeout,
            timeout=timeout,
            max_redirects=MAX_ROBOTS_REDIRECTS,
        )
    except guarded_http.SmallFetchError as err:
        if err.reason == "bad_redirect":
            return RobotsVerdict(ALLOW, detail=f"robots.txt {err.detail}", url=url, fetched=fetched)
        if err.reason == "too_many_redirects":
            return RobotsVerdict(
                ALLOW, detail="robots.txt: too many redirects", url=url, fetched=fetched
            )
        if err.hop == 0 and err.reason in ("blocked_address", "dns_error"):
            return RobotsVerdict(BLOCKED, reason=err.reason, detail=err.detail)
        detail = f"robots.txt unreachable: {err.reason}: {err.detail}"[:300]
        return RobotsVerdict(DISALLOW_ALL, detail=detail, url=url, fetched=fetched)
    status, where = resp.status, {"url": resp.url, "fetched": fetched}
    if 200 <= status < 300:
        text = resp.body.decode("utf-8", errors="replace").lstrip("\ufeff")
        return RobotsVerdict(RULES, parse(text, user_agent), detail=f"HTTP {status}", **where)
    if 400 <= status < 500 and status != 429:
        return RobotsVerdict(ALLOW, detail=f"robots.txt HTTP {status}", **where)
    return RobotsVerdict(DISALLOW_ALL, detail=f"robots.txt unreachable: HTTP {status}", **where)
