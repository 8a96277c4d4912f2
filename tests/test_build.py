"""``wit build`` end to end over real Flickr8k photos served on loopback (tests/build_fixture.py).

One module-scoped build is checked against an outcome computed independently from the planted
web (``build_fixture.expected``); then reruns, a refused change of settings, a run killed in the
middle of its download and resumed, and a build with a seed CLIP model reuse the same web.
"""

from __future__ import annotations

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

from wit_pipeline import build, cli, config, counters, shards
from wit_pipeline.errors import WitError

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEV_SET = "flickr8k-dev={root}/flickr8k/captions.tsv?split=dev"


@pytest.fixture(scope="module")
def web(shared_data):
    w = bf.Web(shared_data).start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def inputs(web, tmp_path_factory):
    return web.write(tmp_path_factory.mktemp("web"))


def build_args(inputs, out, shared_data, *extra: str) -> list[str]:
    warc, queries = inputs
    return [
        "build",
        "--input",
        warc,
        "--queries",
        queries,
        "--output",
        str(out),
        "--allow-loopback",
        "--eval-set",
        DEV_SET.format(root=shared_data),
        "--set",
        f"balance.t={bf.T}",
        "--set",
        f"balance.prebalance_factor={bf.FACTOR}",
        "--set",
        "download.samples_per_shard=10",
        "--set",
        "shards.samples_per_shard=8",
        *extra,
    ]


@pytest.fixture(scope="module")
def built(web, inputs, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "out"
    assert cli.main(build_args(inputs, out, shared_data)) == 0
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
    assert len(near) == 3 and all(r["duplicate_of"] for r in near)
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


def test_rerun_skips_every_step_and_keeps_the_shards(built, inputs, shared_data, capsys):
    out, stats = built
    shards_before = tree(out / "shards")
    markers = {p.name: p.read_bytes() for p in (out / "done").iterdir()}
    capsys.readouterr()
    assert cli.main(build_args(inputs, out, shared_data)) == 0
    err = capsys.readouterr().err
    assert err.count("done (skipped)") == len(build.STEPS)
    assert tree(out / "shards") == shards_before
    assert {p.name: p.read_bytes() for p in (out / "done").iterdir()} == markers
    assert json.loads((out / "stats.json").read_text()) == stats


def test_other_settings_are_refused_in_one_line(built, inputs, shared_data, capsys):
    out, _ = built
    shards_before = tree(out / "shards")
    capsys.readouterr()
    assert cli.main(build_args(inputs, out, shared_data, "--set", "balance.t=3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wit: error: ")
    assert "balance.t: 5 -> 3" in err[0] and "--overwrite" in err[0]
    assert "from step prebalance" in err[0]
    # execution-only options are not settings: a rerun with more threads is a plain rerun
    fast = build_args(inputs, out, shared_data, "--set", "download.threads=4")
    assert cli.main(fast) == 0
    assert tree(out / "shards") == shards_before


def test_killed_run_resumes_to_the_same_shards(web, built, inputs, shared_data, tmp_path):
    out_ref, stats_ref = built
    out = tmp_path / "killed"
    web.gate.close(allow=12)
    proc = subprocess.Popen(
        [sys.executable, "-m", "wit_pipeline", *build_args(inputs, out, shared_data)],
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
    assert cli.main(build_args(inputs, out, shared_data)) == 0
    fetched = {web.url(p) for _, p in web.server.requests if p.startswith("/img/")}
    assert fetched and not (fetched & {u.as_py() for u in done_urls})
    assert tree(out / "shards") == tree(out_ref / "shards")
    assert json.loads((out / "stats.json").read_text()) == stats_ref


def test_nonempty_directory_without_a_build_is_refused(inputs, shared_data, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(build_args(inputs, tmp_path, shared_data)) == 2
    assert "holds no build.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# The seed-model step


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory):
    """A random wit-nano CLIP saved as a plain open_clip state dict (no training needed)."""
    import open_clip
    import torch

    from wit_pipeline import models

    models.register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("wit-nano")
    path = tmp_path_factory.mktemp("seed") / "seed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


def test_seed_model_scores_and_keeps_the_top_half(built, inputs, shared_data, seed_checkpoint):
    import torch

    from wit_pipeline import models, score

    out_ref, stats_ref = built
    out = out_ref.parent / "scored"
    shutil.copytree(out_ref, out)
    seed = ["--seed-model", seed_checkpoint, "--seed-arch", "wit-nano"]
    args = build_args(inputs, out, shared_data, *seed, "--set", "score.keep_fraction=0.5")
    with pytest.raises(WitError, match="from step finalize"):
        build.run_build(
            [inputs[0]],
            str(out),
            cli_config(args),
            queries_path=inputs[1],
        )
    assert cli.main([*args, "--overwrite"]) == 0
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "done").iterdir()}
    for step in ("gather", "prebalance", "download"):  # unchanged steps were kept
        assert markers[step] == json.loads((out_ref / "done" / f"{step}.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    n = stats_ref["samples"]
    keep = math.floor(0.5 * n + 0.5)
    assert stats["samples"] == keep
    assert stats["image_counters"]["dropped:low_clip_score"] == n - keep
    assert [r["stage"] for r in stats["funnel"]["pairs"]][-1] == "score"
    scores = {
        r["key"]: r["clip_score"] for r in pq.read_table(out / "finalize" / "scores").to_pylist()
    }
    ref_rows = {r["key"]: r for r in shards.read_table(str(out_ref / "shards")).to_pylist()}
    assert sorted(scores) == sorted(ref_rows)
    # the scores are the seed's cosine similarities of each image and its caption
    loaded = models.load_model("wit-nano", seed_checkpoint, device="cpu")
    keys = sorted(ref_rows)
    images = {}
    for tar in shards.list_shards(str(out_ref / "shards")):
        for s in shards.iter_samples(tar):
            images[s["__key__"]] = s["jpg"]
    torch.set_num_threads(2)
    want = score.score_pairs(
        loaded, [images[k] for k in keys], [ref_rows[k]["caption"] for k in keys]
    )
    assert [scores[k] for k in keys] == pytest.approx(want, abs=1e-4)
    kept = {r["key"]: r for r in shards.read_table(str(out / "shards")).to_pylist()}
    top = sorted(keys, key=lambda k: -scores[k])[:keep]
    assert sorted(kept) == sorted(top)
    threshold = stats["score"]["threshold"]
    assert threshold == pytest.approx(min(scores[k] for k in top))
    assert all(r["clip_score"] == pytest.approx(scores[k]) for k, r in kept.items())
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["clip_score_threshold"] == threshold
    assert (out / "plots" / "clip_scores.png").exists()
    rejected = pq.read_table(out / "rejected").to_pylist()
    low = [r for r in rejected if r["reason"] == "low_clip_score"]
    assert sorted(r["key"] for r in low) == sorted(set(keys) - set(top))


def cli_config(args: list[str]) -> config.BuildConfig:
    from wit_pipeline.commands import build as build_cmd

    parsed, _ = cli.build_parser().parse_known_args(args)
    return build_cmd.build_config(parsed)
