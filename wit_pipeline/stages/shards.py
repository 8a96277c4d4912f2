"""The shards stage: final samples -> training-ready webdataset shards, in key order.

1. :class:`AssignShards`: samples in ascending ``key`` order (keys are hashes of the URL, so
   shards are well mixed), ``shards.samples_per_shard`` per shard; the global rank comes from
   per-prefix counts (side input) plus a sort inside each prefix group.
2. :class:`WriteFinalShards`: each download tar is read a second time for the images of its
   surviving samples, images are grouped by final shard and written with
   ``wit_pipeline.shards.write_shard`` (deterministic tar + Parquet, atomic), then
   ``manifest.json`` and ``sizes.json``. Every sample written is counted as ``kept`` (samples
   and pairs): this is where samples leave the pipeline.

A final sample's metadata is one row of :data:`FINAL_SCHEMA` (:data:`SCORED_SCHEMA` when the
build scored it): its ``KEY.json`` and its row in ``NNNNN.parquet``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa

from wit_pipeline import counters, fileio, samples, shards, stage
from wit_pipeline.config import ShardConfig

STAGE = "shards"
SHARDS_DIR = "shards"
SIZES = "sizes.json"


def _final_schema() -> pa.Schema:
    """A sample's fields (``samples.SAMPLE_SCHEMA``) without where its bytes are, with its
    ``caption`` (after ``url``) and ``balance_probability`` (after ``duplicate_group``)."""
    schema = samples.SAMPLE_SCHEMA
    for name in ("source_tar", "image_ext"):
        schema = schema.remove(schema.get_field_index(name))
    schema = schema.insert(schema.get_field_index("url") + 1, pa.field("caption", pa.string()))
    at = schema.get_field_index("duplicate_group") + 1
    return schema.insert(at, pa.field("balance_probability", pa.float64()))


# One row per final sample (``shards/NNNNN.parquet``); ``KEY.json`` holds the same fields.
FINAL_SCHEMA = _final_schema()
# Final rows of a build with CLIP scoring (``wit build --seed-model``): every pair's
# ``clip_score`` in ``pairs``, and the sample's (its best pair's) appended.
SCORED_PAIR_TYPE = pa.struct([*samples.PAIR_TYPE, pa.field("clip_score", pa.float32())])
SCORED_SCHEMA = FINAL_SCHEMA.set(
    FINAL_SCHEMA.get_field_index("pairs"), pa.field("pairs", pa.list_(SCORED_PAIR_TYPE))
).append(pa.field("clip_score", pa.float32()))


def final_row(record: Mapping[str, Any], schema: pa.Schema = FINAL_SCHEMA) -> dict[str, Any]:
    """A final sample's metadata: its ``KEY.json`` and its row in the shard's Parquet file."""
    return samples.row(record, schema)


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

    def __init__(self, *, config: ShardConfig, prefix_length: int = 3):
        super().__init__()
        self._n = config.samples_per_shard
        self._prefix = prefix_length

    def expand(self, records):
        n_chars = self._prefix
        keyed = records | "ByPrefix" >> beam.Map(lambda r: (r["key"][:n_chars], r))
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
        shard_ids, records = zip(*assigned, strict=True)
        found = samples.attach_images(tar_path, records)
        yield from zip(shard_ids, found, strict=True)


def write_final_shard(
    directory: str,
    shard_id: int,
    members: Sequence[tuple[Mapping[str, Any], bytes]],
    schema: pa.Schema = FINAL_SCHEMA,
) -> stage.Result:
    """Write one final shard (samples in key order); its samples leave the pipeline as kept."""
    members = sorted(members, key=lambda m: m[0]["key"])
    written, rows = [], []
    for r, image in members:
        row = final_row(r, schema)
        rows.append(row)
        written.append(
            shards.Sample(
                key=r["key"],
                image=image,
                caption=r["caption"],
                meta=row,
                image_ext=r.get("image_ext") or "jpg",
            )
        )
    table = pa.Table.from_pylist(rows, schema=schema)
    info = shards.write_shard(directory, shard_id, written, table)
    records = [r for r, _ in members]
    left = stage.count_records(records, counters.KEPT, pairs=True)
    return stage.Result(records, counts=left, outputs={"infos": [info]})


class _WriteShardFn(stage.StageFn):
    def __init__(self, directory: str, schema: pa.Schema):
        super().__init__(stage=STAGE, flow=False, kept_as="none", outputs=("infos",))
        self._dir = directory
        self._schema = schema

    def core(self, item, *args):
        shard_id, members = item
        return write_final_shard(self._dir, shard_id, list(members), self._schema)


def _finish_shards(infos: Sequence[shards.ShardInfo], directory: str, cfg: Mapping[str, Any]):
    """Write ``manifest.json`` and ``sizes.json``; remove shards left by an earlier, larger run.

    ``sizes.json`` (``{"NNNNN.tar": n}``) is what open_clip's ``get_dataset_size`` reads, so
    ``--train-data 'shards/{00000..000NN}.tar'`` works without ``--train-num-samples``.
    """
    infos = sorted(infos, key=lambda i: i.shard_id)
    ids = {i.shard_id for i in infos}

    def stale(name: str) -> bool:
        stem, _, ext = name.partition(".")
        return ext in ("tar", "parquet") and stem.isdigit() and int(stem) not in ids

    fileio.remove_entries(directory, stale)  # local or remote
    fileio.makedirs(directory)
    sizes = {os.path.basename(i.tar): i.num_samples for i in infos}
    fileio.write_json(fileio.join(directory, SIZES), sizes)
    return shards.write_manifest(directory, infos, config=cfg)


class WriteFinalShards(beam.PTransform):
    """``(shard id, sample)`` -> ``DIR/NNNNN.tar`` + ``NNNNN.parquet`` + ``manifest.json``.

    Image bytes are read from each sample's ``source_tar`` (each download tar once). Returns a
    dict: ``manifest`` (one element, the manifest document) and ``counts`` (``kept``, over
    samples and pairs). ``scored`` adds the ``clip_score`` column (``SCORED_SCHEMA``).
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
        members = (
            assigned
            | "BySourceTar" >> beam.Map(lambda kv: (kv[1]["source_tar"], kv))
            | "GroupSourceTar" >> beam.GroupByKey()
            | "ReadImages" >> beam.ParDo(_AttachBytesFn())
            | "GroupShard" >> beam.GroupByKey()
        )
        written = stage.apply(members, "WriteShard", _WriteShardFn(self._dir, self._schema))
        manifest = (
            written["infos"]
            | "Infos" >> beam.combiners.ToList()
            | "Manifest" >> beam.Map(_finish_shards, self._dir, self._config)
        )
        return {"manifest": manifest, "counts": written["counts"]}
