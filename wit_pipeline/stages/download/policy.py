"""An origin's policies (robots.txt and TDMRep's tdmrep.json) and the check of every redirect.

- :class:`OriginPolicy`: both verdicts of one origin, fetched together, once per origin
  (``transforms._RobotsFn`` for the origins of the candidate URLs, in batches);
  :meth:`OriginPolicy.decide` says whether a URL may be fetched, and on what policy.
- :class:`PolicyCache`: the same, per worker process, for origins met only through redirects:
  fetched on first use (one fetch per origin even when several threads ask at once), kept in
  a bounded LRU.
- :class:`RedirectCheck`: what the guarded opener calls for every redirect target before
  requesting it (``guarded_http._RedirectHandler``): a takedown ``url``/``domain`` entry
  (``takedown``) and, when the target is on another origin than the URL the request started
  from (whose policies the pipeline checked), that origin's robots.txt (``robots``) and
  tdmrep.json (``opt_out``).
  Refusals are ``netguard.FetchError``s whose detail names the policy and when it was fetched
  (``optout.with_policy``), so that the reason and the policy reach the rejected row through
  img2dataset's error strings.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable

from wit_pipeline import optout, urls
from wit_pipeline.config import DownloadConfig
from wit_pipeline.stages.download import guarded_http, netguard, robots, tdmrep
from wit_pipeline.takedown import TAKEDOWN, Blocklist


@dataclasses.dataclass(frozen=True)
class OriginPolicy:
    """robots.txt's and tdmrep.json's verdicts on one origin (None: not consulted)."""

    robots: robots.RobotsVerdict | None = None
    tdmrep: tdmrep.TdmVerdict | None = None

    def decide(self, url: str) -> robots.Decision | None:
        """None if ``url`` may be fetched, else ``(reason, detail, policy URL, fetched)``:
        robots.txt first (``robots``, or ``blocked_address``/``dns_error`` for an origin the
        guard refuses), then tdmrep.json (``opt_out``)."""
        for verdict in (self.robots, self.tdmrep):
            if verdict is not None:
                found = verdict.decide(url)
                if found is not None:
                    return found
        return None

    @property
    def crawl_delay(self) -> float | None:
        r = self.robots
        return r.rules.crawl_delay if r is not None and r.kind == robots.RULES else None


def fetch_origin_policy(session, origin_url: str, config: DownloadConfig) -> OriginPolicy:
    """Fetch what ``config`` respects of ``origin_url``'s robots.txt and tdmrep.json."""
    robots_verdict = tdm = None
    if config.respect_robots:
        robots_verdict = robots.fetch_robots(
            session,
            origin_url,
            user_agent=config.user_agent,
            connect_timeout=config.connect_timeout,
            timeout=config.timeout,
        )
    blocked = robots_verdict is not None and robots_verdict.kind == robots.BLOCKED
    if config.respect_tdmrep and not blocked:  # an origin the guard refuses gets no request
        tdm = tdmrep.fetch_tdmrep(
            session, origin_url, connect_timeout=config.connect_timeout, timeout=config.timeout
        )
    return OriginPolicy(robots_verdict, tdm)


class PolicyCache:
    """Origin -> :class:`OriginPolicy`, fetched once per origin, for the threads of a process.

    ``fetch(origin)`` runs outside the lock; a thread asking for an origin that another thread
    is fetching waits for that fetch. At most ``max_size`` origins are kept (least recently
    used dropped first).
    """

    def __init__(self, fetch: Callable[[str], OriginPolicy], *, max_size: int = 100_000):
        self._fetch = fetch
        self._max = max_size
        self._lock = threading.Lock()
        self._done: collections.OrderedDict[str, OriginPolicy] = collections.OrderedDict()
        self._pending: dict[str, threading.Event] = {}

    def get(self, origin_url: str) -> OriginPolicy:
        while True:
            with self._lock:
                found = self._done.get(origin_url)
                if found is not None:
                    self._done.move_to_end(origin_url)
                    return found
                event = self._pending.get(origin_url)
                if event is None:
                    event = self._pending[origin_url] = threading.Event()
                    break
            event.wait()
        try:
            policy = self._fetch(origin_url)
            with self._lock:
                self._done[origin_url] = policy
                while len(self._done) > self._max:
                    self._done.popitem(last=False)
            return policy
        finally:
            with self._lock:
                self._pending.pop(origin_url, None)
            event.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._done)


class RedirectCheck:
    """Called by the guarded opener with every redirect target, before it is requested.

    Raises ``netguard.FetchError``: ``takedown`` (a blocklist ``url``/``domain`` entry matches
    the target), ``robots`` (the robots.txt of a new origin, one other than the first URL's,
    disallows it or cannot be fetched) or ``opt_out`` (that origin's tdmrep.json reserves it).
    Policies are fetched through the guard with a ``requests`` session per thread and cached
    per origin (:class:`PolicyCache`).
    """

    def __init__(
        self,
        config: DownloadConfig,
        guard: netguard.Guard,
        options: guarded_http.FetchOptions,
        blocklist: Blocklist | None = None,
    ):
        self._config = config
        self._guard = guard
        self._options = options
        self._blocklist = blocklist if blocklist is not None and blocklist.has_url_entries else None
        self._local = threading.local()
        self.cache = PolicyCache(self._fetch)

    @staticmethod
    def needed(config: DownloadConfig, blocklist: Blocklist | None) -> bool:
        """Whether redirect targets need checking at all under these settings."""
        has_entries = blocklist is not None and blocklist.has_url_entries
        return config.respect_robots or config.respect_tdmrep or has_entries

    def _fetch(self, origin_url: str) -> OriginPolicy:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = guarded_http.requests_session(
                self._guard, self._options
            )
        return fetch_origin_policy(session, origin_url, self._config)

    def __call__(self, url: str, first_url: str = "") -> None:
        url = urls.normalize_url(url) or url
        if self._blocklist is not None:
            hit = self._blocklist.match_url(url)
            if hit is not None:
                raise netguard.FetchError(TAKEDOWN, f"{hit} (redirect to {url[:200]})")
        if not (self._config.respect_robots or self._config.respect_tdmrep):
            return
        target = robots.origin(url)
        if first_url and target == robots.origin(urls.normalize_url(first_url) or first_url):
            return  # the first URL's origin: its policies were checked before the request
        found = self.cache.get(target).decide(url)
        if found is None:
            return
        reason, detail, policy_url, fetched = found
        if reason == optout.ROBOTS:
            detail = f"{detail} (redirect to {url[:200]})"
        if policy_url:
            detail = optout.with_policy(detail, policy_url, fetched or "")
        raise netguard.FetchError(reason, detail)
