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
