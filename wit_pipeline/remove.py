"""``wit remove``: a new release of a finished build without the samples a takedown names.

Nothing is downloaded and nothing is recomputed: the final shards of ``--input`` are read, each
sample is checked against the blocklists (:func:`match_sample`), and ``--output`` gets

- ``shards/NNNNN.tar`` and ``NNNNN.parquet`` for every shard of the input, with the same ids: a
  shard without removals is copied byte for byte; a shard with removals is rewritten without the
  removed samples' members, every other member copied with its tar header and bytes unchanged,
  and its Parquet twin without their rows;
- ``shards/manifest.json`` (the input's, with the new counts, sizes and sha256s, and a
  ``release`` record: the input build's path and manifest sha256, the blocklists, and every
  removed sample with its key, URL, shard and the matching entry) and ``shards/sizes.json``;
- ``rejected/removed.parquet``: the removed samples as rows of ``stage.REJECTED_SCHEMA``
  (stage ``remove``, reason ``takedown``, the entry as ``detail``);
- ``stats.json``: ``counters`` over samples and ``pair_counters`` over pairs (``input``,
  ``kept``, ``dropped:takedown``), the release record without the removed list.

The output depends only on the input and the entries, so a rerun rewrites the same bytes. A
sample matches when an entry matches anything recorded of it (``KEY.json``): a ``url`` or
``domain`` entry its URL, the URL of any copy merged into it (``duplicates``) or the page URL of
any of its pairs; a ``sha256`` or ``phash`` entry its own hashes or those of any merged copy.
Redirect targets met at download are not recorded in a build, so only a build run with the
blocklist (``wit build --blocklist``) can apply entries to them.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from wit_pipeline import counters, fileio, shards, stage, takedown
from wit_pipeline.errors import WitError
from wit_pipeline.stages import shards as final_shards

STAGE = "remove"
RELEASE_FORMAT = "wit-pipeline/release"
REMOVED_FILE = "removed.parquet"

Log = Callable[[str], None]


def match_sample(row: Mapping[str, Any], blocklist: takedown.Blocklist) -> str | None:
    """The entry that a final sample (its ``KEY.json`` / Parquet row) matches, else None.

    The detail names what matched when it is not the sample itself: ``(page URL)``, ``(copy
    KEY)`` for a merged copy.
    """
    copies = list(row.get("duplicates") or [])
    if blocklist.has_url_entries:
        hit = blocklist.match_url(row.get("url"))
        if hit is not None:
            return hit
        for d in copies:
            hit = blocklist.match_raw_url(d.get("url"))
            if hit is not None:
                return f"{hit} (copy {d.get('key')})"
        for p in row.get("pairs") or []:
            hit = blocklist.match_raw_url(p.get("page_url"))
            if hit is not None:
                return f"{hit} (page URL)"
    if blocklist.has_hash_entries:
        hit = blocklist.match_hashes(row.get("sha256"), row.get("phash"))
        if hit is not None:
            return hit
        for d in copies:
            hit = blocklist.match_hashes(d.get("sha256"), d.get("phash"))
            if hit is not None:
                return f"{hit} (copy {d.get('key')})"
    return None


def _copy(src: str, dst: str) -> tuple[int, str]:
    """Copy a file byte for byte; ``(size, sha256)`` of what was copied."""
    h, size = hashlib.sha256(), 0
    with fileio.open_file(src, "rb") as fin, fileio.atomic_write(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            fout.write(chunk)
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def filter_tar(data: bytes, removed: set[str]) -> bytes:
    """The tar ``data`` without the members of the ``removed`` keys; every other member keeps
    its header (name, size, mode, mtime, owner) and bytes, in the same order."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data), mode="r:") as src,
        # The format shards.tar_bytes writes (a reader does not learn the file's format).
        tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst,
    ):
        for member in src:
            if member.name.partition(".")[0] in removed:
                continue
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return out.getvalue()


def _remove_from_shard(
    src_dir: str, dst_dir: str, shard: Mapping[str, Any], blocklist: takedown.Blocklist
) -> tuple[shards.ShardInfo, list[dict[str, Any]], dict[str, int]]:
    """One shard: its new info, the removed samples' records and the shard's counts."""
    shard_id = int(shard["shard_id"])
    src_tar, src_parquet = shards.shard_paths(src_dir, shard_id)
    dst_tar, dst_parquet = shards.shard_paths(dst_dir, shard_id)
    with fileio.open_file(src_parquet, "rb") as f:
        table = pq.read_table(f)
    rows = table.to_pylist()
    hits = [match_sample(r, blocklist) for r in rows]
    removed = [
        {**r, "reason": takedown.TAKEDOWN, "detail": hit, "shard": shard_id}
        for r, hit in zip(rows, hits, strict=True)
        if hit is not None
    ]
    n_pairs = [len(r.get("pairs") or r.get("captions") or []) for r in rows]
    c = {
        counters.INPUT: len(rows),
        counters.KEPT: len(rows) - len(removed),
        counters.dropped(takedown.TAKEDOWN): len(removed),
        counters.scoped(stage.PAIR, counters.INPUT): sum(n_pairs),
        counters.scoped(stage.PAIR, counters.dropped(takedown.TAKEDOWN)): sum(
            n for n, hit in zip(n_pairs, hits, strict=True) if hit is not None
        ),
    }
    c[counters.scoped(stage.PAIR, counters.KEPT)] = (
        c[counters.scoped(stage.PAIR, counters.INPUT)]
        - c[counters.scoped(stage.PAIR, counters.dropped(takedown.TAKEDOWN))]
    )
    if not removed:
        size, sha = _copy(src_tar, dst_tar)
        _copy(src_parquet, dst_parquet)
        return shards.ShardInfo(shard_id, dst_tar, dst_parquet, len(rows), size, sha), removed, c
    with fileio.open_file(src_tar, "rb") as f:
        data = filter_tar(f.read(), {r["key"] for r in removed})
    keep = pa.array([hit is None for hit in hits])
    with fileio.atomic_write(dst_tar, "wb") as f:
        f.write(data)
    with fileio.atomic_write(dst_parquet, "wb") as f:
        pq.write_table(table.filter(keep), f, compression="zstd")
    info = shards.ShardInfo(
        shard_id,
        dst_tar,
        dst_parquet,
        len(rows) - len(removed),
        len(data),
        hashlib.sha256(data).hexdigest(),
    )
    return info, removed, c


def _check_paths(input_dir: str, output_dir: str) -> tuple[str, str]:
    src = fileio.join(input_dir, final_shards.SHARDS_DIR)
    if not fileio.exists(fileio.join(src, shards.MANIFEST)):
        raise WitError(f"{input_dir} holds no finished build (no shards/{shards.MANIFEST})")
    a, b = _abs(input_dir).rstrip("/"), _abs(output_dir).rstrip("/")
    if a == b or b.startswith(a + "/" + final_shards.SHARDS_DIR):
        raise WitError("--output must be another directory than --input (a new release)")
    manifest = fileio.join(output_dir, final_shards.SHARDS_DIR, shards.MANIFEST)
    if fileio.exists(manifest):
        if (fileio.read_json(manifest).get("release") or {}).get("format") != RELEASE_FORMAT:
            raise WitError(f"{output_dir} holds shards that are not a `wit remove` release")
    elif fileio.exists(output_dir) and _listing(output_dir):
        raise WitError(f"{output_dir} is not empty: choose an empty or new --output")
    return src, fileio.join(output_dir, final_shards.SHARDS_DIR)


def _abs(path: str) -> str:
    if not fileio.is_local(path):
        return path
    return os.path.abspath(path.removeprefix("file://"))


def _listing(path: str) -> list[str]:
    if fileio.is_local(path):
        p = path.removeprefix("file://")
        return os.listdir(p) if os.path.isdir(p) else [p]
    return list(fileio.filesystem(path).ls(path, detail=False))


def remove_samples(
    input_dir: str,
    output_dir: str,
    blocklists: Sequence[str],
    *,
    workers: int = 8,
    log: Log | None = None,
) -> dict[str, Any]:
    """Write the new release (module docstring); returns its ``stats.json`` document."""
    if not blocklists:
        raise WitError("wit remove needs at least one --blocklist")
    src, dst = _check_paths(input_dir, output_dir)
    blocklist = takedown.load_blocklists([_abs(b) for b in blocklists])
    old_manifest_path = fileio.join(src, shards.MANIFEST)
    old = fileio.read_json(old_manifest_path)
    fileio.makedirs(dst)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(
            pool.map(lambda s: _remove_from_shard(src, dst, s, blocklist), old["shards"])
        )
    infos = [info for info, _, _ in results]
    removed = [r for _, rs, _ in results for r in rs]
    totals = counters.merge(c for _, _, c in results)
    parts = counters.split_scopes(totals)
    for part in parts.values():
        counters.check_balanced(part, stage=STAGE)
    _remove_stale_shards(dst, {i.shard_id for i in infos})
    release = {
        "format": RELEASE_FORMAT,
        "previous": {
            "path": _abs(input_dir),
            "manifest_sha256": fileio.sha256_file(old_manifest_path),
            "num_samples": old.get("num_samples"),
        },
        "blocklists": blocklist.describe(),
        "counters": parts.get("", {}),
        "pair_counters": parts.get(stage.PAIR, {}),
    }
    listed = [
        {"key": r["key"], "url": r["url"], "entry": r["detail"], "shard": r["shard"]}
        for r in sorted(removed, key=lambda r: r["key"])
    ]
    extra = {k: v for k, v in old.items() if k not in _MANIFEST_OWN}
    fileio.write_json(
        fileio.join(dst, final_shards.SIZES),
        {os.path.basename(i.tar): i.num_samples for i in sorted(infos, key=lambda i: i.shard_id)},
    )
    shards.write_manifest(
        dst,
        infos,
        config=old.get("config") or {},
        extra={**extra, "release": {**release, "removed": listed}},
    )
    rejected = [stage.rejected_row(r, stage=STAGE) for r in sorted(removed, key=lambda r: r["key"])]
    with fileio.atomic_write(fileio.join(output_dir, stage.REJECTED_DIR, REMOVED_FILE), "wb") as f:
        pq.write_table(
            pa.Table.from_pylist(rejected, schema=stage.REJECTED_SCHEMA), f, compression="zstd"
        )
    doc = {
        "counters": release["counters"],
        "pair_counters": release["pair_counters"],
        "release": {k: v for k, v in release.items() if "counters" not in k},
    }
    fileio.write_json(fileio.join(output_dir, stage.STATS_FILE), doc)
    if log:
        c = release["counters"]
        log(
            f"remove: {c.get('kept', 0):,} of {c.get('input', 0):,} samples kept, "
            f"{c.get('dropped:takedown', 0):,} removed -> {dst}"
        )
    return doc


# The manifest fields write_manifest computes (the rest of the input's manifest is kept).
_MANIFEST_OWN = frozenset(
    {"num_shards", "num_samples", "total_bytes", "train_data", "shards", "config", "release"}
)


def _remove_stale_shards(directory: str, ids: set[int]) -> None:
    """Shard files a previous release into the same directory left that this one lacks."""
    if not fileio.is_local(directory):
        return
    for name in sorted(os.listdir(directory)):
        stem, _, ext = name.partition(".")
        if ext in ("tar", "parquet") and stem.isdigit() and int(stem) not in ids:
            os.remove(os.path.join(directory, name))
