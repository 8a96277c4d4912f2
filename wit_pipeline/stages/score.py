"""CLIP-score filtering: a seed CLIP rates how well each caption describes its image.

The score is the cosine similarity of the image and caption embeddings of a seed model (LAION
kept pairs above 0.28 with OpenAI's ViT-B/32; DataComp's best simple filter kept the top 30% by
score). The seed may be an open_clip pretrained tag (downloaded by open_clip), a local checkpoint,
or a checkpoint written by ``wit_pipeline.train``: train on raw data, then filter with it.

Pieces, from pure to pipeline:

- :func:`score_pairs`: cosine similarities for a batch (``None`` for an image that does not
  decode);
- :func:`filter_scored`: the one filter core: keep records at or above a threshold, drop the
  rest with reason ``low_clip_score`` (``undecodable_image`` for images the model could not
  read); :func:`top_fraction_threshold` turns ``keep_fraction`` into that threshold (exact: the
  k-th largest score over the whole collection, :func:`compute_threshold` in Beam);
- :class:`OpenClipModelHandler`: a Beam ``ModelHandler`` for ``RunInference`` (batched, model
  loaded once per worker, GPU when present);
- :class:`ScoreWithClip`: records in, the same records with ``clip_score`` out;
  :class:`FilterByClipScore`: scored records in, kept and dropped ones out;
- :class:`ScoreSamples`: ``wit build --seed-model``: balanced samples are scored (their images
  read back from the download shards) and filtered before they are written to shards;
- :class:`ScoreShards`: ``wit score``: shard tars in, shard tars out with ``clip_score`` in every
  ``KEY.json`` and Parquet row, ``rejected/``, ``stats.json`` and ``manifest.json``. Scores are
  cached per shard in ``scores/``, so a rerun only scores the shards it has not finished.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from wit_pipeline import beam_utils, fileio, samples, shards, stage
from wit_pipeline import config as config_lib
from wit_pipeline.config import ScoreConfig
from wit_pipeline.errors import WitError

STAGE = "score"
SCORE_FIELD = "clip_score"
LOW_SCORE = "low_clip_score"
UNDECODABLE = "undecodable_image"
MISSING = "no_image_or_caption"
SCORES_DIR = "scores"
SCORES_MODEL_FILE = "_model.json"
SCORE_FILE = "score.json"  # the threshold a build used (wit build --seed-model)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Scores written by ``wit build --seed-model`` (``finalize/scores/``): every sample, kept or not.
SCORES_SCHEMA = pa.schema([("key", pa.string()), (SCORE_FIELD, pa.float32())])


# ---------------------------------------------------------------------------------------------
# Pure scoring


def _decode(data: bytes | None) -> Any:
    from PIL import Image

    if not data:
        return None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception:  # PIL raises many types for corrupt or unsupported images
        return None


def _prepare(data: bytes | None, preprocess: Any) -> Any:
    """Decoded and preprocessed image tensor, or None when the image does not decode."""
    img = _decode(data)
    return None if img is None else preprocess(img)


def score_pairs(
    loaded: Any,
    images: Sequence[bytes | None],
    captions: Sequence[str],
    *,
    threads: int = 0,
) -> list[float | None]:
    """Cosine similarity of each (image, caption) pair; ``None`` where the image does not decode.

    Images are decoded and preprocessed on ``threads`` threads (PIL and torchvision release the
    GIL; 0: up to 8, one per core), which keeps a GPU fed; the model then runs on the batch.
    """
    import torch

    from wit_pipeline.models import autocast as _autocast

    if len(images) != len(captions):
        raise ValueError("one caption per image")
    threads = threads or min(8, os.cpu_count() or 1)
    if threads > 1 and len(images) > 1:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            tensors = list(pool.map(lambda b: _prepare(b, loaded.preprocess), images))
    else:
        tensors = [_prepare(b, loaded.preprocess) for b in images]
    ok = [i for i, t in enumerate(tensors) if t is not None]
    out: list[float | None] = [None] * len(images)
    if not ok:
        return out
    model = loaded.model
    with torch.inference_mode(), _autocast(loaded.device):
        x = torch.stack([tensors[i] for i in ok]).to(loaded.device, non_blocking=True)
        t = loaded.tokenizer([captions[i] for i in ok]).to(loaded.device)
        img = model.encode_image(x, normalize=True).float()
        txt = model.encode_text(t, normalize=True).float()
        sims = (img * txt).sum(dim=1).cpu().tolist()
    for i, s in zip(ok, sims, strict=True):
        out[i] = float(s)
    return out


def top_fraction_threshold(scores: Sequence[float] | np.ndarray, keep_fraction: float) -> float:
    """The score threshold that keeps the top ``keep_fraction`` of ``scores``.

    ``k = round(keep_fraction * n)`` (half up) samples are kept: the threshold is the k-th largest
    score (ties at the threshold are all kept); ``inf`` when k is 0.
    """
    arr = np.asarray(scores, dtype=np.float64)
    k = math.floor(keep_fraction * len(arr) + 0.5)
    if k <= 0 or len(arr) == 0:
        return math.inf
    k = min(k, len(arr))
    return float(np.partition(arr, len(arr) - k)[len(arr) - k])


def filter_scored(
    records: Iterable[Mapping[str, Any]],
    threshold: float | None,
    *,
    undecodable: str = UNDECODABLE,
) -> stage.Result:
    """Keep records whose ``clip_score`` >= ``threshold`` (every scored one when None).

    A record that already has a ``reason`` (nothing to score) is dropped with it; one without a
    score (the model could not read the image) with ``undecodable`` (``undecodable_image``);
    one below the threshold with ``low_clip_score``. Each dropped record says why in ``detail``.
    """
    kept, rejected = [], []
    for r in records:
        score = r.get(SCORE_FIELD)
        if r.get("reason"):
            rejected.append(r)
        elif score is None:
            detail = "the seed model could not read the image"
            rejected.append({**r, "reason": undecodable, "detail": detail})
        elif threshold is not None and score < threshold:
            detail = f"clip_score {score:.4f} < threshold {threshold:.4f}"
            rejected.append({**r, "reason": LOW_SCORE, "detail": detail})
        else:
            kept.append(r)
    return stage.Result(kept, rejected)


# ---------------------------------------------------------------------------------------------
# RunInference


class OpenClipModelHandler(ModelHandler[dict, PredictionResult, Any]):
    """``RunInference`` handler: records with image bytes and a caption -> cosine similarity.

    The model is loaded once per worker process (``RunInference`` shares it between threads);
    ``score.device = auto`` uses the GPU when one is present. Records are batched to
    ``score.batch_size``.
    """

    def __init__(
        self, *, config: ScoreConfig, image_field: str = "image", caption_field: str = "caption"
    ):
        super().__init__(min_batch_size=config.batch_size, max_batch_size=config.batch_size)
        self._model_name = config.model
        self._pretrained = config.pretrained
        self._device = config.device
        self._image_field = image_field
        self._caption_field = caption_field

    def load_model(self) -> Any:
        from wit_pipeline import models

        return models.load_model(
            self._model_name or None, self._pretrained or None, device=self._device
        )

    def run_inference(
        self,
        batch: Sequence[dict],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        images = [r.get(self._image_field) for r in batch]
        captions = [str(r.get(self._caption_field) or "") for r in batch]
        scores = score_pairs(model, images, captions)
        return [PredictionResult(r, s) for r, s in zip(batch, scores, strict=True)]

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(
            len(r.get(self._image_field) or b"") + len(r.get(self._caption_field) or "")
            for r in batch
        )

    def get_metrics_namespace(self) -> str:
        return "wit_score"


def _merge_score(result: PredictionResult) -> dict[str, Any]:
    record = dict(result.example)
    record[SCORE_FIELD] = result.inference
    return record


class ScoreWithClip(beam.PTransform):
    """Adds ``clip_score`` (float, or None for an undecodable image) to every record.

    Records are dicts with the encoded image under ``image_field`` and the caption under
    ``caption_field``; everything else passes through unchanged. The seed model is
    ``score.pretrained`` (a checkpoint path or an open_clip tag) with ``score.model``, or a ready
    ``model_handler``.
    """

    def __init__(
        self,
        *,
        config: ScoreConfig | None = None,
        image_field: str = "image",
        caption_field: str = "caption",
        model_handler: ModelHandler | None = None,
    ):
        super().__init__()
        if model_handler is None:
            if config is None or not config.pretrained:
                raise WitError("the scorer needs a seed model: --pretrained CHECKPOINT_OR_TAG")
            if not config.model and not fileio.exists(config.pretrained):
                raise WitError(f"--model is required with the pretrained tag {config.pretrained!r}")
            model_handler = OpenClipModelHandler(
                config=config, image_field=image_field, caption_field=caption_field
            )
        self._handler = model_handler

    def expand(self, pcoll):
        return (
            pcoll
            | "RunInference" >> RunInference(self._handler)
            | "AddScore" >> beam.Map(_merge_score)
        )


# ---------------------------------------------------------------------------------------------
# Filtering


class _ScoresToArray(beam.CombineFn):
    """All non-null scores of a collection as one float32 array (4 bytes per record)."""

    def create_accumulator(self):
        return ([], [])  # (pending floats, float32 arrays)

    def add_input(self, acc, score):
        if score is not None:
            acc[0].append(score)
        return acc

    def merge_accumulators(self, accs):
        arrays = []
        for pending, arrs in accs:
            arrays.extend(arrs)
            if pending:
                arrays.append(np.asarray(pending, dtype=np.float32))
        merged = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.float32)
        return ([], [merged])

    def compact(self, acc):
        return self.merge_accumulators([acc])

    def extract_output(self, acc):
        return self.merge_accumulators([acc])[1][0]


class _FilterFn(stage.StageFn):
    """Scored records and the threshold (a side input) -> kept and dropped ones."""

    def __init__(self, *, flow: bool = True, pairs: bool = False, undecodable: str = UNDECODABLE):
        super().__init__(stage=STAGE, flow=flow, pairs=pairs)
        self._undecodable = undecodable

    def core(self, record, threshold):
        return filter_scored([record], threshold, undecodable=self._undecodable)


def compute_threshold(scores, *, config: ScoreConfig):
    """A singleton PCollection holding the threshold (None keeps every scored record)."""
    if config.keep_fraction is not None:
        return (
            scores
            | "AllScores" >> beam.CombineGlobally(_ScoresToArray())
            | "TopFraction" >> beam.Map(top_fraction_threshold, config.keep_fraction)
        )
    return scores.pipeline | "FixedThreshold" >> beam.Create([config.threshold])


class FilterByClipScore(beam.PTransform):
    """Scored records -> the stage outputs: ``kept``, ``rejected`` (with ``reason``), ``counts``.

    The threshold is ``score.threshold``, or the exact top ``score.keep_fraction``, or none.
    """

    def __init__(self, *, config: ScoreConfig):
        super().__init__()
        self._config = config

    def expand(self, pcoll):
        scores = pcoll | "Scores" >> beam.Map(lambda r: r.get(SCORE_FIELD))
        thr = compute_threshold(scores, config=self._config)
        return stage.apply(pcoll, "Filter", _FilterFn(), beam.pvalue.AsSingleton(thr))


# ---------------------------------------------------------------------------------------------
# Balanced samples in, scored samples out (`wit build --seed-model`)


class _AttachImagesFn(beam.DoFn):
    """``(download tar, samples)`` -> samples with their image bytes under ``image``."""

    def process(self, item):
        tar_path, records = item
        for r, image in samples.attach_images(tar_path, records):
            yield {**r, "image": image}


def _strip_image(r: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in r.items() if k != "image"}
    out[SCORE_FIELD] = _round_score(out.get(SCORE_FIELD))
    return out


class _ScoreImages(beam.PTransform):
    """``(download tar, samples)`` -> samples with ``clip_score`` (images read, scored, dropped)."""

    def __init__(self, scorer: beam.PTransform):
        super().__init__()
        self._scorer = scorer

    def expand(self, grouped):
        return (
            grouped
            | "AttachImages" >> beam.ParDo(_AttachImagesFn())
            | "Score" >> self._scorer
            | "DropImages" >> beam.Map(_strip_image)
        )


def _threshold_doc(threshold: float | None, path: str, identity: Mapping[str, Any]) -> str:
    finite = threshold is not None and not math.isinf(threshold)
    fileio.write_json(path, {**dict(identity), "threshold": float(threshold) if finite else None})
    return path


def _score_row(r: Mapping[str, Any]) -> dict[str, Any]:
    return {"key": r["key"], SCORE_FIELD: r[SCORE_FIELD]}


class ScoreSamples(beam.PTransform):
    """Balanced samples -> samples with ``clip_score``, filtered by threshold or top fraction.

    The images are read from the download shards (each tar once, grouped by ``source_tar``),
    scored by :class:`ScoreWithClip` (Beam ``RunInference``; with ``score.accelerator`` set, on
    workers with that accelerator via a Beam resource hint, e.g. a GPU on Dataflow), then
    dropped again before any shuffle. The threshold (:func:`compute_threshold`) is written to
    ``threshold_path``; with ``scores_dir``, every sample's score is written there as
    ``part-*.parquet`` (``key``, ``clip_score``). Returns the stage outputs: ``kept``,
    ``rejected`` and ``counts`` (drops only, over samples and pairs: input and kept are counted
    where samples enter and leave the pipeline). ``undecodable_image`` is also a reason of
    dedup, in the same counters: here it is ``score/undecodable_image``.
    """

    def __init__(
        self,
        *,
        config: ScoreConfig,
        threshold_path: str,
        scores_dir: str = "",
        model_handler: Any = None,
    ):
        super().__init__()
        self._config = config
        self._scorer = ScoreWithClip(config=config, model_handler=model_handler)
        self._path = threshold_path
        self._scores_dir = scores_dir

    def expand(self, samples_pcoll):
        cfg = self._config
        score_images = _ScoreImages(self._scorer)
        if cfg.accelerator:
            # Reading the images sits inside the hinted part too: on Dataflow the GPU workers
            # read them from the download shards, and only metadata crosses to them.
            score_images = score_images.with_resource_hints(accelerator=cfg.accelerator)
        scored = (
            samples_pcoll
            | "BySourceTar" >> beam.Map(lambda r: (r["source_tar"], r))
            | "GroupSourceTar" >> beam.GroupByKey()
            | "ClipScore" >> score_images
        )
        threshold = compute_threshold(
            scored | "Scores" >> beam.Map(lambda r: r.get(SCORE_FIELD)), config=cfg
        )
        identity = {
            "model": cfg.model,
            "pretrained": cfg.pretrained,
            "threshold_given": cfg.threshold,
            "keep_fraction": cfg.keep_fraction,
        }
        _ = threshold | "WriteThreshold" >> beam.Map(_threshold_doc, self._path, identity)
        if self._scores_dir:
            # Every score, kept or not: pick another threshold later without scoring again.
            _ = (
                scored
                | "ScoreRows" >> beam.Map(_score_row)
                | "WriteScores"
                >> beam.io.WriteToParquet(
                    fileio.join(self._scores_dir, "part"),
                    schema=SCORES_SCHEMA,
                    file_name_suffix=".parquet",
                    codec="zstd",
                )
            )
        fn = _FilterFn(flow=False, pairs=True, undecodable=f"{STAGE}/{UNDECODABLE}")
        return stage.apply(scored, "Filter", fn, beam.pvalue.AsSingleton(threshold))


# ---------------------------------------------------------------------------------------------
# Shards in, shards out (`wit score`)


def _sample_image(sample: Mapping[str, Any]) -> bytes | None:
    for ext in IMAGE_EXTS:
        if sample.get(ext):
            return sample[ext]
    return None


def read_shard_records(tar_path: str) -> Iterable[dict[str, Any]]:
    """``{"shard", "key", "image", "caption"}`` per sample of a shard (caption: its ``KEY.txt``)."""
    name = tar_path.rsplit("/", 1)[-1][: -len(".tar")]
    for sample in shards.iter_samples(tar_path):
        caption = (sample.get("txt") or b"").decode("utf-8", errors="replace").strip()
        record = {
            "shard": name,
            "key": sample["__key__"],
            "image": _sample_image(sample),
            "caption": caption,
        }
        if record["image"] is None or not caption:
            record["reason"] = MISSING
        yield record


def scores_path(output_dir: str, shard: str) -> str:
    return fileio.join(output_dir, SCORES_DIR, f"{shard}.parquet")


def write_scores(
    output_dir: str, shard: str, items: Iterable[tuple[str, float | None]]
) -> tuple[str, dict[str, float | None]]:
    """Cache one shard's scores (``scores/NNNNN.parquet``: key, clip_score)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores = dict(sorted(items))
    table = pa.table(
        {"key": list(scores), SCORE_FIELD: pa.array(list(scores.values()), type=pa.float32())}
    )
    with fileio.atomic_write(scores_path(output_dir, shard), "wb") as f:
        pq.write_table(table, f)
    return shard, scores


def read_scores(output_dir: str, shard: str) -> tuple[str, dict[str, float | None]]:
    import pyarrow.parquet as pq

    with fileio.open_file(scores_path(output_dir, shard), "rb") as f:
        table = pq.read_table(f)
    return shard, dict(
        zip(table.column("key").to_pylist(), table.column(SCORE_FIELD).to_pylist(), strict=True)
    )


def _round_score(s: float | None) -> float | None:
    # float32 precision, written as a short decimal in KEY.json
    return None if s is None else float(np.float32(s))


def write_scored_shard(
    shard: str,
    scores: Mapping[str, float | None],
    threshold: float | None,
    *,
    input_dir: str,
    output_dir: str,
) -> stage.Result:
    """Rewrite one shard with ``clip_score`` added, dropping low scores (:func:`filter_scored`).

    Returns the filter's result over the shard's samples; ``outputs["infos"]`` holds the
    written shard's info.
    """
    import pyarrow.parquet as pq

    shard_id = int(shard)
    tar_path, parquet_path = shards.shard_paths(input_dir, shard_id)
    records, images = [], {}
    for sample in shards.iter_samples(tar_path):
        key = sample["__key__"]
        caption = (sample.get("txt") or b"").decode("utf-8", errors="replace")
        meta = json.loads(sample["json"]) if sample.get("json") else {}
        record = {"key": key, "url": meta.get("url"), "caption": caption, "meta": meta}
        record[SCORE_FIELD] = _round_score(scores.get(key))
        ext = next((e for e in IMAGE_EXTS if sample.get(e)), None)
        if ext is None or not caption.strip():
            record["reason"] = MISSING
            record["detail"] = "no image or no caption in the shard"
        else:
            images[key] = (sample[ext], ext)
        records.append(record)
    result = filter_scored(records, threshold)
    kept_samples = []
    for r in result.kept:
        meta = {**r["meta"], SCORE_FIELD: r[SCORE_FIELD]}
        image, ext = images[r["key"]]
        kept_samples.append(shards.Sample(r["key"], image, r["caption"], meta, image_ext=ext))
    kept_keys = {s.key for s in kept_samples}
    table = pq.read_table(parquet_path) if fileio.exists(parquet_path) else pa.table({})
    if "key" in table.column_names:
        keys = table.column("key").to_pylist()
        table = table.filter(pa.array([k in kept_keys for k in keys], type=pa.bool_()))
        col = [_round_score(scores.get(k)) for k in table.column("key").to_pylist()]
    elif table.num_rows == len(records) and table.num_rows:
        raise WitError(f"{parquet_path}: no key column to attach scores to")
    else:
        table = pa.Table.from_pylist([dict(s.meta) for s in kept_samples])
        col = [s.meta[SCORE_FIELD] for s in kept_samples]
    if SCORE_FIELD in table.column_names:
        table = table.drop_columns([SCORE_FIELD])
    table = table.append_column(SCORE_FIELD, pa.array(col, type=pa.float32()))
    info = shards.write_shard(fileio.join(output_dir, "shards"), shard_id, kept_samples, table)
    return dataclasses.replace(result, outputs={"infos": [info.to_dict()]})


class _WriteScoredShard(stage.StageFn):
    """``(shard, scores)`` and the threshold -> the scored shard, written; its samples counted."""

    def __init__(self, input_dir: str, output_dir: str):
        super().__init__(stage=STAGE, kept_as="none", outputs=("infos",))
        self._input_dir = input_dir
        self._output_dir = output_dir

    def core(self, kv, threshold):
        shard, scores = kv
        return write_scored_shard(
            shard, scores, threshold, input_dir=self._input_dir, output_dir=self._output_dir
        )


def _write_manifest(
    infos: list[dict[str, Any]], output_dir: str, config: Mapping[str, Any], threshold: float | None
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
    finite = threshold is not None and not math.isinf(threshold)
    shards.write_manifest(
        shard_dir,
        parsed,
        config=config,
        extra={"clip_score_threshold": threshold if finite else None},
    )
    return output_dir


def _score_items(kv: tuple[str, Mapping[str, float | None]]) -> list[float | None]:
    return list(kv[1].values())


def _key_by_shard(r: Mapping[str, Any]) -> tuple[str, tuple[str, float | None]]:
    return r["shard"], (r["key"], r.get(SCORE_FIELD))


def _has_reason(r: Mapping[str, Any]) -> bool:
    return bool(r.get("reason"))


def _no_reason(r: Mapping[str, Any]) -> bool:
    return not r.get("reason")


@dataclasses.dataclass(frozen=True)
class _ShardJob:
    shard: str
    tar: str


class ScoreShards(beam.PTransform):
    """``wit score``: a directory of finished shards -> scored (and filtered) shards.

    Applied to a pipeline (``p | ScoreShards(...)``). Output layout (``output_dir``):
    ``shards/NNNNN.{tar,parquet}`` (same shard ids), ``shards/manifest.json``,
    ``rejected/part-*.parquet``, ``scores/NNNNN.parquet`` (the per-shard score cache) and
    ``stats.json`` (``input == kept + dropped:*`` over samples).
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
        self._jobs = [_ShardJob(t.rsplit("/", 1)[-1][: -len(".tar")], t) for t in tars]
        self._check_score_cache()

    def _model_identity(self) -> dict[str, str]:
        return {"model": self._config.model, "pretrained": self._config.pretrained}

    def _check_score_cache(self) -> None:
        path = fileio.join(self._output_dir, SCORES_DIR, SCORES_MODEL_FILE)
        if fileio.exists(path):
            recorded = fileio.read_json(path)
            if recorded != self._model_identity():
                raise WitError(
                    f"{self._output_dir} holds scores from another seed model ({recorded}); "
                    f"choose another --output"
                )

    def expand(self, pbegin):
        cfg = self._config
        out = self._output_dir
        cached = [j for j in self._jobs if fileio.exists(scores_path(out, j.shard))]
        todo = [j for j in self._jobs if j not in cached]
        parts = []
        if todo:
            records = (
                pbegin
                | "ShardsToScore" >> beam.Create([j.tar for j in todo])
                | "ReadSamples" >> beam.FlatMap(read_shard_records)
                | "Reshuffle" >> beam.Reshuffle()
            )
            unscorable = records | "Unscorable" >> beam.Filter(_has_reason)
            scorer = ScoreWithClip(config=cfg, model_handler=self._handler)
            scored = records | "Scorable" >> beam.Filter(_no_reason) | "Score" >> scorer
            parts.append(
                (scored, unscorable)
                | "AllRecords" >> beam.Flatten()
                | "KeyByShard" >> beam.Map(_key_by_shard)
                | "GroupByShard" >> beam.GroupByKey()
                | "CacheScores" >> beam.Map(write_scores_to, out, self._model_identity())
            )
        if cached:
            parts.append(
                pbegin
                | "CachedShards" >> beam.Create([j.shard for j in cached])
                | "ReadCachedScores" >> beam.Map(read_scores_from, out)
            )
        per_shard = parts[0] if len(parts) == 1 else tuple(parts) | "AllShards" >> beam.Flatten()
        all_scores = per_shard | "ScoreValues" >> beam.FlatMap(_score_items)
        thr = compute_threshold(all_scores, config=cfg)
        written = stage.apply(
            per_shard,
            "WriteShards",
            _WriteScoredShard(self._input_dir, out),
            beam.pvalue.AsSingleton(thr),
        )
        _ = written[beam_utils.REJECTED] | "WriteRejected" >> stage.WriteRejected(
            fileio.join(out, stage.REJECTED_DIR)
        )
        stats = written[beam_utils.COUNTS] | "WriteStats" >> stage.WriteStats(
            fileio.join(out, stage.STATS_FILE),
            extra={"seed_model": self._model_identity()},
            stage=STAGE,
        )
        manifest = (
            written["infos"]
            | "CollectInfos" >> beam.combiners.ToList()
            | "WriteManifest"
            >> beam.Map(
                _write_manifest,
                out,
                {"score": config_lib.to_dict(cfg)},
                beam.pvalue.AsSingleton(thr),
            )
        )
        return {"stats": stats, "manifest": manifest}


def write_scores_to(
    kv: tuple[str, Iterable[tuple[str, float | None]]],
    output_dir: str,
    identity: Mapping[str, str],
):
    # The seed's identity goes beside the cache before any score does (idempotent), so a later
    # run with another seed cannot mix its scores in.
    fileio.write_json(fileio.join(output_dir, SCORES_DIR, SCORES_MODEL_FILE), dict(identity))
    return write_scores(output_dir, kv[0], kv[1])


def read_scores_from(shard: str, output_dir: str):
    return read_scores(output_dir, shard)
