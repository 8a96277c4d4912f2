"""From download shards to training-ready shards: dedup, decontaminate, balance, write.

``Finalize`` is the whole chain as one ``PTransform`` over download shard tar paths (for
``wit build``); ``run_finalize`` runs it as a pipeline. The same transforms also run as two
commands with a small intermediate in between (``run_dedup`` -> ``DIR/samples/*.parquet``, one
row per surviving sample pointing at its image in the download shards; ``run_balance`` -> final
shards), and ``run_prebalance`` balances ``wit gather`` candidates before download.

Data flow (one pipeline; only metadata is shuffled until the last step):

1. ``ReadDownloadShards``: each download tar is read once and every image is pHashed in batches;
   records carry metadata and the tar path, not the image bytes.
2. ``dedup.DedupRecords``: eval-set decontamination (side-input index), near-duplicate groups
   (banded ``GroupByKey`` + union-find), collapse into survivors.
3. ``balance.BalanceSamples``: counts per query over the deduplicated pool (``CombinePerKey``)
   and MetaCLIP's seeded draw.
4. ``AssignShards``: samples in ascending ``key`` order (keys are hashes of the URL, so shards are
   well mixed), ``samples_per_shard`` per shard; the global rank comes from per-prefix counts
   (side input) plus a sort inside each prefix group.
5. ``WriteFinalShards``: each download tar is read a second time for the images of its surviving
   samples, images are grouped by final shard and written with ``shards.write_shard``
   (deterministic tar + Parquet, atomic), then ``manifest.json``.

Counters: ``counters`` count images (samples), ``pair_counters`` count image-text pairs; both
satisfy ``input == kept + sum(dropped:*)``. Pairs of a near duplicate that is merged into its
survivor stay in the dataset (they are kept pairs). With ``dedup.collapse = false`` every pair
becomes its own sample (key = pair uid), so ``counters`` count pairs.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa

from wit_pipeline import beam_utils, config, fileio, shards
from wit_pipeline import counters as counters_lib
from wit_pipeline.errors import WitError
from wit_pipeline.stages import balance
from wit_pipeline.stages.dedup import core as dedup

_PAIR_TYPE = pa.struct(
    [
        ("uid", pa.string()),
        ("caption", pa.string()),
        ("query_ids", pa.list_(pa.int32())),
        ("language", pa.string()),
        ("page_url", pa.string()),
        ("source", pa.string()),
    ]
)
_DUPLICATE_TYPE = pa.struct(
    [("key", pa.string()), ("url", pa.string()), ("phash", pa.string()), ("distance", pa.int32())]
)

# One row per final sample (``shards/NNNNN.parquet``); ``KEY.json`` holds the same fields.
FINAL_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("uids", pa.list_(pa.string())),
        ("query_ids", pa.list_(pa.int32())),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
        ("image_key", pa.string()),
        ("duplicate_of", pa.string()),
        ("duplicate_group", pa.string()),
        ("balance_probability", pa.float64()),
        ("pairs", pa.list_(_PAIR_TYPE)),
        ("duplicates", pa.list_(_DUPLICATE_TYPE)),
    ]
)
# Final rows of a build with CLIP scoring (``wit build --seed-model``): ``clip_score`` appended.
SCORED_SCHEMA = FINAL_SCHEMA.append(pa.field("clip_score", pa.float32()))
# The intermediate between ``wit dedup`` and ``wit balance``: where each image's bytes are.
SAMPLE_SCHEMA = pa.schema(
    [f for f in FINAL_SCHEMA if f.name not in ("caption", "balance_probability")]
    + [pa.field("source_tar", pa.string()), pa.field("image_ext", pa.string())]
)

SAMPLES_DIR = "samples"
SHARDS_DIR = "shards"
REJECTED_DIR = "rejected"
STATS = "stats.json"
QUERY_COUNTS = "query_counts.parquet"
CONTAMINATION = "contamination.json"
SIZES = "sizes.json"


def _row(record: Mapping[str, Any], schema: pa.Schema) -> dict[str, Any]:
    r = {f.name: record.get(f.name) for f in schema}
    r["image_key"] = record.get("image_key") or record["key"]
    r["captions"] = [p["caption"] for p in record["pairs"]]
    r["uids"] = [p["uid"] for p in record["pairs"]]
    r["duplicates"] = list(record.get("duplicates") or [])
    r["pairs"] = [{f.name: p.get(f.name) for f in _PAIR_TYPE} for p in record["pairs"]]
    return r


def final_row(record: Mapping[str, Any], schema: pa.Schema = FINAL_SCHEMA) -> dict[str, Any]:
    """A final sample's metadata: its ``KEY.json`` and its row in the shard's Parquet file."""
    return _row(record, schema)


def sample_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A deduplicated sample as stored in ``samples/*.parquet`` between the two commands."""
    return _row(record, SAMPLE_SCHEMA)


def expand_pairs(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One sample per pair (``collapse = false``): key = pair uid, the image is shared."""
    out = []
    for p in record["pairs"]:
        out.append(
            {
                **record,
                "key": p["uid"] or record["key"],
                "image_key": record["key"],
                "pairs": [p],
                "query_ids": list(p["query_ids"]),
            }
        )
    return out


def split_counters(counts: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """``(sample counters, pair counters)`` from the merged counts (pair ones are prefixed)."""
    samples, pairs = {}, {}
    for k, v in sorted(counts.items()):
        if k.startswith(dedup.PAIR_PREFIX):
            pairs[k[len(dedup.PAIR_PREFIX) :]] = v
        else:
            samples[k] = v
    return samples, pairs


def stats_document(
    counts: Mapping[str, int], *, collapse: bool, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    samples, pairs = split_counters(counts)
    for c in (samples, pairs):  # present even when zero, so readers need no defaults
        c.setdefault(counters_lib.INPUT, 0)
        c.setdefault(counters_lib.KEPT, 0)
    doc: dict[str, Any] = {"pair_counters": pairs}
    if collapse:
        doc["counters"] = samples
        doc["unit"] = "image"
    else:  # every pair is a sample: the image-level counts are not meaningful end to end
        doc["counters"] = pairs
        doc["unit"] = "pair"
    doc.update(extra or {})
    return doc


def _write_stats(counts, path: str, collapse: bool, extra: Mapping[str, Any]) -> str:
    fileio.write_json(path, stats_document(counts, collapse=collapse, extra=extra))
    return path


class WriteStageStats(beam.PTransform):
    """Counter pairs -> ``stats.json`` with ``counters`` and ``pair_counters``."""

    def __init__(self, path: str, *, collapse: bool, extra: Mapping[str, Any] | None = None):
        super().__init__()
        self._path = path
        self._collapse = collapse
        self._extra = dict(extra or {})

    def expand(self, counts):
        return (
            counts
            | "Sum" >> beam_utils.SumCounts()
            | "Write" >> beam.Map(_write_stats, self._path, self._collapse, self._extra)
        )


def _count_kept(record: Mapping[str, Any]):
    yield (counters_lib.KEPT, 1)
    yield (dedup.pair_counter(counters_lib.KEPT), len(record["pairs"]))


def _count_input(record: Mapping[str, Any]):
    yield (counters_lib.INPUT, 1)
    yield (dedup.pair_counter(counters_lib.INPUT), len(record["pairs"]))


def _to_rejected_row(r: Mapping[str, Any]) -> dict[str, Any]:
    if "uids" in r and "reason" in r and "pairs" not in r:
        return dict(r)
    detail = ""
    if r["reason"] == balance.NO_QUERY:
        detail = "matches no query"
    elif "balance_probability" in r:
        detail = f"keep probability {r['balance_probability']:.6g}"
    return dedup.rejected_row(r, r["reason"], detail=detail)


class WriteRejected(beam.PTransform):
    """Rejected samples (any stage) -> ``DIR/rejected/part-*.parquet`` with a ``reason``."""

    def __init__(self, directory: str):
        super().__init__()
        self._prefix = fileio.join(directory, "part")

    def expand(self, rows):
        return (
            rows
            | "Normalize" >> beam.Map(_to_rejected_row)
            | "Write"
            >> beam.io.WriteToParquet(
                self._prefix,
                schema=dedup.rejected_schema(),
                file_name_suffix=".parquet",
                codec="zstd",
            )
        )


class _RankFn(beam.DoFn):
    def __init__(self, samples_per_shard: int):
        self._n = samples_per_shard

    def process(self, item, offsets):
        prefix, records = item
        records = sorted(records, key=lambda r: r["key"])
        base = offsets[prefix]
        for i, r in enumerate(records):
            yield ((base + i) // self._n, r)


def _offsets(counts: Mapping[str, int]) -> dict[str, int]:
    out, total = {}, 0
    for prefix in sorted(counts):
        out[prefix] = total
        total += counts[prefix]
    return out


class AssignShards(beam.PTransform):
    """Samples -> ``(shard id, sample)``: ascending ``key`` order, ``samples_per_shard`` each.

    The rank of a sample is the number of samples in smaller key prefixes (a side input of
    per-prefix counts) plus its position within its prefix group, so the assignment is the same
    on every runner.
    """

    def __init__(self, *, samples_per_shard: int, prefix_length: int = 3):
        super().__init__()
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self._n = samples_per_shard
        self._prefix = prefix_length

    def expand(self, samples):
        n_chars = self._prefix
        keyed = samples | "ByPrefix" >> beam.Map(lambda r: (r["key"][:n_chars], r))
        offsets = (
            keyed
            | "One" >> beam.Map(lambda kv: (kv[0], 1))
            | "CountPrefix" >> beam.CombinePerKey(sum)
            | "ToDict" >> beam.combiners.ToDict()
            | "Offsets" >> beam.Map(_offsets)
        )
        return (
            keyed
            | "GroupPrefix" >> beam.GroupByKey()
            | "Rank" >> beam.ParDo(_RankFn(self._n), beam.pvalue.AsSingleton(offsets))
        )


class _AttachBytesFn(beam.DoFn):
    def process(self, item):
        tar_path, assigned = item
        assigned = list(assigned)
        wanted = {}
        for _, r in assigned:
            wanted[r.get("image_key") or r["key"]] = r.get("image_ext") or "jpg"
        found = dict(dedup.iter_tar_members(tar_path, wanted))
        for shard_id, r in assigned:
            image_key = r.get("image_key") or r["key"]
            if image_key not in found:
                raise WitError(f"image {image_key} not found in {tar_path} (input changed?)")
            yield shard_id, (r, found[image_key])


class _WriteShardFn(beam.DoFn):
    def __init__(self, directory: str, schema: pa.Schema = FINAL_SCHEMA):
        self._dir = directory
        self._schema = schema

    def process(self, item):
        shard_id, members = item
        members = sorted(members, key=lambda m: m[0]["key"])
        samples, rows = [], []
        for r, image in members:
            row = final_row(r, self._schema)
            rows.append(row)
            samples.append(
                shards.Sample(
                    key=r["key"],
                    image=image,
                    caption=r["caption"],
                    meta=row,
                    image_ext=r.get("image_ext") or "jpg",
                )
            )
        table = pa.Table.from_pylist(rows, schema=self._schema)
        info = shards.write_shard(self._dir, shard_id, samples, table)
        c = collections.Counter()
        for r, _ in members:
            for name, n in _count_kept(r):
                c[name] += n
        yield info
        yield from beam_utils.emit_counts(c)


def _finish_shards(infos: Sequence[shards.ShardInfo], directory: str, cfg: Mapping[str, Any]):
    """Write ``manifest.json`` and ``sizes.json``; remove shards left by an earlier, larger run.

    ``sizes.json`` (``{"NNNNN.tar": n}``) is what open_clip's ``get_dataset_size`` reads, so
    ``--train-data 'shards/{00000..000NN}.tar'`` works without ``--train-num-samples``.
    """
    infos = sorted(infos, key=lambda i: i.shard_id)
    ids = {i.shard_id for i in infos}
    if fileio.is_local(directory) and os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            stem, _, ext = name.partition(".")
            if ext in ("tar", "parquet") and stem.isdigit() and int(stem) not in ids:
                os.remove(os.path.join(directory, name))
    fileio.makedirs(directory)
    sizes = {os.path.basename(i.tar): i.num_samples for i in infos}
    fileio.write_json(fileio.join(directory, SIZES), sizes)
    return shards.write_manifest(directory, infos, config=cfg)


class WriteFinalShards(beam.PTransform):
    """``(shard id, sample)`` -> ``DIR/NNNNN.tar`` + ``NNNNN.parquet`` + ``manifest.json``.

    Image bytes are read from each sample's ``source_tar`` (each download tar once). Returns a
    dict: ``manifest`` (one element, the manifest document) and ``counts`` (``kept``).
    ``scored`` adds the ``clip_score`` column (``SCORED_SCHEMA``).
    """

    def __init__(
        self,
        directory: str,
        *,
        manifest_config: Mapping[str, Any] | None = None,
        scored: bool = False,
    ):
        super().__init__()
        self._dir = directory
        self._config = dict(manifest_config or {})
        self._schema = SCORED_SCHEMA if scored else FINAL_SCHEMA

    def expand(self, assigned):
        written = (
            assigned
            | "BySourceTar" >> beam.Map(lambda kv: (kv[1]["source_tar"], kv))
            | "GroupSourceTar" >> beam.GroupByKey()
            | "ReadImages" >> beam.ParDo(_AttachBytesFn())
            | "GroupShard" >> beam.GroupByKey()
            | "WriteShard"
            >> beam.ParDo(_WriteShardFn(self._dir, self._schema)).with_outputs(
                beam_utils.COUNTS, main="infos"
            )
        )
        manifest = (
            written.infos
            | "Infos" >> beam.combiners.ToList()
            | "Manifest" >> beam.Map(_finish_shards, self._dir, self._config)
        )
        return {"manifest": manifest, "counts": written[beam_utils.COUNTS]}


class CountQueriesPerPair(beam.PTransform):
    """Records -> ``(query_id, pairs matching it)`` (pair-level counts, as before download)."""

    def expand(self, records):
        return (
            records
            | "Pairs" >> beam.FlatMap(lambda r: r["pairs"])
            | "Count" >> balance.CountQueries()
        )


def _flatten(pcolls: Sequence[Any], root, label: str):
    if not pcolls:
        return root | f"Empty{label}" >> beam.Create([])
    return tuple(pcolls) | f"Flatten{label}" >> beam.Flatten()


def _write_contamination(_, path: str, report_args: Mapping[str, Any], hits, index) -> str:
    doc = dedup.contamination_report(index, hits, **report_args)
    fileio.write_json(path, doc)
    return path


class WriteContamination(beam.PTransform):
    """Eval hits + the eval index -> ``contamination.json`` (which sets were hit, how much)."""

    def __init__(self, path: str, *, index, eval_sets: Sequence[dedup.EvalSet], max_distance: int):
        super().__init__()
        self._path = path
        self._index = index
        self._args = {"eval_sets": list(eval_sets), "max_distance": max_distance}

    def expand(self, hits):
        all_hits = hits | "Hits" >> beam.combiners.ToList()
        return (
            hits.pipeline
            | "Once" >> beam.Create([None])
            | "Write"
            >> beam.Map(
                _write_contamination,
                self._path,
                self._args,
                beam.pvalue.AsSingleton(all_hits),
                beam.pvalue.AsSingleton(self._index),
            )
        )


def _dedup_part(records, root, cfg: config.BuildConfig, output_dir: str):
    """Decontaminate + near-duplicates (+ per-pair expansion); writes contamination.json."""
    dc = cfg.dedup
    eval_sets = [dedup.parse_eval_set(s) for s in dc.eval_sets]
    index = None
    if eval_sets:
        index = root | "EvalIndex" >> dedup.BuildEvalIndex(
            eval_sets=eval_sets, max_distance=dc.eval_max_distance
        )
    out = records | "Dedup" >> dedup.DedupRecords(
        max_distance=dc.max_distance,
        collapse=dc.collapse,
        eval_index=index,
        partitions=dc.partitions,
        batch_size=dc.batch_size,
        label_rounds=None if dc.label_rounds == -1 else dc.label_rounds,
    )
    if index is not None:
        _ = out["hits"] | "Contamination" >> WriteContamination(
            fileio.join(output_dir, CONTAMINATION),
            index=index,
            eval_sets=eval_sets,
            max_distance=dc.eval_max_distance,
        )
    samples = out["samples"]
    if not dc.collapse:
        samples = samples | "OnePerPair" >> beam.FlatMap(expand_pairs)
    return samples, out


class Finalize(beam.PTransform):
    """Download shard tar paths -> final shards in ``output_dir/shards`` (see module doc).

    Also writes ``rejected/``, ``query_counts.parquet`` and ``contamination.json`` (with eval
    sets). ``extra_counts`` may supply the ``before``/``after_prebalance`` query-count columns
    (``(query_id, n)`` PCollections from ``balance.PreBalance``). ``scorer`` is an optional
    ``PTransform`` applied to the balanced samples before they are assigned to shards (``wit
    build``'s CLIP-score step): it returns a dict with ``kept`` (samples with ``clip_score``),
    ``rejected`` and ``counts``, and the final shards gain a ``clip_score`` column. Returns a
    dict: ``counts`` (counter pairs for the caller's ``stats.json``) and ``manifest``.
    """

    def __init__(
        self,
        *,
        output_dir: str,
        cfg: config.BuildConfig,
        queries_path: str = "",
        extra_counts: Mapping[str, Any] | None = None,
        scorer: beam.PTransform | None = None,
    ):
        super().__init__()
        self._out = output_dir
        self._cfg = cfg
        self._queries = queries_path
        self._extra = dict(extra_counts or {})
        self._scorer = scorer

    def expand(self, tar_paths):
        cfg = self._cfg
        root = tar_paths.pipeline
        read = tar_paths | "Read" >> dedup.ReadDownloadShards()
        samples, dd = _dedup_part(read.records, root, cfg, self._out)
        bal = samples | "Balance" >> balance.BalanceSamples(
            t=cfg.balance.t, seed=cfg.balance.seed, unit=cfg.balance.unit
        )
        kept, final_counts = bal["kept"], bal["after"]
        rejected_parts = [read[beam_utils.REJECTED], dd["rejected"], bal["rejected"]]
        count_parts = [read[beam_utils.COUNTS], dd["counts"], bal["counts"]]
        if self._scorer is not None:
            scored = kept | "Score" >> self._scorer
            kept = scored["kept"]
            final_counts = kept | "CountScored" >> balance.CountUnits(unit=cfg.balance.unit)
            rejected_parts.append(scored["rejected"])
            count_parts.append(scored["counts"])
        assigned = kept | "AssignShards" >> AssignShards(
            samples_per_shard=cfg.shards.samples_per_shard
        )
        written = assigned | "WriteShards" >> WriteFinalShards(
            fileio.join(self._out, SHARDS_DIR),
            manifest_config=config.to_dict(cfg),
            scored=self._scorer is not None,
        )
        rejected = tuple(rejected_parts) | "AllRejected" >> beam.Flatten()
        _ = rejected | "WriteRejected" >> WriteRejected(fileio.join(self._out, REJECTED_DIR))
        columns = {
            **self._extra,
            # pairs of the images that decode (undecodable ones are not in read.records)
            "after_download": read.records | "CountDownload" >> CountQueriesPerPair(),
            "after_dedup": bal["before"],
            "final": final_counts,
        }
        _ = columns | "QueryCounts" >> balance.WriteQueryCounts(
            fileio.join(self._out, QUERY_COUNTS),
            queries_path=self._queries,
            t=cfg.balance.t,
            prebalance_factor=cfg.balance.prebalance_factor or None,
        )
        counts = (*count_parts, written["counts"]) | "AllCounts" >> beam.Flatten()
        return {"counts": counts, "manifest": written["manifest"]}


# ---------------------------------------------------------------------------------------------
# Runners (used by the commands and by ``wit build``)


def download_tars(inputs: Sequence[str]) -> list[str]:
    """Finished shard tars of download output directories (``DIR`` or ``DIR/shards``)."""
    tars: list[str] = []
    for d in inputs:
        sub = fileio.join(d, SHARDS_DIR)
        found = shards.list_shards(sub) if fileio.exists(sub) else shards.list_shards(d)
        if not found:
            raise WitError(f"no download shards (NNNNN.tar + NNNNN.parquet) in {d}")
        tars.extend(found)
    return list(dict.fromkeys(tars))


def _run(build, beam_args: Sequence[str], runner: str | None) -> None:
    options = beam_utils.pipeline_options(beam_args, runner=runner)
    with beam.Pipeline(options=options) as p:
        build(p)


def _check(path: str) -> dict[str, Any]:
    doc = fileio.read_json(path)
    counters_lib.check_balanced(doc["counters"], stage=os.path.basename(os.path.dirname(path)))
    counters_lib.check_balanced(doc["pair_counters"], stage="pairs")
    return doc


def run_finalize(
    inputs: Sequence[str],
    output_dir: str,
    cfg: config.BuildConfig,
    *,
    queries_path: str = "",
    beam_args: Sequence[str] = (),
    runner: str | None = None,
) -> dict[str, Any]:
    """Download output dirs -> final shards, in one pipeline. Returns the stats document."""
    tars = download_tars(inputs)
    fileio.makedirs(output_dir)
    stats_path = fileio.join(output_dir, STATS)

    def build(p):
        paths = p | "Tars" >> beam.Create(tars, reshuffle=False)
        out = paths | "Finalize" >> Finalize(
            output_dir=output_dir, cfg=cfg, queries_path=queries_path
        )
        _ = out["counts"] | "Stats" >> WriteStageStats(
            stats_path,
            collapse=cfg.dedup.collapse,
            extra={"inputs": list(inputs), "config": config.to_dict(cfg)},
        )

    _run(build, beam_args, runner)
    return _check(stats_path)


def run_dedup(
    inputs: Sequence[str],
    output_dir: str,
    cfg: config.BuildConfig,
    *,
    beam_args: Sequence[str] = (),
    runner: str | None = None,
) -> dict[str, Any]:
    """Download output dirs -> ``DIR/samples/*.parquet`` (deduplicated, decontaminated)."""
    tars = download_tars(inputs)
    fileio.makedirs(output_dir)
    stats_path = fileio.join(output_dir, STATS)
    _clear_parts(fileio.join(output_dir, SAMPLES_DIR))
    _clear_parts(fileio.join(output_dir, REJECTED_DIR))

    def build(p):
        paths = p | "Tars" >> beam.Create(tars, reshuffle=False)
        read = paths | "Read" >> dedup.ReadDownloadShards()
        samples, dd = _dedup_part(read.records, p, cfg, output_dir)
        _ = (
            samples
            | "ToRow" >> beam.Map(sample_row)
            | "WriteSamples"
            >> beam.io.WriteToParquet(
                fileio.join(output_dir, SAMPLES_DIR, "part"),
                schema=SAMPLE_SCHEMA,
                file_name_suffix=".parquet",
                codec="zstd",
            )
        )
        rejected = (read[beam_utils.REJECTED], dd["rejected"]) | "AllRejected" >> beam.Flatten()
        _ = rejected | "WriteRejected" >> WriteRejected(fileio.join(output_dir, REJECTED_DIR))
        kept = samples | "CountKept" >> beam.FlatMap(_count_kept)
        counts = (read[beam_utils.COUNTS], dd["counts"], kept) | "AllCounts" >> beam.Flatten()
        _ = counts | "Stats" >> WriteStageStats(
            stats_path,
            collapse=cfg.dedup.collapse,
            extra={"inputs": list(inputs), "config": config.to_dict(cfg)},
        )
        columns = {
            # pairs of the images that decode (undecodable ones are not in read.records)
            "after_download": read.records | "CountDownload" >> CountQueriesPerPair(),
            "after_dedup": samples | "CountDedup" >> balance.CountQueries(),
        }
        _ = columns | "QueryCounts" >> balance.WriteQueryCounts(
            fileio.join(output_dir, QUERY_COUNTS)
        )

    _run(build, beam_args, runner)
    return _check(stats_path)


def _clear_parts(directory: str) -> None:
    """Remove ``part-*`` files of an earlier run (Beam names them by shard count)."""
    if fileio.is_local(directory) and os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith("part-"):
                os.remove(os.path.join(directory, name))


def _read_samples(path: str):
    import pyarrow.parquet as pq

    with fileio.open_file(path, "rb") as f:
        table = pq.read_table(f)
    for r in table.to_pylist():
        r["pairs"] = [
            {**p, "query_ids": list(p["query_ids"] or [])} for p in (r.get("pairs") or [])
        ]
        r["query_ids"] = list(r.get("query_ids") or [])
        r["duplicates"] = list(r.get("duplicates") or [])
        yield r


def run_balance(
    dedup_dir: str,
    output_dir: str,
    cfg: config.BuildConfig,
    *,
    queries_path: str = "",
    beam_args: Sequence[str] = (),
    runner: str | None = None,
) -> dict[str, Any]:
    """``wit dedup`` output -> balanced final shards in ``DIR/shards`` with a manifest."""
    parts = fileio.expand_inputs([fileio.join(dedup_dir, SAMPLES_DIR, "*.parquet")])
    dedup_stats = fileio.join(dedup_dir, STATS)
    collapse = cfg.dedup.collapse
    if fileio.exists(dedup_stats):
        collapse = fileio.read_json(dedup_stats).get("unit", "image") == "image"
    fileio.makedirs(output_dir)
    stats_path = fileio.join(output_dir, STATS)
    _clear_parts(fileio.join(output_dir, REJECTED_DIR))

    def build(p):
        samples = (
            p
            | "Parts" >> beam.Create(parts, reshuffle=False)
            | "Spread" >> beam.Reshuffle()
            | "ReadSamples" >> beam.FlatMap(_read_samples)
        )
        bal = samples | "Balance" >> balance.BalanceSamples(
            t=cfg.balance.t, seed=cfg.balance.seed, unit=cfg.balance.unit
        )
        assigned = bal["kept"] | "AssignShards" >> AssignShards(
            samples_per_shard=cfg.shards.samples_per_shard
        )
        written = assigned | "WriteShards" >> WriteFinalShards(
            fileio.join(output_dir, SHARDS_DIR), manifest_config=config.to_dict(cfg)
        )
        _ = bal["rejected"] | "WriteRejected" >> WriteRejected(
            fileio.join(output_dir, REJECTED_DIR)
        )
        read_counts = samples | "CountInput" >> beam.FlatMap(_count_input)
        counts = (read_counts, bal["counts"], written["counts"]) | "AllCounts" >> beam.Flatten()
        _ = counts | "Stats" >> WriteStageStats(
            stats_path,
            collapse=collapse,
            extra={"inputs": [dedup_dir], "config": config.to_dict(cfg)},
        )
        base = fileio.join(dedup_dir, QUERY_COUNTS)
        columns = {"after_dedup": bal["before"], "final": bal["after"]}
        _ = columns | "QueryCounts" >> balance.WriteQueryCounts(
            fileio.join(output_dir, QUERY_COUNTS),
            base=base if fileio.exists(base) else "",
            queries_path=queries_path,
            t=cfg.balance.t,
            prebalance_factor=cfg.balance.prebalance_factor or None,
        )

    _run(build, beam_args, runner)
    return _check(stats_path)


CANDIDATES_DIR = "candidates"
_PREBALANCE_REJECTED_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("reason", pa.string()),
        ("source", pa.string()),
        ("uid", pa.string()),
        ("detail", pa.string()),
    ]
)


def _prebalance_rejected(r: Mapping[str, Any]) -> dict[str, Any]:
    detail = (
        "matches no query"
        if r["reason"] == balance.NO_QUERY
        else f"keep probability {r['balance_probability']:.6g}"
    )
    return {
        "url": r.get("url"),
        "caption": r.get("caption"),
        "reason": r["reason"],
        "source": r.get("source"),
        "uid": r.get("uid"),
        "detail": detail,
    }


def _write_prebalance_stats(counts, after, path: str, extra: Mapping[str, Any]) -> str:
    doc = {
        "counters": dict(sorted(counts.items())),
        "query_counts": {str(q): int(n) for q, n in sorted(after.items()) if n},
        **extra,
    }
    fileio.write_json(path, doc)
    return path


def add_prebalance(
    p: beam.Pipeline,
    *,
    gather_dir: str,
    output_dir: str,
    cfg: config.BuildConfig,
    schema: pa.Schema,
    queries_path: str = "",
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Add the pre-balance step to ``p``: ``gather_dir``'s candidates -> ``output_dir``.

    The graph of :func:`run_prebalance` (``wit build``'s second step); ``schema`` is the
    candidates' Arrow schema, written unchanged.
    """
    factor = cfg.balance.prebalance_factor
    stats_path = fileio.join(output_dir, STATS)
    extra = dict(extra or {})
    # validate=False: the launcher does not list the glob while building the graph (the caller
    # has checked that it matches; a remote runner lists it on its workers).
    cands = p | "Read" >> beam.io.ReadFromParquet(
        fileio.join(gather_dir, CANDIDATES_DIR, "*.parquet"), validate=False
    )
    out = cands | "PreBalance" >> balance.PreBalance(
        t=cfg.balance.t, factor=factor, seed=cfg.balance.seed
    )
    _ = out["kept"] | "WriteCandidates" >> beam.io.WriteToParquet(
        fileio.join(output_dir, CANDIDATES_DIR, "part"),
        schema=schema,
        file_name_suffix=".parquet",
        codec="zstd",
    )
    _ = (
        out["rejected"]
        | "ToRejected" >> beam.Map(_prebalance_rejected)
        | "WriteRejected"
        >> beam.io.WriteToParquet(
            fileio.join(output_dir, REJECTED_DIR, "part"),
            schema=_PREBALANCE_REJECTED_SCHEMA,
            file_name_suffix=".parquet",
            codec="zstd",
        )
    )
    n_in = cands | "CountIn" >> beam.Map(lambda _: (counters_lib.INPUT, 1))
    n_kept = out["kept"] | "CountKept" >> beam.Map(lambda _: (counters_lib.KEPT, 1))
    totals = (n_in, n_kept, out["counts"]) | "AllCounts" >> beam.Flatten()
    summed = totals | "Sum" >> beam_utils.SumCounts()
    after = out["after"] | "AfterDict" >> beam.combiners.ToDict()
    _ = summed | "Stats" >> beam.Map(
        _write_prebalance_stats, beam.pvalue.AsSingleton(after), stats_path, extra
    )
    columns = {"before": out["before"], "after_prebalance": out["after"]}
    _ = columns | "QueryCounts" >> balance.WriteQueryCounts(
        fileio.join(output_dir, QUERY_COUNTS),
        queries_path=queries_path,
        t=cfg.balance.t,
        prebalance_factor=factor,
    )


def run_prebalance(
    gather_dir: str,
    output_dir: str,
    cfg: config.BuildConfig,
    *,
    queries_path: str = "",
    beam_args: Sequence[str] = (),
    runner: str | None = None,
) -> dict[str, Any]:
    """``wit gather`` output -> pre-balanced candidates in the same format (for download)."""
    import pyarrow.parquet as pq

    factor = cfg.balance.prebalance_factor
    if factor <= 0:
        raise WitError("balance.prebalance_factor must be > 0 to pre-balance")
    parts = fileio.expand_inputs([fileio.join(gather_dir, CANDIDATES_DIR, "*.parquet")])
    with fileio.open_file(parts[0], "rb") as f:
        schema = pq.read_schema(f)
    for needed in ("uid", "query_ids"):
        if needed not in schema.names:
            raise WitError(f"{parts[0]}: not gather candidates (no {needed} column)")
    extra: dict[str, Any] = {"inputs": [gather_dir], "config": config.to_dict(cfg)}
    gather_stats = fileio.join(gather_dir, STATS)
    if fileio.exists(gather_stats):
        queries = fileio.read_json(gather_stats).get("queries")
        if queries:
            extra["queries"] = queries
    fileio.makedirs(output_dir)
    for sub in (CANDIDATES_DIR, REJECTED_DIR):
        _clear_parts(fileio.join(output_dir, sub))
    stats_path = fileio.join(output_dir, STATS)

    def build(p):
        add_prebalance(
            p,
            gather_dir=gather_dir,
            output_dir=output_dir,
            cfg=cfg,
            schema=schema,
            queries_path=queries_path,
            extra=extra,
        )

    _run(build, beam_args, runner)
    doc = fileio.read_json(stats_path)
    counters_lib.check_balanced(doc["counters"], stage="prebalance")
    return doc
