"""Where a pipeline runs: which runners share this machine's files, and what remote workers need.

The config decides *what* is computed; Beam options decide *where* (``docs/scaling.md``). This
module reads the few Beam options that matter before a run starts, so that a build that cannot
work on its runner stops with one line instead of failing on the workers hours later:

- local runners (FnApiRunner, DirectRunner, and portable runners with
  ``--environment_type=LOOPBACK``, whose Python work runs in the launching process) read local
  paths; every other runner (Dataflow, Flink or Spark with Docker/process workers) reads only
  URLs its workers can open (``gs://``, ``s3://``, ``hdfs://``, ...). :func:`check_worker_paths`
  refuses a local path there (copy it to the bucket; nothing is uploaded behind your back);
- Dataflow workers need this package: ``--setup_file ./pyproject.toml`` (Beam builds an sdist and
  each worker installs it with its dependencies) or ``--sdk_container_image`` built from the
  repository's ``Dockerfile`` (pinned by ``constraints.txt``). :func:`check_worker_package`
  refuses a Dataflow run with neither.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from wit_pipeline import fileio
from wit_pipeline.errors import WitError

LOOPBACK_ENVIRONMENTS = ("LOOPBACK",)
PORTABLE_RUNNERS = ("PortableRunner", "FlinkRunner", "SparkRunner", "PrismRunner")
DATAFLOW_RUNNERS = ("DataflowRunner", "TestDataflowRunner")
# Beam options that put this package on the workers.
PACKAGE_OPTIONS = (
    "--setup_file",
    "--sdk_container_image",
    "--worker_harness_container_image",
    "--extra_package",
    "--extra_packages",
)


def flag_value(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``args`` (the last one wins)."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        elif a == name and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
    return value


def runner_of(beam_args: Sequence[str], runner: str | None = None) -> str:
    """The runner's short name: ``runner`` when given, else ``--runner``, else FnApiRunner."""
    from wit_pipeline.beam_utils import DEFAULT_RUNNER

    name = runner or flag_value(beam_args, "--runner") or DEFAULT_RUNNER
    return name.rsplit(".", 1)[-1]


def workers_share_filesystem(runner: str, beam_args: Sequence[str]) -> bool:
    """Whether the workers of ``runner`` run on this machine and read its local files."""
    from wit_pipeline.beam_utils import LOCAL_RUNNERS

    if runner in LOCAL_RUNNERS:
        return True
    env = (flag_value(beam_args, "--environment_type") or "").upper()
    return runner in PORTABLE_RUNNERS and env in LOOPBACK_ENVIRONMENTS


def is_local_path(path: str) -> bool:
    """A path on this machine (a plain path or ``file://``), as opposed to a URL."""
    return bool(path) and fileio.is_local(path)


def check_worker_paths(
    runner: str, beam_args: Sequence[str], paths: Iterable[tuple[str, str]]
) -> None:
    """Refuse local paths that remote workers would have to read (one-line ``WitError``).

    ``paths``: ``(what, path)`` pairs, e.g. ``("--queries", "q.txt.gz")``; empty paths are
    skipped. Does nothing for runners whose workers share this machine's files.
    """
    if workers_share_filesystem(runner, beam_args):
        return
    for what, path in paths:
        if path and is_local_path(path):
            raise WitError(
                f"{what} {path} is a local path, which {runner} workers cannot read: copy it to "
                "a bucket they can (gs://, s3://, hdfs://) and pass that URL (docs/scaling.md)"
            )


def check_worker_package(runner: str, beam_args: Sequence[str]) -> None:
    """Refuse a Dataflow run that does not ship this package to its workers."""
    if runner not in DATAFLOW_RUNNERS:
        return
    if any(flag_value(beam_args, name) for name in PACKAGE_OPTIONS):
        return
    raise WitError(
        f"{runner} workers need wit-pipeline installed: pass --setup_file ./pyproject.toml "
        "(stages this package; workers install it with its dependencies) or "
        "--sdk_container_image IMAGE built from the Dockerfile (docs/scaling.md)"
    )


def looks_like_path(value: str) -> bool:
    """A checkpoint path rather than an open_clip pretrained tag (``laion2b_s34b_b79k``)."""
    if not value:
        return False
    if "://" in value or os.sep in value or "/" in value:
        return True
    return value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")) or os.path.exists(value)
