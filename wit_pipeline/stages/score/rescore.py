"""``wit score``: finished shards in, the same shards scored pair by pair (and filtered) out.

A shard sample's pairs are the ``pairs`` of its ``KEY.json`` (shards written by ``wit build``),
else its ``captions`` (one pair each), else its ``KEY.txt`` (one pair); a pair without a
``uid`` is named ``KEY#i`` (:func:`sample_pairs`). Each pair is scored and filtered as in the
build (``core.filter_pairs``); ``KEY.json`` keeps the surviving ``pairs`` (each with its
``clip_score``), ``captions``/``uids``/``query_ids`` follow them, ``clip_score`` is the best
pair's and ``KEY.txt`` (and ``caption``) its caption.

Scores are cached per shard (``scores/NNNNN.parquet``: ``key``, ``uid``, ``clip_score``), with
the embeddings of the shard's null images (``scores/_null/NNNNN.parquet``), so a rerun scores
only the shards it has not finished. The null's images are chosen before the pipeline starts,
from the image ids in the shards' Parquet files (:func:`shard_image_ids`), so a cached shard
whose null embeddings are missing (another ``score.null_samples`` or ``null_seed``) is scored
again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import ModelHandler

from wit_pipeline import beam_utils, fileio, shards, stage
from wit_pipeline import config as config_lib
from wit_pipeline.config import ScoreConfig
from wit_pipeline.errors import WitError
from wit_pipeline.stages.score import calibrate, core
from wit_pipeline.stages.score.model import NULL_MARK, SCORE_FIELD, ScoreWithClip
from wit_pipeline.stages.score.transforms import (
    SCORE_FILE,
    SCORES_DIR,
    SCORES_SCHEMA,
    model_identity,
    write_score_doc,
)

SCORES_MODEL_FILE = "_model.json"
NULL_DIR = "_null"  # under scores/: the null images' embeddings, per shard
SCORES_FORMAT = "pair"  # recorded in scores/_model.json: one cached score per pair
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
NULL_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uid", pa.string()),
        ("image", pa.list_(pa.float32())),
        ("text", pa.list_(pa.float32())),
    ]
)

Scores = Mapping[tuple[str, str], float | None]  # (key, uid) -> score


# ---------------------------------------------------------------------------------------------
# Reading shard samples


def sample_pairs(key: str, meta: Mapping[str, Any], txt: str) -> list[dict[str, Any]]:
    """A shard sample's pairs, each ``{"uid", "caption", "_at": index in meta's pairs}``."""
    pairs = meta.get("pairs")
    if pairs:
        return [
            {"uid": str(p.get("uid") or f"{key}#{i}"), "caption": str(p.get("caption") or "")}
            for i, p in enumerate(pairs)
        ]
    captions = meta.get("captions")
    if captions:
        uids = meta.get("uids") or []
        named = len(uids) == len(captions)
        return [
            {"uid": str((uids[i] if named else "") or f"{key}#{i}"), "caption": str(c or "")}
            for i, c in enumerate(captions)
        ]
    return [{"uid": f"{key}#0", "caption": txt.strip()}] if txt.strip() else []


def _sample_image(sample: Mapping[str, Any]) -> tuple[bytes | None, str | None]:
    for ext in IMAGE_EXTS:
        if sample.get(ext):
            return sample[ext], ext
    return None, None


def _parse(sample: Mapping[str, Any]) -> tuple[str, dict[str, Any], str]:
    key = sample["__key__"]
    txt = (sample.get("txt") or b"").decode("utf-8", errors="replace")
    meta = json.loads(sample["json"]) if sample.get("json") else {}
    return key, meta, txt


def _image_id(key: str, meta: Mapping[str, Any]) -> str:
    return str(meta.get("image_key") or key)


def read_shard_records(
    tar_path: str, selected: frozenset[str] = frozenset()
) -> Iterable[dict[str, Any]]:
    """``{"shard", "key", "image_key", "image", "pairs"}`` per sample of a shard; ``reason``
    ``no_image_or_caption`` when it has no image or no caption; marked for the null when its
    image is in ``selected``."""
    name = tar_path.rsplit("/", 1)[-1][: -len(".tar")]
    for sample in shards.iter_samples(tar_path):
        key, meta, txt = _parse(sample)
        image, _ = _sample_image(sample)
        pairs = sample_pairs(key, meta, txt)
        iid = _image_id(key, meta)
        record = {"shard": name, "key": key, "image_key": iid, "image": image, "pairs": pairs}
        if image is None or not any(p["caption"].strip() for p in pairs):
            record["reason"] = core.MISSING
            record["detail"] = "no image or no caption in the shard"
        elif iid in selected:
            record[NULL_MARK] = True
        yield record


def shard_image_ids(tar_path: str) -> list[str]:
    """The image ids of a shard's samples (``image_key``, else ``key``): from its Parquet file
    when it has a ``key`` column, else from the tar."""
    import pyarrow.parquet as pq

    parquet = tar_path[: -len(".tar")] + ".parquet"
    if fileio.exists(parquet):
        with fileio.open_file(parquet, "rb") as f:
            names = pq.read_schema(f).names
            if "key" in names:
                f.seek(0)
                cols = [c for c in ("key", "image_key") if c in names]
                table = pq.read_table(f, columns=cols)
                keys = table.column("key").to_pylist()
                img = table.column("image_key").to_pylist() if "image_key" in cols else keys
                return sorted({str(i or k) for k, i in zip(keys, img, strict=True)})
    ids = set()
    for sample in shards.iter_samples(tar_path):
        key, meta, _ = _parse(sample)
        ids.add(_image_id(key, meta))
    return sorted(ids)


# ---------------------------------------------------------------------------------------------
# The per-shard caches


def scores_path(output_dir: str, shard: str) -> str:
    return fileio.join(output_dir, SCORES_DIR, f"{shard}.parquet")


def null_path(output_dir: str, shard: str) -> str:
    return fileio.join(output_dir, SCORES_DIR, NULL_DIR, f"{shard}.parquet")


def write_scores(
    output_dir: str, shard: str, items: Iterable[tuple[str, str, float | None]]
) -> tuple[str, dict[tuple[str, str], float | None]]:
    """Cache one shard's pair scores (``scores/NNNNN.parquet``: key, uid, clip_score)."""
    import pyarrow.parquet as pq

    scores = {(k, u): s for k, u, s in sorted(items, key=lambda x: (x[0], x[1]))}
    table = pa.Table.from_pylist(
        [{"key": k, "uid": u, SCORE_FIELD: s} for (k, u), s in scores.items()],
        schema=SCORES_SCHEMA,
    )
    with fileio.atomic_write(scores_path(output_dir, shard), "wb") as f:
        pq.write_table(table, f)
    return shard, scores


def read_scores(output_dir: str, shard: str) -> tuple[str, dict[tuple[str, str], float | None]]:
    import pyarrow.parquet as pq

    with fileio.open_file(scores_path(output_dir, shard), "rb") as f:
        table = pq.read_table(f)
    rows = table.to_pylist()
    return shard, {(r["key"], r["uid"]): r[SCORE_FIELD] for r in rows}


def write_null(output_dir: str, shard: str, found: Iterable[calibrate.NullCandidate]) -> str:
    """Cache the embeddings of one shard's null images (``scores/_null/NNNNN.parquet``)."""
    import pyarrow.parquet as pq

    rows = [
        {"image_id": c.image_id, "uid": c.uid, "image": c.image.tolist(), "text": c.text.tolist()}
        for c in sorted(found, key=lambda c: (c.image_id, c.uid))
    ]
    with fileio.atomic_write(null_path(output_dir, shard), "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=NULL_SCHEMA), f)
    return shard


def read_null(output_dir: str, shard: str, seed: int) -> list[calibrate.NullCandidate]:
    import pyarrow.parquet as pq

    path = null_path(output_dir, shard)
    if not fileio.exists(path):
        return []
    with fileio.open_file(path, "rb") as f:
        rows = pq.read_table(f).to_pylist()
    return [
        calibrate.NullCandidate(
            r["image_id"],
            calibrate.null_rank(seed, r["image_id"]),
            r["uid"],
            np.asarray(r["image"], np.float32),
            np.asarray(r["text"], np.float32),
        )
        for r in rows
    ]


# ---------------------------------------------------------------------------------------------
# Writing a scored shard


def _scored_meta(
    meta: Mapping[str, Any], pairs: Sequence[Mapping[str, Any]], kept: Mapping[str, Any]
) -> dict[str, Any]:
    """A kept sample's ``KEY.json``: its surviving pairs (with ``clip_score``) and what follows
    from them."""
    survivors = {p["uid"]: p[SCORE_FIELD] for p in kept["pairs"]}
    at = [i for i, p in enumerate(pairs) if p["uid"] in survivors]
    out = dict(meta)
    if meta.get("pairs"):
        out["pairs"] = [{**meta["pairs"][i], SCORE_FIELD: survivors[pairs[i]["uid"]]} for i in at]
        if "query_ids" in meta:
            out["query_ids"] = sorted({q for p in out["pairs"] for q in p.get("query_ids") or ()})
    else:
        out["pairs"] = [
            {"uid": pairs[i]["uid"], "caption": pairs[i]["caption"], SCORE_FIELD: survivors[
                pairs[i]["uid"]]}
            for i in at
        ]  # fmt: skip
    if "captions" in meta:
        out["captions"] = [pairs[i]["caption"] for i in at]
    if "uids" in meta:
        out["uids"] = [pairs[i]["uid"] for i in at]
    if "caption" in meta:
        out["caption"] = kept["caption"]
    out[SCORE_FIELD] = kept[SCORE_FIELD]
    return out


def _pairs_type(current: pa.DataType | None, values: list) -> pa.DataType:
    if current is None:
        return pa.array(values).type
    struct = current.value_type
    fields = [f for f in struct if f.name != SCORE_FIELD] + [pa.field(SCORE_FIELD, pa.float32())]
    return pa.list_(pa.struct(fields))


def _scored_table(
    table: pa.Table, metas: Mapping[str, Mapping[str, Any]], scores: Scores, path: str
) -> pa.Table:
    """The shard's Parquet rows for the kept samples (``metas``: their ``KEY.json`` by key).

    One row per sample: its columns that follow the pairs are replaced and ``pairs`` and
    ``clip_score`` added. One row per pair (download shards, with ``uid``): the surviving pairs'
    rows, each with its own ``clip_score``. No ``key`` column: the rows are rebuilt from
    ``metas``.
    """
    if "key" not in table.column_names:
        if table.num_rows and table.num_rows == len(metas):
            raise WitError(f"{path}: no key column to attach scores to")
        return pa.Table.from_pylist([dict(m) for m in metas.values()])
    keys = table.column("key").to_pylist()
    if len(set(keys)) < len(keys):  # one row per pair
        if "uid" in table.column_names:
            uids = table.column("uid").to_pylist()
            alive = {(k, p["uid"]) for k, m in metas.items() for p in m["pairs"]}
            mask = [(k, u) in alive for k, u in zip(keys, uids, strict=True)]
            table = table.filter(pa.array(mask, pa.bool_()))
            col = [scores.get((k, u)) for k, u in zip(*_kv(table), strict=True)]
        else:
            table = table.filter(pa.array([k in metas for k in keys], pa.bool_()))
            col = [metas[k][SCORE_FIELD] for k in table.column("key").to_pylist()]
    else:
        table = table.filter(pa.array([k in metas for k in keys], pa.bool_()))
        kept = [metas[k] for k in table.column("key").to_pylist()]
        for name in ("caption", "captions", "uids", "query_ids", "pairs"):
            if not kept or name not in kept[0]:
                continue
            values = [m.get(name) for m in kept]
            current = table.schema.field(name).type if name in table.column_names else None
            kind = _pairs_type(current, values) if name == "pairs" else current
            array = pa.array(values, type=kind) if kind is not None else pa.array(values)
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, array)
            else:
                table = table.append_column(name, array)
        col = [m[SCORE_FIELD] for m in kept]
    if SCORE_FIELD in table.column_names:
        table = table.drop_columns([SCORE_FIELD])
    return table.append_column(SCORE_FIELD, pa.array(col, type=pa.float32()))


def _kv(table: pa.Table) -> tuple[list, list]:
    return table.column("key").to_pylist(), table.column("uid").to_pylist()


def write_scored_shard(
    shard: str,
    scores: Scores,
    threshold: float | None,
    *,
    input_dir: str,
    output_dir: str,
) -> stage.Result:
    """Rewrite one shard with its pairs' scores, dropping low pairs (``core.filter_pairs``).

    Returns the filter's result over the shard's samples; ``outputs["infos"]`` holds the
    written shard's info.
    """
    import pyarrow.parquet as pq

    shard_id = int(shard)
    tar_path, parquet_path = shards.shard_paths(input_dir, shard_id)
    records, images, found = [], {}, {}
    for sample in shards.iter_samples(tar_path):
        key, meta, txt = _parse(sample)
        pairs = sample_pairs(key, meta, txt)
        scored = [{**p, SCORE_FIELD: scores.get((key, p["uid"]))} for p in pairs]
        record = {"key": key, "url": meta.get("url"), "caption": txt, "pairs": scored}
        image, ext = _sample_image(sample)
        if image is None or not any(p["caption"].strip() for p in pairs):
            record["reason"] = core.MISSING
            record["detail"] = "no image or no caption in the shard"
        else:
            images[key] = (image, ext)
        found[key] = (meta, pairs)
        records.append(record)
    result = core.filter_pairs(records, threshold)
    metas, kept_samples = {}, []
    for r in result.kept:
        meta, pairs = found[r["key"]]
        metas[r["key"]] = _scored_meta(meta, pairs, r)
        image, ext = images[r["key"]]
        kept_samples.append(
            shards.Sample(r["key"], image, r["caption"], metas[r["key"]], image_ext=ext)
        )
    table = pq.read_table(parquet_path) if fileio.exists(parquet_path) else pa.table({})
    table = _scored_table(table, metas, scores, parquet_path)
    info = shards.write_shard(fileio.join(output_dir, "shards"), shard_id, kept_samples, table)
    return dataclasses.replace(result, outputs={"infos": [info.to_dict()]})


class _WriteScoredShard(stage.StageFn):
    """``(shard, scores)`` and the decision -> the scored shard, written; its samples and pairs
    counted."""

    def __init__(self, input_dir: str, output_dir: str):
        super().__init__(stage=core.STAGE, kept_as="none", outputs=("infos",), pairs=True)
        self._input_dir = input_dir
        self._output_dir = output_dir

    def core(self, kv, decision):
        shard, scores = kv
        return write_scored_shard(
            shard,
            scores,
            decision.threshold,
            input_dir=self._input_dir,
            output_dir=self._output_dir,
        )


def _write_manifest(
    infos: list[dict[str, Any]],
    output_dir: str,
    config: Mapping[str, Any],
    decision: calibrate.Decision,
) -> str:
    shard_dir = fileio.join(output_dir, "shards")
    parsed = [
        shards.ShardInfo(
            shard_id=int(i["shard_id"]),
            tar=fileio.join(shard_dir, i["tar"]),
            parquet=fileio.join(shard_dir, i["parquet"]),
            num_samples=int(i["num_samples"]),
            tar_bytes=int(i["tar_bytes"]),
            sha256=str(i["sha256"]),
        )
        for i in infos
    ]
    shards.write_manifest(
        shard_dir,
        parsed,
        config=config,
        extra={
            "clip_score_threshold": decision.doc["threshold"],
            "clip_score_mode": decision.doc["mode"],
        },
    )
    return output_dir


# ---------------------------------------------------------------------------------------------
# The transform


def _score_items(kv: tuple[str, Scores]) -> list[float]:
    return [s for s in kv[1].values() if s is not None]


def _pair_items(r: Mapping[str, Any]) -> tuple[str, list[tuple[str, str, float | None]]]:
    return r["shard"], [(r["key"], p["uid"], p.get(SCORE_FIELD)) for p in r["pairs"]]


def _flatten_items(kv):
    shard, groups = kv
    return shard, [item for group in groups for item in group]


def _has_reason(r: Mapping[str, Any]) -> bool:
    return bool(r.get("reason"))


def _no_reason(r: Mapping[str, Any]) -> bool:
    return not r.get("reason")


@dataclasses.dataclass(frozen=True)
class _ShardJob:
    shard: str
    tar: str
    null_ids: frozenset[str]  # the null's images among the shard's samples


class ScoreShards(beam.PTransform):
    """``wit score``: a directory of finished shards -> scored (and filtered) shards.

    Applied to a pipeline (``p | ScoreShards(...)``). Output layout (``output_dir``):
    ``shards/NNNNN.{tar,parquet}`` (same shard ids), ``shards/manifest.json``,
    ``rejected/part-*.parquet``, ``scores/NNNNN.parquet`` (the per-shard pair scores: the
    scores table and the cache), ``score.json`` (the threshold and its estimates) and
    ``stats.json`` (``counters`` over samples, ``pair_counters`` over pairs, both balanced;
    ``score``: ``score.json``'s estimates).
    """

    def __init__(
        self,
        *,
        input_dir: str,
        output_dir: str,
        config: ScoreConfig,
        model_handler: ModelHandler | None = None,
    ):
        super().__init__()
        tars = shards.list_shards(input_dir)
        if not tars:
            raise WitError(f"no finished shards (NNNNN.tar with NNNNN.parquet) in {input_dir}")
        self._input_dir = input_dir
        self._output_dir = output_dir
        self._config = config
        self._handler = model_handler
        self._check_score_cache()
        ids = {t: shard_image_ids(t) for t in tars}
        self._selected = frozenset(
            calibrate.select_null(
                (i for v in ids.values() for i in v), config.null_samples, config.null_seed
            )
        )
        self._jobs = [
            _ShardJob(t.rsplit("/", 1)[-1][: -len(".tar")], t, self._selected & frozenset(ids[t]))
            for t in tars
        ]

    def _identity(self) -> dict[str, str]:
        return {**model_identity(self._config), "scores": SCORES_FORMAT}

    def _check_score_cache(self) -> None:
        path = fileio.join(self._output_dir, SCORES_DIR, SCORES_MODEL_FILE)
        if fileio.exists(path):
            recorded = fileio.read_json(path)
            if recorded.get("scores") != SCORES_FORMAT:
                raise WitError(
                    f"{self._output_dir} holds per-sample scores of an earlier version (scores "
                    f"are per pair now); choose another --output"
                )
            if recorded != self._identity():
                raise WitError(
                    f"{self._output_dir} holds scores from another seed model ({recorded}); "
                    f"choose another --output"
                )

    def _cached(self, job: _ShardJob) -> bool:
        out = self._output_dir
        if not fileio.exists(scores_path(out, job.shard)):
            return False
        if not job.null_ids:
            return True
        have = {c.image_id for c in read_null(out, job.shard, self._config.null_seed)}
        return job.null_ids <= have

    def expand(self, pbegin):
        cfg = self._config
        out = self._output_dir
        cached = [j for j in self._jobs if self._cached(j)]
        todo = [j for j in self._jobs if j not in cached]
        parts, nulls = [], []
        if todo:
            records = (
                pbegin
                | "ShardsToScore" >> beam.Create([j.tar for j in todo])
                | "ReadSamples" >> beam.FlatMap(read_shard_records, self._selected)
                | "Reshuffle" >> beam.Reshuffle()
            )
            unscorable = records | "Unscorable" >> beam.Filter(_has_reason)
            scorer = ScoreWithClip(config=cfg, model_handler=self._handler)
            scored = records | "Scorable" >> beam.Filter(_no_reason) | "Score" >> scorer
            fresh = scored | "NullCandidates" >> beam.FlatMap(_shard_candidates, cfg.null_seed)
            _ = (
                fresh
                | "GroupNull" >> beam.GroupByKey()
                | "CacheNull" >> beam.Map(write_null_to, out)
            )
            fresh = fresh | "NullValues" >> beam.Values()
            nulls.append(fresh)
            parts.append(
                (scored, unscorable)
                | "AllRecords" >> beam.Flatten()
                | "KeyByShard" >> beam.Map(_pair_items)
                | "GroupByShard" >> beam.GroupByKey()
                | "Items" >> beam.Map(_flatten_items)
                | "CacheScores" >> beam.Map(write_scores_to, out, self._identity())
            )
        if cached:
            parts.append(
                pbegin
                | "CachedShards" >> beam.Create([j.shard for j in cached])
                | "ReadCachedScores" >> beam.Map(read_scores_from, out)
            )
            nulls.append(
                pbegin
                | "CachedNullShards" >> beam.Create([j.shard for j in cached if j.null_ids])
                | "ReadCachedNull" >> beam.FlatMap(lambda s: read_null(out, s, cfg.null_seed))
            )
        per_shard = parts[0] if len(parts) == 1 else tuple(parts) | "AllShards" >> beam.Flatten()
        candidates = nulls[0] if len(nulls) == 1 else tuple(nulls) | "AllNull" >> beam.Flatten()
        pool = per_shard | "ScoreValues" >> beam.FlatMap(_score_items)
        decision = {"scores": pool, "candidates": candidates} | "Threshold" >> (
            calibrate.DecideThreshold(config=cfg)
        )
        doc = decision | "WriteScoreDoc" >> beam.Map(
            write_score_doc, fileio.join(out, SCORE_FILE), model_identity(cfg)
        )
        written = stage.apply(
            per_shard,
            "WriteShards",
            _WriteScoredShard(self._input_dir, out),
            beam.pvalue.AsSingleton(decision),
        )
        _ = written[beam_utils.REJECTED] | "WriteRejected" >> stage.WriteRejected(
            fileio.join(out, stage.REJECTED_DIR)
        )
        score_section = doc | "ScoreSection" >> beam.Map(_score_section)
        stats = written[beam_utils.COUNTS] | "WriteStats" >> stage.WriteStats(
            fileio.join(out, stage.STATS_FILE),
            sections={"": "counters", stage.PAIR: "pair_counters"},
            flows=("", stage.PAIR),
            extra={"seed_model": model_identity(cfg)},
            side=[score_section],
            stage=core.STAGE,
        )
        manifest = (
            written["infos"]
            | "CollectInfos" >> beam.combiners.ToList()
            | "WriteManifest"
            >> beam.Map(
                _write_manifest,
                out,
                {"score": config_lib.to_dict(cfg)},
                beam.pvalue.AsSingleton(decision),
            )
        )
        return {"stats": stats, "manifest": manifest}


def _shard_candidates(r: Mapping[str, Any], seed: int) -> list[tuple[str, Any]]:
    return [(r["shard"], c) for c in calibrate.null_candidate(r, seed)]


def write_null_to(kv: tuple[str, Iterable[calibrate.NullCandidate]], output_dir: str) -> str:
    return write_null(output_dir, kv[0], kv[1])


def _score_section(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {"score": {k: v for k, v in doc.items() if k not in ("model", "pretrained")}}


def write_scores_to(
    kv: tuple[str, Iterable[tuple[str, str, float | None]]],
    output_dir: str,
    identity: Mapping[str, str],
):
    # The seed's identity goes beside the cache before any score does (idempotent), so a later
    # run with another seed cannot mix its scores in.
    fileio.write_json(fileio.join(output_dir, SCORES_DIR, SCORES_MODEL_FILE), dict(identity))
    return write_scores(output_dir, kv[0], kv[1])


def read_scores_from(shard: str, output_dir: str):
    return read_scores(output_dir, shard)
