"""The download stage's pure core: candidate pairs -> URL records -> shards, and the plan.

- URL records: ``key_pair`` normalizes a candidate row's URL and keys it by ``urls.url_uid``;
  ``make_url_record`` turns the pairs of one distinct URL into one record (its pairs sorted by
  ``uid``, repeated ``uid``s set aside as ``duplicate_pair``); ``apply_verdict`` sets the
  robots.txt verdict on the records of one origin.
- The plan: each URL belongs to shard ``shard_of(key, num_shards)``, ``num_shards`` derived
  from the number of distinct URLs (``num_shards_for``) and fixed in ``plan.json``
  (``plan_doc``, ``check_plan``, ``check_plan_config``) so that a rerun puts every URL in the
  same shard.
- Shard assembly: ``assemble_shard`` turns a shard's records and fetch ``Outcome``s into its
  webdataset samples, its per-pair table and its rejected rows (``stage.REJECTED_SCHEMA``,
  stage ``download``); ``shard_counters`` counts pairs (``input``, ``kept``,
  ``dropped:<reason>``) and distinct URLs (the ``url/`` scope) from those two tables, fresh or
  read back from a finished shard.
- Shard files: ``rejected/NNNNN.parquet``, then ``shards/NNNNN.tar``, then
  ``shards/NNNNN.parquet`` (atomically, the last one marking completion).

The ``download`` config section checks its options itself, when it is made (``config.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from wit_pipeline import counters as counters_lib
from wit_pipeline import fileio, optout, schemas, shards, stage, urls
from wit_pipeline.config import DownloadConfig, to_dict
from wit_pipeline.errors import WitError
from wit_pipeline.stages.download import robots
from wit_pipeline.takedown import TAKEDOWN, Blocklist

STAGE = "download"  # the stage name in rejected rows
SHARDS_DIR = "shards"
REJECTED_DIR = "rejected"
PLAN_FILE = "plan.json"

# Stable drop reasons (docs/download.md). http_<status> (http_404, http_503, ...) adds to these.
REASONS = (
    "invalid_url",
    "duplicate_pair",
    "blocked_address",
    "dns_error",
    "takedown",
    "robots",
    "opt_out",
    "timeout",
    "connection_error",
    "tls_error",
    "bad_response",
    "bad_redirect",
    "too_many_redirects",
    "truncated",
    "too_large",
    "empty_body",
    "not_image",
    "decode_error",
    "too_small",
    "bad_aspect_ratio",
    "download_error",
    "internal_error",
)

# The candidate columns (docs/data-format.md) that every pair carries into the shard tables.
PAIR_FIELDS: tuple[tuple[str, pa.DataType], ...] = tuple(
    (f.name, f.type) for f in schemas.CANDIDATE_SCHEMA
)
SHARD_SCHEMA = pa.schema(
    [
        *PAIR_FIELDS,
        ("key", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
    ]
)

# Fields that change how fast a run goes, not what it produces: a rerun may change them.
EXECUTION_ONLY_FIELDS = (
    "processes",
    "threads",
    "per_host_concurrency",
    "per_host_rate",
    "max_retry_wait",  # a repair run may wait longer for the hosts that asked it to
)


# ---------------------------------------------------------------------------------------------
# URL records, the shard of a URL, shard assembly


def _int_list(v: Any) -> list[int]:
    if v is None:
        return []
    return sorted({int(x) for x in v})


def key_pair(row: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(key, pair)`` for one candidate row: the URL normalized, its key, a full pair record.

    A URL that is not absolute http(s) keeps its raw spelling and is marked ``invalid``; its key
    is the hash of that spelling, so it still belongs to exactly one shard.
    """
    raw = row.get("url")
    raw = "" if raw is None else str(raw)
    norm = urls.normalize_url(raw) if raw else None
    url = norm if norm is not None else raw
    caption = row.get("caption")
    caption = "" if caption is None else str(caption)
    uid = row.get("uid") or urls.pair_uid(url, caption)
    score = row.get("language_score")
    pair = {
        "uid": str(uid),
        "url": url,
        "caption": caption,
        "query_ids": _int_list(row.get("query_ids")),
        "source": row.get("source"),
        "page_url": row.get("page_url"),
        "language": row.get("language"),
        "language_score": None if score is None else float(score),
        "invalid": norm is None,
    }
    return urls.url_uid(url), pair


def _pair_sort_key(p: Mapping[str, Any]) -> tuple:
    return (p["uid"], p["caption"], p.get("source") or "", p.get("page_url") or "")


def make_url_record(
    key: str, pairs: Iterable[Mapping[str, Any]], blocklist: Blocklist | None = None
) -> dict[str, Any]:
    """One record per distinct URL: its pairs sorted by ``uid``; repeated ``uid``s set aside.

    A URL that a ``blocklist`` ``url`` or ``domain`` entry matches gets the verdict
    ``takedown`` (the entry as detail): it is never requested.
    """
    ordered = sorted(pairs, key=_pair_sort_key)
    kept: list[dict[str, Any]] = []
    dups: list[dict[str, Any]] = []
    seen: set[str] = set()
    for p in ordered:
        (dups if p["uid"] in seen else kept).append(dict(p))
        seen.add(p["uid"])
    url = kept[0]["url"]
    invalid = bool(kept[0]["invalid"])
    verdict = ("invalid_url", "not an absolute http(s) URL") if invalid else None
    if verdict is None and blocklist is not None:
        hit = blocklist.match_url(url)
        if hit is not None:
            verdict = (TAKEDOWN, hit)
    return {
        "key": key,
        "url": url,
        "origin": "" if invalid else robots.origin(url),
        "invalid": invalid,
        "pairs": kept,
        "dups": dups,
        "verdict": verdict,
    }


def num_shards_for(num_urls: int, samples_per_shard: int) -> int:
    return max(1, -(-num_urls // max(1, samples_per_shard)))


def shard_of(key: str, num_shards: int) -> int:
    """The shard of a URL key: stable across runs, runners and machines."""
    return int(key[:16], 16) % num_shards


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What happened to one fetched URL: an image with its sizes, or a reason."""

    image: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None
    reason: str | None = None
    detail: str = ""
    policy_url: str | None = None  # opt-outs and robots: the policy the refusal rests on
    policy_fetched: str | None = None


def assemble_shard(
    records: Sequence[Mapping[str, Any]], outcomes: Mapping[str, Outcome]
) -> tuple[list[shards.Sample], pa.Table, pa.Table]:
    """Samples (one per downloaded URL), the per-pair table and the rejected table of a shard.

    ``records`` are the shard's URL records; ``outcomes`` holds the fetch outcome of each record
    that was fetched (records with a ``verdict``, ``(reason, detail[, policy URL, fetched])``,
    were not). A fetched record missing from ``outcomes`` is rejected as ``internal_error``: no
    URL is ever lost. Rejected pairs are rows of ``stage.REJECTED_SCHEMA`` (stage ``download``,
    the URL's ``key``, the pair's fields, and the policy of opt-out and robots refusals).
    """
    samples: list[shards.Sample] = []
    kept_rows: list[dict[str, Any]] = []
    rejected_rows: list[dict[str, Any]] = []

    def reject(rec, pairs, reason, detail, policy_url=None, policy_fetched=None):
        for p in pairs:
            row = {**p, "key": rec["key"], "reason": reason, "detail": detail}
            row.update(policy_url=policy_url, policy_fetched=policy_fetched)
            rejected_rows.append(stage.rejected_row(row, stage=STAGE))

    for rec in sorted(records, key=lambda r: r["key"]):
        reject(rec, rec["dups"], "duplicate_pair", "same uid as another pair of this URL")
        if rec["verdict"] is not None:
            reject(rec, rec["pairs"], *rec["verdict"])
            continue
        out = outcomes.get(rec["key"])
        if out is None:
            reject(rec, rec["pairs"], "internal_error", "no result from the downloader")
            continue
        if out.image is None:
            reason = out.reason or "download_error"
            reject(rec, rec["pairs"], reason, out.detail, out.policy_url, out.policy_fetched)
            continue
        pairs = rec["pairs"]
        sizes = {
            "width": out.width,
            "height": out.height,
            "original_width": out.original_width,
            "original_height": out.original_height,
        }
        meta = {
            "key": rec["key"],
            "url": rec["url"],
            "captions": [p["caption"] for p in pairs],
            "pairs": [
                {"uid": p["uid"], "caption": p["caption"], "query_ids": p["query_ids"]}
                for p in pairs
            ],
            "query_ids": sorted({q for p in pairs for q in p["query_ids"]}),
            **sizes,
            "sha256": out.sha256,
        }
        samples.append(shards.Sample(rec["key"], out.image, pairs[0]["caption"], meta))
        for p in pairs:
            row = {name: p.get(name) for name, _ in PAIR_FIELDS}
            kept_rows.append({**row, "key": rec["key"], **sizes, "sha256": out.sha256})
    kept = pa.Table.from_pylist(kept_rows, schema=SHARD_SCHEMA)
    rejected = pa.Table.from_pylist(rejected_rows, schema=stage.REJECTED_SCHEMA)
    return samples, kept, rejected


def shard_counters(kept: pa.Table, rejected: pa.Table) -> dict[str, int]:
    """Pair counts and ``url/`` counts of one shard, computed from its two tables.

    Pairs: ``input``, ``kept`` and ``dropped:<reason>`` (``stage.flow_counts``), and the pairs
    dropped per opt-out signal (``opt_out/<signal>``, ``optout.signal_counts``); distinct URLs:
    the same names under the ``url/`` scope. The same function runs on fresh results and on
    tables read back from a finished shard, so reruns count exactly what the first run counted.
    A URL's reason is the reason of its non-duplicate pairs (``duplicate_pair`` is a pair-level
    reason only).
    """
    c = stage.flow_counts(kept, rejected)
    c.update(
        optout.signal_counts(
            rejected.column("reason").to_pylist(), rejected.column("detail").to_pylist()
        )
    )
    kept_keys = set(kept.column("key").to_pylist())
    url_reason: dict[str, str] = {}
    reasons = rejected.column("reason").to_pylist()
    for key, reason in zip(rejected.column("key").to_pylist(), reasons, strict=True):
        # Every URL has at least one pair that is not a duplicate: its fate is the URL's.
        if key not in kept_keys and reason != "duplicate_pair":
            url_reason.setdefault(key, reason)
    url = functools.partial(counters_lib.scoped, counters_lib.URL)
    c[url(counters_lib.INPUT)] += len(kept_keys) + len(url_reason)
    c[url(counters_lib.KEPT)] += len(kept_keys)
    for reason in url_reason.values():
        c[url(counters_lib.dropped(reason))] += 1
    return dict(sorted((k, v) for k, v in c.items() if v))


VERDICT_TAG = "v"
RECORD_TAG = "r"


def apply_verdict(
    item: tuple[str, Iterable[tuple[str, Any]]], config: DownloadConfig
) -> Iterator[dict[str, Any]]:
    """Set ``verdict`` (and ``crawl_delay``) on the URL records of one origin.

    ``item`` is ``(origin, values)`` where values are ``("v", policy)`` (one: a
    ``policy.OriginPolicy``, or a bare ``robots.RobotsVerdict``) and ``("r", record)`` (one
    per URL). A refusal's verdict is ``(reason, detail, policy URL, when it was fetched)``. The
    values are scanned twice instead of collected, so an origin with millions of URLs needs no
    more memory than one with a few (Beam's grouped values are re-iterable and, on distributed
    runners, streamed).
    """
    _, values = item
    verdict = next((v for tag, v in values if tag == VERDICT_TAG), None)
    if verdict is None:
        verdict = robots.RobotsVerdict(robots.DISALLOW_ALL, detail="no robots.txt verdict")
    if isinstance(verdict, robots.RobotsVerdict):
        delay = verdict.rules.crawl_delay if verdict.kind == robots.RULES else None
    else:
        delay = verdict.crawl_delay
    for tag, value in values:
        if tag != RECORD_TAG:
            continue
        rec = dict(value)
        if rec["verdict"] is None:
            rec["verdict"] = verdict.decide(rec["url"])
        if rec["verdict"] is None and config.respect_crawl_delay and delay:
            if delay > config.max_crawl_delay:
                rec["verdict"] = (
                    "robots",
                    f"Crawl-delay {delay:g}s exceeds max_crawl_delay {config.max_crawl_delay:g}s",
                )
            else:
                rec["crawl_delay"] = delay
        yield rec


# ---------------------------------------------------------------------------------------------
# Shard files and the plan


def shards_dir(output_dir: str) -> str:
    return fileio.join(output_dir, SHARDS_DIR)


def rejected_path(output_dir: str, shard_id: int) -> str:
    return fileio.join(output_dir, REJECTED_DIR, f"{shards.shard_name(shard_id)}.parquet")


def write_shard_files(
    output_dir: str,
    shard_id: int,
    samples: Sequence[shards.Sample],
    kept: pa.Table,
    rejected: pa.Table,
) -> shards.ShardInfo:
    """``rejected/NNNNN.parquet``, then the shard tar, then its Parquet (the completion mark).

    (Temporaries that a killed earlier run left are removed once, before any shard writer
    starts: ``repair.list_finished``.)
    """
    with fileio.atomic_write(rejected_path(output_dir, shard_id), "wb") as f:
        pq.write_table(rejected, f, compression="zstd")
    return shards.write_shard(shards_dir(output_dir), shard_id, samples, kept)


def read_back_counters(output_dir: str, shard_id: int) -> dict[str, int]:
    """Counters of a finished shard, from its files (see :func:`shard_counters`)."""
    _, parquet_path = shards.shard_paths(shards_dir(output_dir), shard_id)
    with fileio.open_file(parquet_path, "rb") as f:
        kept = pq.read_table(f, columns=["key"])
    with fileio.open_file(rejected_path(output_dir, shard_id), "rb") as f:
        rejected = pq.read_table(f, columns=["key", "reason", "detail"])
    return shard_counters(kept, rejected)


def finished_shards(output_dir: str) -> list[int]:
    """Ids of the shards a previous run finished (their Parquet file exists)."""
    out = []
    for tar in shards.list_shards(shards_dir(output_dir)):
        name = os.path.basename(tar)[: -len(".tar")]
        if name.isdigit() and fileio.exists(rejected_path(output_dir, int(name))):
            out.append(int(name))
    return sorted(out)


def plan_doc(config: DownloadConfig, num_urls: int, takedown: str = "") -> dict[str, Any]:
    """What fixes the shard assignment and the shard contents of a run (``takedown``: the
    digest of the blocklist's url and domain entries, recorded when there are any)."""
    cfg = to_dict(config)
    for name in EXECUTION_ONLY_FIELDS:
        cfg.pop(name, None)
    doc = {
        "num_urls": num_urls,
        "num_shards": config.num_shards or num_shards_for(num_urls, config.samples_per_shard),
        "config": cfg,
    }
    if takedown:
        doc["takedown"] = takedown
    return doc


def check_plan_config(output_dir: str, config: DownloadConfig, takedown: str = "") -> None:
    """Before a rerun starts: refuse a configuration (or takedown entries) that differs from
    the first run's."""
    path = fileio.join(output_dir, PLAN_FILE)
    if not fileio.exists(path):
        return
    previous = fileio.read_json(path)
    old = previous.get("config")
    new = plan_doc(config, 0)["config"]
    if previous.get("takedown", "") != takedown:
        raise WitError(
            f"{output_dir} holds a download run with other takedown entries (--blocklist); "
            "use a new --output directory or the same blocklists"
        )
    if old != new:
        changed = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
        raise WitError(
            f"{output_dir} holds a download run with other settings ({', '.join(changed)}); "
            "use a new --output directory or the same settings"
        )


def check_plan(output_dir: str, plan: Mapping[str, Any]) -> int:
    """Write ``plan.json`` on the first run; on a rerun, insist that it has not changed."""
    path = fileio.join(output_dir, PLAN_FILE)
    fileio.remove_temporaries(output_dir, prefix=PLAN_FILE)  # of a run killed writing it
    if fileio.exists(path):
        old = fileio.read_json(path)
        if old != plan:
            raise WitError(
                f"{output_dir} holds a download run with a different input or configuration "
                f"(plan.json: {old.get('num_urls')} URLs, {old.get('num_shards')} shards; "
                f"now {plan['num_urls']} URLs, {plan['num_shards']} shards); "
                "use a new --output directory"
            )
    else:
        fileio.write_json(path, dict(plan))
    return int(plan["num_shards"])
