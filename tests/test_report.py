"""The report's tables and figures from literal build outputs (no pipeline)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from test_build import DOWNLOAD, FINALIZE, GATHER, PREBALANCE

from wit_pipeline import report, run_stats


@pytest.fixture
def output(tmp_path) -> report.BuildOutput:
    stats = run_stats.compose_stats(
        gather_doc=GATHER, prebalance_doc=PREBALANCE, download_doc=DOWNLOAD, finalize_doc=FINALIZE
    )
    table = pa.table(
        {
            "query_id": pa.array([0, 1, 2], pa.int32()),
            "query": ["dog", "cat", "tent"],
            "before": pa.array([40, 6, 1], pa.int64()),
            "after_prebalance": pa.array([20, 6, 1], pa.int64()),
            "after_download": pa.array([18, 5, 1], pa.int64()),
            "after_dedup": pa.array([15, 5, 0], pa.int64()),
            "final": pa.array([5, 5, 0], pa.int64()),
            "p_prebalance": [0.25, 1.0, 1.0],
            "p_balance": [1 / 3, 1.0, None],
        }
    )
    return report.BuildOutput(
        directory=str(tmp_path),
        stats=stats,
        config={"balance": {"t": 5, "prebalance_factor": 2.0, "seed": 0}},
        manifest={},
        query_counts=table,
    )


def test_funnel_tables(output):
    lines = report.funnel_markdown(output, "pairs").splitlines()
    assert lines[0] == "| stage | in | kept | dropped | kept % | drop reasons |"
    assert lines[2:] == [
        "| gather | 10 | 7 | 3 | 70.0% | `language` 2, `no_match` 1 |",
        "| prebalance | 7 | 6 | 1 | 85.7% | `prebalance/no_query` 1 |",
        "| download | 6 | 5 | 1 | 83.3% | `http_404` 1 |",
        "| dedup | 5 | 4 | 1 | 80.0% | `dedup/undecodable_image` 1 |",
        "| balance | 4 | 3 | 1 | 75.0% | `balance/no_query` 1 |",
    ]
    reasons = report.reasons_markdown(output).splitlines()[2:]
    assert reasons[0] == "| `language` | gather | 2 |  |"
    assert "| `near_duplicate` | dedup | 0 | 1 |" in reasons


def test_head_and_tail_queries(output):
    head, tail = report.head_tail(output, n=2)
    assert [r["query"] for r in head] == ["dog", "cat"]
    assert [r["query"] for r in tail] == ["tent", "cat"]
    md = report.query_table_markdown(head).splitlines()
    assert md[2] == "| `dog` | 40 | 20 | 18 | 15 | 5 | 0.3333 |"


def test_figures(output):
    fig = report.query_distribution_figure(output)
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    curves = {line.get_label().split(":")[0]: list(line.get_ydata()) for line in ax.get_lines()}
    assert curves["gathered (pairs)"] == [40, 6, 1]
    assert curves["final (samples)"] == [5, 5]  # zero counts are not drawn on a log axis
    assert curves["t = 5"] == [5, 5] and curves["f t = 10"] == [10, 10]
    funnel = report.funnel_figure(output)
    bars = [p.get_width() for p in funnel.axes[0].patches]
    assert bars == [10, 7, 6, 5, 4, 7, 6, 5, 4, 3]  # pairs in, then pairs kept, per stage
    assert report.clip_score_figure(output) is None  # not scored
    text = report.report_markdown(output, plots={"funnel": "plots/funnel.png"})
    assert "![funnel](plots/funnel.png)" in text and "## CLIP score" not in text


def test_column_labels_follow_the_balancing_unit():
    image = report.column_labels({"balance": {"unit": "image"}})
    assert image == report.COLUMN_LABELS
    pair = report.column_labels({"balance": {"unit": "pair"}})
    assert pair["after_dedup"] == "after dedup (pairs)" and pair["final"] == "final (pairs)"
    assert pair["before"] == "gathered (pairs)"
    assert report.column_labels({}) == report.COLUMN_LABELS


def _rejected(directory, rows) -> str:
    import pyarrow.parquet as pq

    from wit_pipeline import stage

    directory.mkdir(parents=True)
    full = [{**dict.fromkeys(stage.REJECTED_FIELDS), **r} for r in rows]
    pq.write_table(
        pa.Table.from_pylist(full, schema=stage.REJECTED_SCHEMA), directory / "a.parquet"
    )
    return str(directory)


def test_opt_outs_per_signal_and_top_domains(tmp_path):
    page = {"reason": "opt_out", "stage": "gather"}
    gather_dir = _rejected(
        tmp_path / "gather",
        [
            {
                **page,
                "detail": "robots-meta:noai",
                "url": "http://cdn.x/1.jpg",
                "policy_url": "http://a.example/p",
            },
            {
                **page,
                "detail": "robots-meta:noai",
                "url": "http://cdn.x/2.jpg",
                "policy_url": "http://a.example/q",
            },
            {
                **page,
                "detail": "tdm-reservation:meta",
                "url": "http://cdn.x/3.jpg",
                "policy_url": "http://b.example/",
            },
            {"reason": "no_match", "detail": "", "url": "http://a.example/4.jpg"},
        ],
    )
    download_dir = _rejected(
        tmp_path / "download",
        [
            {
                "reason": "robots",
                "detail": "disallowed by robots.txt",
                "url": "http://a.example/5.jpg",
                "policy_url": "http://a.example/robots.txt",
            },
            {
                "reason": "robots",
                "detail": "robots.txt unreachable: HTTP 503",
                "url": "http://c.example/6.jpg",
                "policy_url": "http://c.example/robots.txt",
            },
            {
                "reason": "opt_out",
                "detail": "tdmrep.json",
                "url": "http://b.example/7.jpg",
                "policy_url": "http://b.example/.well-known/tdmrep.json",
            },
        ],
    )
    summary = run_stats.opt_out_summary(
        {
            "gather": {"robots-meta:noai": 2, "tdm-reservation:meta": 1},
            "download": {"robots.txt": 1, "tdmrep.json": 1},
        },
        [gather_dir, download_dir, str(tmp_path / "missing")],
    )
    assert summary == {
        "pairs": 5,
        "signals": {
            "robots-meta:noai": {"gather": 2},
            "robots.txt": {"download": 1},
            "tdm-reservation:meta": {"gather": 1},
            "tdmrep.json": {"download": 1},
        },
        "top_domains": [
            {
                "domain": "a.example",
                "pairs": 3,
                "signals": {"robots-meta:noai": 2, "robots.txt": 1},
            },
            {
                "domain": "b.example",
                "pairs": 2,
                "signals": {"tdm-reservation:meta": 1, "tdmrep.json": 1},
            },
        ],
    }
    b = report.BuildOutput(str(tmp_path), {"opt_outs": summary}, {}, {}, None)
    assert report.opt_outs_markdown(b).splitlines() == [
        "| signal | gather | download | pairs |",
        "|---|---:|---:|---:|",
        "| `robots-meta:noai` | 2 |  | 2 |",
        "| `robots.txt` |  | 1 | 1 |",
        "| `tdm-reservation:meta` | 1 |  | 1 |",
        "| `tdmrep.json` |  | 1 | 1 |",
        "",
        "Top domains:",
        "",
        "| domain | pairs | signals |",
        "|---|---:|---|",
        "| `a.example` | 3 | `robots-meta:noai` 2, `robots.txt` 1 |",
        "| `b.example` | 2 | `tdm-reservation:meta` 1, `tdmrep.json` 1 |",
    ]
    empty = report.BuildOutput(str(tmp_path), {"opt_outs": {"signals": {}}}, {}, {}, None)
    assert report.opt_outs_markdown(empty) == "No pair was dropped by an opt-out signal."
    assert "## Opt-outs" in report.report_markdown(b)


def test_takedowns_section_lists_blocklists_and_removals(tmp_path):
    stats = {
        "counters": {"dropped:gather/takedown": 3, "dropped:dedup/takedown": 2},
        "image_counters": {"dropped:dedup/takedown": 1},
        "reason_stage": {"dropped:gather/takedown": "gather", "dropped:dedup/takedown": "dedup"},
        "takedown": {
            "blocklists": [
                {
                    "path": "/t.txt",
                    "sha256": "ab" * 32,
                    "entries": {"url": 2, "domain": 0, "sha256": 1, "phash": 0},
                }
            ]
        },
    }
    b = report.BuildOutput(str(tmp_path), stats, {}, {}, None)
    assert report.takedowns_markdown(b).splitlines() == [
        f"- `/t.txt` (sha256 `{'ab' * 6}`): 2 url, 1 sha256",
        "",
        "| stage | pairs | images |",
        "|---|---:|---:|",
        "| dedup | 2 | 1 |",
        "| gather | 3 |  |",
    ]
    assert "## Takedowns" in report.report_markdown(b)


def test_clip_score_figure_draws_pool_null_and_threshold(output, tmp_path):
    import dataclasses

    import numpy as np
    import pyarrow.parquet as pq

    from wit_pipeline.config import ScoreConfig
    from wit_pipeline.stages.score import calibrate

    pool = [0.05, 0.1, 0.12, 0.5, 0.55, 0.6, 0.62, 0.7]
    null = [0.0, 0.05, 0.08, 0.1, 0.15]
    decision = calibrate.decide(ScoreConfig(threshold="auto"), calibrate.histogram(pool), null)
    doc = {**decision.doc, "seed_model": {"model": "wit-nano", "pretrained": "/x/seed.pt"}}
    scores = tmp_path / "finalize" / "scores"
    scores.mkdir(parents=True)
    pq.write_table(
        pa.table({"key": [f"k{i}" for i in range(8)], "uid": ["u"] * 8, "clip_score": pool}),
        scores / "part-0.parquet",
    )
    scored = dataclasses.replace(
        output,
        stats={**output.stats, "score": doc},
        config={**output.config, "score": {"pretrained": "/x/seed.pt"}},
    )
    fig = report.clip_score_figure(scored)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    share = doc["mismatched_share"]
    thr = doc["threshold"]
    kept = sum(s >= thr for s in pool)
    assert labels[0] == "pool pairs"
    assert labels[1] == f"null x {share:.2f} of the pool (mismatched, 5 pairs)"
    assert labels[2].startswith(f"threshold {thr:.4f} (auto): {kept:,} pairs kept\nexpected")
    pool_stairs, null_stairs = ax.patches[0], ax.patches[1]
    assert pool_stairs is not None and null_stairs is not None
    edges = np.asarray(doc["histogram"]["edges"])
    assert ax.get_lines()[0].get_xdata()[0] == thr and edges[0] <= 0.0 < 0.7 < edges[-1]
    assert ax.get_title() == "CLIP scores of 8 deduplicated pairs"
    text = report.report_markdown(scored, plots={"clip_scores": "plots/clip_scores.png"})
    assert f"Seed model `wit-nano` (`seed.pt`); threshold {thr:.4f}." in text
    assert f"Estimated mismatched share {share:.3f} of 8 pairs (a null of 5 images" in text
    met = "reached" if doc["target_met"] else "**not reached**: highest expected precision"
    assert f"Auto threshold for target precision 0.95: {met}." in text
    assert report.column_labels(scored.config)["after_dedup"] == "after dedup + score (samples)"
