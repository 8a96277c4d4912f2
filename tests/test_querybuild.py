"""The query list builder: each source's parser on real files, the merge and cap exactly, the
Beam counting against the plain-Python counting, and the shipped default list."""

from __future__ import annotations

import bz2
import collections
import gzip
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest

from wit_pipeline import cli, config, counters, fileio, queries
from wit_pipeline.errors import WitError
from wit_pipeline.queries import (
    build,
    default,
    merge,
    ngrams,
    pipeline,
    reading,
    text,
    titles,
    wikipedia,
    wordnet,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def wordnet_dir() -> str:
    """Debian's WordNet 3.0 files; skips when absent, fails in CI (like ``shared_data``)."""
    path = os.environ.get("WIT_WORDNET_DIR", wordnet.DEFAULT_WORDNET_DIR)
    if not os.path.exists(os.path.join(path, "data.noun")):
        msg = (
            f"WordNet 3.0 database not found in {path}: apt-get install wordnet-base "
            "wordnet-sense-index (or set WIT_WORDNET_DIR)"
        )
        if os.environ.get("WIT_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def excerpt() -> str:
    """The real English Wikipedia dump excerpt shipped in the gensim wheel (206 pages)."""
    pytest.importorskip("gensim")
    return default.gensim_dump_path()


@pytest.fixture(scope="session")
def excerpt_xml(excerpt) -> bytes:
    with open(excerpt, "rb") as f:
        return bz2.decompress(f.read())


# ---------------------------------------------------------------------------------------------
# Wikitext and tokens


def test_clean_wikitext_removes_markup_and_keeps_prose():
    wikitext = (
        "{{Infobox dog|name={{nowrap|Golden Retriever}}|image=x.jpg}}\n"
        "The '''Golden Retriever''' is a [[dog breed|breed]] of [[Scotland|Scottish]] origin."
        '<ref name="a">{{cite web|url=http://x}}</ref> It was bred<!-- comment --> for '
        "[[hunting]]s.\n"
        "[[File:Golden.jpg|thumb|A [[puppy]] in snow]]\n"
        "== History ==\n"
        '{| class="wikitable"\n|-\n| cell || cell2\n|}\n'
        "* It likes [http://example.com water] and&nbsp;ice cream.\n"
        "[[Category:Dog breeds]]\n"
        "[[de:Golden Retriever]]"
    )
    assert wikipedia.clean_wikitext(wikitext) == (
        "\nThe Golden Retriever is a breed of Scottish origin. It was bred for huntings.\n"
        "\nHistory\nIt likes water and ice cream.\n\n"
    )


def test_unclosed_template_drops_the_rest():
    assert wikipedia.clean_wikitext("kept text {{broken|template and more") == "kept text "


def test_segment_tokens_only_pairs_words_separated_by_spaces():
    # A bigram query "hot dog" matches space-padded text only where the words are separated by
    # a space, so "Hot-dog" and "U.S." never pair across their punctuation.
    assert ngrams.segment_tokens("Hot-dog stands sell the hot dog’s bun; U.S. hot  dogs") == [
        ["hot"],
        ["dog", "stands", "sell", "the", "hot", "dog's", "bun"],
        ["u"],
        ["s"],
        ["hot", "dogs"],
    ]


def test_count_ngrams_exact():
    uni, bi = collections.Counter(), collections.Counter()
    n = ngrams.count_ngrams(["A b a b c.", "c, a"], uni, bi)
    assert n == 7
    assert uni == {"a": 3, "b": 2, "c": 2}
    assert bi == {"a b": 2, "b a": 1, "b c": 1}


# ---------------------------------------------------------------------------------------------
# Dump reading


def test_real_dump_excerpt_pages(excerpt):
    pages = list(wikipedia.iter_pages(excerpt))
    reasons = collections.Counter(wikipedia.page_reason(p) for p in pages)
    assert len(pages) == 206
    assert reasons == {None: 106, "redirect": 99, "namespace": 1}
    anarchism = next(p for p in pages if p.title == "Anarchism")
    assert anarchism.ns == 0 and not anarchism.redirect
    plain = wikipedia.clean_wikitext(anarchism.text)
    assert "Anarchism is a political philosophy" in plain
    for markup in ("{{", "}}", "[[", "]]", "'''", "<ref", "http"):
        assert markup not in plain
    counter = collections.Counter()
    uni, bi = collections.Counter(), collections.Counter()
    wikipedia.count_pages(pages, uni, bi, counter)
    assert counter == {
        "input": 206,
        "kept": 106,
        "dropped:redirect": 99,
        "dropped:namespace": 1,
        "tokens": sum(uni.values()),
    }


@pytest.mark.parametrize("layout", ["single", "multistream", "unaligned"])
def test_byte_range_splits_yield_every_page_exactly_once(tmp_path, excerpt, excerpt_xml, layout):
    if layout == "single":
        path = excerpt
    else:
        path = str(tmp_path / f"{layout}.xml.bz2")
        if layout == "multistream":
            data = wikipedia.multistream_bytes(excerpt_xml, pages_per_stream=10)
        else:  # pbzip2-like: streams cut at arbitrary bytes, pages cross stream boundaries
            data = b"".join(
                bz2.compress(excerpt_xml[k : k + 50_000])
                for k in range(0, len(excerpt_xml), 50_000)
            )
        with open(path, "wb") as f:
            f.write(data)
    whole = list(wikipedia.iter_page_fragments(path))
    assert len(whole) == 206
    size = os.path.getsize(path)
    for split_bytes in (20_000, 100_000, 10**9):
        splits = wikipedia.plan_splits(path, size, split_bytes)
        got = [frag for p, s, e in splits for frag in wikipedia.iter_split_pages(p, s, e)]
        assert got == whole, (layout, split_bytes)
    if layout == "multistream":
        # Every range of a multistream file does its share of the work.
        per_split = [
            len(list(wikipedia.iter_split_pages(p, s, e)))
            for p, s, e in wikipedia.plan_splits(path, size, 200_000)
        ]
        assert len(per_split) == 9 and sum(per_split) == 206
        assert sum(1 for n in per_split if n) >= 7


def test_truncated_dump_is_an_error(tmp_path, excerpt):
    with open(excerpt, "rb") as f:
        data = f.read()
    path = tmp_path / "cut.xml.bz2"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WitError, match="truncated"):
        list(wikipedia.iter_page_fragments(str(path)))
    (tmp_path / "plain.xml.bz2").write_bytes(b"<mediawiki><page><title>x</title></page>")
    with pytest.raises(WitError, match="not a bzip2 file"):
        list(wikipedia.iter_split_pages(str(tmp_path / "plain.xml.bz2"), 0, 100))


# ---------------------------------------------------------------------------------------------
# Unigrams and bigrams


def test_select_unigrams_reasons_and_order():
    counter = collections.Counter()
    kept = ngrams.select_unigrams(
        {"dog": 500, "cat": 500, "zebu": 99, "1984": 900, "u.s": 800, "x" * 41: 1000, "": 7},
        min_count=100,
        max_chars=40,
        counter=counter,
    )
    assert kept == [("cat", 500), ("dog", 500)]
    assert counter == {
        "input": 7,
        "kept": 2,
        "dropped:below_min_count": 1,
        "dropped:no_letter": 1,
        "dropped:not_a_word": 2,
        "dropped:too_long": 1,
    }


def test_score_bigrams_pmi_exact():
    uni, bi = collections.Counter(), collections.Counter()
    n = ngrams.count_ngrams(["a b a b c", "1 2"], uni, bi)
    counter = collections.Counter()
    kept = ngrams.score_bigrams(bi, uni, n, min_count=1, min_pmi=1.0, counter=counter)
    # N = 7: pmi(a b) = log2(2 * 7 / (2 * 2)), pmi(b c) = log2(1 * 7 / (2 * 1)),
    # pmi(b a) = log2(1 * 7 / (2 * 2)) < 1.
    assert [(b, c) for b, _, c in kept] == [("a b", 2), ("b c", 1)]
    assert kept[0][1] == pytest.approx(math.log2(3.5))
    assert kept[1][1] == pytest.approx(math.log2(3.5))
    assert counter == {"input": 4, "kept": 2, "dropped:below_min_pmi": 1, "dropped:no_letter": 1}
    assert ngrams.max_pmi(4_500_000_000, 100) == pytest.approx(25.42, abs=0.01)


def test_parse_count_table_formats():
    table = ngrams.parse_count_table(["the;175", "dog\t20", "hot dog 3", ";9", "dog;1"])
    assert table == {"the": 175, "dog": 21, "hot dog": 3, "": 9}
    with pytest.raises(WitError, match="expected 'word<TAB>count'"):
        ngrams.parse_count_table(["dog;many"], source="t.txt")


# ---------------------------------------------------------------------------------------------
# Titles


def test_pageview_file_in_the_real_format(tmp_path):
    # Hourly pageview files: "<domain_code> <page_title> <count_views> <total_response_size>".
    lines = [
        "en Golden_retriever 120 0",
        "en.m Golden_retriever 30 0",
        "en golden_retriever 5 0",  # same page: MediaWiki upper-cases the first letter
        "en Caf%C3%A9 80 0",
        "en Special:Search 9999 0",
        "en Talk:Dog 50 0",
        "de Golden_Retriever 500 0",
        "en Main_Page 100000 0",
        "en - 12 0",
        "en Mercury_(planet) 300 0",
        "en List_of_dog_breeds 400 0",
        "en Rare_page 3 0",
        "en Broken 12",
        "en Also_broken x 0",
    ]
    path = tmp_path / "pageviews-20240101-000000.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    counter = collections.Counter()
    views = titles.sum_pageviews(
        reading.read_lines(str(path)), projects=("en", "en.m"), counter=counter
    )
    assert views == {
        "Golden retriever": 155,
        "Café": 80,
        "Mercury (planet)": 300,
        "List of dog breeds": 400,
        "Rare page": 3,
    }
    assert counter == {
        "input": 14,
        "kept": 7,
        "dropped:namespace": 2,
        "dropped:other_project": 1,
        "dropped:main_page": 1,
        "dropped:empty_title": 1,
        "dropped:malformed": 2,
    }
    sel = collections.Counter()
    kept = titles.select_titles(
        views.items(),
        min_views=70,
        strip_disambiguation=True,
        drop_list_pages=True,
        counter=sel,
    )
    assert kept == [("Mercury", 300), ("Golden retriever", 155), ("Café", 80)]
    assert sel == {"input": 5, "kept": 3, "dropped:below_min_views": 1, "dropped:list_page": 1}


def test_real_titles_list(shared_data):
    counter = collections.Counter()
    path = shared_data / "wikipedia" / "vital_article_links.txt"
    got = titles.read_title_list(reading.read_lines(str(path)), counter)
    assert counter == {"input": 50851, "kept": 49952, "dropped:namespace": 899}
    names = [t for t, _ in got]
    assert names[:3] == ["Vishnu Sharma", "Aesop", "Apuleius"]
    for title in ("Sei Shōnagon", "Ibn al-Muqaffa'", "François de La Rochefoucauld (writer)"):
        assert title in names


# ---------------------------------------------------------------------------------------------
# WordNet


def test_wordnet_data_line_parsing():
    lines = [
        "  1 This software and database is being provided to you, the LICENSEE, by  ",
        "00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | existing in "
        'abundance; "abounding confidence"; "whiskey galore"  ',
        # Real lines of Debian's data.adj and data.noun (WordNet 3.0).
        "07697537 13 n 03 hotdog 2 hot_dog 2 red_hot 0 004 @ 07695965 n 0000 %p 07676602 n 0000 "
        "%p 07690019 n 0000 ~ 07865105 n 0000 | a frankfurter served hot on a bun  ",
    ]
    synsets = list(wordnet.iter_wordnet_synsets(lines))
    assert [(s.offset, s.pos, s.lemmas) for s in synsets] == [
        (14358, "s", ("abounding", "galore")),
        (7697537, "n", ("hotdog", "hot dog", "red hot")),
    ]
    assert synsets[1].gloss == "a frankfurter served hot on a bun"
    counter = collections.Counter()
    assert wordnet.wordnet_entries(synsets, lemmas="first", counter=counter) == [
        "abounding",
        "hotdog",
    ]
    assert counter == {"synsets": 2, "input": 5, "kept": 2, "dropped:not_first_lemma": 3}
    with pytest.raises(WitError, match="not a WordNet data line"):
        list(wordnet.iter_wordnet_synsets(["00001 00 n zz dog 0 | x"], source="data.noun"))


def test_real_wordnet_files(wordnet_dir):
    synsets = wordnet.read_wordnet(wordnet_dir)
    assert len(synsets) == 117_659  # WordNet 3.0: 82,115 + 13,767 + 18,156 + 3,621
    counter = collections.Counter()
    entries = wordnet.wordnet_entries(synsets, lemmas="all", counter=counter)
    assert counter == {"synsets": 117_659, "input": 206_978, "kept": 206_978}
    unique = set(entries)
    assert len(unique) == 148_730
    for lemma in ("golden retriever", "hot dog", "ice cream", "dog", "Albert Einstein"):
        assert lemma in unique
    assert not any("_" in e or e.endswith(("(a)", "(p)", "(ip)")) for e in unique)
    assert wordnet.wordnet_version(wordnet_dir) == "WordNet 3.0"


# ---------------------------------------------------------------------------------------------
# Merge, cap, write


def test_merge_priority_dedup_and_cap():
    result = merge.merge_sources(
        {
            # Past the cap: "Zebra" and "Hot dog" repeat, "dog" repeats a kept entry.
            "titles": ["Paris", "Dog", "Hot dog", "Zebra", "Zebra", "Hot dog", "dog", "Zebra"],
            "wordnet": ["dog", "hot  dog", "Paris", "dog"],
            "unigrams": ["dog", "cat", " ", "bird"],
        },
        priority=("wordnet", "unigrams", "bigrams", "titles"),
        max_queries=6,
    )
    assert result.queries == ["dog", "hot dog", "Paris", "cat", "bird", "Dog"]
    assert result.counters == {
        "wordnet": {"input": 4, "kept": 3, "dropped:duplicate": 1},
        "unigrams": {"input": 4, "kept": 2, "dropped:duplicate": 1, "dropped:empty": 1},
        "titles": {"input": 8, "kept": 1, "dropped:duplicate": 5, "dropped:over_cap": 2},
    }
    # Each distinct entry past the cap is over_cap once; its repeats are duplicates, so the
    # manifest's after_dedup (distinct new entries, before the cap) is not overstated.
    capped = merge.merge_sources(
        {"wordnet": ["a"], "titles": ["X", "X", "X", "Y"]},
        priority=("wordnet", "titles"),
        max_queries=1,
    )
    assert capped.queries == ["a"]
    assert capped.counters["titles"] == {
        "input": 4,
        "dropped:duplicate": 2,
        "dropped:over_cap": 2,
    }
    manifest = merge.build_manifest(
        list_path="q.txt.gz",
        result=capped,
        sha256="0" * 64,
        cfg=config.QueriesConfig(priority=("wordnet", "titles"), max_queries=1),
        sources={},
        command="",
        created="",
    )
    assert {k: v["after_dedup"] for k, v in manifest["sources"].items()} == {
        "wordnet": 1,
        "titles": 2,
    }
    lower = merge.merge_sources(
        {"wordnet": ["Paris", "paris", "Hot Dog"]},
        priority=("wordnet",),
        max_queries=10,
        case="lower",
    )
    assert lower.queries == ["paris", "hot dog"]
    with pytest.raises(WitError, match="missing from the priority"):
        merge.merge_sources({"titles": ["x"]}, priority=("wordnet",), max_queries=1)
    # queries.case, queries.priority and queries.max_queries are checked by QueriesConfig
    with pytest.raises(WitError, match=r"^config: queries\.case \(--case\) must be one of"):
        config.QueriesConfig(case="upper")


def test_write_query_list_is_reproducible_and_loadable(tmp_path):
    path = str(tmp_path / "q.txt.gz")
    sha = merge.write_query_list(path, ["dog", "hot dog", "Café"])
    first = (tmp_path / "q.txt.gz").read_bytes()
    assert merge.write_query_list(path, ["dog", "hot dog", "Café"]) == sha
    assert (tmp_path / "q.txt.gz").read_bytes() == first  # no timestamp in the gzip header
    assert queries.load_queries(path) == ["dog", "hot dog", "Café"]
    assert queries.queries_sha256(path) == sha
    assert merge.manifest_path(path) == str(tmp_path / "q.json")
    with pytest.raises(WitError, match="invalid query"):
        merge.write_query_list(path, ["two\nlines"])


# ---------------------------------------------------------------------------------------------
# Plain-text corpora (--text)

# Two real entries of GCIDE (Debian dict-gcide 0.48.5+nmu2, /usr/share/dictd/gcide.dict.dz).
GCIDE_ENTRIES = """Affear \\Af*fear"\\, v. t. [OE. aferen, AS. [=a]f?ran. See
   {Afeard}.]
   To frighten. [Obs.] --Spenser.
   [1913 Webster]

Bald eagle \\Bald" ea"gle\\ (Zool.)
   The white-headed eagle ({Hali[ae]etus leucocephalus}) of
   America. The young, until several years old, lack the white
   feathers on the head.
   [1913 Webster]

Abandum \\A*ban"dum\\ ([.a]*b[a^]n"d[u^]m), n. [LL. See
   {Abandon}.] (Law)
   Anything forfeited or confiscated.
   [1913 Webster]
"""


def test_dictd_paragraphs_without_markup(tmp_path):
    path = tmp_path / "gcide.dict.dz"
    path.write_bytes(gzip.compress(GCIDE_ENTRIES.encode()))
    got = [" ".join(p.split()) for p in text.iter_text_paragraphs(str(path))]
    assert got == [
        "Affear , v. t. To frighten.",
        # The parenthesis after a pronunciation is taken for a respelling, a label here.
        "Bald eagle The white-headed eagle (Haliaeetus leucocephalus) of America. The "
        "young, until several years old, lack the white feathers on the head.",
        "Abandum , n. (Law) Anything forfeited or confiscated.",
    ]
    uni, bi, counter = collections.Counter(), collections.Counter(), collections.Counter()
    text.count_text(str(path), uni, bi, counter)
    assert counter == {"paragraphs": 3, "tokens": 5 + 23 + 7}
    # No pair from the markup ("1913 webster"); hard-wrapped lines pair across the break.
    assert bi["1913 webster"] == 0 and bi["white feathers"] == 1 and bi["of america"] == 1


def test_text_paragraphs_join_wrapped_lines(tmp_path, monkeypatch):
    path = tmp_path / "fortunes.gz"
    content = "A hot dog\nstand.\n\n\n%\nIce cream  \n  truck\r\n"
    path.write_bytes(gzip.compress(content.encode()))
    assert list(text.iter_text_paragraphs(str(path))) == [
        "A hot dog stand.",
        "% Ice cream     truck",
    ]
    uni, bi, counter = collections.Counter(), collections.Counter(), collections.Counter()
    text.count_text(str(path), uni, bi, counter)
    assert counter == {"paragraphs": 2, "tokens": 7}
    assert bi == {"a hot": 1, "hot dog": 1, "dog stand": 1, "ice cream": 1, "cream truck": 1}
    # Without blank lines a paragraph is cut at a line end once it reaches the bound.
    monkeypatch.setattr(text, "MAX_PARAGRAPH_CHARS", 12)
    plain = tmp_path / "docs.txt"
    plain.write_text("one two\nthree four\nfive\n")
    assert list(text.iter_text_paragraphs(str(plain))) == ["one two three four", "five"]


def test_beam_build_with_text_matches_plain_counting(tmp_path, excerpt):
    # Real text: the Lee news corpus in the gensim wheel (299 articles, one per line).
    lee = os.path.join(os.path.dirname(excerpt), "lee_background.cor")
    cfg = config.apply_overrides(config.BuildConfig(), ["queries.bigrams.min_count=5"]).queries
    out = str(tmp_path / "q.txt.gz")
    inputs = build.BuildInputs(dumps=(excerpt,), texts=(lee,))
    manifest = build.build(inputs, cfg, output=out, command="test", log=lambda *_: None)

    # Plain-Python reference: the text joins the bigram corpus, not the unigram source.
    uni, bi, pages = collections.Counter(), collections.Counter(), collections.Counter()
    wikipedia.count_pages(wikipedia.iter_pages(excerpt), uni, bi, pages)
    want_uni = ngrams.select_unigrams(
        uni, min_count=100, max_chars=40, counter=collections.Counter()
    )
    text_counts = collections.Counter()
    text.count_text(lee, uni, bi, text_counts)
    n_tokens = pages["tokens"] + text_counts["tokens"]
    assert n_tokens == sum(uni.values())
    want_bi = ngrams.score_bigrams(
        bi, uni, n_tokens, min_count=5, min_pmi=8.0, counter=collections.Counter()
    )
    work = str(tmp_path / "q.work")
    got_uni = pipeline.read_candidates(os.path.join(work, "unigrams.tsv.gz"))
    got_bi = pipeline.read_candidates(os.path.join(work, "bigrams.tsv.gz"))
    assert [(w, int(c)) for w, c in got_uni] == want_uni
    assert [(b, int(c)) for b, _, c in got_bi] == [(b, c) for b, _, c in want_bi]
    stats = counters.split_scopes(fileio.read_json(os.path.join(work, "stats.json"))["counters"])
    assert stats["text"] == {
        "paragraphs": text_counts["paragraphs"],
        "tokens": text_counts["tokens"],
    }
    assert stats["corpus"] == {"tokens": pages["tokens"]}

    doc = manifest["sources"]["bigrams"]
    assert doc["tokens"] == n_tokens and doc["candidates"] == len(want_bi)
    assert doc["inputs"][-1] == {
        "kind": "text",
        "files": [{"path": lee, "kind": "text", "size": os.path.getsize(lee), "format": "text"}],
        "paragraphs": text_counts["paragraphs"],
        "tokens": text_counts["tokens"],
    }
    assert manifest["sources"]["unigrams"]["inputs"][0]["corpus_tokens"] == pages["tokens"]
    # Text seen by the bigrams only: a pair of the news corpus is a candidate.
    from_text = {b for b, _, _ in want_bi} - set(_plain_bigrams(excerpt))
    assert {"tora bora", "gaza strip", "asylum seekers"} <= from_text


def _plain_bigrams(dump: str) -> list[str]:
    uni, bi, pages = collections.Counter(), collections.Counter(), collections.Counter()
    wikipedia.count_pages(wikipedia.iter_pages(dump), uni, bi, pages)
    rows = ngrams.score_bigrams(
        bi, uni, pages["tokens"], min_count=5, min_pmi=8.0, counter=collections.Counter()
    )
    return [b for b, _, _ in rows]


# ---------------------------------------------------------------------------------------------
# The Beam pipeline against the plain-Python counting


def test_beam_build_matches_plain_counting(tmp_path, excerpt, excerpt_xml):
    dump = tmp_path / "enwiki-20160101-pages-articles-multistream.xml.bz2"
    dump.write_bytes(wikipedia.multistream_bytes(excerpt_xml, pages_per_stream=10))
    views = tmp_path / "pageviews-20240101-000000.gz"
    views.write_bytes(
        gzip.compress(b"en Golden_retriever 120 0\nen.m Hot_dog 90 0\nen Rare 1 0\nxx\n")
    )
    cfg = config.apply_overrides(
        config.BuildConfig(),
        ["queries.bigrams.min_count=5", "queries.split_bytes=150000", "queries.batch_pages=16"],
    ).queries
    out = str(tmp_path / "out" / "q.txt.gz")
    work = str(tmp_path / "out" / "q.work")
    inputs = build.BuildInputs(dumps=(str(dump),), pageviews=(str(views),))
    # Count first with a tiny flush size (partial counts leave the DoFn many times per bundle),
    # then build: the build finds the completed counts and only merges.
    fingerprint = build._fingerprint(inputs, cfg, {"dumps": [str(dump)], "pageviews": [str(views)]})
    pipeline.run_counting_pipeline(
        dump_files=[str(dump)],
        pageview_files=[str(views)],
        cfg=cfg,
        work_dir=work,
        fingerprint=fingerprint,
        max_keys=500,
    )
    logs: list[str] = []
    manifest = build.build(inputs, cfg, output=out, command="test", log=logs.append)
    assert any("not recounting" in line for line in logs)

    # Plain-Python reference over the original single-stream file.
    uni, bi, pages = collections.Counter(), collections.Counter(), collections.Counter()
    wikipedia.count_pages(wikipedia.iter_pages(excerpt), uni, bi, pages)
    n_tokens = pages.pop("tokens")
    want_uni = ngrams.select_unigrams(
        uni, min_count=100, max_chars=40, counter=collections.Counter()
    )
    want_bi = ngrams.score_bigrams(
        bi, uni, n_tokens, min_count=5, min_pmi=8.0, counter=collections.Counter()
    )
    got_uni = pipeline.read_candidates(os.path.join(work, "unigrams.tsv.gz"))
    got_bi = pipeline.read_candidates(os.path.join(work, "bigrams.tsv.gz"))
    assert [(w, int(c)) for w, c in got_uni] == want_uni
    assert [(b, c) for b, _, c in map(tuple, got_bi)] == [(b, str(c)) for b, _, c in want_bi]
    assert [float(s) for _, s, _ in got_bi] == pytest.approx([s for _, s, _ in want_bi], abs=1e-6)

    marker = fileio.read_json(os.path.join(work, "stats.json"))
    assert marker["rows"] == {"bigrams": len(want_bi), "titles": 2, "unigrams": len(want_uni)}
    stats = counters.split_scopes(marker["counters"])

    assert stats["pages"] == {
        "input": 206,
        "kept": 106,
        "dropped:namespace": 1,
        "dropped:redirect": 99,
    }
    assert stats["corpus"] == {"tokens": n_tokens}
    assert stats["pageview_lines"] == {"input": 4, "kept": 3, "dropped:malformed": 1}
    assert stats["titles"] == {"input": 3, "kept": 2, "dropped:below_min_views": 1}
    assert stats["bigrams"]["kept"] == len(want_bi)

    got = queries.load_queries(out)
    assert (
        manifest["total"] == len(got)
        and queries.queries_sha256(out) == manifest["queries"]["sha256"]
    )
    assert [merge.normalize_query(q) for q in got] == got
    assert len(set(got)) == len(got)
    # Titles keep Wikipedia's casing; words are lower case: "Hot dog" and "hot" are both kept.
    assert manifest["sources"]["titles"]["in_list"] == 2
    assert got[: len(want_uni)] == [w for w, _ in want_uni]
    assert got[-2:] == ["Golden retriever", "Hot dog"]
    assert manifest["skipped_sources"] == ["wordnet"]

    # A rerun with the same inputs reuses the counts; a missing candidate file forces a recount.
    os.remove(os.path.join(work, "bigrams.tsv.gz"))
    assert not build._counts_current(work, fingerprint)


# ---------------------------------------------------------------------------------------------
# The shipped default list

EVERYDAY = ("dog", "cat", "car", "house", "beach", "tree", "red", "water", "woman", "running")
MULTIWORD = ("golden retriever", "hot dog", "ice cream", "teddy bear", "fire engine")


def test_shipped_default_list():
    path = queries.default_queries_path()
    assert os.path.getsize(path) < 5 * 1024 * 1024
    entries = queries.load_queries(path)
    assert 400_000 <= len(entries) <= 500_000
    assert len(set(entries)) == len(entries)
    assert all(q == merge.normalize_query(q) for q in entries)
    present = set(entries)
    for q in EVERYDAY + MULTIWORD:
        assert q in present, q
    manifest = fileio.read_json(merge.manifest_path(path))
    assert manifest["total"] == manifest["queries"]["count"] == len(entries)
    assert manifest["queries"]["sha256"] == queries.queries_sha256(path)
    assert set(manifest["sources"]) == {"wordnet", "unigrams", "bigrams", "titles"}
    assert sum(s["in_list"] for s in manifest["sources"].values()) == len(entries)
    # Nothing from ../shared is named by a machine path in the committed manifest.
    dumped = json.dumps(manifest)
    assert "/work/" not in dumped and "site-packages" not in dumped


def test_build_default_reproduces_the_shipped_list(tmp_path, shared_data, wordnet_dir, excerpt):
    pytest.importorskip("pywordfreq")
    titles = str(shared_data / default.VITAL_ARTICLES)
    manifest = default.build_default(
        output_dir=str(tmp_path),
        wordnet_dir=wordnet_dir,
        titles=titles,
        titles_name=f"$WIT_SHARED_DATA/{default.VITAL_ARTICLES}",
        command="wit queries build-default --output queries/",
        log=lambda *_: None,
    )
    built = tmp_path / default.DEFAULT_LIST_NAME
    shipped = queries.default_queries_path()
    assert gzip.decompress(built.read_bytes()) == queries.read_query_bytes(shipped)
    want = fileio.read_json(merge.manifest_path(shipped))
    for doc in (manifest, want):
        doc.pop("created")
    assert manifest == want


# ---------------------------------------------------------------------------------------------
# Command line


def _wit(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wit_pipeline", *args], capture_output=True, text=True, cwd=cwd
    )


def test_cli_info_in_a_subprocess():
    proc = _wit("queries", "info")
    assert proc.returncode == 0, proc.stderr
    digest = hashlib.sha256(queries.read_query_bytes(queries.default_queries_path()))
    assert digest.hexdigest() in proc.stdout
    assert "| wordnet |" in proc.stdout


def test_cli_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "q.txt.gz")
    assert cli.main(["queries", "build", "--output", out]) == 2
    assert capsys.readouterr().err == "wit: error: no query source has an input: nothing to build\n"
    assert cli.main(["queries", "build", "--output", out, "--dump", "nope*.bz2"]) == 2
    assert capsys.readouterr().err == "wit: error: input not found: nope*.bz2\n"
    assert cli.main(["queries", "build", "--output", out, "--set", "queries.nope=1"]) == 2
    assert capsys.readouterr().err == "wit: error: config: unknown option nope\n"


def test_cli_build_from_title_list(tmp_path, capsys):
    (tmp_path / "titles.txt").write_text(
        "/wiki/Golden_retriever\nhttps://en.wikipedia.org/wiki/Caf%C3%A9#History\n"
        "Wikipedia:About\nMercury_(planet)\nList_of_dogs\n\n# a comment\n"
    )
    out = tmp_path / "q.txt"
    args = ["queries", "build", "--output", str(out), "--titles", str(tmp_path / "titles.txt")]
    assert cli.main(args) == 0
    assert "| **total** | | | **3** |" in capsys.readouterr().out
    assert out.read_text() == "Golden retriever\nCafé\nMercury\n"
    manifest = json.loads((tmp_path / "q.json").read_text())
    assert manifest["sources"]["titles"]["counters"] == {
        "lines": {"input": 5, "kept": 4, "dropped:namespace": 1},
        "select": {"input": 4, "kept": 3, "dropped:list_page": 1},
    }
    assert manifest["skipped_sources"] == ["wordnet", "unigrams", "bigrams"]
    assert manifest["command"].startswith("wit ")


def test_pipeline_script_in_a_subprocess(tmp_path):
    """pipelines/build_queries.py end to end: the Beam counting of a --text file, a title list,
    the list and its manifest."""
    (tmp_path / "corpus.txt").write_text(
        "hot dog stand\n\nhot dog cart\n\nice cream truck\nice cream cone\n"
    )
    (tmp_path / "titles.txt").write_text("Golden_retriever\n")
    out = tmp_path / "q.txt"
    script = os.path.join(ROOT, "pipelines", "build_queries.py")
    args = ["--output", str(out), "--text", str(tmp_path / "corpus.txt")]
    args += ["--titles", str(tmp_path / "titles.txt")]
    args += ["--bigram-min-count", "2", "--bigram-min-pmi", "2"]
    env = {**os.environ, "PYTHONPATH": ROOT}  # this checkout, not an installed copy
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "| **total** | | | **3** |" in proc.stdout
    # 12 tokens in 3 paragraphs; "hot dog" and "ice cream" occur twice: PMI log2(2*12/(2*2)).
    assert out.read_text() == "hot dog\nice cream\nGolden retriever\n"
    manifest = json.loads((tmp_path / "q.json").read_text())
    assert manifest["command"] == "python " + " ".join([script, *args])
    assert manifest["skipped_sources"] == ["wordnet", "unigrams"]
    bigrams = manifest["sources"]["bigrams"]
    assert bigrams["counters"] == {"input": 7, "kept": 2, "dropped:below_min_count": 5}
    assert bigrams["inputs"][0]["paragraphs"] == 3 and bigrams["tokens"] == 12
    assert bigrams["thresholds"]["max_possible_pmi"] == round(math.log2(6), 3)
    stats = json.loads((tmp_path / "q.work" / "stats.json").read_text())
    assert stats["counters"]["text/tokens"] == 12 and stats["rows"] == {"bigrams": 2}


def test_pipeline_translates_with_every_dofn_pickled(tmp_path):
    """What Dataflow does first: translate the graph, pickling each DoFn with its config."""
    import apache_beam as beam
    from apache_beam.internal import pickler

    dump = tmp_path / "enwiki-20240101-pages-articles1.xml.bz2"
    dump.write_bytes(bz2.compress(b"<mediawiki></mediawiki>"))
    p = beam.Pipeline()  # translated, never run
    counted = p | pipeline.CountWikipediaNgrams(
        files=[str(dump)], split_bytes=1 << 20, batch_pages=8
    )
    _ = counted | pipeline.ScoreBigrams(min_count=5, min_pmi=8.0)
    _ = counted[pipeline.UNIGRAMS] | pipeline.SelectUnigrams(min_count=100, max_chars=40)
    _ = p | pipeline.SumPageviews(files=["x.gz"], projects=("en",), min_views=70)
    _ = p | pipeline.CountTextNgrams(files=["x.txt"], batch_paragraphs=64)
    proto = p.to_runner_api()
    payloads = [
        t.spec.payload
        for t in proto.components.transforms.values()
        if t.spec.urn.endswith("pardo:v1")
    ]
    assert len(payloads) >= 10
    for fn in (
        pipeline._CountNgramsFn(bigrams=True),
        pipeline._CountNgramsFn(bigrams=True, wikitext=False, tokens_counter="text/tokens"),
        pipeline._SelectUnigramsFn(min_count=100, max_chars=40),
        pipeline._ScoreBigramsFn(8.0),
    ):
        assert type(pickler.loads(pickler.dumps(fn))) is type(fn)
