"""The functions that the Dask runner's tasks run on the workers.

``wit_pipeline.dask_runner`` translates a pipeline into a Dask graph whose tasks call these
functions; they live at module level so that Dask pickles them by reference. Running a DoFn
(a set-up instance reused from bundle to bundle through this worker's ``DoFnPool``), the
splits and merges of the shuffles (``partition_of``: an int key modulo the partitions, any
other key by a hash of its deterministic Beam encoding; lifted combines; round-robin
rebalances) and the frames that carry their lists through Dask's P2P shuffle, and the reads of
a bounded source.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import threading
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.internal import pickler
from apache_beam.runners.common import DoFnRunner, DoFnState, Receiver
from apache_beam.transforms.core import CombineFn
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils import counters as beam_counters

_LOG = logging.getLogger(__name__)


def _windowed(value: Any):
    return GlobalWindows.windowed_value(value)


class _Collect(Receiver):
    """Receives one output tag's elements into a list (windows dropped: global window only)."""

    def __init__(self, out: list):
        self.out = out

    def receive(self, windowed_value) -> None:
        self.out.append(windowed_value.value)


class _Receivers(dict):
    """Tag -> receiver; outputs to undeclared tags are discarded, as on Beam's other runners."""

    def __missing__(self, tag):
        return _Collect([])


_NOTHING = object()


class DoFnPool:
    """Set-up DoFn instances of one worker process, reused from bundle to bundle.

    Beam's runners set a DoFn instance up once and run many bundles through it; setups can be
    costly (gather's builds a 500k-query automaton and loads fastText: seconds, and hundreds of
    MB, per instance). Here a bundle is a partition, one task: without reuse, every task paid
    the setup. Instances are keyed by the pipeline run and the DoFn's pickled spec; one is
    taken by one task at a time (a worker with several threads sets up one per thread in use).
    When a task of a new run arrives, the idle instances of earlier runs are torn down, so a
    long-lived cluster holds one pipeline's DoFns at a time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: str | None = None
        self._idle: dict[bytes, list] = {}

    def take(self, run: str, spec: bytes):
        """A set-up instance for ``spec`` (its unpickled spec tuple), or ``None``."""
        with self._lock:
            if run != self._run:
                stale, self._idle, self._run = self._idle, {}, run
            else:
                stale = {}
                idle = self._idle.get(spec)
                if idle:
                    return idle.pop()
        for instances in stale.values():
            for unpacked in instances:
                _teardown(unpacked[0])
        return None

    def give(self, run: str, spec: bytes, unpacked: tuple) -> None:
        with self._lock:
            if run == self._run:
                self._idle.setdefault(spec, []).append(unpacked)
                return
        _teardown(unpacked[0])  # a task of a newer run has started meanwhile


def _teardown(fn) -> None:
    try:
        fn.teardown()
    except Exception:  # teardown is best effort, as on Beam's other runners
        _LOG.warning("DoFn teardown failed", exc_info=True)


def _dofn_pool() -> DoFnPool | None:
    """This worker's pool (kept on the Dask worker object); ``None`` outside a worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    pool = getattr(worker, "_wit_dofn_pool", None)
    if pool is None:
        pool = worker._wit_dofn_pool = DoFnPool()
    return pool


def run_dofn(items: Iterable[Any], env: dict[str, str], run: str, spec: bytes, *sides: list) -> Any:
    """Run one bundle (a partition) through a set-up copy of the DoFn.

    ``env`` is set first (where the worker has no value), before unpickling imports the DoFn's
    modules. The copy comes from this worker's ``DoFnPool`` when one of the same pipeline run
    (``run``) is idle, else it is unpickled and set up; it goes back after the bundle, and is
    torn down if the bundle fails. An empty partition is no bundle, as on Beam's other
    runners: no DoFn is set up for it (a shuffle with fewer keys than partitions leaves some
    empty). Returns the list of main outputs for a single-output ParDo, else
    ``{tag: [outputs]}``.
    """
    iterator = iter(items)
    first = next(iterator, _NOTHING)
    for k, v in env.items():
        os.environ.setdefault(k, v)
    pool = _dofn_pool()
    unpacked = pool.take(run, spec) if pool else None
    fresh = unpacked is None
    if fresh:
        unpacked = pickler.loads(spec)
    fn, args, kwargs, views, tags, label = unpacked
    outputs: dict[Any, list] = {tag: [] for tag in tags}
    if first is _NOTHING:
        if pool and not fresh:
            pool.give(run, spec, unpacked)
        return outputs[None] if tags == [None] else outputs
    side_maps = [
        SideInputMap(view, options, [_windowed(v) for v in values])
        for (view, options), values in zip(views, sides, strict=True)
    ]
    receivers = _Receivers({tag: _Collect(out) for tag, out in outputs.items()})
    runner = DoFnRunner(
        fn,
        args,
        kwargs,
        side_maps,
        beam.Windowing(GlobalWindows()),
        tagged_receivers=receivers,
        step_name=label,
        state=DoFnState(beam_counters.CounterFactory()),
    )
    if fresh:
        runner.setup()
    try:
        runner.start()
        runner.process(_windowed(first))
        for item in iterator:
            runner.process(_windowed(item))
        runner.finish()
    except BaseException:
        runner.teardown()
        raise
    if pool:
        pool.give(run, spec, unpacked)
    else:
        runner.teardown()
    return outputs[None] if tags == [None] else outputs


def gated(fn, n: int, *args: Any) -> Any:
    """``fn(*args[n:])``: the first ``n`` arguments are values the task only waits for."""
    return fn(*args[n:])


def select(outputs: dict, tag: Any) -> list:
    return outputs[tag]


def concat(parts: Sequence[Iterable[Any]]) -> list:
    return [x for part in parts for x in part]


def concat_lists(*parts: Iterable[Any]) -> list:
    return concat(parts)


def _dumps(obj: Any) -> bytes:
    """Pickle ``obj``: plain pickle (fast on lists of records), cloudpickle for what plain
    pickle refuses (values that Dask itself would move with cloudpickle)."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError):
        import cloudpickle

        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def frame_meta():
    """The frame of a P2P shuffle: one row per (input partition, non-empty output list)."""
    import pandas as pd

    return pd.DataFrame(
        {
            "_partitions": pd.Series([], dtype="int64"),  # the output partition
            "input": pd.Series([], dtype="int64"),  # the input partition (merge order)
            "blob": pd.Series([], dtype=object),  # the pickled list
        }
    )


def split_to_frame(split, index: int, *args: Any):
    """Run ``split`` (one input partition -> ``n`` lists) and make the lists a frame of pickled
    rows for the P2P shuffle: row ``j`` goes to output partition ``j``."""
    import numpy as np
    import pandas as pd

    rows = [(j, _dumps(bucket)) for j, bucket in enumerate(split(*args)) if bucket]
    return pd.DataFrame(
        {
            "_partitions": np.array([j for j, _ in rows], dtype=np.int64),
            "input": np.full(len(rows), index, dtype=np.int64),
            "blob": pd.Series([b for _, b in rows], dtype=object),
        }
    )


def merge_frame(merge, frame) -> Any:
    """``merge`` of one output partition's lists, in input partition order (a GroupByKey's
    values come in input order, as with the in-memory shuffle)."""
    order = frame["input"].to_numpy().argsort(kind="stable")
    blobs = frame["blob"].to_numpy()
    return merge(*(pickle.loads(blobs[i]) for i in order))


def _key_bytes(key: Any, coder) -> bytes:
    try:
        return coder.encode(key)
    except Exception as e:  # a key type without a deterministic encoding
        raise TypeError(
            f"GroupByKey on Dask needs keys with a deterministic encoding; {key!r}: {e}"
        ) from e


def partition_of(key: Any, kb: bytes, n: int) -> int:
    """The output partition of a shuffled key (``kb``: its deterministic encoding).

    An ``int`` key goes to partition ``key mod n``: such keys are mostly dense numbers (gather's
    output buckets, shard indexes), and up to ``n`` of them then get a partition each. By hash,
    gather's 101 buckets at 10M pairs put two or three into 24 of 160 partitions, and each of
    those merge tasks held them all. Any other key goes by the CRC-32 of its encoding (Python's
    ``hash`` of a string differs between processes).
    """
    if type(key) is int:
        return key % n
    return zlib.crc32(kb) % n


def split_pairs(items: Iterable[tuple[Any, Any]], n: int, coder) -> list[list]:
    """``(key, value)`` pairs -> ``n`` lists of ``(encoded key, value)`` by ``partition_of``."""
    buckets: list[list] = [[] for _ in range(n)]
    for k, v in items:
        kb = _key_bytes(k, coder)
        buckets[partition_of(k, kb, n)].append((kb, v))
    return buckets


def _by_key(buckets: Sequence[list]) -> dict[bytes, list]:
    groups: dict[bytes, list] = {}
    for bucket in buckets:
        for kb, v in bucket:
            g = groups.get(kb)
            if g is None:
                groups[kb] = g = []
            g.append(v)
    return groups


def group(*buckets: list, coder) -> list[tuple[Any, list]]:
    """One output partition of a GroupByKey: ``(key, values)``, values in input order."""
    return [(coder.decode(kb), vs) for kb, vs in _by_key(buckets).items()]


def accumulate(items: Iterable[tuple[Any, Any]], coder, fn_blob: bytes) -> list[tuple[bytes, Any]]:
    """One partition's ``(key, value)`` pairs -> ``(encoded key, accumulator)``, one per key."""
    fn: CombineFn = pickler.loads(fn_blob)
    fn.setup()
    try:
        accs: dict[bytes, Any] = {}
        for k, v in items:
            kb = _key_bytes(k, coder)
            acc = accs[kb] if kb in accs else fn.create_accumulator()
            accs[kb] = fn.add_input(acc, v)
        return [(kb, fn.compact(acc)) for kb, acc in accs.items()]
    finally:
        fn.teardown()


def precombine(items: Iterable[tuple[Any, Any]], n: int, coder, fn_blob: bytes) -> list[list]:
    """One partition's ``(key, value)`` pairs -> per-key accumulators, split by
    ``partition_of``."""
    buckets: list[list] = [[] for _ in range(n)]
    for kb, acc in accumulate(items, coder, fn_blob):
        buckets[partition_of(coder.decode(kb), kb, n)].append((kb, acc))
    return buckets


def merge_accumulated(*buckets: list, fn_blob: bytes) -> list[tuple[bytes, Any]]:
    """Lists of ``(encoded key, accumulator)`` -> one, merged per key (a combine tree's node)."""
    fn: CombineFn = pickler.loads(fn_blob)
    fn.setup()
    try:
        return [
            (kb, fn.compact(fn.merge_accumulators(accs))) for kb, accs in _by_key(buckets).items()
        ]
    finally:
        fn.teardown()


def merge_combine(*buckets: list, coder, fn_blob: bytes) -> list[tuple[Any, Any]]:
    """One output partition of a CombinePerKey: merged accumulators, extracted."""
    fn: CombineFn = pickler.loads(fn_blob)
    fn.setup()
    try:
        return [
            (coder.decode(kb), fn.extract_output(fn.merge_accumulators(accs)))
            for kb, accs in _by_key(buckets).items()
        ]
    finally:
        fn.teardown()


def deal(items: Iterable[Any], offset: int, n: int) -> list[list]:
    """Round-robin ``items`` into ``n`` lists, starting at ``offset`` (the partition's index, so
    that the first items of every partition do not all go to the same list)."""
    buckets: list[list] = [[] for _ in range(n)]
    for i, x in enumerate(items):
        buckets[(offset + i) % n].append(x)
    return buckets


def _split_source(source, n: int) -> list:
    """A bounded source's bundles (on a worker: it lists the files the launcher may not see)."""
    try:
        size = source.estimate_size() or 0
    except Exception:  # estimating is an optimisation; some sources cannot
        size = 0
    desired = max(1 << 20, math.ceil(size / max(n, 1))) if size else 64 << 20
    return list(source.split(desired))


def _bundle_key(bundle) -> tuple[str, str]:
    return str(getattr(bundle.source, "_file_name", "")), repr(bundle.start_position)


def read_part(source, index: int, n: int) -> list:
    """Partition ``index`` of ``n`` of a bounded source: bundles ``index::n`` of its split.

    Each read task splits the source itself (a listing and the files' sizes), in a stable
    order, so that the tasks depend on nothing and the scheduler spreads them over the workers:
    with one shared split task, Dask ran every read (and the work fused after it) on the worker
    that held the split, the others idle until the first shuffle.
    """
    bundles = sorted(_split_source(source, n), key=_bundle_key)
    return _read_bundles(bundles, index, n)


def _read_bundles(bundles: list, index: int, n: int) -> list:
    out: list = []
    for b in bundles[index::n]:
        tracker = b.source.get_range_tracker(b.start_position, b.stop_position)
        out.extend(b.source.read(tracker))
    return out


def drop(items: Iterable[Any]) -> list:
    for _ in items:
        pass
    return []
