"""Kill anywhere, lose nothing: ``wit build`` SIGKILLed once inside each step, rerun each time.

The build is the one of tests/test_build.py (a small web of real Flickr8k photos on loopback,
with every planted case); ``wit_pipeline.kill_anywhere`` (the script users run on their own
input, with more kills) does the work: an uninterrupted reference, then the killed runs with
their output scanned after each kill, then the output compared with the reference.
"""

from __future__ import annotations

import io
import json
import pathlib
import tarfile

import build_fixture as bf
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_pipeline import build, kill_anywhere

DEV_SET = "flickr8k-dev={root}/flickr8k/captions.tsv?split=dev"


def build_args(web: bf.Web, inputs: tuple[str, str], shared_data: pathlib.Path) -> list[str]:
    warc, queries = inputs
    return [
        "build", "--input", warc, "--queries", queries, "--allow-loopback",
        "--eval-set", DEV_SET.format(root=shared_data),
        "--set", f"balance.t={bf.T}", "--set", f"balance.prebalance_factor={bf.FACTOR}",
        "--set", f"balance.seed={web.seed}", "--set", "download.samples_per_shard=10",
        "--set", "shards.samples_per_shard=8",
    ]  # fmt: skip


@pytest.mark.slow  # seven or more `wit build` processes, one after the other
def test_a_build_killed_once_inside_each_step_ends_byte_identical(shared_data, tmp_path):
    web = bf.Web(shared_data).start()
    try:
        inputs = web.write(tmp_path / "web")
        report = kill_anywhere.run(
            build_args(web, inputs, shared_data),
            str(tmp_path / "work"),
            kills=len(build.STEPS),
            seed=0,
            timeout=900,
        )
    finally:
        web.stop()
    assert report["problems"] == [], json.dumps(report, indent=1)[-4000:]
    assert report["ok"]
    assert all(n >= 1 for n in report["kills_inside_step"].values())
    assert sorted(report["kills_inside_step"]) == sorted(build.STEPS)
    killed = [k for k in report["kills"] if k["killed"]]
    assert len(killed) >= len(build.STEPS)
    assert all(k["problems"] == [] for k in report["kills"])
    for r in report["rounds"]:
        assert r["problems"] == [] and r["differences"] == []
    # The report the script writes is the one returned.
    assert json.loads((tmp_path / "work" / "kill_anywhere.json").read_text()) == report


# ---------------------------------------------------------------------------------------------
# The checks themselves: they must catch what they are for


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_scan_finds_partial_files_under_final_names_and_allows_temporaries(tmp_path):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "prebalance" / "candidates" / "beam-temp-part-1234").mkdir(parents=True)
    tar = _tar({"k.jpg": b"x" * 3000, "k.txt": b"caption"})
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["a", "b"]}), buf)
    parquet = buf.getvalue()
    files = {
        "shards/00000.tar": tar,
        "shards/00001.tar": tar[:2048],  # cut inside the first member
        "shards/00002.tar": tar[: 512 * 9],  # the last member whole, no end-of-archive blocks
        "shards/00000.parquet": parquet,
        "shards/00001.parquet": parquet[:-10],
        "stats.json": b'{"a": 1}',
        "done/gather.json": b'{"step": "gath',
        "config.yaml": b"a: 1\n",
        "report.md": b"# report\n\nhalf a li",
        "shards/.00003.tar.0123456789abcdef0123456789abcdef.tmp": b"partial",
        "prebalance/candidates/beam-temp-part-1234/x.parquet": b"partial",
        "notes.bin": b"?",
    }
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    problems, temporaries = kill_anywhere.scan(str(out))
    assert [p.split(":")[0] for p in problems] == [
        "done/gather.json",
        "notes.bin",
        "report.md",
        "shards/00001.parquet",
        "shards/00001.tar",
        "shards/00002.tar",
    ]
    assert temporaries == [
        "prebalance/candidates/beam-temp-part-1234/x.parquet",
        "shards/.00003.tar.0123456789abcdef0123456789abcdef.tmp",
    ]


def test_compare_ignores_timing_paths_and_resume_counts_only(tmp_path):
    ref, out = tmp_path / "reference", tmp_path / "round-1"
    for root in (ref, out):
        (root / "done").mkdir(parents=True)
        (root / "prebalance").mkdir()
        (root / "shards").mkdir()
        (root / "shards" / "00000.tar").write_bytes(_tar({"k.jpg": b"x"}))
        (root / "prebalance" / "stats.json").write_text(
            json.dumps({"inputs": [f"{root}/gather"], "counters": {"kept": 3}})
        )
    (ref / "done" / "download.json").write_text(
        json.dumps({"fingerprint": "f", "elapsed_s": 3.0, "resumed_shards": 0})
    )
    (out / "done" / "download.json").write_text(
        json.dumps({"fingerprint": "f", "elapsed_s": 1.5, "resumed_shards": 2})
    )
    assert kill_anywhere.compare(str(ref), str(out)) == []
    (out / "shards" / "00000.tar").write_bytes(_tar({"k.jpg": b"y"}))
    (out / "prebalance" / "stats.json").write_text(
        json.dumps({"inputs": [f"{out}/gather"], "counters": {"kept": 4}})
    )
    (out / "done" / ".download.json.0123456789abcdef0123456789abcdef.tmp").write_text("{")
    (out / "stats.json").write_text(json.dumps({"resumed_shards": 1}))  # not a marker
    (ref / "stats.json").write_text(json.dumps({"resumed_shards": 0}))
    assert kill_anywhere.compare(str(ref), str(out)) == [
        "left over (not in the reference): done/.download.json.0123456789abcdef0123456789abcdef.tmp",
        "differs: prebalance/stats.json",
        "differs: shards/00000.tar",
        "differs: stats.json",
    ]


def test_schedule_is_seeded_and_covers_every_step():
    a = kill_anywhere.schedule(12, seed=3)
    assert a == kill_anywhere.schedule(12, seed=3) != kill_anywhere.schedule(12, seed=4)
    assert len(a) == 12 and {s for s, _ in a} == set(build.STEPS)
    assert all(0.05 <= f <= 0.95 for _, f in a)


def test_the_script_refuses_an_output_and_a_folder_that_is_not_its_own(tmp_path):
    with pytest.raises(SystemExit):
        kill_anywhere.main(["--work", str(tmp_path), "--kills", "3", "--", "build", "-i", "x"])
    with pytest.raises(ValueError, match="without --output"):
        kill_anywhere.run(["build", "-i", "x", "--output", "y"], str(tmp_path / "w"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"holds no kill_anywhere\.json"):
        kill_anywhere.run(["build", "-i", "x"], str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
