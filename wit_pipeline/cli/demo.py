"""``wit demo``: the built-in demo (``run``: generate, serve, build, train) and ``serve``."""

from __future__ import annotations

import argparse

from wit_pipeline.cli import args as args_lib

RUN_EPILOG = """\
examples:
  wit demo run --output out/demo                      # what `make build-dataset` runs
  wit demo run --output out/demo --set web.n_images=1000 --set train.max_steps=100
  wit demo run --output out/demo --config my-demo.yaml --direct_num_workers 2 \\
      --direct_running_mode multi_processing
  wit demo serve out/demo/web                         # browse the generated web

OUTPUT/web: the generated web (pages, images, robots.txt, crawl.warc.gz, pairs.parquet,
eval/zeroshot.parquet); OUTPUT/build: the `wit build` output (shards/, report.md, stats.json);
OUTPUT/train: the trained wit-tiny (checkpoints/, metrics.jsonl, train.yaml); OUTPUT/scored: the
shards scored by it (wit score, nothing dropped; report.md with the CLIP-score histogram);
OUTPUT/demo.json: the summary. A rerun skips what is done. Unknown --flags go to Beam (local
runners only: the web is served from this process on 127.0.0.1). docs/demo.md explains every
piece.
"""


HELP = "the built-in demo: a generated web, crawled, built into shards, trained on"
DESCRIPTION = (
    "Generate a small web of shape scenes with the usual mess (duplicates, broken and "
    "huge images, foreign and junk alt texts, robots.txt, opt-outs, redirects to private "
    "addresses), serve it on 127.0.0.1 (port 28561 unless taken), `wit build` it, train "
    "wit-tiny on the shards, report zero-shot accuracy on held-out renders and score the "
    "shards with the model. No network needed."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = args_lib.add_subcommands(p, "demo_command", "{run,serve}")
    r = args_lib.add_command(
        sub, "run", help="generate, serve, build and train (make build-dataset)", epilog=RUN_EPILOG
    )
    r.add_argument("--output", "-o", default="out/demo", metavar="DIR", help="demo directory")
    args_lib.add_queries(r, "query list (default: the shipped English list)")
    r.add_argument(
        "--config",
        metavar="FILE",
        help="YAML/TOML over the shipped demo config (web/build/train sections, or build "
        "options alone)",
    )
    args_lib.add_set(r, "build.balance.t=50 --set train.max_steps=100")
    args_lib.add_runner(r, "Beam runner (FnApiRunner, DirectRunner; local only)")
    r.add_argument(
        "--no-train", dest="train", action="store_false", help="stop after the build and report"
    )
    r.set_defaults(func=run)
    s = sub.add_parser("serve", help="serve a generated demo web on 127.0.0.1 until Ctrl-C")
    s.add_argument("web_dir", metavar="WEB_DIR", help="OUTPUT/web of a demo run")
    s.set_defaults(func=serve)


def run(args: argparse.Namespace) -> int:
    from wit_pipeline.demo import run as demo_run

    cfg = demo_run.load_demo_config(args.config, args.overrides)
    summary = demo_run.run_demo(
        args.output,
        cfg,
        queries_path=args.queries,
        runner=args.runner,
        beam_args=args.beam_args,
        train=args.train,
    )
    print(demo_run.format_summary(summary), flush=True)
    return 0 if summary["build"]["samples"] else 1


def serve(args: argparse.Namespace) -> int:
    import json
    import os

    from wit_pipeline.errors import WitError
    from wit_pipeline.loopback import ImageServer

    manifest_path = os.path.join(args.web_dir, "web.json")
    if not os.path.exists(manifest_path):
        raise WitError(f"{args.web_dir} holds no generated web (no web.json)")
    with open(manifest_path) as f:
        base_url = json.load(f)["base_url"]
    port = int(base_url.rsplit(":", 1)[1])
    try:
        srv = ImageServer(os.path.join(args.web_dir, "site"), mount="/", port=port)
    except OSError as e:
        raise WitError(f"cannot serve on port {port} (the port its URLs name): {e}") from None
    srv.load_routes(os.path.join(args.web_dir, "routes.json"))
    print(f"serving {args.web_dir} at {srv.base_url}/pages/0000.html (Ctrl-C stops)", flush=True)
    srv.serve_forever()
    return 0
