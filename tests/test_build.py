"""``wit build`` end to end over real Flickr8k photos served on loopback (tests/build_fixture.py).

One module-scoped build is checked against an outcome computed independently from the planted
web (``build_fixture.expected``); then reruns, a refused change of settings, a run killed in the
middle of its download and resumed, and a build with a seed CLIP model reuse the same web.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import build_fixture as bf
import pyarrow.parquet as pq
import pytest
import score_helpers as sh

from wit_pipeline import (
    build,
    cli,
    config,
    counters,
    pipeline,
    report,
    run_stats,
    samples,
    shards,
    urls,
)
from wit_pipeline.errors import WitError
from wit_pipeline.stages.download import plan as download

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEV_SET = bf.DEV_SET


build_args = bf.build_args


@pytest.fixture(scope="module")
def built(web, inputs, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "out"
    assert cli.main(build_args(web, inputs, out, shared_data)) == 0
    return out, json.loads((out / "stats.json").read_text())


def sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(directory: pathlib.Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(directory.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# The build's outcome, exactly


def test_whole_run_counters_are_exact(web, built):
    _out, stats = built
    exp = bf.expected(web)
    assert stats["counters"] == exp.counters
    assert stats["image_counters"] == exp.image_counters
    counters.check_balanced(stats["counters"])
    counters.check_balanced(stats["image_counters"])
    # every planted case is dropped where it is planted, by name
    c = stats["counters"]
    assert (c["dropped:language"], c["dropped:duplicate"], c["dropped:no_match"]) == (3, 1, 1)
    assert (c["dropped:no_caption"], c["dropped:unsupported_scheme"]) == (1, 1)
    assert (c["dropped:robots"], c["dropped:blocked_address"], c["dropped:http_404"]) == (1, 1, 1)
    assert c["dropped:eval_contamination"] == 2
    assert stats["image_counters"]["dropped:near_duplicate"] == exp.near_duplicate == 3
    # both balancing phases cut the head (the draws are checked by the expected outcome)
    assert exp.prebalanced_out > 0 and exp.balanced_out > 0
    assert stats["reason_stage"]["dropped:prebalanced_out"] == "prebalance"
    assert stats["reason_stage"]["dropped:robots"] == "download"
    # the funnel chains: each stage reads what the previous one kept
    rows = stats["funnel"]["pairs"]
    assert [r["stage"] for r in rows] == ["gather", "prebalance", "download", "dedup", "balance"]
    assert rows[0]["input"] == len(web.items)
    for a, b in itertools.pairwise(rows):
        assert a["kept"] == b["input"]
    for r in rows:
        assert r["input"] == r["kept"] + sum(r["dropped"].values())
    assert rows[-1]["kept"] == c["kept"]
    assert stats["samples"] == len(exp.samples) == stats["image_counters"]["kept"]
    assert stats["contamination"]["sets_hit"] == ["flickr8k-dev"]


def test_final_samples_are_exact(web, built):
    out, _ = built
    exp = bf.expected(web)
    rows = {r["key"]: r for r in shards.read_table(str(out / "shards")).to_pylist()}
    assert sorted(rows) == sorted(exp.samples)
    for key, want in exp.samples.items():
        assert rows[key]["captions"] == want["captions"]
        assert rows[key]["query_ids"] == want["query_ids"]
        assert rows[key]["caption"] in want["captions"]
    # the survivor of each planted near-duplicate group holds the captions of the group
    merged = [r for r in rows.values() if r["duplicates"]]
    for r in merged:
        assert len(r["captions"]) == 2 and all(d["distance"] <= 4 for d in r["duplicates"])
    rejected = pq.read_table(out / "rejected").to_pylist()
    near = [r for r in rejected if r["reason"] == "near_duplicate"]
    assert len(near) == exp.near_duplicate == 3 and all(r["duplicate_of"] for r in near)
    dropped_keys = {r["duplicate_of"] for r in near}
    assert dropped_keys <= {r["key"] for r in merged} | {
        r["key"] for r in rejected if r["reason"] == "balanced_out"
    }
    evals = [r for r in rejected if r["reason"] == "eval_contamination"]
    assert sorted(r["eval_id"] for r in evals) == sorted(web.dev)


def test_shards_load_with_webdataset(built):
    import webdataset as wds

    out, stats = built
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == stats["samples"]
    assert manifest["config"] == stats["config"]
    sizes = [s["num_samples"] for s in manifest["shards"]]
    assert sizes[:-1] == [8] * (len(sizes) - 1) and 0 < sizes[-1] <= 8
    for s in manifest["shards"]:
        assert sha(out / "shards" / s["tar"]) == s["sha256"]
    pattern = str(out / "shards" / manifest["train_data"])
    got = list(wds.WebDataset(pattern, shardshuffle=False).decode("pil"))
    assert len(got) == stats["samples"]
    rows = {r["key"]: r for r in shards.read_table(str(out / "shards")).to_pylist()}
    for s in got:
        assert s["jpg"].size[0] > 0
        assert s["json"] == rows[s["__key__"]] and s["txt"] == s["json"]["caption"]


def test_query_counts_columns_are_filled_and_consistent(built):
    out, _ = built
    table = pq.read_table(out / "query_counts.parquet").to_pylist()
    assert [r["query"] for r in table] == [bf.QUERIES[r["query_id"]] for r in table]
    for r in table:
        cols = [r[c] for c in ("before", "after_prebalance", "after_download", "after_dedup")]
        assert None not in cols and r["final"] is not None
        assert r["final"] <= r["after_dedup"] <= r["after_download"]
        assert r["after_download"] <= r["after_prebalance"] <= r["before"]
    final = {r["query_id"]: r["final"] for r in table}
    from_shards: dict[int, int] = {}
    for row in shards.read_table(str(out / "shards")).to_pylist():
        for q in row["query_ids"]:
            from_shards[q] = from_shards.get(q, 0) + 1
    assert {q: n for q, n in final.items() if n} == from_shards
    gathered = pq.read_table(out / "gather" / "candidates").column("query_ids").to_pylist()
    before = {r["query_id"]: r["before"] for r in table}
    for q in before:
        assert before[q] == sum(q in ids for ids in gathered)


def test_report_and_config_files(built):
    from PIL import Image

    out, stats = built
    text = (out / "report.md").read_text()
    for png in ("funnel", "queries", "samples"):
        with Image.open(out / "plots" / f"{png}.png") as im:
            assert im.size[0] > 300
        assert f"plots/{png}.png" in text
    assert not (out / "plots" / "clip_scores.png").exists()
    pre = stats["funnel"]["pairs"][1]
    assert f"| prebalance | {pre['input']} | {pre['kept']} |" in text.replace(",", "")
    assert "`eval_contamination`" in text and "flickr8k-dev" in text
    cfg = config.load_config(str(out / "config.yaml"))
    assert config.to_dict(cfg) == stats["config"]
    assert cfg.balance.t == bf.T and cfg.download.allow_loopback is True
    # `wit report` redraws the same report from the files
    before = (out / "report.md").read_bytes()
    assert cli.main(["report", str(out), "--stats"]) == 0
    assert (out / "report.md").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Reruns


def test_rerun_skips_every_step_and_keeps_the_shards(web, built, inputs, shared_data, capsys):
    out, stats = built
    shards_before = tree(out / "shards")
    markers = {p.name: p.read_bytes() for p in (out / "done").iterdir()}
    capsys.readouterr()
    assert cli.main(build_args(web, inputs, out, shared_data)) == 0
    err = capsys.readouterr().err
    assert err.count("done (skipped)") == len(build.STEPS)
    assert tree(out / "shards") == shards_before
    assert {p.name: p.read_bytes() for p in (out / "done").iterdir()} == markers
    assert json.loads((out / "stats.json").read_text()) == stats


def test_queries_record_and_the_same_list_as_json_is_the_same_build(
    web, built, inputs, shared_data, tmp_path, capsys
):
    out, stats = built
    text = pathlib.Path(inputs[1]).read_bytes()
    want = {
        "path": os.path.abspath(inputs[1]),
        "format": "text",
        "key": "",
        "gzip": False,
        "sha256": hashlib.sha256(text).hexdigest(),  # a clean text list: its text's sha256
        "file_sha256": hashlib.sha256(text).hexdigest(),
        "count": len(bf.QUERIES),
        "unmatchable": 0,
    }
    assert json.loads((out / "build.json").read_text())["inputs"]["queries"] == want
    assert stats["queries"] == want
    # The same entries as a MetaCLIP-style JSON array are the same list: every step is done.
    as_json = tmp_path / "metadata.json"
    as_json.write_text(json.dumps(bf.QUERIES))
    argv = build_args(web, (inputs[0], str(as_json)), out, shared_data)
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert capsys.readouterr().err.count("done (skipped)") == len(build.STEPS)
    # A list with entries MetaCLIP's spacing can never match counts them; the format and the
    # key are recorded.
    as_json.write_text(json.dumps({"entries": [*bf.QUERIES, "St. Louis", "a . b", "Yahoo!"]}))
    got = build.resolve_inputs([inputs[0]], f"{as_json}#entries", config.BuildConfig())
    assert got.to_dict()["queries"] == {
        "path": f"{as_json}#entries",
        "format": "json",
        "key": "entries",
        "gzip": False,
        "sha256": hashlib.sha256(
            ("\n".join([*bf.QUERIES, "St. Louis", "a . b", "Yahoo!"]) + "\n").encode()
        ).hexdigest(),
        "file_sha256": hashlib.sha256(as_json.read_bytes()).hexdigest(),
        "count": len(bf.QUERIES) + 3,
        "unmatchable": 2,
    }


def test_other_settings_are_refused_in_one_line(web, built, inputs, shared_data, capsys):
    out, _ = built
    shards_before = tree(out / "shards")
    capsys.readouterr()
    assert cli.main(build_args(web, inputs, out, shared_data, "--set", "balance.t=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wit: error: ")
    assert "balance.t: 3 -> 2" in err[0] and "--overwrite" in err[0]
    assert "from step prebalance" in err[0]
    # execution-only options are not settings: a rerun with more threads is a plain rerun
    fast = build_args(web, inputs, out, shared_data, "--set", "download.threads=4")
    assert cli.main(fast) == 0
    assert tree(out / "shards") == shards_before


def test_killed_run_resumes_to_the_same_shards(web, built, inputs, shared_data, tmp_path):
    out_ref, stats_ref = built
    out = tmp_path / "killed"
    # Serve as many image requests as the largest download shard has URLs, then hold the rest:
    # the first shard (shards run one after the other) finishes, the next one cannot.
    exp = bf.expected(web)
    n = download.num_shards_for(len(exp.download_urls), 10)
    sizes = collections.Counter(download.shard_of(urls.url_uid(u), n) for u in exp.download_urls)
    assert max(sizes.values()) < len(exp.download_urls) - 3
    web.gate.close(allow=max(sizes.values()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "wit_pipeline", *build_args(web, inputs, out, shared_data)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill takes its workers too
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            finished = list((out / "download" / "shards").glob("*.parquet"))
            if finished and web.gate.waiting:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        else:
            pytest.fail("the first run never finished a download shard")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        web.gate.open()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "done").iterdir()) == ["gather.json", "prebalance.json"]
    done = {p.stem for p in (out / "download" / "shards").glob("*.parquet")}
    done_urls = {
        u for s in done for u in pq.read_table(out / "download" / "shards" / f"{s}.parquet")["url"]
    }
    web.server.requests.clear()
    assert cli.main(build_args(web, inputs, out, shared_data)) == 0
    fetched = {web.url(p) for _, p in web.server.requests if p.startswith("/img/")}
    assert fetched and not (fetched & {u.as_py() for u in done_urls})
    assert tree(out / "shards") == tree(out_ref / "shards")
    assert json.loads((out / "stats.json").read_text()) == stats_ref


def test_without_prebalancing_download_reads_the_gathered_pairs(web, built, inputs, shared_data):
    out_ref, stats_ref = built
    out = out_ref.parent / "no-prebalance"
    shutil.copytree(out_ref, out)
    args = build_args(web, inputs, out, shared_data, "--set", "balance.prebalance_factor=0")
    assert cli.main([*args, "--overwrite"]) == 0
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "done").iterdir()}
    assert markers["gather"] == json.loads((out_ref / "done" / "gather.json").read_text())
    assert markers["prebalance"]["enabled"] is False
    assert not (out / "prebalance").exists()
    stats = json.loads((out / "stats.json").read_text())
    exp = bf.expected(web, factor=None)
    assert stats["counters"] == exp.counters and "dropped:prebalanced_out" not in exp.counters
    assert stats["image_counters"] == exp.image_counters
    assert [r["stage"] for r in stats["funnel"]["pairs"]][:2] == ["gather", "download"]
    assert stats["funnel"]["pairs"][1]["input"] == stats_ref["funnel"]["pairs"][0]["kept"]
    table = pq.read_table(out / "query_counts.parquet").to_pylist()
    assert all(r["before"] == r["after_prebalance"] >= r["after_download"] for r in table)
    assert all(r["p_prebalance"] is None for r in table)


def test_a_build_where_every_download_fails_still_reports_why(tmp_path, capsys):
    from wit_pipeline.demo.web import write_warc
    from wit_pipeline.loopback import ImageServer

    with ImageServer() as srv:
        imgs = "".join(
            f'<img src="{srv.url(f"/missing/{i}.jpg")}" alt="a black dog on the grass">'
            for i in range(3)
        )
        page = f"<html><body>{imgs}</body></html>".encode()
        write_warc(str(tmp_path / "c.warc.gz"), [(srv.url("/p.html"), page)])
        (tmp_path / "q.txt").write_text("dog\ngrass\n")
        args = ["build", "-i", str(tmp_path / "c.warc.gz"), "-q", str(tmp_path / "q.txt")]
        args += ["-o", str(tmp_path / "out"), "--allow-loopback", "--set", "download.retries=0"]
        assert cli.main(args) == 1
    assert "no sample survived" in capsys.readouterr().err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["counters"] == {"input": 3, "kept": 0, "dropped:http_404": 3}
    assert stats["samples"] == 0 and stats["train_data"] == ""
    assert "`http_404` 3" in (tmp_path / "out" / "report.md").read_text()


def test_nonempty_directory_without_a_build_is_refused(web, inputs, shared_data, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(build_args(web, inputs, tmp_path, shared_data)) == 2
    assert "holds no build.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# The seed-model step


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory):
    """A random wit-nano CLIP saved as a plain open_clip state dict (no training needed)."""
    return bf.write_seed_checkpoint(tmp_path_factory.mktemp("seed"))


def scored_build(web, built, inputs, shared_data, seed_checkpoint, name, *extra, **kw):
    """The module's build, copied and rebuilt with a seed (only finalize and report rerun)."""
    out_ref, _ = built
    out = out_ref.parent / name
    shutil.copytree(out_ref, out)
    seed = ["--seed-model", seed_checkpoint, "--seed-arch", "wit-nano"]
    args = build_args(web, inputs, out, shared_data, *seed, *extra)
    build.run_build(
        [inputs[0]], str(out), cli_config(args), queries_path=inputs[1], overwrite=True, **kw
    )
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "done").iterdir()}
    for step in ("gather", "prebalance", "download"):  # unchanged steps were kept
        assert markers[step] == json.loads((out_ref / "done" / f"{step}.json").read_text())
    return out, json.loads((out / "stats.json").read_text())


def download_images(out) -> dict[str, bytes]:
    return {
        s["__key__"]: s["jpg"]
        for tar in shards.list_shards(str(out / "download" / "shards"))
        for s in shards.iter_samples(tar)
    }


def test_seed_model_scores_every_caption_before_balancing(
    web, built, inputs, shared_data, seed_checkpoint
):
    """The real open_clip path (a random wit-nano) with the auto threshold: every pair after
    dedup is scored with the seed's embeddings, the pairs below the threshold leave, balancing
    sees the rest."""
    import torch

    from wit_pipeline import models
    from wit_pipeline.stages import score

    out_ref, _ = built
    args = build_args(web, inputs, out_ref.parent / "refused", shared_data)
    shutil.copytree(out_ref, out_ref.parent / "refused")
    seed = ["--seed-model", seed_checkpoint, "--seed-arch", "wit-nano", "--threshold", "auto"]
    with pytest.raises(WitError, match="from step finalize"):
        build.run_build(
            [inputs[0]],
            str(out_ref.parent / "refused"),
            cli_config([*args, *seed]),
            queries_path=inputs[1],
        )
    out, stats = scored_build(
        web, built, inputs, shared_data, seed_checkpoint, "scored", "--threshold", "auto"
    )
    exp = bf.expected(web)
    pairs = {(k, u): c for k, ps in exp.deduplicated.items() for u, c in ps}
    table = pq.read_table(out / "finalize" / "scores").to_pylist()
    scores = {(r["key"], r["uid"]): r["clip_score"] for r in table}
    assert sorted(scores) == sorted(pairs) and len(table) == len(pairs)
    # the scores are the seed's cosine similarities of each image and each of its captions
    loaded = models.load_model("wit-nano", seed_checkpoint, device="cpu")
    images = download_images(out)
    keys = sorted(pairs)
    torch.set_num_threads(2)
    want = score.score_pairs(loaded, [images[k] for k, _ in keys], [pairs[k] for k in keys])
    assert [scores[k] for k in keys] == pytest.approx(want, abs=1e-4)
    sc = stats["score"]
    assert sc["mode"] == "auto" and sc["threshold_given"] == "auto"
    assert sc["pool_pairs"] == len(pairs) and sc["null_size"] == len(exp.deduplicated)
    assert isinstance(sc["target_met"], bool) and 0 <= sc["mismatched_share"] <= 1
    assert sum(sc["histogram"]["pool"]) == len(pairs)
    assert sum(sc["histogram"]["null"]) == len(exp.deduplicated)
    assert sc["seed_model"] == {"model": "wit-nano", "pretrained": seed_checkpoint}
    threshold = sc["threshold"]
    assert threshold is not None
    low = sorted(k for k, v in scores.items() if v < threshold)
    assert stats["counters"].get("dropped:low_clip_score", 0) == len(low)
    assert [r["stage"] for r in stats["funnel"]["pairs"]][-3:] == ["dedup", "score", "balance"]
    final = {r["key"]: r for r in shards.read_table(str(out / "shards")).to_pylist()}
    for key, row in final.items():
        assert all(p["clip_score"] >= threshold for p in row["pairs"])
        assert [p["clip_score"] for p in row["pairs"]] == [
            scores[(key, p["uid"])] for p in row["pairs"]
        ]
        assert row["clip_score"] == max(p["clip_score"] for p in row["pairs"])
    rejected = [r for r in pq.read_table(out / "rejected").to_pylist() if r["stage"] == "score"]
    assert sorted((r["key"], u) for r in rejected for u in r["uids"]) == low
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["clip_score_threshold"] == threshold and manifest["clip_score_mode"] == "auto"
    assert (out / "plots" / "clip_scores.png").exists()
    assert "Auto threshold for target precision 0.95" in (out / "report.md").read_text()


GOOD = 0.8


def fake_seed(web):
    """Known scores for the web's captions (tests/score_helpers.py): every caption describes its
    photo (0.61 to 0.8) except photo a's own (its group keeps only the lighthouse caption), photo b's
    two (its sample has no good caption), the kayak and the postcard captions (their samples
    lose them); those score like random directions."""
    exp = bf.expected(web)
    (_, cap_a), (_, cap_b) = web.base[:2]
    bad = {
        cap_a,
        cap_b,
        "a lighthouse keeper took this photo",
        "we paddled a kayak near here",
        "a small lighthouse postcard version",
    }
    good = sorted((c, k) for k, ps in exp.deduplicated.items() for _, c in ps if c not in bad)
    matches = {c: (k, GOOD - 0.01 * (i % 20)) for i, (c, k) in enumerate(good)}
    return matches, (lambda key, caption: sh.fake_score(key, caption, matches)), exp


def check_scored_build(web, out, stats, score_fn, threshold):
    """The build's outcome against ``build_fixture.expected`` with the score filter."""
    exp = bf.expected(web, score=score_fn, threshold=threshold)
    assert stats["counters"] == exp.counters
    assert stats["image_counters"] == exp.image_counters
    assert [r["stage"] for r in stats["funnel"]["pairs"]][-3:] == ["dedup", "score", "balance"]
    rows = {r["key"]: r for r in shards.read_table(str(out / "shards")).to_pylist()}
    assert sorted(rows) == sorted(exp.samples)
    for key, want in exp.samples.items():
        row = rows[key]
        assert row["captions"] == want["captions"] and row["query_ids"] == want["query_ids"]
        assert {p["caption"]: p["clip_score"] for p in row["pairs"]} == want["clip_scores"]
        assert (row["caption"], row["clip_score"]) == (want["caption"], want["clip_score"])
    got = pq.read_table(out / "rejected").to_pylist()
    low = [r for r in got if r["reason"] == "low_clip_score"]
    # Keys name the web server's port, so an auto threshold may fall below every pair of a run
    # (then nothing is low); the exact rows follow from the definitions either way.
    assert {r["stage"] for r in low} <= {"score"}
    assert sorted(r["key"] for r in low if r["uid"] is None) == exp.low_score_samples
    assert sorted((r["key"], r["uid"]) for r in low if r["uid"]) == exp.low_score_pairs
    for r in low:
        if r["uid"]:
            assert r["clip_score"] == score_fn(r["key"], r["caption"])
    table = pq.read_table(out / "finalize" / "scores").to_pylist()
    assert sorted((r["key"], r["uid"], r["clip_score"]) for r in table) == sorted(
        (k, u, score_fn(k, c)) for k, ps in exp.deduplicated.items() for u, c in ps
    )
    return exp


def test_a_sample_keeps_its_good_captions_and_one_with_none_is_dropped(
    web, built, inputs, shared_data, seed_checkpoint
):
    matches, fs, exp = fake_seed(web)
    out, stats = scored_build(
        web, built, inputs, shared_data, seed_checkpoint, "fixed", "--threshold", "0.5",
        model_handler=sh.FakeClipHandler(matches),
    )  # fmt: skip
    final = check_scored_build(web, out, stats, fs, 0.5)
    (_, cap_a), (_, cap_b) = web.base[:2]
    lighthouse = f"{cap_a} seen from the lighthouse"
    key_a = next(k for k, ps in exp.deduplicated.items() if any(c == lighthouse for _, c in ps))
    key_b = next(k for k, ps in exp.deduplicated.items() if any(c == cap_b for _, c in ps))
    assert {c for _, c in exp.deduplicated[key_a]} == {cap_a, lighthouse}
    assert fs(key_a, cap_a) < 0.5 and all(fs(key_b, c) < 0.5 for _, c in exp.deduplicated[key_b])
    # one good, one bad caption: only the good one is left, in KEY.json, the Parquet, KEY.txt
    tar_meta = {
        s["__key__"]: (json.loads(s["json"]), s["txt"].decode())
        for tar in shards.list_shards(str(out / "shards"))
        for s in shards.iter_samples(tar)
    }
    meta, txt = tar_meta[key_a]
    assert meta["captions"] == [lighthouse] and txt == lighthouse == meta["caption"]
    (pair,) = meta["pairs"]
    assert pair["clip_score"] == pytest.approx(matches[lighthouse][1], abs=1e-6)
    assert pair["clip_score"] == meta["clip_score"] == fs(key_a, lighthouse)
    assert final.samples[key_a]["captions"] == [lighthouse]
    rejected = pq.read_table(out / "rejected").to_pylist()
    (lost,) = [r for r in rejected if r["key"] == key_a]
    assert (lost["caption"], lost["reason"], lost["stage"]) == (cap_a, "low_clip_score", "score")
    assert lost["clip_score"] == fs(key_a, cap_a)
    assert lost["detail"] == f"clip_score {fs(key_a, cap_a):.4f} < threshold 0.5000"
    # only bad captions: the sample is dropped, its pairs with it
    assert key_b not in tar_meta
    (gone,) = [r for r in rejected if r["key"] == key_b]
    assert gone["reason"] == "low_clip_score" and gone["uid"] is None
    assert sorted(gone["captions"]) == sorted(c for _, c in exp.deduplicated[key_b])
    assert stats["image_counters"]["dropped:low_clip_score"] == len(final.low_score_samples) >= 1
    sc = stats["score"]
    assert (sc["mode"], sc["threshold"], sc["target_met"]) == ("fixed", 0.5, None)
    assert sc["pool_pairs"] == sum(len(ps) for ps in exp.deduplicated.values())


def test_keep_fraction_is_a_fraction_of_the_pairs(web, built, inputs, shared_data, seed_checkpoint):
    from wit_pipeline.stages.score import calibrate

    matches, fs, exp = fake_seed(web)
    out, stats = scored_build(
        web, built, inputs, shared_data, seed_checkpoint, "fraction",
        "--set", "score.keep_fraction=0.5", model_handler=sh.FakeClipHandler(matches),
    )  # fmt: skip
    pool = [fs(k, c) for k, ps in exp.deduplicated.items() for _, c in ps]
    kth = calibrate.top_fraction_threshold(pool, 0.5)
    assert stats["score"]["threshold"] == pytest.approx(kth)
    final = check_scored_build(web, out, stats, fs, kth)
    dropped = final.counters["dropped:low_clip_score"]
    assert dropped == sum(s < kth for s in pool)
    # half the pool is kept (k = round(n / 2)), more only for ties at the threshold (the fake seed's
    # scores repeat every 20 captions, and which caption gets which level depends on the keys,
    # so on the test server's port)
    k = math.floor(0.5 * len(pool) + 0.5)
    assert sum(s > kth for s in pool) < k <= len(pool) - dropped


def test_auto_threshold_end_to_end_on_every_runner(
    web, built, inputs, shared_data, seed_checkpoint, monkeypatch
):
    """``--threshold auto`` with a seed of known scores: the null, the share, the threshold and
    the build follow from their definitions; 2 worker processes and another batch size give
    the same null and the same shards."""
    from wit_pipeline.stages.score import calibrate

    matches, fs, exp = fake_seed(web)
    auto = ["--threshold", "auto", "--set", "score.target_precision=0.9"]
    out, stats = scored_build(
        web, built, inputs, shared_data, seed_checkpoint, "auto", *auto,
        model_handler=sh.FakeClipHandler(matches),
    )  # fmt: skip
    cfg = config.ScoreConfig(threshold="auto", target_precision=0.9)
    pool = [fs(k, c) for k, ps in exp.deduplicated.items() for _, c in ps]
    candidates = []
    for key in calibrate.select_null(exp.deduplicated, cfg.null_samples, cfg.null_seed):
        uid, caption = min(exp.deduplicated[key])
        candidates.append(calibrate.NullCandidate(
            key, calibrate.null_rank(0, key), uid, sh.image_vector(key),
            sh.text_vector(caption, matches)))  # fmt: skip
    want = calibrate.decide(cfg, calibrate.histogram(pool), calibrate.null_scores(candidates))
    sc = stats["score"]
    assert {k: v for k, v in sc.items() if k != "seed_model"} == want.doc
    assert want.threshold is not None and sc["target_met"] is True
    check_scored_build(web, out, stats, fs, want.threshold)
    doc = json.loads((out / "finalize" / "score.json").read_text())
    assert doc["threshold"] == want.threshold and doc["model"] == "wit-nano"
    # the same on two worker processes with batches of 3
    tests_dir = str(pathlib.Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out2, stats2 = scored_build(
        web, built, inputs, shared_data, seed_checkpoint, "auto-2", *auto,
        model_handler=sh.FakeClipHandler(matches, batch_size=3),
        beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
    )  # fmt: skip
    assert stats2["score"] == sc and stats2["counters"] == stats["counters"]
    assert tree(out2 / "shards") == tree(out / "shards")
    assert json.loads((out2 / "finalize" / "score.json").read_text()) == doc


def test_blocklist_leaves_its_matches_out_of_every_output(
    web, built, inputs, shared_data, seed_checkpoint, tmp_path
):
    """A url entry (gather) and a sha256 entry (finalize, before dedup) on a scored build:
    nothing of the matches reaches the shards, the scores or the report's samples."""
    out_ref, _ = built
    final = sorted(shards.read_table(str(out_ref / "shards")).to_pylist(), key=lambda r: r["key"])
    by_url, by_sha = final[0], final[1]
    url, sha = by_url["url"], by_sha["sha256"]
    blocklist = tmp_path / "takedown.txt"
    blocklist.write_text(f"# requests\nurl {url}\nsha256 {sha}\n")
    # What the reference build met of them: gathered pairs of the URL (after the URL checks),
    # downloaded images with those bytes (the URL's own image is never downloaded now).
    gathered = [
        r
        for d in ("candidates", "rejected")
        for r in pq.read_table(out_ref / "gather" / d).to_pylist()
        if r["url"] == url
    ]
    downloaded = shards.read_table(str(out_ref / "download" / "shards")).to_pylist()
    taken_images = {r["key"] for r in downloaded if r["sha256"] == sha and r["url"] != url}
    out = tmp_path / "out"
    seed = ["--seed-model", seed_checkpoint, "--seed-arch", "wit-nano"]
    args = build_args(web, inputs, out, shared_data, *seed, "--blocklist", str(blocklist))
    assert cli.main(args) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counters"]["dropped:gather/takedown"] == len(gathered) > 0
    assert stats["image_counters"]["dropped:dedup/takedown"] == len(taken_images) > 0
    assert stats["reason_stage"]["dropped:dedup/takedown"] == "dedup"
    assert stats["takedown"]["blocklists"][0]["sha256"] == sha256_of(blocklist)
    rows = shards.read_table(str(out / "shards")).to_pylist()
    assert rows and not [
        r
        for r in rows
        if r["url"] == url
        or r["sha256"] == sha
        or r["key"] in taken_images
        or any(d["sha256"] == sha or d["url"] == url for d in r["duplicates"])
    ]
    final_keys = {r["key"] for r in rows}
    scores = pq.read_table(out / "finalize" / "scores").to_pylist()
    assert {r["key"] for r in scores} >= final_keys
    assert not {r["key"] for r in scores} & (taken_images | {by_url["key"]})
    shown = {s["key"] for s in report.samples(str(out), n=len(rows))}
    assert shown == final_keys
    rejected = pq.read_table(out / "rejected").to_pylist()
    takedowns = [r for r in rejected if r["reason"] == "takedown"]
    assert sorted(r["key"] for r in takedowns) == sorted(taken_images)
    assert {(r["stage"], r["detail"]) for r in takedowns} == {("dedup", f"sha256 {sha}")}
    text = (out / "report.md").read_text()
    assert "## Takedowns" in text and str(blocklist) in text


def sha256_of(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli_config(args: list[str]) -> config.BuildConfig:
    from wit_pipeline.cli import args as cli_args

    parsed, _ = cli.build_parser().parse_known_args(args)
    return cli_args.build_config(parsed)


# ---------------------------------------------------------------------------------------------
# Pieces: whole-run counters, fingerprints, config precedence, Dataflow translation

GATHER = {
    "counters": {"input": 10, "kept": 7, "dropped:language": 2, "dropped:no_match": 1},
    "read_counters": {"warc:records": 3},
}
PREBALANCE = {"counters": {"input": 7, "kept": 6, "dropped:no_query": 1}}
DOWNLOAD = {
    "counters": {"input": 6, "kept": 5, "dropped:http_404": 1},
    "url_counters": {"input": 5, "kept": 4, "dropped:http_404": 1},
}
# 4 images (5 pairs): one undecodable, one merged into its near duplicate, one matching no query
FINALIZE = {
    "unit": "image",
    "counters": {
        "input": 4,
        "kept": 1,
        "dropped:undecodable_image": 1,
        "dropped:near_duplicate": 1,
        "dropped:no_query": 1,
    },
    "pair_counters": {
        "input": 5,
        "kept": 3,
        "dropped:undecodable_image": 1,
        "dropped:no_query": 1,
    },
}


def test_compose_stats_names_every_drop_by_its_stage():
    doc = run_stats.compose_stats(
        gather_doc=GATHER, prebalance_doc=PREBALANCE, download_doc=DOWNLOAD, finalize_doc=FINALIZE
    )
    assert doc["counters"] == {
        "input": 10,
        "kept": 3,
        "dropped:language": 2,
        "dropped:no_match": 1,
        "dropped:prebalance/no_query": 1,
        "dropped:http_404": 1,
        "dropped:dedup/undecodable_image": 1,
        "dropped:balance/no_query": 1,
    }
    assert doc["image_counters"] == {
        "input": 5,
        "kept": 1,
        "dropped:http_404": 1,
        "dropped:dedup/undecodable_image": 1,
        "dropped:near_duplicate": 1,
        "dropped:balance/no_query": 1,
    }
    assert [(r["stage"], r["input"], r["kept"]) for r in doc["funnel"]["pairs"]] == [
        ("gather", 10, 7),
        ("prebalance", 7, 6),
        ("download", 6, 5),
        ("dedup", 5, 4),
        ("balance", 4, 3),
    ]
    assert [(r["stage"], r["input"], r["kept"]) for r in doc["funnel"]["images"]] == [
        ("download", 5, 4),
        ("dedup", 4, 2),
        ("balance", 2, 1),
    ]
    assert doc["reason_stage"]["dropped:balance/no_query"] == "balance"
    assert doc["stages"]["gather"]["read_counters"] == {"warc:records": 3}


def test_compose_stats_with_scoring_and_without_prebalance():
    fin = {
        "unit": "image",
        "counters": {
            "input": 4,
            "kept": 1,
            "dropped:undecodable_image": 1,
            "dropped:low_clip_score": 1,
            "dropped:score/undecodable_image": 1,
        },
        "pair_counters": {
            "input": 5,
            "kept": 1,
            "dropped:undecodable_image": 1,
            "dropped:low_clip_score": 2,
            "dropped:score/undecodable_image": 1,
        },
    }
    gather_doc = {"counters": {"input": 7, "kept": 6, "dropped:language": 1}}
    doc = run_stats.compose_stats(
        gather_doc=gather_doc,
        prebalance_doc=None,
        download_doc=DOWNLOAD,
        finalize_doc=fin,
        scored=True,
    )
    assert doc["counters"] == {
        "input": 7,
        "kept": 1,
        "dropped:language": 1,
        "dropped:http_404": 1,
        "dropped:dedup/undecodable_image": 1,
        "dropped:low_clip_score": 2,
        "dropped:score/undecodable_image": 1,
    }
    assert [r["stage"] for r in doc["funnel"]["pairs"]] == [
        "gather",
        "download",
        "dedup",
        "score",
        "balance",
    ]
    with pytest.raises(AssertionError, match="ran no score stage"):
        run_stats.compose_stats(
            gather_doc=gather_doc, prebalance_doc=None, download_doc=DOWNLOAD, finalize_doc=fin
        )


def test_compose_stats_with_one_sample_per_pair():
    fin = {
        "unit": "pair",  # dedup.collapse = false: counters count pair samples
        "counters": {"input": 5, "kept": 4, "dropped:balanced_out": 1},
        "pair_counters": {"input": 5, "kept": 4, "dropped:balanced_out": 1},
    }
    doc = run_stats.compose_stats(
        gather_doc=GATHER, prebalance_doc=PREBALANCE, download_doc=DOWNLOAD, finalize_doc=fin
    )
    assert doc["image_counters"] is None and doc["funnel"]["images"] is None
    assert doc["counters"]["kept"] == 4 and doc["counters"]["dropped:balanced_out"] == 1
    counters.check_balanced(doc["counters"])


def test_compose_stats_refuses_lost_records():
    lost = {**DOWNLOAD, "counters": {"input": 5, "kept": 5}}
    with pytest.raises(AssertionError, match="prebalance kept 6, download read 5"):
        run_stats.compose_stats(
            gather_doc=GATHER, prebalance_doc=PREBALANCE, download_doc=lost, finalize_doc=FINALIZE
        )
    unbalanced = {**FINALIZE, "pair_counters": {**FINALIZE["pair_counters"], "kept": 4}}
    with pytest.raises(AssertionError, match="do not chain"):
        run_stats.compose_stats(
            gather_doc=GATHER,
            prebalance_doc=PREBALANCE,
            download_doc=DOWNLOAD,
            finalize_doc=unbalanced,
        )


def test_colliding_reasons_are_qualified_by_stage():
    assert sorted(run_stats.COLLIDING_REASONS) == [
        "no_query",
        "opt_out",
        "takedown",
        "undecodable_image",
    ]
    assert run_stats.run_reason("gather", "opt_out") == "gather/opt_out"
    assert run_stats.run_reason("prebalance", "no_query") == "prebalance/no_query"
    assert run_stats.run_reason("download", "robots") == "robots"


def _inputs(tmp_path) -> build.BuildInputs:
    f = tmp_path / "a.warc.gz"
    f.write_bytes(b"x")
    q = tmp_path / "q.txt"
    q.write_text("dog\n")
    return build.resolve_inputs([str(f)], str(q), config.BuildConfig())


def test_fingerprints_follow_what_each_step_computes(tmp_path):
    inputs = _inputs(tmp_path)
    base = build.fingerprints(config.BuildConfig(), inputs)

    def changed(**overrides) -> list[str]:
        fp = build.fingerprints(config.apply_overrides(config.BuildConfig(), overrides), inputs)
        return [s for s in build.STEPS if fp[s] != base[s]]

    assert changed(**{"download.threads": 4, "download.processes": 3}) == []
    assert changed(**{"score.batch_size": 8, "score.accelerator": "type:x"}) == []
    # the null's options only count when the build scores
    assert changed(**{"score.target_precision": 0.9, "score.null_samples": 50}) == []
    seeded = config.apply_overrides(config.BuildConfig(), {"score.pretrained": "x.pt"})
    fp = build.fingerprints(seeded, inputs)
    again = build.fingerprints(config.override(seeded, "score.null_seed", 3), inputs)
    assert [s for s in build.STEPS if fp[s] != again[s]] == ["finalize", "report"]
    assert changed(**{"balance.t": 7}) == ["prebalance", "download", "finalize", "report"]
    assert changed(**{"dedup.max_distance": 6}) == ["finalize", "report"]
    assert changed(**{"balance.unit": "pair"}) == ["finalize", "report"]
    assert changed(**{"download.image_size": 64}) == ["download", "finalize", "report"]
    assert changed(**{"gather.captions.min_chars": 3}) == list(build.STEPS)
    (tmp_path / "a.warc.gz").write_bytes(b"y")  # same size, rewritten
    os.utime(tmp_path / "a.warc.gz", ns=(1, 1))
    again = build.fingerprints(config.BuildConfig(), _inputs(tmp_path))
    assert again["gather"] != base["gather"]


def test_config_file_then_set_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "balance:\n  t: 7\n  seed: 3\ndedup:\n  eval_sets: [a=/x]\nscore:\n  model: RN50\n"
    )
    args = [
        "build",
        "-i",
        "x",
        "-o",
        "y",
        "--config",
        str(tmp_path / "c.yaml"),
        "--set",
        "balance.t=8",
        "--eval-set",
        "b=/y",
        "--seed-model",
        "ckpt.pt",
        "--seed-arch",
        "wit-nano",
        "--allow-loopback",
    ]
    cfg = cli_config(args)
    assert (cfg.balance.t, cfg.balance.seed) == (8, 3)
    assert cfg.dedup.eval_sets == ("a=/x", "b=/y")
    assert (cfg.score.pretrained, cfg.score.model) == ("ckpt.pt", "wit-nano")
    assert cfg.download.allow_loopback is True


def test_example_config_is_complete_and_holds_the_defaults():
    import yaml

    path = ROOT / "examples" / "build.yaml"
    cfg = config.load_config(str(path))
    assert cfg == config.BuildConfig()
    written = yaml.safe_load(path.read_text())

    def keys(d, prefix=""):
        return {
            k2
            for k, v in d.items()
            for k2 in (keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"])
        }

    assert keys(written) == keys(config.to_dict(config.BuildConfig()))


def test_finalize_translates_for_dataflow_with_a_gpu_hint(built, seed_checkpoint):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    out, _ = built
    cfg = config.apply_overrides(
        config.load_config(str(out / "config.yaml")),
        {
            "score.pretrained": seed_checkpoint,
            "score.model": "wit-nano",
            "score.keep_fraction": 0.3,
            "score.accelerator": "type:nvidia-tesla-t4;count:1;install-nvidia-driver",
        },
    )
    options = PipelineOptions(
        [
            "--runner=DataflowRunner",
            "--project=my-project",
            "--region=us-central1",
            "--temp_location=gs://bucket/tmp",
            "--no_auth",
            "--dry_run=True",
        ]
    )
    p = beam.Pipeline(options=options)
    pipeline.finalize(
        p,
        output_dir="gs://bucket/out",
        config=cfg,
        work_dir="gs://bucket/out/finalize",
        score=True,
        tars=samples.download_tars([str(out / "download")]),
        query_columns={"before": {0: 3}, "after_prebalance": {0: 2}},
    )
    job = p.run().job  # translates the graph and pickles every DoFn; submits nothing
    comps = job.proto_pipeline.components
    hinted = sorted(
        t.unique_name
        for t in comps.transforms.values()
        if t.environment_id
        and comps.environments[t.environment_id].resource_hints.get("beam:resources:accelerator:v1")
        == b"type:nvidia-tesla-t4;count:1;install-nvidia-driver"
    )
    assert "Score/ClipScore/Score/RunInference" in hinted
    assert "Score/ClipScore/AttachImages" in hinted
    assert all(name.startswith("Score/ClipScore") for name in hinted)


def test_local_parallelism_applies_to_local_runners_only():
    from wit_pipeline.beam_utils import local_parallelism

    two = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    assert local_parallelism([], 2) == two
    assert local_parallelism(["--runner", "DirectRunner"], 2) == ["--runner", "DirectRunner", *two]
    assert local_parallelism([], 1) == []
    assert local_parallelism(["--runner=DataflowRunner"], 4) == ["--runner=DataflowRunner"]
    assert local_parallelism(["--direct_num_workers=3"], 2) == ["--direct_num_workers=3"]
