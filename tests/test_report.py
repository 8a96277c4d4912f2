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
