"""Building the query list: CLIP's ~500k queries from Wikipedia, page views and WordNet.

CLIP's WebImageText kept only pairs whose text contains one of 500,000 queries: every word
occurring at least 100 times in English Wikipedia, bigrams with high pointwise mutual
information, titles of Wikipedia articles above a search-volume threshold, and WordNet synsets.
This module builds such a list from the real sources:

- ``iter_pages`` / ``iter_split_pages``: stream ``<page>`` elements out of a MediaWiki XML dump
  (``pages-articles*.xml.bz2``); a multistream ``.bz2`` file is split into byte ranges that are
  read independently, so one 20 GB file spreads over many workers.
- ``clean_wikitext`` + ``segment_tokens``: markup removal and tokenization; ``count_ngrams``
  counts lower-cased unigrams and the bigrams that a space-padded substring match can see.
- ``select_unigrams`` / ``score_bigrams``: thresholds (count, PMI) with a reason for every drop.
- ``iter_text_paragraphs`` + ``count_text``: plain-text corpora (``--text``, also dictd files)
  that add to the bigram counts.
- ``sum_pageviews`` / ``read_title_list`` / ``iter_wordnet_synsets``: the other sources.
- ``merge_sources``: dedup, priority order and the size cap; ``write_query_list`` +
  ``build_manifest``: the gzip list and its JSON manifest.

The Beam transforms at the end run the counting (the only part that needs a cluster for a full
dump) on any runner; everything else is small enough for the driver.
"""

from __future__ import annotations

import bz2
import collections
import dataclasses
import gzip
import hashlib
import html
import io
import itertools
import json
import math
import os
import re
import unicodedata
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindows

from wit_pipeline import beam_utils, fileio
from wit_pipeline import counters as counters_lib
from wit_pipeline.config import QueriesConfig
from wit_pipeline.errors import WitError

SOURCES = ("wordnet", "unigrams", "bigrams", "titles")
CASES = ("keep", "lower")
WORDNET_LEMMAS = ("all", "first")
WORDNET_DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")

dropped = counters_lib.dropped

# ---------------------------------------------------------------------------------------------
# Wikipedia XML dumps

_PAGE_OPEN = b"<page>"
_PAGE_CLOSE = b"</page>"
# A bzip2 stream starts byte-aligned with "BZh" + block size digit + the block magic (pi).
_BZ2_STREAM_RE = re.compile(rb"BZh[1-9]1AY&SY")
_READ_CHUNK = 1 << 20


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
            data = pending or f.read(_READ_CHUNK)
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
            while chunk := g.read(_READ_CHUNK):
                yield chunk, True
    else:
        while chunk := f.read(_READ_CHUNK):
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
        data = f.read(min(_READ_CHUNK, end - pos + overlap))
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
    """Byte ranges of a dump file: ranges of ``split_bytes`` for ``.bz2``, else the whole file."""
    if split_bytes <= 0:
        raise WitError(f"split_bytes must be positive, got {split_bytes}")
    if not path.endswith(".bz2") or size <= split_bytes:
        return [(path, 0, max(size, 1))]
    return [(path, s, min(s + split_bytes, size)) for s in range(0, size, split_bytes)]


def file_size(path: str) -> int:
    return int(fileio.filesystem(path).size(path))


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
_WHITESPACE_RE = re.compile(r"[ \t\u00a0\u2009\u202f]+")


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
    text = _WHITESPACE_RE.sub(" ", text)
    return text


# ---------------------------------------------------------------------------------------------
# Tokens

# A word: letters and digits, with inner apostrophes ("don't", "o'clock"). Hyphens, periods
# and every other character separate words.
_WORD = r"[^\W_]+(?:'[^\W_]+)*"
WORD_RE = re.compile(_WORD)
# Text between two words of a bigram may only be spaces: a caption matches the query "hot dog"
# (space-padded substring) only where the two words are separated by a space.
_SEGMENT_BREAK_RE = re.compile(r"[^\w\s']+|_|\n")
_HAS_LETTER_RE = re.compile(r"[^\W\d_]")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'", "\u2018": "'"})


def segment_tokens(text: str) -> list[list[str]]:
    """Lower-cased word runs: tokens inside one run are separated by whitespace only."""
    text = text.translate(_APOSTROPHES).lower()
    out = []
    for seg in _SEGMENT_BREAK_RE.split(text):
        toks = WORD_RE.findall(seg)
        if toks:
            out.append(toks)
    return out


def has_letter(s: str) -> bool:
    return _HAS_LETTER_RE.search(s) is not None


def count_ngrams(
    texts: Iterable[str],
    unigrams: collections.Counter,
    bigrams: collections.Counter | None,
) -> int:
    """Count tokens and bigrams of plain ``texts`` into the counters; returns tokens seen."""
    n = 0
    for text in texts:
        for toks in segment_tokens(text):
            n += len(toks)
            unigrams.update(toks)
            if bigrams is not None and len(toks) > 1:
                bigrams.update(map(" ".join, itertools.pairwise(toks)))
    return n


def count_pages(
    pages: Iterable[Page],
    unigrams: collections.Counter,
    bigrams: collections.Counter | None,
    counter: collections.Counter,
) -> None:
    """Clean and count the articles among ``pages``; every other page is counted as dropped."""
    for page in pages:
        counter[counters_lib.INPUT] += 1
        reason = page_reason(page)
        if reason:
            counter[dropped(reason)] += 1
            continue
        counter[counters_lib.KEPT] += 1
        counter["tokens"] += count_ngrams([clean_wikitext(page.text)], unigrams, bigrams)


# ---------------------------------------------------------------------------------------------
# Plain-text corpora (``--text``): more real text for the bigram counts

# dictd databases (``*.dict``, ``*.dict.dz``, e.g. Debian's dict-gcide) carry markup.
DICTD_SUFFIXES = (".dict", ".dict.dz")
# \A*ban"dum\ and the respelling that may follow it: ([.a]*b[a^]n"d[u^]m)
_DICTD_PRONUNCIATION_RE = re.compile(r"\\[^\\\n]*\\(?:\s*\([^()\n]*\))?")
# Accented letters inside a word: Hali[ae]etus, Vend['e]miaire, [=a]f?ran, [imac] (i macron).
_DICTD_LETTER_RE = re.compile(
    r"(?:(?<=[A-Za-z])|(?=\[[^\]]*\][A-Za-z]))\[[=.'`\"^~,-]?([A-Za-z]{1,2})(?:mac)?[=.'`\"^~,-]?\]"
)
_DICTD_NOTE_RE = re.compile(r"\[[^\[\]]*\]")  # [1913 Webster], [Obs.], [L. affectus, ...]
_DICTD_ATTRIBUTION_RE = re.compile(r"--[A-Z][^\n]*")  # --Milton. (to the end of its line)
_DICTD_BRACES_RE = re.compile(r"[{}]")  # {cross references}: the words are prose


MAX_PARAGRAPH_CHARS = 1 << 16


def text_format(path: str) -> str:
    """``dictd`` for a dictd database file, else ``text``."""
    return "dictd" if path.endswith(DICTD_SUFFIXES) else "text"


def clean_dictd(paragraph: str) -> str:
    """A dictd/GCIDE paragraph (its lines joined by newlines) as one line without markup:
    ``--Author`` attributions and pronunciations (per line), accented-letter codes inside words
    (``Hali[ae]etus`` -> ``Haliaetus``), bracketed notes (sources, usage labels, etymologies;
    nested ones innermost first) and the braces of cross references (their words are kept)."""
    text = _DICTD_ATTRIBUTION_RE.sub(" ", paragraph)
    text = _DICTD_PRONUNCIATION_RE.sub(" ", text).replace("\n", " ")
    text = _DICTD_LETTER_RE.sub(r"\1", text)
    n = 1
    while n:
        text, n = _DICTD_NOTE_RE.subn(" ", text)
    return _DICTD_BRACES_RE.sub("", text)


def _text_lines(path: str) -> Iterator[str]:
    if path.endswith(".dz"):  # dictzip is gzip with an index in its header
        with (
            fileio.open_file(path, "rb") as raw,
            gzip.open(raw, "rt", encoding="utf-8", errors="replace") as f,
        ):
            for line in f:
                yield line.rstrip("\r\n")
    else:
        yield from read_lines(path)


def iter_text_paragraphs(path: str) -> Iterator[str]:
    """Paragraphs of a UTF-8 text file (``.gz``, ``.bz2``, dictd ``.dz`` decompressed).

    A paragraph ends at a blank line; its lines are joined with spaces, as a wikitext paragraph
    is one line, so that hard-wrapped text pairs the words across a line break. A paragraph is
    also cut at a line end once it holds ``MAX_PARAGRAPH_CHARS`` (a file with one document
    per line and no blank line stays in bounded memory). dictd files are cleaned with
    ``clean_dictd``.
    """
    dictd = text_format(path) == "dictd"
    lines: list[str] = []
    size = 0
    for line in itertools.chain(_text_lines(path), [""]):
        if line.strip():
            lines.append(line)
            size += len(line) + 1
            if size < MAX_PARAGRAPH_CHARS:
                continue
        if lines:
            yield clean_dictd("\n".join(lines)) if dictd else " ".join(lines)
            lines = []
            size = 0


def count_text(
    path: str,
    unigrams: collections.Counter,
    bigrams: collections.Counter | None,
    counter: collections.Counter,
) -> None:
    """Count the tokens and bigrams of a text file (``paragraphs`` and ``tokens`` counted)."""
    for paragraph in iter_text_paragraphs(path):
        counter["paragraphs"] += 1
        counter["tokens"] += count_ngrams([paragraph], unigrams, bigrams)


# ---------------------------------------------------------------------------------------------
# Unigrams and bigrams


def unigram_reason(word: str, count: int, *, min_count: int, max_chars: int) -> str | None:
    if WORD_RE.fullmatch(word) is None:
        return "not_a_word"
    if not has_letter(word):
        return "no_letter"
    if len(word) > max_chars:
        return "too_long"
    if count < min_count:
        return "below_min_count"
    return None


def select_unigrams(
    counts: Mapping[str, int] | Iterable[tuple[str, int]],
    *,
    min_count: int,
    max_chars: int,
    counter: collections.Counter,
) -> list[tuple[str, int]]:
    """Words kept at ``count >= min_count``, most frequent first (ties alphabetical)."""
    items = counts.items() if isinstance(counts, Mapping) else counts
    kept = []
    for word, count in items:
        counter[counters_lib.INPUT] += 1
        reason = unigram_reason(word, count, min_count=min_count, max_chars=max_chars)
        if reason:
            counter[dropped(reason)] += 1
        else:
            counter[counters_lib.KEPT] += 1
            kept.append((word, count))
    kept.sort(key=lambda wc: (-wc[1], wc[0]))
    return kept


def pmi(count_ab: int, count_a: int, count_b: int, n_tokens: int) -> float:
    """``log2(p(ab) / (p(a) p(b)))`` with every probability over ``n_tokens`` (as nltk)."""
    return math.log2(count_ab * n_tokens) - math.log2(count_a * count_b)


def max_pmi(n_tokens: int, min_count: int) -> float:
    """The largest PMI any bigram seen ``min_count`` times can reach in ``n_tokens`` tokens."""
    return math.log2(max(n_tokens, 1) / max(min_count, 1))


def bigram_prefilter_reason(bigram: str, count: int, *, min_count: int) -> str | None:
    """Checks that need no unigram counts (run before the join)."""
    a, _, b = bigram.partition(" ")
    if not has_letter(a) or not has_letter(b):
        return "no_letter"
    if count < min_count:
        return "below_min_count"
    return None


def score_bigrams(
    bigram_counts: Mapping[str, int],
    unigram_counts: Mapping[str, int],
    n_tokens: int,
    *,
    min_count: int,
    min_pmi: float,
    counter: collections.Counter,
) -> list[tuple[str, float, int]]:
    """Bigrams kept at ``count >= min_count`` and ``PMI >= min_pmi``, highest PMI first."""
    kept = []
    for bigram, count in bigram_counts.items():
        counter[counters_lib.INPUT] += 1
        reason = bigram_prefilter_reason(bigram, count, min_count=min_count)
        if reason:
            counter[dropped(reason)] += 1
            continue
        a, _, b = bigram.partition(" ")
        score = pmi(count, unigram_counts[a], unigram_counts[b], n_tokens)
        if score < min_pmi:
            counter[dropped("below_min_pmi")] += 1
            continue
        counter[counters_lib.KEPT] += 1
        kept.append((bigram, score, count))
    kept.sort(key=lambda e: (-round(e[1], 9), -e[2], e[0]))
    return kept


# ---------------------------------------------------------------------------------------------
# Titles: pageview files and plain lists

# Namespaces of English Wikipedia (canonical names, talk pages and aliases): a title with one
# of these prefixes is not an article.
_NAMESPACES = frozenset(
    n.lower()
    for base in (
        "Media",
        "Special",
        "User",
        "Wikipedia",
        "Project",
        "WP",
        "File",
        "Image",
        "MediaWiki",
        "Template",
        "Help",
        "Category",
        "Portal",
        "Draft",
        "TimedText",
        "Module",
        "Book",
        "Education Program",
        "Gadget",
        "Gadget definition",
        "Topic",
        "Event",
    )
    for n in (base, f"{base} talk")
).union({"talk", "wt", "image talk"})
_DISAMBIGUATION_RE = re.compile(r"\s+\([^()]*\)$")
MAIN_PAGE = "Main Page"


def canonical_title(raw: str) -> str:
    """MediaWiki's canonical form: percent-decoded, ``_`` as spaces, first letter upper case."""
    s = raw.strip()
    if "%" in s:
        s = urllib.parse.unquote(s, errors="strict") if _valid_escapes(s) else s
    s = unicodedata.normalize("NFC", s.replace("_", " "))
    s = _WHITESPACE_RE.sub(" ", s).strip()
    if s:
        s = s[0].upper() + s[1:]
    return s


def _valid_escapes(s: str) -> bool:
    try:
        urllib.parse.unquote(s, errors="strict")
    except UnicodeDecodeError:
        return False
    return True


def title_reason(title: str) -> str | None:
    """Why a canonical title is not an article title (``None`` when it is)."""
    if not title or title == "-":
        return "empty_title"
    if "\n" in title or "\t" in title:
        return "bad_title"
    prefix, colon, _ = title.partition(":")
    if colon and prefix.strip().lower() in _NAMESPACES:
        return "namespace"
    if title == MAIN_PAGE:
        return "main_page"
    return None


def title_query(title: str, *, strip_disambiguation: bool, drop_list_pages: bool) -> str | None:
    """The query for an article title (``None`` for list pages when they are dropped)."""
    if drop_list_pages and (title.startswith(("List of ", "Lists of "))):
        return None
    if strip_disambiguation:
        stripped = _DISAMBIGUATION_RE.sub("", title)
        title = stripped if stripped else title
    return title


def parse_title_path(line: str) -> str:
    """A title from a line of a titles list: ``Title``, ``/wiki/Title`` or a full wiki URL."""
    s = line.strip()
    if "/wiki/" in s:
        s = s.split("/wiki/", 1)[1]
        s = s.split("#", 1)[0].split("?", 1)[0]
    return s


def read_title_list(
    lines: Iterable[str], counter: collections.Counter
) -> list[tuple[str, int | None]]:
    """Canonical article titles of a plain list, in file order (no views: ``None``)."""
    out: list[tuple[str, int | None]] = []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        counter[counters_lib.INPUT] += 1
        title = canonical_title(parse_title_path(line))
        reason = title_reason(title)
        if reason:
            counter[dropped(reason)] += 1
            continue
        counter[counters_lib.KEPT] += 1
        out.append((title, None))
    return out


def parse_pageview_line(line: str, projects: frozenset[str]) -> tuple[str, int] | str:
    """``(canonical title, views)`` for one pageview line, or the reason it is skipped.

    Hourly pageview files (``pageviews-YYYYMMDD-HH0000.gz``) and the older ``pagecounts``
    files hold ``<domain_code> <page_title> <count_views> <total_response_size>`` lines.
    """
    parts = line.split(" ")
    if len(parts) != 4:
        return "malformed"
    project, raw_title, views, _ = parts
    if project not in projects:
        return "other_project"
    try:
        n = int(views)
    except ValueError:
        return "malformed"
    title = canonical_title(raw_title)
    reason = title_reason(title)
    if reason:
        return reason
    return title, n


def sum_pageviews(
    lines: Iterable[str],
    *,
    projects: Sequence[str],
    counter: collections.Counter,
    views: collections.Counter | None = None,
) -> collections.Counter:
    """Sum the views per canonical title over pageview lines; counts lines by outcome."""
    views = collections.Counter() if views is None else views
    wanted = frozenset(projects)
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            continue
        counter[counters_lib.INPUT] += 1
        got = parse_pageview_line(line, wanted)
        if isinstance(got, str):
            counter[dropped(got)] += 1
            continue
        counter[counters_lib.KEPT] += 1
        views[got[0]] += got[1]
    return views


def select_titles(
    titles: Iterable[tuple[str, int | None]],
    *,
    min_views: int | None,
    strip_disambiguation: bool,
    drop_list_pages: bool,
    counter: collections.Counter,
) -> list[tuple[str, int | None]]:
    """Title queries: views ``>= min_views`` (when known), most viewed first.

    Without view counts (a plain list) the file order is kept. Two titles that give the same
    query ("Mercury (planet)", "Mercury (element)") stay two candidates here; the merge keeps
    the first.
    """
    kept: list[tuple[str, int | None]] = []
    for title, views in titles:
        counter[counters_lib.INPUT] += 1
        if min_views is not None and views is not None and views < min_views:
            counter[dropped("below_min_views")] += 1
            continue
        query = title_query(
            title, strip_disambiguation=strip_disambiguation, drop_list_pages=drop_list_pages
        )
        if query is None:
            counter[dropped("list_page")] += 1
            continue
        counter[counters_lib.KEPT] += 1
        kept.append((query, views))
    if all(v is not None for _, v in kept):
        kept.sort(key=lambda tv: (-(tv[1] or 0), tv[0]))
    return kept


# ---------------------------------------------------------------------------------------------
# WordNet


@dataclasses.dataclass(frozen=True)
class Synset:
    offset: int
    pos: str
    lemmas: tuple[str, ...]
    gloss: str


_ADJ_MARKER_RE = re.compile(r"\((?:a|p|ip)\)$")


def iter_wordnet_synsets(lines: Iterable[str], *, source: str = "data") -> Iterator[Synset]:
    """Synsets of a WordNet 3.0 ``data.*`` file (license header lines are skipped).

    A line is ``offset lex_filenum ss_type w_cnt (word lex_id){w_cnt} p_cnt ... | gloss``
    with ``w_cnt`` in hexadecimal; adjective lemmas may end in a syntactic marker ``(a)``,
    ``(p)`` or ``(ip)``, which is not part of the word.
    """
    for lineno, line in enumerate(lines, 1):
        if line.startswith("  ") or not line.strip():
            continue
        fields, _, gloss = line.partition(" | ")
        parts = fields.split()
        try:
            offset = int(parts[0])
            pos = parts[2]
            w_cnt = int(parts[3], 16)
            words = parts[4 : 4 + 2 * w_cnt : 2]
            if len(words) != w_cnt or w_cnt == 0:
                raise ValueError("word count")
        except (IndexError, ValueError):
            raise WitError(f"{source}:{lineno}: not a WordNet data line: {line[:80]!r}") from None
        lemmas = tuple(_ADJ_MARKER_RE.sub("", w).replace("_", " ") for w in words)
        yield Synset(offset=offset, pos=pos, lemmas=lemmas, gloss=gloss.strip())


def wordnet_entries(
    synsets: Iterable[Synset], *, lemmas: str, counter: collections.Counter
) -> list[str]:
    """Lemma names of ``synsets``: every lemma, or only each synset's first."""
    if lemmas not in WORDNET_LEMMAS:
        raise WitError(f"wordnet lemmas must be one of {WORDNET_LEMMAS}, got {lemmas!r}")
    out = []
    for ss in synsets:
        counter["synsets"] += 1
        for i, lemma in enumerate(ss.lemmas):
            counter[counters_lib.INPUT] += 1
            if lemmas == "first" and i > 0:
                counter[dropped("not_first_lemma")] += 1
                continue
            counter[counters_lib.KEPT] += 1
            out.append(lemma)
    return out


def wordnet_files(directory: str) -> list[str]:
    """The four ``data.*`` files of a WordNet database directory (all must exist)."""
    paths = [fileio.join(directory, name) for name in WORDNET_DATA_FILES]
    missing = [p for p in paths if not fileio.exists(p)]
    if missing:
        raise WitError(
            f"WordNet data files not found: {', '.join(missing)} (Debian/Ubuntu: "
            "apt-get install wordnet-base; or pass --wordnet DIR)"
        )
    return paths


def read_wordnet(directory: str) -> list[Synset]:
    synsets: list[Synset] = []
    for path in wordnet_files(directory):
        with fileio.open_file(path, "rb") as f:
            text = f.read().decode("utf-8")
        synsets.extend(iter_wordnet_synsets(text.splitlines(), source=path))
    return synsets


def wordnet_version(directory: str) -> str:
    """The version line of the license header (``WordNet 3.0 Copyright 2006 ...``)."""
    path = fileio.join(directory, "data.noun")
    with fileio.open_file(path, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    m = re.search(r"WordNet (\d+(?:\.\d+)*) Copyright", head)
    return f"WordNet {m.group(1)}" if m else "unknown"


# ---------------------------------------------------------------------------------------------
# Merge, cap, write


def normalize_query(entry: str, *, case: str = "keep") -> str:
    """NFC, whitespace runs collapsed to one space, trimmed; lower-cased when ``case="lower"``."""
    s = unicodedata.normalize("NFC", entry)
    s = " ".join(s.split())
    return s.lower() if case == "lower" else s


@dataclasses.dataclass(frozen=True)
class MergeResult:
    queries: list[str]
    # Per source: input (candidates), kept (in the list), dropped:duplicate / over_cap / empty.
    counters: dict[str, dict[str, int]]


def merge_sources(
    candidates: Mapping[str, Sequence[str]],
    *,
    priority: Sequence[str],
    max_queries: int,
    case: str = "keep",
) -> MergeResult:
    """Merge per-source candidate lists (strongest first) into one deduplicated, capped list.

    Sources are taken in ``priority`` order; an entry is credited to the first source that has
    it (later copies are ``duplicate``, also copies of an entry the cap removed), and once
    ``max_queries`` entries are in, every further distinct entry is ``over_cap`` once: the cap
    removes the weakest entries of the last sources.
    """
    if case not in CASES:
        raise WitError(f"case must be one of {CASES}, got {case!r}")
    if max_queries <= 0:
        raise WitError(f"max_queries must be positive, got {max_queries}")
    unknown = [s for s in candidates if s not in priority]
    if unknown:
        raise WitError(f"sources missing from the priority order: {', '.join(unknown)}")
    queries: list[str] = []
    seen: set[str] = set()
    stats: dict[str, dict[str, int]] = {}
    for source in priority:
        if source not in candidates:
            continue
        c: collections.Counter = collections.Counter()
        for entry in candidates[source]:
            c[counters_lib.INPUT] += 1
            q = normalize_query(entry, case=case)
            if not q:
                c[dropped("empty")] += 1
            elif q in seen:
                c[dropped("duplicate")] += 1
            else:
                # Seen before the cap test: a repeat of an over-cap entry is a duplicate.
                seen.add(q)
                if len(queries) >= max_queries:
                    c[dropped("over_cap")] += 1
                else:
                    queries.append(q)
                    c[counters_lib.KEPT] += 1
        counters_lib.check_balanced(c, stage=f"merge {source}")
        stats[source] = {k: c[k] for k in sorted(c)}
    return MergeResult(queries=queries, counters=stats)


def query_list_bytes(queries: Sequence[str]) -> bytes:
    """The decompressed list: one query per line, UTF-8, final newline."""
    for q in queries:
        if not q or q != q.strip() or "\n" in q or "\r" in q:
            raise WitError(f"invalid query {q!r}: queries are non-empty single trimmed lines")
    return ("\n".join(queries) + "\n").encode("utf-8")


def write_query_list(path: str, queries: Sequence[str]) -> str:
    """Write the list (gzip when ``path`` ends in ``.gz``, reproducibly); returns its sha256.

    The sha256 is that of the decompressed text, as ``queries.queries_sha256`` computes it.
    """
    raw = query_list_bytes(queries)
    with fileio.atomic_write(path, "wb") as f:
        if path.endswith(".gz"):
            # mtime=0 and no file name: the same list gives the same bytes.
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as g:
                g.write(raw)
        else:
            f.write(raw)
    return hashlib.sha256(raw).hexdigest()


def manifest_path(list_path: str) -> str:
    """``x/wit-queries-en.txt.gz`` -> ``x/wit-queries-en.json``."""
    for suffix in (".txt.gz", ".txt", ".gz"):
        if list_path.endswith(suffix):
            return list_path[: -len(suffix)] + ".json"
    return list_path + ".json"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with fileio.open_file(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(
    *,
    list_path: str,
    result: MergeResult,
    sha256: str,
    cfg: QueriesConfig,
    sources: Mapping[str, Mapping[str, Any]],
    command: str,
    created: str,
) -> dict[str, Any]:
    """The JSON manifest written beside a query list.

    ``sources[name]`` holds what the source step recorded (inputs with versions or dates,
    thresholds, its own counters); the merge adds ``candidates`` (entries before dedup),
    ``after_dedup`` (new to the list, before the cap) and ``in_list``.
    """
    out_sources: dict[str, Any] = {}
    for name in cfg.priority:
        if name not in result.counters:
            continue
        merged = result.counters[name]
        doc = dict(sources.get(name, {}))
        doc["candidates"] = merged.get(counters_lib.INPUT, 0)
        doc["after_dedup"] = (
            merged.get(counters_lib.INPUT, 0)
            - merged.get(dropped("duplicate"), 0)
            - merged.get(dropped("empty"), 0)
        )
        doc["in_list"] = merged.get(counters_lib.KEPT, 0)
        doc["merge_counters"] = merged
        out_sources[name] = doc
    return {
        "queries": {
            "path": list_path.rsplit("/", 1)[-1],
            "count": len(result.queries),
            "sha256": sha256,
            "format": "UTF-8 text, one query per line; query id = 0-based line number",
        },
        "total": len(result.queries),
        "max_queries": cfg.max_queries,
        "priority": list(cfg.priority),
        "case": cfg.case,
        "sources": out_sources,
        "command": command,
        "created": created,
    }


def read_lines(path: str) -> Iterator[str]:
    """Text lines of a local or remote file, ``.gz``/``.bz2`` decompressed."""
    with fileio.open_file(path, "rb", compression="infer") as f:
        for raw in io.TextIOWrapper(f, encoding="utf-8", errors="replace"):
            yield raw.rstrip("\r\n")


# ---------------------------------------------------------------------------------------------
# Count tables and wordfreq (unigram counts that do not come from a dump)

WIKIPEDIA_WORDS = 4_500_000_000
WIKIPEDIA_WORDS_SOURCE = (
    "Wikipedia:Size of Wikipedia: 6,816,939 articles containing over 4.5 billion words "
    "(26 April 2024)"
)


def parse_count_table(lines: Iterable[str], *, source: str = "table") -> dict[str, int]:
    """``word<TAB>count``, ``word;count`` or ``word count`` lines -> ``{word: count}``.

    Counts of a word given twice (another casing folded, another file part) are summed.
    """
    counts: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        for sep in ("\t", ";", " "):
            word, found, count = line.rpartition(sep)
            if found:
                break
        # An empty word (the tokenizer's leftovers) is kept: the unigram selection counts it
        # as dropped (not_a_word) instead of losing it here.
        n = int(count) if found and count.strip().isdigit() else -1
        if n < 0:
            raise WitError(f"{source}:{lineno}: expected 'word<TAB>count', got {line[:80]!r}")
        counts[word] = counts.get(word, 0) + n
    return counts


def wordfreq_counts(n_tokens: int, *, lang: str = "en", wordlist: str = "large") -> dict[str, int]:
    """wordfreq's word list as estimated counts in a corpus of ``n_tokens`` tokens.

    wordfreq gives frequencies (a blend of Wikipedia, subtitles, news, books, web text and
    social media), not counts; ``round(frequency * n_tokens)`` estimates how often a word
    occurs in a corpus of that size, so the unigram threshold (``count >= 100``) applies to it.
    """
    import wordfreq

    words = wordfreq.top_n_list(lang, 10**9, wordlist=wordlist)
    return {w: round(wordfreq.word_frequency(w, lang, wordlist=wordlist) * n_tokens) for w in words}


def max_counts(tables: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Per word, the largest count among several estimates of the same corpus' counts."""
    out: dict[str, int] = {}
    for table in tables:
        for w, n in table.items():
            if n > out.get(w, -1):
                out[w] = n
    return out


# ---------------------------------------------------------------------------------------------
# Candidate files (what the counting pipeline hands to the merge)


def write_candidates(path: str, rows: Iterable[Sequence[Any]]) -> int:
    """Write tab-separated rows (query first) to a gzip file; returns the number of rows."""
    n = 0
    with (
        fileio.atomic_write(path, "wb") as f,
        gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as g,
    ):
        for row in rows:
            g.write(("\t".join(_fmt(v) for v in row) + "\n").encode("utf-8"))
            n += 1
    return n


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def read_candidates(path: str) -> list[list[str]]:
    return [line.split("\t") for line in read_lines(path) if line]


# ---------------------------------------------------------------------------------------------
# Beam: counting over a full dump, summing page views

UNIGRAMS = "unigrams"
BIGRAMS = "bigrams"
PAGES = "pages"
TEXT = "text"
TEXT_BATCH_PARAGRAPHS = 1024  # paragraphs of a --text file per batch handed to the counting


def prefixed(part: str, counter: Mapping[str, int]) -> dict[str, int]:
    """``{"input": 3}`` -> ``{"pages/input": 3}``: several counters share one stats file."""
    return {f"{part}/{k}": v for k, v in counter.items()}


def split_counters(counts: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Inverse of ``prefixed`` over a summed stats dict."""
    out: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for name, n in counts.items():
        part, _, key = name.partition("/")
        out[part][key] = n
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def _plan_file(path: str, split_bytes: int) -> list[tuple[str, int, int]]:
    return plan_splits(path, file_size(path), split_bytes)


class _ReadSplitFn(beam.DoFn):
    """A byte range of a dump -> batches of article wikitext; pages counted by outcome."""

    def __init__(self, batch_pages: int):
        self._batch_pages = batch_pages

    def process(self, split: tuple[str, int, int]):
        path, start, end = split
        if path.endswith(".bz2"):
            fragments = iter_split_pages(path, start, end)
        else:
            fragments = iter_page_fragments(path)  # gzip/plain XML: one split per file
        counter: collections.Counter = collections.Counter()
        batch: list[str] = []
        for fragment in fragments:
            page = parse_fragment(fragment, source=path)
            counter[counters_lib.INPUT] += 1
            reason = page_reason(page)
            if reason:
                counter[dropped(reason)] += 1
                continue
            counter[counters_lib.KEPT] += 1
            batch.append(page.text)
            if len(batch) >= self._batch_pages:
                yield batch
                batch = []
        if batch:
            yield batch
        yield from beam_utils.emit_counts(prefixed(PAGES, counter))


class _CountNgramsFn(beam.DoFn):
    """Batches of wikitext -> partial ``(token, n)`` and ``(bigram, n)`` counts.

    Counts are combined across the whole bundle before they are emitted (and flushed when the
    bigram table reaches ``max_keys``): emitting per page would send every token of the dump
    through the shuffle.
    """

    def __init__(
        self,
        *,
        bigrams: bool,
        max_keys: int = 2_000_000,
        wikitext: bool = True,
        tokens_counter: str = "corpus/tokens",
    ):
        self._bigrams = bigrams
        self._max_keys = max_keys
        self._wikitext = wikitext  # False: plain text (``--text``), counted as it is
        self._tokens_counter = tokens_counter

    def start_bundle(self):
        self._uni: collections.Counter = collections.Counter()
        self._bi: collections.Counter | None = collections.Counter() if self._bigrams else None
        self._tokens = 0

    def process(self, batch: list[str]):
        texts = (clean_wikitext(t) for t in batch) if self._wikitext else batch
        self._tokens += count_ngrams(texts, self._uni, self._bi)
        if len(self._uni) + len(self._bi or ()) >= self._max_keys:
            yield from self._flush(windowed=False)

    def finish_bundle(self):
        yield from self._flush(windowed=True)

    def _flush(self, *, windowed: bool):
        def out(tag: str, value: Any):
            v = GlobalWindows.windowed_value(value) if windowed else value
            return TaggedOutput(tag, v)

        for item in self._uni.items():
            yield out(UNIGRAMS, item)
        for item in (self._bi or {}).items():
            yield out(BIGRAMS, item)
        if self._tokens:
            yield out(beam_utils.COUNTS, (self._tokens_counter, self._tokens))
        self.start_bundle()


class CountWikipediaNgrams(beam.PTransform):
    """Dump files -> ``{"unigrams": (token, count), "bigrams": ("a b", count), "counts": ...}``.

    Totals are exact: ``(token, count)`` partials are summed with ``CombinePerKey``. Byte ranges
    of ``.bz2`` files are read in parallel (``split_bytes`` each) and the page batches are
    redistributed before the counting, which dominates the cost.
    """

    def __init__(
        self,
        *,
        files: Sequence[str],
        split_bytes: int,
        batch_pages: int,
        bigrams: bool = True,
        max_keys: int = 2_000_000,
    ):
        super().__init__()
        if not files:
            raise WitError("no dump files to count")
        self._max_keys = max_keys
        if split_bytes <= 0 or batch_pages <= 0:
            raise WitError("split_bytes and batch_pages must be positive")
        self._files = list(files)
        self._split_bytes = split_bytes
        self._batch_pages = batch_pages
        self._bigrams = bigrams

    def expand(self, pbegin):
        read = (
            pbegin
            | "Files" >> beam.Create(self._files)
            | "PlanSplits" >> beam.FlatMap(_plan_file, self._split_bytes)
            | "ShuffleSplits" >> beam.Reshuffle()
            | "ReadSplits"
            >> beam.ParDo(_ReadSplitFn(self._batch_pages)).with_outputs(
                beam_utils.COUNTS, main="batches"
            )
        )
        counted = (
            read.batches
            | "ShuffleBatches" >> beam.Reshuffle()
            | "Count"
            >> beam.ParDo(
                _CountNgramsFn(bigrams=self._bigrams, max_keys=self._max_keys)
            ).with_outputs(UNIGRAMS, BIGRAMS, beam_utils.COUNTS)
        )
        unigrams = counted[UNIGRAMS] | "SumUnigrams" >> beam.CombinePerKey(sum)
        bigrams = counted[BIGRAMS] | "SumBigrams" >> beam.CombinePerKey(sum)
        counts = (read[beam_utils.COUNTS], counted[beam_utils.COUNTS]) | "Counts" >> beam.Flatten()
        return {UNIGRAMS: unigrams, BIGRAMS: bigrams, beam_utils.COUNTS: counts}


def _read_text_batches(path: str, batch_paragraphs: int):
    """A text file (``--text``) -> batches of paragraphs; ``text/paragraphs`` counted."""
    batch: list[str] = []
    n = 0
    for paragraph in iter_text_paragraphs(path):
        n += 1
        batch.append(paragraph)
        if len(batch) >= batch_paragraphs:
            yield batch
            batch = []
    if batch:
        yield batch
    yield from beam_utils.emit_counts({TEXT + "/paragraphs": n})


class CountTextNgrams(beam.PTransform):
    """Plain-text files -> ``{"unigrams", "bigrams", "counts"}`` like ``CountWikipediaNgrams``.

    Each file is read whole by one worker (text corpora are small next to a dump); paragraph
    batches are redistributed before the counting. Tokens are counted as ``text/tokens``.
    """

    def __init__(self, *, files: Sequence[str], batch_paragraphs: int, max_keys: int = 2_000_000):
        super().__init__()
        if not files:
            raise WitError("no text files to count")
        self._files = list(files)
        self._batch_paragraphs = batch_paragraphs
        self._max_keys = max_keys

    def expand(self, pbegin):
        read = (
            pbegin
            | "Files" >> beam.Create(self._files)
            | "ShuffleFiles" >> beam.Reshuffle()
            | "Read"
            >> beam.FlatMap(_read_text_batches, self._batch_paragraphs).with_outputs(
                beam_utils.COUNTS, main="batches"
            )
        )
        counted = (
            read.batches
            | "ShuffleBatches" >> beam.Reshuffle()
            | "Count"
            >> beam.ParDo(
                _CountNgramsFn(
                    bigrams=True,
                    max_keys=self._max_keys,
                    wikitext=False,
                    tokens_counter=TEXT + "/tokens",
                )
            ).with_outputs(UNIGRAMS, BIGRAMS, beam_utils.COUNTS)
        )
        unigrams = counted[UNIGRAMS] | "SumUnigrams" >> beam.CombinePerKey(sum)
        bigrams = counted[BIGRAMS] | "SumBigrams" >> beam.CombinePerKey(sum)
        counts = (read[beam_utils.COUNTS], counted[beam_utils.COUNTS]) | "Counts" >> beam.Flatten()
        return {UNIGRAMS: unigrams, BIGRAMS: bigrams, beam_utils.COUNTS: counts}


class _BundleCountsFn(beam.DoFn):
    """A DoFn whose counters are summed over the bundle and emitted once at its end.

    Selection steps see one element per distinct word or bigram (hundreds of millions on a
    full dump); emitting ``(name, 1)`` per element would double the shuffle.
    """

    part = ""

    def start_bundle(self):
        self._counter: collections.Counter = collections.Counter()

    def finish_bundle(self):
        for out in beam_utils.emit_counts(prefixed(self.part, self._counter)):
            yield TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
        self._counter = collections.Counter()


class _SelectUnigramsFn(_BundleCountsFn):
    part = UNIGRAMS

    def __init__(self, *, min_count: int, max_chars: int):
        self._min_count = min_count
        self._max_chars = max_chars

    def process(self, item: tuple[str, int]):
        word, count = item
        reason = unigram_reason(word, count, min_count=self._min_count, max_chars=self._max_chars)
        self._counter[counters_lib.INPUT] += 1
        if reason:
            self._counter[dropped(reason)] += 1
        else:
            self._counter[counters_lib.KEPT] += 1
            yield item


class SelectUnigrams(beam.PTransform):
    """``(word, count)`` totals -> the words kept, with a counted reason for each drop."""

    def __init__(self, *, min_count: int, max_chars: int):
        super().__init__()
        self._fn = _SelectUnigramsFn(min_count=min_count, max_chars=max_chars)

    def expand(self, pcoll):
        out = pcoll | beam.ParDo(self._fn).with_outputs(beam_utils.COUNTS, main="kept")
        return {"kept": out.kept, beam_utils.COUNTS: out[beam_utils.COUNTS]}


class _PrefilterBigramsFn(_BundleCountsFn):
    """Checks that need no unigram counts, before the joins (``kept`` is counted after PMI)."""

    part = BIGRAMS

    def __init__(self, min_count: int):
        self._min_count = min_count

    def process(self, item: tuple[str, int]):
        bigram, count = item
        reason = bigram_prefilter_reason(bigram, count, min_count=self._min_count)
        self._counter[counters_lib.INPUT] += 1
        if reason:
            self._counter[dropped(reason)] += 1
        else:
            yield item


def _attach_first(kv):
    _, groups = kv
    counts = list(groups["uni"])
    if not counts:
        return
    for bigram, count in groups["bi"]:
        yield bigram.partition(" ")[2], (bigram, count, counts[0])


def _attach_second(kv):
    _, groups = kv
    counts = list(groups["uni"])
    if not counts:
        return
    for bigram, count, count_a in groups["bi"]:
        yield bigram, count, count_a, counts[0]


class _ScoreBigramsFn(_BundleCountsFn):
    part = BIGRAMS

    def __init__(self, min_pmi: float):
        self._min_pmi = min_pmi

    def process(self, item, n_tokens: int):
        bigram, count, count_a, count_b = item
        score = pmi(count, count_a, count_b, n_tokens)
        if score < self._min_pmi:
            self._counter[dropped("below_min_pmi")] += 1
        else:
            self._counter[counters_lib.KEPT] += 1
            yield bigram, score, count


class ScoreBigrams(beam.PTransform):
    """Bigram and unigram totals -> ``(bigram, pmi, count)`` kept at both thresholds.

    PMI needs ``count(a)`` and ``count(b)``: two ``CoGroupByKey`` joins (by first word, then by
    second word) bring them to each bigram without holding the vocabulary in memory.
    """

    def __init__(self, *, min_count: int, min_pmi: float):
        super().__init__()
        self._min_count = min_count
        self._min_pmi = min_pmi

    def expand(self, inputs):
        unigrams, bigrams = inputs[UNIGRAMS], inputs[BIGRAMS]
        n_tokens = unigrams | "Tokens" >> beam.Values() | "N" >> beam.CombineGlobally(sum)
        pre = bigrams | "Prefilter" >> beam.ParDo(
            _PrefilterBigramsFn(self._min_count)
        ).with_outputs(beam_utils.COUNTS, main="kept")
        # Words rarer than min_count cannot be part of a kept bigram.
        vocab = unigrams | "Vocab" >> beam.Filter(lambda kv, m: kv[1] >= m, self._min_count)
        by_first = pre.kept | "KeyFirst" >> beam.Map(lambda kv: (kv[0].partition(" ")[0], kv))
        with_a = (
            {"bi": by_first, "uni": vocab}
            | "JoinFirst" >> beam.CoGroupByKey()
            | "AttachFirst" >> beam.FlatMap(_attach_first)
        )
        with_ab = (
            {"bi": with_a, "uni": vocab}
            | "JoinSecond" >> beam.CoGroupByKey()
            | "AttachSecond" >> beam.FlatMap(_attach_second)
        )
        scored = with_ab | "PMI" >> beam.ParDo(
            _ScoreBigramsFn(self._min_pmi), beam.pvalue.AsSingleton(n_tokens)
        ).with_outputs(beam_utils.COUNTS, main="kept")
        counts = (pre[beam_utils.COUNTS], scored[beam_utils.COUNTS]) | beam.Flatten()
        return {"kept": scored.kept, beam_utils.COUNTS: counts, "n_tokens": n_tokens}


class _SumPageviewsFn(beam.DoFn):
    """One pageview file -> ``(title, views)`` summed within the file; lines counted."""

    def __init__(self, projects: Sequence[str]):
        self._projects = tuple(projects)

    def process(self, path: str):
        counter: collections.Counter = collections.Counter()
        views = sum_pageviews(read_lines(path), projects=self._projects, counter=counter)
        yield from views.items()
        yield from beam_utils.emit_counts(prefixed("pageview_lines", counter))


class _ThresholdTitlesFn(_BundleCountsFn):
    part = "titles"

    def __init__(self, min_views: int):
        self._min_views = min_views

    def process(self, item: tuple[str, int]):
        self._counter[counters_lib.INPUT] += 1
        if item[1] < self._min_views:
            self._counter[dropped("below_min_views")] += 1
        else:
            self._counter[counters_lib.KEPT] += 1
            yield item


class SumPageviews(beam.PTransform):
    """Pageview files -> ``(canonical title, total views)`` for titles at ``>= min_views``."""

    def __init__(self, *, files: Sequence[str], projects: Sequence[str], min_views: int):
        super().__init__()
        if not files:
            raise WitError("no pageview files")
        self._files = list(files)
        self._projects = tuple(projects)
        self._min_views = min_views

    def expand(self, pbegin):
        per_file = (
            pbegin
            | "Files" >> beam.Create(self._files)
            | "Shuffle" >> beam.Reshuffle()
            | "SumFile"
            >> beam.ParDo(_SumPageviewsFn(self._projects)).with_outputs(
                beam_utils.COUNTS, main="views"
            )
        )
        totals = per_file.views | "SumTitles" >> beam.CombinePerKey(sum)
        kept = totals | "Threshold" >> beam.ParDo(_ThresholdTitlesFn(self._min_views)).with_outputs(
            beam_utils.COUNTS, main="kept"
        )
        counts = (per_file[beam_utils.COUNTS], kept[beam_utils.COUNTS]) | beam.Flatten()
        return {"kept": kept.kept, beam_utils.COUNTS: counts}


class WriteCandidates(beam.PTransform):
    """Collect rows, sort them (strongest first) and write one gzip TSV file.

    Candidate lists are small (a few million rows at most: every kept row already passed a
    threshold), so one worker writes them in a deterministic order.
    """

    def __init__(self, path: str, *, sort_key):
        super().__init__()
        self._path = path
        self._sort_key = sort_key

    def expand(self, pcoll):
        return (
            pcoll
            | "ToList" >> beam.combiners.ToList()
            | "Write"
            >> beam.Map(
                lambda rows, p, k: write_candidates(p, sorted(rows, key=k)),
                self._path,
                self._sort_key,
            )
        )


def unigram_sort_key(row):
    return (-row[1], row[0])


def bigram_sort_key(row):
    return (-round(row[1], 9), -row[2], row[0])


def title_sort_key(row):
    return (-row[1], row[0])


# ---------------------------------------------------------------------------------------------
# Sources -> candidates (driver side)


@dataclasses.dataclass(frozen=True)
class SourceResult:
    """One source's candidate entries (strongest first) and what the manifest says about it."""

    name: str
    entries: list[str]
    doc: dict[str, Any]


_DATE_RE = re.compile(r"(?<!\d)(20\d{2})(\d{2})(\d{2})(?!\d)")


def input_info(
    path: str, kind: str, *, checksum: bool = True, name: str | None = None, **extra: Any
) -> dict[str, Any]:
    """What the manifest records about an input file: path (or a portable ``name``), kind,
    size, date (from a ``YYYYMMDD`` in the file name) and sha256."""
    info: dict[str, Any] = {"path": name or path, "kind": kind, "size": file_size(path)}
    m = _DATE_RE.search(path.rsplit("/", 1)[-1])
    if m:
        info["date"] = f"{m.group(1)}-{m.group(2)}-{m.group(3)}"
    if checksum:
        info["sha256"] = file_sha256(path)
    info.update(extra)
    return info


def wordnet_source(
    directory: str, cfg: QueriesConfig, *, synsets: Sequence[Synset] | None = None
) -> SourceResult:
    counter: collections.Counter = collections.Counter()
    if synsets is None:
        synsets = read_wordnet(directory)
    entries = wordnet_entries(synsets, lemmas=cfg.wordnet.lemmas, counter=counter)
    version = wordnet_version(directory)
    doc = {
        "inputs": [input_info(p, "wordnet-data") for p in wordnet_files(directory)],
        "version": version,
        **({"debian_package": deb} if (deb := debian_package_version(directory)) else {}),
        "thresholds": {"lemmas": cfg.wordnet.lemmas},
        "counters": dict(sorted(counter.items())),
    }
    return SourceResult("wordnet", entries, doc)


def debian_package_version(directory: str) -> str | None:
    """``wordnet-base 1:3.0-37`` when ``directory`` belongs to an installed Debian package."""
    import shutil
    import subprocess

    if not fileio.is_local(directory) or shutil.which("dpkg-query") is None:
        return None
    try:
        owner = subprocess.run(
            ["dpkg-query", "-S", os.path.join(os.path.abspath(directory), "data.noun")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split(":", 1)[0]
        version = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", owner],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, OSError):
        return None
    return f"{owner} {version}" if owner and version else None


def unigram_source(
    tables: Sequence[tuple[dict[str, Any], Mapping[str, int]]], cfg: QueriesConfig
) -> SourceResult:
    """Words at ``count >= min_count`` in any of several count tables (largest count wins).

    Each table is one estimate of the same thing, a word's count in English Wikipedia: counts
    from a dump, a count file, or wordfreq frequencies scaled to the corpus size.
    """
    counter: collections.Counter = collections.Counter()
    kept = select_unigrams(
        max_counts(t for _, t in tables),
        min_count=cfg.unigrams.min_count,
        max_chars=cfg.unigrams.max_chars,
        counter=counter,
    )
    inputs = []
    for info, table in tables:
        inputs.append({**info, "words": len(table), "tokens": sum(table.values())})
    doc = {
        "inputs": inputs,
        "thresholds": {"min_count": cfg.unigrams.min_count, "max_chars": cfg.unigrams.max_chars},
        "counters": dict(sorted(counter.items())),
    }
    return SourceResult("unigrams", [w for w, _ in kept], doc)


def bigram_source(
    rows: Sequence[tuple[str, float, int]],
    *,
    inputs: list[dict[str, Any]],
    n_tokens: int,
    counter: Mapping[str, int],
    cfg: QueriesConfig,
) -> SourceResult:
    """Scored bigrams (highest PMI first), cut to ``max_entries`` (``over_max_entries``)."""
    c = collections.Counter(counter)
    limit = cfg.bigrams.max_entries
    if limit and len(rows) > limit:
        c[dropped("over_max_entries")] += len(rows) - limit
        c[counters_lib.KEPT] -= len(rows) - limit
        rows = rows[:limit]
    counters_lib.check_balanced(c, stage="bigrams")
    doc = {
        "inputs": inputs,
        "tokens": n_tokens,
        "thresholds": {
            "min_count": cfg.bigrams.min_count,
            "min_pmi": cfg.bigrams.min_pmi,
            "max_entries": cfg.bigrams.max_entries,
            "pmi": "log2(count(ab) * N / (count(a) * count(b)))",
            "max_possible_pmi": round(max_pmi(n_tokens, cfg.bigrams.min_count), 3),
        },
        "counters": dict(sorted(c.items())),
    }
    return SourceResult("bigrams", [b for b, _, _ in rows], doc)


def title_source(
    titles: Sequence[tuple[str, int | None]],
    *,
    inputs: list[dict[str, Any]],
    counters: Mapping[str, Mapping[str, int]],
    cfg: QueriesConfig,
) -> SourceResult:
    counter: collections.Counter = collections.Counter()
    has_views = any(v is not None for _, v in titles)
    kept = select_titles(
        titles,
        min_views=cfg.titles.min_views if has_views else None,
        strip_disambiguation=cfg.titles.strip_disambiguation,
        drop_list_pages=cfg.titles.drop_list_pages,
        counter=counter,
    )
    doc = {
        "inputs": inputs,
        "thresholds": {
            "min_views": cfg.titles.min_views if has_views else None,
            "projects": list(cfg.titles.projects) if has_views else None,
            "strip_disambiguation": cfg.titles.strip_disambiguation,
            "drop_list_pages": cfg.titles.drop_list_pages,
        },
        "counters": {
            **{k: dict(v) for k, v in counters.items()},
            "select": dict(sorted(counter.items())),
        },
    }
    return SourceResult("titles", [t for t, _ in kept], doc)


def title_list_source(
    paths: Sequence[str], cfg: QueriesConfig, *, names: Sequence[str] | None = None
) -> SourceResult:
    counter: collections.Counter = collections.Counter()
    titles: list[tuple[str, int | None]] = []
    for path in paths:
        titles.extend(read_title_list(read_lines(path), counter))
    names = names or paths
    inputs = [input_info(p, "titles-list", name=n) for p, n in zip(paths, names, strict=True)]
    return title_source(titles, inputs=inputs, counters={"lines": counter}, cfg=cfg)


def assemble(
    sources: Sequence[SourceResult],
    *,
    cfg: QueriesConfig,
    output: str,
    command: str,
    created: str | None = None,
) -> dict[str, Any]:
    """Merge the sources, write the list and its manifest; returns the manifest."""
    import datetime

    if not sources:
        raise WitError("no query source has an input: nothing to build")
    names = [s.name for s in sources]
    unknown = [n for n in cfg.priority if n not in SOURCES]
    if unknown:
        raise WitError(f"unknown source in priority: {', '.join(unknown)} (known: {SOURCES})")
    result = merge_sources(
        {s.name: s.entries for s in sources},
        priority=cfg.priority,
        max_queries=cfg.max_queries,
        case=cfg.case,
    )
    if not result.queries:
        raise WitError("every source is empty: no query to write")
    sha = write_query_list(output, result.queries)
    manifest = build_manifest(
        list_path=output,
        result=result,
        sha256=sha,
        cfg=cfg,
        sources={s.name: s.doc for s in sources},
        command=command,
        created=created or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    )
    manifest["config"] = json.loads(json.dumps(dataclasses.asdict(cfg)))
    manifest["skipped_sources"] = [n for n in SOURCES if n not in names]
    fileio.write_json(manifest_path(output), manifest)
    return manifest


def summary_table(manifest: Mapping[str, Any]) -> str:
    """A Markdown table of the manifest's per-source counts."""
    lines = [
        "| source | candidates | after dedup | in list |",
        "|---|---:|---:|---:|",
    ]
    for name, doc in manifest["sources"].items():
        lines.append(
            f"| {name} | {doc['candidates']:,} | {doc['after_dedup']:,} | {doc['in_list']:,} |"
        )
    lines.append(f"| **total** | | | **{manifest['total']:,}** |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `wit queries build`: the counting pipeline, then the merge


@dataclasses.dataclass(frozen=True)
class BuildInputs:
    """Where each source's data comes from; a source without input is skipped."""

    dumps: tuple[str, ...] = ()  # Wikipedia XML dumps: unigrams and bigrams
    unigram_counts: tuple[str, ...] = ()  # word<TAB>count tables
    wordfreq_tokens: int = 0  # > 0: wordfreq's list scaled to a corpus of this many tokens
    pageviews: tuple[str, ...] = ()  # hourly pageview files: titles with views
    titles: tuple[str, ...] = ()  # plain title lists, used when no pageviews are given
    wordnet: str | None = None  # directory with data.noun, data.verb, data.adj, data.adv
    texts: tuple[str, ...] = ()  # plain-text corpora (also dictd .dict.dz): more bigram text


def _fingerprint(inputs: BuildInputs, cfg: QueriesConfig, files: Mapping[str, list[str]]) -> str:
    """What the counting pipeline's outputs depend on: input files and the thresholds."""
    doc = {
        "files": {k: [(p, file_size(p)) for p in v] for k, v in files.items()},
        "unigrams": dataclasses.asdict(cfg.unigrams),
        "bigrams": {"min_count": cfg.bigrams.min_count, "min_pmi": cfg.bigrams.min_pmi},
        "bigrams_enabled": cfg.bigrams.enabled,
        "titles": {"min_views": cfg.titles.min_views, "projects": list(cfg.titles.projects)},
        "titles_enabled": cfg.titles.enabled,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _counts_current(work_dir: str, fingerprint: str) -> bool:
    """True when ``work_dir`` holds a completed run for the same inputs and thresholds."""
    stats_path = fileio.join(work_dir, "stats.json")
    if not fileio.exists(stats_path):
        return False
    doc = fileio.read_json(stats_path)
    return doc.get("fingerprint") == fingerprint and all(
        fileio.exists(fileio.join(work_dir, f"{name}.tsv.gz")) for name in doc.get("rows", {})
    )


def run_counting_pipeline(
    *,
    dump_files: Sequence[str],
    pageview_files: Sequence[str],
    cfg: QueriesConfig,
    text_files: Sequence[str] = (),
    work_dir: str,
    beam_args: Sequence[str] = (),
    fingerprint: str = "",
    max_keys: int = 2_000_000,
) -> dict[str, Any]:
    """Count the dumps and sum the page views on Beam; write candidate files to ``work_dir``.

    Writes ``unigrams.tsv.gz`` (word, count), ``bigrams.tsv.gz`` (bigram, pmi, count),
    ``titles.tsv.gz`` (title, views) as far as they apply, then ``stats.json`` (counters and
    the fingerprint) last: its presence marks the run complete. ``text_files`` add to the
    bigram counts only: their words enter the PMI's counts and ``N``, not ``unigrams.tsv.gz``.
    """
    options = beam_utils.pipeline_options(beam_args)
    stats_path = fileio.join(work_dir, "stats.json")
    with beam.Pipeline(options=options) as p:
        counts = []
        written: dict[str, Any] = {}  # candidate file name -> PCollection of its row count
        corpora = []  # the bigram corpus: the dumps and the text files
        if dump_files and (cfg.unigrams.enabled or cfg.bigrams.enabled):
            ngrams = p | "CountDumps" >> CountWikipediaNgrams(
                files=dump_files,
                split_bytes=cfg.split_bytes,
                batch_pages=cfg.batch_pages,
                bigrams=cfg.bigrams.enabled,
                max_keys=max_keys,
            )
            counts.append(ngrams[beam_utils.COUNTS])
            corpora.append(ngrams)
            if cfg.unigrams.enabled:
                uni = ngrams[UNIGRAMS] | "SelectUnigrams" >> SelectUnigrams(
                    min_count=cfg.unigrams.min_count, max_chars=cfg.unigrams.max_chars
                )
                counts.append(uni[beam_utils.COUNTS])
                written["unigrams"] = uni["kept"] | "WriteUnigrams" >> WriteCandidates(
                    fileio.join(work_dir, "unigrams.tsv.gz"), sort_key=unigram_sort_key
                )
        if text_files and cfg.bigrams.enabled:
            text = p | "CountText" >> CountTextNgrams(
                files=text_files, batch_paragraphs=TEXT_BATCH_PARAGRAPHS, max_keys=max_keys
            )
            counts.append(text[beam_utils.COUNTS])
            corpora.append(text)
        if corpora and cfg.bigrams.enabled:
            if len(corpora) == 1:
                corpus = corpora[0]
            else:
                corpus = {
                    part: tuple(c[part] for c in corpora)
                    | f"Flatten{part.title()}" >> beam.Flatten()
                    | f"SumCorpus{part.title()}" >> beam.CombinePerKey(sum)
                    for part in (UNIGRAMS, BIGRAMS)
                }
            bi = corpus | "ScoreBigrams" >> ScoreBigrams(
                min_count=cfg.bigrams.min_count, min_pmi=cfg.bigrams.min_pmi
            )
            counts.append(bi[beam_utils.COUNTS])
            written["bigrams"] = bi["kept"] | "WriteBigrams" >> WriteCandidates(
                fileio.join(work_dir, "bigrams.tsv.gz"), sort_key=bigram_sort_key
            )
        if pageview_files and cfg.titles.enabled:
            views = p | "Pageviews" >> SumPageviews(
                files=pageview_files, projects=cfg.titles.projects, min_views=cfg.titles.min_views
            )
            counts.append(views[beam_utils.COUNTS])
            written["titles"] = views["kept"] | "WriteTitles" >> WriteCandidates(
                fileio.join(work_dir, "titles.tsv.gz"), sort_key=title_sort_key
            )
        # The completion marker: its step takes every candidate file's row count as a side
        # input, so it runs only once all of them are written.
        names = sorted(written)
        _ = (
            tuple(counts)
            | "AllCounts" >> beam.Flatten()
            | "Stats" >> beam_utils.SumCounts()
            | "WriteStats"
            >> beam.Map(
                _write_stats_marker,
                stats_path,
                fingerprint,
                names,
                *[beam.pvalue.AsSingleton(written[n]) for n in names],
            )
        )
    return fileio.read_json(stats_path)


def _write_stats_marker(
    counts: dict[str, int], path: str, fingerprint: str, names: list[str], *rows: int
) -> None:
    doc = {
        "counters": counts,
        "fingerprint": fingerprint,
        "rows": dict(zip(names, rows, strict=True)),
    }
    fileio.write_json(path, doc)


def build(
    inputs: BuildInputs,
    cfg: QueriesConfig,
    *,
    output: str,
    work_dir: str | None = None,
    beam_args: Sequence[str] = (),
    command: str = "",
    force: bool = False,
    log=print,
) -> dict[str, Any]:
    """``wit queries build``: every source that has an input, merged into ``output``."""
    dump_files = fileio.expand_inputs(inputs.dumps) if inputs.dumps else []
    pageview_files = fileio.expand_inputs(inputs.pageviews) if inputs.pageviews else []
    text_files = fileio.expand_inputs(inputs.texts) if inputs.texts else []
    if inputs.pageviews and inputs.titles:
        raise WitError("give either --pageviews or --titles, not both")
    if text_files and not cfg.bigrams.enabled:
        raise WitError("--text feeds only the bigrams, and queries.bigrams.enabled is false")
    work_dir = work_dir or manifest_path(output)[: -len(".json")] + ".work"
    files = {"dumps": dump_files, "pageviews": pageview_files}
    if text_files:  # absent otherwise: earlier work directories stay current
        files["text"] = text_files
    stats: dict[str, Any] = {"counters": {}}
    if dump_files or pageview_files or text_files:
        fp = _fingerprint(inputs, cfg, files)
        stats_path = fileio.join(work_dir, "stats.json")
        if not force and _counts_current(work_dir, fp):
            log(f"counts up to date in {work_dir} (same inputs and thresholds): not recounting")
            stats = fileio.read_json(stats_path)
        else:
            stats = run_counting_pipeline(
                dump_files=dump_files,
                pageview_files=pageview_files,
                text_files=text_files,
                cfg=cfg,
                work_dir=work_dir,
                beam_args=beam_args,
                fingerprint=fp,
            )
    parts = split_counters(stats["counters"])
    if dump_files and not parts.get(PAGES, {}).get(counters_lib.INPUT):
        raise WitError(f"no <page> element in the dump files: {', '.join(dump_files)}")
    for name, c in parts.items():
        if counters_lib.INPUT in c:
            counters_lib.check_balanced(c, stage=name)
    n_tokens = parts.get("corpus", {}).get("tokens", 0)
    dump_info = [input_info(p, "wikipedia-dump", checksum=False) for p in dump_files]

    sources: list[SourceResult] = []
    if cfg.wordnet.enabled and inputs.wordnet:
        sources.append(wordnet_source(inputs.wordnet, cfg))
    if cfg.unigrams.enabled:
        tables: list[tuple[dict[str, Any], Mapping[str, int]]] = []
        if dump_files:
            rows = read_candidates(fileio.join(work_dir, "unigrams.tsv.gz"))
            info = {
                "kind": "wikipedia-dumps",
                "files": dump_info,
                "pages": parts.get(PAGES, {}),
                "corpus_tokens": n_tokens,
                "counters": parts.get(UNIGRAMS, {}),
            }
            tables.append((info, {w: int(c) for w, c in rows}))
        for path in inputs.unigram_counts:
            table = parse_count_table(read_lines(path), source=path)
            tables.append((input_info(path, "count-table"), table))
        if inputs.wordfreq_tokens > 0:
            tables.append(
                (wordfreq_info(inputs.wordfreq_tokens), wordfreq_counts(inputs.wordfreq_tokens))
            )
        if tables:
            sources.append(unigram_source(tables, cfg))
    if cfg.bigrams.enabled and (dump_files or text_files):
        rows3 = [
            (b, float(s), int(c))
            for b, s, c in read_candidates(fileio.join(work_dir, "bigrams.tsv.gz"))
        ]
        bigram_inputs = list(dump_info)
        text_counts = parts.get(TEXT, {})
        if text_files:
            bigram_inputs.append(
                {
                    "kind": "text",
                    "files": [
                        input_info(p, "text", checksum=False, format=text_format(p))
                        for p in text_files
                    ],
                    **text_counts,
                }
            )
        bigram_tokens = n_tokens + text_counts.get("tokens", 0)
        sources.append(
            bigram_source(
                rows3,
                inputs=bigram_inputs,
                n_tokens=bigram_tokens,
                counter=parts.get(BIGRAMS, {}),
                cfg=cfg,
            )
        )
        warn_unreachable_pmi(bigram_tokens, cfg, log)
    if cfg.titles.enabled and pageview_files:
        rows2 = [(t, int(v)) for t, v in read_candidates(fileio.join(work_dir, "titles.tsv.gz"))]
        sources.append(
            title_source(
                rows2,
                inputs=[input_info(p, "pageviews", checksum=False) for p in pageview_files],
                counters={
                    "pageview_lines": parts.get("pageview_lines", {}),
                    "titles": parts.get("titles", {}),
                },
                cfg=cfg,
            )
        )
    elif cfg.titles.enabled and inputs.titles:
        sources.append(title_list_source(inputs.titles, cfg))
    return assemble(sources, cfg=cfg, output=output, command=command)


def warn_unreachable_pmi(n_tokens: int, cfg: QueriesConfig, log) -> None:
    top = max_pmi(n_tokens, cfg.bigrams.min_count)
    if cfg.bigrams.min_pmi > top:
        log(
            f"warning: bigrams.min_pmi={cfg.bigrams.min_pmi} cannot be reached: with "
            f"{n_tokens:,} tokens and min_count={cfg.bigrams.min_count} the largest possible "
            f"PMI is {top:.2f}; no bigram is kept"
        )


def wordfreq_info(n_tokens: int) -> dict[str, Any]:
    import importlib.metadata

    return {
        "kind": "wordfreq",
        "package": f"wordfreq {importlib.metadata.version('wordfreq')}",
        "wordlist": "large (en)",
        "scaled_to_tokens": n_tokens,
        "method": "count = round(word_frequency(word, 'en', 'large') * scaled_to_tokens)",
    }


# ---------------------------------------------------------------------------------------------
# `wit queries build-default`: the shipped list, from sources available offline

DEFAULT_LIST_NAME = "wit-queries-en.txt.gz"
GENSIM_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
VITAL_ARTICLES = "wikipedia/vital_article_links.txt"


def default_list_config() -> QueriesConfig:
    """The shipped list's thresholds: the builder's defaults, except for the bigram minimum
    count, which a 2-million-token corpus cannot meet at 100 (see docs/queries.md)."""
    from wit_pipeline.config import BigramConfig

    return QueriesConfig(bigrams=BigramConfig(min_count=5, min_pmi=8.0, max_entries=100_000))


def gensim_dump_path() -> str:
    """The English Wikipedia dump excerpt shipped in the gensim wheel (206 pages)."""
    try:
        import gensim
    except ImportError:
        raise WitError("gensim is not installed: pip install 'gensim>=4.3'") from None
    path = fileio.join(os.path.dirname(gensim.__file__), GENSIM_DUMP)
    if not fileio.exists(path):
        raise WitError(f"gensim's Wikipedia dump excerpt not found at {path}")
    return path


def pywordfreq_counts_path() -> str:
    """``word_frequencies.gz`` of PyPI ``pywordfreq``: English Wikipedia word counts."""
    import importlib.util

    spec = importlib.util.find_spec("pywordfreq")
    if spec is None or not spec.submodule_search_locations:
        raise WitError("pywordfreq is not installed: pip install 'pywordfreq==0.4.2'")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "word_frequencies.gz")
    if not os.path.exists(path):
        raise WitError(f"pywordfreq's word_frequencies.gz not found at {path}")
    return path


def package_relative(path: str) -> str:
    """``.../site-packages/gensim/x`` -> ``gensim==4.4.0:gensim/x`` (portable in a manifest)."""
    import importlib.metadata

    marker = f"{os.sep}site-packages{os.sep}"
    if marker not in path:
        return path
    rel = path.split(marker, 1)[1]
    dist = rel.split(os.sep, 1)[0]
    try:
        return f"{dist}=={importlib.metadata.version(dist)}:{rel}"
    except importlib.metadata.PackageNotFoundError:
        return rel


def corpus_bigrams(
    *,
    dump: str,
    wordnet_dir: str,
    cfg: QueriesConfig,
    synsets: Sequence[Synset] | None = None,
    texts: Sequence[str] = (),
    log=print,
) -> SourceResult:
    """Bigram PMI over real text available offline: a Wikipedia dump excerpt, the glosses
    and example sentences of WordNet and any ``texts`` (counted locally: a few M tokens)."""
    unigrams: collections.Counter = collections.Counter()
    bigrams: collections.Counter = collections.Counter()
    pages: collections.Counter = collections.Counter()
    count_pages(iter_pages(dump), unigrams, bigrams, pages)
    dump_tokens = pages.pop("tokens", 0)
    glosses = [s.gloss for s in (synsets or read_wordnet(wordnet_dir))]
    gloss_tokens = count_ngrams(glosses, unigrams, bigrams)
    text_inputs = []
    for path in texts:
        text_counter: collections.Counter = collections.Counter()
        count_text(path, unigrams, bigrams, text_counter)
        text_inputs.append(
            input_info(path, "text", format=text_format(path), **dict(sorted(text_counter.items())))
        )
    n_tokens = sum(unigrams.values())
    counter: collections.Counter = collections.Counter()
    rows = score_bigrams(
        bigrams,
        unigrams,
        n_tokens,
        min_count=cfg.bigrams.min_count,
        min_pmi=cfg.bigrams.min_pmi,
        counter=counter,
    )
    warn_unreachable_pmi(n_tokens, cfg, log)
    inputs = [
        input_info(
            dump,
            "wikipedia-dump",
            name=package_relative(dump),
            pages=dict(sorted(pages.items())),
            tokens=dump_tokens,
        ),
        {
            "kind": "wordnet-glosses",
            "files": [p.rsplit("/", 1)[-1] for p in wordnet_files(wordnet_dir)],
            "glosses": len(glosses),
            "tokens": gloss_tokens,
        },
        *text_inputs,
    ]
    return bigram_source(rows, inputs=inputs, n_tokens=n_tokens, counter=counter, cfg=cfg)


def build_default(
    *,
    output_dir: str,
    wordnet_dir: str = DEFAULT_WORDNET_DIR,
    titles: str,
    dump: str | None = None,
    texts: Sequence[str] = (),
    wikipedia_words: int = WIKIPEDIA_WORDS,
    command: str = "",
    titles_name: str | None = None,
    log=print,
) -> dict[str, Any]:
    """Rebuild the shipped default list from offline sources (see docs/queries.md)."""
    import importlib.metadata

    cfg = default_list_config()
    dump = dump or gensim_dump_path()
    wordfreq_path = pywordfreq_counts_path()
    synsets = read_wordnet(wordnet_dir)
    sources = [wordnet_source(wordnet_dir, cfg, synsets=synsets)]
    wf = wordfreq_info(wikipedia_words)
    wf["scale_source"] = WIKIPEDIA_WORDS_SOURCE
    pw = input_info(
        wordfreq_path,
        "count-table",
        name=package_relative(wordfreq_path),
        package=f"pywordfreq {importlib.metadata.version('pywordfreq')}",
        description="English Wikipedia word counts (lower-cased, count >= 20)",
    )
    tables = [
        (wf, wordfreq_counts(wikipedia_words)),
        (pw, parse_count_table(read_lines(wordfreq_path), source=wordfreq_path)),
    ]
    sources.append(unigram_source(tables, cfg))
    sources.append(
        corpus_bigrams(
            dump=dump, wordnet_dir=wordnet_dir, cfg=cfg, synsets=synsets, texts=texts, log=log
        )
    )
    sources.append(title_list_source([titles], cfg, names=[titles_name or titles]))
    output = fileio.join(output_dir, DEFAULT_LIST_NAME)
    return assemble(sources, cfg=cfg, output=output, command=command)
