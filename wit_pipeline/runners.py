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
  refuses a Dataflow run with neither;
- Dask (``--runner dask``, Beam's DaskRunner with wit's translation, ``dask_runner.py``): with
  no scheduler address, :func:`dask_cluster` starts a local cluster of worker processes for the
  run and closes it at the end; :func:`check_worker_paths` asks every worker of the cluster
  whether it sees the launcher's local files as the launcher does (the same machine, or a
  shared filesystem: NFS, Lustre) and refuses the ones some worker does not
  (``docs/scaling.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence

from wit_pipeline import fileio
from wit_pipeline.errors import WitError

LOOPBACK_ENVIRONMENTS = ("LOOPBACK",)
PORTABLE_RUNNERS = ("PortableRunner", "FlinkRunner", "SparkRunner", "PrismRunner")
DATAFLOW_RUNNERS = ("DataflowRunner", "TestDataflowRunner")
DASK_RUNNERS = ("DaskRunner",)
# What ``--runner dask`` (and Beam's own full name of its Dask runner) runs: Beam's DaskRunner
# with a translation that keeps the Beam model (``wit_pipeline/dask_runner.py`` says why).
DASK_RUNNER = "wit_pipeline.dask_runner.DaskRunner"
RUNNER_ALIASES = {
    "dask": DASK_RUNNER,
    "DaskRunner": DASK_RUNNER,
    "apache_beam.runners.dask.dask_runner.DaskRunner": DASK_RUNNER,
}
DASK_ADDRESS_OPTIONS = ("--dask_client_address", "--dask_scheduler_file")
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


def resolve_runner(name: str) -> str:
    """The runner Beam should load for ``name``: aliases (``dask``) -> a full class name."""
    return RUNNER_ALIASES.get(name, name)


def runner_of(beam_args: Sequence[str], runner: str | None = None) -> str:
    """The runner's short name: ``runner`` when given, else ``--runner``, else FnApiRunner."""
    from wit_pipeline.beam_utils import DEFAULT_RUNNER

    name = runner or flag_value(beam_args, "--runner") or DEFAULT_RUNNER
    return resolve_runner(name).rsplit(".", 1)[-1]


def workers_share_filesystem(runner: str, beam_args: Sequence[str]) -> bool:
    """Whether the workers of ``runner`` run on this machine and read its local files."""
    from wit_pipeline.beam_utils import LOCAL_RUNNERS

    if runner in LOCAL_RUNNERS:
        return True
    if runner in DASK_RUNNERS:
        address = dask_address(beam_args)
        return address is None or is_loopback_address(address)
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
    skipped. Does nothing for runners whose workers share this machine's files. On a Dask
    cluster a local path is fine where every worker sees the same file (a shared filesystem, or
    the same machine), which :func:`check_dask_worker_paths` asks the workers.
    """
    if runner in DASK_RUNNERS:
        # Even a scheduler on loopback may have remote workers (a port-forwarded one): ask them.
        address = dask_address(beam_args)
        if address:
            check_dask_worker_paths(address, paths)
        return
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


# ---------------------------------------------------------------------------------------------
# Dask: the scheduler, a local cluster for the run, what remote workers see


def dask_address(beam_args: Sequence[str]) -> str | None:
    """The scheduler of a Dask run: ``--dask_client_address``, or the address in
    ``--dask_scheduler_file``; ``None`` when neither is given (a local cluster)."""
    address = flag_value(beam_args, "--dask_client_address")
    if address:
        return address
    path = flag_value(beam_args, "--dask_scheduler_file")
    if not path:
        return None
    try:
        with open(path) as f:
            return str(json.load(f)["address"])
    except (OSError, ValueError, KeyError) as e:
        raise WitError(f"--dask_scheduler_file {path}: no scheduler address in it ({e})") from None


def is_loopback_address(address: str) -> bool:
    """Whether a scheduler address (``tcp://HOST:PORT``, ``HOST:PORT``) is on loopback."""
    if address.startswith("inproc://"):
        return True
    from urllib.parse import urlsplit

    host = urlsplit(address if "://" in address else f"tcp://{address}").hostname or ""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log(msg: str) -> None:
    print(f"wit: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def dask_cluster(
    runner: str | None,
    beam_args: Sequence[str],
    *,
    address: str | None = None,
    workers: int | None = None,
    log: Callable[[str], None] = _log,
) -> Iterator[list[str]]:
    """The Beam args of a run, with the Dask scheduler it uses (``--dask_client_address``).

    For ``--runner dask`` (or Beam's DaskRunner): ``address`` (``--dask-address``) names a
    running scheduler; without it and without Beam's own ``--dask_client_address`` /
    ``--dask_scheduler_file``, a ``LocalCluster`` of ``workers`` worker *processes* (one thread
    each; default one per CPU) is started on 127.0.0.1 for the run and closed when it ends,
    also on error. Other runners get their args back unchanged, and refuse the Dask flags.
    """
    args = list(beam_args)
    if runner_of(args, runner) not in DASK_RUNNERS:
        if address or workers:
            flag = "--dask-address" if address else "--dask-workers"
            raise WitError(f"{flag} needs --runner dask")
        yield args
        return
    if workers is not None and workers < 1:
        raise WitError("--dask-workers must be >= 1")
    given = next((o for o in DASK_ADDRESS_OPTIONS if flag_value(args, o)), None)
    if address and given:
        raise WitError(f"--dask-address and {given}: give one scheduler")
    if address or given:
        if workers:
            raise WitError("--dask-workers starts a local cluster: not with a scheduler address")
        yield [*args, f"--dask_client_address={address}"] if address else args
        return
    try:
        from dask.distributed import LocalCluster
    except ImportError:
        raise WitError("--runner dask needs dask.distributed: pip install -e '.[dask]'") from None
    n = workers or os.cpu_count() or 1
    with LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        log(f"dask: a local cluster of {n} worker process(es) at {cluster.scheduler_address}")
        yield [*args, f"--dask_client_address={cluster.scheduler_address}"]


def _file_identity(path: str) -> list | None:
    """``[size, mtime_ns]`` of a file (``[-1, 0]`` for a directory), ``None`` if not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [-1, 0] if os.path.isdir(path) else [st.st_size, st.st_mtime_ns]


def _probe(files: list[str], probes: list[str]) -> dict:
    """What a worker sees: each file's identity, and the text of each probe file."""

    def text(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return None

    return {"files": [_file_identity(f) for f in files], "probes": [text(p) for p in probes]}


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


@dataclasses.dataclass(frozen=True)
class PathProbe:
    """How a worker's view of one local path is checked: the files it stands for (compared by
    identity) or, for a directory the workers write, a probe file and its token."""

    what: str
    path: str
    files: tuple[str, ...] = ()
    probe: str = ""
    token: str = ""


def unseen_paths(
    probes: Sequence[PathProbe], answers: dict[str, dict]
) -> list[tuple[PathProbe, str]]:
    """``(probe, worker)`` for each path that a worker does not see as the launcher does.

    ``answers``: worker address -> :func:`_probe`'s answer for the files and probe files of
    ``probes``, in order."""
    files = [f for p in probes for f in p.files]
    mine = dict(zip(files, (_file_identity(f) for f in files), strict=True))
    out = []
    for worker, answer in sorted(answers.items()):
        theirs = dict(zip(files, answer["files"], strict=True))
        texts = dict(zip([p.probe for p in probes if p.probe], answer["probes"], strict=True))
        for p in probes:
            if any(theirs[f] != mine[f] for f in p.files) or (
                p.probe and texts[p.probe] != p.token
            ):
                out.append((p, worker))
    return out


def _path_probe(what: str, path: str) -> PathProbe:
    if what == "--output":  # written by the workers: may not exist yet
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".wit-probe-{uuid.uuid4().hex}")
        return PathProbe(what, path, probe=probe, token=uuid.uuid4().hex)
    try:
        files = [_local(f) for f in fileio.expand_inputs([path])]
    except WitError:  # not there (the build says so later) or an empty directory
        files = [path]
    return PathProbe(what, path, files=tuple(files))


def check_dask_worker_paths(
    address: str, paths: Iterable[tuple[str, str]], *, timeout: float = 30
) -> None:
    """Refuse local paths that a worker of the Dask cluster at ``address`` does not see.

    Files (and the files of a directory or glob) are compared by size and modification time as
    each worker and the launcher see them; the output directory, which the workers write, by a
    probe file the launcher writes into it (creating it) and each worker reads. One line
    names the first path that some worker does not see, and that worker.
    """
    probes = [_path_probe(what, _local(p)) for what, p in paths if p and is_local_path(p)]
    if not probes:
        return
    from dask.distributed import Client

    written = [p for p in probes if p.probe]
    try:
        for p in written:
            with open(p.probe, "w") as f:
                f.write(p.token)
        with Client(address, timeout=timeout, set_as_default=False) as client:
            answers = client.run(
                _probe, [f for p in probes for f in p.files], [p.probe for p in written]
            )
    finally:
        for p in written:
            with contextlib.suppress(OSError):
                os.remove(p.probe)
    if not answers:
        raise WitError(f"the Dask scheduler at {address} has no workers")
    bad = unseen_paths(probes, answers)
    if bad:
        p, worker = bad[0]
        raise WitError(
            f"{p.what} {p.path} is a local path that the Dask worker {worker} does not see as "
            "this machine does: put it on a filesystem every worker mounts at the same path "
            "(NFS, Lustre) or in a bucket (gs://, s3://) and pass that (docs/scaling.md)"
        )
