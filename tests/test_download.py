"""Download stage: pure cores, the hostile-case suite end to end, real Flickr8k photos, reruns.

Every URL is served by servers these tests start on 127.0.0.1 (named hosts reach them through
a StaticResolver injected into the guard); the network jail fails any test whose code tries to
reach anything else.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import urllib.request

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from download_helpers import (
    OPTIONS,
    pair,
    read_outputs,
    run_download,
    snapshot,
    write_candidates,
)
from download_server import (
    BLOCKLIST,
    CASES,
    HOST_CASES,
    JPEG,
    OPT_OUT_POLICIES,
    RESOLVER_TABLE,
    animated_gif,
    encode,
    gif_bomb,
    hostile_server,
    photo,
    png_bomb,
)
from PIL import Image

import netjail
from wit_pipeline import counters, stage, takedown, urls
from wit_pipeline.config import DownloadConfig
from wit_pipeline.loopback import ImageServer
from wit_pipeline.stages.download import fetch, guarded_http, netguard, plan
from wit_pipeline.stages.download import transforms as download

# ---------------------------------------------------------------------------------------------
# Pure cores


def test_key_pair_normalizes_and_fills_ids():
    key, p = plan.key_pair(
        {"url": "HTTP://Example.COM:80/a/./b.jpg#frag", "caption": "a dog", "query_ids": [3, 1, 3]}
    )
    assert p["url"] == "http://example.com/a/b.jpg"
    assert key == urls.url_uid("http://example.com/a/b.jpg")
    assert p["uid"] == urls.pair_uid("http://example.com/a/b.jpg", "a dog")
    assert p["query_ids"] == [1, 3]
    assert p["invalid"] is False
    key, p = plan.key_pair({"url": "javascript:alert(1)", "caption": "x", "uid": "u1"})
    assert (p["url"], p["uid"], p["invalid"]) == ("javascript:alert(1)", "u1", True)
    assert key == urls.url_uid("javascript:alert(1)")


def test_url_record_sets_duplicate_pairs_aside():
    pairs = [
        {**plan.key_pair(pair("http://h.test/a.jpg", c))[1], "source": s}
        for c, s in [("b cap", "f2"), ("a cap", "f1"), ("b cap", "f1")]
    ]
    rec = plan.make_url_record("k", pairs)
    assert [p["caption"] for p in rec["pairs"]] == sorted(
        ["a cap", "b cap"], key=lambda c: urls.pair_uid("http://h.test/a.jpg", c)
    )
    assert [(p["caption"], p["source"]) for p in rec["dups"]] == [("b cap", "f2")]
    assert rec["origin"] == "http://h.test" and rec["verdict"] is None


def test_shard_of_is_stable_and_spread():
    keys = [urls.url_uid(f"http://h.test/{i}.jpg") for i in range(4000)]
    ids = [plan.shard_of(k, 4) for k in keys]
    assert ids == [plan.shard_of(k, 4) for k in keys]
    assert all(900 < ids.count(s) < 1100 for s in range(4))
    assert plan.num_shards_for(4000, 1000) == 4
    assert plan.num_shards_for(4001, 1000) == 5
    assert plan.num_shards_for(0, 1000) == 1


def test_assemble_shard_and_counters_are_exact():
    def rec(url, captions, verdict=None):
        key, _ = plan.key_pair({"url": url})
        pairs = [plan.key_pair(pair(url, c, query_ids=(i,)))[1] for i, c in enumerate(captions)]
        r = plan.make_url_record(key, pairs)
        if verdict:
            r["verdict"] = verdict
        return r

    ok = rec("http://h.test/ok.jpg", ["one", "two", "one"])  # one duplicate pair
    bad = rec("http://h.test/404.jpg", ["three"])
    robots_rec = rec("http://h.test/private/x.jpg", ["four", "five"], ("robots", "disallowed"))
    lost = rec("http://h.test/lost.jpg", ["six"])
    outcomes = {
        ok["key"]: plan.Outcome(JPEG, 96, 64, 120, 80, "abc"),
        bad["key"]: plan.Outcome(reason="http_404", detail="HTTP 404: Not Found"),
    }
    samples, kept, rejected = plan.assemble_shard([ok, bad, robots_rec, lost], outcomes)
    assert [s.key for s in samples] == [ok["key"]]
    meta = samples[0].meta
    assert meta["captions"] == [p["caption"] for p in ok["pairs"]]
    assert sorted(meta["captions"]) == ["one", "two"]
    assert meta["query_ids"] == [0, 1]
    assert (meta["width"], meta["height"], meta["sha256"]) == (96, 64, "abc")
    assert samples[0].caption == ok["pairs"][0]["caption"]
    assert kept.num_rows == 2 and set(kept.column("key").to_pylist()) == {ok["key"]}
    assert sorted(
        zip(rejected["caption"].to_pylist(), rejected["reason"].to_pylist(), strict=True)
    ) == [
        ("five", "robots"),
        ("four", "robots"),
        ("one", "duplicate_pair"),
        ("six", "internal_error"),
        ("three", "http_404"),
    ]
    # Rows of the one rejected-row schema, stamped with the stage, keyed by their URL.
    assert rejected.schema == stage.REJECTED_SCHEMA
    three = next(r for r in rejected.to_pylist() if r["caption"] == "three")
    assert three == {
        **dict.fromkeys(stage.REJECTED_FIELDS),
        "stage": "download",
        "reason": "http_404",
        "detail": "HTTP 404: Not Found",
        "key": bad["key"],
        "uid": urls.pair_uid("http://h.test/404.jpg", "three"),
        "url": "http://h.test/404.jpg",
        "caption": "three",
        "source": "test",
    }
    assert plan.shard_counters(kept, rejected) == {
        "dropped:duplicate_pair": 1,
        "dropped:http_404": 1,
        "dropped:internal_error": 1,
        "dropped:robots": 2,
        "input": 7,
        "kept": 2,
        "url/dropped:http_404": 1,
        "url/dropped:internal_error": 1,
        "url/dropped:robots": 1,
        "url/input": 4,
        "url/kept": 1,
    }


@pytest.mark.parametrize(
    "message, default, expected",
    [
        ("wit:timeout: timed out", "download_error", "timeout"),
        ("wit:http_404: HTTP 404: Not Found", "download_error", "http_404"),
        ("Use of image disallowed by X-Robots-Tag directive", "download_error", "opt_out"),
        ("image too small", "decode_error", "too_small"),
        ("image area too large", "decode_error", "too_large"),
        ("aspect ratio too large", "decode_error", "bad_aspect_ratio"),
        ("Image decoding error", "decode_error", "decode_error"),
        ("something new", "download_error", "download_error"),
        (None, "decode_error", "decode_error"),
    ],
)
def test_reason_from_message(message, default, expected):
    assert fetch.reason_from_message(message, default=default)[0] == expected


def test_probing_resizer_refuses_before_decoding():
    cfg = DownloadConfig(image_size=64, min_image_size=32, max_aspect_ratio=4.0)
    resizer = fetch.ProbingResizer(fetch.make_img2dataset_resizer(cfg), cfg)
    cases = {
        b"": "empty_body",
        png_bomb(): "too_large",
        gif_bomb(): "too_large",  # its screen says 100x100, its first frame 30,000x30,000
        encode(photo(10, 10), "PNG"): "too_small",
        encode(photo(400, 40), "PNG"): "bad_aspect_ratio",
        b"<!DOCTYPE html><html></html>": "not_image",
        b'{"error": "not found"}': "not_image",
        bytes(range(256)) * 4: "decode_error",
    }
    for data, reason in cases.items():
        img, *_, err = resizer(io.BytesIO(data))
        assert img is None and err.startswith(f"wit:{reason}:"), (reason, err)
    img, w, h, ow, oh, err = resizer(io.BytesIO(encode(photo(120, 80), "PNG")))
    assert err is None and (w, h, ow, oh) == (96, 64, 120, 80)
    assert Image.open(io.BytesIO(img)).format == "JPEG"


def test_header_size_agrees_with_pil(shared_data):
    rgb = photo(150, 90, seed=9)
    exif = Image.Exif()
    exif[0x010E] = "a description"
    generated = [
        encode(rgb, "JPEG"),
        encode(rgb, "JPEG", progressive=True),
        encode(rgb.convert("CMYK"), "JPEG"),
        encode(rgb.convert("L"), "JPEG", exif=exif.tobytes()),
        encode(rgb, "PNG"),
        encode(rgb.convert("P"), "GIF"),
        animated_gif(),  # extension blocks before the first frame
        gif_bomb(frame=1000),  # Pillow grows the screen to hold the first frame
        encode(rgb, "WEBP"),  # left to PIL
    ]
    photos = sorted((shared_data / "flickr8k" / "images").iterdir())[:300]
    for data in generated + [p.read_bytes() for p in photos]:
        with Image.open(io.BytesIO(data)) as im:
            want = (im.format, *im.size)
        got = fetch.header_size(data)
        assert got is None if want[0] == "WEBP" else got == want
    assert fetch.header_size(b"\xff\xd8\xff\xe0\x00\x10JFIF") is None  # cut short
    assert fetch.header_size(b"<html>") is None
    assert fetch.header_size(gif_bomb()) == ("GIF", 30_000, 30_000)
    assert fetch.header_size(gif_bomb()[:20]) is None  # cut before the first frame


def test_apply_verdict_and_crawl_delay():
    from wit_pipeline.stages.download import robots

    keyed = [plan.key_pair(pair(f"http://h.test/{p}", p)) for p in ("a.jpg", "private/b.jpg")]
    recs = [plan.make_url_record(key, [p]) for key, p in keyed]
    rules = robots.parse("User-agent: *\nDisallow: /private/\nCrawl-delay: 3\n", "wit")
    verdict = robots.RobotsVerdict(robots.RULES, rules)

    def run(**cfg):
        # Records first: the verdict may come anywhere among the grouped values.
        values = [("r", {**r, "verdict": None}) for r in recs] + [("v", verdict)]
        out = list(plan.apply_verdict(("http://h.test", values), DownloadConfig(**cfg)))
        return [(r["verdict"], r.get("crawl_delay")) for r in out]

    # A refusal names the policy it rests on (here a verdict made without a fetch: None).
    robots_drop = ("robots", "disallowed by robots.txt", None, None)
    assert run() == [(None, None), (robots_drop, None)]
    assert run(respect_crawl_delay=True) == [(None, 3.0), (robots_drop, None)]
    too_slow = ("robots", "Crawl-delay 3s exceeds max_crawl_delay 2s")
    assert run(respect_crawl_delay=True, max_crawl_delay=2) == [
        (too_slow, None),
        (robots_drop, None),
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"resize_mode": "stretch"}, r"download\.resize_mode must be one of no, border, "),
        ({"timeout": 0}, r"download\.timeout must be > 0"),
        ({"samples_per_shard": 0}, r"download\.samples_per_shard must be > 0"),
        ({"max_aspect_ratio": 0.5}, r"download\.max_aspect_ratio must be >= 1"),
    ],
)
def test_the_download_section_checks_itself_when_made(bad, message):
    """A bad section never reaches ``DownloadImages`` (which checks none of its options)."""
    from wit_pipeline.errors import WitError

    with pytest.raises(WitError, match=f"^config: {message}"):
        DownloadConfig(**bad)
    DownloadConfig()  # the defaults pass


# ---------------------------------------------------------------------------------------------
# The hostile suite, end to end


HOSTILE_CONFIG = DownloadConfig(
    allow_loopback=True,
    timeout=3.0,  # per attempt; /slow.jpg and /drip.jpg need longer
    connect_timeout=2.0,
    retries=1,
    retry_backoff=0.05,
    samples_per_shard=8,
    threads=16,
    per_host_concurrency=16,
    min_image_size=32,
    image_size=64,
)
INVALID_URLS = ["javascript:void(0)", "ftp://127.0.0.1/x.jpg", "/relative/path.jpg", "http://"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One run of the whole hostile suite; the tests below read its outputs."""
    tmp = tmp_path_factory.mktemp("hostile")
    server = hostile_server().start()
    rows = []
    expected: dict[str, str | None] = {}
    for path, reason in CASES.items():
        url = server.url(path)
        rows.append(pair(url, f"caption of {path}", query_ids=(1, 2)))
        expected[urls.normalize_url(url)] = reason
    for (host, path), reason in HOST_CASES.items():
        url = server.url(path, host)
        rows.append(pair(url, f"caption of {host}{path}"))
        expected[urls.normalize_url(url)] = reason
    # Several captions for one URL, one of them twice; two spellings of one URL.
    ok = server.url("/ok.jpg")
    rows.append(pair(ok, "second caption", query_ids=(7,)))
    rows.append(pair(ok, "second caption", query_ids=(7,)))
    rows.append(pair(ok.replace("http://", "HTTP://") + "#frag", "third caption", query_ids=(5,)))
    for u in INVALID_URLS:
        rows.append(pair(u, f"caption of {u}"))
        expected[u] = "invalid_url"
    input_dir = write_candidates(tmp / "in", rows)
    resolver = netguard.StaticResolver.of(RESOLVER_TABLE)
    blocklist = takedown.parse_blocklist(BLOCKLIST.format(port=server.port))
    out = str(tmp / "out")
    # conftest's per-test check starts after this module-scoped fixture: watch the runs here.
    jailed_before = len(netjail.violations)
    try:
        stats = run_download(input_dir, out, HOSTILE_CONFIG, resolver, blocklist)
        requests_run1 = list(server.requests)
        server.requests.clear()
        stats2 = run_download(input_dir, out, HOSTILE_CONFIG, resolver, blocklist)
        requests_run2 = list(server.requests)
        yield {
            "violations": netjail.violations[jailed_before:],
            "rows": rows,
            "expected": expected,
            "input_dir": input_dir,
            "out": out,
            "stats": stats,
            "stats2": stats2,
            "requests": requests_run1,
            "requests2": requests_run2,
            "server": server,
            "resolver": resolver,
            "blocklist": blocklist,
        }
    finally:
        server.stop()


def test_the_hostile_runs_stayed_on_loopback(hostile):
    assert hostile["violations"] == []


def test_every_url_ends_in_a_shard_or_rejected_with_its_reason(hostile):
    kept, rejected, _samples = read_outputs(hostile["out"])
    got: dict[str, str | None] = {}
    for url in kept.column("url").to_pylist():
        got[url] = None
    for url, reason in zip(
        rejected["url"].to_pylist(), rejected["reason"].to_pylist(), strict=True
    ):
        if reason != "duplicate_pair":
            assert got.get(url, reason) == reason, url  # one fate per URL
            got[url] = reason
    assert got == hostile["expected"]
    # Every input pair is accounted for exactly once.
    uids_in = sorted(r["uid"] for r in hostile["rows"])
    uids_out = sorted(kept["uid"].to_pylist() + rejected["uid"].to_pylist())
    assert uids_out == uids_in


def test_stats_are_exact_and_balanced(hostile):
    expected = hostile["expected"]
    reasons = [r for r in expected.values() if r is not None]
    n_kept_urls = sum(r is None for r in expected.values())
    url_counters = {"input": len(expected), "kept": n_kept_urls}
    for r in set(reasons):
        url_counters[counters.dropped(r)] = reasons.count(r)
    assert hostile["stats"]["url_counters"] == dict(sorted(url_counters.items()))
    pair_counters = dict(url_counters)
    pair_counters["input"] = len(hostile["rows"])
    pair_counters["kept"] = n_kept_urls + 2  # /ok.jpg has three distinct captions
    pair_counters["dropped:duplicate_pair"] = 1
    assert hostile["stats"]["counters"] == dict(sorted(pair_counters.items()))
    counters.check_balanced(hostile["stats"]["counters"])
    counters.check_balanced(hostile["stats"]["url_counters"])


def test_pairs_sharing_a_url_follow_it(hostile):
    kept, _, samples = read_outputs(hostile["out"])
    ok_url = next(u for u in hostile["expected"] if u.endswith("/ok.jpg"))
    key = urls.url_uid(ok_url)
    rows = [r for r in kept.to_pylist() if r["key"] == key]
    assert sorted(r["caption"] for r in rows) == [
        "caption of /ok.jpg",
        "second caption",
        "third caption",
    ]
    meta = json.loads(samples[key]["json"])
    by_uid = sorted(rows, key=lambda r: r["uid"])
    assert meta["captions"] == [r["caption"] for r in by_uid]
    assert meta["query_ids"] == [1, 2, 5, 7]
    assert samples[key]["txt"].decode() == by_uid[0]["caption"]
    assert meta["sha256"] == hashlib.sha256(JPEG).hexdigest()
    assert {r["sha256"] for r in rows} == {meta["sha256"]}
    # Downloaded once although three pairs (two spellings) point at it.
    assert [p for _, p in hostile["requests"] if p == "/ok.jpg"] == ["/ok.jpg"]


def test_kept_images_are_valid_rgb_jpegs(hostile):
    _kept, _, samples = read_outputs(hostile["out"])
    for _key, s in samples.items():
        meta = json.loads(s["json"])
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB", meta["url"]
        assert im.size == (meta["width"], meta["height"])
        assert min(im.size) == 64  # keep_ratio: the short side is resized to image_size
    cmyk_key = urls.url_uid(next(u for u in hostile["expected"] if u.endswith("/cmyk.jpg")))
    got = np.asarray(Image.open(io.BytesIO(samples[cmyk_key]["jpg"])).convert("RGB"), float)
    want = np.asarray(photo(seed=5).resize(got.shape[1::-1]), float)
    assert np.abs(got - want).mean() < 12  # colours survive the CMYK round trip


def test_politeness_and_retries(hostile):
    paths = [p for _, p in hostile["requests"]]
    by_host = [(h, p) for h, p in hostile["requests"]]
    # robots.txt and tdmrep.json once per origin, of the candidates' origins and of every
    # other origin a redirect reaches; disallowed URLs and blocked hosts never requested.
    policy_hosts = [
        "127.0.0.1",
        "polite.test",
        "strict.test",
        "robots-down.test",
        "norobots.test",
        *(h for h in RESOLVER_TABLE if h.startswith(("tdm", "redirect-"))),
    ]
    robots_hosts = sorted(h for h, p in by_host if p == "/robots.txt")
    assert robots_hosts == sorted(policy_hosts)
    tdmrep_hosts = sorted(h for h, p in by_host if p == "/.well-known/tdmrep.json")
    assert tdmrep_hosts == sorted(policy_hosts)
    assert ("strict.test", "/private/s.jpg") not in by_host
    assert ("polite.test", "/no-wit/b.jpg") not in by_host
    assert ("robots-down.test", "/d.jpg") not in by_host
    assert ("polite.test", "/no-wit/except-this.jpg") in by_host
    # Retries: only retryable failures, at most retries + 1 attempts.
    assert paths.count("/flaky") == 2
    assert paths.count("/always503.jpg") == 2
    assert paths.count("/notfound.jpg") == 1
    assert paths.count("/xrobots-noai") == 1
    assert paths.count("/to-metadata") == 1
    assert paths.count("/to-name") == 1
    # Redirect targets: requested only where their origin's policies allow it.
    assert ("redirect-open.test", "/r.jpg") in by_host
    for host in ("redirect-strict.test", "redirect-down.test", "tdm-redirect.test"):
        assert [p for h, p in by_host if h == host and not p.startswith("/.well-known/")] == [
            "/robots.txt"
        ], host
    # Reserved by tdmrep.json, taken down: never requested.
    assert ("tdm.test", "/reserved/a.jpg") not in by_host
    assert "/taken-url.jpg" not in paths
    assert not [h for h, _ in by_host if h.endswith("taken.test")]


_ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def test_opt_outs_name_their_signal_and_policy(hostile):
    """Every opt-out and robots.txt decision records its signal, the policy URL and its time."""
    server = hostile["server"]
    _, rejected, _ = read_outputs(hostile["out"])
    rows = {r["url"]: r for r in rejected.to_pylist() if r["reason"] != "duplicate_pair"}

    def row(path, host=""):
        return rows[urls.normalize_url(server.url(path, host))]

    for path, (signal, host, policy_path) in OPT_OUT_POLICIES.items():
        r = row(path)
        assert (r["reason"], r["detail"]) == ("opt_out", signal), path
        assert r["policy_url"] == urls.normalize_url(server.url(policy_path, host)), path
        assert _ISO_UTC.fullmatch(r["policy_fetched"]), path
    tdm = server.url("/.well-known/tdmrep.json", "tdm.test")
    for path in ("/reserved/a.jpg", "/mixed/d.jpg", "/other/x.jpg"):
        r = row(path, "tdm.test")
        assert (r["detail"], r["policy_url"]) == ("tdmrep.json", tdm), path
    robots_cases = {
        ("strict.test", "/private/s.jpg"): ("strict.test", "disallowed by robots.txt"),
        ("polite.test", "/no-wit/b.jpg"): ("polite.test", "disallowed by robots.txt"),
        ("robots-down.test", "/d.jpg"): ("robots-down.test", "robots.txt unreachable: HTTP 503"),
        ("", "/to-disallowed"): ("redirect-strict.test", "disallowed by robots.txt (redirect to"),
        ("", "/to-robots-down"): ("redirect-down.test", "robots.txt unreachable: HTTP 503"),
    }
    for (host, path), (policy_host, detail) in robots_cases.items():
        r = row(path, host)
        assert r["reason"] == "robots" and r["detail"].startswith(detail), (path, r["detail"])
        assert r["policy_url"] == server.url("/robots.txt", policy_host), path
        assert _ISO_UTC.fullmatch(r["policy_fetched"]), path
    # Takedowns name the entry; nothing else carries a policy.
    assert row("/to-taken")["detail"].startswith("domain taken.test (redirect to http://taken.test")
    assert row("/direct.jpg", "taken.test")["detail"] == "domain taken.test"
    assert row("/s.jpg", "cdn.taken.test")["detail"] == "domain taken.test"
    assert (
        row("/taken-url.jpg")["detail"] == f"url {urls.normalize_url(server.url('/taken-url.jpg'))}"
    )
    for r in rows.values():
        if r["reason"] not in ("opt_out", "robots"):
            assert r["policy_url"] is None and r["policy_fetched"] is None, r
    # Pairs dropped per opt-out signal (unreachable robots.txt is not an owner's choice).
    assert hostile["stats"]["opt_out_counters"] == {
        "robots.txt": 3,
        "tdm-reservation:header": 1,
        "tdmrep.json": 4,
        "x-robots-tag:noai": 2,
        "x-robots-tag:noimageai": 1,
        "x-robots-tag:noimageindex": 1,
    }


def test_rerun_skips_finished_shards_and_changes_nothing(hostile):
    # The policies' fetch times travel with the rejected rows of each finished shard.
    assert hostile["requests2"] == []  # not even robots.txt
    assert hostile["stats2"] == hostile["stats"]


def test_crashed_shard_is_redone_alone(hostile, tmp_path):
    """Remove one shard's completion marker, leave a partial temp file, as a crash would."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(hostile["out"], out)
    before = snapshot(out)
    victim = sorted((out / "shards").glob("*.parquet"))[1]
    victim_urls = set(pq.read_table(victim)["url"].to_pylist()) | set(
        pq.read_table(out / "rejected" / victim.name)["url"].to_pylist()
    )
    victim.unlink()
    (out / "shards" / f".{victim.stem}.tar.0123abcd.tmp").write_bytes(b"partial")
    server = hostile["server"]
    server.requests.clear()
    stats = run_download(
        hostile["input_dir"], str(out), HOSTILE_CONFIG, hostile["resolver"], hostile["blocklist"]
    )
    requested = {urls.normalize_url(server.url(p, h)) for h, p in server.requests}
    candidates = set(hostile["expected"])
    assert requested & candidates and requested & candidates <= victim_urls
    assert stats == hostile["stats"]
    # Byte-identical tars, equal tables, no temp file left; a redone shard's robots.txt and
    # tdmrep.json were fetched again, so its rejected rows may name a later fetch time.
    assert _without_fetch_times(snapshot(out)) == _without_fetch_times(before)


def _without_fetch_times(snap: dict) -> dict:
    out = {}
    for name, value in snap.items():
        if name.startswith("rejected/"):
            value = [{**r, "policy_fetched": bool(r["policy_fetched"])} for r in value]
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Real photos


@pytest.fixture(scope="module")
def flickr(shared_data):
    images = shared_data / "flickr8k" / "images"
    captions: dict[str, list[str]] = {}
    with open(shared_data / "flickr8k" / "captions.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            captions.setdefault(row["image"], []).append(row["caption"])
    names = sorted(captions)[:150]
    return images, {n: captions[n] for n in names}


def test_flickr8k_photos_end_to_end(flickr, tmp_path):
    images, captions = flickr
    with ImageServer(str(images)) as server:
        rows = [
            pair(server.url(f"/img/{name}"), cap, query_ids=(i % 3,))
            for name, caps in captions.items()
            for i, cap in enumerate(caps)
        ]
        cfg = DownloadConfig(
            allow_loopback=True, image_size=64, resize_mode="center_crop", samples_per_shard=50
        )
        stats = run_download(write_candidates(tmp_path / "in", rows), str(tmp_path / "out"), cfg)
    n = len(captions)
    assert stats["url_counters"] == {"input": n, "kept": n}
    assert stats["counters"] == {"input": len(rows), "kept": len(rows)}
    _kept, rejected, samples = read_outputs(str(tmp_path / "out"))
    assert rejected.num_rows == 0 and len(samples) == n
    assert sorted(os.listdir(tmp_path / "out" / "shards")) == [
        f"0000{i}.{ext}" for i in range(3) for ext in ("parquet", "tar")
    ]
    for name, caps in captions.items():
        key = urls.url_uid(urls.normalize_url(server.url(f"/img/{name}")))
        meta = json.loads(samples[key]["json"])
        assert sorted(meta["captions"]) == sorted(caps)
        assert meta["sha256"] == hashlib.sha256((images / name).read_bytes()).hexdigest()
        assert (meta["original_width"], meta["original_height"]) == Image.open(images / name).size
        assert Image.open(io.BytesIO(samples[key]["jpg"])).size == (64, 64)


def test_respect_robots_off_fetches_disallowed_urls(tmp_path):
    with ImageServer() as server:
        server.route("/robots.txt", lambda req: req.send_plain(200, b"User-agent: *\nDisallow: /"))
        server.route("/a.jpg", lambda req: req.send_plain(200, JPEG, "image/jpeg"))
        input_dir = write_candidates(tmp_path / "in", [pair(server.url("/a.jpg"), "a")], parts=1)
        cfg = DownloadConfig(allow_loopback=True, respect_robots=False, respect_tdmrep=False)
        before = urllib.request._opener
        stats = run_download(input_dir, str(tmp_path / "out"), cfg)
        assert server.paths_requested() == ["/a.jpg"]
        # The guard was installed for the run and removed with the DoFn.
        assert urllib.request._opener is before
    assert stats["url_counters"] == {"input": 1, "kept": 1}


def test_guard_stays_on_until_the_last_download_fn_is_torn_down(tmp_path):
    """Beam runs several instances of a DoFn per process and tears idle ones down: tearing one
    down must leave the others' downloads guarded, with one opener and limiter per process."""
    import pickle

    fn = download._DownloadShardFn(
        output_dir=str(tmp_path),
        config=HOSTILE_CONFIG,
        resolver=netguard.StaticResolver.of(RESOLVER_TABLE),
    )
    a, b = (pickle.loads(pickle.dumps(fn)) for _ in range(2))  # as a worker unpickles them
    other = download._DownloadShardFn(
        output_dir=str(tmp_path), config=HOSTILE_CONFIG, resolver=None
    )
    before = urllib.request._opener
    a.setup()
    try:
        b.setup()
        try:
            assert a._opener is b._opener and a._opener.limiter is b._opener.limiter
            # Another transform's settings may not take over (or share) the active guard.
            with pytest.raises(guarded_http.GuardConflictError):
                other.setup()
            other.teardown()
            a.teardown()
            assert urllib.request._opener is b._opener
            # Without the guard these would read the file and reach 10.0.0.5 (jail violation).
            for url, reason in [
                ("file:///etc/hostname", "invalid_url"),
                ("http://intranet.test/g.jpg", "blocked_address"),
                ("http://169.254.169.254/latest/meta-data/", "blocked_address"),
            ]:
                with pytest.raises(netguard.FetchError) as e:
                    urllib.request.urlopen(url, timeout=3)
                assert e.value.reason == reason, url
        finally:
            b.teardown()
    finally:
        a.teardown()  # a second teardown is a no-op
    assert urllib.request._opener is before
    assert guarded_http.PROCESS_OPENER.users == 0


def test_rerun_on_other_input_is_refused(tmp_path, capsys):
    from wit_pipeline import cli

    with ImageServer() as server:
        server.route("/a.jpg", lambda req: req.send_plain(200, JPEG, "image/jpeg"))
        rows = [pair(server.url("/a.jpg"), "a"), pair(server.url("/b.jpg"), "b")]
        first = write_candidates(tmp_path / "in1", rows[:1], parts=1)
        second = write_candidates(tmp_path / "in2", rows, parts=1)
        out = str(tmp_path / "out")
        args = ["download", "--output", out, "--allow-loopback", "--runner=FnApiRunner"]
        assert cli.main([*args, "--input", first]) == 0
        capsys.readouterr()
        assert cli.main([*args, "--input", second]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("wit: error: ") and "different input or configuration" in err
    assert "1 URLs, 1 shards; now 2 URLs" in err


def test_transform_counts_with_test_pipeline(tmp_path):
    """DownloadImages' output PCollection is the stats.json document of the summed counts."""
    with ImageServer() as server:
        server.route("/a.jpg", lambda req: req.send_plain(200, JPEG, "image/jpeg"))
        rows = [pair(server.url("/a.jpg"), "a"), pair(server.url("/b.jpg"), "b")]
        table = pa.Table.from_pylist([{k: r[k] for k in ("url", "caption")} for r in rows])
        with test_pipeline.TestPipeline(
            options=beam.options.pipeline_options.PipelineOptions(OPTIONS)
        ) as p:
            totals = (
                p
                | beam.Create([table])
                | download.DownloadImages(
                    output_dir=str(tmp_path), config=DownloadConfig(allow_loopback=True)
                )
            )
            assert_that(
                totals,
                equal_to(
                    [
                        {
                            "counters": {"dropped:http_404": 1, "input": 2, "kept": 1},
                            "url_counters": {"dropped:http_404": 1, "input": 2, "kept": 1},
                            "opt_out_counters": {},
                        }
                    ]
                ),
            )
