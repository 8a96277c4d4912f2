"""Query matching: which entries of the query list occur in a caption.

The default semantics are MetaCLIP's substring matching (facebookresearch/MetaCLIP,
``metaclip/substr_matching.py``), which reproduces how CLIP's WIT selected alt texts:

1. pad the text with one space at each end;
2. put a space on each side of every ``,`` ``.`` ``;`` ``:`` ``?`` ``!`` and backtick;
3. turn tab, newline and carriage return into spaces;
4. a query matches when `` query `` (one space on each side) occurs in that string.

Matching is case-sensitive: ``Apple`` and ``apple`` are different queries. A query that itself
contains one of the wrapped punctuation characters (``Mr. Smith``) can therefore never match,
exactly as in MetaCLIP. ``QueryMatcher`` finds every match in one pass with an Aho-Corasick
automaton (the Rust ``aho-corasick`` crate through ``ahocorasick_rs``), so the cost per caption
does not grow with the number of queries; its result equals :func:`naive_match`, the loop over
all queries, on every input.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import ahocorasick_rs

# MetaCLIP's ``spacing``: each punctuation mark gets a space on both sides, and tab, newline and
# carriage return become spaces. The replacements never create characters that another
# replacement targets, so their order does not matter (nor does doing them in one pass).
PUNCTUATION_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
CHARS_TO_SPACE = ("\t", "\n", "\r")
_PATTERN = operator.itemgetter(0)  # the pattern of a match (pattern index, start, end)
_SPACING_STEPS = (
    *((p, f" {p} ") for p in PUNCTUATION_TO_WRAP),
    *((c, " ") for c in CHARS_TO_SPACE),
)


def spacing(text: str) -> str:
    """MetaCLIP's text preparation: pad, space out punctuation, blank tab/newline/CR.

    Done as MetaCLIP does it, one ``str.replace`` per character present (``str.translate``
    with the same table gives the same string, at several times the cost per call).
    """
    text = f" {text} "
    for old, new in _SPACING_STEPS:
        if old in text:
            text = text.replace(old, new)
    return text


def _fold(text: str, case_sensitive: bool) -> str:
    return text if case_sensitive else text.lower()


def naive_match(text: str, queries: Sequence[str], *, case_sensitive: bool = True) -> list[int]:
    """The reference: indices of every query ``q`` with `` q `` in ``spacing(text)``."""
    spaced = spacing(_fold(text, case_sensitive))
    return [i for i, q in enumerate(queries) if f" {_fold(q, case_sensitive)} " in spaced]


class QueryMatcher:
    """Find every query of a (large) list in a text, MetaCLIP semantics, in one pass.

    Build it once per process (a 500k-entry list takes a few seconds): the gather DoFn's
    ``setup()`` acquires one per worker process through ``apache_beam.utils.shared.Shared``.
    Duplicate queries are allowed; each of their indices is reported.
    """

    def __init__(self, queries: Iterable[str], *, case_sensitive: bool = True):
        self.queries: list[str] = list(queries)
        self.case_sensitive = case_sensitive
        by_key: dict[str, list[int]] = {}
        for i, q in enumerate(self.queries):
            by_key.setdefault(f" {_fold(q, case_sensitive)} ", []).append(i)
        # A match reports the index of its key in ``by_key``: the query index itself when no
        # query repeats, else an index into ``self._key_ids``.
        self._key_ids: list[tuple[int, ...]] | None = None
        if len(by_key) != len(self.queries):
            self._key_ids = [tuple(ids) for ids in by_key.values()]
        # Standard match kind with overlapping search reports every occurrence of every key,
        # as the definition needs. With the crate's default automaton (a contiguous NFA at
        # this size) a real LAION caption takes about 0.6x of pyahocorasick's time against a
        # 500k-entry list, in a third of the memory (benchmarks/bench_match.py); the crate's
        # DFA is slower at this size, and over 2 GB.
        self._automaton = (
            ahocorasick_rs.AhoCorasick(
                list(by_key), matchkind=ahocorasick_rs.MatchKind.Standard, store_patterns=False
            )
            if by_key
            else None
        )

    def __len__(self) -> int:
        return len(self.queries)

    def __reduce__(self):
        # Pickle the list, not the automaton: it is rebuilt where it is unpickled.
        return (_rebuild, (self.queries, self.case_sensitive))

    def match(self, text: str) -> list[int]:
        """Sorted indices of every query found in ``text`` (empty when none)."""
        if self._automaton is None:
            return []
        spaced = spacing(text if self.case_sensitive else text.lower())
        found = set(map(_PATTERN, self._automaton.find_matches_as_indexes(spaced, True)))
        if self._key_ids is not None:
            key_ids = self._key_ids
            return sorted({i for k in found for i in key_ids[k]})
        return sorted(found)


def _rebuild(queries: list[str], case_sensitive: bool) -> QueryMatcher:
    return QueryMatcher(queries, case_sensitive=case_sensitive)
