"""The query list: loading (every stage) and building (``wit queries``).

This module only reads lists, so every stage can import it without Beam. A query list is a text
file with one query per line, a JSON array (MetaCLIP's ``metadata.json``) or an object holding
one, or a ``query`` column of a Parquet/CSV/TSV file, each optionally gzip-compressed
(``formats``). A query's id is its 0-based position in the loaded list; ``query_ids`` in every
later stage index into that list, so a dataset records which list (path, format and sha256) it
was matched against.

Building a list (CLIP's ~500k queries: Wikipedia words and bigrams, titles, WordNet) lives in
the modules of this package, in the order a reader needs them:

- ``formats``: loading a list in any of its formats, its sha256, entries that can never match.
- ``reading``: input files (lines, sizes, checksums) and their records in the manifest.
- ``wikipedia``: dump pages, byte-range splits, wikitext cleaning, counting articles.
- ``ngrams``: tokens; the unigram source (dump counts, count tables, wordfreq) and the bigram
  source (PMI).
- ``text``: plain-text and dictd corpora, more text for the bigrams.
- ``titles``: article titles from pageview files or plain lists.
- ``wordnet``: the lemmas of WordNet's synsets.
- ``merge``: every source's candidates merged (dedup, priority, cap); the list and its manifest.
- ``pipeline``: the Beam counting pipeline (the one part that needs a cluster).
- ``build``: ``wit queries build`` (count once, then merge).
- ``default``: ``wit queries build-default``, the shipped list from offline sources (no Beam).
"""

from __future__ import annotations

import os

from wit_pipeline.errors import WitError
from wit_pipeline.queries import formats

REPO_QUERIES_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "queries"
)
DEFAULT_QUERIES_NAME = "wit-queries-en.txt.gz"


def default_queries_path() -> str:
    """The shipped default list (``queries/wit-queries-en.txt.gz`` in the repository)."""
    return os.path.join(REPO_QUERIES_DIR, DEFAULT_QUERIES_NAME)


def read_query_bytes(path: str) -> bytes:
    """The file's bytes, decompressed when gzip."""
    return formats.read_file_bytes(path)[1]


def parse_queries(raw: bytes, *, source: str = "<bytes>") -> list[str]:
    """Text lines (trimmed, blank lines skipped); raises ``WitError`` when there are none."""
    queries = formats.parse_text(raw, source)
    if not queries:
        raise WitError(f"query list is empty: {source}")
    return queries


def read_query_list(spec: str) -> formats.QueryList:
    """The list at ``spec`` (a path, ``PATH#key`` for a JSON key or table column) and its ids."""
    return formats.read_query_list(spec)


def load_queries(spec: str) -> list[str]:
    """The entries of a query list in any format; raises ``WitError`` when missing or empty."""
    return formats.read_query_list(spec).entries


def queries_sha256(spec: str) -> str:
    """sha256 of the list (its canonical text, ``formats.list_sha256``): identifies which list
    ``query_ids`` refer to, whatever format the file is in."""
    return formats.read_query_list(spec).sha256
