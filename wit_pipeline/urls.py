"""URL normalization and stable record ids.

Two spellings of one resource (``HTTP://Example.com:80/a/./b.jpg#x`` and
``http://example.com/a/b.jpg``) normalize to one string, so that it is downloaded once and
deduplicated before any bytes are fetched. Normalization is conservative (RFC 3986 section 6.2.2
plus the scheme's default port): it never reorders or removes query parameters, which servers
may treat as significant.
"""

from __future__ import annotations

import functools
import hashlib
import posixpath
import re
from collections.abc import Sequence
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

import numpy as np

HTTP_SCHEMES = frozenset({"http", "https"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters that may stay unescaped in a path or query (RFC 3986 pchar + "/" + "?").
_SAFE_PATH = "/:@!$&'()*+,;=-._~"
_SAFE_QUERY = _SAFE_PATH + "?"
_PCT = re.compile(r"%[0-9A-Fa-f]{2}")


def _requote(part: str, safe: str) -> str:
    # Decode then re-encode, keeping %2F-style reserved escapes encoded: a path with "%2F" and
    # one with "/" name different resources.
    pieces = re.split(r"(%2[Ff]|%3[Ff]|%23|%25|%26|%3[Dd]|%2[Bb])", part)
    out = []
    for i, piece in enumerate(pieces):
        if i % 2:
            out.append(piece.upper())
        else:
            out.append(
                quote(unquote(piece, errors="surrogateescape"), safe=safe, errors="surrogateescape")
            )
    return "".join(out)


def normalize_url(url: str) -> str | None:
    """Return the normalized form of an absolute http(s) URL, or ``None`` if it is not one.

    Lower-cases scheme and host, converts the host to IDNA, drops the default port, the
    fragment and empty userinfo, resolves ``.``/``..`` segments, uses ``/`` for an empty path and
    normalizes percent-escapes (upper-case hex, unreserved characters decoded).
    """
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in HTTP_SCHEMES or not parts.hostname:
        return None
    host = parts.hostname.rstrip(".")
    if not host:
        return None
    if ":" in host:  # IPv6 literal
        netloc = f"[{host.lower()}]"
    else:
        try:
            netloc = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            try:
                netloc = quote(host.lower(), safe="-._~")
            except UnicodeError:
                return None
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    if parts.username:
        userinfo = parts.username + (f":{parts.password}" if parts.password else "")
        netloc = f"{userinfo}@{netloc}"
    path = parts.path or "/"
    trailing = path.endswith("/")
    path = posixpath.normpath(path)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    if trailing and path != "/":
        path += "/"
    path = _requote(path, _SAFE_PATH)
    query = _requote(parts.query, _SAFE_QUERY) if parts.query else ""
    return urlunsplit(SplitResult(scheme, netloc, path, query, ""))


_ALWAYS_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_KEPT_ESCAPES = ("2F", "3F", "23", "25", "26", "3D", "2B")  # what ``_requote`` never decodes


@functools.cache
def _normalized_patterns() -> tuple[str, str]:
    """RE2 patterns: ``(already normal, odd path)``; see :func:`already_normalized`.

    Derived from the rules of :func:`normalize_url`: a percent-escape survives ``_requote``
    unchanged when it is upper-case and encodes a non-ASCII byte, a character ``quote`` escapes
    (neither always safe nor in the safe set), or one of the escapes it keeps as they are.
    """
    raw_path = _ALWAYS_SAFE | set(_SAFE_PATH)
    kept = {f"{b:02X}" for b in range(0x80) if chr(b) not in raw_path} | set(_KEPT_ESCAPES)
    escape = "%(?:[89A-F][0-9A-F]|" + "|".join(sorted(kept)) + ")"

    def chars(extra: str) -> str:
        return "[A-Za-z0-9" + re.escape("".join(sorted(set(_SAFE_PATH + extra) - set("-")))) + "-]"

    path = f"(?:{chars('')}|{escape})"
    query = f"(?:{chars('?')}|{escape})"
    host = r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*"
    normal = f"^https?://{host}/{path}*(?:\\?{query}+)?$"
    odd = r"^https?://[^?]*?(?://|/\.\.?(?:[/?]|$))"
    return normal, odd


def already_normalized(urls: Sequence[str | None]) -> np.ndarray:
    """A boolean mask: ``True`` where ``normalize_url(url) == url`` is certain from the text.

    One vectorized pass (pyarrow's RE2) recognizes the common shape: ``http(s)://`` with a
    lower-case ASCII host (no port, user or trailing dot), a non-empty path of characters and
    upper-case escapes that ``normalize_url`` leaves alone and no ``//``, ``.`` or ``..``
    segment, an optional non-empty query, no fragment and no whitespace. ``False`` says nothing:
    such a URL needs :func:`normalize_url` itself. Nulls are ``False``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    array = urls if isinstance(urls, pa.Array) else pa.array(urls, pa.string())
    if len(array) == 0:
        return np.zeros(0, dtype=bool)
    normal, odd = _normalized_patterns()
    ok = pc.and_(
        pc.match_substring_regex(array, normal),
        pc.invert(pc.match_substring_regex(array, odd)),
    )
    return pc.fill_null(ok, False).to_numpy(zero_copy_only=False)


def url_host(url: str) -> str:
    """The lower-cased host of a URL ("" when it has none)."""
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def stable_hash(*parts: str, size: int = 16) -> str:
    """A hex digest of the parts joined by NUL: stable across runs, machines and runners."""
    h = hashlib.blake2b(digest_size=size)
    for i, p in enumerate(parts):
        if i:
            h.update(b"\0")
        h.update(p.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def pair_uid(normalized_url: str, caption: str) -> str:
    """The id of an image/caption pair: a hash of its normalized URL and its cleaned caption."""
    return stable_hash(normalized_url, caption)


def pair_uids(normalized_urls: Sequence[str], captions: Sequence[str]) -> list[str]:
    """``pair_uid`` of each ``(url, caption)``: the same digests, one hash call per pair."""
    blake2b = hashlib.blake2b
    return [
        blake2b(f"{u}\0{c}".encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        for u, c in zip(normalized_urls, captions, strict=True)
    ]


def url_uid(normalized_url: str) -> str:
    """The id of an image URL, shared by every pair that points at it."""
    return stable_hash(normalized_url)
