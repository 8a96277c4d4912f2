"""The query list: loading (every stage) and building (``wit queries``).

This module only reads lists, so every stage can import it without Beam. A query list is a text
file, optionally gzip-compressed, with one query per line. A query's id is its 0-based position
among the non-empty lines; ``query_ids`` in every later stage index into that list, so a
dataset records which list (path and sha256) it was matched against.

Building a list (CLIP's ~500k queries: Wikipedia words and bigrams, titles, WordNet) lives in
the modules of this package, in the order a reader needs them:

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

import gzip
import hashlib
import os

from wit_pipeline import fileio
from wit_pipeline.errors import WitError

REPO_QUERIES_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "queries"
)
DEFAULT_QUERIES_NAME = "wit-queries-en.txt.gz"


def default_queries_path() -> str:
    """The shipped default list (``queries/wit-queries-en.txt.gz`` in the repository)."""
    return os.path.join(REPO_QUERIES_DIR, DEFAULT_QUERIES_NAME)


def read_query_bytes(path: str) -> bytes:
    try:
        with fileio.open_file(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise WitError(f"query file not found: {path}") from None
    except (OSError, IsADirectoryError) as e:
        raise WitError(f"cannot read query file {path}: {e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise WitError(f"cannot read query file {path}: not a valid gzip file ({e})") from None
    return raw


def parse_queries(raw: bytes, *, source: str = "<bytes>") -> list[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WitError(f"cannot read query file {source}: not UTF-8 text ({e})") from None
    queries = [q for q in (line.strip() for line in text.splitlines()) if q]
    if not queries:
        raise WitError(f"query list is empty: {source}")
    return queries


def load_queries(path: str) -> list[str]:
    """Read a query list (``.txt`` or ``.txt.gz``); raises ``WitError`` when missing or empty."""
    return parse_queries(read_query_bytes(path), source=path)


def queries_sha256(path: str) -> str:
    """sha256 of the decompressed list: identifies which list ``query_ids`` refer to."""
    return hashlib.sha256(read_query_bytes(path)).hexdigest()
