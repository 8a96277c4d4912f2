"""Every Beam graph of a build, side by side: the whole wiring on one screen.

``wit build`` runs gather -> prebalance -> download -> finalize (dedup -> [score] -> balance ->
shards), one pipeline per step (``build.py`` runs them, resumes and fingerprints them;
``steps.py`` runs one step by itself). ``wit dedup`` and ``wit balance`` run the finalize step
in two halves, with ``samples/`` in between. Every step writes ``stats.json``
(``stage.WriteStats``) and ``rejected/`` (``stage.WriteRejected``, ``stage.REJECTED_SCHEMA``).

Constructor rule, the same for every transform: keyword-only arguments (a reader's input or a
writer's output path may come first: ``ReadCandidates(files)``, ``stage.WriteStats(path)``); a
stage transform takes its own config section whole as ``config=`` (``GatherPairs``,
``PreBalance``, ``DownloadImages``, ``DedupRecords``, ``BalanceSamples``, ``ScoreSamples``,
``AssignShards``, ``FilterByClipScore``), which validated itself when it was made
(``config.py``), so the transform checks none of its options again; anything else (paths, side
inputs, batch sizes, building blocks such as ``FindNearDuplicates``) is a typed keyword-only
value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa

from wit_pipeline import beam_utils, counters, fileio, samples, stage
from wit_pipeline import config as config_lib
from wit_pipeline.config import (
    BalanceConfig,
    BuildConfig,
    DedupConfig,
    DownloadConfig,
    GatherConfig,
)
from wit_pipeline.stages import balance
from wit_pipeline.stages import score as score_lib
from wit_pipeline.stages import shards as shards_lib
from wit_pipeline.stages.dedup import core as dedup
from wit_pipeline.stages.dedup.decontaminate import CONTAMINATION
from wit_pipeline.stages.dedup.takedown import DropTakenDown
from wit_pipeline.stages.download import transforms as download_lib
from wit_pipeline.stages.gather import transforms as gather_lib
from wit_pipeline.takedown import Blocklist

REJECTED, COUNTS = beam_utils.REJECTED, beam_utils.COUNTS


def gather(
    p,
    *,
    paths: Sequence[str],
    output: str,
    config: GatherConfig,
    queries,
    num_buckets: int,
    queries_sha256: str | None = None,
    extra: Mapping[str, Any] | None = None,
    progress_interval: float = 10.0,
    blocklist: Blocklist | None = None,
) -> None:
    """Crawl files -> ``output``'s candidates, rejected pairs and stats."""
    result = (
        p
        | "Inputs" >> beam.Create(list(enumerate(paths)))
        | "Gather"
        >> gather_lib.GatherPairs(
            config=config,
            queries=queries,
            num_buckets=num_buckets,
            total_files=len(paths),
            queries_sha256=queries_sha256,
            progress_interval=progress_interval,
            blocklist=blocklist,
        )
    )
    _ = result | "Write" >> gather_lib.WriteGather(
        output_dir=output, config=config, num_buckets=num_buckets, extra=extra
    )


def prebalance(
    p,
    *,
    gather_dir: str,
    output_dir: str,
    config: BalanceConfig,
    schema: pa.Schema,
    queries_path: str = "",
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Gather candidates -> pre-balanced candidates (the same schema) for the download."""
    # validate=False: the launcher does not list the glob while building the graph (the caller
    # has checked that it matches; a remote runner lists it on its workers).
    # Candidates travel as Arrow tables (one per Parquet row group): counted and drawn per
    # table (balance_arrays), written back in the input's schema. Counted from a second read
    # of only their query ids: the whole read runs fused with the draw (no materialization).
    pattern = fileio.join(gather_dir, gather_lib.CANDIDATES_DIR, "*.parquet")
    cands = p | "Read" >> beam.io.ReadFromParquetBatched(pattern, validate=False)
    query_ids = p | "ReadQueryIds" >> balance.ReadQueryIds(file_pattern=pattern)
    out = {"records": cands, "query_ids": query_ids} | "PreBalance" >> balance.PreBalance(
        config=config, tables=True
    )
    _ = (
        out["kept"]
        | "InSchema" >> beam.Map(lambda t: t.select(schema.names).cast(schema))
        | "WriteCandidates"
        >> beam.io.WriteToParquetBatched(
            fileio.join(output_dir, gather_lib.CANDIDATES_DIR, "part"),
            schema=schema,
            file_name_suffix=".parquet",
            codec="zstd",
        )
    )
    _ = out[REJECTED] | "WriteRejected" >> stage.WriteRejected(
        fileio.join(output_dir, stage.REJECTED_DIR)
    )
    after = (
        out["after"]
        | "AfterDict" >> beam.combiners.ToDict()
        | "QueryCountsDoc" >> beam.Map(_query_counts_doc)
    )
    _ = out[COUNTS] | "Stats" >> stage.WriteStats(
        fileio.join(output_dir, stage.STATS_FILE), extra=extra, side=[after], stage="prebalance"
    )
    _ = {"before": out["before"], "after_prebalance": out["after"]} | "QueryCounts" >> (
        balance.WriteQueryCounts(
            fileio.join(output_dir, balance.QUERY_COUNTS),
            queries_path=queries_path,
            t=config.t,
            prebalance_factor=config.prebalance_factor,
        )
    )


def download(
    p,
    *,
    files: Sequence[str],
    output_dir: str,
    config: DownloadConfig,
    blocklist: Blocklist | None = None,
    retry_failed: bool = False,
) -> None:
    """Candidate Parquet files -> ``output_dir``'s download shards (resumable shard by shard;
    ``retry_failed``: also fetch the transient failures of finished shards again)."""
    _ = (
        p
        | "ReadCandidates" >> download_lib.ReadCandidates(files=files)
        | "DownloadImages"
        >> download_lib.DownloadImages(
            output_dir=output_dir, config=config, blocklist=blocklist, retry_failed=retry_failed
        )
    )


def finalize(
    p,
    *,
    tars: Sequence[str],
    output_dir: str,
    config: BuildConfig,
    work_dir: str,
    score: bool = False,
    queries_path: str = "",
    query_columns: Mapping[str, Mapping[int, int]] | None = None,
    stats_extra: Mapping[str, Any] | None = None,
    blocklist: Blocklist | None = None,
    model_handler: Any = None,
) -> None:
    """Download shards -> [takedown] -> dedup -> [score] -> balance -> ``output_dir/shards``,
    ``rejected/``, ``query_counts.parquet`` (``contamination.json``); the step's stats (and the
    threshold and scores of ``score``) go to ``work_dir``. ``blocklist``'s hash entries drop
    the downloaded images they match before dedup (``stages.dedup.takedown``).

    Scoring comes before balancing (DataComp and DFN filter first; MetaCLIP's balancing then
    counts only the pairs that survive). ``model_handler`` replaces the seed's (tests).
    """
    read, dd, kept = _read_and_dedup(p, tars, output_dir, config.dedup, blocklist)
    parts = [read, dd]
    if score:
        scored = kept | "Score" >> score_lib.ScoreSamples(
            config=config.score,
            threshold_path=fileio.join(work_dir, score_lib.SCORE_FILE),
            scores_dir=fileio.join(work_dir, score_lib.SCORES_DIR),
            model_handler=model_handler,
        )
        kept, parts = scored["kept"], [*parts, scored]
    bal = kept | "Balance" >> balance.BalanceSamples(config=config.balance)
    parts.append(bal)
    written = _write_shards(bal["kept"], output_dir, config, scored=score)
    _ = _flat(parts, REJECTED) | "WriteRejected" >> stage.WriteRejected(
        fileio.join(output_dir, stage.REJECTED_DIR)
    )
    columns = {
        name: p | f"QueryCounts[{name}]" >> beam.Create(sorted(col.items()), reshuffle=False)
        for name, col in (query_columns or {}).items()
    }
    # after_dedup: what balancing drew from (after the CLIP-score filter when the build scores)
    columns.update(
        after_download=_pairs_per_query(read), after_dedup=bal["before"], final=bal["after"]
    )
    _ = columns | "QueryCounts" >> balance.WriteQueryCounts(
        fileio.join(output_dir, balance.QUERY_COUNTS),
        queries_path=queries_path,
        t=config.balance.t,
        prebalance_factor=config.balance.prebalance_factor or None,
    )
    counts = (*[x[COUNTS] for x in parts], written["counts"]) | "AllCounts" >> beam.Flatten()
    _ = counts | "Stats" >> _stats(work_dir, config.dedup.collapse, stats_extra)


def dedup_samples(
    p,
    *,
    tars: Sequence[str],
    output_dir: str,
    config: BuildConfig,
    stats_extra: Mapping[str, Any] | None = None,
    blocklist: Blocklist | None = None,
) -> None:
    """``wit dedup``: download shards -> deduplicated ``samples/*.parquet`` (no image bytes)."""
    read, dd, kept = _read_and_dedup(p, tars, output_dir, config.dedup, blocklist)
    _ = (
        kept
        | "ToRow" >> beam.Map(samples.sample_row)
        | "WriteSamples"
        >> beam.io.WriteToParquet(
            fileio.join(output_dir, samples.SAMPLES_DIR, "part"),
            schema=samples.SAMPLE_SCHEMA,
            file_name_suffix=".parquet",
            codec="zstd",
        )
    )
    _ = _flat([read, dd], REJECTED) | "WriteRejected" >> stage.WriteRejected(
        fileio.join(output_dir, stage.REJECTED_DIR)
    )
    left = kept | "CountKept" >> stage.CountRecords(counters.KEPT, pairs=True)
    counts = (read[COUNTS], dd[COUNTS], left) | "AllCounts" >> beam.Flatten()
    _ = counts | "Stats" >> _stats(output_dir, config.dedup.collapse, stats_extra)
    columns = {
        "after_download": _pairs_per_query(read),
        "after_dedup": kept | "CountDedup" >> balance.CountQueries(),
    }
    _ = columns | "QueryCounts" >> balance.WriteQueryCounts(
        fileio.join(output_dir, balance.QUERY_COUNTS)
    )


def balance_samples(
    p,
    *,
    sample_files: Sequence[str],
    output_dir: str,
    config: BuildConfig,
    collapse: bool,
    base_counts: str = "",
    queries_path: str = "",
    stats_extra: Mapping[str, Any] | None = None,
) -> None:
    """``wit balance``: ``wit dedup``'s samples -> balanced final shards.

    Balanced as Arrow tables (``BalanceSampleFiles``: counted from a read of the query ids,
    drawn over a second, whole read); only the kept samples become records, for the shards.
    """
    bal = p | "Balance" >> balance.BalanceSampleFiles(
        files=list(sample_files), config=config.balance
    )
    kept = bal["kept"] | "ToRecords" >> beam.FlatMap(samples.table_records)
    written = _write_shards(kept, output_dir, config)
    _ = bal[REJECTED] | "WriteRejected" >> stage.WriteRejected(
        fileio.join(output_dir, stage.REJECTED_DIR)
    )
    counts = (bal[COUNTS], written["counts"]) | "AllCounts" >> beam.Flatten()
    _ = counts | "Stats" >> _stats(output_dir, collapse, stats_extra)
    _ = {"after_dedup": bal["before"], "final": bal["after"]} | "QueryCounts" >> (
        balance.WriteQueryCounts(
            fileio.join(output_dir, balance.QUERY_COUNTS),
            base=base_counts,
            queries_path=queries_path,
            t=config.balance.t,
            prebalance_factor=config.balance.prebalance_factor or None,
        )
    )


# ---------------------------------------------------------------------------------------------
# Pieces shared by the graphs above


def _read_and_dedup(
    p, tars: Sequence[str], output_dir: str, config: DedupConfig, blocklist: Blocklist | None
):
    """Download tars -> (read outputs, dedup outputs, deduplicated samples); with hash
    entries in ``blocklist``, the images they match are dropped first (their drops and counts
    are part of the dedup outputs)."""
    read = (
        p
        | "Tars" >> beam.Create(list(tars), reshuffle=False)
        | "Read" >> samples.ReadDownloadShards(phash_decode=config.phash_decode)
    )
    records = read["kept"]
    taken = None
    if blocklist is not None and blocklist.has_hash_entries:
        taken = records | "Takedown" >> DropTakenDown(blocklist=blocklist)
        records = taken["kept"]
    dd = records | "Dedup" >> dedup.DedupRecords(
        config=config, contamination_path=fileio.join(output_dir, CONTAMINATION)
    )
    if taken is not None:
        dd = {
            **dd,
            REJECTED: (taken[REJECTED], dd[REJECTED]) | "DedupRejected" >> beam.Flatten(),
            COUNTS: (taken[COUNTS], dd[COUNTS]) | "DedupCounts" >> beam.Flatten(),
        }
    kept = dd["samples"]
    if not config.collapse:  # every pair its own sample, sharing the image
        kept = kept | "OnePerPair" >> beam.FlatMap(samples.expand_pairs)
    return read, dd, kept


def _write_shards(kept, output_dir: str, cfg: BuildConfig, *, scored: bool = False):
    assigned = kept | "AssignShards" >> shards_lib.AssignShards(config=cfg.shards)
    return assigned | "WriteShards" >> shards_lib.WriteFinalShards(
        fileio.join(output_dir, shards_lib.SHARDS_DIR),
        manifest_config=config_lib.to_dict(cfg),
        scored=scored,
    )


def _pairs_per_query(read):
    """Pairs per query of the images that decode (the ``after_download`` column)."""
    return read["kept"] | "CountDownload" >> balance.CountUnits(unit="pair")


def _stats(directory: str, collapse: bool, extra: Mapping[str, Any] | None) -> stage.WriteStats:
    """The stats of a step after the download: ``counters`` over images and ``pair_counters``
    over pairs; with ``dedup.collapse = false`` every pair is a sample: both count pairs."""
    sections: dict[str, stage.Section] = {"": "counters", "pair": "pair_counters"}
    if not collapse:
        sections = {"": None, "pair": ("pair_counters", "counters")}
    return stage.WriteStats(
        fileio.join(directory, stage.STATS_FILE),
        sections=sections,
        flows=tuple(sections),
        extra={"unit": "image" if collapse else "pair", **(extra or {})},
        stage="finalize",
    )


def _query_counts_doc(after: Mapping[int, int]) -> dict[str, Any]:
    return {"query_counts": {str(q): int(n) for q, n in sorted(after.items()) if n}}


def _flat(parts: Sequence[Mapping[str, Any]], tag: str):
    return tuple(x[tag] for x in parts) | f"All{tag.capitalize()}" >> beam.Flatten()
