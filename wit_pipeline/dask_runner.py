"""Beam's DaskRunner with a translation that keeps the Beam model, for every wit pipeline.

Beam 2.77's ``apache_beam.runners.dask.dask_runner.DaskRunner`` turns a pipeline into
``dask.bag`` operations, but its translation loses data on the graphs this project runs
(measured on a two-worker cluster; docs/scaling.md lists each with its upstream issue):

1. it computes only the bag of the last transform visited, so every other sink of a pipeline
   (the rejected rows, the stats, all but one writer) never runs;
2. every output of a multi-output ``ParDo`` receives the elements of *all* its tags (the
   ``kept``, ``rejected`` and ``counts`` outputs of every stage get each other's rows);
3. what a DoFn emits in ``finish_bundle`` is dropped (``BatchElements``' last batch);
4. ``beam.io.Read`` (``ReadFromParquet``) translates to nothing and fails;
5. the Dask client it opens is never closed.

This runner keeps Beam's runner, options (``--dask_client_address``, ``--dask_scheduler_file``,
``--dask_npartitions``, ...) and result, and replaces the translation. Every PCollection is a bag
of plain elements in the global window; every primitive is translated as the Beam model says:

- ``ParDo``: one task per partition runs it as a bundle through Beam's own ``DoFnRunner``
  (start_bundle, process, finish_bundle) on a copy of the DoFn set up once per worker thread
  and reused from bundle to bundle (torn down when the next pipeline run starts), with its
  side inputs materialized once per pipeline and broadcast to the tasks; a multi-output
  ParDo's partition holds one list per tag, and each output PCollection selects its own;
- ``GroupByKey``: a shuffle by key, values in input order: an ``int`` key goes to partition
  ``key mod n`` (dense bucket and shard numbers get a partition each), any other key by the
  CRC-32 of its deterministic Beam encoding (not Python's ``hash``, which differs between
  processes for strings);
- ``CombinePerKey``: lifted, as other runners do: each partition pre-combines per key before the
  shuffle, each output partition merges the accumulators; a ``CombineGlobally``'s (one key)
  merges them in a tree instead, a few at a time, so that no task holds them all;
- ``Create``, ``Impulse``, ``Flatten``, ``Reshuffle`` (a round-robin rebalance), ``Read`` (the
  source is split on the workers, each read task splitting it itself, so that the launcher
  never lists the files and the reads spread over the workers);
- every PCollection that nothing consumes is a sink, and all sinks run in one ``compute``;
- a read or shuffle that starts a chain of ParDos with side inputs waits for those side inputs,
  as the stage that fuses them does on Beam's other runners (Dask would otherwise run it as soon
  as a worker is free and hold its output until they are ready).

Shuffles (``GroupByKey``, ``CombinePerKey``, ``Reshuffle``) run through Dask's peer-to-peer
shuffle by default (``--dask_shuffle_method p2p``, distributed's ``P2PShuffle``, the one
``dask.dataframe`` uses): each split task hands its output lists, pickled, to the shuffle
service of its worker, which sends them to the workers that own their output partitions and
buffers them on disk there; each merge task reads its own partition back. A worker then holds a
few partitions at a time, not its share of every shuffle, so with partitions sized by the data
(``--dask_npartitions``) its memory stays flat as the data grows (BENCHMARKS.md, "Scale").
``--dask_shuffle_method tasks`` keeps the shuffle in the workers' memory (one task per split and
per merge, data moved by the scheduler's transfers): faster on data that fits in memory.

The functions the tasks run on the workers are in ``wit_pipeline.dask_tasks``.

What it refuses, with an error before anything runs: windowing other than the global window,
stateful and splittable DoFns. Metrics are not collected (Beam's result raises on
``metrics()``; wit's counts travel as data). Resource hints are ignored.

Fault tolerance is Dask's: a task lost with its worker is recomputed elsewhere, so a DoFn
partition may run twice; wit's writers are idempotent and atomic, and its counts are data (the
lost task's outputs are discarded with it), so outputs and counters stay exact.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import os
import uuid
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import coders as beam_coders
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor, PTransformOverride
from apache_beam.runners.dask import dask_runner as beam_dask
from apache_beam.runners.dask import overrides as beam_overrides
from apache_beam.runners.runner import PipelineState
from apache_beam.transforms.core import CombineFn
from apache_beam.transforms.window import GlobalWindows

from wit_pipeline import dask_tasks as tasks
from wit_pipeline.errors import WitError

_LOG = logging.getLogger(__name__)

# This runner's full name (``--runner dask`` and Beam's own DaskRunner name run it: runners.py).
RUNNER = f"{__name__}.DaskRunner"
# Partitions per worker thread when no --dask_npartitions / --dask_partition_size is given.
PARTITIONS_PER_THREAD = 2
# Accumulators merged per task in a global combine's tree (``_Translator._combine_tree``).
COMBINE_FAN_IN = 8
# --dask_shuffle_method: Dask's peer-to-peer shuffle (on disk), or tasks (in memory).
SHUFFLE_METHODS = ("p2p", "tasks")
# The launcher's environment variables that wit's code (or a library it imports) reads, which the
# workers of a cluster started elsewhere lack: they travel with every DoFn's tasks, and a worker
# takes those it has no value for (albumentations, imported by img2dataset, otherwise asks PyPI
# for its latest version on import; the Hugging Face hub would try the network).
WORKER_ENV = (
    "NO_ALBUMENTATIONS_UPDATE",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "OMP_WAIT_POLICY",
)


# ---------------------------------------------------------------------------------------------
# Primitives that replace Beam's composites before translation


class _GroupByKey(beam.PTransform):
    """``GroupByKey`` as one primitive (Beam's Dask overrides expand it into three steps)."""

    def expand(self, pcoll):
        return pvalue.PCollection.from_(pcoll)


class _CombinePerKey(beam.PTransform):
    """``CombinePerKey`` without side inputs, as one primitive (lifted when translated).

    ``one_key``: the ``CombinePerKey`` of a ``CombineGlobally`` (every key ``None``), merged
    by a tree rather than a shuffle.
    """

    def __init__(self, combine_fn: CombineFn, *, one_key: bool = False):
        super().__init__()
        self.combine_fn = combine_fn
        self.one_key = one_key

    def expand(self, pcoll):
        return pvalue.PCollection.from_(pcoll)


class _Override(PTransformOverride):
    def __init__(self, matches, replace):
        self._matches, self._replace = matches, replace

    def matches(self, applied_ptransform: AppliedPTransform) -> bool:
        return self._matches(applied_ptransform.transform)

    def get_replacement_transform_for_applied_ptransform(self, applied_ptransform):
        return self._replace(applied_ptransform)


def _combine_fn(t: beam.CombinePerKey) -> CombineFn:
    from apache_beam.transforms.combiners import curry_combine_fn

    return curry_combine_fn(t.fn, t.args, t.kwargs)


def _keyed_with_none(applied: AppliedPTransform) -> bool:
    """Whether a ``CombinePerKey``'s input is keyed by ``CombineGlobally``'s ``KeyWithVoid``
    (every key ``None``). Its producer tells, not its parent: ``Pipeline.run`` rebuilds the
    pipeline from its protos first, and composites come back as plain ``PTransform``s."""
    from apache_beam.transforms.core import _KeyWithNone

    producer = applied.inputs[0].producer if applied.inputs else None
    t = producer.transform if producer is not None else None
    return isinstance(t, beam.ParDo) and isinstance(t.fn, _KeyWithNone)


def _overrides() -> list[PTransformOverride]:
    """Beam's Dask overrides for Create, Reshuffle, Read and Flatten, plus ours."""
    beam_ones = [
        o
        for o in beam_overrides.dask_overrides()
        if type(o).__name__ != "GroupByKeyOverride"  # ours keeps GroupByKey one primitive
    ]
    return [
        _Override(
            lambda t: type(t) is beam.CombinePerKey and not t.side_inputs,
            lambda a: _CombinePerKey(_combine_fn(a.transform), one_key=_keyed_with_none(a)),
        ),
        _Override(lambda t: type(t) is beam.GroupByKey, lambda a: _GroupByKey()),
        *beam_ones,
    ]


def _env_for_workers() -> dict[str, str]:
    return {"NO_ALBUMENTATIONS_UPDATE": "1"} | {
        k: os.environ[k] for k in WORKER_ENV if k in os.environ
    }


# ---------------------------------------------------------------------------------------------
# Translation


class _Leaves(PipelineVisitor):
    """The pipeline's leaf transforms, in Beam's (topological) visiting order."""

    def __init__(self) -> None:
        self.nodes: list[AppliedPTransform] = []

    def visit_transform(self, node: AppliedPTransform) -> None:
        self.nodes.append(node)


# The transforms whose output a ParDo's side inputs gate (``_Translator._plan``): the reads and
# shuffles that start a chain of ParDos (Beam runners fuse such a chain into one stage).
_GATED = (beam_overrides._Read, beam_overrides._Reshuffle, _GroupByKey, _CombinePerKey)


class _Translator(PipelineVisitor):
    """Builds one dask bag per PCollection, leaf transform by leaf transform (topological)."""

    def __init__(
        self,
        parallelism: int,
        partition_size: int | None,
        workers: Sequence[str] = (),
        shuffle_method: str = "p2p",
    ):
        if shuffle_method not in SHUFFLE_METHODS:
            raise ValueError(f"shuffle method {shuffle_method!r}: one of {SHUFFLE_METHODS}")
        self.parallelism = max(1, parallelism)
        self.workers = list(workers)
        self.partition_size = partition_size
        self.shuffle_method = shuffle_method
        self.visited = 0  # transforms translated so far (their order: ``_depth_first``)
        self.run = uuid.uuid4().hex  # this pipeline run: the workers' DoFn pools key by it
        self.bags: dict[pvalue.PCollection, Any] = {}
        self.consumed: set[pvalue.PCollection] = set()
        # read or shuffle -> the side inputs its output waits for (``_plan``)
        self.gates: dict[AppliedPTransform, list] = {}

    def translate(self, pipeline: beam.Pipeline) -> None:
        """Translate every leaf transform, in the order ``_plan`` gives."""
        leaves = _Leaves()
        pipeline.visit(leaves)
        for node in self._plan(leaves.nodes):
            self.visit_transform(node)

    def _plan(self, nodes: list[AppliedPTransform]) -> list[AppliedPTransform]:
        """Gate the read or shuffle that starts a ParDo's chain on that ParDo's side inputs,
        and order the transforms so that every gate is translated before what it gates.

        A ParDo with side inputs waits for them; on Beam's other runners its whole fused stage
        (the read or shuffle it starts from, and the ParDos between) waits with it. Dask would
        run the read or shuffle as soon as a worker is free, and hold its output until the side
        inputs are ready: the pre-balance step read every candidate (0.9 GB per worker at 10M)
        while the per-query counts it draws by were still being summed. A gate whose side input
        itself depends on the gated transform (a cycle) is not set: that chain runs as before.
        """
        producer = {pc: n for n in nodes for pc in n.outputs.values()}

        def root_of(node):
            while node is not None and isinstance(node.transform, (beam.ParDo, beam.WindowInto)):
                main = node.inputs[0] if node.inputs else None
                node = producer.get(main)
            return node if node is not None and isinstance(node.transform, _GATED) else None

        def upstream(node) -> list:
            sides = [si.pvalue for si in node.side_inputs]
            sides += [si.pvalue for si in self.gates.get(node, ())]
            return [producer[pc] for pc in (*node.inputs, *sides) if pc in producer]

        def depends_on(node, target) -> bool:
            seen, todo = set(), [node]
            while todo:
                n = todo.pop()
                if n is target:
                    return True
                if n not in seen:
                    seen.add(n)
                    todo.extend(upstream(n))
            return False

        for node in nodes:
            if not node.side_inputs or not isinstance(node.transform, beam.ParDo):
                continue
            root = root_of(node)
            if root is None:
                continue
            sides = [si for si in node.side_inputs if si.pvalue in producer]
            if any(depends_on(producer[si.pvalue], root) for si in sides):
                continue
            gates = self.gates.setdefault(root, [])
            gates += [si for si in sides if all(si.pvalue is not g.pvalue for g in gates)]
        # Kahn's algorithm over inputs, side inputs and gates; ties in Beam's order.
        index = {n: i for i, n in enumerate(nodes)}
        deps = {n: set(upstream(n)) for n in nodes}
        users: dict[AppliedPTransform, list] = {n: [] for n in nodes}
        for n, ds in deps.items():
            for d in ds:
                users[d].append(n)
        ready = [index[n] for n in nodes if not deps[n]]
        heapq.heapify(ready)
        order = []
        while ready:
            n = nodes[heapq.heappop(ready)]
            order.append(n)
            for u in users[n]:
                deps[u].discard(n)
                if not deps[u]:
                    heapq.heappush(ready, index[u])
        if len(order) != len(nodes):  # cannot happen: gates that close a cycle are not set
            raise RuntimeError("the pipeline's transforms have a cycle")
        return order

    # -- visitor ------------------------------------------------------------------------------

    def visit_transform(self, node: AppliedPTransform) -> None:
        t = node.transform
        inputs = [i for i in node.inputs if isinstance(i, pvalue.PCollection)]
        self.consumed.update(inputs)
        self.consumed.update(si.pvalue for si in node.side_inputs)
        self.visited += 1
        with self._depth_first():
            bags = self._translate(node, t, [self.bags[i] for i in inputs])
        for tag, out in node.outputs.items():
            self.bags[out] = bags[tag]

    def sinks(self) -> list:
        """The bags of PCollections that nothing consumes: computing them runs everything."""
        self.visited += 1
        with self._depth_first():
            return [
                b.map_partitions(tasks.drop)
                for pc, b in self.bags.items()
                if pc not in self.consumed
            ]

    def _depth_first(self):
        """Tasks of later transforms first (Dask priority = the transform's place in the
        pipeline, a topological order), so that a partition runs on through its consumers to
        the next shuffle, or a sink, before more partitions are read.

        Without it, Dask's order kept the output of a multi-output ``ParDo`` until the last of
        its tags' consumers ran: in a 3M-pair gather, every partition of the read-and-filter
        step's outputs stayed in memory (4.6 GB on one worker) until the end.
        """
        import dask

        return dask.annotate(priority=self.visited)

    # -- primitives ---------------------------------------------------------------------------

    def _translate(self, node, t, ins: list) -> dict:
        import dask.bag as db

        label = node.full_label  # task names: Beam's step names on the Dask dashboard
        after = [self._side_input(si) for si in self.gates.get(node, ())]

        if isinstance(t, beam_overrides._Create):
            return {None: self._from_sequence(list(t.values))}
        if isinstance(t, beam.Impulse):
            return {None: db.from_sequence([b""], npartitions=1)}
        if isinstance(t, beam_overrides._Flatten):
            return {None: db.concat(ins) if ins else db.from_sequence([], npartitions=1)}
        if isinstance(t, beam_overrides._Reshuffle):
            return {None: self._rebalance(label, ins[0], after)}
        if isinstance(t, beam_overrides._Read):
            return {None: self._read(label, t.source, after)}
        if isinstance(t, _GroupByKey):
            return {None: self._group_by_key(label, ins[0], self._key_coder(node), after)}
        if isinstance(t, _CombinePerKey):
            coder = self._key_coder(node)
            if t.one_key:
                return {None: self._combine_tree(label, ins[0], coder, t.combine_fn, after)}
            return {None: self._combine_per_key(label, ins[0], coder, t.combine_fn, after)}
        if isinstance(t, beam.WindowInto):
            if not isinstance(t.get_windowing(node.inputs).windowfn, GlobalWindows):
                raise NotImplementedError(
                    f"{node.full_label}: only the global window is supported by {RUNNER}"
                )
            return {None: ins[0]}
        if isinstance(t, beam.ParDo):
            return self._par_do(node, t, ins[0])
        raise NotImplementedError(
            f"{node.full_label}: {type(t).__name__} is not supported by {RUNNER}"
        )

    def _from_sequence(self, values: list):
        import dask.bag as db

        if not values:
            return db.from_sequence([], npartitions=1)
        if self.partition_size:
            n = math.ceil(len(values) / self.partition_size)
        else:
            n = self.parallelism
        return db.from_sequence(values, npartitions=max(1, min(n, len(values))))

    def _shuffle(self, label: str, bag, split, merge, n: int, after=(), *, indexed: bool = False):
        """All-to-all: ``split(partition) -> n lists`` (``split(partition, i)`` for partition i
        when ``indexed``); output partition j = ``merge(list j of each split)``. The output
        partitions wait for the ``after`` values (delayed side inputs) too: ``_plan``'s gates."""
        import dask
        import dask.bag as db
        from dask.base import tokenize

        token = tokenize(bag.name, split, merge, n, [a.key for a in after])
        if self.shuffle_method == "p2p":
            return self._p2p_shuffle(label, token, bag, split, merge, n, after, indexed=indexed)
        parts = bag.to_delayed(optimize_graph=False)
        splits = [
            dask.delayed(split, nout=n)(
                *((part, i) if indexed else (part,)), dask_key_name=f"{label}/split-{token}-{i}"
            )
            for i, part in enumerate(parts)
        ]
        merged = []
        for j in range(n):
            with self._spread(j):
                merged.append(
                    dask.delayed(tasks.gated)(
                        merge,
                        len(after),
                        *after,
                        *[s[j] for s in splits],
                        dask_key_name=f"{label}-{token}-{j}",
                    )
                )
        return db.from_delayed(merged)

    def _p2p_shuffle(
        self, label: str, token: str, bag, split, merge, n: int, after, *, indexed: bool
    ):
        """``_shuffle`` through Dask's P2P shuffle, the layer ``dask.dataframe`` builds for
        ``shuffle(method="p2p")``: each split task's lists become rows of a frame whose
        ``_partitions`` column names their output partition; its transfer task hands them to
        the worker's shuffle service, which sends them on, buffered on the receivers' disks; a
        barrier waits for every transfer; each unpack task reads one output partition back, and
        its merge task merges it. The graph is linear in the partitions.

        Built here rather than through ``dask.dataframe`` so that its tasks carry this
        transform's priority (``_depth_first``): unannotated, the transfers ran after every
        other task, and every split's frame waited in memory for them. The unpack tasks must
        stay tasks of their own: the pipeline is computed without linear fusion (``DaskRunner``).
        Gated (``after``), the unpack tasks wait: the shuffled data stays on disk until then.

        Within the shuffle, a transfer outranks the splits and a merge the unpacks (half a step
        of priority), so that a worker hands each split's frame on, and merges each unpacked
        partition, before it splits or unpacks the next: at equal priority the unpacks ran
        ahead of the merges, and a 10M gather's workers held 155 MB of unpacked frames.
        """
        import dask
        import dask.bag as db
        from dask._task_spec import Task, TaskRef
        from dask.dataframe.dask_expr._shuffle import _shuffle_transfer
        from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
        from distributed.shuffle._core import P2PBarrierTask, ShuffleId, barrier_key, p2p_barrier
        from distributed.shuffle._shuffle import DataFrameShuffleSpec, shuffle_unpack

        shuffle_id = ShuffleId(token)
        name = f"{label}-{token}"
        splits, sends, unpacks, merges = {}, {}, {}, {}
        transfers = []
        for i, key in enumerate(bag.__dask_keys__()):
            frame = (f"{label}/split-{token}", i)
            args = (TaskRef(key), i) if indexed else (TaskRef(key),)
            splits[frame] = Task(frame, tasks.split_to_frame, split, i, *args)
            transfer = (f"shuffle-transfer-{token}", i)
            sends[transfer] = Task(transfer, _shuffle_transfer, TaskRef(frame), token, i)
            transfers.append(TaskRef(transfer))
        spec = DataFrameShuffleSpec(
            id=shuffle_id,
            npartitions=n,
            column="_partitions",
            meta=tasks.frame_meta(),
            parts_out=n,
            disk=True,
            drop_column=True,
        )
        barrier = P2PBarrierTask(barrier_key(shuffle_id), p2p_barrier, token, *transfers, spec=spec)
        sends[barrier.key] = barrier
        gates = [TaskRef(a.key) for a in after]
        for j in range(n):
            unpack = (f"p2pshuffle-{token}", j)
            unpacks[unpack] = Task(
                unpack, tasks.gated, shuffle_unpack, len(gates), *gates, token, j, barrier.ref()
            )
            merges[(name, j)] = Task((name, j), tasks.merge_frame, merge, TaskRef(unpack))
        annotations = dask.get_annotations()
        first = {**annotations, "priority": annotations.get("priority", 0)}
        then = {**annotations, "priority": first["priority"] + 0.5}
        layers, deps = {}, {}
        for collection in (bag, *after):
            layers.update(collection.__dask_graph__().layers)
            deps.update(collection.__dask_graph__().dependencies)
        gate_layers = {layer for a in after for layer in a.__dask_layers__()}
        for layer_name, dsk, ann, needs in (
            (f"{name}-split", splits, first, set(bag.__dask_layers__())),
            (f"{name}-send", sends, then, {f"{name}-split"}),
            (f"{name}-unpack", unpacks, first, {f"{name}-send"} | gate_layers),
            (name, merges, then, {f"{name}-unpack"}),
        ):
            layers[layer_name] = MaterializedLayer(dsk, annotations=ann)
            deps[layer_name] = needs
        graph = HighLevelGraph(layers, deps)
        return db.Bag(graph, name, n)

    def _spread(self, j: int):
        """Prefer worker ``j`` (round robin) for output partition ``j`` of a shuffle or read.

        Every output partition of a shuffle depends on every input partition, so Dask's
        locality rule puts them all on the worker that holds the most input bytes, and the
        pipeline then runs on that one worker. A loose preference (another worker may still
        take the task, e.g. when this one is lost) spreads them.
        """
        import contextlib

        import dask

        if not self.workers:
            return contextlib.nullcontext()
        worker = self.workers[j % len(self.workers)]
        return dask.annotate(workers=[worker], allow_other_workers=True)

    def _group_by_key(self, label: str, bag, coder, after):
        n = self.parallelism
        split = functools.partial(tasks.split_pairs, n=n, coder=coder)
        merge = functools.partial(tasks.group, coder=coder)
        return self._shuffle(label, bag, split, merge, n, after)

    def _combine_per_key(self, label: str, bag, coder, combine_fn: CombineFn, after):
        n, blob = self.parallelism, pickler.dumps(combine_fn)
        split = functools.partial(tasks.precombine, n=n, coder=coder, fn_blob=blob)
        merge = functools.partial(tasks.merge_combine, coder=coder, fn_blob=blob)
        return self._shuffle(label, bag, split, merge, n, after)

    def _combine_tree(self, label: str, bag, coder, combine_fn: CombineFn, after):
        """A global combine: each partition's accumulator, then merges of ``COMBINE_FAN_IN``
        accumulators at a time, level by level, to one (Dask's own reductions do the same).

        Through a shuffle, the one key's accumulators (one per partition) would all meet in
        one merge task: with gather's dense per-query count arrays (4 MB each), that task took
        a worker from 0.8 to 1.8 GB at 160 partitions, and grew with them; in a tree, no task
        holds more than ``COMBINE_FAN_IN``.
        """
        import dask.bag as db
        from dask._task_spec import Task, TaskRef
        from dask.base import tokenize
        from dask.highlevelgraph import HighLevelGraph

        blob = pickler.dumps(combine_fn)
        token = tokenize(bag.name, blob, "tree")
        name = f"{label}-{token}"
        dsk: dict = {}
        level = []
        for i, key in enumerate(bag.__dask_keys__()):
            leaf = (f"{label}/accumulate-{token}", i)
            dsk[leaf] = Task(leaf, tasks.accumulate, TaskRef(key), coder=coder, fn_blob=blob)
            level.append(TaskRef(leaf))
        depth = 0
        while len(level) > COMBINE_FAN_IN:
            depth += 1
            merged = []
            for i in range(0, len(level), COMBINE_FAN_IN):
                node = (f"{label}/merge{depth}-{token}", i // COMBINE_FAN_IN)
                children = level[i : i + COMBINE_FAN_IN]
                dsk[node] = Task(node, tasks.merge_accumulated, *children, fn_blob=blob)
                merged.append(TaskRef(node))
            level = merged
        merge = functools.partial(tasks.merge_combine, coder=coder, fn_blob=blob)
        gates = [TaskRef(a.key) for a in after]
        dsk[(name, 0)] = Task((name, 0), tasks.gated, merge, len(gates), *gates, *level)
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=[bag, *after])
        return db.Bag(graph, name, 1)

    def _rebalance(self, label: str, bag, after):
        n = self.parallelism
        deal = functools.partial(tasks.deal, n=n)
        return self._shuffle(label, bag, deal, tasks.concat_lists, n, after, indexed=True)

    def _read(self, label: str, source, after):
        import dask
        import dask.bag as db
        from dask.base import tokenize

        n = self.parallelism
        token = tokenize(source, n, [a.key for a in after])
        parts = []
        for j in range(n):
            with self._spread(j):
                parts.append(
                    dask.delayed(tasks.gated)(
                        tasks.read_part,
                        len(after),
                        *after,
                        source,
                        j,
                        n,
                        dask_key_name=f"{label}-{token}-{j}",
                    )
                )
        return db.from_delayed(parts)

    def _side_input(self, si) -> Any:
        """One task that concatenates the side input's partitions (its value is broadcast).

        Built as a graph layer over the bag's keys: ``dask.delayed`` over ``to_delayed()`` walked
        the whole upstream graph once per partition (quadratic: at 160 partitions, the 10M dedup
        pipeline spent minutes in the launcher before its first task).
        """
        from dask._task_spec import List, Task, TaskRef
        from dask.base import tokenize
        from dask.delayed import Delayed
        from dask.highlevelgraph import HighLevelGraph

        bag = self.bags[si.pvalue]
        name = f"side-{tokenize(bag.name)}"
        task = Task(name, tasks.concat, List(*(TaskRef(k) for k in bag.__dask_keys__())))
        return Delayed(name, HighLevelGraph.from_collections(name, {name: task}, [bag]))

    def _par_do(self, node, t: beam.ParDo, bag) -> dict:
        from apache_beam.runners.common import DoFnSignature

        signature = DoFnSignature(t.fn)
        if signature.is_stateful_dofn():
            raise NotImplementedError(
                f"{node.full_label}: stateful DoFns are not supported by {RUNNER}"
            )
        if signature.is_splittable_dofn():
            raise NotImplementedError(
                f"{node.full_label}: splittable DoFns are not supported by {RUNNER}"
            )
        tags = list(node.outputs)
        views = [(type(si), si._view_options()) for si in node.side_inputs]
        spec = pickler.dumps((t.fn, t.args, t.kwargs, views, tags, node.full_label))
        sides = [self._side_input(si) for si in node.side_inputs]
        mixed = bag.map_partitions(
            tasks.run_dofn, _env_for_workers(), self.run, spec, *sides, token=node.full_label
        )
        if tags == [None]:
            return {None: mixed}
        return {
            tag: mixed.map_partitions(tasks.select, tag, token=f"{node.full_label}[{tag}]")
            for tag in tags
        }

    # -- checks -------------------------------------------------------------------------------

    @staticmethod
    def _key_coder(node) -> beam_coders.Coder:
        return beam_coders.FastPrimitivesCoder().as_deterministic_coder(node.full_label)


# ---------------------------------------------------------------------------------------------
# Runner and result


class WitDaskOptions(PipelineOptions):
    """Options of this runner beyond Beam's ``DaskOptions``."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--dask_shuffle_method",
            default="p2p",
            choices=SHUFFLE_METHODS,
            help="How GroupByKey, CombinePerKey and Reshuffle move data: p2p (Dask's "
            "peer-to-peer shuffle, buffered on the workers' disks: a worker's memory follows "
            "its partitions, not the data) or tasks (in the workers' memory).",
        )


class DaskRunnerResult(beam_dask.DaskRunnerResult):
    """Beam's result, waiting on this pipeline's own client and closing it at the end."""

    def wait_until_finish(self, duration=None) -> str:
        import dask.distributed as ddist

        if self._state != PipelineState.RUNNING:
            return self._state
        timeout = duration / 1000 if duration is not None else None  # Beam passes ms
        try:
            # Gathering each sink's (empty) result raises a task's error here.
            for _ in ddist.as_completed(
                self.futures, loop=self.client.loop, with_results=True, timeout=timeout
            ):
                pass
            self._state = PipelineState.DONE
        except BaseException:
            self._state = PipelineState.FAILED
            self.client.cancel(self.futures)
            raise
        finally:
            if self._state != PipelineState.RUNNING:
                self.client.close()
        return self._state

    def cancel(self) -> str:
        try:
            return super().cancel()
        finally:
            self.client.close()


class DaskRunner(beam_dask.DaskRunner):
    """Runs a pipeline on a dask.distributed cluster (see the module docstring).

    Options are Beam's ``DaskOptions``: ``--dask_client_address`` (or
    ``--dask_scheduler_file``) names the scheduler; without either, ``dask.distributed.Client``
    starts a local cluster for the pipeline. ``--dask_npartitions`` sets the partitions of
    every read, ``Create`` and shuffle (default: two per worker thread; for large inputs, one per
    ~60k records keeps a worker's memory flat, docs/scaling.md); ``--dask_partition_size`` sets
    elements per ``Create`` partition instead. This runner's own ``--dask_shuffle_method``
    (``p2p`` or ``tasks``) chooses the shuffle.
    """

    def run_pipeline(self, pipeline, options):
        import dask.distributed as ddist

        dask_options = options.view_as(beam_dask.DaskOptions).get_all_options(
            drop_default=True, current_only=True
        )
        bag_kwargs = beam_dask.DaskOptions._extract_bag_kwargs(dask_options)
        shuffle_method = options.view_as(WitDaskOptions).dask_shuffle_method
        try:
            client = ddist.Client(set_as_default=False, **dask_options)
        except OSError as e:  # refused, unreachable, timed out
            where = dask_options.get("address") or dask_options.get("scheduler_file")
            raise WitError(f"cannot reach the Dask scheduler at {where}: {e}") from None
        try:
            # one entry per worker thread: output partitions are dealt over them
            slots = [w for w, k in sorted(client.nthreads().items()) for _ in range(k)]
            parallelism = bag_kwargs.get("npartitions") or PARTITIONS_PER_THREAD * max(
                1, len(slots)
            )
            pipeline.replace_all(_overrides())
            translator = _Translator(
                parallelism, bag_kwargs.get("partition_size"), slots, shuffle_method
            )
            translator.translate(pipeline)
            # No linear fusion with P2P: it would fuse the shuffle's unpack tasks away.
            futures = client.compute(translator.sinks(), optimize_graph=shuffle_method != "p2p")
        except BaseException:
            client.close()
            raise
        _LOG.info(
            "DaskRunner: %d partitions per %s shuffle on %s",
            parallelism,
            shuffle_method,
            client.scheduler,
        )
        return DaskRunnerResult(client, futures)
