"""Writers that cleaned or wrote only local disks, now the same on object stores.

- the download removes killed writers' temporaries under ``shards/`` and ``rejected/`` in one
  pass before any shard writer starts, local or remote (``repair.list_finished``);
- ``steps.clear_parts`` (dedup, balance, prebalance, finalize's ``rejected/``) removes the
  ``part-*`` files of an earlier run with another part count, Beam's ``beam-temp-*`` folders and
  temporaries, local or remote;
- the final-shards writer removes the shards of an earlier, larger run, local or remote;
- training: ``loss.png``/``eval.png`` are written atomically and ``metrics.jsonl`` works with a
  remote ``--output`` (kept locally, uploaded atomically at each checkpoint);
- the demo web's completion marker ``web.json`` is written atomically.

Remote cases run on fsspec's ``memory://`` filesystem (in-process, so Beam's in-process runner
and the test see the same store) and on ``failing-memory://`` (tests/test_fileio.py), whose
uploads fail on request.
"""

from __future__ import annotations

import io
import json
import os
import pathlib

import fsspec
import pyarrow as pa
import pytest
from download_helpers import OPTIONS, pair, write_candidates
from download_server import JPEG
from PIL import Image
from test_fileio import FailingMemoryFileSystem, Faults, inject, objects

from wit_pipeline import fileio, shards, steps, urls
from wit_pipeline.config import DownloadConfig
from wit_pipeline.loopback import ImageServer
from wit_pipeline.stages import shards as shards_stage
from wit_pipeline.stages.download import plan

MEMORY = fsspec.filesystem("memory")


@pytest.fixture
def mem(request):
    """A fresh ``memory://`` folder for this test, removed afterwards."""
    root = f"memory://{request.node.name.replace('[', '-').rstrip(']')}"
    yield root
    if MEMORY.exists(root):
        MEMORY.rm(root, recursive=True)


@pytest.fixture(autouse=True)
def _clean_failing_store():
    FailingMemoryFileSystem.store.clear()
    FailingMemoryFileSystem.faults = Faults()
    yield
    FailingMemoryFileSystem.store.clear()
    FailingMemoryFileSystem.faults = Faults()


def remote_tree(root: str) -> dict[str, bytes]:
    base = root.removeprefix("memory://").strip("/")
    return {
        p.strip("/").removeprefix(base).lstrip("/"): MEMORY.cat_file(p)
        for p in sorted(MEMORY.find(root))
    }


# ---------------------------------------------------------------------------------------------
# The download: temporaries of killed writers, on an object store


def run_download(input_dir: str, output_dir: str, config: DownloadConfig) -> dict:
    import apache_beam as beam

    from wit_pipeline.stages.download import transforms as download

    with beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(OPTIONS)) as p:
        _ = (
            p
            | download.ReadCandidates(files=download.candidate_files(input_dir))
            | download.DownloadImages(output_dir=output_dir, config=config)
        )
    return fileio.read_json(fileio.join(output_dir, "stats.json"))


def test_a_remote_download_rerun_removes_temporaries_and_redoes_the_unfinished_shard(tmp_path, mem):
    out = f"{mem}/download"
    with ImageServer() as server:
        server.route("/a.jpg", lambda req: req.send_plain(200, JPEG, "image/jpeg"))
        rows = [pair(server.url(f"/{c}.jpg"), f"photo {c}") for c in "abcdef"]
        input_dir = write_candidates(tmp_path / "in", rows)
        cfg = DownloadConfig(allow_loopback=True, samples_per_shard=2, retries=0)
        stats = run_download(input_dir, out, cfg)
        assert stats["url_counters"] == {"input": 6, "kept": 1, "dropped:http_404": 5}
        before = remote_tree(out)
        victim = plan.finished_shards(out)[0]
        name = f"{victim:05d}"
        assert {f"shards/{name}.tar", f"rejected/{name}.parquet"} <= set(before)
        # What a SIGKILL leaves: temporaries in both folders, one shard without its mark.
        left = [
            fileio.temporary_path(f"{out}/shards/{name}.tar"),
            fileio.temporary_path(f"{out}/shards/{name}.parquet"),
            fileio.temporary_path(f"{out}/rejected/00009.parquet"),
        ]
        for t in left:
            MEMORY.pipe(t, b"partial")
        MEMORY.rm(f"{out}/shards/{name}.parquet")
        server.requests.clear()
        assert run_download(input_dir, out, cfg) == stats
        policies = {"/robots.txt", "/.well-known/tdmrep.json"}
        refetched = {p for _, p in server.requests if p not in policies}
        of_victim = {
            f"/{c}.jpg"
            for c in "abcdef"
            if plan.shard_of(urls.url_uid(urls.normalize_url(server.url(f"/{c}.jpg"))), 3) == victim
        }
    assert refetched and refetched == of_victim  # the unfinished shard's URLs only
    assert remote_tree(out) == before  # the same bytes, no temporary left


# ---------------------------------------------------------------------------------------------
# Stale parts and stale final shards, on an object store


def test_clear_parts_cleans_remote_folders(mem):
    d = f"{mem}/rejected"
    for name in (
        "part-00000-of-00003.parquet",
        "part-00002-of-00003.parquet",
        "beam-temp-part-0f0f/1234.parquet",
        ".part-00001-of-00002.parquet.0123456789abcdef0123456789abcdef.tmp",
        "stats.json",
        "notes-part-1.txt",
    ):
        MEMORY.pipe(f"{d}/{name}", b"x")
    steps.clear_parts(d)
    assert sorted(remote_tree(d)) == ["notes-part-1.txt", "stats.json"]
    steps.clear_parts(f"{mem}/missing")  # nothing there: nothing to do


def test_clear_parts_cleans_local_folders_the_same_way(tmp_path):
    d = tmp_path / "rejected"
    (d / "beam-temp-part-0f0f").mkdir(parents=True)
    (d / "beam-temp-part-0f0f" / "1234.parquet").write_bytes(b"x")
    for name in ("part-00000-of-00003.parquet", ".part-x.parquet.ab.tmp", "stats.json"):
        (d / name).write_bytes(b"x")
    steps.clear_parts(str(d))
    assert sorted(p.name for p in d.iterdir()) == ["stats.json"]


SAMPLES = [
    shards.Sample(key=f"k{i:03d}", image=b"img%d" % i, caption=f"c{i}", meta={"i": i})
    for i in range(4)
]


def test_final_shards_of_a_larger_earlier_run_are_removed_remotely(mem):
    d = f"{mem}/shards"
    table = pa.table({"key": ["k"]})
    for shard_id in range(4):  # an earlier run wrote 4 shards
        shards.write_shard(d, shard_id, SAMPLES[shard_id : shard_id + 1], table)
    MEMORY.pipe(f"{d}/README.txt", b"mine")
    infos = [shards.write_shard(d, i, SAMPLES[i : i + 1], table) for i in range(2)]
    manifest = shards_stage._finish_shards(infos, d, {"seed": 1})
    assert manifest["num_shards"] == 2 and manifest["train_data"] == "{00000..00001}.tar"
    assert sorted(remote_tree(d)) == [
        "00000.parquet",
        "00000.tar",
        "00001.parquet",
        "00001.tar",
        "README.txt",
        "manifest.json",
        "sizes.json",
    ]
    assert json.loads(remote_tree(d)["sizes.json"]) == {"00000.tar": 1, "00001.tar": 1}


# ---------------------------------------------------------------------------------------------
# Training with a remote --output


def _tiny_shards(directory: pathlib.Path) -> str:
    samples = []
    for i in range(16):
        buf = io.BytesIO()
        Image.new("RGB", (40, 36), (37 * i % 256, 11 * i % 256, 5 * i % 256)).save(buf, "JPEG")
        samples.append(shards.Sample(f"s{i:03d}", buf.getvalue(), f"picture {i}", {"i": i}))
    info = shards.write_shard(str(directory), 0, samples, pa.table({"key": [0] * 16}))
    shards.write_manifest(str(directory), [info])
    return str(directory)


def test_training_into_a_remote_output_writes_metrics_plots_and_resumes(tmp_path, mem):
    from wit_pipeline.train import loop
    from wit_pipeline.train.config import TrainConfig

    data = _tiny_shards(tmp_path / "shards")
    out = f"{mem}/run"

    def cfg(**kw):
        args = dict(
            train_data=(data,), output=out, model="wit-nano", epochs=2, batch_size=4,
            workers=0, warmup=1, log_every=1, progress=False, plots=True, shuffle_buffer=0,
        )  # fmt: skip
        return TrainConfig(**{**args, **kw})

    part = loop.train(cfg(stop_after_steps=6))
    assert part["step"] == 6 and part["stopped_early"]
    rows = [json.loads(line) for line in MEMORY.cat_file(f"{out}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    with Image.open(io.BytesIO(MEMORY.cat_file(f"{out}/loss.png"))) as im:
        assert im.format == "PNG" and im.size[0] > 300
    rest = loop.train(cfg(resume="latest"))
    assert rest["step"] == 8
    rows = [json.loads(line) for line in MEMORY.cat_file(f"{out}/metrics.jsonl").splitlines()]
    assert [r["type"] for r in rows].count("config") == 2
    assert [r["step"] for r in rows if r["type"] == "train"] == list(range(1, 9))
    assert sorted(remote_tree(out)) == [  # no evaluation configured: no eval.png
        "checkpoints/epoch_1.pt",
        "checkpoints/epoch_2.pt",
        "checkpoints/latest.pt",
        "loss.png",
        "metrics.jsonl",
    ]


def test_a_failed_plot_upload_leaves_nothing(tmp_path):
    from wit_pipeline.train import metrics

    rows = [{"type": "train", "step": s, "loss": 1.0 / s, "lr": 0.1} for s in (1, 2, 3)]
    base = "failing-memory://bucket/run"
    inject(Faults(after_bytes=1000, match="loss.png"))
    with pytest.raises(OSError, match="injected"):
        metrics.write_plots(rows, base)
    assert objects() == {}
    inject(Faults())
    assert metrics.write_plots(rows, base) == [f"{base}/loss.png"]
    assert list(objects()) == ["/bucket/run/loss.png"]


def test_metrics_log_keeps_a_remote_log_whole_and_skips_a_torn_line(tmp_path, mem):
    from wit_pipeline.train.metrics import MetricsLog

    log = MetricsLog(f"{mem}/metrics.jsonl", enabled=True)
    log.write({"type": "train", "step": 1})
    assert not MEMORY.exists(f"{mem}/metrics.jsonl")  # published at the next sync only
    log.write({"type": "train", "step": 2})
    log.sync()
    assert MEMORY.cat_file(f"{mem}/metrics.jsonl") == (
        b'{"step": 1, "type": "train"}\n{"step": 2, "type": "train"}\n'
    )
    again = MetricsLog(f"{mem}/metrics.jsonl", enabled=True)  # a resumed run starts from it
    assert again.rows() == [{"step": 1, "type": "train"}, {"step": 2, "type": "train"}]
    again.truncate_after(1)
    again.sync()
    assert again.rows() == [{"step": 1, "type": "train"}]
    assert MEMORY.cat_file(f"{mem}/metrics.jsonl") == b'{"step": 1, "type": "train"}\n'

    local = tmp_path / "metrics.jsonl"  # a run killed in the middle of a line
    local.write_text('{"step": 1, "type": "train"}\n{"step": 2, "ty')
    log = MetricsLog(str(local), enabled=True)
    assert log.rows() == [{"step": 1, "type": "train"}]
    log.truncate_after(5)
    assert local.read_text() == '{"step": 1, "type": "train"}\n'
    local.write_text('{"step": 1, "ty\n{"step": 2, "type": "train"}\n')  # not a torn last line
    with pytest.raises(json.JSONDecodeError):
        log.rows()


# ---------------------------------------------------------------------------------------------
# The demo web's completion marker


def test_web_json_is_written_atomically_with_the_same_bytes(tmp_path, monkeypatch):
    from wit_pipeline.demo import web

    cfg = web.WebConfig(n_images=24)
    manifest = web.generate_web(str(tmp_path / "w"), base_url="http://127.0.0.1:1", cfg=cfg)
    text = (tmp_path / "w" / "web.json").read_text()
    assert text == json.dumps(manifest, indent=1)
    assert not [p for p in os.listdir(tmp_path / "w") if fileio.is_temporary(p)]

    real_dump = json.dump

    def dies_half_way_through_web_json(obj, f, **kw):
        if "web.json" not in os.path.basename(f.name):
            return real_dump(obj, f, **kw)
        f.write(json.dumps(obj, **kw)[:100])
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(web.json, "dump", dies_half_way_through_web_json)
    with pytest.raises(KeyboardInterrupt):
        web.generate_web(str(tmp_path / "k"), base_url="http://127.0.0.1:1", cfg=cfg)
    # No web.json (the web is not taken for a finished one), no temporary left.
    names = os.listdir(tmp_path / "k")
    assert "routes.json" in names and "web.json" not in names
    assert not [p for p in names if fileio.is_temporary(p)]
