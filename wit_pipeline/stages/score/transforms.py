"""Beam transforms of the score stage: ``wit build --seed-model`` and filtering scored records.

- :class:`ScoreSamples`: deduplicated samples in (before balancing), every pair scored, the
  threshold decided (``calibrate.decide``), pairs and samples filtered (``core.filter_pairs``);
- :class:`FilterByClipScore`: records with one caption and a ``clip_score`` -> kept, rejected
  (a fixed threshold, a top fraction, or none);
- :func:`write_score_doc`: the step's ``score.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import apache_beam as beam
import pyarrow as pa

from wit_pipeline import fileio, samples, stage
from wit_pipeline.config import ScoreConfig
from wit_pipeline.errors import WitError
from wit_pipeline.stages.score import calibrate, core
from wit_pipeline.stages.score.model import SCORE_FIELD, ScoreWithClip

SCORES_DIR = "scores"
SCORE_FILE = "score.json"  # the threshold and its estimates (wit build --seed-model, wit score)
# The scores table (``finalize/scores/``, ``wit score``'s ``scores/``): one row per pair, every
# pair, kept or not (``clip_score`` null where the image does not decode).
SCORES_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), (SCORE_FIELD, pa.float32())])


def model_identity(config: ScoreConfig) -> dict[str, str]:
    return {"model": config.model, "pretrained": config.pretrained}


def write_score_doc(
    decision: calibrate.Decision, path: str, identity: Mapping[str, Any]
) -> dict[str, Any]:
    """Write ``score.json`` (the seed's identity and ``decision.doc``); returns the document."""
    doc = {**dict(identity), **decision.doc}
    fileio.write_json(path, doc)
    return doc


# ---------------------------------------------------------------------------------------------
# Records with one caption (custom pipelines)


class _FilterFn(stage.StageFn):
    """Scored records and the threshold (a side input) -> kept and dropped ones."""

    def __init__(self):
        super().__init__(stage=core.STAGE)

    def core(self, record, threshold):
        return core.filter_scored([record], threshold)


def compute_threshold(scores, *, config: ScoreConfig):
    """A singleton PCollection holding the threshold of scored records (None keeps every
    scored record): ``score.threshold`` or the exact top ``score.keep_fraction``."""
    if config.mode == "auto":
        raise WitError(
            "score.threshold auto needs the null's embeddings: use ScoreSamples or ScoreShards"
        )
    if config.keep_fraction is not None:
        return (
            scores
            | "AllScores" >> beam.CombineGlobally(calibrate.ScoresToArray())
            | "TopFraction" >> beam.Map(calibrate.top_fraction_threshold, config.keep_fraction)
        )
    return scores.pipeline | "FixedThreshold" >> beam.Create([config.threshold])


class FilterByClipScore(beam.PTransform):
    """Scored records (one caption each) -> the stage outputs: ``kept``, ``rejected`` (with
    ``reason``), ``counts``. The threshold is ``score.threshold``, or the exact top
    ``score.keep_fraction``, or none (``auto`` needs :class:`ScoreSamples`: it is refused)."""

    def __init__(self, *, config: ScoreConfig):
        super().__init__()
        if config.mode == "auto":
            raise WitError(
                "FilterByClipScore takes a fixed threshold or a fraction; score.threshold auto "
                "needs the null's embeddings (ScoreSamples, ScoreShards)"
            )
        self._config = config

    def expand(self, pcoll):
        scores = pcoll | "Scores" >> beam.Map(lambda r: r.get(SCORE_FIELD))
        thr = compute_threshold(scores, config=self._config)
        return stage.apply(pcoll, "Filter", _FilterFn(), beam.pvalue.AsSingleton(thr))


# ---------------------------------------------------------------------------------------------
# Deduplicated samples in, scored samples out (`wit build --seed-model`)


class _AttachImagesFn(beam.DoFn):
    """``(download tar, samples)`` -> samples with their image bytes under ``image``."""

    def process(self, item):
        tar_path, records = item
        for r, image in samples.attach_images(tar_path, records):
            yield {**r, "image": image}


def _strip_image(r: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "image"}


class _ScoreImages(beam.PTransform):
    """``(download tar, samples)`` -> samples with per-pair ``clip_score`` (images read, scored,
    dropped)."""

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


class _PairFilterFn(stage.StageFn):
    """A scored sample and the decision (a side input) -> its kept pairs, or its drop."""

    def __init__(self, *, undecodable: str):
        super().__init__(stage=core.STAGE, flow=False, pairs=True)
        self._undecodable = undecodable

    def core(self, record, decision):
        return core.filter_pairs([record], decision.threshold, undecodable=self._undecodable)


class ScoreSamples(beam.PTransform):
    """Deduplicated samples -> samples whose every pair has ``clip_score``, filtered pair by pair.

    The images of the null are marked (``calibrate.MarkNullSamples``); the images are read from
    the download shards (each tar once, grouped by ``source_tar``), each image and each caption
    embedded once by :class:`ScoreWithClip` (Beam ``RunInference``; with ``score.accelerator``,
    on workers with that accelerator via a Beam resource hint, e.g. a GPU on Dataflow), the
    images dropped again before any shuffle. The threshold (``calibrate.DecideThreshold``:
    fixed, top fraction of pairs, auto, or none) and its estimates are written to
    ``threshold_path`` (``score.json``); with ``scores_dir``, every pair's score is written
    there as ``part-*.parquet`` (:data:`SCORES_SCHEMA`). Returns the stage outputs: ``kept``,
    ``rejected`` (dropped samples and, as partial rows, the pairs kept samples lost) and
    ``counts`` (drops only, over samples and pairs), and ``decision`` (the singleton
    ``calibrate.Decision``). ``undecodable_image`` is also a reason of dedup, in the same
    counters: here it is ``score/undecodable_image``.
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
            | "MarkNull" >> calibrate.MarkNullSamples(config=cfg)
            | "BySourceTar" >> beam.Map(lambda r: (r["source_tar"], r))
            | "GroupSourceTar" >> beam.GroupByKey()
            | "ClipScore" >> score_images
        )
        records = scored | "StripNull" >> beam.Map(calibrate.strip_null)
        candidates = scored | "NullCandidates" >> beam.FlatMap(
            calibrate.null_candidate, cfg.null_seed
        )
        pool = records | "PairScores" >> beam.FlatMap(core.pair_scores)
        decision = {"scores": pool, "candidates": candidates} | "Threshold" >> (
            calibrate.DecideThreshold(config=cfg)
        )
        _ = decision | "WriteScoreDoc" >> beam.Map(write_score_doc, self._path, model_identity(cfg))
        if self._scores_dir:
            # Every pair's score, kept or not: pick another threshold later without scoring.
            _ = (
                records
                | "ScoreRows" >> beam.FlatMap(core.score_rows)
                | "WriteScores"
                >> beam.io.WriteToParquet(
                    fileio.join(self._scores_dir, "part"),
                    schema=SCORES_SCHEMA,
                    file_name_suffix=".parquet",
                    codec="zstd",
                )
            )
        fn = _PairFilterFn(undecodable=f"{core.STAGE}/{core.UNDECODABLE}")
        out = stage.apply(records, "Filter", fn, beam.pvalue.AsSingleton(decision))
        return {**out, "decision": decision}
