"""Download stage: candidate pairs -> downloaded, validated, resized images in webdataset shards.

img2dataset does the fetching, decoding, resizing and re-encoding: its per-shard ``Downloader``
runs inside a Beam DoFn with a sample writer of ours that collects what it produced, and a
resizer of ours that refuses decompression bombs, tiny and oddly shaped images from their
headers before img2dataset's resizer decodes them. Around it this module adds what a web-scale
crawl needs:

- URLs are normalized and each distinct URL is downloaded once; every pair that shares it
  follows its fate (one webdataset sample per URL, one Parquet row per pair).
- Politeness: URLs are grouped by origin; robots.txt is fetched once per origin (see
  ``robots.py`` for the policy) and disallowed URLs are never requested; ``X-Robots-Tag``
  opt-outs are refused; per-host concurrency and rate limits apply within each worker.
- Safety: every connection (robots.txt, images, each redirect hop) goes through the SSRF guard
  of ``netguard.py``.
- Resumability: each distinct URL belongs to shard ``hash(key) mod num_shards``, with
  ``num_shards`` derived from the number of distinct URLs and fixed in ``plan.json``; a shard
  writes ``rejected/NNNNN.parquet`` then ``shards/NNNNN.tar`` then ``shards/NNNNN.parquet``
  (atomically, the last one marking completion). A rerun skips finished shards (their URLs are
  neither fetched nor robots-checked again) and reads their counts back from disk, so the final
  files and ``stats.json`` are the same as those of an uninterrupted run.

Every pair ends either in a shard or in ``rejected/`` with a reason; ``stats.json`` holds
``counters`` over pairs and ``url_counters`` over distinct URLs, each with
``input == kept + sum(dropped:*)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from wit_pipeline import counters as counters_lib
from wit_pipeline import fileio, schemas, shards, urls
from wit_pipeline.beam_utils import COUNTS, SumCounts, emit_counts
from wit_pipeline.config import DownloadConfig, to_dict
from wit_pipeline.errors import WitError
from wit_pipeline.stages.download import netguard, robots

_LOG = logging.getLogger(__name__)

SHARDS_DIR = "shards"
REJECTED_DIR = "rejected"
STATS_FILE = "stats.json"
PLAN_FILE = "plan.json"
URL_PREFIX = "url/"  # counter names over distinct URLs travel with this prefix

# Stable drop reasons (docs/download.md). http_<status> (http_404, http_503, ...) adds to these.
REASONS = (
    "invalid_url",
    "duplicate_pair",
    "blocked_address",
    "dns_error",
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
REJECTED_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("uid", pa.string()),
        ("caption", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("key", pa.string()),
    ]
)

# img2dataset 1.47 reports these resizer and downloader messages as plain strings.
_IMG2DATASET_MESSAGES = {
    "image too small": "too_small",
    "image area too large": "too_large",
    "aspect ratio too large": "bad_aspect_ratio",
    "image decoding error": "decode_error",
    "use of image disallowed by x-robots-tag directive": "opt_out",
}


# ---------------------------------------------------------------------------------------------
# Pure core: pairs -> URL records -> shards


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


def make_url_record(key: str, pairs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One record per distinct URL: its pairs sorted by ``uid``; repeated ``uid``s set aside."""
    ordered = sorted(pairs, key=_pair_sort_key)
    kept: list[dict[str, Any]] = []
    dups: list[dict[str, Any]] = []
    seen: set[str] = set()
    for p in ordered:
        (dups if p["uid"] in seen else kept).append(dict(p))
        seen.add(p["uid"])
    url = kept[0]["url"]
    invalid = bool(kept[0]["invalid"])
    return {
        "key": key,
        "url": url,
        "origin": "" if invalid else robots.origin(url),
        "invalid": invalid,
        "pairs": kept,
        "dups": dups,
        "verdict": ("invalid_url", "not an absolute http(s) URL") if invalid else None,
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


def reason_from_message(message: str | None, *, default: str) -> tuple[str, str]:
    """Map an img2dataset error message (ours are ``wit:<reason>: ...``) to a reason."""
    parsed = netguard.parse_reason(message)
    if parsed is not None:
        return parsed
    text = (message or "").strip()
    reason = _IMG2DATASET_MESSAGES.get(text.lower(), default)
    return reason, text[:500]


def assemble_shard(
    records: Sequence[Mapping[str, Any]], outcomes: Mapping[str, Outcome]
) -> tuple[list[shards.Sample], pa.Table, pa.Table]:
    """Samples (one per downloaded URL), the per-pair table and the rejected table of a shard.

    ``records`` are the shard's URL records; ``outcomes`` holds the fetch outcome of each record
    that was fetched (records with a ``verdict`` were not). A fetched record missing from
    ``outcomes`` is rejected as ``internal_error``: no URL is ever lost.
    """
    samples: list[shards.Sample] = []
    kept_rows: list[dict[str, Any]] = []
    rejected_rows: list[dict[str, Any]] = []

    def reject(rec: Mapping[str, Any], pairs: Iterable[Mapping[str, Any]], reason, detail):
        for p in pairs:
            rejected_rows.append(
                {
                    "url": p["url"],
                    "uid": p["uid"],
                    "caption": p["caption"],
                    "reason": reason,
                    "detail": detail,
                    "key": rec["key"],
                }
            )

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
            reject(rec, rec["pairs"], out.reason or "download_error", out.detail)
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
    rejected = pa.Table.from_pylist(rejected_rows, schema=REJECTED_SCHEMA)
    return samples, kept, rejected


def shard_counters(kept: pa.Table, rejected: pa.Table) -> dict[str, int]:
    """Pair counters and ``url/`` counters of one shard, computed from its two tables.

    The same function runs on fresh results and on tables read back from a finished shard,
    so reruns count exactly what the first run counted. A URL's reason is the reason of its
    non-duplicate pairs (``duplicate_pair`` is a pair-level reason only).
    """
    c: counters_lib.Counter[str] = counters_lib.Counter()
    c[counters_lib.INPUT] += kept.num_rows + rejected.num_rows
    c[counters_lib.KEPT] += kept.num_rows
    reasons = rejected.column("reason").to_pylist()
    for reason in reasons:
        c[counters_lib.dropped(reason)] += 1
    kept_keys = set(kept.column("key").to_pylist())
    url_reason: dict[str, str] = {}
    for key, reason in zip(rejected.column("key").to_pylist(), reasons, strict=True):
        # Every URL has at least one pair that is not a duplicate: its fate is the URL's.
        if key not in kept_keys and reason != "duplicate_pair":
            url_reason.setdefault(key, reason)
    c[URL_PREFIX + counters_lib.INPUT] += len(kept_keys) + len(url_reason)
    c[URL_PREFIX + counters_lib.KEPT] += len(kept_keys)
    for reason in url_reason.values():
        c[URL_PREFIX + counters_lib.dropped(reason)] += 1
    return dict(sorted((k, v) for k, v in c.items() if v))


def split_counters(total: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """``(pair_counters, url_counters)`` from counters where URL ones carry ``url/``."""
    pairs = {k: v for k, v in sorted(total.items()) if not k.startswith(URL_PREFIX)}
    url_level = {
        k[len(URL_PREFIX) :]: v for k, v in sorted(total.items()) if k.startswith(URL_PREFIX)
    }
    return pairs, url_level


# ---------------------------------------------------------------------------------------------
# Shard files


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

    Temporary files that a killed earlier attempt left for this shard are removed first.
    """
    _remove_stale_temporaries(output_dir, shard_id)
    with fileio.atomic_write(rejected_path(output_dir, shard_id), "wb") as f:
        pq.write_table(rejected, f, compression="zstd")
    return shards.write_shard(shards_dir(output_dir), shard_id, samples, kept)


def _remove_stale_temporaries(output_dir: str, shard_id: int) -> None:
    if not fileio.is_local(output_dir):
        return  # object stores publish whole objects: nothing partial is left behind
    name = shards.shard_name(shard_id)
    for sub in (SHARDS_DIR, REJECTED_DIR):
        directory = fileio.join(output_dir, sub)
        if not os.path.isdir(directory):
            continue
        for entry in os.listdir(directory):
            if entry.startswith(f".{name}.") and entry.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(directory, entry))


def read_back_counters(output_dir: str, shard_id: int) -> dict[str, int]:
    """Counters of a finished shard, from its files (see :func:`shard_counters`)."""
    _, parquet_path = shards.shard_paths(shards_dir(output_dir), shard_id)
    with fileio.open_file(parquet_path, "rb") as f:
        kept = pq.read_table(f, columns=["key"])
    with fileio.open_file(rejected_path(output_dir, shard_id), "rb") as f:
        rejected = pq.read_table(f, columns=["key", "reason"])
    return shard_counters(kept, rejected)


def finished_shards(output_dir: str) -> list[int]:
    """Ids of the shards a previous run finished (their Parquet file exists)."""
    out = []
    for tar in shards.list_shards(shards_dir(output_dir)):
        name = os.path.basename(tar)[: -len(".tar")]
        if name.isdigit() and fileio.exists(rejected_path(output_dir, int(name))):
            out.append(int(name))
    return sorted(out)


def plan_doc(config: DownloadConfig, num_urls: int) -> dict[str, Any]:
    """What fixes the shard assignment and the shard contents of a run."""
    cfg = to_dict(config)
    for name in EXECUTION_ONLY_FIELDS:
        cfg.pop(name, None)
    return {
        "num_urls": num_urls,
        "num_shards": config.num_shards or num_shards_for(num_urls, config.samples_per_shard),
        "config": cfg,
    }


def check_plan_config(output_dir: str, config: DownloadConfig) -> None:
    """Before a rerun starts: refuse a configuration that differs from the first run's."""
    path = fileio.join(output_dir, PLAN_FILE)
    if not fileio.exists(path):
        return
    old = fileio.read_json(path).get("config")
    new = plan_doc(config, 0)["config"]
    if old != new:
        changed = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
        raise WitError(
            f"{output_dir} holds a download run with other settings ({', '.join(changed)}); "
            "use a new --output directory or the same settings"
        )


# Fields that change how fast a run goes, not what it produces: a rerun may change them.
EXECUTION_ONLY_FIELDS = ("processes", "threads", "per_host_concurrency", "per_host_rate")


def check_plan(output_dir: str, plan: Mapping[str, Any]) -> int:
    """Write ``plan.json`` on the first run; on a rerun, insist that it has not changed."""
    path = fileio.join(output_dir, PLAN_FILE)
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


# ---------------------------------------------------------------------------------------------
# Fetching with img2dataset


def fetch_options(config: DownloadConfig) -> netguard.FetchOptions:
    return netguard.FetchOptions(
        timeout=config.timeout,
        connect_timeout=config.connect_timeout,
        retries=config.retries,
        retry_backoff=config.retry_backoff,
        max_redirects=config.max_redirects,
        max_bytes=config.max_bytes,
        user_agent=config.user_agent,
        user_agent_token=user_agent_token(config.user_agent),
        disallowed_header_directives=tuple(config.disallowed_header_directives),
        per_host_concurrency=config.per_host_concurrency,
        per_host_rate=config.per_host_rate,
        ca_bundle=config.ca_bundle,
    )


def user_agent_token(user_agent: str) -> str:
    """The product token (``wit-pipeline`` of ``wit-pipeline/0.1 (+...)``), lower-cased."""
    return robots._product_token(user_agent)


def make_guard(config: DownloadConfig, resolver: netguard.Resolver | None = None) -> netguard.Guard:
    return netguard.Guard(
        policy=netguard.AddressPolicy(allow_loopback=config.allow_loopback),
        resolver=resolver or netguard.system_resolver,
        connect_timeout=config.connect_timeout,
    )


def _looks_like_text(data: bytes) -> bool:
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] in (b"<", b"{", b"["):
        return True
    if not head:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return printable / len(head) > 0.95


_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


def header_size(data: bytes) -> tuple[str, int, int] | None:
    """``(format, width, height)`` read from a JPEG, PNG or GIF header, else ``None``.

    For a GIF, the size Pillow gives it: the logical screen grown to hold the first frame.

    A few microseconds, against ~80 for ``PIL.Image.open`` (which parses every JPEG segment);
    anything this does not recognize, or finds malformed, is left to PIL.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return "PNG", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _gif_size(data)
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return ("JPEG", width, height) if width and height else None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _gif_size(data: bytes) -> tuple[str, int, int] | None:
    """A GIF's logical screen grown to hold its first frame, as Pillow sizes it on open.

    The screen size alone is not enough: a GIF may declare a 100x100 screen and a first frame
    of 30,000x30,000 (a decompression bomb), which Pillow decodes at the frame's size.
    """
    n = len(data)
    if n < 13:
        return None
    width = int.from_bytes(data[6:8], "little")
    height = int.from_bytes(data[8:10], "little")
    packed = data[10]
    i = 13
    if packed & 0x80:  # global colour table
        i += 3 << ((packed & 0x07) + 1)
    while i < n:
        block = data[i]
        if block == 0x2C:  # image descriptor: left, top, width, height
            if i + 9 > n:
                return None
            left, top, w, h = (
                int.from_bytes(data[i + 1 + 2 * k : i + 3 + 2 * k], "little") for k in range(4)
            )
            return "GIF", max(width, left + w), max(height, top + h)
        if block != 0x21:  # trailer or garbage before any frame: left to PIL
            return None
        i += 2  # extension introducer and label, then data sub-blocks up to an empty one
        while i < n and data[i]:
            i += data[i] + 1
        i += 1
    return None


class ProbingResizer:
    """img2dataset's ``Resizer`` behind a header probe that refuses before decoding.

    PIL reads only the image header (``Image.open`` is lazy), so a decompression bomb (a small
    file announcing a huge canvas), an image below ``min_image_size`` or beyond
    ``max_aspect_ratio``, an empty body and a non-image (HTML, JSON, SVG, text) are refused
    with a reason without being decoded. Everything else goes to img2dataset's resizer, which
    decodes, resizes and re-encodes. Errors carry ``wit:<reason>:`` so the reason survives
    img2dataset's error strings.
    """

    def __init__(self, resizer, config: DownloadConfig):
        self.resizer = resizer
        self.max_area = config.max_image_area
        self.min_size = config.min_image_size
        self.max_aspect = config.max_aspect_ratio

    def probe(self, data: bytes) -> str | None:
        """``None`` when the image may be decoded, else ``wit:<reason>: detail``."""
        if not data:
            return "wit:empty_body: 0 bytes"
        fast = header_size(data)
        if fast is not None:
            fmt, width, height = fast
            return self._check_size(fmt, width, height)
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                fmt = im.format or "?"
        except Image.DecompressionBombError as e:
            return f"wit:too_large: {e}"
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            if _looks_like_text(data):
                return f"wit:not_image: body looks like text/markup ({len(data)} bytes)"
            return f"wit:decode_error: unrecognized image data ({type(e).__name__})"
        return self._check_size(fmt, width, height)

    def _check_size(self, fmt: str, width: int, height: int) -> str | None:
        if width <= 0 or height <= 0:
            return f"wit:decode_error: {fmt} header gives {width}x{height}"
        if width * height > self.max_area:
            return f"wit:too_large: {fmt} {width}x{height} exceeds {self.max_area:.0f} pixels"
        if min(width, height) < self.min_size:
            return f"wit:too_small: {fmt} {width}x{height} below {self.min_size} pixels"
        if max(width, height) / min(width, height) > self.max_aspect:
            return f"wit:bad_aspect_ratio: {fmt} {width}x{height} beyond {self.max_aspect:g}"
        return None

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        data = img_stream.read()
        refusal = self.probe(data)
        if refusal is not None:
            return None, None, None, None, None, refusal
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


class _Collector:
    """A ``sample_writer_class`` for img2dataset's ``Downloader`` that keeps results in memory.

    The Downloader calls ``write`` for every URL of the shard (success or failure) from one
    thread; the DoFn turns the collected outcomes into shard files once the shard is done.
    """

    def __init__(self):
        self.outcomes: dict[str, Outcome] = {}

    def __call__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, fmt):
        return self

    def write(self, img_str, key, caption, meta):
        wit_key = meta["wit_key"]
        if img_str is not None and meta.get("status") == "success":
            self.outcomes[wit_key] = Outcome(
                image=bytes(img_str),
                width=meta.get("width"),
                height=meta.get("height"),
                original_width=meta.get("original_width"),
                original_height=meta.get("original_height"),
                sha256=meta.get("sha256"),
            )
            return
        default = "decode_error" if meta.get("status") == "failed_to_resize" else "download_error"
        reason, detail = reason_from_message(meta.get("error_message"), default=default)
        self.outcomes[wit_key] = Outcome(reason=reason, detail=detail)

    def close(self):
        pass


def make_img2dataset_resizer(config: DownloadConfig):
    from img2dataset.resizer import Resizer

    return Resizer(
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_quality=config.encode_quality,
        encode_format="jpg",
        min_image_size=config.min_image_size,
        max_image_area=config.max_image_area,
        max_aspect_ratio=config.max_aspect_ratio,
    )


def fetch_with_img2dataset(
    records: Sequence[Mapping[str, Any]],
    *,
    shard_id: int,
    config: DownloadConfig,
    resizer,
    workdir: str,
) -> dict[str, Outcome]:
    """Download, validate and resize ``records`` with img2dataset's ``Downloader``.

    The guarded opener must already be installed in this process (:class:`_DownloadShardFn`
    does it); img2dataset's own retries are off because the opener retries only retryable
    errors.
    """
    if not records:
        return {}
    from img2dataset.downloader import Downloader

    collector = _Collector()
    ipc_path = os.path.join(workdir, f"{shards.shard_name(shard_id)}.feather")
    table = pa.table(
        {
            "url": [r["url"] for r in records],
            "wit_key": [r["key"] for r in records],
        }
    )
    with pa.OSFile(ipc_path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    downloader = Downloader(
        sample_writer_class=collector,
        resizer=resizer,
        thread_count=config.threads,
        save_caption=False,
        extract_exif=False,
        output_folder=workdir,
        column_list=["url", "wit_key"],
        timeout=config.timeout,
        number_sample_per_shard=max(2, len(records)),
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=0,
        user_agent_token=user_agent_token(config.user_agent),
        disallowed_header_directives=list(config.disallowed_header_directives) or None,
    )
    try:
        downloader.download_shard((shard_id, ipc_path))
    finally:
        for leftover in (ipc_path, os.path.join(workdir, f"{shard_id:05d}_stats.json")):
            if os.path.exists(leftover):
                os.remove(leftover)
    return collector.outcomes


# ---------------------------------------------------------------------------------------------
# Beam


def _warm_up_imports() -> None:
    import importlib

    try:  # several seconds of imports (torch, wandb, albumentations, ...)
        importlib.import_module("img2dataset.downloader")
        importlib.import_module("img2dataset.resizer")
    except Exception:  # the download stage's setup() reports import errors
        pass


class _KeyPairsFn(beam.DoFn):
    """Arrow tables of candidate rows -> ``(key, pair)``."""

    def setup(self):
        # img2dataset takes seconds to import; start now, in the background, so that each
        # worker process has it by the time the download stage starts.
        threading.Thread(target=_warm_up_imports, daemon=True).start()

    def process(self, table: pa.Table) -> Iterator[tuple[str, dict[str, Any]]]:
        columns = [c for c in table.column_names if c in {n for n, _ in PAIR_FIELDS}]
        if "url" not in columns:
            raise WitError("candidates have no 'url' column")
        for row in table.select(columns).to_pylist():
            yield key_pair(row)


def _plan_num_shards(num_urls: int, output_dir: str, config: DownloadConfig) -> int:
    return check_plan(output_dir, plan_doc(config, num_urls))


def _assign_shard(
    rec: dict[str, Any], num_shards: int, finished: frozenset[int]
) -> list[dict[str, Any]]:
    shard = shard_of(rec["key"], num_shards)
    if shard in finished:
        return []  # counted from the finished shard's files
    return [{**rec, "shard": shard}]  # inputs may be shared with other consumers: no mutation


class _RobotsFn(beam.DoFn):
    """Batches of origins -> ``(origin, verdict)``, robots.txt fetched concurrently."""

    def __init__(self, config: DownloadConfig, resolver: netguard.Resolver | None):
        self._config = config
        self._resolver = resolver

    def setup(self):
        guard = make_guard(self._config, self._resolver)
        self._options = fetch_options(self._config)
        self._local = threading.local()
        self._guard = guard
        self._pool = ThreadPoolExecutor(max(1, self._config.threads))

    def _session(self):
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = netguard.requests_session(self._guard, self._options)
        return s

    def _fetch(self, origin_url: str) -> tuple[str, robots.RobotsVerdict]:
        verdict = robots.fetch_robots(
            self._session(),
            origin_url,
            user_agent=self._config.user_agent,
            connect_timeout=self._config.connect_timeout,
            timeout=self._config.timeout,
        )
        return origin_url, verdict

    def process(self, origins: list[str]):
        yield from self._pool.map(self._fetch, sorted(origins))

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


VERDICT_TAG = "v"
RECORD_TAG = "r"


def apply_verdict(
    item: tuple[str, Iterable[tuple[str, Any]]], config: DownloadConfig
) -> Iterator[dict[str, Any]]:
    """Set ``verdict`` (and ``crawl_delay``) on the URL records of one origin.

    ``item`` is ``(origin, values)`` where values are ``("v", RobotsVerdict)`` (one) and
    ``("r", record)`` (one per URL). The values are scanned twice instead of collected, so an
    origin with millions of URLs needs no more memory than one with a few (Beam's grouped
    values are re-iterable and, on distributed runners, streamed).
    """
    _, values = item
    verdict = next((v for tag, v in values if tag == VERDICT_TAG), None)
    if verdict is None:
        verdict = robots.RobotsVerdict(robots.DISALLOW_ALL, detail="no robots.txt verdict")
    delay = verdict.rules.crawl_delay if verdict.kind == robots.RULES else None
    for tag, value in values:
        if tag != RECORD_TAG:
            continue
        rec = dict(value)
        if rec["verdict"] is None:
            rec["verdict"] = verdict.check(rec["url"])
        if rec["verdict"] is None and config.respect_crawl_delay and delay:
            if delay > config.max_crawl_delay:
                rec["verdict"] = (
                    "robots",
                    f"Crawl-delay {delay:g}s exceeds max_crawl_delay {config.max_crawl_delay:g}s",
                )
            else:
                rec["crawl_delay"] = delay
        yield rec


class _DownloadShardFn(beam.DoFn):
    """``(shard_id, URL records)`` -> shard files, and the shard's counters."""

    def __init__(
        self,
        output_dir: str,
        config: DownloadConfig,
        resolver: netguard.Resolver | None,
    ):
        self._output_dir = output_dir
        self._config = config
        self._resolver = resolver
        # Shared by every instance unpickled from this one: they share one opener per process.
        self._owner = uuid.uuid4().hex

    def setup(self):
        self._resizer = ProbingResizer(make_img2dataset_resizer(self._config), self._config)
        self._workdir = tempfile.mkdtemp(prefix="wit-download-")
        self._opener = netguard.PROCESS_OPENER.acquire(
            self._owner, make_guard(self._config, self._resolver), fetch_options(self._config)
        )

    def _ensure_guard(self):
        # Fail closed: if anything replaced the process-wide opener, put the guard back.
        netguard.PROCESS_OPENER.ensure(self._opener)

    def process(self, element: tuple[int, Iterable[dict[str, Any]]]):
        shard_id, records = element
        if shards.is_finished(shards_dir(self._output_dir), shard_id) and fileio.exists(
            rejected_path(self._output_dir, shard_id)
        ):
            # A retried bundle whose first attempt wrote the shard: count what is on disk.
            return list(emit_counts(read_back_counters(self._output_dir, shard_id)))
        records = list(records)
        to_fetch = [r for r in records if r["verdict"] is None]
        self._ensure_guard()
        for rec in to_fetch:
            if rec.get("crawl_delay"):
                self._opener.limiter.set_interval(urls.url_host(rec["url"]), rec["crawl_delay"])
        outcomes = fetch_with_img2dataset(
            sorted(to_fetch, key=lambda r: r["key"]),
            shard_id=shard_id,
            config=self._config,
            resizer=self._resizer,
            workdir=self._workdir,
        )
        samples, kept, rejected = assemble_shard(records, outcomes)
        write_shard_files(self._output_dir, shard_id, samples, kept, rejected)
        return list(emit_counts(shard_counters(kept, rejected)))

    def teardown(self):
        # The last instance of the process gives it its previous urllib opener back (the
        # in-process runner shares the process with the caller); the others leave it guarded.
        opener = getattr(self, "_opener", None)
        if opener is not None:
            self._opener = None
            netguard.PROCESS_OPENER.release(opener)
        workdir = getattr(self, "_workdir", None)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _read_back(shard_id: int, output_dir: str):
    yield from emit_counts(read_back_counters(output_dir, shard_id))


def _write_stats(total: dict[str, int], path: str) -> dict[str, int]:
    pair_counts, url_counts = split_counters(total)
    counters_lib.check_balanced(pair_counts, stage="download")
    counters_lib.check_balanced(url_counts, stage="download (URLs)")
    fileio.write_json(path, {"counters": pair_counts, "url_counters": url_counts})
    return total


class DownloadImages(beam.PTransform):
    """Candidate pairs (Arrow tables) -> webdataset shards, rejected pairs and stats in a dir.

    Input: a PCollection of ``pyarrow.Table`` batches with the ``wit gather`` candidate columns
    (``url`` required; ``caption``, ``uid``, ``query_ids``, ... optional). Writes
    ``output_dir/shards/``, ``output_dir/rejected/``, ``output_dir/plan.json`` and
    ``output_dir/stats.json``; returns the PCollection holding the summed counters.

    ``resolver`` replaces DNS resolution for the guard (tests; pinned deployments); it must be
    picklable.
    """

    def __init__(
        self,
        *,
        output_dir: str,
        config: DownloadConfig | None = None,
        resolver: netguard.Resolver | None = None,
    ):
        super().__init__()
        config = config or DownloadConfig()
        validate_config(config)
        if not output_dir:
            raise WitError("DownloadImages needs an output_dir")
        self._output_dir = output_dir
        self._config = config
        self._resolver = resolver

    def expand(self, tables):
        cfg = self._config
        out = self._output_dir
        records = (
            tables
            | "KeyPairs" >> beam.ParDo(_KeyPairsFn())
            | "GroupByUrl" >> beam.GroupByKey()
            | "UrlRecords" >> beam.MapTuple(make_url_record)
        )
        num_shards = (
            records
            | "CountUrls" >> beam.combiners.Count.Globally()
            | "Plan" >> beam.Map(_plan_num_shards, out, cfg)
        )
        start = tables.pipeline | "OutputDir" >> beam.Create([out])
        finished_ids = start | "ListFinished" >> beam.FlatMap(finished_shards)
        finished = (
            finished_ids
            | "FinishedList" >> beam.combiners.ToList()
            | "FinishedSet" >> beam.Map(frozenset)
        )
        assigned = records | "AssignShard" >> beam.FlatMap(
            _assign_shard,
            beam.pvalue.AsSingleton(num_shards),
            beam.pvalue.AsSingleton(finished),
        )
        if cfg.respect_robots:
            valid, invalid = assigned | "SplitInvalid" >> beam.Partition(
                lambda r, _: 1 if r["invalid"] else 0, 2
            )
            by_origin = valid | "KeyByOrigin" >> beam.Map(lambda r: (r["origin"], (RECORD_TAG, r)))
            verdicts = (
                valid
                | "Origins" >> beam.Map(lambda r: r["origin"])
                | "DistinctOrigins" >> beam.Distinct()
                | "BatchOrigins" >> beam.BatchElements(min_batch_size=1, max_batch_size=64)
                | "FetchRobots" >> beam.ParDo(_RobotsFn(cfg, self._resolver))
                | "TagVerdicts" >> beam.MapTuple(lambda o, v: (o, (VERDICT_TAG, v)))
            )
            checked = (
                (verdicts, by_origin)
                | "VerdictsAndRecords" >> beam.Flatten()
                | "GroupByOrigin" >> beam.GroupByKey()
                | "ApplyRobots" >> beam.FlatMap(apply_verdict, cfg)
            )
            assigned = (checked, invalid) | "Rejoin" >> beam.Flatten()
        counts_new = (
            assigned
            | "KeyByShard" >> beam.Map(lambda r: (r["shard"], r))
            | "GroupByShard" >> beam.GroupByKey()
            | "DownloadShards"
            >> beam.ParDo(_DownloadShardFn(out, cfg, self._resolver)).with_outputs(COUNTS)
        )[COUNTS]
        counts_old = (
            finished_ids
            | "ReshuffleFinished" >> beam.Reshuffle()
            | "ReadBackCounts" >> beam.FlatMap(_read_back, out).with_outputs(COUNTS)
        )[COUNTS]
        return (
            (counts_new, counts_old)
            | "AllCounts" >> beam.Flatten()
            | "SumCounts" >> SumCounts()
            | "WriteStats" >> beam.Map(_write_stats, fileio.join(out, STATS_FILE))
        )


def validate_config(config: DownloadConfig) -> None:
    """Refuse impossible settings at construction, before any worker starts."""
    if config.resize_mode not in (
        "no",
        "border",
        "keep_ratio",
        "keep_ratio_largest",
        "center_crop",
    ):
        raise WitError(f"download.resize_mode: unknown mode {config.resize_mode!r}")
    if config.image_size <= 0:
        raise WitError("download.image_size must be positive")
    if not 0 <= config.encode_quality <= 100:
        raise WitError("download.encode_quality must be in 0..100")
    if config.timeout <= 0 or config.connect_timeout <= 0:
        raise WitError("download.timeout and download.connect_timeout must be positive")
    if config.retries < 0 or config.max_redirects < 0:
        raise WitError("download.retries and download.max_redirects must be >= 0")
    if config.samples_per_shard <= 0 or config.num_shards < 0:
        raise WitError("download.samples_per_shard must be positive, num_shards >= 0")
    if config.threads <= 0 or config.processes <= 0:
        raise WitError("download.threads and download.processes must be positive")
    if config.max_crawl_delay < 0 or config.per_host_rate < 0 or config.per_host_concurrency < 0:
        raise WitError("download: max_crawl_delay, per_host_rate, per_host_concurrency >= 0")
    if config.max_aspect_ratio < 1:
        raise WitError("download.max_aspect_ratio must be >= 1")


class ReadCandidates(beam.PTransform):
    """Candidate Parquet files -> Arrow tables (one per row group)."""

    def __init__(self, files: Sequence[str]):
        super().__init__()
        if not files:
            raise WitError("no candidate files to read")
        self._files = list(files)

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> beam.Create(self._files)
            | "Read" >> beam.io.ReadAllFromParquetBatched()
        )


def candidate_files(path: str) -> list[str]:
    """``DIR/candidates/*.parquet`` of a ``wit gather`` output, or Parquet files/dirs/globs."""
    sub = fileio.join(path, "candidates")
    if fileio.exists(sub):
        return fileio.expand_inputs([sub], suffixes=(".parquet",))
    return fileio.expand_inputs([path], suffixes=(".parquet",))
