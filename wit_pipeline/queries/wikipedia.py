"""Wikipedia XML dumps: pages, byte-range splits, wikitext cleaning, and counting articles.

The unigram and bigram sources count the prose of English Wikipedia's articles:

- ``iter_pages`` / ``iter_page_fragments`` stream the ``<page>`` elements of a MediaWiki XML
  dump (``pages-articles*.xml.bz2``, also ``.xml.gz`` and ``.xml``); ``iter_split_pages``
  reads one byte range of a ``.bz2`` file (``plan_splits``), so a multistream dump spreads
  over many workers and each page is read exactly once.
- ``articles`` keeps the namespace-0 pages that are not redirects and counts every other page
  under a reason; ``clean_wikitext`` turns an article's wikitext into plain prose.
- ``count_pages`` counts the tokens and bigrams of the articles (``ngrams.count_ngrams``).
"""

from __future__ import annotations

import bz2
import collections
import dataclasses
import gzip
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from typing import IO

from wit_pipeline import counters as counters_lib
from wit_pipeline import fileio
from wit_pipeline.errors import WitError
from wit_pipeline.queries.ngrams import count_ngrams
from wit_pipeline.queries.reading import READ_CHUNK

# ---------------------------------------------------------------------------------------------
# Dumps

_PAGE_OPEN = b"<page>"
_PAGE_CLOSE = b"</page>"
# A bzip2 stream starts byte-aligned with "BZh" + block size digit + the block magic (pi).
_BZ2_STREAM_RE = re.compile(rb"BZh[1-9]1AY&SY")


@dataclasses.dataclass(frozen=True)
class Page:
    """One ``<page>`` of a dump: title, namespace number, redirect flag and wikitext."""

    title: str
    ns: int
    redirect: bool
    text: str


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_page(fragment: bytes) -> Page:
    """Parse one ``<page>...</page>`` XML fragment (namespace-agnostic)."""
    elem = ET.fromstring(fragment)
    title, ns, redirect, text = "", 0, False, ""
    for child in elem:
        name = _local_name(child.tag)
        if name == "title":
            title = child.text or ""
        elif name == "ns":
            ns = int((child.text or "0").strip() or 0)
        elif name == "redirect":
            redirect = True
        elif name == "revision":
            for sub in child:
                if _local_name(sub.tag) == "text":
                    text = sub.text or ""
    return Page(title=title, ns=ns, redirect=redirect, text=text)


def page_reason(page: Page) -> str | None:
    """Why a page is not counted (``None``: it is an article with text)."""
    if page.ns != 0:
        return "namespace"
    if page.redirect:
        return "redirect"
    if not page.text.strip():
        return "empty_text"
    return None


def articles(pages: Iterable[Page], counter: collections.Counter) -> Iterator[Page]:
    """The articles among ``pages``: every page is counted as ``kept`` or under the reason it
    is not an article (``dropped:namespace``, ``dropped:redirect``, ``dropped:empty_text``)."""
    for page in pages:
        counter[counters_lib.INPUT] += 1
        reason = page_reason(page)
        if reason:
            counter[counters_lib.dropped(reason)] += 1
            continue
        counter[counters_lib.KEPT] += 1
        yield page


def _fragments(chunks: Iterable[tuple[bytes, bool]], *, source: str) -> Iterator[bytes]:
    """Cut decompressed XML bytes into complete ``<page>`` fragments.

    ``chunks`` are ``(data, owned)`` pairs: only pages whose ``<page>`` tag begins in owned
    data are yielded (see ``iter_split_pages``); once a page would begin in data that is not
    owned, the iteration stops. Bytes before the first ``<page>`` (the dump header, or the
    tail of a page that an earlier byte range owns) are skipped.
    """
    buf = b""
    owned_len = 0  # leading bytes of buf that came from owned data
    for data, owned in chunks:
        buf += data
        if owned:
            owned_len += len(data)
        pos = 0
        while True:
            i = buf.find(_PAGE_OPEN, pos)
            if i < 0:
                # Keep what may be the beginning of a "<page>" tag cut by the chunk boundary.
                pos = max(pos, len(buf) - len(_PAGE_OPEN) + 1)
                break
            if i >= owned_len:
                return  # the next page begins where the next byte range owns it
            j = buf.find(_PAGE_CLOSE, i)
            if j < 0:
                pos = i
                break
            pos = j + len(_PAGE_CLOSE)
            yield buf[i:pos]
        buf = buf[pos:]
        owned_len = max(0, owned_len - pos)
        if not owned and owned_len == 0:
            return
    i = buf.find(_PAGE_OPEN)
    if 0 <= i < owned_len:
        raise WitError(f"{source}: truncated dump: a <page> element is not closed")


def _bz2_streams(
    f: IO[bytes], first: int, end: int | None, *, source: str
) -> Iterator[tuple[bytes, bool]]:
    """Decompress consecutive bzip2 streams from offset ``first``.

    Yields ``(data, owned)`` where ``owned`` says whether the data's stream starts before
    ``end`` (``None``: every stream is owned). Reading continues past ``end``; the consumer
    stops once its last page is complete.
    """
    f.seek(first)
    stream_start = first
    pending = b""
    while True:
        d = bz2.BZ2Decompressor()
        owned = end is None or stream_start < end
        consumed = 0
        while not d.eof:
            data = pending or f.read(READ_CHUNK)
            pending = b""
            if not data:
                if consumed:
                    raise WitError(f"{source}: truncated bzip2 stream at offset {stream_start}")
                return  # end of file between two streams
            consumed += len(data)
            out = d.decompress(data)
            if out:
                yield out, owned
        pending = d.unused_data
        stream_start += consumed - len(pending)


def _plain_chunks(f: IO[bytes], path: str) -> Iterator[tuple[bytes, bool]]:
    if path.endswith(".gz"):
        with gzip.GzipFile(fileobj=f) as g:
            while chunk := g.read(READ_CHUNK):
                yield chunk, True
    else:
        while chunk := f.read(READ_CHUNK):
            yield chunk, True


def iter_page_fragments(path: str) -> Iterator[bytes]:
    """Every ``<page>`` fragment of a dump file (``.xml``, ``.xml.bz2`` incl. multistream,
    ``.xml.gz``)."""
    with fileio.open_file(path, "rb") as f:
        if path.endswith(".bz2"):
            chunks = _bz2_streams(f, 0, None, source=path)
        else:
            chunks = _plain_chunks(f, path)
        try:
            yield from _fragments(chunks, source=path)
        except (OSError, EOFError) as e:
            raise WitError(f"cannot read dump {path}: {e}") from None


def iter_pages(path: str) -> Iterator[Page]:
    """Every page of a dump file, parsed."""
    for fragment in iter_page_fragments(path):
        yield parse_fragment(fragment, source=path)


def parse_fragment(fragment: bytes, *, source: str = "dump") -> Page:
    try:
        return parse_page(fragment)
    except (ET.ParseError, ValueError) as e:
        raise WitError(f"{source}: malformed <page> element: {e}") from None


def _find_stream_start(f: IO[bytes], start: int, end: int) -> int | None:
    """Offset of the first bzip2 stream header at or after ``start`` and before ``end``."""
    overlap = 9  # len("BZh91AY&SY") - 1
    f.seek(start)
    pos = start  # file offset of data[0]
    tail = b""
    while pos < end:
        data = f.read(min(READ_CHUNK, end - pos + overlap))
        if not data:
            return None
        window = tail + data
        m = _BZ2_STREAM_RE.search(window)
        if m:
            found = pos - len(tail) + m.start()
            return found if found < end else None
        tail = window[-overlap:]
        pos += len(data)
        f.seek(pos)
    return None


def iter_split_pages(path: str, start: int, end: int) -> Iterator[bytes]:
    """The ``<page>`` fragments owned by byte range ``[start, end)`` of a ``.bz2`` dump.

    A range owns the pages whose ``<page>`` tag begins in a bzip2 stream that starts inside
    the range. Wikimedia's multistream dumps hold 100 pages per stream, so every range is read
    on its own; any other concatenation of streams (pbzip2, lbzip2) works too, because a page
    that crosses a stream boundary is finished by the range where it began. A single-stream
    file is read whole by its first range and the others yield nothing. Together, the ranges
    of a file yield each page exactly once.
    """
    with fileio.open_file(path, "rb") as f:
        if start == 0 and f.read(3) != b"BZh":
            raise WitError(f"cannot read dump {path}: not a bzip2 file")
        first = _find_stream_start(f, start, end)
        while first is not None:
            produced = False
            try:
                for fragment in _fragments(_bz2_streams(f, first, end, source=path), source=path):
                    produced = True
                    yield fragment
                return
            except (OSError, EOFError) as e:
                if produced:
                    raise WitError(f"cannot read dump {path}: {e}") from None
                # The header pattern occurred inside compressed data: look further on.
                first = _find_stream_start(f, first + 1, end)


def plan_splits(path: str, size: int, split_bytes: int) -> list[tuple[str, int, int]]:
    """Byte ranges of a dump file: ranges of ``split_bytes`` (``queries.split_bytes``, > 0) for
    ``.bz2``, else the whole file."""
    if not path.endswith(".bz2") or size <= split_bytes:
        return [(path, 0, max(size, 1))]
    return [(path, s, min(s + split_bytes, size)) for s in range(0, size, split_bytes)]


def multistream_bytes(xml: bytes, *, pages_per_stream: int) -> bytes:
    """A dump's XML compressed as Wikimedia's multistream files are: the header, then
    ``pages_per_stream`` pages per bzip2 stream, then the footer, each its own stream.

    Such a file splits into byte ranges that are read in parallel (``iter_split_pages``); the
    benchmarks and tests make one from a single-stream excerpt (the whole XML is in memory).
    """
    starts = [m.start() for m in re.finditer(rb"  <page>", xml)]
    footer = xml.rfind(b"</mediawiki>")
    parts = [xml[: starts[0]]]
    for k in range(0, len(starts), pages_per_stream):
        end = starts[k + pages_per_stream] if k + pages_per_stream < len(starts) else footer
        parts.append(xml[starts[k] : end])
    parts.append(xml[footer:])
    return b"".join(bz2.compress(p) for p in parts)


# ---------------------------------------------------------------------------------------------
# Wikitext -> plain text

_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
# Elements whose content is not running prose.
_DROP_ELEMENTS = (
    "ref",
    "math",
    "chem",
    "ce",
    "gallery",
    "timeline",
    "syntaxhighlight",
    "source",
    "pre",
    "code",
    "score",
    "hiero",
    "imagemap",
    "templatedata",
    "graph",
    "mapframe",
    "inputbox",
    "categorytree",
    "references",
)
_DROP_ELEMENT_RE = re.compile(
    r"<(" + "|".join(_DROP_ELEMENTS) + r")\b[^>]*?(?:/>|>.*?</\1\s*>)", re.S | re.I
)
_SELF_CLOSING_RE = re.compile(r"<(" + "|".join(_DROP_ELEMENTS) + r")\b[^>]*/>", re.I)
_TAG_RE = re.compile(r"</?[A-Za-z][^<>]*>")
_EXT_LINK_RE = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*(?:\s+([^\]]*))?\]")
_BARE_URL_RE = re.compile(r"(?:https?|ftp)://\S+")
_BOLD_ITALIC_RE = re.compile(r"'{2,}")
_HEADING_RE = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_MAGIC_RE = re.compile(r"__[A-Z]+__")
_LIST_MARKER_RE = re.compile(r"^[*#:;]+\s*", re.M)
_TABLE_LINE_RE = re.compile(r"^\s*[|!].*$", re.M)
_BRACES_RE = re.compile(r"\{\{|\}\}")
_TABLE_RE = re.compile(r"^\s*\{\||^\s*\|\}", re.M)
_LINK_RE = re.compile(r"\[\[|\]\]")
# Link prefixes that are not prose: media, categories, interlanguage/interwiki links.
_NON_TEXT_LINK_RE = re.compile(
    r"^\s*:?\s*(?:file|image|media|category|[a-z]{2,3}(?:-[a-z]+)?|wikt|wiktionary|"
    r"commons|s|q|n|b|v|voy|species|d|m|meta|mw|wikisource|wikiquote)\s*:",
    re.I,
)
WHITESPACE_RE = re.compile(r"[ \t\u00a0\u2009\u202f]+")


def _strip_nested(text: str, pattern: re.Pattern[str], opener: str) -> str:
    """Remove balanced ``opener ... closer`` spans (nested) in one linear pass.

    An opener that is never closed removes the rest of the text: unbalanced markup is rare,
    and counting template code as prose is worse than losing a page's tail.
    """
    out: list[str] = []
    depth = 0
    last = 0
    for m in pattern.finditer(text):
        if m.group(0).strip().startswith(opener):
            if depth == 0:
                out.append(text[last : m.start()])
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                last = m.end()
    if depth == 0:
        out.append(text[last:])
    return "".join(out)


def _replace_links(text: str) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target; media/category links removed."""
    out: list[str] = []
    depth = 0
    last = 0
    start = 0
    for m in _LINK_RE.finditer(text):
        if m.group(0) == "[[":
            if depth == 0:
                out.append(text[last : m.start()])
                start = m.end()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                inner = text[start : m.start()]
                last = m.end()
                if "[[" in inner or _NON_TEXT_LINK_RE.match(inner):
                    continue  # file captions (nested links), categories, interwiki
                target, bar, label = inner.partition("|")
                if bar:
                    # "[[Paris (France)|]]" (pipe trick) shows "Paris".
                    out.append(label if label.strip() else target.split(" (", 1)[0])
                elif not target.startswith("#"):
                    out.append(target.split("#", 1)[0])
    if depth == 0:
        out.append(text[last:])
    return "".join(out)


def clean_wikitext(text: str) -> str:
    """Plain prose from wikitext: templates, tables, references, media and markup removed."""
    text = _COMMENT_RE.sub("", text)
    text = _DROP_ELEMENT_RE.sub(" ", text)
    text = _SELF_CLOSING_RE.sub(" ", text)
    text = _strip_nested(text, _BRACES_RE, "{{")
    text = _strip_nested(text, _TABLE_RE, "{|")
    text = _replace_links(text)
    text = _EXT_LINK_RE.sub(lambda m: m.group(1) or "", text)
    text = _BARE_URL_RE.sub(" ", text)
    text = _TAG_RE.sub("", text)
    text = _BOLD_ITALIC_RE.sub("", text)
    text = _MAGIC_RE.sub("", text)
    text = _HEADING_RE.sub(lambda m: m.group(2), text)
    text = _TABLE_LINE_RE.sub("", text)
    text = _LIST_MARKER_RE.sub("", text)
    text = html.unescape(text)
    text = WHITESPACE_RE.sub(" ", text)
    return text


# ---------------------------------------------------------------------------------------------
# Counting


def count_pages(
    pages: Iterable[Page],
    unigrams: collections.Counter,
    bigrams: collections.Counter | None,
    counter: collections.Counter,
) -> None:
    """Clean and count the articles among ``pages``; every other page is counted as dropped."""
    for page in articles(pages, counter):
        counter["tokens"] += count_ngrams([clean_wikitext(page.text)], unigrams, bigrams)
