"""``wit demo run``: generate a small web, serve it on loopback, build it, train on it.

What ``make build-dataset`` runs with no arguments. Everything lives under ``OUTPUT/``:

- ``web/``: the generated web (``demo.web``): pages, images, ``robots.txt``, a WARC crawl of the
  pages, a URL/caption table, held-out renders for zero-shot evaluation, ``web.json``;
- ``build/``: a ``wit build`` of the crawl and the table, with the held-out renders as an eval set
  for decontamination (``shards/``, ``report.md``, ``stats.json``, ...);
- ``train/``: ``python -m wit_pipeline.train`` on the shards (``train.yaml`` holds its options),
  with zero-shot evaluation on the held-out renders;
- ``scored/``: ``wit score`` of the shards with the model just trained (the bootstrap flow of
  ``docs/score.md``, no threshold: every sample kept, gaining ``clip_score``), with a
  ``report.md`` that adds the CLIP-score histogram;
- ``demo.json``: the summary printed at the end (zero-shot accuracy vs chance, the planted-mess
  audit, paths, timings).

Reruns resume like ``wit build``: the web is reused (and served again on its port), finished build
steps are skipped, and a finished training run is not repeated; changed options redo what they
change. The web is served from this process, so only local runners can reach it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from wit_pipeline import config as config_lib
from wit_pipeline import fileio
from wit_pipeline.demo import scenes
from wit_pipeline.demo.web import WebConfig
from wit_pipeline.errors import WitError
from wit_pipeline.train.config import TrainConfig

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_CONFIG = os.path.join(HERE, "demo.yaml")
ZEROSHOT_TEMPLATES = os.path.join(HERE, "zeroshot_templates.txt")
NOTEBOOK = "notebooks/inspect_shards.ipynb"
EVAL_SET_NAME = "heldout"
SUMMARY_FILE = "demo.json"
TRAIN_DONE = "demo_train.json"
SCORE_DONE = "demo_scored.json"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"wit demo: {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's web, build and training options (defaults: ``demo/demo.yaml``)."""

    web: WebConfig = dataclasses.field(default_factory=WebConfig)
    build: config_lib.BuildConfig = dataclasses.field(default_factory=config_lib.BuildConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_demo_config(
    path: str | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> DemoConfig:
    """The shipped ``demo.yaml``, then ``path`` over it, then ``section.option=value`` overrides.

    ``path`` holds ``web``/``build``/``train`` sections, or only ``wit build`` options (a file
    like ``examples/build.yaml``), which then override the ``build`` section.
    """
    data = config_lib.read_config_file(DEMO_CONFIG)
    if path:
        user = config_lib.read_config_file(path)
        build_keys = {f.name for f in dataclasses.fields(config_lib.BuildConfig)}
        if user and set(user) <= build_keys:
            user = {"build": user}
        data = _merge(data, user)
    cfg = config_lib.from_dict(DemoConfig, data)
    return config_lib.apply_overrides(cfg, overrides)


# ---------------------------------------------------------------------------------------------
# The web


def _fingerprint(obj: Any) -> str:
    doc = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


@contextlib.contextmanager
def served_web(web_dir: str, cfg: WebConfig, *, log: Log = _stderr) -> Iterator[tuple[Any, dict]]:
    """Serve the demo web under ``web_dir`` on 127.0.0.1, generating it first when needed.

    A new web is served on ``cfg.port`` (a free port chosen by the OS when that one is taken or
    0). A web generated earlier with the same options is served again on the port its URLs
    name; when that port is taken (or the options differ) the web is generated anew.
    Yields ``(server, manifest)``.
    """
    from wit_pipeline.demo import web
    from wit_pipeline.loopback import ImageServer

    manifest_path = os.path.join(web_dir, "web.json")
    site = os.path.join(web_dir, "site")
    manifest = None
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("config") != dataclasses.asdict(cfg):
            manifest = None
    with contextlib.ExitStack() as stack:
        if manifest is not None:
            port = int(manifest["base_url"].rsplit(":", 1)[1])
            try:
                srv = stack.enter_context(ImageServer(site, mount="/", port=port))
            except OSError:
                log(f"web: port {port} is taken; generating the web again on a free port")
                manifest = None
            else:
                log(f"web: {web_dir} (reused), served at {srv.base_url}")
        if manifest is None:
            if os.path.exists(web_dir):
                shutil.rmtree(web_dir)
            try:
                srv = stack.enter_context(ImageServer(site, mount="/", port=cfg.port))
            except OSError:
                srv = stack.enter_context(ImageServer(site, mount="/"))
                log(
                    f"web: port {cfg.port} is taken; serving on {srv.base_url} instead (pair uids, "
                    "and so the pairs pre-balancing and balancing keep, differ from a run on "
                    f"port {cfg.port})"
                )
            started = time.monotonic()
            manifest = web.generate_web(web_dir, base_url=srv.base_url, cfg=cfg)
            log(
                f"web: {manifest['pages']} pages, {manifest['page_images']:,} <img> tags and "
                f"{manifest['table_images']:,} table rows in {time.monotonic() - started:.1f} s, "
                f"served at {srv.base_url}"
            )
        srv.load_routes(os.path.join(web_dir, "routes.json"))
        yield srv, manifest


# ---------------------------------------------------------------------------------------------
# Training


def train_config(cfg: DemoConfig, *, shards_dir: str, eval_path: str, output: str) -> TrainConfig:
    """The trainer's options: the demo's ``train`` section plus the data and eval set paths."""
    return dataclasses.replace(
        cfg.train,
        train_data=(shards_dir,),
        output=output,
        resume="",
        eval_zeroshot=(f"{EVAL_SET_NAME}={eval_path}",),
        eval_zeroshot_templates=(
            cfg.train.eval_zeroshot_templates
            if cfg.train.eval_zeroshot_templates != "auto"
            else ZEROSHOT_TEMPLATES
        ),
    )


def _last_eval(metrics_path: str) -> dict[str, Any] | None:
    last = None
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("type") == "eval":
                last = row
    return last


def _finished(done_path: str, fingerprint: str) -> dict[str, Any] | None:
    """The completion marker at ``done_path`` if it was written for this ``fingerprint``."""
    if not os.path.exists(done_path):
        return None
    with open(done_path) as f:
        done = json.load(f)
    return done if done.get("fingerprint") == fingerprint else None


def run_training(tcfg: TrainConfig, *, fingerprint: str, log: Log = _stderr) -> dict[str, Any]:
    """Run ``python -m wit_pipeline.train --config OUTPUT/train.yaml`` (or reuse a finished run).

    A run with the same fingerprint (options + the shards it trains on) that finished is not
    repeated; one that was interrupted is resumed (``--resume latest``); anything else in the
    folder is removed first. Returns the last evaluation row of ``metrics.jsonl``.
    """
    import yaml

    out = tcfg.output
    done_path = os.path.join(out, TRAIN_DONE)
    done = _finished(done_path, fingerprint)
    if done is not None:
        log(f"train: done (skipped): {out}")
        return done["eval"]
    started_path = os.path.join(out, "demo_started.json")
    resume = False
    if os.path.exists(started_path):
        with open(started_path) as f:
            resume = json.load(f).get("fingerprint") == fingerprint and os.path.exists(
                os.path.join(out, "checkpoints", "latest.pt")
            )
    if not resume and os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    fileio.write_json(started_path, {"fingerprint": fingerprint})
    config_path = os.path.join(out, "train.yaml")
    with fileio.atomic_write(config_path, "w") as f:
        f.write("# python -m wit_pipeline.train --config this-file (written by wit demo run)\n")
        yaml.safe_dump(config_lib.to_dict(tcfg), f, sort_keys=False, allow_unicode=True)
    cmd = [sys.executable, "-m", "wit_pipeline.train", "--config", config_path]
    if resume:
        cmd += ["--resume", "latest"]
    log(f"train: {' '.join(['python', *cmd[1:]])}")
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise WitError(f"training failed (exit status {proc.returncode}); see the messages above")
    row = _last_eval(os.path.join(out, "metrics.jsonl"))
    if row is None:
        raise WitError(f"training wrote no evaluation to {out}/metrics.jsonl")
    fileio.write_json(done_path, {"fingerprint": fingerprint, "eval": row})
    return row


# ---------------------------------------------------------------------------------------------
# Scoring


def run_scoring(
    shards_dir: str,
    output: str,
    *,
    build_dir: str,
    model: str,
    checkpoint: str,
    fingerprint: str,
    runner: str | None = None,
    beam_args: Sequence[str] = (),
    log: Log = _stderr,
) -> dict[str, Any]:
    """``wit score --input SHARDS --output OUTPUT --pretrained CHECKPOINT`` (no threshold), then
    ``OUTPUT/report.md``; a finished run with the same fingerprint is not repeated.

    Returns ``{"samples", "mean", "min", "max"}`` of the scores.
    """
    import apache_beam as beam
    import numpy as np

    from wit_pipeline import beam_utils, report, shards
    from wit_pipeline.stages import score

    done_path = os.path.join(output, SCORE_DONE)
    done = _finished(done_path, fingerprint)
    if done is not None:
        log(f"score: done (skipped): {output}")
        return done["scores"]
    if os.path.exists(output):
        shutil.rmtree(output)  # scores of another model or other shards
    log(f"score: wit score --input {shards_dir} --output {output} --pretrained {checkpoint}")
    cfg = config_lib.ScoreConfig(model=model, pretrained=checkpoint)
    with beam.Pipeline(options=beam_utils.pipeline_options(beam_args, runner=runner)) as p:
        _ = p | "ScoreShards" >> score.ScoreShards(
            input_dir=shards_dir, output_dir=output, config=cfg
        )
    report.write_report(build_dir, scored=output)
    # the samples' scores (each its best caption's), as written into the scored shards
    table = shards.read_table(os.path.join(output, "shards"), columns=["clip_score"])
    col = table.column("clip_score").to_pylist() if table.num_columns else []
    values = np.asarray([v for v in col if v is not None])
    found = {
        "samples": int(values.size),
        "mean": round(float(values.mean()), 4) if values.size else None,
        "min": round(float(values.min()), 4) if values.size else None,
        "max": round(float(values.max()), 4) if values.size else None,
    }
    fileio.write_json(done_path, {"fingerprint": fingerprint, "scores": found})
    return found


# ---------------------------------------------------------------------------------------------
# The whole demo


def _check_local_runner(runner: str | None, beam_args: Sequence[str]) -> None:
    from wit_pipeline import runners

    if not runners.workers_share_filesystem(runners.runner_of(beam_args, runner), beam_args):
        raise WitError(
            "the demo serves its web on this machine's loopback, which remote workers cannot "
            "reach: run it with a local runner (FnApiRunner, DirectRunner, or PortableRunner "
            "with --environment_type=LOOPBACK); `wit build` runs real crawls on Dataflow"
        )


def run_demo(
    output: str,
    cfg: DemoConfig,
    *,
    queries_path: str | None = None,
    runner: str | None = None,
    beam_args: Sequence[str] = (),
    train: bool = True,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Generate, serve, build and (with ``train``) train and score; returns and writes the
    summary."""
    from wit_pipeline import build
    from wit_pipeline.demo import audit

    _check_local_runner(runner, beam_args)
    output = os.path.abspath(output)
    os.makedirs(output, exist_ok=True)
    web_dir = os.path.join(output, "web")
    build_dir = os.path.join(output, "build")
    train_dir = os.path.join(output, "train")
    scored_dir = os.path.join(output, "scored")
    timings: dict[str, float] = {}
    started = time.monotonic()
    # Worker processes relay a warning per start that says nothing to a demo user.
    logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
    with served_web(web_dir, cfg.web, log=log) as (_srv, manifest):
        timings["web_s"] = round(time.monotonic() - started, 1)
        eval_path = manifest["eval"]
        bcfg = config_lib.apply_overrides(
            cfg.build,
            {
                "download.allow_loopback": True,
                "dedup.eval_sets": [*cfg.build.dedup.eval_sets, f"{EVAL_SET_NAME}={eval_path}"],
            },
        )
        t0 = time.monotonic()
        stats = build.run_build(
            [manifest["warc"], manifest["table"]],
            build_dir,
            bcfg,
            queries_path=queries_path,
            beam_args=beam_args,
            runner=runner,
            overwrite=True,  # the demo owns build/: changed options rebuild what they change
            log=lambda m: log(f"build: {m}"),
        )
        timings["build_s"] = round(time.monotonic() - t0, 1)
    rows = audit.audit(manifest, build_dir)
    summary: dict[str, Any] = {
        "output": output,
        "web": {
            "dir": web_dir,
            "pages": manifest["pages"],
            "page_images": manifest["page_images"],
            "table_images": manifest["table_images"],
            "planted": manifest["planted"],
        },
        "build": {
            "dir": build_dir,
            "samples": stats["samples"],
            "shards": stats["shards"],
            "train_data": os.path.join(build_dir, stats["train_data"]),
            "pairs_in": stats["counters"]["input"],
            "pairs_kept": stats["counters"]["kept"],
            "report": os.path.join(build_dir, build.REPORT_FILE),
        },
        "audit": {
            "items": len(rows),
            "caught": sum(r["verdict"] == "caught" for r in rows),
            "earlier": sum(r["verdict"] == "earlier" for r in rows),
            "missed": [r for r in rows if r["verdict"] == "missed"],
            "by_kind": audit.summarize(rows),
        },
        "notebook": f"WIT_BUILD_DIR={build_dir} jupyter lab {NOTEBOOK}",
        "timings": timings,
    }
    if train and stats["samples"]:
        tcfg = train_config(
            cfg,
            shards_dir=os.path.join(build_dir, "shards"),
            eval_path=eval_path,
            output=train_dir,
        )
        marker = build.read_marker(build_dir, "finalize") or {}
        fingerprint = _fingerprint(
            {"train": config_lib.to_dict(tcfg), "shards": marker.get("fingerprint")}
        )
        t0 = time.monotonic()
        row = run_training(tcfg, fingerprint=fingerprint, log=log)
        timings["train_s"] = round(time.monotonic() - t0, 1)
        m = row["metrics"]
        n_classes = len(scenes.class_names())
        summary["train"] = {
            "dir": train_dir,
            "checkpoint": os.path.join(train_dir, "checkpoints", "latest.pt"),
            "model": tcfg.model,
            "steps": row["step"],
            "command": f"python -m wit_pipeline.train --config {train_dir}/train.yaml",
        }
        summary["zeroshot"] = {
            "eval_set": eval_path,
            "classes": n_classes,
            "top1": m[f"{EVAL_SET_NAME}/top1"],
            "top5": m[f"{EVAL_SET_NAME}/top5"],
            "mean_per_class_top1": m[f"{EVAL_SET_NAME}/mean_per_class_top1"],
            "chance_top1": 1.0 / n_classes,
            "chance_top5": min(1.0, 5.0 / n_classes),
        }
        t0 = time.monotonic()
        checkpoint = summary["train"]["checkpoint"]
        found = run_scoring(
            os.path.join(build_dir, "shards"),
            scored_dir,
            build_dir=build_dir,
            model=tcfg.model,
            checkpoint=checkpoint,
            fingerprint=_fingerprint({"train": fingerprint, "model": tcfg.model}),
            runner=runner,
            beam_args=beam_args,
            log=log,
        )
        timings["score_s"] = round(time.monotonic() - t0, 1)
        summary["scored"] = {
            "dir": scored_dir,
            "report": os.path.join(scored_dir, build.REPORT_FILE),
            "command": (
                f"wit score --input {build_dir}/shards --output {scored_dir} "
                f"--pretrained {checkpoint}"
            ),
            "clip_scores": found,
        }
        summary["notebook"] = (
            f"WIT_BUILD_DIR={build_dir} WIT_SCORED_DIR={scored_dir} jupyter lab {NOTEBOOK}"
        )
    timings["total_s"] = round(time.monotonic() - started, 1)
    fileio.write_json(os.path.join(output, SUMMARY_FILE), summary)
    return summary


def format_summary(s: Mapping[str, Any]) -> str:
    """The lines printed at the end of ``wit demo run``."""
    b, w, a = s["build"], s["web"], s["audit"]
    lines = [
        f"wit demo: done in {s['timings']['total_s']:.0f} s -> {s['output']}",
        f"  web        {w['dir']}: {w['pages']} pages, {w['page_images']:,} <img> tags, "
        f"{w['table_images']:,} table rows, {sum(w['planted'].values())} planted mess items",
        f"  dataset    {b['train_data']}: {b['samples']:,} samples in {b['shards']} shard(s); "
        f"{b['pairs_kept']:,} of {b['pairs_in']:,} pairs kept",
        f"  report     {b['report']} (funnel, drop reasons, per-query counts, samples)",
        f"  mess       {a['caught']} of {a['items']} planted items caught where web.py says, "
        f"{a['earlier']} dropped earlier (pre-balancing), {len(a['missed'])} missed",
    ]
    for r in a["missed"]:
        lines.append(f"             missed: {r['kind']} {r['url']} -> {r['outcome']}")
    if "zeroshot" in s:
        z, t = s["zeroshot"], s["train"]
        lines += [
            f"  model      {t['checkpoint']} ({t['model']}, {t['steps']} steps)",
            f"  zero-shot  top-1 {100 * z['top1']:.1f}% on held-out renders, {z['classes']} "
            f"colour x shape classes (chance {100 * z['chance_top1']:.1f}%); top-5 "
            f"{100 * z['top5']:.1f}% (chance {100 * z['chance_top5']:.1f}%)",
        ]
    if "scored" in s:
        sc, c = s["scored"], s["scored"]["clip_scores"]
        mean = f"mean CLIP score {c['mean']:.3f}" if c["samples"] else "none scored"
        lines.append(
            f"  scores     {sc['dir']}: {c['samples']:,} samples scored by that model "
            f"({mean}); {sc['report']}"
        )
    lines.append(f"  notebook   {s['notebook']}")
    return "\n".join(lines)
