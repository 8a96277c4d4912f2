"""Takedown blocklists: what a build must leave out on request, and how entries match.

A blocklist is a text file, one entry per line; ``#`` at the start of a line or after a space
starts a comment; blank lines are ignored (docs/takedowns.md):

- ``url URL``: one image URL (normalized with ``urls.normalize_url``) or one page URL;
- ``domain HOST``: every URL whose host is ``HOST`` or a subdomain of it;
- ``sha256 HEX``: the downloaded image bytes, as served (64 hex digits);
- ``phash HEX [MAX_DISTANCE]``: a 64-bit pHash (16 hex digits) and the Hamming distance up to
  which an image matches it (default :data:`DEFAULT_PHASH_DISTANCE`).

Parsing is strict: a bad line is a one-line ``WitError`` naming the file and the line. Where
each kind applies: URL and domain entries at gather (the pair's normalized image URL and its
page URL) and at download (the URL requested and every redirect target); hash entries after the
download, against the bytes and pHash of every downloaded copy, before deduplication
(``stages.dedup.takedown``), and in ``wit remove`` against every copy a final sample merged
(``KEY.json`` ``duplicates``). A matched pair or sample is dropped with reason ``takedown`` and
the entry (:meth:`Blocklist.match_url` and friends return its canonical text) as ``detail``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from wit_pipeline import fileio, urls
from wit_pipeline.errors import WitError

TAKEDOWN = "takedown"  # the drop reason, in every stage that applies a blocklist
KINDS = ("url", "domain", "sha256", "phash")
DEFAULT_PHASH_DISTANCE = 4  # the near-duplicate distance dedup uses by default
MAX_PHASH_DISTANCE = 32  # the largest distance dedup can search

_HEX = re.compile(r"[0-9a-fA-F]+")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_COMMENT = re.compile(r"(^|\s)#.*$")


@dataclasses.dataclass(frozen=True)
class BlocklistFile:
    """Where entries came from: a file's path, its sha256 and how many entries of each kind."""

    path: str
    sha256: str
    entries: tuple[tuple[str, int], ...]  # (kind, count), in KINDS order

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "entries": dict(self.entries)}


@dataclasses.dataclass(frozen=True)
class Blocklist:
    """Parsed takedown entries (picklable: it travels inside the pipeline graph)."""

    urls: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    sha256: frozenset[str] = frozenset()
    phashes: tuple[tuple[str, int], ...] = ()  # (16 hex digits, max distance), sorted
    files: tuple[BlocklistFile, ...] = ()

    def __bool__(self) -> bool:
        return self.has_url_entries or self.has_hash_entries

    @property
    def has_url_entries(self) -> bool:
        return bool(self.urls or self.domains)

    @property
    def has_hash_entries(self) -> bool:
        return bool(self.sha256 or self.phashes)

    # -- matching -----------------------------------------------------------------------------

    def match_url(self, url: str | None) -> str | None:
        """The entry a *normalized* URL matches (``url ...`` or ``domain ...``), else None."""
        if not url:
            return None
        if url in self.urls:
            return f"url {url}"
        if self.domains:
            host = urls.url_host(url)
            while host:
                if host in self.domains:
                    return f"domain {host}"
                _, dot, host = host.partition(".")
                if not dot:
                    break
        return None

    def match_raw_url(self, url: str | None) -> str | None:
        """:meth:`match_url` for a URL as found (normalized first): page URLs, redirects."""
        if not url:
            return None
        return self.match_url(urls.normalize_url(url))

    def match_hashes(self, sha256: str | None, phash: str | None) -> str | None:
        """The entry an image's sha256 or pHash matches (``sha256 ...``, ``phash ...``)."""
        if sha256 and sha256.lower() in self.sha256:
            return f"sha256 {sha256.lower()}"
        if phash and self.phashes:
            return self.match_phashes([phash])[0]
        return None

    def match_phashes(self, phashes: Sequence[str | None]) -> list[str | None]:
        """For each pHash (16 hex digits, or None), the first ``phash`` entry within its
        distance, vectorized over the entries."""
        out: list[str | None] = [None] * len(phashes)
        if not self.phashes:
            return out
        entries = np.array([int(h, 16) for h, _ in self.phashes], dtype=np.uint64)
        limits = np.array([d for _, d in self.phashes], dtype=np.int64)
        for i, h in enumerate(phashes):
            if not h:
                continue
            dist = np.bitwise_count(entries ^ np.uint64(int(h, 16))).astype(np.int64)
            hit = np.flatnonzero(dist <= limits)
            if hit.size:
                e, d = self.phashes[int(hit[0])]
                out[i] = f"phash {e} {d}"
        return out

    # -- identity -----------------------------------------------------------------------------

    def url_digest(self) -> str:
        """A digest of the URL and domain entries ("" when there are none): what decides the
        gather and download steps' output (their fingerprints)."""
        if not self.has_url_entries:
            return ""
        lines = [f"url {u}" for u in sorted(self.urls)]
        lines += [f"domain {d}" for d in sorted(self.domains)]
        return _digest(lines)

    def hash_digest(self) -> str:
        """A digest of the hash entries ("" when there are none): what decides finalize's."""
        if not self.has_hash_entries:
            return ""
        lines = [f"sha256 {h}" for h in sorted(self.sha256)]
        lines += [f"phash {h} {d}" for h, d in self.phashes]
        return _digest(lines)

    def describe(self) -> list[dict[str, Any]]:
        """The files, for stats, manifests and build.json."""
        return [f.to_dict() for f in self.files]


def _digest(lines: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _host(value: str) -> str | None:
    """A domain entry's host, lower case and IDNA-encoded, or None when it is not a host."""
    host = value.strip().rstrip(".")
    if not host or any(c in host for c in "/:@?#[] \t"):
        return None
    try:
        host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    labels = host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return host


def parse_line(line: str) -> tuple[str, Any] | None:
    """One line -> ``(kind, value)`` (None for a blank or comment line); ``ValueError`` says
    what is wrong with a bad one."""
    text = _COMMENT.sub("", line).strip()
    if not text:
        return None
    kind, *args = text.split()
    if kind not in KINDS:
        raise ValueError(f"unknown entry {kind!r} (expected one of {', '.join(KINDS)})")
    n_args = (1, 2) if kind == "phash" else (1,)
    if len(args) not in n_args:
        want = "a hash and an optional distance" if kind == "phash" else "one value"
        raise ValueError(f"{kind} takes {want}, got {len(args)} value(s)")
    value = args[0]
    if kind == "url":
        norm = urls.normalize_url(value)
        if norm is None:
            raise ValueError(f"not an absolute http(s) URL: {value!r}")
        return kind, norm
    if kind == "domain":
        host = _host(value)
        if host is None:
            raise ValueError(f"not a host name: {value!r} (give the host alone, no scheme or path)")
        return kind, host
    if kind == "sha256":
        if len(value) != 64 or not _HEX.fullmatch(value):
            raise ValueError(f"a sha256 has 64 hex digits, got {value!r}")
        return kind, value.lower()
    if len(value) != 16 or not _HEX.fullmatch(value):
        raise ValueError(f"a pHash has 16 hex digits, got {value!r}")
    distance = DEFAULT_PHASH_DISTANCE
    if len(args) == 2:
        if not args[1].isdigit() or int(args[1]) > MAX_PHASH_DISTANCE:
            raise ValueError(
                f"the pHash distance must be an integer 0..{MAX_PHASH_DISTANCE}, got {args[1]!r}"
            )
        distance = int(args[1])
    return kind, (value.lower(), distance)


def parse_blocklist(text: str, *, path: str = "<blocklist>", sha256: str = "") -> Blocklist:
    """Parse one blocklist's text strictly (``WitError`` naming ``path`` and the line).

    ``sha256`` is the file's (of its bytes); by default that of ``text`` in UTF-8.
    """
    found: dict[str, set] = {k: set() for k in KINDS}
    for number, line in enumerate(text.splitlines(), 1):
        try:
            parsed = parse_line(line)
        except ValueError as e:
            raise WitError(f"{path}:{number}: {e}") from None
        if parsed is not None:
            found[parsed[0]].add(parsed[1])
    sha = sha256 or hashlib.sha256(text.encode("utf-8")).hexdigest()
    info = BlocklistFile(path, sha, tuple((k, len(found[k])) for k in KINDS))
    return Blocklist(
        urls=frozenset(found["url"]),
        domains=frozenset(found["domain"]),
        sha256=frozenset(found["sha256"]),
        phashes=tuple(sorted(found["phash"])),
        files=(info,),
    )


def merge(lists: Iterable[Blocklist]) -> Blocklist:
    """The union of several blocklists (entries and files)."""
    lists = list(lists)
    return Blocklist(
        urls=frozenset().union(*(b.urls for b in lists)),
        domains=frozenset().union(*(b.domains for b in lists)),
        sha256=frozenset().union(*(b.sha256 for b in lists)),
        phashes=tuple(sorted({p for b in lists for p in b.phashes})),
        files=tuple(f for b in lists for f in b.files),
    )


def from_config(config: Any) -> Blocklist | None:
    """The blocklists a ``takedown`` config section names, read and merged (None: none)."""
    return load_blocklists(config.blocklists) if config.blocklists else None


def load_blocklists(paths: Sequence[str]) -> Blocklist:
    """Read and merge the blocklist files (local or fsspec URLs); one-line errors."""
    parsed = []
    for path in paths:
        try:
            with fileio.open_file(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise WitError(f"blocklist not found: {path}") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise WitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        sha = hashlib.sha256(raw).hexdigest()
        parsed.append(parse_blocklist(text, path=path, sha256=sha))
    return merge(parsed)
