"""Repair runs: fetch the transient failures of finished shards again, into the same shards.

A download drops a URL whose fetch failed transiently (``timeout``, ``connection_error``,
``truncated``, HTTP 408/425/429/500/502/503/504: ``netguard.is_retryable_reason``) like any
other failure. ``wit download --retry-failed`` (and ``wit build --retry-failed``) fetches
exactly those URLs again: ``retryable_keys`` lists them per finished shard from its
``rejected/`` file, and ``repair_shard`` rewrites each such shard with the new outcomes.

A repaired shard is the shard a first run would have written had those fetches gone as they
went now: the other samples' tar members are copied byte for byte, the rows of the retried URLs
are replaced (kept, or rejected with their new reason), every row stays in key order, so the
files are byte-identical to those of a run that met the healthy server from the start.

A shard is three files, so its rewrite is made atomic as a unit with a small journal under
``DIR/repair/``: the new files are staged there (``NNNNN.rejected.parquet``, ``NNNNN.tar``,
``NNNNN.parquet``, each written atomically), then the commit marker ``NNNNN.json`` is written,
then each staged file is moved over its final name (``fileio.replace``) and the marker removed.
A run killed before the commit leaves the old shard untouched (the staged files are dropped);
one killed after it is completed by the next run of the download, whatever its options:
:func:`list_finished`, the first thing every download run does, rolls committed repairs
forward, removes uncommitted ones and the temporaries of killed writers, and only then lists
the finished shards.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from wit_pipeline import counters, fileio, shards, stage
from wit_pipeline.errors import WitError
from wit_pipeline.stages.download import netguard
from wit_pipeline.stages.download.plan import (
    PLAN_FILE,
    REJECTED_DIR,
    SHARD_SCHEMA,
    SHARDS_DIR,
    Outcome,
    assemble_shard,
    finished_shards,
    rejected_path,
    shards_dir,
)

REPAIR_DIR = "repair"
MARKER_SUFFIX = ".json"


def repair_dir(output_dir: str) -> str:
    return fileio.join(output_dir, REPAIR_DIR)


def staged_files(output_dir: str, shard_id: int) -> list[tuple[str, str]]:
    """``(staged, final)`` paths of a shard's repair, in the order they are moved into place."""
    name = shards.shard_name(shard_id)
    tar, parquet = shards.shard_paths(shards_dir(output_dir), shard_id)
    staging = repair_dir(output_dir)
    return [
        (fileio.join(staging, f"{name}.rejected.parquet"), rejected_path(output_dir, shard_id)),
        (fileio.join(staging, f"{name}.tar"), tar),
        (fileio.join(staging, f"{name}.parquet"), parquet),  # the shard's completion mark: last
    ]


def marker_path(output_dir: str, shard_id: int) -> str:
    return fileio.join(repair_dir(output_dir), f"{shards.shard_name(shard_id)}{MARKER_SUFFIX}")


def retryable_keys(shard_id: int, output_dir: str) -> list[tuple[str, int]]:
    """``(key, shard_id)`` for every URL of a finished shard that failed transiently."""
    with fileio.open_file(rejected_path(output_dir, shard_id), "rb") as f:
        table = pq.read_table(f, columns=["key", "reason"])
    rows = zip(table.column("key").to_pylist(), table.column("reason").to_pylist(), strict=True)
    keys = {k for k, r in rows if netguard.is_retryable_reason(r)}
    return [(k, shard_id) for k in sorted(keys)]


def _merge(old: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]], retried: set[str]):
    """Old rows of the URLs not retried plus the new rows, in key order (stable within a key:
    each key's rows come from one side, in the order assembly made them)."""
    rows = [r for r in old if r["key"] not in retried] + list(new)
    return sorted(rows, key=lambda r: r["key"])


def _read_table(path: str) -> list[dict[str, Any]]:
    with fileio.open_file(path, "rb") as f:
        return pq.read_table(f).to_pylist()


def repair_shard(
    output_dir: str,
    shard_id: int,
    records: Sequence[Mapping[str, Any]],
    outcomes: Mapping[str, Outcome],
) -> dict[str, int]:
    """Rewrite finished shard ``shard_id`` with the new outcomes of its retried URL records.

    ``records`` are the URL records fetched again (rebuilt from the candidates, robots.txt
    checked again), ``outcomes`` their fetch results. Returns ``{"retried": n, "recovered":
    m}`` (URLs). The shard's counters are read back from its new files afterwards.
    """
    retried = {r["key"] for r in records}
    samples, kept, rejected = assemble_shard(records, outcomes)
    tar_path, parquet_path = shards.shard_paths(shards_dir(output_dir), shard_id)
    members = [m for m in shards.iter_members(tar_path) if _key(m[0]) not in retried]
    members += [m for s in samples for m in shards.sample_members(s)]
    members.sort(key=lambda m: _key(m[0]))  # stable: a sample's members keep their order
    kept_rows = _merge(_read_table(parquet_path), kept.to_pylist(), retried)
    rejected_rows = _merge(
        _read_table(rejected_path(output_dir, shard_id)), rejected.to_pylist(), retried
    )
    (rej_staged, _), (tar_staged, _), (parquet_staged, _) = staged_files(output_dir, shard_id)
    with fileio.atomic_write(rej_staged, "wb") as f:
        table = pa.Table.from_pylist(rejected_rows, schema=stage.REJECTED_SCHEMA)
        pq.write_table(table, f, compression="zstd")
    with fileio.atomic_write(tar_staged, "wb") as f:
        f.write(shards.members_tar_bytes(members))
    with fileio.atomic_write(parquet_staged, "wb") as f:
        pq.write_table(pa.Table.from_pylist(kept_rows, schema=SHARD_SCHEMA), f, compression="zstd")
    summary = {"retried": len(retried), "recovered": len(samples)}
    fileio.write_json(marker_path(output_dir, shard_id), {"shard": shard_id, **summary})  # commit
    _apply(output_dir, shard_id)
    return summary


def _key(member_name: str) -> str:
    return member_name.split(".", 1)[0]


def _apply(output_dir: str, shard_id: int) -> None:
    """Move a committed repair's staged files into place, then drop its marker (idempotent)."""
    for staged, final in staged_files(output_dir, shard_id):
        if fileio.exists(staged):  # else moved by an earlier, interrupted apply
            fileio.replace(staged, final)
    fileio.remove_entries(
        repair_dir(output_dir), lambda n: n == f"{shards.shard_name(shard_id)}{MARKER_SUFFIX}"
    )


def finish_repairs(output_dir: str) -> list[int]:
    """Complete every committed repair, drop uncommitted ones; returns the completed shard ids.

    Afterwards ``DIR/repair/`` is empty (and, on a local disk, gone).
    """
    staging = repair_dir(output_dir)
    names = fileio.list_names(staging)
    done = []
    for name in names:
        stem = name.removesuffix(MARKER_SUFFIX)
        if name.endswith(MARKER_SUFFIX) and stem.isdigit():
            _apply(output_dir, int(stem))
            done.append(int(stem))
    fileio.remove_entries(staging, lambda _: True)  # staged files of uncommitted repairs
    if fileio.is_local(staging) and os.path.isdir(staging):
        os.rmdir(staging)
    return done


def list_finished(output_dir: str) -> list[int]:
    """What every download run does before any shard writer starts, then the finished shards.

    Completes or drops interrupted repairs (:func:`finish_repairs`), removes the temporaries
    of killed writers under ``shards/`` and ``rejected/`` and of ``stats.json`` (local or
    remote, one listing each),
    then returns the ids of the finished shards (``plan.finished_shards``).
    """
    if not fileio.exists(output_dir):
        return []
    finish_repairs(output_dir)
    for sub in (SHARDS_DIR, REJECTED_DIR):
        fileio.remove_temporaries(fileio.join(output_dir, sub))
    # stats.json's (written at the end); plan.json's are removed where it is written, as the
    # plan may be written while this runs.
    fileio.remove_temporaries(output_dir, prefix=stage.STATS_FILE)
    return finished_shards(output_dir)


# ---------------------------------------------------------------------------------------------
# What the launcher says about a repair run


def transient(url_counters: Mapping[str, int]) -> dict[str, int]:
    """``{reason: URLs}`` of the transient (retryable) failures in ``url_counters``."""
    prefix = counters.dropped("")
    return {
        k[len(prefix) :]: v
        for k, v in sorted(url_counters.items())
        if k.startswith(prefix) and netguard.is_retryable_reason(k[len(prefix) :])
    }


def check_can_retry(output_dir: str) -> dict[str, int] | None:
    """Refuse a repair run where there is no download; return its URL counters so far
    (``None`` when the download never finished, so that it has no ``stats.json`` yet)."""
    if not fileio.exists(fileio.join(output_dir, PLAN_FILE)):
        raise WitError(
            f"--retry-failed: {output_dir} holds no download to repair (no {PLAN_FILE}); "
            "run it without --retry-failed first"
        )
    path = fileio.join(output_dir, stage.STATS_FILE)
    return fileio.read_json(path)["url_counters"] if fileio.exists(path) else None


def summary(before: Mapping[str, int] | None, after_doc: Mapping[str, Any]) -> dict[str, Any]:
    """Images kept and transient failures (URLs, by reason) before and after a repair run."""
    after = after_doc["url_counters"]
    return {
        "images_before": None if before is None else before.get(counters.KEPT, 0),
        "images_after": after.get(counters.KEPT, 0),
        "transient_before": None if before is None else transient(before),
        "transient_after": transient(after),
    }


def describe(url_counters: Mapping[str, int] | None) -> str:
    """``"12 of 17 images kept; transient failures: http_503 1, timeout 1"`` for a log line."""
    if url_counters is None:
        return "no stats yet"
    failures = transient(url_counters)
    listed = ", ".join(f"{r} {n}" for r, n in failures.items()) or "none"
    kept, total = url_counters.get(counters.KEPT, 0), url_counters.get(counters.INPUT, 0)
    return f"{kept} of {total} images kept; transient failures: {listed}"
