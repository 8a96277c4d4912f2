"""TDMRep (W3C TDM Reservation Protocol): an origin's ``/.well-known/tdmrep.json``.

The file is a JSON array of rules, each an object with ``location`` (a path pattern),
``tdm-reservation`` (1: text and data mining rights reserved; 0: not reserved) and an optional
``tdm-policy`` (a URL). Matching follows the protocol's final report:

- a pattern matches the URL's path (and query) from its start, case-sensitively, with
  robots.txt's wildcards (``*`` any run of characters, a final ``$`` the end of the URL) and
  robots.txt's percent-encoding normalization (``robots._normalize_path``);
- the rules are taken in file order and the first one that matches applies ("the most specific
  match is the first in sequence");
- no matching rule, or a first matching rule whose ``tdm-reservation`` is neither 0 nor 1 (a
  protocol error), leaves the reservation unset: the URL may be fetched.

Fetch policy (:func:`fetch_tdmrep`), once per origin like robots.txt: redirects are followed
(at most 5, http(s) only, each hop through the SSRF guard); a 2xx body of at most
:data:`MAX_TDMREP_BYTES` that is a JSON array is the origin's rules (malformed rules in it are
skipped and counted in the verdict's detail). Anything else (4xx, 5xx, timeouts, connection
errors, a body that is not a JSON array or is larger than the limit) means, as the protocol
says, that the origin does not implement TDMRep: no reservation. An image whose path is
reserved is dropped as ``opt_out`` with detail ``tdmrep.json`` before it is requested, so a
``tdm-reservation: 0`` header on the image itself cannot lift it (TDMRep gives headers
priority; we do not fetch what the file reserves).
"""

from __future__ import annotations

import dataclasses
import json
from urllib.parse import urlsplit

from wit_pipeline import optout
from wit_pipeline.stages.download import robots

WELL_KNOWN = "/.well-known/tdmrep.json"
MAX_TDMREP_BYTES = 500 * 1024
MAX_TDMREP_REDIRECTS = 5


@dataclasses.dataclass(frozen=True)
class TdmRules:
    """The rules of one tdmrep.json: ``(location pattern, reservation, policy URL)``."""

    rules: tuple[tuple[str, int | None, str], ...] = ()

    def reservation(self, url: str) -> tuple[int | None, str] | None:
        """``(reservation, pattern)`` of the first rule that matches ``url`` (reservation None:
        that rule's value is a protocol error, so unset), else None."""
        parts = urlsplit(url)
        target = robots._normalize_path(
            (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        )
        for pattern, value, _ in self.rules:
            if robots._pattern_regex(pattern).match(target):
                return value, pattern
        return None


def parse(text: str) -> tuple[TdmRules, int]:
    """``(rules, number of malformed rules skipped)``; ``ValueError`` when the text is not a
    JSON array (the origin then does not implement the protocol).

    A rule without a ``location`` string is skipped; a rule whose ``tdm-reservation`` is not 0
    or 1 (a number, or the same as a string) is kept with the value None: when it is the first
    to match, the reservation is unset, as the protocol says of a protocol error.
    """
    doc = json.loads(text)
    if not isinstance(doc, list):
        raise ValueError(f"a JSON {type(doc).__name__}, not an array of rules")
    rules, bad = [], 0
    for item in doc:
        location = item.get("location") if isinstance(item, dict) else None
        if not isinstance(location, str) or not location:
            bad += 1
            continue
        raw = item.get("tdm-reservation")
        value = None if isinstance(raw, bool) or raw is None else optout.tdm_reservation(str(raw))
        if not location.startswith(("/", "*")):
            location = "/" + location
        policy = item.get("tdm-policy")
        policy = policy if isinstance(policy, str) else ""
        rules.append((robots._normalize_path(location), value, policy))
    return TdmRules(tuple(rules)), bad


@dataclasses.dataclass(frozen=True)
class TdmVerdict:
    """An origin's TDMRep rules (``rules`` None: it does not implement the protocol), the
    tdmrep.json URL they come from (after redirects), when it was fetched and what happened."""

    rules: TdmRules | None
    url: str
    fetched: str
    detail: str = ""

    def decide(self, url: str) -> robots.Decision | None:
        """``("opt_out", "tdmrep.json", file URL, fetched)`` when the file reserves ``url``."""
        if self.rules is None:
            return None
        found = self.rules.reservation(url)
        if found is None or found[0] != 1:
            return None
        return (optout.OPT_OUT, optout.TDMREP_JSON, self.url, self.fetched)


def fetch_tdmrep(session, origin_url: str, *, connect_timeout: float, timeout: float) -> TdmVerdict:
    """Fetch ``origin_url/.well-known/tdmrep.json`` with a guarded ``requests`` session."""
    from wit_pipeline.stages.download import guarded_http

    url = origin_url.rstrip("/") + WELL_KNOWN
    fetched = optout.utc_now()
    try:
        resp = guarded_http.get_small(
            session,
            url,
            limit=MAX_TDMREP_BYTES,
            connect_timeout=connect_timeout,
            timeout=timeout,
            max_redirects=MAX_TDMREP_REDIRECTS,
        )
    except guarded_http.SmallFetchError as err:
        return TdmVerdict(None, url, fetched, f"unreachable ({err.reason}): no reservation")
    if not 200 <= resp.status < 300:
        return TdmVerdict(None, resp.url, fetched, f"HTTP {resp.status}: no reservation")
    if resp.truncated:
        return TdmVerdict(None, resp.url, fetched, f"larger than {MAX_TDMREP_BYTES} bytes: ignored")
    try:
        rules, bad = parse(resp.body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        return TdmVerdict(None, resp.url, fetched, f"malformed ({str(e)[:100]}): ignored")
    detail = f"{len(rules.rules)} rule(s)" + (f", {bad} malformed skipped" if bad else "")
    return TdmVerdict(rules, resp.url, fetched, detail)
