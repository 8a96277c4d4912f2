"""The sample record: one image with its pairs, read from download shards and stored between steps.

A *sample* is one downloaded image (``key`` = a hash of its URL) with every image-text *pair*
that points at it (``pairs``: ``uid``, ``caption``, ``query_ids``, ``language``, ``page_url``,
``source``), its sizes, ``sha256`` and ``phash``, and where its bytes are (``source_tar``,
``image_ext``): records carry metadata, never the image bytes, until the final shards are
written. Every stage after the download (dedup, balance, score, shards) works on these records:

- :func:`read_download_shard`, :class:`ReadDownloadShards`: download shard tars -> records,
  every image pHashed in batches (undecodable images are dropped here, as dedup's
  ``undecodable_image``);
- :func:`attach_images` (:func:`iter_tar_members`): the image bytes of some records, read back
  from their download tar;
- :data:`SAMPLE_SCHEMA`, :func:`sample_row`, :func:`table_records`: the records at rest between
  ``wit dedup`` and ``wit balance`` (``DIR/samples/*.parquet``);
- :func:`expand_pairs`: one sample per pair (``dedup.collapse = false``).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa

from wit_pipeline import counters, fileio, shards, stage
from wit_pipeline.errors import WitError
from wit_pipeline.stages.dedup import STAGE as DEDUP

UNDECODABLE = "undecodable_image"  # dedup's reason for an image that does not decode
SAMPLES_DIR = "samples"
DOWNLOAD_SHARDS_DIR = "shards"

PAIR_TYPE = pa.struct(
    [
        ("uid", pa.string()),
        ("caption", pa.string()),
        ("query_ids", pa.list_(pa.int32())),
        ("language", pa.string()),
        ("page_url", pa.string()),
        ("source", pa.string()),
    ]
)
# A copy merged into a sample (a near duplicate, or another download of its URL with other
# bytes): what identifies it, down to its bytes (``sha256``: takedowns match every copy).
DUPLICATE_TYPE = pa.struct(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("phash", pa.string()),
        ("distance", pa.int32()),
        ("sha256", pa.string()),
    ]
)
# A deduplicated sample at rest (``wit dedup`` -> ``wit balance``): the final row's fields
# (``stages.shards.FINAL_SCHEMA`` adds ``caption`` and ``balance_probability``) and where the
# image's bytes are.
SAMPLE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
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
        ("pairs", pa.list_(PAIR_TYPE)),
        ("duplicates", pa.list_(DUPLICATE_TYPE)),
        ("source_tar", pa.string()),
        ("image_ext", pa.string()),
    ]
)


def row(record: Mapping[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """A sample record as a row of ``schema`` (``captions``/``uids`` listed from its pairs)."""
    r = {f.name: record.get(f.name) for f in schema}
    r["image_key"] = record.get("image_key") or record["key"]
    r["captions"] = [p["caption"] for p in record["pairs"]]
    r["uids"] = [p["uid"] for p in record["pairs"]]
    r["duplicates"] = list(record.get("duplicates") or [])
    pair_type = schema.field("pairs").type.value_type  # PAIR_TYPE, with clip_score when scored
    r["pairs"] = [{f.name: p.get(f.name) for f in pair_type} for p in record["pairs"]]
    return r


def sample_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A deduplicated sample as stored in ``samples/*.parquet`` between the two commands."""
    return row(record, SAMPLE_SCHEMA)


def table_records(table) -> Iterator[dict[str, Any]]:
    """The records of an Arrow table of samples (lists as lists, never None)."""
    for r in table.to_pylist():
        r["pairs"] = [
            {**p, "query_ids": list(p["query_ids"] or [])} for p in (r.get("pairs") or [])
        ]
        r["query_ids"] = list(r.get("query_ids") or [])
        r["duplicates"] = list(r.get("duplicates") or [])
        yield r


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


# ---------------------------------------------------------------------------------------------
# Download shards: records in, image bytes back


def download_tars(inputs: Sequence[str]) -> list[str]:
    """Finished shard tars of download output directories (``DIR`` or ``DIR/shards``)."""
    tars: list[str] = []
    for d in inputs:
        sub = fileio.join(d, DOWNLOAD_SHARDS_DIR)
        found = shards.list_shards(sub) if fileio.exists(sub) else shards.list_shards(d)
        if not found:
            raise WitError(f"no download shards (NNNNN.tar + NNNNN.parquet) in {d}")
        tars.extend(found)
    return list(dict.fromkeys(tars))


def _pairs_from_meta(meta: Mapping[str, Any], extra: Mapping[str, Mapping[str, Any]]) -> list:
    pairs = []
    for p in meta.get("pairs") or []:
        pair = {
            "uid": str(p["uid"]),
            "caption": str(p.get("caption", "")),
            "query_ids": sorted(int(q) for q in p.get("query_ids") or []),
        }
        more = extra.get(pair["uid"], {})
        for col in ("language", "page_url", "source"):
            v = more.get(col)
            pair[col] = None if v is None else str(v)
        pairs.append(pair)
    if not pairs:  # a sample written without its pairs: fall back to its captions
        for c in meta.get("captions") or []:
            pairs.append(
                {
                    "uid": "",
                    "caption": str(c),
                    "query_ids": sorted(int(q) for q in meta.get("query_ids") or []),
                    "language": None,
                    "page_url": None,
                    "source": None,
                }
            )
    pairs.sort(key=lambda p: p["uid"])
    return pairs


def _read_pair_columns(parquet_path: str) -> dict[str, dict[str, Any]]:
    import pyarrow.parquet as pq

    if not fileio.exists(parquet_path):
        return {}
    with fileio.open_file(parquet_path, "rb") as f:
        schema = pq.read_schema(f)
        cols = [c for c in ("uid", "language", "page_url", "source") if c in schema.names]
        if "uid" not in cols:
            return {}
        f.seek(0)
        table = pq.read_table(f, columns=cols)
    return {r["uid"]: r for r in table.to_pylist()}


def read_download_shard(
    tar_path: str, hasher: Any = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read one download shard: ``(records, undecodable)``, one record per image, with pHash.

    A record holds the sample's metadata (``key``, ``url``, sizes, ``sha256``, ``pairs``,
    ``query_ids``), its ``phash`` (16 hex chars) and ``source_tar`` (where its bytes are), but
    not the image bytes: they are read again only for the samples that end in the final shards.
    """
    from wit_pipeline.stages.dedup.phash import PHasher, to_hex

    hasher = hasher or PHasher()
    extra = _read_pair_columns(tar_path[: -len(".tar")] + ".parquet")
    metas, blobs = [], []
    for s in shards.iter_samples(tar_path):
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in s), None)
        meta = json.loads(s["json"]) if "json" in s else {}
        meta.setdefault("key", s["__key__"])
        meta["_image_ext"] = image_ext
        metas.append(meta)
        blobs.append(s.get(image_ext, b"") if image_ext else b"")
    hashes, errors = hasher.hash_bytes(blobs)
    records, bad = [], []
    for meta, h, err in zip(metas, hashes, errors, strict=True):
        rec = {
            "key": str(meta["key"]),
            "url": str(meta.get("url", "")),
            "source_tar": tar_path,
            "image_ext": meta["_image_ext"] or "jpg",
            "width": int(meta.get("width") or 0),
            "height": int(meta.get("height") or 0),
            "original_width": int(meta.get("original_width") or 0),
            "original_height": int(meta.get("original_height") or 0),
            "sha256": str(meta.get("sha256", "")),
            "pairs": _pairs_from_meta(meta, extra),
        }
        rec["query_ids"] = sorted({q for p in rec["pairs"] for q in p["query_ids"]})
        if err is None and meta["_image_ext"]:
            rec["phash"] = to_hex(h)
            records.append(rec)
        else:
            rec["detail"] = err or "no image member in the sample"
            bad.append(rec)
    return records, bad


def iter_tar_members(tar_path: str, wanted: Mapping[str, str]) -> Iterator[tuple[str, bytes]]:
    """``(key, image bytes)`` for the keys in ``wanted`` (key -> image extension) of a tar."""
    with fileio.open_file(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if wanted.get(key) == ext:
                yield key, tar.extractfile(member).read()  # type: ignore[union-attr]


def attach_images(
    tar_path: str, records: Iterable[Mapping[str, Any]]
) -> Iterator[tuple[Mapping[str, Any], bytes]]:
    """``(record, image bytes)`` for records whose image is in the download tar ``tar_path``.

    The tar is read once; a record whose image is missing raises (the input changed).
    """
    records = list(records)
    wanted = {(r.get("image_key") or r["key"]): (r.get("image_ext") or "jpg") for r in records}
    found = dict(iter_tar_members(tar_path, wanted))
    for r in records:
        image_key = r.get("image_key") or r["key"]
        if image_key not in found:
            raise WitError(f"image {image_key} not found in {tar_path} (input changed?)")
        yield r, found[image_key]


class _ReadShardFn(stage.StageFn):
    """A download tar -> its records; undecodable images dropped; every image counted in."""

    def __init__(self, *, phash_decode: str = "exact"):
        super().__init__(stage=DEDUP, flow=False, pairs=True)
        self._decode = phash_decode

    def setup(self):
        from wit_pipeline.stages.dedup.phash import PHasher

        self._hasher = PHasher(self._decode)

    def core(self, tar_path, *args):
        records, bad = read_download_shard(tar_path, self._hasher)
        rejected = [{**r, "reason": UNDECODABLE} for r in bad]
        entered = stage.count_records(records + bad, counters.INPUT, pairs=True)
        return stage.Result(records, rejected, entered)


class ReadDownloadShards(beam.PTransform):
    """Download shard tar paths -> one metadata record per image, with its pHash.

    The first stage of the steps after the download: it counts every image (and pair) in
    (``input``) and drops undecodable ones. Returns the stage outputs (``stage.apply``).
    ``phash_decode`` is ``dedup.phash_decode`` (``phash.DECODES``).
    """

    def __init__(self, *, phash_decode: str = "exact"):
        super().__init__()
        self._decode = phash_decode

    def expand(self, paths):
        spread = paths | "Spread" >> beam.Reshuffle()
        return stage.apply(spread, "ReadAndHash", _ReadShardFn(phash_decode=self._decode))
