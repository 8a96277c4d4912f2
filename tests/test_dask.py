"""``--runner dask`` on a real Dask cluster: a scheduler and worker processes started here.

The cluster is what users start by hand or through dask-jobqueue / dask-kubernetes:
``dask scheduler`` and two ``dask worker`` processes (one thread each) on 127.0.0.1 (loopback:
the network jail lets them talk), not a ``LocalCluster`` inside the test process. On it:

- the Beam model as the pipelines use it (tagged outputs, every sink, ``finish_bundle``
  outputs, side inputs, combines, string-keyed groups, reads and writes), which Beam's own
  DaskRunner translation loses (docs/scaling.md), and what the runner refuses;
- the workers' view of the launcher's paths (``runners.check_dask_worker_paths``);
- ``wit build``: the same shards (every tar and Parquet file byte for byte), rows and counters
  as a build on FnApiRunner; ``wit queries build`` the same list;
- ``wit score --dask-workers 2``: a local cluster started and closed by the command;
- last, a worker SIGKILLed in the middle of the download step: Dask recomputes its tasks on the
  other worker and the build is still the FnApiRunner one, byte for byte.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import apache_beam as beam
import build_fixture as bf
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wit_pipeline import build, cli, runners
from wit_pipeline.runners import DASK_RUNNER

pytestmark = [pytest.mark.dask, pytest.mark.slow]

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYTHONPATH = os.environ["PYTHONPATH"]  # conftest.py: the jail's sitecustomize and ROOT


class Cluster:
    """``dask scheduler`` + ``dask worker`` processes, each in its own process group."""

    def __init__(self, directory: pathlib.Path):
        self.dir = directory
        self.scheduler_file = directory / "scheduler.json"
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.dir / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        # Workers import what the pipelines pickle by reference: wit_pipeline (on PYTHONPATH
        # already, conftest.py) and the DoFns defined in this module.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), PYTHONPATH])}
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            cwd=self.dir,
            env=env,
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
def reference(web, inputs, shared_data, tmp_path_factory):
    """The same build on FnApiRunner (one process)."""
    out = tmp_path_factory.mktemp("fnapi") / "out"
    assert cli.main(bf.build_args(web, inputs, out, shared_data)) == 0
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    """Two single-thread workers; the last test of the module kills one of them."""
    c = Cluster(tmp_path_factory.mktemp("dask"))
    request.addfinalizer(c.stop)
    return c.start(workers=2)


def dask_options(cluster: Cluster, *extra: str):
    from wit_pipeline import beam_utils

    return beam_utils.pipeline_options(
        ["--runner", "dask", f"--dask_client_address={cluster.address}", *extra]
    )


# ---------------------------------------------------------------------------------------------
# The Beam model on Dask: what Beam's own DaskRunner translation loses


class _Tagged(beam.DoFn):
    def process(self, x):
        yield x if x % 2 else beam.pvalue.TaggedOutput("even", x)


class _InFinishBundle(beam.DoFn):
    """Emits everything in finish_bundle (as BatchElements does with its last batch)."""

    def start_bundle(self):
        self.seen = []

    def process(self, x):
        self.seen.append(x)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        for x in self.seen:
            yield GlobalWindows.windowed_value(x * 10)


@pytest.mark.parametrize(
    "shuffle",
    [["--dask_shuffle_method=p2p", "--dask_npartitions=5"], ["--dask_shuffle_method=tasks"]],
    ids=["p2p", "tasks"],
)
def test_the_beam_model_on_the_cluster(cluster, tmp_path, shuffle):
    from apache_beam.testing.util import assert_that, equal_to

    for i in range(3):
        pq.write_table(pa.table({"a": list(range(i * 4, i * 4 + 4))}), tmp_path / f"in-{i}.parquet")
    words = ["b", "a", "c", "a", "b", "a"]
    with beam.Pipeline(options=dask_options(cluster, *shuffle)) as p:
        xs = p | "Xs" >> beam.Create(range(10))
        tagged = xs | "Tag" >> beam.ParDo(_Tagged()).with_outputs("even", main="odd")
        assert_that(tagged.odd, equal_to([1, 3, 5, 7, 9]), label="Odd")
        assert_that(tagged.even, equal_to([0, 2, 4, 6, 8]), label="Even")
        assert_that(xs | beam.ParDo(_InFinishBundle()), equal_to(range(0, 100, 10)), label="FB")
        batches = xs | beam.BatchElements(min_batch_size=4, max_batch_size=4)
        # Batches are cut per bundle; the last one of each leaves in finish_bundle.
        assert_that(batches | beam.FlatMap(lambda b: b), equal_to(range(10)), label="Batched")
        ws = p | "Words" >> beam.Create(words)
        counts = ws | "Count" >> beam.combiners.Count.PerElement()
        assert_that(counts, equal_to([("a", 3), ("b", 2), ("c", 1)]), label="PerKey")
        grouped = (
            ws
            | "Pair" >> beam.Map(lambda w: ((w, len(w)), 1))
            | beam.GroupByKey()
            | beam.MapTuple(lambda k, vs: (k, sum(vs)))
        )
        assert_that(grouped, equal_to([(("a", 1), 3), (("b", 1), 2), (("c", 1), 1)]), label="GBK")
        # Values come in input order (Create's partitions are contiguous), whatever order the
        # shuffle delivered its pieces in.
        ordered = (
            p
            | "Keyed" >> beam.Create([(i % 7, i) for i in range(2000)])
            | "GBKOrder" >> beam.GroupByKey()
            | beam.MapTuple(lambda k, vs: (k, list(vs) == sorted(vs), len(vs)))
        )
        assert_that(
            ordered, equal_to([(k, True, len(range(k, 2000, 7))) for k in range(7)]), label="Order"
        )
        total = xs | "Sum" >> beam.CombineGlobally(sum)
        empty = p | "None" >> beam.Create([]) | "SumNone" >> beam.CombineGlobally(sum)
        side = xs | "Side" >> beam.Map(
            lambda x, t, e, d, ls: (x, t, e, d[x % 3], len(ls)),
            beam.pvalue.AsSingleton(total),
            beam.pvalue.AsSingleton(empty),
            beam.pvalue.AsDict(xs | "Mod" >> beam.Map(lambda x: (x, -x))),
            beam.pvalue.AsList(ws),
        )
        assert_that(side, equal_to([(x, 45, 0, -(x % 3), 6) for x in range(10)]), label="Sides")
        joined = (
            {
                "x": xs | "KX" >> beam.Map(lambda x: (x % 2, x)),
                "w": ws | "KW" >> beam.Map(lambda w: (len(w) - 1, w)),
            }
            | beam.CoGroupByKey()
            | beam.MapTuple(lambda k, d: (k, sorted(d["x"]), sorted(d["w"])))
        )
        assert_that(
            joined,
            equal_to([(0, [0, 2, 4, 6, 8], sorted(words)), (1, [1, 3, 5, 7, 9], [])]),
            label="CoGBK",
        )
        both = (xs, xs | "Neg" >> beam.Map(lambda x: -x)) | beam.Flatten() | beam.Reshuffle()
        assert_that(both, equal_to([*range(10), *range(0, -10, -1)]), label="Flatten")
        parts = xs | beam.Partition(lambda x, n: x % n, 3)
        assert_that(parts[2], equal_to([2, 5, 8]), label="Partition")
        rows = p | beam.io.ReadFromParquet(str(tmp_path / "in-*.parquet"))
        assert_that(rows | beam.Map(lambda r: r["a"]), equal_to(range(12)), label="Read")
        _ = rows | beam.io.WriteToParquet(
            str(tmp_path / "out" / "part"), schema=pa.schema([("a", pa.int64())])
        )
    written = pq.read_table(tmp_path / "out").column("a").to_pylist()
    assert sorted(written) == list(range(12))


class _CountedSetup(beam.DoFn):
    """Leaves a file per setup and per teardown in ``directory`` (workers are processes)."""

    def __init__(self, directory: str):
        self.directory = directory

    def setup(self):
        import uuid

        self.id = uuid.uuid4().hex
        pathlib.Path(self.directory, f"setup-{self.id}").touch()

    def process(self, x):
        yield x + 1

    def teardown(self):
        pathlib.Path(self.directory, f"teardown-{self.id}").touch()


def test_a_dofn_is_set_up_once_per_worker_and_run(cluster, tmp_path):
    """Bundles (partitions) reuse a set-up instance, as on Beam's other runners; the next
    pipeline run tears the previous run's instances down."""
    from apache_beam.testing.util import assert_that, equal_to

    def files(prefix):
        return sorted(f.name.split("-", 1)[1] for f in tmp_path.glob(f"{prefix}-*"))

    for run in range(2):
        with beam.Pipeline(options=dask_options(cluster, "--dask_npartitions=12")) as p:
            out = p | beam.Create(range(100)) | beam.ParDo(_CountedSetup(str(tmp_path)))
            assert_that(out, equal_to(range(1, 101)))
        if run == 0:
            first = files("setup")
            assert 1 <= len(first) <= 2  # one per worker (single-thread), not one per partition
    assert 2 <= len(files("setup")) <= 4
    assert set(first) <= set(files("teardown"))  # the second run tore the first run's down


def test_the_dofn_pool_tears_down_what_an_earlier_run_left():
    from wit_pipeline import dask_tasks

    class Fn:
        torn = 0

        def teardown(self):
            Fn.torn += 1

    pool = dask_tasks.DoFnPool()
    a, b = (Fn(), "spec"), (Fn(), "spec")
    assert pool.take("run1", b"x") is None
    pool.give("run1", b"x", a)
    assert pool.take("run1", b"y") is None  # another DoFn of the same run
    assert pool.take("run1", b"x") is a
    pool.give("run1", b"x", a)
    assert pool.take("run2", b"x") is None and Fn.torn == 1  # run1's idle instance torn down
    pool.give("run1", b"x", b)  # a late bundle of run1 comes back after run2 started
    assert Fn.torn == 2 and pool.take("run2", b"x") is None


def _translate(pipeline: beam.Pipeline, partitions: int, shuffle_method: str = "tasks"):
    """The pipeline as this runner's translator builds it (in-memory shuffles), no cluster;
    rebuilt from its protos first, as ``Pipeline.run`` does."""
    from wit_pipeline import dask_runner

    pipeline = beam.Pipeline.from_runner_api(
        pipeline.to_runner_api(), pipeline.runner, pipeline._options
    )
    pipeline.replace_all(dask_runner._overrides())
    translator = dask_runner._Translator(partitions, None, shuffle_method=shuffle_method)
    translator.translate(pipeline)
    return {pc.producer.full_label: bag for pc, bag in translator.bags.items()}


class _MaxMerged(beam.CombineFn):
    """Sums, and reports the most accumulators any one merge received."""

    def create_accumulator(self):
        return (0, 1)

    def add_input(self, acc, x):
        return acc[0] + x, acc[1]

    def merge_accumulators(self, accs):
        accs = list(accs)
        return sum(a[0] for a in accs), max(len(accs), *(a[1] for a in accs))

    def extract_output(self, acc):
        return acc


def test_a_global_combine_merges_a_few_accumulators_at_a_time():
    """``CombineGlobally`` over 100 partitions: a tree of merges of at most ``COMBINE_FAN_IN``
    accumulators (through a shuffle, one merge received all 100); ``CombinePerKey`` is still
    shuffled, and both are exact."""
    import dask

    from wit_pipeline import dask_runner

    p = beam.Pipeline()
    xs = p | beam.Create(range(1000))
    _ = xs | "Total" >> beam.CombineGlobally(_MaxMerged())
    _ = xs | beam.Map(lambda x: (x % 3, x)) | "PerKey" >> beam.CombinePerKey(_MaxMerged())
    bags = _translate(p, 100)
    (got_total,), got_per_key = dask.compute(
        bags["Total/InjectDefault"], bags["PerKey"], scheduler="sync"
    )
    assert got_total == (499500, dask_runner.COMBINE_FAN_IN)
    assert sorted((k, s) for k, (s, _) in got_per_key) == [
        (r, sum(range(r, 1000, 3))) for r in range(3)
    ]
    assert {merged for _, (_, merged) in got_per_key} == {100}  # one merge: all partitions


def test_int_keys_get_a_partition_each():
    """101 dense int keys (gather's output buckets at 10M pairs) onto 160 partitions: one key per
    partition, so no merge task holds two buckets (by CRC-32, 24 partitions got two or three);
    string keys still spread by their hash, and both groupings are exact."""
    import dask

    p = beam.Pipeline()
    xs = p | beam.Create(range(1010))
    _ = xs | "ByInt" >> beam.Map(lambda x: (x % 101, x)) | "G" >> beam.GroupByKey()
    _ = xs | "ByStr" >> beam.Map(lambda x: (f"k{x % 101}", x)) | "S" >> beam.GroupByKey()
    bags = _translate(p, 160)  # the split is the same function for P2P
    by_int = dask.compute(*bags["G"].to_delayed(), scheduler="sync")
    by_str = dask.compute(*bags["S"].to_delayed(), scheduler="sync")
    assert sorted(len(part) for part in by_int if part) == [1] * 101
    assert max(len(part) for part in by_str) > 1
    for parts, key in ((by_int, lambda r: r), (by_str, lambda r: f"k{r}")):
        got = sorted((k, sorted(vs)) for part in parts for k, vs in part)
        assert got == sorted((key(r), list(range(r, 1010, 101))) for r in range(101))


def test_reads_and_shuffles_that_feed_side_input_pardos_wait_for_the_side_inputs(tmp_path):
    """A read, or a shuffle, that starts a chain of ParDos with side inputs is gated on those
    side inputs (its tasks depend on them, so its output is not held while they are computed);
    a chain whose side input depends on it is not (a cycle), and every result is exact."""
    import dask
    from dask.core import get_dependencies

    pq.write_table(pa.table({"a": list(range(20))}), tmp_path / "in.parquet")
    p = beam.Pipeline()
    total = p | "Ys" >> beam.Create(range(5)) | "Total" >> beam.CombineGlobally(sum)
    side = beam.pvalue.AsSingleton(total)
    rows = p | "Read" >> beam.io.ReadFromParquet(str(tmp_path / "in.parquet"))
    _ = rows | "A" >> beam.Map(lambda r: r["a"]) | "Add" >> beam.Map(lambda a, t: a + t, side)
    _ = (
        p
        | "Zs" >> beam.Create(range(6), reshuffle=False)
        | "Spread" >> beam.Reshuffle()
        | "Mul" >> beam.Map(lambda z, t: z * t, side)
    )
    xs = p | "Xs" >> beam.Create(range(4), reshuffle=False) | "XSpread" >> beam.Reshuffle()
    own = beam.pvalue.AsSingleton(xs | "XTotal" >> beam.CombineGlobally(sum))
    _ = xs | "Own" >> beam.Map(lambda x, t: (x, t), own)  # its side input needs xs: no gate
    bags = _translate(p, 3)

    def waits(label: str, producer: str) -> bool:
        """Whether every task of ``producer``'s partitions depends on a side input."""
        dsk = dict(bags[label].__dask_graph__())
        mine = [k for k in dsk if str(k[0] if isinstance(k, tuple) else k).startswith(producer)]
        assert mine
        return all(any(str(d).startswith("side-") for d in get_dependencies(dsk, k)) for k in mine)

    assert waits("Add", "Read/Read-")
    assert waits("Mul", "Spread-")  # the shuffle's merges
    assert not waits("Own", "XSpread-")
    add, mul, own_ = dask.compute(bags["Add"], bags["Mul"], bags["Own"], scheduler="sync")
    assert sorted(add) == [a + 10 for a in range(20)]
    assert sorted(mul) == [z * 10 for z in range(6)]
    assert sorted(own_) == [(x, 6) for x in range(4)]


def test_a_p2p_shuffle_merges_each_partition_before_it_unpacks_the_next():
    """Within a P2P shuffle, transfers outrank splits and merges outrank unpacks (half a step),
    all below the next transform: a worker does not unpack partitions ahead of their merges."""
    p = beam.Pipeline()
    pairs = p | beam.Create([(i % 3, i) for i in range(30)])
    _ = pairs | "G" >> beam.GroupByKey() | "After" >> beam.MapTuple(lambda k, vs: (k, sum(vs)))
    bags = _translate(p, 4, shuffle_method="p2p")
    merged = bags["G"]
    layers = merged.__dask_graph__().layers
    priority = {
        role: layers[f"{merged.name}-{role}"].annotations["priority"]
        for role in ("split", "send", "unpack")
    }
    priority["merge"] = layers[merged.name].annotations["priority"]
    after = bags["After"].__dask_graph__().layers[bags["After"].name].annotations["priority"]
    assert priority["send"] == priority["split"] + 0.5
    assert priority["merge"] == priority["unpack"] + 0.5 == priority["split"] + 0.5 < after


class _Stateful(beam.DoFn):
    STATE = beam.transforms.userstate.BagStateSpec("seen", beam.coders.VarIntCoder())

    def process(self, kv, seen=beam.DoFn.StateParam(STATE)):  # noqa: B008 (Beam's idiom)
        seen.add(kv[1])
        yield kv


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (
            lambda xs: xs | beam.WindowInto(beam.window.FixedWindows(10)),
            "only the global window is supported",
        ),
        (
            lambda xs: xs | beam.Map(lambda x: (x, x)) | beam.ParDo(_Stateful()),
            "stateful DoFns are not supported",
        ),
    ],
)
def test_what_the_runner_cannot_do_is_refused_before_anything_runs(cluster, graph, message):
    p = beam.Pipeline(options=dask_options(cluster))
    graph(p | beam.Create([1, 2]))
    with pytest.raises(NotImplementedError, match=message):
        p.run()


def test_workers_are_asked_whether_they_see_the_launchers_files(cluster, tmp_path):
    """``runners.check_dask_worker_paths`` against real workers (they share this disk)."""
    queries = tmp_path / "q.txt"
    queries.write_text("dog\n")
    out = tmp_path / "out"
    paths = [("--queries", str(queries)), ("--output", str(out)), ("--input", "gs://b/x.warc")]
    runners.check_dask_worker_paths(cluster.address, paths)
    assert out.is_dir() and list(out.iterdir()) == []  # the probe file is gone


# ---------------------------------------------------------------------------------------------
# wit build on the cluster


def sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(directory: pathlib.Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory``."""
    return {
        str(p.relative_to(directory)): sha(p) for p in sorted(directory.rglob("*")) if p.is_file()
    }


def rows(directory: pathlib.Path) -> list[str]:
    """The rows of every Parquet file in ``directory``, canonical (Beam names its parts by
    bundle count, which is the runner's choice), without ``policy_fetched``: the time a run
    fetched a robots.txt or TDMRep file, which two runs cannot share (``policy_url`` and the
    decision stay)."""
    out = []
    for p in sorted(directory.glob("*.parquet")):
        for r in pq.read_table(p).to_pylist():
            r.pop("policy_fetched", None)
            out.append(json.dumps(r, sort_keys=True, default=str))
    return sorted(out)


def assert_same_build(out: pathlib.Path, ref: pathlib.Path, *, copied_from: str = "") -> None:
    """Same shards (tar and Parquet bytes), rows, query counts and counters; ``copied_from``:
    the build ``out`` was copied from, whose path its earlier steps' stats name."""
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
        got, want = (
            json.loads(
                (d / stats).read_text().replace(copied_from or str(d), "DIR").replace(str(d), "DIR")
            )
            for d in (out, ref)
        )
        assert got.pop("runner", None) in (None, DASK_RUNNER)  # gather records where it ran
        want.pop("runner", None)
        assert got == want, stats


@pytest.fixture(scope="module")
def dask_build(web, inputs, shared_data, cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("dask") / "out"
    args = bf.build_args(web, inputs, out, shared_data)
    rc = cli.main([*args, "--runner", "dask", "--dask-address", cluster.address])
    assert rc == 0, cluster.logs()
    return out


def test_build_on_a_dask_cluster_writes_the_same_shards(dask_build, reference):
    assert_same_build(dask_build, reference)


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory):
    """A random wit-nano CLIP saved as a plain open_clip state dict (no training needed)."""
    return bf.write_seed_checkpoint(tmp_path_factory.mktemp("seed"))


def spawned_children() -> set[int]:
    """This process's descendants that multiprocessing spawned (Dask's worker processes)."""
    import psutil

    out = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("spawn_main" in part for part in child.cmdline()):
                out.add(child.pid)
    return out


def test_score_on_a_local_cluster_started_for_the_run(reference, seed_checkpoint, tmp_path, capsys):
    argv = ["score", "--input", str(reference / "shards"), "--pretrained", seed_checkpoint]
    argv += ["--model", "wit-nano", "--keep-fraction", "0.5"]
    assert cli.main([*argv, "--output", str(tmp_path / "fnapi")]) == 0
    before = spawned_children()
    dask = ["--runner", "dask", "--dask-workers", "2"]
    assert cli.main([*argv, "--output", str(tmp_path / "dask"), *dask]) == 0
    assert "dask: a local cluster of 2 worker process(es) at tcp://127.0.0.1:" in (
        capsys.readouterr().err
    )
    assert spawned_children() <= before  # the cluster's worker processes are gone
    for sub in ("shards", "scores"):
        assert files(tmp_path / "dask" / sub) == files(tmp_path / "fnapi" / sub), sub
    assert rows(tmp_path / "dask" / "rejected") == rows(tmp_path / "fnapi" / "rejected")
    stats = [json.loads((tmp_path / d / "stats.json").read_text()) for d in ("dask", "fnapi")]
    assert stats[0]["counters"] == stats[1]["counters"]
    samples = json.loads((reference / "shards" / "manifest.json").read_text())["num_samples"]
    c = stats[0]["counters"]
    assert c["input"] == samples and c["kept"] + c["dropped:low_clip_score"] == samples


def test_query_list_build_on_the_cluster(cluster, tmp_path):
    import bz2
    import gzip

    from wit_pipeline.queries import default, wikipedia

    xml = bz2.decompress(pathlib.Path(default.gensim_dump_path()).read_bytes())
    head, *pages = xml.split(b"<page>")
    small = head + b"".join(b"<page>" + p for p in pages[:40]).split(b"</mediawiki>")[0]
    dump = tmp_path / "enwiki-20160101-pages-articles-multistream.xml.bz2"
    dump.write_bytes(wikipedia.multistream_bytes(small + b"</mediawiki>\n", pages_per_stream=10))
    views = tmp_path / "pageviews-20240101-000000.gz"
    views.write_bytes(gzip.compress(b"en Golden_retriever 120 0\nen.m Hot_dog 90 0\nen Rare 1 0\n"))
    argv = ["queries", "build", "--dump", str(dump), "--pageviews", str(views)]
    argv += ["--set", "queries.split_bytes=20000", "--set", "queries.bigrams.min_count=3"]
    argv += ["--set", "queries.unigrams.min_count=5"]
    assert cli.main([*argv, "--output", str(tmp_path / "fnapi" / "q.txt")]) == 0
    dask = ["--runner", "dask", "--dask-address", cluster.address]
    assert cli.main([*argv, "--output", str(tmp_path / "dask" / "q.txt"), *dask]) == 0
    got, want = ((tmp_path / d / "q.txt").read_text() for d in ("dask", "fnapi"))
    assert got == want and len(want.splitlines()) > 100
    manifests = [json.loads((tmp_path / d / "q.json").read_text()) for d in ("dask", "fnapi")]
    assert manifests[0]["sources"] == manifests[1]["sources"]


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
    web, inputs, shared_data, reference, cluster, dask_build, tmp_path
):
    """Resumes the Dask build from its download step (gather and prebalance are kept) and
    SIGKILLs a worker while it waits on an image request: the other one redoes its tasks."""
    out = tmp_path / "dask-killed"
    shutil.copytree(dask_build, out)
    for step in ("download", "finalize", "report"):
        build.clear_step(str(out), step)
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
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "done").iterdir()}
    assert markers["gather"] == json.loads((dask_build / "done" / "gather.json").read_text())
    assert_same_build(out, reference, copied_from=str(dask_build))
    # The killed worker's download ran again on the other one: its image requests came twice.
    images = collections.Counter(p for _, p in web.server.requests if p.startswith("/img/"))
    assert max(images.values()) == 2, images
