"""Opt-out signals: header and meta parsing, page-level opt-outs at gather (WARC and WAT
fixtures, exact rows and counters), TDMRep's file format and matching."""

from __future__ import annotations

import json

import crawl_fixtures as cf
import pyarrow.parquet as pq
import pytest

from wit_pipeline import optout, stage
from wit_pipeline.config import CaptionConfig, GatherConfig
from wit_pipeline.stages.download import tdmrep
from wit_pipeline.stages.gather import pairs
from wit_pipeline.stages.gather import transforms as gather

AGENTS = frozenset({"img2dataset", "wit-pipeline"})
DIRECTIVES = frozenset({"noai", "noimageai"})
CFG = GatherConfig(captions=CaptionConfig(languages=(), language_detector="none"))


# ---------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize(
    "values, want",
    [
        (["noai"], "noai"),
        (["NoArchive, NOIMAGEAI"], "noimageai"),
        (["noindex"], None),
        (["otherbot: noai, noimageai"], None),  # the agent applies to what follows it
        (["wit-pipeline: noai"], "noai"),
        (["img2dataset: noimageai"], "noimageai"),
        (["noindex, otherbot: noai"], None),
        (["otherbot: noindex, wit-pipeline: noai"], "noai"),
        (["otherbot: noindex", "noai"], "noai"),  # each header value on its own
        (["unavailable_after: 25 Jun 2010 15:00:00 PST, noai"], "noai"),
        ([], None),
    ],
)
def test_x_robots_tag(values, want):
    assert optout.x_robots_tag(values, AGENTS, DIRECTIVES) == want


def test_x_robots_tag_without_directives_is_off():
    assert optout.x_robots_tag(["noai"], AGENTS, frozenset()) is None


@pytest.mark.parametrize(
    "metas, want",
    [
        ([("robots", "noindex, NoAI")], "robots-meta:noai"),
        ([("img2dataset", "noimageai")], "img2dataset-meta:noimageai"),
        ([("googlebot", "noai")], None),
        ([("viewport", "noai"), ("robots", "noindex")], None),
        ([("googlebot", "noai"), ("wit-pipeline", "noai")], "wit-pipeline-meta:noai"),
    ],
)
def test_meta_robots(metas, want):
    assert optout.meta_robots(metas, AGENTS, DIRECTIVES) == want


@pytest.mark.parametrize(
    "header, metas, want",
    [
        ("1", [], "tdm-reservation:header"),
        (" 1 ", [], "tdm-reservation:header"),
        ("0", [], None),
        ("2", [], None),  # a protocol error: unset
        (None, [("tdm-reservation", "1")], "tdm-reservation:meta"),
        ("1", [("tdm-reservation", "0")], None),  # the meta supersedes the header
        ("1", [("tdm-reservation", "yes")], "tdm-reservation:header"),  # an invalid meta: unset
        ("0", [("tdm-reservation", "1")], "tdm-reservation:meta"),
    ],
)
def test_tdm_page_priority(header, metas, want):
    assert optout.tdm_page(header, metas) == want


def test_signal_of_rejected_rows_and_policy_notes():
    assert optout.signal_of("opt_out", "x-robots-tag:noai") == "x-robots-tag:noai"
    assert optout.signal_of("robots", "disallowed by robots.txt") == "robots.txt"
    assert optout.signal_of("robots", "disallowed by robots.txt (redirect to http://x/)") == (
        "robots.txt"
    )
    assert optout.signal_of("robots", "robots.txt unreachable: HTTP 503") is None
    assert optout.signal_of("http_404", "") is None
    assert optout.signal_counts(
        ["opt_out", "robots", "opt_out", "robots"],
        ["tdmrep.json", "disallowed by robots.txt", "tdmrep.json", "robots.txt unreachable"],
    ) == {"opt_out/tdmrep.json": 2, "opt_out/robots.txt": 1}
    note = optout.with_policy(
        "tdmrep.json", "http://h/.well-known/tdmrep.json", "2024-01-02T03:04:05Z"
    )
    assert optout.split_policy(note) == (
        "tdmrep.json",
        "http://h/.well-known/tdmrep.json",
        "2024-01-02T03:04:05Z",
    )
    assert optout.split_policy("plain") == ("plain", None, None)


# ---------------------------------------------------------------------------------------------
# Gather: page-level opt-outs


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    d = tmp_path_factory.mktemp("optout")
    (d / "pages.warc.gz").write_bytes(cf.opt_out_warc())
    (d / "pages.wat.gz").write_bytes(cf.opt_out_wat())
    return d


def _rows(rejected):
    return sorted(
        (r["url"], r["reason"], r["detail"], r["page_url"], r["policy_url"], r["policy_fetched"])
        for r in rejected.to_pylist()
    )


def test_warc_pages_opt_out_with_their_signal(crawl):
    path = str(crawl / "pages.warc.gz")
    kept, rejected, counts = pairs.gather_loop([path], config=CFG, query_list=cf.QUERIES)
    want_rejected, want_kept, signals = [], [], {}
    for n, (page, _, _, signal) in enumerate(cf.OPT_OUT_PAGES):
        url, caption = cf.opt_out_image(n)
        if signal is None:
            want_kept.append((url, caption, page))
        else:
            want_rejected.append((url, "opt_out", signal, page, page, cf.OPT_OUT_DATE))
            signals[f"opt_out/{signal}"] = signals.get(f"opt_out/{signal}", 0) + 1
    assert _rows(rejected) == sorted(want_rejected)
    assert sorted(
        zip(
            kept["url"].to_pylist(),
            kept["caption"].to_pylist(),
            kept["page_url"].to_pylist(),
            strict=True,
        )
    ) == sorted(want_kept)
    assert rejected.schema == stage.REJECTED_SCHEMA
    assert set(rejected["stage"].to_pylist()) == {"gather"}
    doc = stage.stats_document(counts, sections=pairs.STATS_SECTIONS)
    n = len(cf.OPT_OUT_PAGES)
    assert doc["counters"] == {
        "dropped:opt_out": len(want_rejected),
        "input": n,
        "kept": n - len(want_rejected),
    }
    assert doc["opt_out_counters"] == {k.split("/", 1)[1]: v for k, v in sorted(signals.items())}
    assert doc["opt_out_counters"] == {
        "img2dataset-meta:noimageai": 1,
        "robots-meta:noai": 1,
        "tdm-reservation:header": 1,
        "tdm-reservation:meta": 1,
        "wit-pipeline-meta:noai": 1,
        "x-robots-tag:noai": 2,
        "x-robots-tag:noimageai": 1,
    }
    assert doc["read_counters"]["warc:opt_out_pages"] == len(want_rejected)


def test_wat_pages_opt_out_with_their_signal(crawl):
    path = str(crawl / "pages.wat.gz")
    kept, rejected, counts = pairs.gather_loop([path], config=CFG, query_list=cf.QUERIES)
    want = []
    for n, (page, _, _, signal) in enumerate(cf.WAT_OPT_OUT_PAGES):
        if signal is not None:
            url = f"{page.rsplit('/', 1)[0]}/img/{n}.jpg"
            want.append((url, "opt_out", signal, page, page, cf.OPT_OUT_DATE))
    assert _rows(rejected) == sorted(want)
    assert kept["page_url"].to_pylist() == ["http://w.example/other"]
    assert counts["dropped:opt_out"] == 5 and counts["read/wat:opt_out_pages"] == 5
    assert counts["opt_out/x-robots-tag:noai"] == 1  # the list's second value, for all agents


def test_opt_out_options(crawl):
    path = str(crawl / "pages.warc.gz")
    # No robots directives: meta robots and X-Robots-Tag are not read; TDMRep still is.
    cfg = GatherConfig(captions=CFG.captions, opt_out_directives=(), respect_tdm_reservation=True)
    _, rejected, _ = pairs.gather_loop([path], config=cfg, query_list=cf.QUERIES)
    assert sorted(rejected["detail"].to_pylist()) == [
        "tdm-reservation:header",
        "tdm-reservation:meta",
    ]
    # Only our own agent: the img2dataset meta no longer applies; no TDMRep.
    cfg = GatherConfig(
        captions=CFG.captions, opt_out_agents=("wit-pipeline",), respect_tdm_reservation=False
    )
    _, rejected, _ = pairs.gather_loop([path], config=cfg, query_list=cf.QUERIES)
    assert sorted(rejected["detail"].to_pylist()) == [
        "robots-meta:noai",
        "wit-pipeline-meta:noai",
        "x-robots-tag:noai",
        "x-robots-tag:noai",
        "x-robots-tag:noimageai",
    ]


def test_run_gather_writes_opt_out_rows_and_counters(crawl, tmp_path):
    out = tmp_path / "gather"
    doc = gather.run_gather(
        [str(crawl / "pages.warc.gz"), str(crawl / "pages.wat.gz")],
        str(out),
        config=CFG,
        queries_path=str(_queries(tmp_path)),
    )
    assert doc["counters"]["dropped:opt_out"] == 13
    assert sum(doc["opt_out_counters"].values()) == 13
    stats = json.loads((out / "stats.json").read_text())
    assert stats["opt_out_counters"] == doc["opt_out_counters"]
    rows = [
        r
        for f in sorted((out / "rejected").glob("*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    assert len(rows) == 13
    for r in rows:
        assert r["reason"] == "opt_out" and r["policy_url"] == r["page_url"]
        assert r["policy_fetched"] == cf.OPT_OUT_DATE


def _queries(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("\n".join(cf.QUERIES) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# TDMRep


W3C_EXAMPLE = """[
  {"location": "/directory-a/", "tdm-reservation": 1},
  {"location": "/directory-b/html/", "tdm-reservation": 1,
   "tdm-policy": "https://provider.com/policies/policy.json"},
  {"location": "/directory-b/images/*.jpg", "tdm-reservation": 0}
]"""


@pytest.mark.parametrize(
    "path, want",
    [
        ("/directory-a/doc.pdf", 1),
        ("/directory-a", None),  # a prefix of the pattern is no match
        ("/directory-b/html/index.html", 1),
        ("/directory-b/images/cat.jpg", 0),
        ("/directory-b/images/cat.png", None),
        ("/Directory-A/doc.pdf", None),  # case-sensitive
        ("/directory-%61/doc.pdf", 1),  # an escaped unreserved character is decoded first
        ("/elsewhere", None),
    ],
)
def test_tdmrep_w3c_example(path, want):
    rules, bad = tdmrep.parse(W3C_EXAMPLE)
    assert bad == 0
    found = rules.reservation(f"https://provider.com{path}")
    assert (found[0] if found else None) == want


def test_tdmrep_first_match_wins_and_errors_are_unset():
    rules, bad = tdmrep.parse(
        json.dumps(
            [
                {"location": "/a/open*", "tdm-reservation": 0},
                {"location": "/a/", "tdm-reservation": 1},
                {"location": "/b/", "tdm-reservation": 7},
                {"location": "/c/exact.jpg$", "tdm-reservation": "1"},
                {"tdm-reservation": 1},
                "not a rule",
                {"location": "", "tdm-reservation": 1},
                {"location": "d/", "tdm-reservation": 1},
                {"location": "/e/", "tdm-reservation": True},
                {"location": "/*.png", "tdm-reservation": 1},
            ]
        )
    )
    assert bad == 3
    verdict = tdmrep.TdmVerdict(rules, "http://h/.well-known/tdmrep.json", "2024-01-01T00:00:00Z")
    paths = ["/a/open.jpg", "/a/x.jpg", "/b/x.png", "/c/exact.jpg", "/c/exact.jpg?x", "/d/x"]
    paths += ["/e/x.png", "/z.png", "/z"]
    reserved = (
        "opt_out",
        "tdmrep.json",
        "http://h/.well-known/tdmrep.json",
        "2024-01-01T00:00:00Z",
    )
    assert {p: verdict.decide(f"http://h{p}") for p in paths} == {
        "/a/open.jpg": None,  # an earlier rule releases it
        "/a/x.jpg": reserved,
        "/b/x.png": None,  # the first match says 7, a protocol error: unset
        "/c/exact.jpg": reserved,  # "1" as a string counts
        "/c/exact.jpg?x": None,  # "$" anchors the end
        "/d/x": reserved,  # a location without its leading slash
        "/e/x.png": None,  # true is not 1: unset, and the first match decides
        "/z.png": reserved,
        "/z": None,  # no rule matches
    }


@pytest.mark.parametrize("text", ["{}", "[", '"x"', "null"])
def test_tdmrep_not_an_array(text):
    with pytest.raises(ValueError):
        tdmrep.parse(text)
