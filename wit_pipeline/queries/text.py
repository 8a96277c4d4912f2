"""Plain-text corpora (``--text``): more real text for the bigram counts.

A text file is read in paragraphs (``iter_text_paragraphs``); dictd databases (Debian's
``dict-gcide``, say) are cleaned of their markup first (``clean_dictd``). Their words join the
bigram corpus (``count(a)``, ``count(b)``, ``N``) but not the unigram source.
"""

from __future__ import annotations

import collections
import gzip
import itertools
import re
from collections.abc import Iterator

from wit_pipeline import fileio
from wit_pipeline.queries.ngrams import count_ngrams
from wit_pipeline.queries.reading import read_lines

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
