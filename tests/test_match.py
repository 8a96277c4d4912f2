"""QueryMatcher: MetaCLIP's substring semantics, equal to the naive loop on every input."""

import pickle
import random

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wit_pipeline.match import QueryMatcher, naive_match, spacing


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


def test_equals_naive_loop_on_real_warc_alt_texts(shared_data):
    from wit_pipeline.readers import warc

    pairs = [
        p
        for batch in warc.iter_batches(
            str(shared_data / "warc" / "cc-main-2020-34-excerpt.warc.gz")
        )
        for p in zip(batch.urls, batch.captions, strict=True)
    ]
    alts = [c for _, c in pairs if c]
    assert len(alts) >= 25
    queries = sorted({w for a in alts for w in a.split()} | {"the", "Яндекс", "Метрика"})
    m = QueryMatcher(queries)
    for a in alts:
        assert m.match(a) == naive_match(a, queries)
