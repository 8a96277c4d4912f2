"""``wit build`` on a real Dask cluster: a scheduler and worker processes started here.

The cluster is what users start by hand or through dask-jobqueue / dask-kubernetes:
``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (loopback: the network jail lets
them talk), not a ``LocalCluster`` inside the test process. A build through it must write the
same shards, byte for byte, and the same counters as a build on FnApiRunner; and a worker
killed (SIGKILL) in the middle of the download step must not change either: Dask recomputes
the tasks it held on the other worker.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import build_fixture as bf
import pyarrow.parquet as pq
import pytest

from wit_pipeline import cli
from wit_pipeline.runners import DASK_RUNNER

pytestmark = [pytest.mark.dask, pytest.mark.slow]

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Cluster:
    """``dask scheduler`` + ``dask worker`` processes, each in its own process group."""

    def __init__(self, directory: pathlib.Path):
        self.dir = directory
        self.scheduler_file = directory / "scheduler.json"
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.dir / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            cwd=self.dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: a kill takes the nanny and its worker
        )
        log.close()

    def start(self, workers: int) -> Cluster:
        self._spawn(
            "scheduler",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--dashboard-address",  # its HTTP server (metrics) on loopback, not 0.0.0.0
            "127.0.0.1:0",
            "--scheduler-file",
            str(self.scheduler_file),
        )
        for i in range(workers):
            self.add_worker(f"w{i}")
        self.wait_for_workers(workers)
        return self

    def add_worker(self, name: str) -> None:
        self._spawn(
            name,
            "worker",
            "--scheduler-file",
            str(self.scheduler_file),
            "--nworkers",
            "1",
            "--nthreads",
            "1",
            "--host",
            "127.0.0.1",
            "--no-dashboard",
            "--dashboard-address",
            "127.0.0.1:0",
            "--name",
            name,
            "--local-directory",
            str(self.dir / name),
        )

    @property
    def address(self) -> str:
        return json.loads(self.scheduler_file.read_text())["address"]

    def client(self):
        from dask.distributed import Client

        return Client(self.address, timeout=60, set_as_default=False)

    def wait_for_workers(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.scheduler_file.exists():
            assert time.monotonic() < deadline, self.logs()
            assert self.procs["scheduler"].poll() is None, self.logs()
            time.sleep(0.1)
        with self.client() as c:
            c.wait_for_workers(n, timeout=max(1.0, deadline - time.monotonic()))

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.dir.glob("*.log"))
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def web(shared_data):
    w = bf.Web(shared_data).start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def inputs(web, tmp_path_factory):
    return web.write(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def reference(web, inputs, shared_data, tmp_path_factory):
    """The same build on FnApiRunner (one process)."""
    out = tmp_path_factory.mktemp("fnapi") / "out"
    assert cli.main(bf.build_args(web, inputs, out, shared_data)) == 0
    return out


@pytest.fixture
def cluster(tmp_path_factory, request):
    c = Cluster(tmp_path_factory.mktemp("dask"))
    request.addfinalizer(c.stop)
    return c.start(workers=2)


def sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(directory: pathlib.Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory``."""
    return {
        str(p.relative_to(directory)): sha(p) for p in sorted(directory.rglob("*")) if p.is_file()
    }


def rows(directory: pathlib.Path) -> list[str]:
    """The rows of every Parquet file in ``directory``, canonical (Beam names its parts by
    bundle count, which is the runner's choice)."""
    out = []
    for p in sorted(directory.glob("*.parquet")):
        out += [json.dumps(r, sort_keys=True, default=str) for r in pq.read_table(p).to_pylist()]
    return sorted(out)


def assert_same_build(out: pathlib.Path, ref: pathlib.Path) -> None:
    for sub in ("shards", "download/shards"):
        got, want = files(out / sub), files(ref / sub)
        assert got == want, sub
    assert sha(out / "query_counts.parquet") == sha(ref / "query_counts.parquet")
    for sub in ("rejected", "gather/rejected", "prebalance/rejected", "download/rejected"):
        assert rows(out / sub) == rows(ref / sub), sub
    for sub in ("gather", "prebalance", "gather/candidates", "prebalance/candidates"):
        assert rows(out / sub) == rows(ref / sub), sub
    for stats in (
        "stats.json",
        "gather/stats.json",
        "prebalance/stats.json",
        "finalize/stats.json",
    ):
        got, want = (json.loads((d / stats).read_text().replace(str(d), "DIR")) for d in (out, ref))
        assert got.pop("runner", None) in (None, DASK_RUNNER)  # gather records where it ran
        want.pop("runner", None)
        assert got == want, stats


def test_build_on_a_dask_cluster_writes_the_same_shards(
    web, inputs, shared_data, reference, cluster, tmp_path
):
    out = tmp_path / "dask"
    args = bf.build_args(web, inputs, out, shared_data)
    assert cli.main([*args, "--runner", "dask", "--dask-address", cluster.address]) == 0, (
        cluster.logs()
    )
    assert_same_build(out, reference)


def downloading_worker(cluster: Cluster, port: int) -> str | None:
    """The worker whose process holds a connection to the web server (a held image request)."""
    import psutil

    for name, proc in cluster.procs.items():
        if name == "scheduler" or proc.poll() is not None:
            continue
        with contextlib.suppress(psutil.Error):
            tree = psutil.Process(proc.pid)
            for p in [tree, *tree.children(recursive=True)]:
                if any(c.raddr and c.raddr[1] == port for c in p.net_connections("tcp")):
                    return name
    return None


def test_a_worker_killed_during_the_download_changes_nothing(
    web, inputs, shared_data, reference, cluster, tmp_path
):
    out = tmp_path / "dask-killed"
    args = bf.build_args(web, inputs, out, shared_data)
    web.server.requests.clear()
    web.gate.close(allow=0)  # hold every image request: a worker that downloads waits here
    result: dict[str, int] = {}
    launcher = threading.Thread(
        target=lambda: result.update(
            rc=cli.main([*args, "--runner", "dask", "--dask-address", cluster.address])
        )
    )
    launcher.start()
    try:
        deadline = time.monotonic() + 240
        victim = None
        while victim is None and time.monotonic() < deadline:
            assert launcher.is_alive(), cluster.logs()
            time.sleep(0.1)
            if web.gate.waiting:
                victim = downloading_worker(cluster, web.server.port)
        assert victim, "no worker ever waited on an image request"
        cluster.kill(victim)  # SIGKILL, nanny and worker: it does not come back
    finally:
        web.gate.open()
        launcher.join(timeout=600)
    assert result.get("rc") == 0, cluster.logs()
    assert_same_build(out, reference)
    # The killed worker's download ran again on the other one: its image requests came twice.
    images = collections.Counter(p for _, p in web.server.requests if p.startswith("/img/"))
    assert max(images.values()) == 2, images
