"""The download stage in Beam: ``ReadCandidates`` + ``DownloadImages``.

Candidate pairs (Arrow tables with the ``wit gather`` columns) -> downloaded, validated,
resized images in webdataset shards. Around img2dataset (``fetch``) this adds what a web-scale
crawl needs:

- URLs are normalized and each distinct URL is downloaded once; every pair that shares it
  follows its fate (one webdataset sample per URL, one Parquet row per pair; ``plan``).
- Politeness: URLs are grouped by origin; robots.txt and TDMRep's tdmrep.json are fetched
  once per origin (``robots.py``, ``tdmrep.py``, ``policy.py``) and disallowed or reserved URLs
  are never requested; every redirect target passes the same checks (and the takedown
  blocklist) before it is requested (``policy.RedirectCheck``); ``X-Robots-Tag`` and
  ``tdm-reservation`` opt-outs are refused; per-host concurrency and rate limits apply within
  each worker.
- Safety: every connection (robots.txt, images, each redirect hop) goes through the SSRF guard
  of ``netguard.py``.
- Resumability: each distinct URL belongs to shard ``hash(key) mod num_shards``, with
  ``num_shards`` derived from the number of distinct URLs and fixed in ``plan.json``; a shard
  writes ``rejected/NNNNN.parquet`` then ``shards/NNNNN.tar`` then ``shards/NNNNN.parquet``
  (atomically, the last one marking completion). A rerun skips finished shards (their URLs are
  neither fetched nor robots-checked again) and reads their counts back from disk, so the final
  files and ``stats.json`` are the same as those of an uninterrupted run.
- Repair runs (``retry_failed``): the URLs of finished shards that failed transiently are
  fetched again and their shards rewritten in place (``repair``); every finished shard's counts
  are then read back from its files.

Every pair ends either in a shard or in ``rejected/`` with a reason (rows of
``stage.REJECTED_SCHEMA``, stage ``download``); ``stats.json`` holds ``counters`` over pairs
and ``url_counters`` over distinct URLs (the ``url/`` scope of the counts), each with
``input == kept + sum(dropped:*)``. A shard's rows are written by the DoFn that downloads it,
not emitted: its files are its completion mark, read back on a rerun.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import apache_beam as beam
import pyarrow as pa

from wit_pipeline import counters as counters_lib
from wit_pipeline import fileio, optout, shards, stage, urls
from wit_pipeline.beam_utils import COUNTS, emit_counts
from wit_pipeline.config import DownloadConfig
from wit_pipeline.errors import WitError
from wit_pipeline.stages.download import guarded_http, netguard, policy, repair
from wit_pipeline.stages.download.fetch import (
    ProbingResizer,
    fetch_options,
    fetch_with_img2dataset,
    make_guard,
    make_img2dataset_resizer,
)
from wit_pipeline.stages.download.plan import (
    PAIR_FIELDS,
    RECORD_TAG,
    STAGE,
    VERDICT_TAG,
    apply_verdict,
    assemble_shard,
    check_plan,
    finished_shards,
    key_pair,
    make_url_record,
    plan_doc,
    read_back_counters,
    rejected_path,
    shard_of,
    shards_dir,
    write_shard_files,
)
from wit_pipeline.takedown import Blocklist

STATS_FILE = "stats.json"
# stats.json: pair counts under "counters", distinct-URL counts under "url_counters", pairs
# dropped per opt-out signal under "opt_out_counters".
STATS_SECTIONS = {
    "": "counters",
    counters_lib.URL: "url_counters",
    optout.SCOPE: "opt_out_counters",
}
STATS_FLOWS = ("", counters_lib.URL)


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


def _plan_num_shards(
    num_urls: int, output_dir: str, config: DownloadConfig, takedown: str = ""
) -> int:
    return check_plan(output_dir, plan_doc(config, num_urls, takedown))


FINISHED_TAG = "finished"


def _assign_shard(
    rec: dict[str, Any], num_shards: int, finished: frozenset[int], *, retry: bool = False
) -> Iterator[Any]:
    """The record with its shard; a record of a finished shard is left out (counted from the
    shard's files), or with ``retry`` tagged ``finished`` and keyed by URL for the repair join."""
    shard = shard_of(rec["key"], num_shards)
    if shard not in finished:
        yield {**rec, "shard": shard}  # inputs may be shared with other consumers: no mutation
    elif retry:
        yield beam.pvalue.TaggedOutput(FINISHED_TAG, (rec["key"], {**rec, "shard": shard}))


def _to_repair(item: tuple[str, dict[str, list[Any]]]) -> Iterator[dict[str, Any]]:
    """A finished shard's record whose URL failed transiently: fetched again, for repair."""
    _, grouped = item
    if any(True for _ in grouped["retry"]):
        for rec in grouped["records"]:
            yield {**rec, "repair": True}


class _RobotsFn(beam.DoFn):
    """Batches of origins -> ``(origin, policy.OriginPolicy)``: robots.txt and tdmrep.json
    (as the config respects them) fetched concurrently."""

    def __init__(self, *, config: DownloadConfig, resolver: netguard.Resolver | None):
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
            s = self._local.session = guarded_http.requests_session(self._guard, self._options)
        return s

    def _fetch(self, origin_url: str) -> tuple[str, policy.OriginPolicy]:
        return origin_url, policy.fetch_origin_policy(self._session(), origin_url, self._config)

    def process(self, origins: list[str]):
        yield from self._pool.map(self._fetch, sorted(origins))

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


class _DownloadShardFn(beam.DoFn):
    """``(shard_id, URL records)`` -> shard files; emits the shard id once they are written.

    The shard's kept and rejected rows are written here, not emitted: a shard's files are its
    completion mark, and the step's counts are read back from them (``plan.read_back_counters``)
    once every writer is done, whether a shard was written now or by an earlier run.
    """

    def __init__(
        self,
        *,
        output_dir: str,
        config: DownloadConfig,
        resolver: netguard.Resolver | None,
        blocklist: Blocklist | None = None,
    ):
        self._output_dir = output_dir
        self._config = config
        self._resolver = resolver
        self._blocklist = blocklist
        # Shared by every instance unpickled from this one: they share one opener per process.
        self._owner = uuid.uuid4().hex

    def setup(self):
        self._resizer = ProbingResizer(make_img2dataset_resizer(self._config), self._config)
        self._workdir = tempfile.mkdtemp(prefix="wit-download-")
        guard, options = make_guard(self._config, self._resolver), fetch_options(self._config)

        def redirect_check():
            # Made once per process (by the first instance): its per-origin cache is shared.
            if not policy.RedirectCheck.needed(self._config, self._blocklist):
                return None
            return policy.RedirectCheck(self._config, guard, options, self._blocklist)

        self._opener = guarded_http.PROCESS_OPENER.acquire(
            self._owner, guard, options, hop_check=redirect_check
        )

    def _ensure_guard(self):
        # Fail closed: if anything replaced the process-wide opener, put the guard back.
        guarded_http.PROCESS_OPENER.ensure(self._opener)

    def process(self, element: tuple[int, Iterable[dict[str, Any]]]):
        shard_id, records = element
        records = list(records)
        if records and records[0].get("repair"):
            # A finished shard's transient failures, fetched again: the shard is rewritten,
            # its counts are read back from its files once every repair is done.
            outcomes = self._fetch(shard_id, records)
            repair.repair_shard(self._output_dir, shard_id, records, outcomes)
            return [beam.pvalue.TaggedOutput(REPAIRED_TAG, shard_id)]
        if shards.is_finished(shards_dir(self._output_dir), shard_id) and fileio.exists(
            rejected_path(self._output_dir, shard_id)
        ):
            return [shard_id]  # a retried bundle whose first attempt wrote the shard
        outcomes = self._fetch(shard_id, records)
        samples, kept, rejected = assemble_shard(records, outcomes)
        write_shard_files(self._output_dir, shard_id, samples, kept, rejected)
        return [shard_id]

    def _fetch(self, shard_id: int, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Fetch the records without a verdict (robots, invalid URL) through the guard."""
        to_fetch = [r for r in records if r["verdict"] is None]
        self._ensure_guard()
        for rec in to_fetch:
            if rec.get("crawl_delay"):
                self._opener.limiter.set_interval(urls.url_host(rec["url"]), rec["crawl_delay"])
        return fetch_with_img2dataset(
            sorted(to_fetch, key=lambda r: r["key"]),
            shard_id=shard_id,
            config=self._config,
            resizer=self._resizer,
            workdir=self._workdir,
        )

    def teardown(self):
        # The last instance of the process gives it its previous urllib opener back (the
        # in-process runner shares the process with the caller); the others leave it guarded.
        opener = getattr(self, "_opener", None)
        if opener is not None:
            self._opener = None
            guarded_http.PROCESS_OPENER.release(opener)
        workdir = getattr(self, "_workdir", None)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


REPAIRED_TAG = "repaired"


def _finished_after(output_dir: str, *_ended) -> list[int]:
    """The finished shards once the writers are done (``_ended``: side inputs that only order
    this after them)."""
    return finished_shards(output_dir)


def _read_back(shard_id: int, output_dir: str):
    yield from emit_counts(read_back_counters(output_dir, shard_id))


def _finish_repairs(_repaired: Sequence[int], output_dir: str) -> dict[str, Any]:
    """After every repair of a repair run: drop the empty staging area (nothing for stats)."""
    repair.finish_repairs(output_dir)
    return {}


class DownloadImages(beam.PTransform):
    """Candidate pairs (Arrow tables) -> webdataset shards, rejected pairs and stats in a dir.

    Input: a PCollection of ``pyarrow.Table`` batches with the ``wit gather`` candidate columns
    (``url`` required; ``caption``, ``uid``, ``query_ids``, ... optional). Writes
    ``output_dir/shards/``, ``output_dir/rejected/``, ``output_dir/plan.json`` and
    ``output_dir/stats.json``; returns the PCollection holding the ``stats.json`` document
    (``counters`` over pairs, ``url_counters`` over distinct URLs).

    ``config`` is the ``download`` section (it checked itself when it was made); ``resolver``
    replaces DNS resolution for the guard (tests; pinned deployments); it must be picklable.
    ``blocklist``: takedown entries whose ``url`` and ``domain`` entries refuse the URLs (and
    redirect targets) they match, as ``takedown``. ``retry_failed`` makes it a repair run:
    besides resuming, the URLs of finished shards that failed transiently are fetched again
    (``repair``) and ``stats.json`` is summed from every finished shard's files afterwards.
    """

    def __init__(
        self,
        *,
        output_dir: str,
        config: DownloadConfig | None = None,
        resolver: netguard.Resolver | None = None,
        blocklist: Blocklist | None = None,
        retry_failed: bool = False,
    ):
        super().__init__()
        if not output_dir:
            raise WitError("DownloadImages needs an output_dir")
        self._output_dir = output_dir
        self._config = config or DownloadConfig()
        self._resolver = resolver
        self._blocklist = blocklist if blocklist is not None and blocklist.has_url_entries else None
        self._retry = retry_failed

    def expand(self, tables):
        cfg = self._config
        out = self._output_dir
        records = (
            tables
            | "KeyPairs" >> beam.ParDo(_KeyPairsFn())
            | "GroupByUrl" >> beam.GroupByKey()
            | "UrlRecords" >> beam.MapTuple(make_url_record, self._blocklist)
        )
        num_shards = (
            records
            | "CountUrls" >> beam.combiners.Count.Globally()
            | "Plan"
            >> beam.Map(
                _plan_num_shards, out, cfg, self._blocklist.url_digest() if self._blocklist else ""
            )
        )
        start = tables.pipeline | "OutputDir" >> beam.Create([out])
        # Before any shard writer starts: finish interrupted repairs, remove temporaries.
        finished_ids = start | "ListFinished" >> beam.FlatMap(repair.list_finished)
        finished = (
            finished_ids
            | "FinishedList" >> beam.combiners.ToList()
            | "FinishedSet" >> beam.Map(frozenset)
        )
        assigned = records | "AssignShard" >> beam.FlatMap(
            _assign_shard,
            beam.pvalue.AsSingleton(num_shards),
            beam.pvalue.AsSingleton(finished),
            retry=self._retry,
        ).with_outputs(FINISHED_TAG, main="todo")
        todo = assigned.todo
        if self._retry:
            retry = (
                finished_ids
                | "SpreadFinished" >> beam.Reshuffle()
                | "RetryableKeys" >> beam.FlatMap(repair.retryable_keys, out)
            )
            again = (
                {"records": assigned[FINISHED_TAG], "retry": retry}
                | "JoinRetryable" >> beam.CoGroupByKey()
                | "ToRepair" >> beam.FlatMap(_to_repair)
            )
            todo = (todo, again) | "WithRepairs" >> beam.Flatten()
        assigned = todo
        if cfg.respect_robots or cfg.respect_tdmrep:
            valid, invalid = assigned | "SplitInvalid" >> beam.Partition(
                lambda r, _: 1 if r["verdict"] is not None else 0, 2
            )
            by_origin = valid | "KeyByOrigin" >> beam.Map(lambda r: (r["origin"], (RECORD_TAG, r)))
            verdicts = (
                valid
                | "Origins" >> beam.Map(lambda r: r["origin"])
                | "DistinctOrigins" >> beam.Distinct()
                | "BatchOrigins" >> beam.BatchElements(min_batch_size=1, max_batch_size=64)
                | "FetchRobots" >> beam.ParDo(_RobotsFn(config=cfg, resolver=self._resolver))
                | "TagVerdicts" >> beam.MapTuple(lambda o, v: (o, (VERDICT_TAG, v)))
            )
            checked = (
                (verdicts, by_origin)
                | "VerdictsAndRecords" >> beam.Flatten()
                | "GroupByOrigin" >> beam.GroupByKey()
                | "ApplyRobots" >> beam.FlatMap(apply_verdict, cfg)
            )
            assigned = (checked, invalid) | "Rejoin" >> beam.Flatten()
        downloaded = (
            assigned
            | "KeyByShard" >> beam.Map(lambda r: (r["shard"], r))
            | "GroupByShard" >> beam.GroupByKey()
            | "DownloadShards"
            >> beam.ParDo(
                _DownloadShardFn(
                    output_dir=out, config=cfg, resolver=self._resolver, blocklist=self._blocklist
                )
            ).with_outputs(REPAIRED_TAG, main="written")
        )
        # The step's counts: every finished shard's, read back from its files once every shard
        # writer (and every repair) is done. A shard's counts come from its two tables whether
        # it was written now or by an earlier run, so this is also what a resumed run adds up;
        # and a listing taken after the writers cannot change when a runner recomputes it (Dask
        # recomputes the tasks of a lost worker: a listing taken at the start and recomputed
        # after a shard was written would count that shard twice).
        ended = [
            beam.pvalue.AsSingleton(
                downloaded.written | "WritersDone" >> beam.combiners.Count.Globally()
            )
        ]
        side = []
        if self._retry:  # after every repair: drop the empty staging area
            ended.append(beam.pvalue.AsList(downloaded[REPAIRED_TAG]))
            side = [
                downloaded[REPAIRED_TAG]
                | "Repaired" >> beam.combiners.ToList()
                | "FinishRepairs" >> beam.Map(_finish_repairs, out)
            ]
        return (
            start
            | "ListWritten" >> beam.FlatMap(_finished_after, *ended)
            | "SpreadWritten" >> beam.Reshuffle()
            | "ReadBackCounts" >> beam.FlatMap(_read_back, out).with_outputs(COUNTS)
        )[COUNTS] | "WriteStats" >> stage.WriteStats(
            fileio.join(out, STATS_FILE),
            sections=STATS_SECTIONS,
            flows=STATS_FLOWS,
            side=side,
            stage=STAGE,
        )


class ReadCandidates(beam.PTransform):
    """Candidate Parquet files -> Arrow tables (one per row group)."""

    def __init__(self, *, files: Sequence[str]):
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
