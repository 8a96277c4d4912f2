"""``wit build``: crawl files in, training-ready shards out, as a chain of resumable steps.

Steps, each a Beam pipeline writing under ``DIR/`` (see docs/build.md for the layout):

1. ``gather`` (``DIR/gather/``): WARC/WAT/tables -> cleaned, query-matched candidate pairs.
2. ``prebalance`` (``DIR/prebalance/``): MetaCLIP balancing with oversampling, before download.
3. ``download`` (``DIR/download/``): img2dataset inside Beam, resumable shard by shard.
4. ``finalize`` (``DIR/shards/``, ``DIR/rejected/``, ``DIR/query_counts.parquet``, ...): dedup and
   decontamination, exact balancing, optional CLIP scoring, final shards: one pipeline
   (``finalize.Finalize``).
5. ``report`` (``DIR/stats.json``, ``DIR/report.md``, ``DIR/plots/``): whole-run counters, funnel
   and plots.

The chain is cut where a global barrier meets an expensive step, so that each cut is also a
checkpoint: pre-balancing needs every query's count over the whole gathered pool before the first
candidate can be drawn; the download plan needs the number of distinct URLs; dedup needs every
image hashed before any group is final. Inside a step the barriers are Beam side inputs; between
steps they are files on disk, so a crash in step 4 never redoes a crawl read or a download.

Every step records a completion marker ``DIR/done/<step>.json`` holding its *fingerprint*: a hash
of the options that decide its output and of the upstream step's fingerprint. A rerun skips steps
whose marker matches and resumes from the first unfinished one (the download step also resumes
inside itself, shard by shard). A rerun whose options differ is refused with one line, unless
``overwrite``, in which case the unchanged steps are kept and the rest is recomputed. Options that
only change how fast a step runs (download processes and threads, score batch size, device and
accelerator) are not part of any fingerprint.

``DIR/stats.json`` holds the whole run's counters over pairs (``input`` = pairs extracted by gather,
``kept`` = pairs in final samples, ``dropped:<reason>`` for every other pair, named after the
stage that dropped it), image-level counters, every stage's own counters and the funnel; the
invariant ``input == kept + sum(dropped:*)`` and the hand-offs between stages (each stage's input
is the previous one's output) are checked before it is written.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.pvalue import TaggedOutput

from wit_pipeline import beam_utils, config, fileio, queries, runners
from wit_pipeline import counters as counters_lib
from wit_pipeline.errors import WitError
from wit_pipeline.stages import balance
from wit_pipeline.stages import finalize as finalize_lib
from wit_pipeline.stages import score as score_lib
from wit_pipeline.stages.dedup import core as dedup
from wit_pipeline.stages.download import plan as download_plan
from wit_pipeline.stages.download import transforms as download_lib
from wit_pipeline.stages.gather import captions
from wit_pipeline.stages.gather import pairs as gather_pairs
from wit_pipeline.stages.gather import transforms as gather

STEPS = ("gather", "prebalance", "download", "finalize", "report")

BUILD_FILE = "build.json"
CONFIG_FILE = "config.yaml"
DONE_DIR = "done"
STATS_FILE = "stats.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
SCORE_FILE = "score.json"
SCORES_DIR = "scores"
BUILD_FORMAT = "wit-pipeline/build"
BUILD_VERSION = 1

# Where each step writes (relative to DIR). The finalize step writes the user-facing outputs at
# the top level and its own stats under finalize/.
STEP_OUTPUTS: dict[str, tuple[str, ...]] = {
    "gather": ("gather",),
    "prebalance": ("prebalance",),
    "download": ("download",),
    "finalize": (
        "finalize",
        finalize_lib.SHARDS_DIR,
        finalize_lib.REJECTED_DIR,
        finalize_lib.QUERY_COUNTS,
        finalize_lib.CONTAMINATION,
    ),
    "report": (STATS_FILE, REPORT_FILE, PLOTS_DIR),
}

# Drop reasons each stage can give (``dropped:<reason>``). A reason given by more than one stage
# is qualified with its stage in the whole-run counters (``prebalance/no_query``,
# ``balance/no_query``, ``dedup/undecodable_image``, ``score/undecodable_image``), so that every
# run-level name says which stage dropped the pair.
STAGE_REASONS: dict[str, tuple[str, ...]] = {
    "gather": (
        gather_pairs.NO_URL,
        gather_pairs.UNSUPPORTED_SCHEME,
        gather_pairs.BAD_URL,
        captions.NO_CAPTION,
        captions.BAD_ENCODING,
        captions.TOO_SHORT,
        captions.TOO_LONG,
        captions.TOO_FEW_WORDS,
        captions.TOO_MANY_WORDS,
        captions.LANGUAGE,
        captions.LANGUAGE_UNDETECTED,
        captions.LOW_LANGUAGE_SCORE,
        gather_pairs.NO_MATCH,
        gather_pairs.DUPLICATE,
    ),
    "prebalance": (balance.PREBALANCED_OUT, balance.NO_QUERY),
    "download": download_plan.REASONS,  # plus http_<status>
    "dedup": (
        dedup.UNDECODABLE,
        dedup.EVAL_CONTAMINATION,
        dedup.DUPLICATE_INPUT,
        dedup.NEAR_DUPLICATE,
    ),
    "balance": (balance.BALANCED_OUT, balance.NO_QUERY),
    "score": (score_lib.LOW_SCORE, score_lib.UNDECODABLE, score_lib.MISSING),
}
FINAL_STAGES = ("dedup", "balance", "score")  # the stages inside the finalize step


def _colliding_reasons() -> frozenset[str]:
    seen: collections.Counter[str] = collections.Counter()
    for reasons in STAGE_REASONS.values():
        seen.update(set(reasons))
    return frozenset(r for r, n in seen.items() if n > 1)


COLLIDING_REASONS = _colliding_reasons()


def run_reason(stage: str, reason: str) -> str:
    """The whole-run name of a stage's drop reason: qualified when another stage uses it too."""
    return f"{stage}/{reason}" if reason in COLLIDING_REASONS else reason


SCORES_SCHEMA = pa.schema([("key", pa.string()), ("clip_score", pa.float32())])

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"wit build: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Plan: inputs, fingerprints, the state of DIR


@dataclasses.dataclass(frozen=True)
class BuildInputs:
    """What a build reads, identified well enough to notice a change on rerun."""

    files: tuple[str, ...]
    identities: tuple[str, ...]  # per file: size and modification time (or object etag)
    queries_path: str
    queries_sha256: str
    queries_count: int
    seed_sha256: str = ""  # sha256 of a local seed checkpoint ("" for a tag or no seed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": list(self.files),
            "identities": list(self.identities),
            "queries": {
                "path": self.queries_path,
                "sha256": self.queries_sha256,
                "count": self.queries_count,
            },
            "seed_sha256": self.seed_sha256,
        }


def _abs(path: str) -> str:
    """Local paths made absolute (a rerun from another directory is the same build)."""
    if not fileio.is_local(path):
        return path
    return os.path.abspath(path[len("file://") :] if path.startswith("file://") else path)


def file_identity(path: str) -> str:
    """Size plus modification time (local) or etag/checksum (object stores) of a file.

    Cheap for terabytes of crawl files, unlike hashing them; a rewritten file with the same size
    is noticed (a copied one is too, which errs on the safe side).
    """
    if fileio.is_local(path):
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    info = fileio.filesystem(path).info(path)
    tag = next(
        (
            str(info[k])
            for k in ("etag", "ETag", "md5Hash", "crc32c", "mtime", "updated")
            if info.get(k)
        ),
        "",
    )
    return f"{info.get('size', '')}:{tag}"


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with fileio.open_file(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_inputs(
    inputs: Sequence[str], queries_path: str | None, cfg: config.BuildConfig
) -> BuildInputs:
    """Expand ``--input`` patterns, read the query list and identify the seed checkpoint."""
    files = [_abs(f) for f in fileio.expand_inputs(list(inputs))]
    qpath = _abs(queries_path) if queries_path else queries.default_queries_path()
    qlist = queries.load_queries(qpath)
    seed_sha = ""
    pretrained = cfg.score.pretrained
    if pretrained and fileio.exists(pretrained) and not os.path.isdir(pretrained):
        seed_sha = _file_sha256(pretrained)
    return BuildInputs(
        files=tuple(files),
        identities=tuple(file_identity(f) for f in files),
        queries_path=qpath,
        queries_sha256=queries.queries_sha256(qpath),
        queries_count=len(qlist),
        seed_sha256=seed_sha,
    )


def _without(d: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in names}


SCORE_EXECUTION_FIELDS = ("batch_size", "device", "accelerator")
# Options that change how fast a step runs, never what it computes (dotted names).
EXECUTION_ONLY = frozenset(
    [f"download.{f}" for f in download_plan.EXECUTION_ONLY_FIELDS]
    + [f"score.{f}" for f in SCORE_EXECUTION_FIELDS]
)


def step_options(cfg: config.BuildConfig, inputs: BuildInputs) -> dict[str, dict[str, Any]]:
    """Per step, the options that decide its output (execution-only options left out)."""
    c = config.to_dict(cfg)
    return {
        "gather": {
            "gather": c["gather"],
            "inputs": [[f, i] for f, i in zip(inputs.files, inputs.identities, strict=True)],
            "queries_sha256": inputs.queries_sha256,
        },
        "prebalance": {
            "balance": {
                k: c["balance"][k] for k in ("t", "seed", "prebalance_factor")
            },  # factor 0 disables the step; still part of what decides the result
        },
        "download": {"download": _without(c["download"], download_plan.EXECUTION_ONLY_FIELDS)},
        "finalize": {
            "dedup": c["dedup"],
            # balance.unit only when not the default, so earlier builds keep their fingerprint
            "balance": {
                k: c["balance"][k]
                for k in ("t", "seed", "unit")
                if k != "unit" or c["balance"][k] != "image"
            },
            "shards": c["shards"],
            "score": _without(c["score"], SCORE_EXECUTION_FIELDS),
            "seed_sha256": inputs.seed_sha256,
        },
        "report": {},
    }


def fingerprints(cfg: config.BuildConfig, inputs: BuildInputs) -> dict[str, str]:
    """``{step: hex digest}``; each digest covers the step's options and its upstream digest."""
    out: dict[str, str] = {}
    upstream = ""
    for step, opts in step_options(cfg, inputs).items():
        doc = json.dumps(
            {"step": step, "upstream": upstream, "options": opts}, sort_keys=True, default=str
        )
        upstream = out[step] = hashlib.sha256(doc.encode()).hexdigest()[:32]
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{name}."))
        else:
            out[name] = v
    return out


def describe_changes(
    old_cfg: Mapping[str, Any] | None,
    new_cfg: Mapping[str, Any],
    old_inputs: Mapping[str, Any] | None,
    new_inputs: Mapping[str, Any],
    *,
    limit: int = 4,
) -> str:
    """A short human list of what differs between two builds (for the refusal message)."""
    changes = []
    if old_inputs is not None:
        if old_inputs.get("files") != new_inputs.get("files"):
            changes.append("--input files")
        elif old_inputs.get("identities") != new_inputs.get("identities"):
            changes.append("--input file contents")
        if (old_inputs.get("queries") or {}).get("sha256") != new_inputs["queries"]["sha256"]:
            changes.append("--queries list")
        if old_inputs.get("seed_sha256", "") != new_inputs.get("seed_sha256", ""):
            changes.append("seed model file")
    if old_cfg is not None:
        a, b = _flatten(old_cfg), _flatten(new_cfg)
        for key in sorted(set(a) | set(b)):
            if key.startswith("queries.") or key in EXECUTION_ONLY:
                continue
            if a.get(key) != b.get(key):
                changes.append(f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}")
    if not changes:
        return "settings changed"
    more = f", and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(changes[:limit]) + more


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


@dataclasses.dataclass
class StepState:
    name: str
    fingerprint: str
    done: bool  # marker present with this fingerprint


def _done_path(output: str, step: str) -> str:
    return fileio.join(output, DONE_DIR, f"{step}.json")


def read_marker(output: str, step: str) -> dict[str, Any] | None:
    path = _done_path(output, step)
    if not fileio.exists(path):
        return None
    try:
        return fileio.read_json(path)
    except (ValueError, OSError):
        return None


def write_marker(output: str, step: str, fingerprint: str, info: Mapping[str, Any]) -> None:
    fileio.write_json(
        _done_path(output, step), {"step": step, "fingerprint": fingerprint, **dict(info)}
    )


def _remove(path: str) -> None:
    if not fileio.exists(path):
        return
    if fileio.is_local(path):
        import shutil

        p = path[len("file://") :] if path.startswith("file://") else path
        if os.path.isdir(p):
            shutil.rmtree(p)
        else:
            os.remove(p)
    else:
        fileio.filesystem(path).rm(path, recursive=True)


def clear_step(output: str, step: str) -> None:
    """Remove a step's marker, then its outputs."""
    _remove(_done_path(output, step))
    for rel in STEP_OUTPUTS[step]:
        _remove(fileio.join(output, rel))


def _dir_has_files(path: str) -> bool:
    if not fileio.exists(path):
        return False
    if fileio.is_local(path):
        return bool(os.listdir(path))
    return bool(fileio.filesystem(path).ls(path, detail=False))


def prepare_output(
    output: str,
    cfg: config.BuildConfig,
    inputs: BuildInputs,
    *,
    overwrite: bool = False,
    log: Log = _stderr,
) -> list[StepState]:
    """Check ``DIR`` against this build, clear stale steps, write config.yaml and build.json.

    Returns the state of every step (done or to run). Raises ``WitError`` (one line) when DIR
    holds a build with other settings and ``overwrite`` is false, or holds files that are not a
    build at all.
    """
    fps = fingerprints(cfg, inputs)
    build_path = fileio.join(output, BUILD_FILE)
    new_inputs = inputs.to_dict()
    old_fps: dict[str, str] = {}
    if fileio.exists(build_path):
        previous = fileio.read_json(build_path)
        old_fps = dict(previous.get("fingerprints") or {})
        changed = [s for s in STEPS if old_fps.get(s) != fps[s]]
        if changed:
            old_cfg = None
            cfg_path = fileio.join(output, CONFIG_FILE)
            if fileio.exists(cfg_path):
                try:
                    old_cfg = config.to_dict(config.load_config(cfg_path))
                except WitError:
                    old_cfg = None
            what = describe_changes(
                old_cfg, config.to_dict(cfg), previous.get("inputs"), new_inputs
            )
            if not overwrite:
                raise WitError(
                    f"{output} holds a build with other settings ({what}); rerun with "
                    f"--overwrite to rebuild from step {changed[0]}, or choose another --output"
                )
            log(f"settings changed ({what}): rebuilding from step {changed[0]}")
    elif _dir_has_files(output):
        raise WitError(
            f"{output} is not empty and holds no {BUILD_FILE}: choose an empty or new --output"
        )
    # A step is done when its marker holds this build's fingerprint. From the first step that is
    # not done on, every step runs: outputs made with other options are removed (they cannot be
    # resumed), the partial outputs of an interrupted run with the same options are left to the
    # step, which resumes (download: finished shards) or rewrites them (gather, prebalance);
    # finalize and report are cheap and start clean.
    states: list[StepState] = []
    stale = False
    for step in STEPS:
        marker = read_marker(output, step)
        done = not stale and marker is not None and marker.get("fingerprint") == fps[step]
        if not done:
            stale = True
            other = old_fps.get(step) not in (None, fps[step]) or (
                marker is not None and marker.get("fingerprint") != fps[step]
            )
            if other or step in ("finalize", "report"):
                clear_step(output, step)
            else:
                _remove(_done_path(output, step))
        states.append(StepState(step, fps[step], done))
    if all(st.done for st in states):
        return states  # nothing to run: leave the directory exactly as it is
    fileio.makedirs(output)
    import yaml

    with fileio.atomic_write(fileio.join(output, CONFIG_FILE), "w") as f:
        f.write("# The resolved wit build config of this directory (docs/build.md).\n")
        yaml.safe_dump(config.to_dict(cfg), f, sort_keys=False, allow_unicode=True)
    fileio.write_json(
        build_path,
        {
            "format": BUILD_FORMAT,
            "version": BUILD_VERSION,
            "steps": list(STEPS),
            "fingerprints": fps,
            "inputs": new_inputs,
        },
    )
    return states


# ---------------------------------------------------------------------------------------------
# Scoring inside the finalize pipeline


class _AttachImagesFn(beam.DoFn):
    """``(download tar, samples)`` -> samples with their image bytes under ``image``."""

    def process(self, item):
        tar_path, records = item
        records = list(records)
        wanted = {(r.get("image_key") or r["key"]): (r.get("image_ext") or "jpg") for r in records}
        found = dict(dedup.iter_tar_members(tar_path, wanted))
        for r in records:
            image_key = r.get("image_key") or r["key"]
            if image_key not in found:
                raise WitError(f"image {image_key} not found in {tar_path} (input changed?)")
            yield {**r, "image": found[image_key]}


def _strip_image(r: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in r.items() if k != "image"}
    s = out.get(score_lib.SCORE_FIELD)
    out[score_lib.SCORE_FIELD] = None if s is None else float(np.float32(s))
    return out


def _threshold_doc(threshold: float | None, path: str, identity: Mapping[str, Any]) -> str:
    finite = threshold is not None and not math.isinf(threshold)
    fileio.write_json(path, {**dict(identity), "threshold": float(threshold) if finite else None})
    return path


class _ScoreFilterFn(beam.DoFn):
    """Keep samples at or above the threshold; count drops over samples and pairs."""

    def process(self, record, threshold):
        counter: counters_lib.Counter = counters_lib.Counter()
        if score_lib.filter_scored([record], threshold, counter):
            yield record
            return
        reason = run_reason("score", record["reason"])
        s = record.get(score_lib.SCORE_FIELD)
        detail = (
            f"clip_score {s:.4f} < threshold {threshold:.4f}"
            if reason == score_lib.LOW_SCORE and s is not None and threshold is not None
            else "the seed model could not read the image"
        )
        yield TaggedOutput(beam_utils.REJECTED, dedup.rejected_row(record, reason, detail=detail))
        yield from beam_utils.emit_counts(
            {
                counters_lib.dropped(reason): 1,
                dedup.pair_counter(counters_lib.dropped(reason)): len(record["pairs"]),
            }
        )


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


class ScoreSamples(beam.PTransform):
    """Balanced samples -> samples with ``clip_score``, filtered by threshold or top fraction.

    The images are read from the download shards (each tar once, grouped by ``source_tar``),
    scored by ``score.ScoreWithClip`` (Beam ``RunInference``; with ``accelerator`` set, on
    workers with that accelerator via a Beam resource hint, e.g. a GPU on Dataflow), then
    dropped again before any shuffle. The threshold is ``cfg.threshold``, or the exact top
    ``cfg.keep_fraction`` over all scores, or none (every sample keeps its score); it is written
    to ``threshold_path``; with ``scores_dir``, every sample's score is written there as
    ``part-*.parquet`` (``key``, ``clip_score``). Returns a dict: ``kept``, ``rejected`` (rows
    of ``rejected/``) and ``counts`` (drops only, over samples and pairs: input and kept are
    counted where samples enter and leave the finalize pipeline).
    """

    def __init__(
        self,
        *,
        cfg: config.ScoreConfig,
        threshold_path: str,
        scores_dir: str = "",
        model_handler: Any = None,
    ):
        super().__init__()
        score_lib.validate_filter(cfg.threshold, cfg.keep_fraction)
        if not cfg.pretrained and model_handler is None:
            raise WitError("the score step needs a seed model (--seed-model)")
        self._cfg = cfg
        self._path = threshold_path
        self._scores_dir = scores_dir
        self._handler = model_handler

    def expand(self, samples):
        cfg = self._cfg
        scorer = (
            score_lib.ScoreWithClip(model_handler=self._handler)
            if self._handler is not None
            else score_lib.ScoreWithClip.from_config(cfg)
        )
        score_images = _ScoreImages(scorer)
        if cfg.accelerator:
            # Reading the images sits inside the hinted part too: on Dataflow the GPU workers
            # read them from the download shards, and only metadata crosses to them.
            score_images = score_images.with_resource_hints(accelerator=cfg.accelerator)
        scored = (
            samples
            | "BySourceTar" >> beam.Map(lambda r: (r["source_tar"], r))
            | "GroupSourceTar" >> beam.GroupByKey()
            | "ClipScore" >> score_images
        )
        threshold = score_lib.compute_threshold(
            scored | "Scores" >> beam.Map(lambda r: r.get(score_lib.SCORE_FIELD)),
            threshold=cfg.threshold,
            keep_fraction=cfg.keep_fraction,
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
                | "ScoreRows"
                >> beam.Map(lambda r: {"key": r["key"], "clip_score": r[score_lib.SCORE_FIELD]})
                | "WriteScores"
                >> beam.io.WriteToParquet(
                    fileio.join(self._scores_dir, "part"),
                    schema=SCORES_SCHEMA,
                    file_name_suffix=".parquet",
                    codec="zstd",
                )
            )
        out = scored | "Filter" >> beam.ParDo(
            _ScoreFilterFn(), beam.pvalue.AsSingleton(threshold)
        ).with_outputs(beam_utils.COUNTS, beam_utils.REJECTED, main="kept")
        return {
            "kept": out.kept,
            "rejected": out[beam_utils.REJECTED],
            "counts": out[beam_utils.COUNTS],
        }


# ---------------------------------------------------------------------------------------------
# Steps


@dataclasses.dataclass
class StepContext:
    output: str
    cfg: config.BuildConfig
    inputs: BuildInputs
    beam_args: list[str]
    runner: str | None
    log: Log


def _step_dir(ctx: StepContext, step: str) -> str:
    return fileio.join(ctx.output, step)


def _run_gather(ctx: StepContext) -> dict[str, Any]:
    doc = gather.run_gather(
        list(ctx.inputs.files),
        _step_dir(ctx, "gather"),
        config=ctx.cfg.gather,
        queries_path=ctx.inputs.queries_path,
        beam_args=ctx.beam_args,
        runner=ctx.runner,
    )
    c = doc["counters"]
    ctx.log(f"gather: {c.get('kept', 0):,} of {c.get('input', 0):,} pairs kept")
    if not c.get("kept"):
        raise WitError(
            f"gather kept no pairs (see {_step_dir(ctx, 'gather')}/stats.json): nothing to build"
        )
    return {"kept": c.get("kept", 0)}


def _prebalance_enabled(cfg: config.BuildConfig) -> bool:
    return cfg.balance.prebalance_factor > 0


def _run_prebalance(ctx: StepContext) -> dict[str, Any]:
    if not _prebalance_enabled(ctx.cfg):
        ctx.log("prebalance: disabled (balance.prebalance_factor = 0)")
        return {"enabled": False}
    doc = finalize_lib.run_prebalance(
        _step_dir(ctx, "gather"),
        _step_dir(ctx, "prebalance"),
        ctx.cfg,
        queries_path=ctx.inputs.queries_path,
        beam_args=ctx.beam_args,
        runner=ctx.runner,
    )
    c = doc["counters"]
    ctx.log(f"prebalance: {c.get('kept', 0):,} of {c.get('input', 0):,} pairs kept")
    if not c.get("kept"):
        raise WitError("pre-balance kept no pairs (no candidate matches a query): nothing to build")
    return {"enabled": True, "kept": c.get("kept", 0)}


def _candidates_dir(ctx: StepContext) -> str:
    return _step_dir(ctx, "prebalance" if _prebalance_enabled(ctx.cfg) else "gather")


def _beam_args(ctx: StepContext, processes: int = 1) -> list[str]:
    args = list(ctx.beam_args)
    if ctx.runner:
        args = [a for a in args if not a.startswith("--runner")] + [f"--runner={ctx.runner}"]
    return beam_utils.local_parallelism(args, processes)


def add_download(
    p: beam.Pipeline, *, files: Sequence[str], output_dir: str, cfg: config.DownloadConfig
) -> None:
    """Add the download step to ``p``: candidate Parquet files -> ``output_dir``'s shards."""
    _ = (
        p
        | "ReadCandidates" >> download_lib.ReadCandidates(files=files)
        | "DownloadImages" >> download_lib.DownloadImages(output_dir=output_dir, config=cfg)
    )


def _run_download(ctx: StepContext) -> dict[str, Any]:
    out = _step_dir(ctx, "download")
    stats = run_download(
        _candidates_dir(ctx),
        out,
        ctx.cfg.download,
        beam_args=ctx.beam_args,
        runner=ctx.runner,
        log=ctx.log,
    )
    urls_c, pairs_c = stats["url_counters"], stats["counters"]
    ctx.log(
        f"download: {urls_c.get('kept', 0):,} of {urls_c.get('input', 0):,} images, "
        f"{pairs_c.get('kept', 0):,} of {pairs_c.get('input', 0):,} pairs"
    )
    if not urls_c.get("kept"):
        ctx.log(f"download: no image was downloaded (reasons: {out}/rejected/, the report)")
    return {"resumed_shards": stats["resumed_shards"]}


def _query_count_columns(ctx: StepContext) -> dict[str, dict[int, int]]:
    """``before`` and ``after_prebalance`` per query, from the earlier steps' files."""
    if _prebalance_enabled(ctx.cfg):
        cols = balance.read_query_counts(
            fileio.join(_step_dir(ctx, "prebalance"), finalize_lib.QUERY_COUNTS)
        )
        return {
            "before": cols.get("before", {}),
            "after_prebalance": cols.get("after_prebalance", {}),
        }
    stats = fileio.read_json(fileio.join(_step_dir(ctx, "gather"), gather.STATS_FILE))
    before = {int(q): int(n) for q, n in (stats.get("query_counts") or {}).items()}
    return {"before": before, "after_prebalance": dict(before)}  # nothing is pre-balanced


def add_finalize(
    p: beam.Pipeline,
    *,
    output: str,
    cfg: config.BuildConfig,
    tars: Sequence[str],
    query_columns: Mapping[str, Mapping[int, int]],
    queries_path: str = "",
) -> None:
    """Add the finalize step to ``p``: download shard tars -> ``output``'s final outputs.

    ``finalize.Finalize`` (dedup, decontamination, balance, shards) with the CLIP-score stage
    plugged in when ``cfg.score.pretrained`` is set, the ``before``/``after_prebalance``
    query-count columns given, and the step's counters written to ``output/finalize/``.
    """
    stage_dir = fileio.join(output, "finalize")
    paths = p | "Tars" >> beam.Create(list(tars), reshuffle=False)
    extra = {
        name: p | f"QueryCounts[{name}]" >> beam.Create(sorted(col.items()), reshuffle=False)
        for name, col in query_columns.items()
    }
    scorer = None
    if cfg.score.pretrained:
        scorer = ScoreSamples(
            cfg=cfg.score,
            threshold_path=fileio.join(stage_dir, SCORE_FILE),
            scores_dir=fileio.join(stage_dir, SCORES_DIR),
        )
    out = paths | "Finalize" >> finalize_lib.Finalize(
        output_dir=output,
        cfg=cfg,
        queries_path=queries_path,
        extra_counts=extra,
        scorer=scorer,
    )
    _ = out["counts"] | "Stats" >> finalize_lib.WriteStageStats(
        fileio.join(stage_dir, STATS_FILE), collapse=cfg.dedup.collapse, extra={}
    )


def _run_finalize(ctx: StepContext) -> dict[str, Any]:
    cfg = ctx.cfg
    tars = finalize_lib.download_tars([_step_dir(ctx, "download")])
    stage_dir = _step_dir(ctx, "finalize")
    fileio.makedirs(stage_dir)
    stats_path = fileio.join(stage_dir, STATS_FILE)
    threshold_path = fileio.join(stage_dir, SCORE_FILE)
    scoring = bool(cfg.score.pretrained)
    options = beam_utils.pipeline_options(_beam_args(ctx))
    with beam.Pipeline(options=options) as p:
        add_finalize(
            p,
            output=ctx.output,
            cfg=cfg,
            tars=tars,
            query_columns=_query_count_columns(ctx),
            queries_path=ctx.inputs.queries_path,
        )
    doc = fileio.read_json(stats_path)
    counters_lib.check_balanced(doc["counters"], stage="finalize")
    counters_lib.check_balanced(doc["pair_counters"], stage="finalize (pairs)")
    shards_dir = fileio.join(ctx.output, finalize_lib.SHARDS_DIR)
    manifest_path = fileio.join(shards_dir, "manifest.json")
    manifest = fileio.read_json(manifest_path)
    if scoring:
        sc = fileio.read_json(threshold_path)
        manifest["clip_score_threshold"] = sc["threshold"]
        manifest["seed_model"] = {"model": sc["model"], "pretrained": sc["pretrained"]}
        fileio.write_json(manifest_path, manifest)
    ctx.log(
        f"finalize: {manifest['num_samples']:,} samples in {manifest['num_shards']} shard(s) "
        f"-> {shards_dir}"
    )
    return {"samples": manifest["num_samples"], "shards": manifest["num_shards"]}


def _run_report(ctx: StepContext) -> dict[str, Any]:
    from wit_pipeline import report

    doc = write_run_stats(ctx.output)
    path = report.write_report(ctx.output)
    ctx.log(
        f"report: {doc['counters']['kept']:,} of {doc['counters']['input']:,} pairs kept -> {path}"
    )
    return {}


_RUNNERS: dict[str, Callable[[StepContext], dict[str, Any]]] = {
    "gather": _run_gather,
    "prebalance": _run_prebalance,
    "download": _run_download,
    "finalize": _run_finalize,
    "report": _run_report,
}


# ---------------------------------------------------------------------------------------------
# Whole-run stats


def _counter_dict(d: Mapping[str, Any] | None) -> dict[str, int]:
    return {str(k): int(v) for k, v in (d or {}).items()}


def _stage_row(
    stage: str, counts: Mapping[str, int], *, unit: str, reasons: Mapping[str, int]
) -> dict[str, Any]:
    return {
        "stage": stage,
        "unit": unit,
        "input": int(counts.get(counters_lib.INPUT, 0)),
        "kept": int(counts.get(counters_lib.KEPT, 0)),
        "dropped": {run_reason(stage, r): int(n) for r, n in sorted(reasons.items()) if n},
    }


def _final_stage_of(reason: str) -> str:
    """Which stage of the finalize step gave ``reason``.

    Inside that step dedup and balance count their own reason names, and the score stage
    qualifies the names it shares with them (``score/undecodable_image``).
    """
    stage, sep, _ = reason.partition("/")
    if sep and stage in FINAL_STAGES:
        return stage
    for stage in FINAL_STAGES:
        if reason in STAGE_REASONS[stage]:
            return stage
    raise AssertionError(f"finalize counted an unknown drop reason {reason!r}")


def _split_final(
    counts: Mapping[str, int], stages: Sequence[str] = FINAL_STAGES
) -> list[tuple[str, dict[str, int]]]:
    """The finalize step's counters as consecutive dedup, balance (and score) stages."""
    by_stage: dict[str, dict[str, int]] = {s: {} for s in stages}
    for reason, n in counters_lib.drop_reasons(counts).items():
        stage = _final_stage_of(reason)
        if stage not in by_stage:
            raise AssertionError(f"finalize counted {reason!r} but ran no {stage} stage")
        base = reason.split("/", 1)[1] if reason.startswith(f"{stage}/") else reason
        by_stage[stage][base] = n
    out = []
    n_in = int(counts.get(counters_lib.INPUT, 0))
    for stage in stages:
        dropped = sum(by_stage[stage].values())
        c = {counters_lib.INPUT: n_in, counters_lib.KEPT: n_in - dropped}
        c.update({counters_lib.dropped(r): n for r, n in by_stage[stage].items()})
        out.append((stage, c))
        n_in -= dropped
    if n_in != int(counts.get(counters_lib.KEPT, 0)):
        raise AssertionError(f"finalize counters do not chain: {dict(counts)}")
    return out


def _check_handoff(upstream: str, kept: int, downstream: str, n_in: int, unit: str) -> None:
    if kept != n_in:
        raise AssertionError(
            f"{unit}s lost between steps: {upstream} kept {kept:,}, {downstream} read {n_in:,}"
        )


def compose_stats(
    *,
    gather_doc: Mapping[str, Any],
    prebalance_doc: Mapping[str, Any] | None,
    download_doc: Mapping[str, Any],
    finalize_doc: Mapping[str, Any],
    scored: bool = False,
) -> dict[str, Any]:
    """The whole run's counters from the steps' ``stats.json`` documents (pure).

    ``prebalance_doc`` is None when pre-balancing is off; ``scored`` says whether the finalize
    step ran the CLIP-score stage (it then appears in the funnel, even when it dropped nothing).

    ``counters`` is over pairs: input = pairs extracted by gather, kept = pairs in final samples,
    every other pair under the reason of the stage that dropped it. ``image_counters`` is over
    images (input = distinct URLs handed to download; absent with ``dedup.collapse = false``,
    where samples are pairs). ``funnel`` lists each stage's input, kept and drops; ``stages`` the
    steps' own counters. Raises ``AssertionError`` when a hand-off or the invariant fails.
    """
    g = _counter_dict(gather_doc["counters"])
    stages: dict[str, Any] = {
        "gather": {
            "unit": "pair",
            "counters": g,
            "read_counters": _counter_dict(gather_doc.get("read_counters")),
        }
    }
    pair_rows = [_stage_row("gather", g, unit="pair", reasons=counters_lib.drop_reasons(g))]
    last_stage, last_kept = "gather", g.get(counters_lib.KEPT, 0)
    if prebalance_doc is not None:
        pb = _counter_dict(prebalance_doc["counters"])
        _check_handoff(last_stage, last_kept, "prebalance", pb.get(counters_lib.INPUT, 0), "pair")
        stages["prebalance"] = {"unit": "pair", "counters": pb}
        pair_rows.append(
            _stage_row("prebalance", pb, unit="pair", reasons=counters_lib.drop_reasons(pb))
        )
        last_stage, last_kept = "prebalance", pb.get(counters_lib.KEPT, 0)
    dl = _counter_dict(download_doc["counters"])
    dl_urls = _counter_dict(download_doc["url_counters"])
    _check_handoff(last_stage, last_kept, "download", dl.get(counters_lib.INPUT, 0), "pair")
    stages["download"] = {"unit": "pair", "counters": dl, "url_counters": dl_urls}
    pair_rows.append(_stage_row("download", dl, unit="pair", reasons=counters_lib.drop_reasons(dl)))
    fin_pairs = _counter_dict(finalize_doc["pair_counters"])
    collapse = finalize_doc.get("unit", "image") == "image"
    fin_images = _counter_dict(finalize_doc["counters"]) if collapse else None
    _check_handoff(
        "download", dl.get(counters_lib.KEPT, 0), "dedup", fin_pairs.get("input", 0), "pair"
    )
    final_stages = FINAL_STAGES if scored else FINAL_STAGES[:-1]
    for stage, c in _split_final(fin_pairs, final_stages):
        pair_rows.append(_stage_row(stage, c, unit="pair", reasons=counters_lib.drop_reasons(c)))
    image_rows = [
        _stage_row("download", dl_urls, unit="image", reasons=counters_lib.drop_reasons(dl_urls))
    ]
    stages["finalize"] = {"unit": "pair", "pair_counters": fin_pairs}
    if fin_images is not None:
        stages["finalize"]["image_counters"] = fin_images
        _check_handoff(
            "download",
            dl_urls.get(counters_lib.KEPT, 0),
            "dedup",
            fin_images.get(counters_lib.INPUT, 0),
            "image",
        )
        for stage, c in _split_final(fin_images, final_stages):
            image_rows.append(
                _stage_row(stage, c, unit="image", reasons=counters_lib.drop_reasons(c))
            )

    def whole(rows: list[dict[str, Any]], what: str) -> dict[str, int]:
        total: dict[str, int] = {
            counters_lib.INPUT: rows[0]["input"],
            counters_lib.KEPT: rows[-1]["kept"],
        }
        owner: dict[str, str] = {}
        for row in rows:
            for name, n in row["dropped"].items():
                key = counters_lib.dropped(name)
                if key in owner and owner[key] != row["stage"]:
                    raise AssertionError(
                        f"drop reason {name!r} given by {owner[key]} and {row['stage']}"
                    )
                owner[key] = row["stage"]
                total[key] = total.get(key, 0) + n
        counters_lib.check_balanced(total, stage=f"whole run ({what})")
        return dict(sorted(total.items()))

    doc: dict[str, Any] = {
        "unit": "pair",
        "counters": whole(pair_rows, "pairs"),
        "image_counters": whole(image_rows, "images") if fin_images is not None else None,
        "funnel": {"pairs": pair_rows, "images": image_rows if fin_images is not None else None},
        "stages": stages,
        "reason_stage": {
            counters_lib.dropped(name): row["stage"]
            for rows in (pair_rows, image_rows)
            for row in rows
            for name in row["dropped"]
        },
    }
    return doc


def write_run_stats(output: str) -> dict[str, Any]:
    """Compose ``DIR/stats.json`` from the steps' files, check it and write it."""

    def read(*parts: str) -> dict[str, Any]:
        return fileio.read_json(fileio.join(output, *parts))

    build_doc = read(BUILD_FILE)
    cfg = config.load_config(fileio.join(output, CONFIG_FILE))
    gather_doc = read("gather", gather.STATS_FILE)
    prebalance_doc = read("prebalance", STATS_FILE) if _prebalance_enabled(cfg) else None
    download_doc = read("download", download_lib.STATS_FILE)
    finalize_doc = read("finalize", STATS_FILE)
    doc = compose_stats(
        gather_doc=gather_doc,
        prebalance_doc=prebalance_doc,
        download_doc=download_doc,
        finalize_doc=finalize_doc,
        scored=bool(cfg.score.pretrained),
    )
    manifest = read(finalize_lib.SHARDS_DIR, "manifest.json")
    samples = (doc["image_counters"] or doc["counters"])[counters_lib.KEPT]
    if manifest["num_samples"] != samples:
        raise AssertionError(
            f"the manifest lists {manifest['num_samples']} samples, the counters {samples}"
        )
    extra: dict[str, Any] = {
        "samples": manifest["num_samples"],
        "shards": manifest["num_shards"],
        "train_data": (
            fileio.join(finalize_lib.SHARDS_DIR, manifest["train_data"])
            if manifest["train_data"]
            else ""
        ),
        "queries": build_doc["inputs"]["queries"],
        "inputs": {"files": build_doc["inputs"]["files"]},
        "config": config.to_dict(cfg),
    }
    contamination = fileio.join(output, finalize_lib.CONTAMINATION)
    if fileio.exists(contamination):
        c = fileio.read_json(contamination)
        extra["contamination"] = {
            "sets_hit": c["sets_hit"],
            "contaminated_samples": c["contaminated_samples"],
            "eval_sets": {
                name: {k: v[k] for k in ("images", "contaminated_samples", "eval_images_hit")}
                for name, v in c["eval_sets"].items()
            },
        }
    if "clip_score_threshold" in manifest:
        extra["score"] = {
            "threshold": manifest["clip_score_threshold"],
            "seed_model": manifest.get("seed_model"),
        }
    doc.update(extra)
    fileio.write_json(fileio.join(output, STATS_FILE), doc)
    return doc


# ---------------------------------------------------------------------------------------------
# Entry point


def validate(cfg: config.BuildConfig) -> config.BuildConfig:
    """Check every option that would otherwise fail late (after hours of download).

    Returns the config with ``score.model`` filled from a trainer checkpoint when omitted.
    """
    captions.validate_caption_config(cfg.gather.captions)
    download_plan.validate_config(cfg.download)
    if cfg.balance.t <= 0:
        raise WitError("balance.t must be > 0")
    if cfg.balance.prebalance_factor < 0:
        raise WitError("balance.prebalance_factor must be >= 0 (0 disables pre-balancing)")
    if cfg.balance.unit not in balance.UNITS:
        raise WitError(f"balance.unit must be one of {', '.join(balance.UNITS)}")
    if cfg.shards.samples_per_shard < 1:
        raise WitError("shards.samples_per_shard must be >= 1")
    dedup.bands_for(cfg.dedup.max_distance)
    for spec in cfg.dedup.eval_sets:
        es = dedup.parse_eval_set(spec)
        if not dedup.list_eval_items(es):
            raise WitError(f"eval set {spec!r} holds no images")
    score_lib.validate_filter(cfg.score.threshold, cfg.score.keep_fraction)
    sc = cfg.score
    if not sc.pretrained and (sc.threshold is not None or sc.keep_fraction is not None):
        raise WitError("score.threshold/keep_fraction need a seed model (--seed-model)")
    if sc.pretrained:
        from wit_pipeline import models

        # Load once here: a missing file, a wrong architecture or an unreachable tag is a
        # one-line error before the first step, not a worker failure after the download.
        loaded = models.load_model(sc.model or None, sc.pretrained, device="cpu")
        if not sc.model:
            cfg = config.override(cfg, "score.model", loaded.model_name)
        del loaded
    return cfg


def worker_paths(
    inputs: Sequence[str], output: str, cfg: config.BuildConfig, queries_path: str | None
) -> list[tuple[str, str]]:
    """``(what, path)`` for every file a build's workers read or write (``runners``)."""
    out = [("--input", p) for p in inputs] + [("--output", output)]
    out.append(
        ("--queries", queries_path)
        if queries_path
        else ("the shipped query list (no --queries)", queries.default_queries_path())
    )
    out += [("eval set", dedup.parse_eval_set(s).path) for s in cfg.dedup.eval_sets]
    if runners.looks_like_path(cfg.score.pretrained):
        out.append(("score.pretrained (--seed-model)", cfg.score.pretrained))
    out.append(("gather.captions.fasttext_model", cfg.gather.captions.fasttext_model))
    out.append(("download.ca_bundle", cfg.download.ca_bundle))
    return out


def run_build(
    inputs: Sequence[str],
    output: str,
    cfg: config.BuildConfig,
    *,
    queries_path: str | None = None,
    beam_args: Sequence[str] = (),
    runner: str | None = None,
    overwrite: bool = False,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Run (or resume) a build into ``output``; returns the whole-run ``stats.json`` document.

    On a runner whose workers do not share this machine's files (Dataflow, Flink, Spark), every
    path the workers use must be a URL they can read, and Dataflow needs the package shipped
    (``runners``): both are checked first, with one-line errors.
    """
    output = _abs(output)
    where = runners.runner_of(beam_args, runner)
    runners.check_worker_package(where, beam_args)
    runners.check_worker_paths(where, beam_args, worker_paths(inputs, output, cfg, queries_path))
    cfg = validate(cfg)
    build_inputs = resolve_inputs(inputs, queries_path, cfg)
    states = prepare_output(output, cfg, build_inputs, overwrite=overwrite, log=log)
    ctx = StepContext(
        output=output,
        cfg=cfg,
        inputs=build_inputs,
        beam_args=list(beam_args),
        runner=runner,
        log=log,
    )
    for i, st in enumerate(states, 1):
        prefix = f"[{i}/{len(states)}] {st.name}"
        if st.done:
            log(f"{prefix}: done (skipped)")
            continue
        log(f"{prefix} ...")
        started = time.monotonic()
        info = _RUNNERS[st.name](ctx)
        write_marker(
            output,
            st.name,
            st.fingerprint,
            {**info, "elapsed_s": round(time.monotonic() - started, 3)},
        )
    return fileio.read_json(fileio.join(output, STATS_FILE))


def step_status(output: str) -> dict[str, dict[str, Any] | None]:
    """``{step: marker or None}`` for a build directory (what a rerun would skip)."""
    return {s: read_marker(output, s) for s in STEPS}


def run_download(
    candidates: str,
    output: str,
    cfg: config.DownloadConfig,
    *,
    beam_args: Sequence[str] = (),
    runner: str | None = None,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Run (or resume) the download step into ``output``: ``wit download``, and this build's step.

    ``candidates``: a ``wit gather`` or pre-balance output directory, or Parquet files with a
    ``url`` column. A rerun whose plan differs from the first run's is refused with one line; one
    with finished shards resumes after them (and says so). Returns ``output``'s ``stats.json``
    document, plus ``resumed_shards``: how many shards an earlier run had finished.
    """
    files = download_lib.candidate_files(candidates)
    download_plan.check_plan_config(output, cfg)
    done_before = len(download_plan.finished_shards(output)) if fileio.exists(output) else 0
    if done_before:
        log(f"download: resuming ({done_before} shard(s) already finished)")
    args = list(beam_args)
    if runner:
        args = [a for a in args if not a.startswith("--runner")] + [f"--runner={runner}"]
    options = beam_utils.pipeline_options(beam_utils.local_parallelism(args, cfg.processes))
    try:
        with beam.Pipeline(options=options) as p:
            add_download(p, files=files, output_dir=output, cfg=cfg)
    except Exception as e:
        # A WitError raised inside a worker reaches us wrapped by the runner: report its line.
        m = re.search(r"(\S+ holds a download run with a different input[^\n'\"]*)", str(e))
        if m:
            raise WitError(m.group(1)) from None
        raise
    stats = fileio.read_json(fileio.join(output, download_lib.STATS_FILE))
    return {**stats, "resumed_shards": done_before}
