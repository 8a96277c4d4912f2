"""Titles: Wikipedia article titles above a page-view threshold, or from a plain list.

- ``sum_pageviews``: Wikimedia's hourly pageview files summed per canonical title
  (``canonical_title``: MediaWiki's form), every line counted by outcome.
- ``read_title_list``: a plain list of titles (``Title``, ``/wiki/Title`` or URLs).
- ``select_titles``: the view threshold, list pages dropped, disambiguation removed;
  ``title_source`` / ``title_list_source`` record what the manifest says about them.
"""

from __future__ import annotations

import collections
import re
import unicodedata
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from wit_pipeline import counters as counters_lib
from wit_pipeline.config import QueriesConfig
from wit_pipeline.queries.merge import SourceResult
from wit_pipeline.queries.reading import input_info, read_lines
from wit_pipeline.queries.wikipedia import WHITESPACE_RE

dropped = counters_lib.dropped

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
    s = WHITESPACE_RE.sub(" ", s).strip()
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


def title_sort_key(row: tuple[str, int]) -> tuple[int, str]:
    """The order of titles with views: most viewed first, ties alphabetical."""
    return (-row[1], row[0])


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
        kept.sort(key=title_sort_key)
    return kept


# ---------------------------------------------------------------------------------------------
# The source


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
