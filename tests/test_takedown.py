"""Takedowns: the blocklist format, where each entry applies (gather, finalize), ``wit remove``
(untouched members byte-identical, idempotent), and the fingerprints entries change."""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import tarfile

import pyarrow.parquet as pq
import pytest
from download_server import encode, photo

from wit_pipeline import build, cli, config, shards, stage, takedown, urls
from wit_pipeline.config import CaptionConfig, GatherConfig
from wit_pipeline.errors import WitError
from wit_pipeline.remove import match_sample, remove_samples
from wit_pipeline.stages import shards as final_shards
from wit_pipeline.stages.dedup.takedown import drop_taken_down
from wit_pipeline.stages.gather import pairs
from wit_pipeline.stages.gather.match import QueryMatcher
from wit_pipeline.stages.gather.readers import RawBatch

SHA_A = "a" * 64
PHASH = "0f0f0f0f0f0f0f0f"

BLOCKLIST = f"""\
# takedown requests, 2024-05
url HTTP://Example.com:80/a/./b.jpg#frag   # an image (normalized)
domain Photos.Example.ORG.
domain bücher.example
sha256 {SHA_A.upper()}
phash {PHASH}
phash ffffffffffffffff 0   # exact only
   # an indented comment

"""


def test_parse_normalizes_every_entry():
    bl = takedown.parse_blocklist(BLOCKLIST, path="t.txt")
    assert bl.urls == {"http://example.com/a/b.jpg"}
    assert bl.domains == {"photos.example.org", "xn--bcher-kva.example"}
    assert bl.sha256 == {SHA_A}
    assert bl.phashes == ((PHASH, 4), ("ffffffffffffffff", 0))
    (f,) = bl.files
    assert f.path == "t.txt" and f.sha256 == hashlib.sha256(BLOCKLIST.encode()).hexdigest()
    assert dict(f.entries) == {"url": 1, "domain": 2, "sha256": 1, "phash": 2}


@pytest.mark.parametrize(
    "line, message",
    [
        ("photo http://x/a.jpg", "unknown entry 'photo'"),
        ("URL http://x/a.jpg", "unknown entry 'URL'"),
        ("url", "url takes one value, got 0"),
        ("url http://x/a.jpg http://x/b.jpg", "url takes one value, got 2"),
        ("url ftp://x/a.jpg", "not an absolute http(s) URL"),
        ("url /relative.jpg", "not an absolute http(s) URL"),
        ("domain http://example.com", "not a host name"),
        ("domain example.com/path", "not a host name"),
        ("domain exa_mple..com", "not a host name"),
        ("sha256 abc", "a sha256 has 64 hex digits"),
        ("sha256 " + "g" * 64, "a sha256 has 64 hex digits"),
        ("phash 0f0f", "a pHash has 16 hex digits"),
        ("phash 0f0f0f0f0f0f0f0f 33", "the pHash distance must be an integer 0..32"),
        ("phash 0f0f0f0f0f0f0f0f -1", "the pHash distance must be an integer 0..32"),
        ("phash 0f0f0f0f0f0f0f0f 1 2", "phash takes a hash and an optional distance, got 3"),
    ],
)
def test_a_bad_line_is_one_error_naming_file_and_line(line, message):
    with pytest.raises(WitError) as e:
        takedown.parse_blocklist(f"# ok\ndomain ok.example\n{line}\n", path="list.txt")
    assert str(e.value).startswith(f"list.txt:3: {message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_load_blocklists_merges_files_and_reports_missing_ones(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"\xef\xbb\xbfdomain a.example\n")  # a BOM is fine
    b.write_text("domain b.example\nsha256 " + "b" * 64 + "\n")
    bl = takedown.load_blocklists([str(a), str(b)])
    assert bl.domains == {"a.example", "b.example"} and len(bl.sha256) == 1
    assert [f.sha256 for f in bl.files] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)
    ]
    with pytest.raises(WitError, match=r"blocklist not found: .*missing\.txt"):
        takedown.load_blocklists([str(tmp_path / "missing.txt")])
    (tmp_path / "bin.txt").write_bytes(b"domain \xff\n")
    with pytest.raises(WitError, match="not UTF-8"):
        takedown.load_blocklists([str(tmp_path / "bin.txt")])


def test_matching():
    bl = takedown.parse_blocklist(BLOCKLIST)
    assert bl.match_url("http://example.com/a/b.jpg") == "url http://example.com/a/b.jpg"
    assert bl.match_url("http://example.com/a/c.jpg") is None
    assert bl.match_url("https://photos.example.org/x.jpg") == "domain photos.example.org"
    assert bl.match_url("https://cdn.photos.example.org/x.jpg") == "domain photos.example.org"
    assert bl.match_url("https://notphotos.example.org/x.jpg") is None
    assert bl.match_url("https://example.org/x.jpg") is None
    assert bl.match_raw_url("HTTP://CDN.Photos.Example.org/x.jpg") == "domain photos.example.org"
    assert bl.match_raw_url("http://bücher.example/x") == "domain xn--bcher-kva.example"
    assert bl.match_hashes(SHA_A.upper(), None) == f"sha256 {SHA_A}"
    near = f"{int(PHASH, 16) ^ 0b1111:016x}"  # 4 bits away
    far = f"{int(PHASH, 16) ^ 0b11111:016x}"  # 5 bits away
    assert bl.match_phashes([PHASH, near, far, None, "fffffffffffffffe"]) == [
        f"phash {PHASH} 4",
        f"phash {PHASH} 4",
        None,
        None,
        None,
    ]
    assert bl.url_digest() and bl.hash_digest()
    assert takedown.Blocklist().url_digest() == "" and not takedown.Blocklist()


# ---------------------------------------------------------------------------------------------
# Gather: url and domain entries on the image URL and the page URL


def test_gather_drops_pairs_whose_image_or_page_is_taken_down():
    bl = takedown.parse_blocklist(
        "url http://img.example/a.jpg\ndomain photos.example.org\nurl http://pages.example/p1\n"
    )
    cfg = GatherConfig(captions=CaptionConfig(languages=(), language_detector="none"))
    flt = pairs.PairFilter(cfg, QueryMatcher(["dog"]), blocklist=bl)
    batch = RawBatch(
        "src",
        [
            "http://IMG.example/a.jpg",
            "http://img.example/b.jpg",
            "https://cdn.photos.example.org/c.jpg",
            "http://img.example/d.jpg",
            "http://img.example/e.jpg",
            "javascript:x",
        ],
        ["a dog"] * 6,
        [None, None, None, "http://pages.example/p1#top", "http://pages.example/p2", None],
    )
    result = flt.process(batch)
    assert result.kept["url"].to_pylist() == [
        "http://img.example/b.jpg",
        "http://img.example/e.jpg",
    ]
    got = [
        (r["url"], r["reason"], r["detail"], r["page_url"])
        for r in stage.rejected_table(result.rejected, stage="gather").to_pylist()
    ]
    assert got == [
        ("http://img.example/a.jpg", "takedown", "url http://img.example/a.jpg", None),
        (
            "https://cdn.photos.example.org/c.jpg",
            "takedown",
            "domain photos.example.org",
            None,
        ),
        (
            "http://img.example/d.jpg",
            "takedown",
            "url http://pages.example/p1 (page URL)",
            "http://pages.example/p1#top",
        ),
        ("javascript:x", "unsupported_scheme", "", None),  # URL checks come first
    ]
    assert dict(result.counts) == {"input": 6}


# ---------------------------------------------------------------------------------------------
# Finalize: hash entries on every downloaded copy


def test_hash_entries_drop_matching_copies_before_dedup():
    bl = takedown.parse_blocklist(f"sha256 {SHA_A}\nphash {PHASH} 2\n")
    pairs_ = [{"uid": "u", "caption": "c", "query_ids": [0]}]
    records = [
        {"key": "k1", "url": "http://h/1", "sha256": SHA_A, "phash": "0000000000000000"},
        {
            "key": "k2",
            "url": "http://h/2",
            "sha256": "c" * 64,
            "phash": f"{int(PHASH, 16) ^ 3:016x}",
        },
        {
            "key": "k3",
            "url": "http://h/3",
            "sha256": "d" * 64,
            "phash": f"{int(PHASH, 16) ^ 7:016x}",
        },
    ]
    result = drop_taken_down([{**r, "pairs": pairs_} for r in records], bl)
    assert [r["key"] for r in result.kept] == ["k3"]
    assert [(r["key"], r["detail"]) for r in result.rejected] == [
        ("k1", f"sha256 {SHA_A}"),
        ("k2", f"phash {PHASH} 2"),
    ]
    counts = stage.flow_counts(result.kept, result.rejected, flow=False, pairs=True)
    assert dict(counts) == {"dropped:takedown": 2, "pair/dropped:takedown": 2}


# ---------------------------------------------------------------------------------------------
# wit remove


def _sample(i: int, **extra) -> dict:
    url = f"http://img{i % 3}.example/{i}.jpg"
    key = urls.url_uid(url)
    pair = {
        "uid": urls.pair_uid(url, f"a dog {i}"),
        "caption": f"a dog {i}",
        "query_ids": [0],
        "language": "en",
        "page_url": f"http://pages.example/{i}",
        "source": "crawl.warc.gz",
    }
    image = encode(photo(48, 48, seed=i), "JPEG", quality=90)
    record = {
        "key": key,
        "url": url,
        "caption": pair["caption"],
        "query_ids": [0],
        "width": 48,
        "height": 48,
        "original_width": 48,
        "original_height": 48,
        "sha256": hashlib.sha256(image).hexdigest(),
        "phash": f"{i:016x}",
        "image_key": key,
        "duplicate_of": None,
        "duplicate_group": None,
        "balance_probability": 1.0,
        "pairs": [pair],
        "duplicates": [],
        **extra,
    }
    return record, image


@pytest.fixture
def release_input(tmp_path):
    """A finished build's shards: 12 samples in 3 shards of 4, with a merged copy on one."""
    out = tmp_path / "build"
    directory = str(out / "shards")
    members = [_sample(i) for i in range(12)]
    copy = {"key": "c" * 32, "url": "http://mirror.example/x.jpg", "phash": "00000000000000ff"}
    members[5][0]["duplicates"] = [{**copy, "distance": 3, "sha256": "e" * 64}]
    members.sort(key=lambda m: m[0]["key"])
    infos = []
    for shard_id in range(3):
        result = final_shards.write_final_shard(
            directory, shard_id, members[shard_id * 4 : shard_id * 4 + 4]
        )
        infos += result.outputs["infos"]
    final_shards._finish_shards(infos, directory, {"balance": {"t": 3}})
    return out, [m[0] for m in members]


def read(path) -> bytes:
    return pathlib.Path(path).read_bytes()


def _members(tar_path):
    """name -> (header bytes, data) of every member, as written."""
    out = {}
    data = pathlib.Path(tar_path).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            out[m.name] = (
                data[m.offset : m.offset_data],
                data[m.offset_data : m.offset_data + m.size],
            )
    return out


def test_remove_writes_a_release_with_untouched_members_byte_identical(release_input, tmp_path):
    src, samples = release_input
    by_key = {s["key"]: s for s in samples}
    chosen = {
        "url": samples[0],
        "domain-page": samples[1],  # its page URL's host
        "sha256": samples[2],
        "copy-sha256": next(s for s in samples if s["duplicates"]),
    }
    blocklist = tmp_path / "takedown.txt"
    blocklist.write_text(
        f"url {chosen['url']['url']}\n"
        f"url {chosen['domain-page']['pairs'][0]['page_url']}\n"
        f"sha256 {chosen['sha256']['sha256']}\n"
        f"sha256 {'e' * 64}\n"
        "domain nothing-here.example\n"
    )
    out = tmp_path / "release"
    doc = remove_samples(str(src), str(out), [str(blocklist)])
    removed = {s["key"] for s in chosen.values()}
    assert doc["counters"] == {"dropped:takedown": 4, "input": 12, "kept": 8}
    assert doc["pair_counters"] == {"dropped:takedown": 4, "input": 12, "kept": 8}
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    release = manifest["release"]
    assert release["previous"] == {
        "path": str(src),
        "manifest_sha256": hashlib.sha256(
            (src / "shards" / "manifest.json").read_bytes()
        ).hexdigest(),
        "num_samples": 12,
    }
    assert [(r["key"], r["entry"]) for r in release["removed"]] == sorted(
        [
            (chosen["url"]["key"], f"url {chosen['url']['url']}"),
            (
                chosen["domain-page"]["key"],
                f"url {chosen['domain-page']['pairs'][0]['page_url']} (page URL)",
            ),
            (chosen["sha256"]["key"], f"sha256 {chosen['sha256']['sha256']}"),
            (chosen["copy-sha256"]["key"], f"sha256 {'e' * 64} (copy {'c' * 32})"),
        ]
    )
    assert all(r["url"] == by_key[r["key"]]["url"] for r in release["removed"])
    assert release["blocklists"][0]["sha256"] == hashlib.sha256(blocklist.read_bytes()).hexdigest()
    assert manifest["num_samples"] == 8 and manifest["config"] == {"balance": {"t": 3}}
    assert manifest["train_data"] == "{00000..00002}.tar"
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == 8
    # Every member of every kept sample is byte-identical (header and data); shards without
    # removals are the same files.
    for shard_id in range(3):
        old_tar, old_pq = shards.shard_paths(str(src / "shards"), shard_id)
        new_tar, new_pq = shards.shard_paths(str(out / "shards"), shard_id)
        old, new = _members(old_tar), _members(new_tar)
        keep = {n: v for n, v in old.items() if n.split(".")[0] not in removed}
        assert new == keep
        assert list(new) == list(keep)  # same order
        old_rows = pq.read_table(old_pq).to_pylist()
        assert pq.read_table(new_pq).to_pylist() == [r for r in old_rows if r["key"] not in removed]
        assert sizes[f"{shard_id:05d}.tar"] == len(keep) // 3
        info = manifest["shards"][shard_id]
        assert info["sha256"] == hashlib.sha256(read(new_tar)).hexdigest()
        if len(keep) == len(old):
            assert read(new_tar) == read(old_tar)
            assert read(new_pq) == read(old_pq)
    # The removed samples' rows, for audits.
    rejected = pq.read_table(out / "rejected" / "removed.parquet").to_pylist()
    assert sorted(r["key"] for r in rejected) == sorted(removed)
    assert {(r["stage"], r["reason"]) for r in rejected} == {("remove", "takedown")}
    # A rerun writes the same bytes.
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli.main(["remove", "-i", str(src), "-o", str(out), "--blocklist", str(blocklist)]) == 0
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_remove_refuses_what_is_not_a_new_release(release_input, tmp_path, capsys):
    src, samples = release_input
    blocklist = tmp_path / "t.txt"
    blocklist.write_text(f"url {samples[0]['url']}\n")
    for args, msg in [
        (["-i", str(src), "-o", str(src)], "--output must be another directory than --input"),
        (["-i", str(tmp_path), "-o", str(tmp_path / "x")], "holds no finished build"),
        (["-i", str(src), "-o", str(blocklist.parent)], "is not empty"),
    ]:
        assert cli.main(["remove", *args, "--blocklist", str(blocklist)]) == 2
        assert msg in capsys.readouterr().err
    blocklist.write_text("url nope\n")
    assert (
        cli.main(
            ["remove", "-i", str(src), "-o", str(tmp_path / "r"), "--blocklist", str(blocklist)]
        )
        == 2
    )
    assert f"{blocklist}:1: not an absolute http(s) URL" in capsys.readouterr().err


def test_match_sample_checks_copies_and_pages():
    record, _ = _sample(4)
    record["duplicates"] = [
        {"key": "d1", "url": "http://mirror.example/m.jpg", "phash": PHASH, "sha256": None}
    ]
    bl = takedown.parse_blocklist("domain mirror.example\n")
    assert match_sample(record, bl) == "domain mirror.example (copy d1)"
    bl = takedown.parse_blocklist(f"phash {PHASH} 0\n")
    assert match_sample(record, bl) == f"phash {PHASH} 0 (copy d1)"
    bl = takedown.parse_blocklist("domain pages.example\n")
    assert match_sample(record, bl) == "domain pages.example (page URL)"
    assert match_sample(record, takedown.parse_blocklist("domain other.example\n")) is None


# ---------------------------------------------------------------------------------------------
# Fingerprints


def test_blocklist_entries_decide_the_steps_they_apply_to(tmp_path):
    f = tmp_path / "a.warc.gz"
    f.write_bytes(b"x")
    q = tmp_path / "q.txt"
    q.write_text("dog\n")
    bl = tmp_path / "t.txt"

    def fps(text: str | None) -> dict[str, str]:
        cfg = config.BuildConfig()
        if text is not None:
            bl.write_text(text)
            cfg = config.apply_overrides(cfg, {"takedown.blocklists": [str(bl)]})
        return build.fingerprints(cfg, build.resolve_inputs([str(f)], str(q), cfg))

    base = fps(None)
    assert fps("# nothing yet\n") == base  # no entries: nothing changes
    with_hash = fps(f"sha256 {SHA_A}\n")
    assert [s for s in build.STEPS if with_hash[s] != base[s]] == ["finalize", "report"]
    with_url = fps(f"sha256 {SHA_A}\ndomain x.example\n")
    assert [s for s in build.STEPS if with_url[s] != with_hash[s]] == list(build.STEPS)
    # Comments, order and spelling do not count; the entries do.
    assert fps(f"# moved\ndomain X.example.\n\nsha256 {SHA_A.upper()}\n") == with_url
    inputs = build.resolve_inputs(
        [str(f)],
        str(q),
        config.apply_overrides(config.BuildConfig(), {"takedown.blocklists": [str(bl)]}),
    )
    recorded = inputs.to_dict()["takedown"]
    assert recorded["blocklists"][0]["sha256"] == hashlib.sha256(bl.read_bytes()).hexdigest()
    assert recorded["url_entries"] and recorded["hash_entries"]
    assert "takedown" not in build.resolve_inputs([str(f)], str(q), config.BuildConfig()).to_dict()
