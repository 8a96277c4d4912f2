"""``wit demo run`` end to end on a small generated web, the local runners, and the notebook.

One module-scoped demo (a small web, pre-balancing off so that every planted item reaches the
stage web.py says catches it, a few training steps) is checked against the web's own list of
planted mess; the same web is then built again with two worker processes and with Beam's
portable runner (in-process job server, LOOPBACK workers), which must write byte-identical
shards; and ``notebooks/inspect_shards.ipynb`` is executed against the build.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import pytest

from wit_pipeline import build, cli, config, runners
from wit_pipeline.demo import audit, scenes
from wit_pipeline.demo import run as demo_run
from wit_pipeline.errors import WitError

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = [
    "web.n_images=100",
    "web.eval_per_class=2",
    "build.balance.t=5",
    "build.balance.prebalance_factor=0",  # every planted item reaches its stage
    "build.download.processes=1",
    "build.shards.samples_per_shard=40",
    "train.max_steps=3",
    "train.batch_size=16",
    "train.warmup=1",
    "train.workers=0",
    "train.progress=false",
    "train.plots=false",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    lines: list[str] = []
    cfg = demo_run.load_demo_config(None, SMALL)
    summary = demo_run.run_demo(str(out), cfg, log=lines.append)
    return out, cfg, summary, lines


def sha_tree(d: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_demo_config_layers():
    cfg = demo_run.load_demo_config()
    assert cfg.build.download.image_size == 64 and cfg.build.balance.t == 100
    assert cfg.train.model == "wit-tiny" and cfg.train.max_steps == 250
    assert cfg.web.n_images == 3000
    cfg = demo_run.load_demo_config(
        str(ROOT / "examples" / "build.yaml"), ["train.max_steps=7"]
    )  # a plain `wit build` config overrides the build section
    assert cfg.build == config.BuildConfig() and cfg.train.max_steps == 7
    with pytest.raises(WitError, match="unknown option pages"):
        demo_run.load_demo_config(None, ["web.pages=3"])


def test_demo_refuses_remote_runners(tmp_path):
    with pytest.raises(WitError, match="remote workers cannot reach"):
        demo_run.run_demo(str(tmp_path), demo_run.load_demo_config(), runner="DataflowRunner")
    assert not list(tmp_path.iterdir())


def test_every_planted_item_is_caught_where_web_py_says(demo):
    out, _cfg, summary, _ = demo
    manifest = json.loads((out / "web" / "web.json").read_text())
    rows = audit.audit(manifest, str(out / "build"))
    assert len(rows) == len(manifest["planted_items"]) == summary["audit"]["items"]
    assert [r for r in rows if r["verdict"] != "caught"] == []
    kinds = {r["kind"] for r in rows}
    assert set(audit.EXPECTED) <= kinds | {"same_url_second_caption"}  # the web is small
    junk = {r["caption"]: r["outcome"] for r in rows if r["kind"] == "junk_caption"}
    assert junk["DSC00012"] == "gather:no_match" and junk[""] == "gather:no_caption"
    assert junk["IMG_2041.JPG"] == "gather:language"
    assert "gather" not in junk["click here"]  # kept by query matching, as documented
    by_kind = summary["audit"]["by_kind"]
    assert by_kind["eval_copy"] == {"caught": 4, "earlier": 0, "missed": 0}
    assert by_kind["redirect_to_private"]["caught"] == 2
    stats = json.loads((out / "build" / "stats.json").read_text())
    assert stats["contamination"]["sets_hit"] == [demo_run.EVAL_SET_NAME]


def test_audit_tells_a_missed_item(demo):
    out, *_ = demo
    trace = audit.trace_urls(str(out / "build"))
    item = {"kind": "robots_disallowed", "url": "http://127.0.0.1:1/private/0.jpg", "caption": ""}
    assert audit.judge(item, trace) == ("missed", "not found in the build")
    manifest = json.loads((out / "web" / "web.json").read_text())
    bomb = next(i for i in manifest["planted_items"] if i["kind"] == "decompression_bomb")
    assert audit.judge({**bomb, "kind": "http_404"}, trace) == ("missed", "download:too_large")


def test_summary_outputs_and_zero_shot(demo):
    out, _cfg, summary, lines = demo
    b = summary["build"]
    stats = json.loads((out / "build" / "stats.json").read_text())
    assert b["samples"] == stats["samples"] > 0 and b["pairs_in"] == stats["counters"]["input"]
    assert stats["counters"]["dropped:balanced_out"] > 0  # t is small enough to act
    assert (out / "build" / "report.md").exists() and (out / "build" / "plots").is_dir()
    z = summary["zeroshot"]
    metrics = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if m["type"] == "eval"][-1]
    assert last["step"] == 3 == summary["train"]["steps"]
    assert z["top1"] == last["metrics"]["heldout/top1"]
    assert z["classes"] == len(scenes.class_names()) == 24 and z["chance_top1"] == 1 / 24
    assert [p.name for p in (out / "train" / "checkpoints").iterdir()] == ["latest.pt"]
    train_yaml = (out / "train" / "train.yaml").read_text()
    assert "wit-tiny" in train_yaml and str(out / "build" / "shards") in train_yaml
    assert json.loads((out / "demo.json").read_text()) == summary
    text = demo_run.format_summary(summary)
    assert f"top-1 {100 * z['top1']:.1f}% on held-out renders, 24 colour x shape classes" in text
    assert "0 missed" in text and "notebooks/inspect_shards.ipynb" in text
    assert any(line.startswith("build: [4/5] finalize") for line in lines)


def test_rerun_reuses_the_web_the_build_and_the_model(demo, capsys):
    out, _cfg, summary, _ = demo
    before = sha_tree(out / "build" / "shards")
    args = ["demo", "run", "--output", str(out)]
    for item in SMALL:
        args += ["--set", item]
    assert cli.main(args) == 0  # the command line gives the same config: nothing to redo
    captured = capsys.readouterr()
    again = json.loads((out / "demo.json").read_text())
    assert again["zeroshot"] == summary["zeroshot"] and again["build"] == summary["build"]
    assert "(reused)" in captured.err
    assert captured.err.count("done (skipped)") == len(build.STEPS) + 1  # + train
    assert captured.out == demo_run.format_summary(again) + "\n"
    assert sha_tree(out / "build" / "shards") == before


def test_a_taken_port_regenerates_the_web(tmp_path):
    import socket

    cfg = demo_run.load_demo_config(None, ["web.n_images=10", "web.eval_per_class=1"]).web
    web_dir = str(tmp_path / "web")
    with demo_run.served_web(web_dir, cfg, log=lambda m: None) as (_, first):
        pass
    port = int(first["base_url"].rsplit(":", 1)[1])
    lines: list[str] = []
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        blocker.bind(("127.0.0.1", port))
        blocker.listen(1)
        with demo_run.served_web(web_dir, cfg, log=lines.append) as (srv, second):
            assert second["base_url"] == srv.base_url != first["base_url"]
    assert lines[0] == f"web: port {port} is taken; generating the web again on a free port"
    with demo_run.served_web(web_dir, cfg, log=lines.append) as (srv, third):
        assert third["base_url"] == second["base_url"]  # free again: reused as it is
    assert lines[-1].endswith("(reused), served at " + second["base_url"])


@pytest.mark.parametrize(
    "runner_args",
    [
        ["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
        ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
    ],
    ids=["two-worker-processes", "portable-loopback"],
)
def test_other_local_runners_write_the_same_shards(demo, runner_args, tmp_path):
    out, cfg, _summary, _ = demo
    assert runners.workers_share_filesystem(runners.runner_of(runner_args), runner_args)
    with demo_run.served_web(str(out / "web"), cfg.web, log=lambda m: None) as (_, manifest):
        args = [
            "build",
            "--input",
            manifest["warc"],
            manifest["table"],
            "--output",
            str(tmp_path / "b"),
            "--config",
            str(out / "build" / "config.yaml"),
            *runner_args,
        ]
        assert cli.main(args) == 0
    assert sha_tree(tmp_path / "b" / "shards") == sha_tree(out / "build" / "shards")
    a = json.loads((tmp_path / "b" / "stats.json").read_text())
    b = json.loads((out / "build" / "stats.json").read_text())
    assert a["counters"] == b["counters"] and a["image_counters"] == b["image_counters"]


def test_notebook_runs_against_the_build(demo):
    import nbformat
    from nbclient import NotebookClient

    out, *_ = demo
    nb = nbformat.read(ROOT / "notebooks" / "inspect_shards.ipynb", as_version=4)
    os.environ["WIT_BUILD_DIR"] = str(out / "build")
    try:
        NotebookClient(
            nb,
            timeout=120,
            kernel_name="python3",
            resources={"metadata": {"path": str(ROOT / "notebooks")}},
        ).execute()
    finally:
        del os.environ["WIT_BUILD_DIR"]
    texts, pngs = [], 0
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            assert o["output_type"] != "error", o
            texts.append(o.get("text", "") + o.get("data", {}).get("text/markdown", ""))
            pngs += "image/png" in o.get("data", {})
    text = "\n".join(texts)
    stats = json.loads((out / "build" / "stats.json").read_text())
    assert f"{stats['samples']:,} samples in {stats['shards']} shard(s)" in text
    assert "| gather |" in text and "`balanced_out`" in text and "**Head queries**" in text
    assert "not scored" in text and "hit(s) for 'red circle'" in text
    assert pngs == 3  # samples, funnel, per-query distribution
