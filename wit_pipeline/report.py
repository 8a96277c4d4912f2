"""What a build produced, in tables and plots: the funnel, the per-query distribution, samples.

Every function takes a build output directory (``wit build --output DIR``) or what
:func:`load_build` read from it, so that ``wit report DIR``, the end of ``wit build`` and a
notebook (``notebooks/inspect_shards.ipynb``) draw the same figures. Figures are
``matplotlib.figure.Figure`` objects made without pyplot (no global state; any backend, the Agg
backend when saved to PNG), and tables are Markdown strings or lists of dicts.

- :func:`funnel_markdown`, :func:`funnel_figure`: each stage's input, kept and drop reasons;
- :func:`opt_outs_markdown`, :func:`takedowns_markdown`: pairs dropped per opt-out signal and
  the top domains behind them; the blocklists applied and what they removed;
- :func:`query_distribution_figure`: count per query, sorted, on log-log axes, before and after
  balancing, with the threshold ``t`` marked (MetaCLIP's Figure 2 view);
  :func:`head_tail` lists the head and tail queries;
- :func:`sample_grid_figure`: images of the final shards with their captions;
- :func:`clip_score_figure`: the pool's CLIP scores and the null's on one chart, with the
  threshold, when the build scored;
- :func:`write_report`: ``DIR/report.md`` and ``DIR/plots/*.png``.

A build scored afterwards by ``wit score --input DIR/shards --output SCORED`` (the demo does this
with the model it trained) is read with ``load_build(DIR, scored=SCORED)``: samples then come
from ``SCORED/shards/`` (with ``clip_score``) and the histograms from ``SCORED/score.json``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wit_pipeline import fileio

STATS_FILE = "stats.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
QUERY_COUNTS = "query_counts.parquet"
COUNT_COLUMNS = ("before", "after_prebalance", "after_download", "after_dedup", "final")
COLUMN_LABELS = {
    "before": "gathered (pairs)",
    "after_prebalance": "after pre-balance (pairs)",
    "after_download": "downloaded (pairs)",
    "after_dedup": "after dedup (samples)",
    "final": "final (samples)",
}


def column_labels(config: dict[str, Any]) -> dict[str, str]:
    """``COLUMN_LABELS`` for a build: with ``balance.unit: pair`` the last two columns count
    pairs; in a scored build ``after_dedup`` is also after the CLIP-score filter (what balancing
    drew from)."""
    labels = dict(COLUMN_LABELS)
    if (config.get("balance") or {}).get("unit") == "pair":
        labels = {k: v.replace("(samples)", "(pairs)") for k, v in labels.items()}
    if (config.get("score") or {}).get("pretrained"):
        labels["after_dedup"] = labels["after_dedup"].replace("after dedup", "after dedup + score")
    return labels


@dataclasses.dataclass
class BuildOutput:
    """What :func:`load_build` reads from a build directory."""

    directory: str
    stats: dict[str, Any]
    config: dict[str, Any]
    manifest: dict[str, Any]
    query_counts: Any  # pyarrow.Table, or None when the file is missing
    scored_dir: str = ""  # a `wit score` output of this build's shards ("" when none)
    scored_manifest: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def shards_dir(self) -> str:
        return fileio.join(self.scored_dir or self.directory, "shards")

    @property
    def t(self) -> int:
        return int(self.config.get("balance", {}).get("t", 0))

    @property
    def prebalance_factor(self) -> float:
        return float(self.config.get("balance", {}).get("prebalance_factor", 0))


def load_build(directory: str, *, scored: str | None = None) -> BuildOutput:
    """Read ``stats.json``, the final manifest and ``query_counts.parquet`` of a build.

    ``scored``: a ``wit score`` output of the build's shards, whose shards and scores are shown
    instead of the build's own.
    """
    import pyarrow.parquet as pq

    stats = fileio.read_json(fileio.join(directory, STATS_FILE))
    manifest_path = fileio.join(directory, "shards", "manifest.json")
    manifest = fileio.read_json(manifest_path) if fileio.exists(manifest_path) else {}
    qc_path = fileio.join(directory, QUERY_COUNTS)
    table = None
    if fileio.exists(qc_path):
        with fileio.open_file(qc_path, "rb") as f:
            table = pq.read_table(f)
    return BuildOutput(
        directory=directory,
        stats=stats,
        config=dict(stats.get("config") or manifest.get("config") or {}),
        manifest=manifest,
        query_counts=table,
        scored_dir=scored or "",
        scored_manifest=(
            fileio.read_json(fileio.join(scored, "shards", "manifest.json")) if scored else {}
        ),
    )


def _as_build(build: BuildOutput | str) -> BuildOutput:
    return build if isinstance(build, BuildOutput) else load_build(build)


# ---------------------------------------------------------------------------------------------
# Tables


def _fmt(n: Any) -> str:
    if n is None:
        return ""
    if isinstance(n, float):
        return f"{n:.4g}"
    return f"{int(n):,}"


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A GitHub Markdown table; ``align`` is one of ``l``/``r`` per column (default: l, then r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def funnel_rows(build: BuildOutput | str, unit: str = "pairs") -> list[dict[str, Any]]:
    """``stats.json``'s funnel over ``pairs`` or ``images``: one dict per stage."""
    b = _as_build(build)
    return list((b.stats.get("funnel") or {}).get(unit) or [])


def funnel_markdown(build: BuildOutput | str, unit: str = "pairs", *, top: int = 4) -> str:
    """Stage | in | kept | dropped | share kept | main drop reasons."""
    rows = []
    for r in funnel_rows(build, unit):
        dropped = r["input"] - r["kept"]
        reasons = sorted(r["dropped"].items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"`{k}` {v:,}" for k, v in reasons[:top])
        if len(reasons) > top:
            shown += f", +{len(reasons) - top} more"
        rows.append(
            [
                r["stage"],
                _fmt(r["input"]),
                _fmt(r["kept"]),
                _fmt(dropped),
                _pct(r["kept"], r["input"]),
                shown,
            ]
        )
    return markdown_table(
        ["stage", "in", "kept", "dropped", "kept %", "drop reasons"], rows, "lrrrrl"
    )


def reasons_markdown(build: BuildOutput | str) -> str:
    """Every drop reason of the run: stage, pairs and images it removed."""
    b = _as_build(build)
    pairs = b.stats.get("counters") or {}
    images = b.stats.get("image_counters") or {}
    owner = b.stats.get("reason_stage") or {}
    names = sorted(
        {k for k in (*pairs, *images) if k.startswith("dropped:")},
        key=lambda k: (-(pairs.get(k, 0)), k),
    )
    rows = [
        [f"`{k[len('dropped:') :]}`", owner.get(k, ""), _fmt(pairs.get(k, 0)), _fmt(images.get(k))]
        for k in names
    ]
    return markdown_table(["reason", "stage", "pairs", "images"], rows, "llrr")


def opt_outs_markdown(build: BuildOutput | str) -> str:
    """Pairs dropped per opt-out signal (gather: the page's; download: robots.txt, tdmrep.json,
    the image's headers), and the domains whose policies dropped the most (``stats.json``
    ``opt_outs``, ``run_stats.opt_out_summary``)."""
    o = _as_build(build).stats.get("opt_outs") or {}
    signals = o.get("signals") or {}
    if not signals:
        return "No pair was dropped by an opt-out signal."
    rows = [
        [f"`{name}`", _fmt(per.get("gather")), _fmt(per.get("download")), _fmt(sum(per.values()))]
        for name, per in sorted(signals.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    ]
    out = [markdown_table(["signal", "gather", "download", "pairs"], rows, "lrrr")]
    top = o.get("top_domains") or []
    if top:
        rows = [
            [
                f"`{d['domain']}`",
                _fmt(d["pairs"]),
                ", ".join(f"`{k}` {v:,}" for k, v in sorted(d["signals"].items())),
            ]
            for d in top
        ]
        out += ["", "Top domains:", "", markdown_table(["domain", "pairs", "signals"], rows, "lrl")]
    return "\n".join(out)


def takedowns_markdown(build: BuildOutput | str) -> str:
    """The blocklists a build applied and the pairs each stage dropped as ``takedown``."""
    b = _as_build(build)
    td = b.stats.get("takedown") or {}
    owner = b.stats.get("reason_stage") or {}
    pairs, images = b.stats.get("counters") or {}, b.stats.get("image_counters") or {}
    rows = [
        [owner.get(k, ""), _fmt(pairs.get(k, 0)), _fmt(images.get(k))]
        for k in sorted(set(pairs) | set(images))
        if k.startswith("dropped:") and k.endswith("takedown")
    ]
    out = []
    for f in td.get("blocklists") or []:
        entries = ", ".join(f"{n:,} {kind}" for kind, n in f["entries"].items() if n)
        out.append(f"- `{f['path']}` (sha256 `{f['sha256'][:12]}`): {entries or 'no entries'}")
    if rows:
        out += ["", markdown_table(["stage", "pairs", "images"], rows, "lrr")]
    return "\n".join(out)


def _query_columns(table) -> dict[str, np.ndarray]:
    out = {}
    for name in COUNT_COLUMNS:
        if table is not None and name in table.column_names:
            vals = table.column(name).to_numpy(zero_copy_only=False)
            out[name] = np.asarray([0 if v is None else v for v in vals], dtype=np.int64)
    return out


def head_tail(build: BuildOutput | str, *, n: int = 10, by: str = "before") -> tuple[list, list]:
    """The ``n`` queries with the most and the fewest ``by`` matches (non-zero), as dicts."""
    b = _as_build(build)
    table = b.query_counts
    if table is None or table.num_rows == 0:
        return [], []
    rows = table.to_pylist()
    rows = [r for r in rows if r.get(by)]
    rows.sort(key=lambda r: (-r[by], r["query_id"]))
    tail = sorted(rows, key=lambda r: (r[by], r["query_id"]))[:n]
    return rows[:n], tail


def query_table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    headers = ["query", *COUNT_COLUMNS, "p_balance"]
    body = []
    for r in rows:
        q = r.get("query")
        body.append(
            [
                f"`{q}`" if q is not None else f"#{r['query_id']}",
                *(_fmt(r.get(c)) for c in COUNT_COLUMNS),
                _fmt(r.get("p_balance")),
            ]
        )
    return markdown_table(headers, body)


# ---------------------------------------------------------------------------------------------
# Figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def funnel_figure(build: BuildOutput | str):
    """Pairs (and images) entering and leaving each stage, and the largest drop reasons."""
    b = _as_build(build)
    pairs = funnel_rows(b, "pairs")
    images = funnel_rows(b, "images")
    fig = _figure(11, 4.2)
    ax, ax2 = fig.subplots(1, 2, width_ratios=(1.1, 1))
    stages = [r["stage"] for r in pairs]
    y = np.arange(len(stages))[::-1]
    ax.barh(y, [r["input"] for r in pairs], color="#d9d9d9", label="pairs in")
    ax.barh(y, [r["kept"] for r in pairs], color="#4c72b0", label="pairs kept")
    if images:
        pos = {r["stage"]: i for i, r in enumerate(pairs)}
        iy = [y[pos[r["stage"]]] - 0.3 for r in images if r["stage"] in pos]
        ik = [r["kept"] for r in images if r["stage"] in pos]
        ax.scatter(ik, iy, marker="|", s=120, color="#dd8452", label="images kept", zorder=3)
    for yi, r in zip(y, pairs, strict=True):
        ax.text(r["input"], yi, f" {r['kept']:,}/{r['input']:,}", va="center", fontsize=8)
    ax.set_yticks(y, stages)
    ax.set_xlabel("records")
    ax.set_title("funnel per stage")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, max((r["input"] for r in pairs), default=1) * 1.35)
    drops = sorted(
        ((k, v) for k, v in (b.stats.get("counters") or {}).items() if k.startswith("dropped:")),
        key=lambda kv: (-kv[1], kv[0]),
    )[:12]
    if drops:
        ny = np.arange(len(drops))[::-1]
        ax2.barh(ny, [v for _, v in drops], color="#c44e52")
        ax2.set_yticks(ny, [k[len("dropped:") :] for k, _ in drops], fontsize=8)
        for yi, (_, v) in zip(ny, drops, strict=True):
            ax2.text(v, yi, f" {v:,}", va="center", fontsize=8)
        ax2.set_xlim(0, drops[0][1] * 1.25)
    ax2.set_xlabel("pairs dropped")
    ax2.set_title("largest drop reasons")
    return fig


def query_distribution_figure(build: BuildOutput | str):
    """Matches per query sorted by count (log-log), per stage, with ``t`` (and ``f t``) marked.

    As MetaCLIP's figures: before balancing a few head queries hold most matches; after it no
    query holds much more than ``t``, while the tail is untouched.
    """
    b = _as_build(build)
    cols = _query_columns(b.query_counts)
    fig = _figure(7.5, 4.8)
    ax = fig.subplots()
    styles = {
        "before": ("#4c72b0", "-"),
        "after_prebalance": ("#55a868", "--"),
        "after_download": ("#8172b2", ":"),
        "after_dedup": ("#dd8452", "-."),
        "final": ("#c44e52", "-"),
    }
    drawn = False
    labels = column_labels(b.config)
    for name, arr in cols.items():
        counts = np.sort(arr[arr > 0])[::-1]
        if counts.size == 0:
            continue
        color, ls = styles[name]
        ax.plot(
            np.arange(1, counts.size + 1),
            counts,
            ls,
            color=color,
            label=f"{labels[name]}: {counts.size:,} queries",
            drawstyle="steps-post",
        )
        drawn = True
    if b.t:
        ax.axhline(b.t, color="black", lw=1, ls="--", label=f"t = {b.t:,}")
        if b.prebalance_factor:
            tt = b.t * b.prebalance_factor
            ax.axhline(tt, color="grey", lw=1, ls=":", label=f"f t = {tt:,.0f}")
    if drawn:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("query rank (by count)")
    ax.set_ylabel("matches")
    ax.set_title("per-query distribution before and after balancing")
    ax.legend(fontsize=8)
    return fig


def _first_samples(shards_dir: str, n: int) -> list[dict[str, Any]]:
    from wit_pipeline import shards

    out = []
    for tar in shards.list_shards(shards_dir):
        for s in shards.iter_samples(tar):
            image = next((s[e] for e in ("jpg", "jpeg", "png", "webp") if e in s), None)
            if image is None:
                continue
            meta = json.loads(s["json"]) if "json" in s else {}
            caption = (s.get("txt") or b"").decode("utf-8", errors="replace")
            out.append({"key": s["__key__"], "image": image, "caption": caption, "meta": meta})
            if len(out) >= n:
                return out
    return out


def query_names(build: BuildOutput | str) -> list[str] | None:
    """The query list the build matched against (``stats.json`` records its path and sha256).

    None when the file is gone or changed: ``query_ids`` would then name other queries.
    """
    from wit_pipeline import queries

    b = _as_build(build)
    q = b.stats.get("queries") or {}
    path = q.get("path")
    if not path or not fileio.exists(path):
        return None
    if q.get("sha256") and queries.queries_sha256(path) != q["sha256"]:
        return None
    return queries.load_queries(path)


def _decode_queries(ids: Any, names: Sequence[str] | None) -> list[str]:
    ids = list(ids or [])
    if names is None:
        return [f"#{i}" for i in ids]
    return [names[i] if 0 <= i < len(names) else f"#{i}" for i in ids]


def samples(
    build: BuildOutput | str, *, n: int = 16, names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The first ``n`` final samples: key, image bytes, caption, captions, matched queries
    (decoded with :func:`query_names` when ``names`` is not given), clip_score, url."""
    b = _as_build(build)
    if names is None:
        names = query_names(b)
    out = []
    for s in _first_samples(b.shards_dir, n):
        meta = s["meta"]
        out.append(
            {
                "key": s["key"],
                "image": s["image"],
                "caption": s["caption"],
                "captions": list(meta.get("captions") or [s["caption"]]),
                "queries": _decode_queries(meta.get("query_ids"), names),
                "clip_score": meta.get("clip_score"),
                "url": meta.get("url", ""),
            }
        )
    return out


def search_captions(
    build: BuildOutput | str,
    text: str,
    *,
    limit: int = 20,
    names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Final samples whose captions contain ``text`` (case-insensitive), in shard order.

    Reads only the shards' Parquet files (no images): key, shard, caption, captions, queries,
    clip_score, url per hit.
    """
    import pyarrow.parquet as pq

    from wit_pipeline import shards

    b = _as_build(build)
    needle = text.casefold()
    if names is None:
        names = query_names(b)
    hits: list[dict[str, Any]] = []
    for tar in shards.list_shards(b.shards_dir):
        path = tar[: -len(".tar")] + ".parquet"
        with fileio.open_file(path, "rb") as f:
            table = pq.read_table(f)
        cols = set(table.column_names)
        for row in table.to_pylist():
            caps = list(row.get("captions") or [row.get("caption") or ""])
            if not any(needle in (c or "").casefold() for c in caps):
                continue
            hits.append(
                {
                    "key": row["key"],
                    "shard": os.path.basename(tar),
                    "caption": row.get("caption"),
                    "captions": caps,
                    "queries": _decode_queries(row.get("query_ids"), names),
                    "clip_score": row.get("clip_score") if "clip_score" in cols else None,
                    "url": row.get("url"),
                }
            )
            if len(hits) >= limit:
                return hits
    return hits


def sample_grid_figure(
    build: BuildOutput | str,
    *,
    n: int = 16,
    columns: int = 4,
    show_queries: bool = False,
    names: Sequence[str] | None = None,
):
    """The first ``n`` samples of the final shards (shard order), image and caption each.

    With ``show_queries``, each tile also lists the sample's matched queries (decoded with the
    build's query list) and its CLIP score, when scored.
    """
    from PIL import Image

    b = _as_build(build)
    if show_queries:
        found = samples(b, n=n, names=names)
    else:
        found = [
            {
                "image": s["image"],
                "caption": s["caption"],
                "queries": None,
                "clip_score": s["meta"].get("clip_score"),
            }
            for s in _first_samples(b.shards_dir, n)
        ]
    rows = max(1, -(-len(found) // columns))
    fig = _figure(columns * 2.6, rows * (3.4 if show_queries else 3.0))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, s in zip(axes, found, strict=False):
        with Image.open(io.BytesIO(s["image"])) as img:
            ax.imshow(np.asarray(img.convert("RGB")))
        title = "\n".join(textwrap.wrap(textwrap.shorten(s["caption"], 90, placeholder="..."), 28))
        if s["queries"] is not None:
            q = textwrap.shorten(", ".join(s["queries"]), 60, placeholder="...")
            title += "\n" + "\n".join(textwrap.wrap(f"[{q}]", 32))
        score = s["clip_score"]
        if score is not None:
            title += f"\n(clip {score:.3f})"
        ax.set_title(title, fontsize=7)
    if not found:
        axes[0].text(0.5, 0.5, "no samples", ha="center", va="center")
    return fig


def clip_scores(build: BuildOutput | str) -> np.ndarray | None:
    """Every scored pair's CLIP score (the scores table: ``finalize/scores/``, or
    ``SCORED/scores/``), or None when not scored."""
    import pyarrow.parquet as pq

    b = _as_build(build)
    d = fileio.join(b.scored_dir, "scores") if b.scored_dir else None
    d = d or fileio.join(b.directory, "finalize", "scores")
    if not fileio.exists(d):
        return None
    files = fileio.expand_inputs([d], suffixes=(".parquet",))
    vals = []
    for f in files:
        with fileio.open_file(f, "rb") as fh:
            col = pq.read_table(fh, columns=["clip_score"]).column("clip_score").to_pylist()
        vals.extend(v for v in col if v is not None)
    return np.asarray(vals, dtype=np.float64)


def clip_score_figure(build: BuildOutput | str):
    """The pool's pair scores and the null's (mismatched pairs: images with other images'
    captions) on one chart, with the threshold; None when the build did not score.

    The null is drawn scaled to the estimated number of mismatched pairs in the pool
    (``mismatched_share`` x pairs), so where it covers the pool's histogram the pool is mostly
    mismatched (docs/score.md). Builds scored before the null existed show the pool only.
    """
    b = _as_build(build)
    scores = clip_scores(b)
    if scores is None:
        return None
    sc = _score_info(b)
    hist = sc.get("histogram") or {}
    fig = _figure(6.5, 3.8)
    ax = fig.subplots()
    edges = np.asarray(hist.get("edges") or [], np.float64)
    if len(edges) > 1:
        pool = np.asarray(hist["pool"], np.float64)
        ax.stairs(pool, edges, fill=True, color="#4c72b0", alpha=0.75, label="pool pairs")
        null = np.asarray(hist["null"], np.float64)
        share = sc.get("mismatched_share")
        if null.sum() and share is not None:
            scaled = null * (share * pool.sum() / null.sum())
            ax.stairs(
                scaled,
                edges,
                color="#dd8452",
                lw=1.6,
                label=f"null x {share:.2f} of the pool (mismatched, {int(null.sum()):,} pairs)",
            )
    elif scores.size:
        ax.hist(scores, bins=min(60, max(10, scores.size // 5)), color="#4c72b0")
    thr = sc.get("threshold")
    if thr is not None:
        kept = int((scores >= thr).sum())
        label = f"threshold {thr:.4f}"
        if sc.get("mode") == "auto":
            label += " (auto)"
        label += f": {kept:,} pairs kept"
        if sc.get("expected_precision") is not None:
            label += f"\nexpected precision {sc['expected_precision']:.3f}"
            if sc.get("expected_recall") is not None:
                label += f", recall {sc['expected_recall']:.3f}"
        ax.axvline(thr, color="#c44e52", ls="--", label=label)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.set_xlabel("CLIP score (cosine similarity)")
    ax.set_ylabel("pairs")
    ax.set_title(f"CLIP scores of {scores.size:,} {'' if b.scored_dir else 'deduplicated '}pairs")
    return fig


def _score_info(b: BuildOutput) -> dict[str, Any]:
    """The ``score`` section of the scores shown: ``seed_model``, ``threshold``, ``mode``, the
    estimates and the histograms (``SCORED/score.json`` for a ``wit score`` output)."""
    if b.scored_dir:
        m = b.scored_manifest
        doc_path = fileio.join(b.scored_dir, "score.json")
        doc = fileio.read_json(doc_path) if fileio.exists(doc_path) else {}
        return {
            **doc,
            "seed_model": {
                k: (m.get("config") or {}).get("score", {}).get(k) for k in ("model", "pretrained")
            },
            "threshold": m.get("clip_score_threshold"),
        }
    return dict(b.stats.get("score") or {})


def _score_lines(sc: Mapping[str, Any]) -> list[str]:
    """How the threshold was chosen and what is expected of it, for the report."""
    if sc.get("mismatched_share") is None:
        return []
    out = [
        f"Estimated mismatched share {sc['mismatched_share']:.3f} of "
        f"{sc.get('pool_pairs', 0):,} pairs (a null of {sc.get('null_size', 0):,} images "
        "scored against other images' captions)."
    ]
    p, r = sc.get("expected_precision"), sc.get("expected_recall")
    if p is not None:
        out[0] += f" Expected precision {p:.3f}" + (f", recall {r:.3f}." if r is not None else ".")
    if sc.get("mode") == "auto":
        met = "reached" if sc.get("target_met") else "**not reached**: highest expected precision"
        out.append(f"Auto threshold for target precision {sc.get('target_precision')}: {met}.")
    return out


# ---------------------------------------------------------------------------------------------
# The report


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    with fileio.atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def report_markdown(build: BuildOutput | str, *, plots: Mapping[str, str] | None = None) -> str:
    """The text of ``report.md`` (``plots``: name -> path relative to the report)."""
    b = _as_build(build)
    s = b.stats
    plots = dict(plots or {})
    c = s.get("counters") or {}
    ic = s.get("image_counters")
    out = ["# wit build report", ""]
    n_in, n_kept = c.get("input", 0), c.get("kept", 0)
    summary = [
        f"- **{s.get('samples', 0):,} samples** in {s.get('shards', 0):,} shard(s): "
        f"`{s.get('train_data', '')}` (open_clip `--train-data`; `sizes.json` gives the count)",
        f"- pairs: {n_in:,} extracted by gather, {n_kept:,} in final samples "
        f"({_pct(n_kept, n_in)}), {n_in - n_kept:,} dropped with a reason",
    ]
    if ic:
        summary.append(
            f"- images: {ic.get('input', 0):,} distinct URLs sent to download, "
            f"{ic.get('kept', 0):,} in the final shards"
        )
    q = s.get("queries") or {}
    if q:
        summary.append(
            f"- queries: {q.get('count', 0):,} (`{os.path.basename(q.get('path', ''))}`)"
        )
    cfgb = b.config.get("balance", {})
    summary.append(
        f"- balancing: t = {cfgb.get('t')}, pre-balance factor = {cfgb.get('prebalance_factor')}, "
        f"seed = {cfgb.get('seed')}"
    )
    out += [*summary, "", "## Funnel (pairs)", "", funnel_markdown(b, "pairs"), ""]
    if ic:
        out += ["## Funnel (images)", "", funnel_markdown(b, "images"), ""]
    out += [
        "Every pair gathered is either in a final sample or dropped under exactly one reason: "
        "`input == kept + sum(dropped:*)` (checked when `stats.json` is written).",
        "",
    ]
    if "funnel" in plots:
        out += [f"![funnel]({plots['funnel']})", ""]
    out += ["## Drop reasons", "", reasons_markdown(b), ""]
    if "opt_outs" in s:
        out += ["## Opt-outs", "", opt_outs_markdown(b), ""]
    if s.get("takedown"):
        out += ["## Takedowns", "", takedowns_markdown(b), ""]
    out += ["## Per-query distribution", ""]
    if "queries" in plots:
        out += [f"![queries]({plots['queries']})", ""]
    head, tail = head_tail(b, n=10, by="before")
    if head:
        out += ["Head queries (most matches before balancing):", "", query_table_markdown(head), ""]
        out += ["Tail queries (fewest matches):", "", query_table_markdown(tail), ""]
    cont = s.get("contamination")
    if cont:
        out += ["## Decontamination", ""]
        rows = [
            [name, _fmt(v["images"]), _fmt(v["contaminated_samples"]), _fmt(v["eval_images_hit"])]
            for name, v in sorted(cont["eval_sets"].items())
        ]
        out += [
            markdown_table(
                ["eval set", "images", "training samples dropped", "eval images hit"], rows
            ),
            "",
            f"Sets hit: {', '.join(cont['sets_hit']) or 'none'}.",
            "",
        ]
    sc = _score_info(b)
    if sc:
        seed = sc.get("seed_model") or {}
        thr = sc.get("threshold")
        thr_text = f"{thr:.4f}" if thr is not None else "none"
        scored_by = f" (`wit score` into `{b.scored_dir}`)" if b.scored_dir else ""
        out += [
            "## CLIP score",
            "",
            f"Seed model `{seed.get('model')}` (`{os.path.basename(str(seed.get('pretrained')))}`)"
            f"{scored_by}; threshold {thr_text}.",
            "",
        ]
        lines = _score_lines(sc)
        if lines:
            out += [" ".join(lines), ""]
        if "clip_scores" in plots:
            out += [f"![clip scores]({plots['clip_scores']})", ""]
    if "samples" in plots:
        out += ["## Samples", "", f"![samples]({plots['samples']})", ""]
    return "\n".join(out)


def write_report(directory: str, *, scored: str | None = None) -> str:
    """Write ``DIR/report.md`` and its PNG plots under ``DIR/plots/``; returns the report path.

    With ``scored`` (a ``wit score`` output of the build's shards), the report shows its
    samples and scores and is written to ``SCORED/report.md`` and ``SCORED/plots/``.
    """
    b = load_build(directory, scored=scored)
    directory = scored or directory
    plots_dir = fileio.join(directory, PLOTS_DIR)
    fileio.makedirs(plots_dir)
    plots: dict[str, str] = {}
    figures = {
        "funnel": funnel_figure(b),
        "queries": query_distribution_figure(b),
        "samples": sample_grid_figure(b),
        "clip_scores": clip_score_figure(b),
    }
    for name, fig in figures.items():
        if fig is None:
            continue
        _save(fig, fileio.join(plots_dir, f"{name}.png"))
        plots[name] = f"{PLOTS_DIR}/{name}.png"
    path = fileio.join(directory, REPORT_FILE)
    with fileio.atomic_write(path, "w") as f:
        f.write(report_markdown(b, plots=plots))
    return path
