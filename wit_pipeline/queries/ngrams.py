"""Tokens and word counts: the unigram source (words seen often enough) and the bigram source
(pairs with high pointwise mutual information).

- ``segment_tokens`` + ``count_ngrams``: lower-cased words, and the bigrams that a space-padded
  substring match can see (two words separated by spaces only).
- ``select_unigrams``: words at ``count >= min_count``, with a reason for every drop; counts
  come from a dump (``wikipedia.count_pages``), count tables (``parse_count_table``) or
  wordfreq (``wordfreq_counts``); ``unigram_source`` takes the largest count per word.
- ``score_bigrams``: bigrams at ``count >= min_count`` and ``PMI >= min_pmi``;
  ``bigram_source`` caps them and records what the manifest says about them.
"""

from __future__ import annotations

import collections
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from wit_pipeline import counters as counters_lib
from wit_pipeline.config import QueriesConfig
from wit_pipeline.errors import WitError
from wit_pipeline.queries.merge import SourceResult

dropped = counters_lib.dropped


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


# ---------------------------------------------------------------------------------------------
# Unigrams: selection


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


def unigram_sort_key(row: tuple[str, int]) -> tuple[int, str]:
    """The unigram source's order: most frequent first, ties alphabetical."""
    return (-row[1], row[0])


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
    kept.sort(key=unigram_sort_key)
    return kept


# ---------------------------------------------------------------------------------------------
# Unigrams: count tables and wordfreq (counts that do not come from a dump)

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


def wordfreq_info(n_tokens: int) -> dict[str, Any]:
    import importlib.metadata

    return {
        "kind": "wordfreq",
        "package": f"wordfreq {importlib.metadata.version('wordfreq')}",
        "wordlist": "large (en)",
        "scaled_to_tokens": n_tokens,
        "method": "count = round(word_frequency(word, 'en', 'large') * scaled_to_tokens)",
    }


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


# ---------------------------------------------------------------------------------------------
# Bigrams: PMI


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


def bigram_sort_key(row: tuple[str, float, int]) -> tuple[float, int, str]:
    """The bigram source's order: highest PMI first (rounded: equal ratios of different counts
    tie despite float rounding), then most frequent, then alphabetical."""
    return (-round(row[1], 9), -row[2], row[0])


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
    kept.sort(key=bigram_sort_key)
    return kept


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


def warn_unreachable_pmi(n_tokens: int, cfg: QueriesConfig, log) -> None:
    top = max_pmi(n_tokens, cfg.bigrams.min_count)
    if cfg.bigrams.min_pmi > top:
        log(
            f"warning: bigrams.min_pmi={cfg.bigrams.min_pmi} cannot be reached: with "
            f"{n_tokens:,} tokens and min_count={cfg.bigrams.min_count} the largest possible "
            f"PMI is {top:.2f}; no bigram is kept"
        )
