"""QueryMatcher: MetaCLIP's substring semantics, equal to the naive loop on every input."""

import pathlib
import pickle
import random

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wit_pipeline.stages.gather.match import (
    CHARS_TO_SPACE,
    PUNCTUATION_TO_WRAP,
    QueryMatcher,
    naive_match,
    spacing,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def metaclip_spacing(text):
    """MetaCLIP's own ``spacing`` (metaclip/substr_matching.py), transcribed as a sequence of
    replaces, to check that our single-pass translate is the same function."""
    spaced_text = f" {text} "
    for p in [",", ".", ";", ":", "?", "!", "`"]:
        spaced_text = spaced_text.replace(p, f" {p} ")
    for c in ["\t", "\n", "\r"]:
        spaced_text = spaced_text.replace(c, " ")
    return spaced_text


def pairs_reference(text, index, *, case_sensitive=True):
    """A second, independent reference that scales to 500k queries: every substring of the
    spaced text that starts and ends with a space is looked up in a dict of queries."""
    spaced = spacing(text if case_sensitive else text.lower())
    spaces = [i for i, c in enumerate(spaced) if c == " "]
    found = set()
    for a, i in enumerate(spaces):
        for j in spaces[a + 1 :]:
            found.update(index.get(spaced[i + 1 : j], ()))
    return sorted(found)


def query_index(queries, *, case_sensitive=True):
    index = {}
    for i, q in enumerate(queries):
        index.setdefault(q if case_sensitive else q.lower(), []).append(i)
    return index


def test_metaclip_semantics_exact():
    queries = ["dog", "hot dog", "Dog", "dog.", "ice cream", "cream", "a", "New York", "York"]
    m = QueryMatcher(queries)
    assert m.match("A dog.") == [0]  # "." is spaced out, so "dog" matches and "dog." never can
    assert m.match("hot dog, with ice cream!") == [0, 1, 4, 5]
    assert m.match("Dog") == [2]  # case-sensitive
    assert m.match("hotdog") == []  # whole words only
    assert m.match("dogs") == []
    assert m.match("a\tdog\nin\rNew York:") == [0, 6, 7, 8]
    assert m.match("dog`s") == [0]  # the backtick is wrapped too
    assert m.match("dog's") == []  # but not the apostrophe
    assert m.match("") == []
    assert m.match("a a a") == [6]  # overlapping occurrences, reported once


def test_case_folding_option():
    m = QueryMatcher(["Dog", "new york"], case_sensitive=False)
    assert m.match("DOG in New York") == [0, 1]
    assert QueryMatcher(["Dog", "new york"]).match("DOG in New York") == []


def test_duplicate_queries_report_every_index():
    m = QueryMatcher(["cat", "dog", "cat"])
    assert m.match("cat and dog") == [0, 1, 2]
    assert naive_match("cat and dog", ["cat", "dog", "cat"]) == [0, 1, 2]


def test_spacing_equals_metaclip():
    for text in ["a,b.c;d:e?f!g`h\ti\nj\rk", "", "...", " x ", "Mr. Smith, Esq."]:
        assert spacing(text) == metaclip_spacing(text)


def test_pickles_without_the_automaton():
    m = QueryMatcher(["dog", "cat"], case_sensitive=False)
    m2 = pickle.loads(pickle.dumps(m))
    assert m2.match("CAT") == [1]
    assert len(pickle.dumps(m)) < 200


ALPHABET = "ab ,.;:?!`\t\n\rAéß"


@settings(max_examples=400, deadline=None)
@given(
    queries=st.lists(st.text(alphabet=ALPHABET, min_size=0, max_size=5), min_size=1, max_size=30),
    texts=st.lists(st.text(alphabet=ALPHABET, max_size=40), min_size=1, max_size=10),
    case_sensitive=st.booleans(),
)
def test_equals_naive_loop_on_generated_text(queries, texts, case_sensitive):
    m = QueryMatcher(queries, case_sensitive=case_sensitive)
    for t in texts:
        assert m.match(t) == naive_match(t, queries, case_sensitive=case_sensitive)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60), queries=st.lists(st.text(max_size=8), min_size=1, max_size=8))
def test_equals_naive_loop_on_any_unicode(text, queries):
    queries = [*queries, *text.split()[:3]]  # make some matches likely
    assert QueryMatcher(queries).match(text) == naive_match(text, queries)


@settings(max_examples=400, deadline=None)
@given(
    text=st.one_of(st.text(alphabet=ALPHABET, max_size=40), st.text(max_size=60)),
    queries=st.lists(
        st.one_of(st.text(alphabet=ALPHABET, max_size=6), st.text(max_size=8)),
        min_size=1,
        max_size=20,
    ),
    case_sensitive=st.booleans(),
)
def test_pairs_reference_equals_naive_loop(text, queries, case_sensitive):
    """``pairs_reference`` (used on the real-sized list below, where the literal loop is too
    slow) is the naive loop: this closes the chain matcher == reference == naive loop."""
    queries = [*queries, *text.split()[:3], *[" ".join(text.split()[:2])]]
    index = query_index(queries, case_sensitive=case_sensitive)
    assert pairs_reference(text, index, case_sensitive=case_sensitive) == naive_match(
        text, queries, case_sensitive=case_sensitive
    )


def test_pairs_reference_exact():
    queries = ["dog", "hot dog", "", " dog", "dog.", "."]
    index = query_index(queries)
    # "." is spaced out, leaving two spaces at the end: "" matches, "dog." never can.
    assert pairs_reference("hot dog.", index) == naive_match("hot dog.", queries) == [0, 1, 2, 5]
    # Two spaces inside: "" and " dog" match, "hot dog" does not.
    assert pairs_reference("hot  dog", index) == naive_match("hot  dog", queries) == [0, 2, 3]
    assert pairs_reference("hotdog", index) == naive_match("hotdog", queries) == []


@pytest.fixture(scope="module")
def real_captions(shared_data):
    table = pq.read_table(shared_data / "laion-sample" / "laion_10000.parquet", columns=["TEXT"])
    captions = [t for t in table.column("TEXT").to_pylist() if t is not None]
    assert len(captions) >= 9_900
    return captions


@pytest.fixture(scope="module")
def real_queries(shared_data):
    """A real-sized list: wordfreq's English list (320k words) plus 50k Wikipedia titles."""
    from wordfreq import top_n_list

    words = top_n_list("en", 500_000, wordlist="large")
    titles = [
        line.strip().removeprefix("/wiki/").replace("_", " ")
        for line in (shared_data / "wikipedia" / "vital_article_links.txt").open()
        if line.strip()
    ]
    queries = words + titles
    assert len(queries) > 350_000
    return queries


def test_equals_references_on_real_captions_and_real_sized_list(real_captions, real_queries):
    """The matcher equals ``pairs_reference`` on all 10,000 LAION captions against a 370k list
    (and ``pairs_reference`` equals the naive loop: ``test_pairs_reference_equals_naive_loop``),
    and the literal naive loop itself on a sample of 20 captions."""
    m = QueryMatcher(real_queries)
    index = query_index(real_queries)
    matched = 0
    for text in real_captions:
        got = m.match(text)
        assert got == pairs_reference(text, index), text
        matched += bool(got)
    assert matched > 0.8 * len(real_captions)
    # The literal loop over every query is slow (~40 ms per caption at this size): a sample.
    for text in random.Random(0).sample(real_captions, 20):
        assert m.match(text) == naive_match(text, real_queries), text


def test_case_folded_equals_reference_on_real_captions(real_captions, real_queries):
    m = QueryMatcher(real_queries[:100_000], case_sensitive=False)
    index = query_index(real_queries[:100_000], case_sensitive=False)
    for text in real_captions[:3000]:
        assert m.match(text) == pairs_reference(text, index, case_sensitive=False), text


@pytest.fixture(scope="module")
def warc_alt_texts(shared_data):
    from wit_pipeline.stages.gather.readers import iter_file_batches

    path = shared_data / "warc" / "cc-main-2020-34-excerpt.warc.gz"
    alts = [c for batch in iter_file_batches(str(path)) for c in batch.captions if c]
    assert len(alts) == 32
    return alts


def test_equals_naive_loop_on_real_warc_alt_texts(warc_alt_texts):
    """A small list built from the alt texts themselves, so that most words match."""
    alts = warc_alt_texts
    queries = sorted({w for a in alts for w in a.split()} | {"the", "Яндекс", "Метрика"})
    m = QueryMatcher(queries)
    for a in alts:
        assert m.match(a) == naive_match(a, queries)


def test_real_warc_alt_texts_against_the_shipped_list(warc_alt_texts):
    """Every WARC alt text against the shipped 454k-entry list: the matcher equals
    ``pairs_reference`` and the literal naive loop (~0.25 s per alt text at this size)."""
    from wit_pipeline import queries as queries_lib

    shipped = queries_lib.load_queries(str(ROOT / "queries" / "wit-queries-en.txt.gz"))
    assert len(shipped) == 454_124
    m = QueryMatcher(shipped)
    index = query_index(shipped)
    found = []
    for a in warc_alt_texts:
        got = m.match(a)
        assert got == pairs_reference(a, index) == naive_match(a, shipped), a
        found.append(len(got))
    # The excerpt's alt texts are mostly file names and logos: 8 of 32 match something.
    assert sum(1 for n in found if n) == 8


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab ,.;:?!`\t\n\r\u00e9")), max_size=30))
def test_spacing_equals_one_translate_pass(text):
    table = str.maketrans(
        {**{p: f" {p} " for p in PUNCTUATION_TO_WRAP}, **{c: " " for c in CHARS_TO_SPACE}}
    )
    assert spacing(text) == f" {text} ".translate(table)
