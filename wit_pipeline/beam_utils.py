"""Beam plumbing shared by every stage: options, the counts output, reading stats back.

Stages follow one protocol (``wit_pipeline.stage``): kept records on the main output, dropped
ones on the ``rejected`` output, counts on the ``counts`` output as ``(name, n)`` pairs
(:func:`emit_counts`). Counts travel as data, so totals are exact on every runner, retried
bundles included; they are mirrored to Beam metrics for monitoring. ``stage.WriteStats`` writes
them to ``stats.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput

from wit_pipeline import counters as counters_lib
from wit_pipeline import fileio

COUNTS = "counts"
REJECTED = "rejected"
METRICS_NAMESPACE = "wit"
DEFAULT_RUNNER = "FnApiRunner"

_LOG = logging.getLogger(__name__)


def pipeline_options(
    beam_args: Sequence[str] = (), *, runner: str | None = None, **overrides: Any
) -> PipelineOptions:
    """Beam options from command-line style args; local runs default to FnApiRunner.

    Prism (Beam's default local runner) downloads a binary at start-up, which fails offline,
    so a run without ``--runner`` uses the in-process FnApiRunner. Runner aliases (``dask``)
    become the class Beam loads (``runners.resolve_runner``).
    """
    from wit_pipeline import runners

    args = list(beam_args)
    name = runner or runners.flag_value(args, "--runner") or DEFAULT_RUNNER
    args = [*_without_flag(args, "--runner"), f"--runner={runners.resolve_runner(name)}"]
    opts = PipelineOptions(args, **overrides)
    return opts


def _without_flag(args: Sequence[str], name: str) -> list[str]:
    """``args`` without ``--name=value`` and ``--name value``."""
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def unknown_beam_flags(beam_args: Sequence[str]) -> list[str]:
    """The flags in ``beam_args`` that no Beam ``PipelineOptions`` class defines.

    Beam itself only logs "Discarding unparseable args" for them, so a mistyped flag would be
    ignored silently; the CLI refuses them instead. Parses exactly as ``PipelineOptions`` does
    (every registered options class, no abbreviations).
    """
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    if any(a.startswith("--dask") for a in beam_args):
        # Beam's DaskOptions register when the Dask runner's module is imported, which a run
        # does only once it starts (and only where dask is installed).
        with contextlib.suppress(ImportError):
            import wit_pipeline.dask_runner  # noqa: F401
    parser = _BeamArgumentParser(allow_abbrev=False, add_help=False)
    seen: dict[str, type] = {}
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)  # Beam's registration hook for options classes
    _, unknown = parser.parse_known_args(list(beam_args))
    return [a.split("=", 1)[0] for a in unknown if a.startswith("-")]


LOCAL_RUNNERS = (
    "",
    "FnApiRunner",
    "DirectRunner",
    "SwitchingDirectRunner",
    "BundleBasedDirectRunner",
)


def local_parallelism(beam_args: Sequence[str], processes: int) -> list[str]:
    """Run a local runner with ``processes`` worker processes unless Beam flags say otherwise.

    Adds ``--direct_num_workers=N --direct_running_mode=multi_processing`` when ``processes``
    > 1, the runner is local (or not given) and the args do not already set a worker count.
    Other runners (Dataflow, Flink, Spark) size their workers with their own flags.
    """
    args = list(beam_args)
    runner = ""
    for i, a in enumerate(args):
        if a.startswith("--runner="):
            runner = a.split("=", 1)[1]
        elif a == "--runner" and i + 1 < len(args):
            runner = args[i + 1]
    local = runner in LOCAL_RUNNERS
    if processes > 1 and local and not any(a.startswith("--direct_num_workers") for a in args):
        return [
            *args,
            f"--direct_num_workers={processes}",
            "--direct_running_mode=multi_processing",
        ]
    return args


def runner_name(options: PipelineOptions) -> str:
    from apache_beam.options.pipeline_options import StandardOptions

    return str(options.view_as(StandardOptions).runner or DEFAULT_RUNNER)


def emit_counts(
    counter: Mapping[str, int], *, namespace: str = METRICS_NAMESPACE
) -> Iterable[TaggedOutput]:
    """Yield a counter as ``counts`` tagged outputs and mirror it to Beam metrics."""
    for name, n in counter.items():
        if n:
            Metrics.counter(namespace, name).inc(n)
            yield TaggedOutput(COUNTS, (name, n))


class SumCounts(beam.PTransform):
    """``(name, n)`` pairs -> one dict ``{name: total}`` (a single element, sorted keys)."""

    def expand(self, pcoll):
        return (
            pcoll
            | "SumPerName" >> beam.CombinePerKey(sum)
            | "ToDict" >> beam.combiners.ToDict()
            | "Sort" >> beam.Map(lambda d: dict(sorted(d.items())))
        )


def check_stats_file(path: str) -> dict[str, int]:
    """Read a stats.json back and verify ``input == kept + dropped``."""
    doc = fileio.read_json(path)
    counts = doc["counters"]
    counters_lib.check_balanced(counts, stage=os.path.basename(os.path.dirname(path)))
    return counts
