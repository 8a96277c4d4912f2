"""Merging the sources into one list: dedup, priority order, the cap, the list file and its
manifest.

Each source hands a :class:`SourceResult` (its candidate entries, strongest first, and what the
manifest records about it) to ``assemble``, which merges them (``merge_sources``), writes the
list (``write_query_list``: gzip without a timestamp, the same list gives the same bytes) and
the JSON manifest beside it (``build_manifest``).
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from wit_pipeline import counters as counters_lib
from wit_pipeline import fileio
from wit_pipeline.config import QUERY_SOURCES, QueriesConfig
from wit_pipeline.errors import WitError

dropped = counters_lib.dropped


@dataclasses.dataclass(frozen=True)
class SourceResult:
    """One source's candidate entries (strongest first) and what the manifest says about it."""

    name: str
    entries: list[str]
    doc: dict[str, Any]


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
    removes the weakest entries of the last sources. ``priority``, ``max_queries`` and
    ``case`` are the ``queries`` section's (checked when it was made).
    """
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
    manifest["skipped_sources"] = [n for n in QUERY_SOURCES if n not in names]
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
