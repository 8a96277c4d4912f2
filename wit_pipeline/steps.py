"""Running one step: check its inputs, clear what a rerun replaces, run its graph, read its stats.

The graphs are in ``pipeline.py``; these functions run one of them as a pipeline. ``wit build``
runs them in order (``build.py``: fingerprints, resume, the whole run's stats); the commands
``wit balance --pre``, ``wit dedup [--finalize]`` and ``wit balance`` run one by itself. Each
returns the step's ``stats.json`` document (checked: ``stage.WriteStats`` refuses counters that
do not balance).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import apache_beam as beam

from wit_pipeline import beam_utils, fileio, pipeline, samples, stage
from wit_pipeline import config as config_lib
from wit_pipeline.config import BuildConfig, DownloadConfig
from wit_pipeline.errors import WitError
from wit_pipeline.stages import balance
from wit_pipeline.stages import score as score_lib
from wit_pipeline.stages import shards as shards_lib
from wit_pipeline.stages.download import plan as download_plan
from wit_pipeline.stages.download import repair as download_repair
from wit_pipeline.stages.download import transforms as download_lib
from wit_pipeline.stages.gather import transforms as gather_lib
from wit_pipeline.takedown import Blocklist

Log = Callable[[str], None]


def run(
    graph: Callable[[beam.Pipeline], None],
    *,
    beam_args: Sequence[str] = (),
    runner: str | None = None,
    processes: int = 1,
) -> None:
    """Build ``graph`` into a pipeline and run it (``processes`` local worker processes)."""
    args = list(beam_args)
    if runner:
        args = [a for a in args if not a.startswith("--runner")] + [f"--runner={runner}"]
    options = beam_utils.pipeline_options(beam_utils.local_parallelism(args, processes))
    with beam.Pipeline(options=options) as p:
        graph(p)


def clear_parts(directory: str) -> None:
    """Remove what an earlier run of a Beam file sink left in ``directory``, local or remote.

    ``part-*`` files (Beam names them by part count, so a rerun with another count would leave
    stale parts read as duplicates), the ``beam-temp-*`` folders of a run killed before its
    sink finalized, and temporaries of killed atomic writes.
    """
    fileio.remove_entries(
        directory,
        lambda name: name.startswith(("part-", "beam-temp-")) or fileio.is_temporary(name),
    )


def _stats(directory: str) -> dict[str, Any]:
    return fileio.read_json(fileio.join(directory, stage.STATS_FILE))


def run_prebalance(
    gather_dir: str,
    output_dir: str,
    cfg: BuildConfig,
    *,
    queries_path: str = "",
    beam_args: Sequence[str] = (),
    runner: str | None = None,
) -> dict[str, Any]:
    """``wit gather`` output -> pre-balanced candidates in the same format (for download)."""
    import pyarrow.parquet as pq

    parts = fileio.expand_inputs([fileio.join(gather_dir, gather_lib.CANDIDATES_DIR, "*.parquet")])
    with fileio.open_file(parts[0], "rb") as f:
        schema = pq.read_schema(f)
    for needed in ("uid", "query_ids"):
        if needed not in schema.names:
            raise WitError(f"{parts[0]}: not gather candidates (no {needed} column)")
    extra: dict[str, Any] = {"inputs": [gather_dir], "config": config_lib.to_dict(cfg)}
    gather_stats = fileio.join(gather_dir, stage.STATS_FILE)
    if fileio.exists(gather_stats):
        queries = fileio.read_json(gather_stats).get("queries")
        if queries:
            extra["queries"] = queries
    fileio.makedirs(output_dir)
    fileio.remove_temporaries(output_dir)  # stats.json, query_counts.parquet of a killed run
    for sub in (gather_lib.CANDIDATES_DIR, stage.REJECTED_DIR):
        clear_parts(fileio.join(output_dir, sub))

    def graph(p):
        pipeline.prebalance(
            p,
            gather_dir=gather_dir,
            output_dir=output_dir,
            config=cfg.balance,
            schema=schema,
            queries_path=queries_path,
            extra=extra,
        )

    run(graph, beam_args=beam_args, runner=runner)
    return _stats(output_dir)


def run_download(
    candidates_dir: str,
    output_dir: str,
    cfg: DownloadConfig,
    *,
    beam_args: Sequence[str] = (),
    runner: str | None = None,
    log: Log | None = None,
    blocklist: Blocklist | None = None,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Candidates (``wit gather`` or pre-balance output) -> download shards, resumed shard by
    shard. Returns the download's ``stats.json`` document, with ``resumed_shards`` and, for a
    repair run (``retry_failed``: fetch the transient failures of finished shards again, into
    the same shards), ``retried`` (``download_repair.summary``). ``blocklist``: takedown
    entries (url and domain entries refuse the URLs and redirect targets they match)."""
    files = download_lib.candidate_files(candidates_dir)
    before = None
    if retry_failed:
        before = download_repair.check_can_retry(output_dir)
    takedown = blocklist.url_digest() if blocklist is not None else ""
    download_plan.check_plan_config(output_dir, cfg, takedown)
    done_before = len(download_plan.finished_shards(output_dir)) if fileio.exists(output_dir) else 0
    if done_before and log:
        log(f"download: resuming ({done_before} shard(s) already finished)")
    if retry_failed and log:
        log(f"download: fetching transient failures again ({download_repair.describe(before)})")

    def graph(p):
        pipeline.download(
            p,
            files=files,
            output_dir=output_dir,
            config=cfg,
            blocklist=blocklist,
            retry_failed=retry_failed,
        )

    try:
        run(graph, beam_args=beam_args, runner=runner, processes=cfg.processes)
    except Exception as e:
        m = re.search(r"(\S+ holds a download run with a different input[^\n'\"]*)", str(e))
        if m:
            raise WitError(m.group(1)) from None
        raise
    doc = fileio.read_json(fileio.join(output_dir, download_lib.STATS_FILE))
    out = {**doc, "resumed_shards": done_before}
    if retry_failed:
        out["retried"] = download_repair.summary(before, doc)
        if log:
            log(f"download: after the retry: {download_repair.describe(doc['url_counters'])}")
    return out


def run_finalize(
    inputs: Sequence[str],
    output_dir: str,
    cfg: BuildConfig,
    *,
    work_dir: str = "",
    score: bool = False,
    queries_path: str = "",
    query_columns: Mapping[str, Mapping[int, int]] | None = None,
    stats_extra: Mapping[str, Any] | None = None,
    beam_args: Sequence[str] = (),
    runner: str | None = None,
    blocklist: Blocklist | None = None,
    model_handler: Any = None,
) -> dict[str, Any]:
    """Download output dirs -> final shards, in one pipeline (``pipeline.finalize``).

    The step's own files (``stats.json``; with ``score``, ``score.json`` and ``scores/``) go to
    ``work_dir`` (default ``output_dir``); with ``score`` the manifest records the threshold
    and the seed model. ``blocklist``'s hash entries drop the images they match before dedup.
    ``stats_extra`` (default: the inputs and the config) is added to the stats document, which is
    returned. ``model_handler`` replaces the seed's (tests).
    """
    tars = samples.download_tars(inputs)
    if stats_extra is None:
        stats_extra = {"inputs": list(inputs), "config": config_lib.to_dict(cfg)}
    work_dir = work_dir or output_dir
    fileio.makedirs(work_dir)
    clear_parts(fileio.join(output_dir, stage.REJECTED_DIR))

    def graph(p):
        pipeline.finalize(
            p,
            tars=tars,
            output_dir=output_dir,
            config=cfg,
            work_dir=work_dir,
            score=score,
            queries_path=queries_path,
            query_columns=query_columns,
            stats_extra=stats_extra,
            blocklist=blocklist,
            model_handler=model_handler,
        )

    run(graph, beam_args=beam_args, runner=runner)
    if score:
        manifest_path = fileio.join(output_dir, shards_lib.SHARDS_DIR, "manifest.json")
        manifest = fileio.read_json(manifest_path)
        sc = fileio.read_json(fileio.join(work_dir, score_lib.SCORE_FILE))
        manifest["clip_score_threshold"] = sc["threshold"]
        manifest["clip_score_mode"] = sc["mode"]
        manifest["seed_model"] = {"model": sc["model"], "pretrained": sc["pretrained"]}
        fileio.write_json(manifest_path, manifest)
    return _stats(work_dir)


def run_dedup(
    inputs: Sequence[str],
    output_dir: str,
    cfg: BuildConfig,
    *,
    beam_args: Sequence[str] = (),
    runner: str | None = None,
    blocklist: Blocklist | None = None,
) -> dict[str, Any]:
    """Download output dirs -> ``DIR/samples/*.parquet`` (deduplicated, decontaminated; the
    images ``blocklist``'s hash entries match dropped first)."""
    tars = samples.download_tars(inputs)
    fileio.makedirs(output_dir)
    for sub in (samples.SAMPLES_DIR, stage.REJECTED_DIR):
        clear_parts(fileio.join(output_dir, sub))

    def graph(p):
        pipeline.dedup_samples(
            p,
            tars=tars,
            output_dir=output_dir,
            config=cfg,
            stats_extra={"inputs": list(inputs), "config": config_lib.to_dict(cfg)},
            blocklist=blocklist,
        )

    run(graph, beam_args=beam_args, runner=runner)
    return _stats(output_dir)


def run_balance(
    dedup_dir: str,
    output_dir: str,
    cfg: BuildConfig,
    *,
    queries_path: str = "",
    beam_args: Sequence[str] = (),
    runner: str | None = None,
) -> dict[str, Any]:
    """``wit dedup`` output -> balanced final shards in ``DIR/shards`` with a manifest."""
    parts = fileio.expand_inputs([fileio.join(dedup_dir, samples.SAMPLES_DIR, "*.parquet")])
    dedup_stats = fileio.join(dedup_dir, stage.STATS_FILE)
    collapse = cfg.dedup.collapse
    if fileio.exists(dedup_stats):
        collapse = fileio.read_json(dedup_stats).get("unit", "image") == "image"
    base = fileio.join(dedup_dir, balance.QUERY_COUNTS)
    fileio.makedirs(output_dir)
    clear_parts(fileio.join(output_dir, stage.REJECTED_DIR))

    def graph(p):
        pipeline.balance_samples(
            p,
            sample_files=parts,
            output_dir=output_dir,
            config=cfg,
            collapse=collapse,
            base_counts=base if fileio.exists(base) else "",
            queries_path=queries_path,
            stats_extra={"inputs": [dedup_dir], "config": config_lib.to_dict(cfg)},
        )

    run(graph, beam_args=beam_args, runner=runner)
    return _stats(output_dir)
