"""Trace the demo web's planted mess through a build: was each item caught where web.py says?

``web.json`` lists every planted item (kind, URL, caption and, for copies, the original). A
build leaves a record of every pair it dropped, per step (``gather/rejected``,
``prebalance/rejected``, ``download/rejected``, ``DIR/rejected``: rows naming the stage that
dropped them, ``stage.REJECTED_SCHEMA``) and of every sample it kept (``shards/*.parquet``). :func:`trace_urls` reads them into one outcome per URL; :func:`audit`
compares each planted item with :data:`EXPECTED` (the table in ``web.py``'s docstring).

An item is ``caught`` when its outcome is the documented one, ``earlier`` when an earlier stage
dropped it for another reason before it reached that stage (pre-balancing draws among all
matched pairs, so some planted pairs never reach the download), and ``missed`` otherwise: a
missed item is a bug in a stage or in the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from wit_pipeline import fileio, urls

# Pipeline order of the stages that drop pairs or images.
STAGE_ORDER = ("gather", "prebalance", "download", "dedup", "balance", "score")
KEPT = "kept"

# kind -> (stage, reason) the web's docstring promises; "pass:<stage>" means the item gets
# through that stage (it is what the stage is *not* meant to catch). Junk captions differ per
# caption, see JUNK_EXPECTED.
EXPECTED: dict[str, tuple[str, str]] = {
    "exact_copy": ("dedup", "near_duplicate"),
    "reencode": ("dedup", "near_duplicate"),
    "resized_copy": ("dedup", "near_duplicate"),
    "same_url_second_caption": ("download", "one_sample"),
    "foreign_caption": ("gather", "language"),
    "data_uri": ("gather", "unsupported_scheme"),
    "javascript_uri": ("gather", "unsupported_scheme"),
    "truncated_image": ("download", "decode_error"),
    "html_as_image": ("download", "not_image"),
    "empty_body": ("download", "empty_body"),
    "http_404": ("download", "http_404"),
    "decompression_bomb": ("download", "too_large"),
    "robots_disallowed": ("download", "robots"),
    "x_robots_tag_noai": ("download", "opt_out"),
    "redirect_to_private": ("download", "blocked_address"),
    "eval_copy": ("dedup", "eval_contamination"),
}
JUNK_EXPECTED: dict[str, tuple[str, str]] = {
    # The lite model's guesses for these are unsure (sv 0.26, cs 0.18): kept as language "und"
    # (gather.captions.min_foreign_language_score), then matched like any caption.
    "IMG_2041.JPG": ("gather", "no_match"),
    "thumbnail": ("gather", "pass"),
    "DSC00012": ("gather", "no_match"),
    "": ("gather", "no_caption"),
    "click here": ("gather", "pass"),
    "image": ("gather", "pass"),
}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of one URL's pairs: the first stage that dropped each, or kept."""

    stage: str  # a STAGE_ORDER entry, or "kept"
    reason: str  # drop reason, or "kept"
    key: str = ""  # the image key (download onwards)
    duplicate_of: str = ""  # near_duplicate: the survivor's key
    captions: tuple[str, ...] = ()  # captions of the sample (dedup onwards)


def _norm(url: str | None) -> str:
    if not url:
        return ""
    try:
        return urls.normalize_url(url) or url
    except Exception:
        return url


def _rows(pattern_dir: str, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    if not fileio.exists(pattern_dir):
        return []
    try:
        files = fileio.expand_inputs([pattern_dir], suffixes=(".parquet",))
    except Exception:
        return []
    out: list[dict[str, Any]] = []
    for f in files:
        with fileio.open_file(f, "rb") as fh:
            table = pq.read_table(fh)
        cols = [c for c in (columns or table.column_names) if c in table.column_names]
        out.extend(table.select(cols).to_pylist())
    return out


def trace_urls(build_dir: str) -> dict[str, list[Outcome]]:
    """``{normalized url: [Outcome, ...]}`` for every URL a build saw (one per pair or sample)."""
    out: dict[str, list[Outcome]] = {}

    def add(url: str | None, o: Outcome) -> None:
        out.setdefault(_norm(url), []).append(o)

    j = fileio.join
    # Rows name their stage; gather and download rows may predate that column.
    for r in _rows(j(build_dir, "gather", "rejected"), ["url", "reason", "stage"]):
        add(r["url"], Outcome(r.get("stage") or "gather", r["reason"]))
    for r in _rows(j(build_dir, "prebalance", "rejected"), ["url", "reason", "stage"]):
        add(r["url"], Outcome(r["stage"], r["reason"]))
    for r in _rows(j(build_dir, "download", "rejected"), ["url", "reason", "key", "stage"]):
        add(r["url"], Outcome(r.get("stage") or "download", r["reason"], key=r.get("key") or ""))
    for r in _rows(j(build_dir, "rejected")):  # dedup, balance and score (the finalize step)
        add(
            r["url"],
            Outcome(
                r["stage"],
                r["reason"],
                key=r.get("key") or "",
                duplicate_of=r.get("duplicate_of") or "",
                captions=tuple(r.get("captions") or ()),
            ),
        )
    for r in _rows(j(build_dir, "shards"), ["key", "url", "captions"]):
        add(r["url"], Outcome(KEPT, KEPT, key=r["key"], captions=tuple(r.get("captions") or ())))
    return out


def _stage_index(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def judge(item: Mapping[str, str], trace: Mapping[str, list[Outcome]]) -> tuple[str, str]:
    """``(verdict, what happened)`` for one planted item; verdict: caught, earlier or missed."""
    kind = item["kind"]
    if kind == "junk_caption":
        stage, reason = JUNK_EXPECTED[item["caption"]]
    else:
        stage, reason = EXPECTED[kind]
    url = _norm(item["url"])
    seen = trace.get(url, [])
    if not seen:
        return "missed", "not found in the build"
    what = ", ".join(sorted({f"{o.stage}:{o.reason}" for o in seen}))
    if reason == "pass":  # gets through gather
        if all(o.stage != "gather" for o in seen):
            return "caught", what
        return "missed", what
    if kind == "same_url_second_caption":
        # Both pairs reached dedup as one image: one outcome row carries both captions.
        later = [o for o in seen if _stage_index(o.stage) >= _stage_index("dedup")]
        if any(item["caption"] in o.captions and len(o.captions) >= 2 for o in later):
            return "caught", what
        if any(_stage_index(o.stage) < _stage_index("dedup") for o in seen):
            return "earlier", what
        return "missed", what
    if kind in ("exact_copy", "reencode", "resized_copy"):
        original = trace.get(_norm(item["of"]), [])
        both = list(seen) + list(original)
        copy_keys = {o.key for o in seen if o.key}
        orig_keys = {o.key for o in original if o.key}
        merged = any(
            o.reason == reason
            and (
                (o.key in copy_keys and o.duplicate_of in orig_keys)
                or (o.key in orig_keys and o.duplicate_of in copy_keys)
            )
            for o in both
        )
        if merged:
            return "caught", what
        if any(_stage_index(o.stage) < _stage_index(stage) for o in both):
            return "earlier", what
        return "missed", what
    if any(o.stage == stage and o.reason == reason for o in seen):
        return "caught", what
    if all(_stage_index(o.stage) < _stage_index(stage) for o in seen):
        return "earlier", what
    return "missed", what


def audit(manifest: Mapping[str, Any], build_dir: str) -> list[dict[str, str]]:
    """One row per planted item: kind, url, caption, expected, verdict, what happened."""
    trace = trace_urls(build_dir)
    rows = []
    for item in manifest.get("planted_items") or []:
        if item["kind"] == "junk_caption":
            stage, reason = JUNK_EXPECTED[item["caption"]]
        else:
            stage, reason = EXPECTED[item["kind"]]
        verdict, what = judge(item, trace)
        rows.append(
            {
                "kind": item["kind"],
                "url": item["url"],
                "caption": item["caption"],
                "expected": f"{stage}:{reason}",
                "verdict": verdict,
                "outcome": what,
            }
        )
    return rows


def summarize(rows: Sequence[Mapping[str, str]]) -> dict[str, dict[str, int]]:
    """``{kind: {"caught": n, "earlier": n, "missed": n}}``."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        c = out.setdefault(r["kind"], {"caught": 0, "earlier": 0, "missed": 0})
        c[r["verdict"]] += 1
    return dict(sorted(out.items()))
