"""Query lists in the formats users hold: text lines, JSON, Parquet, CSV/TSV, each also gzipped.

A list is an ordered sequence of entries; an entry's id is its 0-based position in the loaded
list, and every later stage stores those ids (``query_ids``). Formats:

- **text** (``.txt``, or anything that is not one of the others): one entry per line, UTF-8,
  each line trimmed, blank lines skipped (ids count non-blank lines).
- **json** (``.json``): an array of strings (MetaCLIP's ``metadata.json``), or an object with
  the array under a key: ``FILE.json#key`` names it; without ``#key`` the object's one
  list-valued key is used (several are an error that names them).
- **parquet** / **csv** / **tsv**: the column ``query`` (``FILE.csv#column`` names another;
  a table with a single column needs no name). CSV and TSV files have a header row.

Any of them may be gzip-compressed (``.gz``, detected by content). In the structured formats
(json, parquet, csv, tsv) an entry is taken as it is, trimmed; an empty, null or non-string
entry is an error naming its position, never dropped: the ids are positions in the source, so
that they agree with the ids other tools (MetaCLIP) give the same file.

What a dataset records about its list (:meth:`QueryList.record`): the format, ``sha256`` of the
list (of its canonical text, so the same entries in two formats have the same id and a build
does not see a change when its list is converted), ``file_sha256`` (of the file as stored),
``count``, and ``unmatchable``: entries that can never match under MetaCLIP's spacing rule
(:func:`can_ever_match`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
from collections.abc import Sequence
from typing import Any

from wit_pipeline import fileio
from wit_pipeline.errors import WitError

FORMATS = ("text", "json", "parquet", "csv", "tsv")
DEFAULT_COLUMN = "query"
_SUFFIX_FORMATS = {".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
# The characters MetaCLIP's ``spacing`` wraps with spaces (stages/gather/match.py).
_PUNCTUATION = ",.;:?!`"
_UNPAD = re.compile(rf" ?([{re.escape(_PUNCTUATION)}]) ?")


@dataclasses.dataclass(frozen=True)
class QueryList:
    """A loaded list and what identifies it."""

    entries: list[str]
    path: str  # as given, with ``#key`` when one was given
    format: str  # text | json | parquet | csv | tsv
    key: str  # JSON key or table column used ("" for text and a JSON array)
    gzip: bool
    sha256: str  # of the list: :func:`list_sha256`
    file_sha256: str  # of the file's bytes as stored (compressed when gzip)

    @property
    def unmatchable(self) -> list[int]:
        """Positions of the entries that can never match (:func:`can_ever_match`)."""
        return [i for i, q in enumerate(self.entries) if not can_ever_match(q)]

    def record(self) -> dict[str, Any]:
        """What the build's manifest and stats record about the list."""
        return {
            "path": self.path,
            "format": self.format,
            "key": self.key,
            "gzip": self.gzip,
            "sha256": self.sha256,
            "file_sha256": self.file_sha256,
            "count": len(self.entries),
            "unmatchable": len(self.unmatchable),
        }


def split_spec(spec: str) -> tuple[str, str]:
    """``"lists/m.json#entries"`` -> ``("lists/m.json", "entries")``.

    The part after the last ``#`` is a key (a JSON key or a table column) unless the whole
    string names an existing file, or that part holds a ``/`` (then ``#`` is part of the path).
    """
    path, sep, key = spec.rpartition("#")
    if not sep or not path or "/" in key or fileio.exists(spec):
        return spec, ""
    return path, key


def list_sha256(entries: Sequence[str]) -> str:
    """sha256 of the list's canonical text: one entry per line, UTF-8, every line ending in
    ``\\n``: the bytes of a clean text list, so a text list keeps the id it always had. A list
    with an entry holding a line break (which can never match) is hashed as its JSON array
    instead, which cannot collide with the line form (it does not end in a newline)."""
    if any("\n" in q for q in entries):
        raw = json.dumps(list(entries), ensure_ascii=False).encode("utf-8")
    else:
        raw = ("\n".join(entries) + "\n").encode("utf-8")
    return hashlib.sha256(raw).hexdigest()


def can_ever_match(entry: str) -> bool:
    """Whether some caption can match ``entry`` under MetaCLIP's substring rule.

    A caption is prepared by ``match.spacing``: padded with a space at each end, every
    ``, . ; : ? !`` and backtick wrapped in spaces, tab/newline/CR made spaces; an entry matches
    where `` entry `` occurs in it. So in the prepared text every such mark has its own space on
    each side, and an entry with a mark next to another character (``St. Louis``, ``U.S.``,
    ``Washington, D.C.``, ``Yahoo!``, ``what?``) or a tab or line break never matches. Such a
    mark with its own spaces (``a . b``, or an entry that is just ``?``) can. Exact: the entry
    matches the caption made by removing those spaces, and only if it matches that one.
    """
    from wit_pipeline.stages.gather.match import spacing

    return f" {entry} " in spacing(_UNPAD.sub(r"\1", entry))


def detect_format(path: str, raw: bytes) -> str:
    """By the name (without ``.gz``), else by content: Parquet's magic, a JSON array or
    object, else text lines (also text whose first line starts with a bracket)."""
    return fileio.sniff_format(path, raw, _SUFFIX_FORMATS) or "text"


def read_file_bytes(path: str) -> tuple[bytes, bytes]:
    """``(stored bytes, decompressed bytes)`` of a query file, with one-line errors."""
    return fileio.read_bytes_gunzipped(path, "query file")


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WitError(f"cannot read query file {source}: not UTF-8 text ({e})") from None


def parse_text(raw: bytes, source: str) -> list[str]:
    """Text lines: trimmed, blank lines skipped."""
    return [q for q in (line.strip() for line in _decode(raw, source).splitlines()) if q]


def _checked(values: Sequence[Any], source: str) -> list[str]:
    """Structured entries, trimmed; an empty, null or non-string one is an error."""
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise WitError(f"{source}: entry {i} is not a string: {v!r}")
        q = v.strip()
        if not q:
            raise WitError(
                f"{source}: entry {i} is empty (query ids are positions in the list, "
                f"so entries are never skipped)"
            )
        out.append(q)
    return out


def parse_json(raw: bytes, source: str, key: str) -> tuple[list[str], str]:
    """A JSON array, or the array under ``key`` (or the one list-valued key) of an object."""
    try:
        doc = json.loads(_decode(raw, source))
    except json.JSONDecodeError as e:
        raise WitError(f"cannot read query file {source}: not JSON ({e})") from None
    if isinstance(doc, list):
        if key:
            raise WitError(f"{source}: holds a JSON array, not an object with key {key!r}")
        return _checked(doc, source), ""
    if not isinstance(doc, dict):
        raise WitError(f"{source}: JSON must be an array of strings or an object holding one")
    lists = sorted(k for k, v in doc.items() if isinstance(v, list))
    if not key:
        if len(lists) != 1:
            found = f"list-valued keys: {', '.join(lists)}" if lists else "no list-valued key"
            raise WitError(f"{source}: a JSON object with {found}; name one as {source}#KEY")
        key = lists[0]
    if key not in doc:
        raise WitError(f"{source}: no key {key!r} (keys: {', '.join(sorted(doc))})")
    if not isinstance(doc[key], list):
        raise WitError(f"{source}: {key!r} does not hold a list")
    return _checked(doc[key], f"{source}#{key}"), key


def _pick_column(columns: Sequence[str], key: str, source: str) -> str:
    if key:
        if key not in columns:
            raise WitError(f"{source}: no column {key!r} (columns: {', '.join(columns)})")
        return key
    if DEFAULT_COLUMN in columns:
        return DEFAULT_COLUMN
    if len(columns) == 1:
        return columns[0]
    raise WitError(
        f"{source}: no column {DEFAULT_COLUMN!r} (columns: {', '.join(columns)}); "
        f"name one as {source}#COLUMN"
    )


def parse_table(raw: bytes, source: str, fmt: str, key: str) -> tuple[list[str], str]:
    """The query column of a Parquet, CSV or TSV file (CSV/TSV with a header row)."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(raw))
        except Exception as e:  # pyarrow raises several error types for bad files
            raise WitError(f"cannot read query file {source}: {e}") from None
        column = _pick_column(table.column_names, key, source)
        return _checked(table.column(column).to_pylist(), f"{source}#{column}"), column
    text = _decode(raw, source)
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    rows = list(reader)
    if not rows:
        raise WitError(f"query list is empty: {source}")
    header, body = rows[0], rows[1:]
    column = _pick_column(header, key, source)
    j = header.index(column)
    values = [row[j] if j < len(row) else None for row in body]
    return _checked(values, f"{source}#{column}"), column


def read_query_list(spec: str) -> QueryList:
    """Load a query list in any format (see the module doc); ``WitError`` when it cannot be
    read, is empty, or holds a bad entry."""
    path, key = split_spec(spec)
    stored, raw = read_file_bytes(path)
    fmt = detect_format(path, raw)
    if fmt == "text":
        if key:
            raise WitError(f"{spec}: a text list has no keys ('#{key}')")
        entries = parse_text(raw, path)
    elif fmt == "json":
        entries, key = parse_json(raw, path, key)
    else:
        entries, key = parse_table(raw, path, fmt, key)
    if not entries:
        raise WitError(f"query list is empty: {spec}")
    return QueryList(
        entries=entries,
        path=spec,
        format=fmt,
        key=key,
        gzip=stored is not raw,
        sha256=list_sha256(entries),
        file_sha256=hashlib.sha256(stored).hexdigest(),
    )
