"""Query lists in every format (text, JSON array/object, Parquet, CSV, TSV, gzip of each): the
entries, their ids, the list's sha256 and the entries MetaCLIP's spacing rule can never match."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_pipeline import queries
from wit_pipeline.errors import WitError
from wit_pipeline.queries import formats
from wit_pipeline.stages.gather.match import QueryMatcher, naive_match

# A MetaCLIP-style list: spaces, punctuation, non-ASCII, a duplicate.
ENTRIES = [
    "dog",
    "hot dog",
    "St. Louis",
    "Washington, D.C.",
    "Yahoo!",
    "a . b",
    "?",
    "Café",
    "rock `n` roll",
    "dog",
]
# Which of them can never match: a mark of ,.;:?!` next to another character.
UNMATCHABLE = [2, 3, 4, 8]
CANONICAL = ("\n".join(ENTRIES) + "\n").encode()
LIST_SHA = hashlib.sha256(CANONICAL).hexdigest()


def _write(path, data: bytes, *, gz: bool = False):
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return str(path)


def _csv(rows, sep=","):
    return "".join(sep.join(r) + "\n" for r in rows).encode()


def _parquet(columns: dict) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def _all_formats(tmp_path):
    """``{name: (spec, format, key)}``: the list in every format, plain and gzipped."""
    quoted = [[json.dumps(q) if "," in q else q] for q in ENTRIES]  # CSV quoting by hand
    files = {
        "q.txt": ("\n\n".join(f"  {q} " for q in ENTRIES).encode(), "text", ""),
        "metadata.json": (json.dumps(ENTRIES).encode(), "json", ""),
        "obj.json": (json.dumps({"version": 2, "entries": ENTRIES}).encode(), "json", "entries"),
        "q.parquet": (_parquet({"id": list(range(10)), "query": ENTRIES}), "parquet", "query"),
        "q.csv": (_csv([["query"], *quoted]), "csv", "query"),
        "q.tsv": (_csv([["n", "query"], *([str(i), q] for i, q in enumerate(ENTRIES))], "\t"), "tsv", "query"),
    }  # fmt: skip
    out = {}
    for name, (data, fmt, key) in files.items():
        out[name] = (_write(tmp_path / name, data), fmt, key)
        out[name + ".gz"] = (_write(tmp_path / (name + ".gz"), data, gz=True), fmt, key)
    return out


def test_every_format_loads_the_same_list_with_the_same_sha256(tmp_path):
    for name, (path, fmt, key) in _all_formats(tmp_path).items():
        got = queries.read_query_list(path)
        assert got.entries == ENTRIES, name
        assert (got.format, got.key, got.gzip) == (fmt, key, name.endswith(".gz")), name
        assert got.sha256 == LIST_SHA, name
        with open(path, "rb") as f:
            assert got.file_sha256 == hashlib.sha256(f.read()).hexdigest(), name
        assert got.unmatchable == UNMATCHABLE, name
        assert got.record() == {
            "path": path,
            "format": fmt,
            "key": key,
            "gzip": name.endswith(".gz"),
            "sha256": LIST_SHA,
            "file_sha256": got.file_sha256,
            "count": 10,
            "unmatchable": 4,
        }
        assert queries.load_queries(path) == ENTRIES
        assert queries.queries_sha256(path) == LIST_SHA


def test_a_clean_text_list_keeps_the_sha256_of_its_text(tmp_path):
    # The id a text list always had (sha256 of the decompressed file) is the list's sha256.
    path = _write(tmp_path / "q.txt.gz", CANONICAL, gz=True)
    assert (
        queries.queries_sha256(path) == hashlib.sha256(queries.read_query_bytes(path)).hexdigest()
    )


def test_keys_and_columns_by_name(tmp_path):
    doc = {"names": ["a b", "c"], "more": ["x"], "n": 3}
    path = _write(tmp_path / "m.json", json.dumps(doc).encode())
    assert queries.read_query_list(f"{path}#more").entries == ["x"]
    got = queries.read_query_list(f"{path}#names")
    assert (got.entries, got.key, got.path) == (["a b", "c"], "names", f"{path}#names")
    table = _write(tmp_path / "t.csv", _csv([["entry", "note"], ["red fox", "x"], ["owl", "y"]]))
    assert queries.load_queries(f"{table}#entry") == ["red fox", "owl"]
    single = _write(tmp_path / "one.parquet", _parquet({"text": ["sea lion", "owl"]}))
    assert queries.read_query_list(single).key == "text"  # a single column needs no name
    # A file whose name holds '#' is read whole.
    hashed = _write(tmp_path / "list#2.txt", b"owl\n")
    assert queries.load_queries(hashed) == ["owl"]


def test_content_decides_when_the_name_does_not(tmp_path):
    arr = _write(tmp_path / "meta", json.dumps(["owl", "sea lion"]).encode(), gz=True)
    assert queries.read_query_list(arr).format == "json"
    par = _write(tmp_path / "list.bin", _parquet({"query": ["owl"]}))
    assert queries.read_query_list(par).format == "parquet"
    text = _write(tmp_path / "list.lst", b"[citation needed]\nowl\n")
    got = queries.read_query_list(text)
    assert (got.format, got.entries) == ("text", ["[citation needed]", "owl"])


def test_errors_name_the_problem_exactly(tmp_path):
    def error(spec):
        with pytest.raises(WitError) as e:
            queries.load_queries(spec)
        return str(e.value)

    two = _write(tmp_path / "two.json", json.dumps({"a": ["x"], "b": ["y"], "c": 1}).encode())
    assert error(two) == f"{two}: a JSON object with list-valued keys: a, b; name one as {two}#KEY"
    none = _write(tmp_path / "none.json", b'{"a": 1}')
    assert error(none) == f"{none}: a JSON object with no list-valued key; name one as {none}#KEY"
    assert error(f"{two}#z") == f"{two}: no key 'z' (keys: a, b, c)"
    assert error(f"{two}#c") == f"{two}: 'c' does not hold a list"
    arr = _write(tmp_path / "arr.json", b'["a", 3]')
    assert error(arr) == f"{arr}: entry 1 is not a string: 3"
    assert error(f"{arr}#k") == f"{arr}: holds a JSON array, not an object with key 'k'"
    blank = _write(tmp_path / "blank.json", b'["a", "  "]')
    assert error(blank) == (
        f"{blank}: entry 1 is empty (query ids are positions in the list, so entries are never "
        "skipped)"
    )
    nulls = _write(tmp_path / "nulls.parquet", _parquet({"query": ["a", None]}))
    assert error(nulls) == f"{nulls}#query: entry 1 is not a string: None"
    cols = _write(tmp_path / "cols.csv", _csv([["a", "b"], ["x", "y"]]))
    assert error(cols) == f"{cols}: no column 'query' (columns: a, b); name one as {cols}#COLUMN"
    assert error(f"{cols}#q") == f"{cols}: no column 'q' (columns: a, b)"
    text = _write(tmp_path / "t.txt", b"owl\n")
    assert error(f"{text}#k") == f"{text}#k: a text list has no keys ('#k')"
    bad = _write(tmp_path / "bad.json", b"[1,")
    assert error(bad).startswith(f"cannot read query file {bad}: not JSON (")
    empty = _write(tmp_path / "empty.json", b"[]")
    assert error(empty) == f"query list is empty: {empty}"
    header_only = _write(tmp_path / "h.csv", b"query\n")
    assert error(header_only) == f"query list is empty: {header_only}"


def test_entries_with_line_breaks_hash_as_json():
    # ["a\nb"] and ["a", "b"] are different lists (different ids): different sha256.
    assert formats.list_sha256(["a\nb"]) != formats.list_sha256(["a", "b"])
    assert formats.list_sha256(["a\nb"]) == hashlib.sha256(b'["a\\nb"]').hexdigest()
    assert formats.list_sha256(["a", "b"]) == hashlib.sha256(b"a\nb\n").hexdigest()


def test_unmatchable_entries_match_nothing_and_the_others_match_a_caption():
    # Exhaustive over short strings of an alphabet with both kinds of mark: can_ever_match is
    # exactly "some caption matches it" under MetaCLIP's spacing.
    alphabet = ["a", " ", ".", "?", "\t"]
    entries = sorted(
        {
            "".join(t).strip()
            for n in range(1, 5)
            for t in itertools.product(alphabet, repeat=n)
            if "".join(t).strip()
        }
    )
    captions = ["".join(t) for n in range(0, 7) for t in itertools.product(alphabet, repeat=n)]
    matcher = QueryMatcher(entries)  # equals naive_match on every input (test_match.py)
    ever = set()
    for caption in captions:
        ever.update(matcher.match(caption))
    for i, entry in enumerate(entries):
        assert formats.can_ever_match(entry) == (i in ever), repr(entry)
    # The spacing rule's examples, by name.
    for entry in ("St. Louis", "U.S.", "Yahoo!", "what?", "rock `n` roll", "a\tb", ". .", "a..b"):
        assert not formats.can_ever_match(entry), entry
    for entry in ("hot dog", "a . b", "?", ". x .", "Café", "C++", "AC/DC", "don't"):
        assert formats.can_ever_match(entry), entry


def test_the_matcher_uses_positions_in_the_loaded_list(tmp_path):
    path = _write(tmp_path / "metadata.json", json.dumps(ENTRIES).encode())
    matcher = QueryMatcher(queries.load_queries(path))
    # "dog" is entries 0 and 9; "a . b" matches "a.b"; "?" matches any question mark.
    assert naive_match("a hot dog? a.b", ENTRIES) == [0, 1, 5, 6, 9]
    assert matcher.match("a hot dog? a.b") == [0, 1, 5, 6, 9]
