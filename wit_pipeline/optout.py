"""Opt-out signals: how the web says "not for AI", read the same way at gather and at download.

Signals and their names (the ``detail`` of a pair dropped as ``opt_out``, and the counter
``opt_out/<signal>``):

- ``robots.txt``: robots.txt disallows the URL for our product token (reason ``robots``; also for
  every redirect target's origin);
- ``<name>-meta:<directive>``: ``<meta name="robots" content="noai">`` (``robots-meta:noai``), or
  a meta named after one of our agents (``img2dataset-meta:noimageai``), on the page an image
  was found on;
- ``x-robots-tag:<directive>``: an ``X-Robots-Tag`` response header, of the page (gather) or of
  the image (download), for all agents or for one of ours (``X-Robots-Tag: wit-pipeline: noai``);
- ``tdm-reservation:header``, ``tdm-reservation:meta``: TDMRep (W3C TDM Reservation Protocol)
  ``tdm-reservation: 1`` as a response header or as ``<meta name="tdm-reservation">``;
- ``tdmrep.json``: the origin's ``/.well-known/tdmrep.json`` reserves the URL's path.

Every decision also records the policy it rests on: ``policy_url`` (robots.txt, tdmrep.json,
the page or the image URL whose header or meta said so) and ``policy_fetched`` (when it was
fetched: the WARC record's date for pages of a crawl, the fetch time at download), fields of
``stage.REJECTED_SCHEMA``.
"""

from __future__ import annotations

import collections
import datetime
import re
from collections.abc import Collection, Iterable, Mapping, Sequence

from wit_pipeline import counters as counters_lib

OPT_OUT = "opt_out"  # the drop reason of every opt-out signal but robots.txt
ROBOTS = "robots"  # robots.txt's drop reason (download)
SCOPE = "opt_out"  # counters: opt_out/<signal>, pairs dropped per signal
ROBOTS_TXT = "robots.txt"
TDMREP_JSON = "tdmrep.json"
TDM_HEADER = "tdm-reservation:header"
TDM_META = "tdm-reservation:meta"
DISALLOWED = "disallowed by robots.txt"  # the detail of a robots.txt disallow (download)

# X-Robots-Tag directives that carry a value after a colon (not a user agent before one).
_VALUE_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)
_POLICY_NOTE = re.compile(r"^(.*) \[policy (\S+) fetched (\S+)\]$", re.S)


def utc_now() -> str:
    """Now, as recorded in ``policy_fetched``: ISO 8601 UTC to the second."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def x_robots_tag(
    values: Iterable[str], agents: Collection[str], directives: Collection[str]
) -> str | None:
    """The first opting-out directive of ``X-Robots-Tag`` header values, else None.

    Each header value is read on its own, as Google does: ``noai, noindex`` applies to every
    agent; ``otherbot: noai`` only to ``otherbot`` (and the directives after it in that value),
    so it applies to us only when ``otherbot`` is one of ``agents`` (product tokens, lower
    case). ``directives`` are lower case (``noai``, ``noimageai``, ...).
    """
    if not directives:
        return None
    for value in values:
        agent = None
        for item in str(value).split(","):
            name, colon, rest = item.partition(":")
            name = name.strip().lower()
            if colon and name and name not in _VALUE_DIRECTIVES and " " not in name:
                agent, item = name, rest
            directive = item.strip().lower()
            if directive in directives and (agent is None or agent in agents):
                return directive
    return None


def meta_robots(
    metas: Sequence[tuple[str, str]], agents: Collection[str], directives: Collection[str]
) -> str | None:
    """``<name>-meta:<directive>`` for the first ``<meta name=robots|AGENT>`` that opts out.

    ``metas`` are ``(name, content)`` pairs, names lower case, in page order.
    """
    if not directives:
        return None
    for name, content in metas:
        if name != "robots" and name not in agents:
            continue
        for item in content.split(","):
            directive = item.strip().lower()
            if directive in directives:
                return f"{name}-meta:{directive}"
    return None


def tdm_reservation(value: str | None) -> int | None:
    """TDMRep's ``tdm-reservation``: 1 (reserved), 0 (not), None (unset or a protocol error)."""
    v = (value or "").strip()
    return int(v) if v in ("0", "1") else None


def tdm_page(header: str | None, metas: Sequence[tuple[str, str]]) -> str | None:
    """``tdm-reservation:header`` or ``:meta`` when a page reserves TDM rights, else None.

    TDMRep's processing priority: the header's value, superseded by the HTML meta's when the
    page has a valid one (so ``<meta name="tdm-reservation" content="0">`` lifts a header's 1).
    """
    meta = next((tdm_reservation(c) for n, c in metas if n == "tdm-reservation"), None)
    if meta is not None:
        return TDM_META if meta == 1 else None
    return TDM_HEADER if tdm_reservation(header) == 1 else None


def page_signal(
    headers: Mapping[str, Sequence[str]],
    metas: Sequence[tuple[str, str]],
    *,
    agents: Collection[str],
    directives: Collection[str],
    tdm: bool,
) -> str | None:
    """The opt-out signal of a page, from its response ``headers`` (lower-case names, every
    value) and its meta tags, or None: meta robots, then X-Robots-Tag, then TDMRep."""
    return (
        meta_robots(metas, agents, directives)
        or _prefixed(
            "x-robots-tag:", x_robots_tag(headers.get("x-robots-tag", ()), agents, directives)
        )
        or (tdm_page(next(iter(headers.get("tdm-reservation", ())), None), metas) if tdm else None)
    )


def _prefixed(prefix: str, value: str | None) -> str | None:
    return f"{prefix}{value}" if value else None


# ---------------------------------------------------------------------------------------------
# Rejected rows and counts


def signal_of(reason: str | None, detail: str | None) -> str | None:
    """The opt-out signal of a rejected row (``reason``, ``detail``), or None when it is not
    an opt-out (a robots.txt that could not be fetched is not the owner's choice)."""
    if reason == OPT_OUT:
        return detail or "unknown"
    if reason == ROBOTS and (detail or "").startswith(DISALLOWED):
        return ROBOTS_TXT
    return None


def signal_counts(reasons: Sequence[str | None], details: Sequence[str | None]) -> dict[str, int]:
    """``opt_out/<signal>`` counts of rejected rows (one per pair)."""
    c: collections.Counter[str] = collections.Counter()
    for reason, detail in zip(reasons, details, strict=True):
        signal = signal_of(reason, detail)
        if signal is not None:
            c[counters_lib.scoped(SCOPE, signal)] += 1
    return dict(c)


# ---------------------------------------------------------------------------------------------
# A policy travelling inside an error message (img2dataset passes errors on as strings)


def with_policy(detail: str, policy_url: str, fetched: str) -> str:
    """``detail`` with a note naming the policy and when it was fetched (see :func:`split`)."""
    return f"{detail} [policy {policy_url} fetched {fetched}]"


def split_policy(detail: str) -> tuple[str, str | None, str | None]:
    """``(detail, policy_url, policy_fetched)`` from a detail written by :func:`with_policy`."""
    m = _POLICY_NOTE.match(detail or "")
    if m is None:
        return detail, None, None
    return m.group(1), m.group(2), m.group(3)
