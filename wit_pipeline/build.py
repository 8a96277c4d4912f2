"""``wit build``: crawl files in, training-ready shards out, as a chain of resumable steps.

Steps, each a Beam pipeline writing under ``DIR/`` (see docs/build.md for the layout; the graphs
are side by side in ``pipeline.py``, ``steps.py`` runs each):

1. ``gather`` (``DIR/gather/``): WARC/WAT/tables -> cleaned, query-matched candidate pairs.
2. ``prebalance`` (``DIR/prebalance/``): MetaCLIP balancing with oversampling, before download.
3. ``download`` (``DIR/download/``): img2dataset inside Beam, resumable shard by shard.
4. ``finalize`` (``DIR/shards/``, ``DIR/rejected/``, ``DIR/query_counts.parquet``, ...): dedup and
   decontamination, exact balancing, optional CLIP scoring, final shards: one pipeline
   (``pipeline.finalize``).
5. ``report`` (``DIR/stats.json``, ``DIR/report.md``, ``DIR/plots/``): whole-run counters
   (``run_stats``), funnel and plots.

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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from wit_pipeline import config, fileio, queries, runners, stage, steps, takedown
from wit_pipeline.errors import WitError
from wit_pipeline.stages import balance
from wit_pipeline.stages import score as score_lib
from wit_pipeline.stages import shards as shards_lib
from wit_pipeline.stages.dedup import decontaminate
from wit_pipeline.stages.download import plan as download_plan
from wit_pipeline.stages.gather import transforms as gather

STEPS = ("gather", "prebalance", "download", "finalize", "report")

BUILD_FILE = "build.json"
CONFIG_FILE = "config.yaml"
DONE_DIR = "done"
STATS_FILE = stage.STATS_FILE
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
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
        shards_lib.SHARDS_DIR,
        stage.REJECTED_DIR,
        balance.QUERY_COUNTS,
        decontaminate.CONTAMINATION,
    ),
    "report": (STATS_FILE, REPORT_FILE, PLOTS_DIR),
}

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
    queries_sha256: str  # of the list (queries.formats.list_sha256), whatever its format
    queries_count: int
    seed_sha256: str = ""  # sha256 of a local seed checkpoint ("" for a tag or no seed)
    # The rest of the list's record (queries.formats.QueryList.record): format, key, gzip,
    # file_sha256, unmatchable.
    queries_info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # The takedown entries of takedown.blocklists (--blocklist), parsed: they travel inside the
    # pipelines, so workers never read the files.
    blocklist: takedown.Blocklist = dataclasses.field(default_factory=takedown.Blocklist)

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "files": list(self.files),
            "identities": list(self.identities),
            "queries": {
                **self.queries_info,
                "path": self.queries_path,
                "sha256": self.queries_sha256,
                "count": self.queries_count,
            },
            "seed_sha256": self.seed_sha256,
        }
        if self.blocklist.files:
            doc["takedown"] = takedown_identity(self.blocklist)
        return doc


def takedown_identity(blocklist: takedown.Blocklist) -> dict[str, Any]:
    """What a build records of its blocklists: each file (path, sha256, entries per kind) and
    the digests of the entries that decide its steps (``url_entries``: gather and download;
    ``hash_entries``: finalize)."""
    return {
        "blocklists": blocklist.describe(),
        "url_entries": blocklist.url_digest(),
        "hash_entries": blocklist.hash_digest(),
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


def resolve_inputs(
    inputs: Sequence[str], queries_path: str | None, cfg: config.BuildConfig
) -> BuildInputs:
    """Expand ``--input`` patterns, read the query list and identify the seed checkpoint."""
    files = [_abs(f) for f in fileio.expand_inputs(list(inputs))]
    qpath = _abs(queries_path) if queries_path else queries.default_queries_path()
    qlist = queries.read_query_list(qpath)
    record = qlist.record()
    seed_sha = ""
    pretrained = cfg.score.pretrained
    if pretrained and fileio.exists(pretrained) and not os.path.isdir(pretrained):
        seed_sha = fileio.sha256_file(pretrained)
    blocklists = [_abs(b) for b in cfg.takedown.blocklists]
    return BuildInputs(
        files=tuple(files),
        identities=tuple(file_identity(f) for f in files),
        queries_path=qpath,
        queries_sha256=qlist.sha256,
        queries_count=len(qlist.entries),
        seed_sha256=seed_sha,
        queries_info={
            k: record[k] for k in ("format", "key", "gzip", "file_sha256", "unmatchable")
        },
        blocklist=takedown.load_blocklists(blocklists),
    )


def _without(d: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in names}


SCORE_EXECUTION_FIELDS = ("batch_size", "device", "accelerator")
# What only a scored build computes with (the null and the auto threshold): in the finalize
# fingerprint only when the build scores, so that unscored builds keep theirs.
SCORE_CALIBRATION_FIELDS = ("target_precision", "null_samples", "null_seed")
# Options that change how fast a step runs, never what it computes (dotted names).
EXECUTION_ONLY = frozenset(
    [f"download.{f}" for f in download_plan.EXECUTION_ONLY_FIELDS]
    + [f"score.{f}" for f in SCORE_EXECUTION_FIELDS]
)


def step_options(cfg: config.BuildConfig, inputs: BuildInputs) -> dict[str, dict[str, Any]]:
    """Per step, the options that decide its output (execution-only options left out).

    Takedown entries count by what they are, not by file: url and domain entries decide gather
    and download, hash entries finalize (an edited blocklist reruns from the first step its
    changed entries decide; a moved or re-commented one reruns nothing).
    """
    c = config.to_dict(cfg)
    opts = {
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
            "score": _score_options(cfg, c["score"]),
            "seed_sha256": inputs.seed_sha256,
        },
        "report": {},
    }
    # Only when there are entries, so that builds without blocklists keep their fingerprints.
    url_entries, hash_entries = inputs.blocklist.url_digest(), inputs.blocklist.hash_digest()
    if url_entries:
        opts["gather"]["takedown"] = opts["download"]["takedown"] = url_entries
    if hash_entries:
        opts["finalize"]["takedown"] = hash_entries
    return opts


def _score_options(cfg: config.BuildConfig, c: Mapping[str, Any]) -> dict[str, Any]:
    """The score options that decide finalize's output. A scored build scores every pair
    before balancing (``"unit": "pair"``), so builds scored before that are redone."""
    out = _without(c, (*SCORE_EXECUTION_FIELDS, *SCORE_CALIBRATION_FIELDS))
    if cfg.score.pretrained:
        out.update({k: c[k] for k in SCORE_CALIBRATION_FIELDS}, unit="pair")
    return out


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
        old_td, new_td = old_inputs.get("takedown") or {}, new_inputs.get("takedown") or {}
        for key, what in (("url_entries", "url/domain"), ("hash_entries", "sha256/phash")):
            if old_td.get(key, "") != new_td.get(key, ""):
                changes.append(f"--blocklist {what} entries")
    if old_cfg is not None:
        a, b = _flatten(old_cfg), _flatten(new_cfg)
        for key in sorted(set(a) | set(b)):
            if key.startswith(("queries.", "takedown.")) or key in EXECUTION_ONLY:
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
    """Anything in ``path`` but the temporaries of our own killed writes."""
    return any(not fileio.is_temporary(name) for name in fileio.list_names(path))


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
    # Temporaries of markers, build.json, config.yaml or top-level outputs that a killed run
    # was writing: never complete files, only garbage (the steps clean their own folders).
    for d in (output, fileio.join(output, DONE_DIR)):
        fileio.remove_temporaries(d)
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

    # build.json first: it claims DIR as a build, so that a run killed before config.yaml is
    # written is resumed, not refused as a directory holding someone else's files.
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
    with fileio.atomic_write(fileio.join(output, CONFIG_FILE), "w") as f:
        f.write("# The resolved wit build config of this directory (docs/build.md).\n")
        yaml.safe_dump(config.to_dict(cfg), f, sort_keys=False, allow_unicode=True)
    return states


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
    retry_failed: bool = False  # repair the download (--retry-failed)
    model_handler: Any = None  # replaces the seed's scorer (tests)


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
        blocklist=ctx.inputs.blocklist,
    )
    c = doc["counters"]
    ctx.log(f"gather: {c.get('kept', 0):,} of {c.get('input', 0):,} pairs kept")
    if not c.get("kept"):
        raise WitError(
            f"gather kept no pairs (see {_step_dir(ctx, 'gather')}/stats.json): nothing to build"
        )
    return {"kept": c.get("kept", 0)}


def _run_prebalance(ctx: StepContext) -> dict[str, Any]:
    if not ctx.cfg.balance.prebalance:
        ctx.log("prebalance: disabled (balance.prebalance_factor = 0)")
        return {"enabled": False}
    doc = steps.run_prebalance(
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


def _run_download(ctx: StepContext) -> dict[str, Any]:
    out = _step_dir(ctx, "download")
    # A repair run needs a download to repair; before the first shard it is a plain run.
    retry = ctx.retry_failed and fileio.exists(fileio.join(out, download_plan.PLAN_FILE))
    stats = steps.run_download(
        _step_dir(ctx, "prebalance" if ctx.cfg.balance.prebalance else "gather"),
        out,
        ctx.cfg.download,
        beam_args=ctx.beam_args,
        runner=ctx.runner,
        log=ctx.log,
        blocklist=ctx.inputs.blocklist,
        retry_failed=retry,
    )
    urls_c, pairs_c = stats["url_counters"], stats["counters"]
    ctx.log(
        f"download: {urls_c.get('kept', 0):,} of {urls_c.get('input', 0):,} images, "
        f"{pairs_c.get('kept', 0):,} of {pairs_c.get('input', 0):,} pairs"
    )
    if not urls_c.get("kept"):
        ctx.log(f"download: no image was downloaded (reasons: {out}/rejected/, the report)")
    info: dict[str, Any] = {"resumed_shards": stats["resumed_shards"]}
    if retry:
        info["retried"] = stats["retried"]
    return info


def _query_count_columns(ctx: StepContext) -> dict[str, dict[int, int]]:
    """``before`` and ``after_prebalance`` per query, from the earlier steps' files."""
    if ctx.cfg.balance.prebalance:
        cols = balance.read_query_counts(
            fileio.join(_step_dir(ctx, "prebalance"), balance.QUERY_COUNTS)
        )
        return {
            "before": cols.get("before", {}),
            "after_prebalance": cols.get("after_prebalance", {}),
        }
    stats = fileio.read_json(fileio.join(_step_dir(ctx, "gather"), gather.STATS_FILE))
    before = {int(q): int(n) for q, n in (stats.get("query_counts") or {}).items()}
    return {"before": before, "after_prebalance": dict(before)}  # nothing is pre-balanced


def _run_finalize(ctx: StepContext) -> dict[str, Any]:
    steps.run_finalize(
        [_step_dir(ctx, "download")],
        ctx.output,
        ctx.cfg,
        work_dir=_step_dir(ctx, "finalize"),
        score=bool(ctx.cfg.score.pretrained),
        queries_path=ctx.inputs.queries_path,
        query_columns=_query_count_columns(ctx),
        stats_extra={},
        beam_args=ctx.beam_args,
        runner=ctx.runner,
        blocklist=ctx.inputs.blocklist,
        model_handler=ctx.model_handler,
    )
    if ctx.cfg.score.pretrained:
        doc = fileio.read_json(fileio.join(_step_dir(ctx, "finalize"), score_lib.SCORE_FILE))
        ctx.log(f"finalize: {score_lib.describe(doc)}")
    shards_dir = fileio.join(ctx.output, shards_lib.SHARDS_DIR)
    manifest = fileio.read_json(fileio.join(shards_dir, "manifest.json"))
    ctx.log(
        f"finalize: {manifest['num_samples']:,} samples in {manifest['num_shards']} shard(s) "
        f"-> {shards_dir}"
    )
    return {"samples": manifest["num_samples"], "shards": manifest["num_shards"]}


def _run_report(ctx: StepContext) -> dict[str, Any]:
    from wit_pipeline import report, run_stats

    doc = run_stats.write_run_stats(ctx.output)
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
# Entry point


def validate(cfg: config.BuildConfig) -> config.BuildConfig:
    """Check what would otherwise fail late (after hours of download): the inputs the options
    name (eval sets, the seed model) and a score filter without a seed model.

    Every section validated its options itself when it was made (``config``). Returns the
    config with ``score.model`` filled from a trainer checkpoint when omitted.
    """
    for spec in cfg.dedup.eval_sets:
        if not decontaminate.list_eval_items(decontaminate.parse_eval_set(spec)):
            raise WitError(f"eval set {spec!r} holds no images")
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
    out += [("eval set", decontaminate.parse_eval_set(s).path) for s in cfg.dedup.eval_sets]
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
    retry_failed: bool = False,
    log: Log = _stderr,
    model_handler: Any = None,
) -> dict[str, Any]:
    """Run (or resume) a build into ``output``; returns the whole-run ``stats.json`` document.

    ``model_handler`` (a Beam ``ModelHandler``) replaces the seed's scorer: tests use a model
    with known embeddings.

    On a runner whose workers do not share this machine's files (Dataflow, Flink, Spark), every
    path the workers use must be a URL they can read, and Dataflow needs the package shipped
    (``runners``): both are checked first, with one-line errors.

    ``retry_failed`` repairs an existing build (:func:`start_repair`): the download step runs
    again as a repair run (its transient failures fetched again, into the same shards), and if
    that changed the download, finalize and report run again on it.
    """
    output = _abs(output)
    where = runners.runner_of(beam_args, runner)
    runners.check_worker_package(where, beam_args)
    runners.check_worker_paths(where, beam_args, worker_paths(inputs, output, cfg, queries_path))
    cfg = validate(cfg)
    build_inputs = resolve_inputs(inputs, queries_path, cfg)
    if retry_failed:
        check_repair(output, fingerprints(cfg, build_inputs))
    states = prepare_output(output, cfg, build_inputs, overwrite=overwrite, log=log)
    if retry_failed:
        start_repair(output, states, log)
    ctx = StepContext(
        output=output,
        cfg=cfg,
        inputs=build_inputs,
        beam_args=list(beam_args),
        runner=runner,
        log=log,
        retry_failed=retry_failed,
        model_handler=model_handler,
    )
    download_before = _download_stats(output) if retry_failed else None
    for i, st in enumerate(states, 1):
        prefix = f"[{i}/{len(states)}] {st.name}"
        if st.done:
            log(f"{prefix}: done (skipped)")
            continue
        log(f"{prefix} ...")
        started = time.monotonic()
        info = _RUNNERS[st.name](ctx)
        if st.name == "download" and retry_failed:
            finish_repair(output, states, download_before, log)
        write_marker(
            output,
            st.name,
            st.fingerprint,
            {**info, "elapsed_s": round(time.monotonic() - started, 3)},
        )
    return fileio.read_json(fileio.join(output, STATS_FILE))


# ---------------------------------------------------------------------------------------------
# Repair runs (--retry-failed)


def check_repair(output: str, fps: Mapping[str, str]) -> None:
    """Refuse ``--retry-failed`` where there is no build, or where the download it would repair
    was made with other settings or inputs (it would be rebuilt, not repaired)."""
    path = fileio.join(output, BUILD_FILE)
    if not fileio.exists(path):
        raise WitError(f"--retry-failed: {output} holds no build to repair (no {BUILD_FILE})")
    old = (fileio.read_json(path).get("fingerprints") or {}).get("download")
    if old is not None and old != fps["download"]:
        raise WitError(
            f"--retry-failed: the download in {output} was made with other settings or inputs; "
            "it can only be repaired with its own (drop --retry-failed to rebuild it)"
        )


def _download_stats(output: str) -> dict[str, Any] | None:
    path = fileio.join(output, "download", STATS_FILE)
    return fileio.read_json(path) if fileio.exists(path) else None


def start_repair(output: str, states: Sequence[StepState], log: Log) -> None:
    """Make the download step run again, as a repair run.

    Only its marker is removed: if the repair is killed, a plain rerun finds the download
    unfinished and so redoes finalize and report too (``prepare_output``).
    """
    st = next(s for s in states if s.name == "download")
    if st.done:
        _remove(_done_path(output, "download"))
        st.done = False
    log("retry-failed: the download runs again as a repair run")


def finish_repair(
    output: str, states: Sequence[StepState], before: Mapping[str, Any] | None, log: Log
) -> None:
    """After the repair run, before the download's marker is written again: if the download
    changed, remove finalize and report (their markers first), which then run on the new
    download; else they stay as they are."""
    if before is not None and _download_stats(output) == before:
        log("retry-failed: no transient failure was recovered or changed; the build is unchanged")
        return
    for st in states:
        if st.name in ("finalize", "report") and st.done:
            clear_step(output, st.name)
            st.done = False


def step_status(output: str) -> dict[str, dict[str, Any] | None]:
    """``{step: marker or None}`` for a build directory (what a rerun would skip)."""
    return {s: read_marker(output, s) for s in STEPS}
