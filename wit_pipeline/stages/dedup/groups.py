"""Near-duplicate groups: verified pairs -> one survivor per connected group, on any runner.

Survivor rule (deterministic, runner-independent): the image with the most original pixels
(``original_width * original_height``), ties broken by the smallest ``key``
(:func:`survivor_rank`); :class:`UnionFind` keeps the best-ranked member as the root.

In Beam (:class:`FindNearDuplicates`), hashes travel in batches: each batch is split by
``(band, partition)`` where a partition is a range of band values, and ``GroupByKey`` brings
every hash of one partition together; within it the exact ``(band, value)`` groups are found by
sorting (:func:`~wit_pipeline.stages.dedup.lsh.band_components`). Each partition reduces its
verified pairs to a spanning forest (every member linked to the best member of its local
component), and the forests' edges are joined into groups by rounds of min-label propagation
(:class:`LabelComponents`: one ``GroupByKey`` per round, one image and its neighbours per key),
with a union-find ``CombineFn`` on one worker only for the groups the rounds did not finish. The
result maps every image of a near-duplicate group to the group's survivor.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import TaggedOutput

from wit_pipeline.stages.dedup.lsh import band_components, bands_for, hashes_from_hex

# ---------------------------------------------------------------------------------------------
# Survivors and union-find


def survivor_rank(record: Mapping[str, Any]) -> tuple[int, str]:
    """Sort key of the survivor rule: most original pixels first, then the smallest key."""
    w = int(record.get("original_width") or record.get("width") or 0)
    h = int(record.get("original_height") or record.get("height") or 0)
    return (-w * h, str(record["key"]))


class UnionFind:
    """Disjoint sets whose root is always the best-ranked member (smallest rank tuple)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.rank: dict[str, tuple] = {}

    def add(self, key: str, rank: tuple) -> None:
        """Add ``key``; a key seen again with a better rank keeps the best one (still the root
        rule: copies of one key read from overlapping inputs may differ in original pixels)."""
        rank = tuple(rank)
        if key not in self.parent:
            self.parent[key] = key
            self.rank[key] = rank
            return
        if rank >= self.rank[key]:
            return
        self.rank[key] = rank
        root = self.find(key)
        if root != key and rank < self.rank[root]:
            self.parent[root] = key
            self.parent[key] = key

    def find(self, key: str) -> str:
        parent = self.parent
        root = key
        while parent[root] != root:
            root = parent[root]
        while parent[key] != root:  # path compression
            parent[key], key = root, parent[key]
        return root

    def union(self, a: str, rank_a: tuple, b: str, rank_b: tuple) -> None:
        self.add(a, rank_a)
        self.add(b, rank_b)
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.rank[rb] < self.rank[ra]:
            ra, rb = rb, ra
        self.parent[rb] = ra

    def merge(self, other: UnionFind) -> None:
        for key in other.parent:
            root = other.find(key)
            if root != key:
                self.union(key, other.rank[key], root, other.rank[root])
            else:
                self.add(key, other.rank[key])

    def survivors(self) -> dict[str, str]:
        """``{member: survivor}`` for every member (survivors map to themselves)."""
        return {k: self.find(k) for k in self.parent}


def group_edges(
    keys: np.ndarray, neg_areas: np.ndarray, labels: np.ndarray
) -> Iterator[tuple[str, tuple, str, tuple]]:
    """Star edges ``(member, rank, best, best_rank)`` for each labelled local component.

    ``keys`` and ``neg_areas`` (minus original pixels) are per item; ranks are
    ``(neg_area, key)`` (see ``survivor_rank``); only labelled items are looked at.
    """
    idx = np.flatnonzero(labels >= 0)
    if not idx.size:
        return
    lab = labels[idx]
    by_label: dict[int, list[tuple[tuple, str]]] = collections.defaultdict(list)
    for label, key, a in zip(
        lab.tolist(), keys[idx].tolist(), neg_areas[idx].tolist(), strict=True
    ):
        by_label[label].append(((int(a), str(key)), str(key)))
    for members in by_label.values():
        if len(members) < 2:
            continue
        best_rank, best = min(members)
        for rank, key in members:
            if key != best:
                yield key, rank, best, best_rank


def find_groups(
    hashes: np.ndarray,
    keys: Sequence[str],
    areas: Sequence[int],
    max_distance: int,
    *,
    partitions: int = 64,
) -> dict[str, str]:
    """In-process version of ``FindNearDuplicates``: ``{member: survivor}`` for every group.

    The same steps as the Beam transform (bands, partitions of band values, verified pairs,
    local star forests, union-find), without a runner: for tests, benchmarks and small jobs.
    ``areas`` are original pixel counts (the survivor rule's first criterion).
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    bands = bands_for(max_distance)
    key_arr = np.asarray(keys, dtype=object)
    area_arr = np.asarray(areas, dtype=np.int64)
    vals = bands.values(hashes)
    uf = UnionFind()
    for b in range(bands.num_bands):
        part = vals[b] % partitions
        order = np.argsort(part, kind="stable")
        cuts = np.flatnonzero(np.diff(part[order])) + 1
        for idx in np.split(order, cuts):
            labels = band_components(hashes[idx], b, bands, max_distance, values=vals[b][idx])
            for a, ra, s, rs in group_edges(key_arr[idx], -area_arr[idx], labels):
                uf.union(a, ra, s, rs)
    return uf.survivors()


# ---------------------------------------------------------------------------------------------
# Beam: partitions, verification, label propagation


def _pack(hashes: np.ndarray, keys: np.ndarray, neg_area: np.ndarray, values: np.ndarray):
    """One structured array per shuffled element: a single buffer to encode, not four."""
    dtype = [("h", "<u8"), ("a", "<i8"), ("v", "<i8"), ("k", keys.dtype)]
    out = np.empty(len(keys), dtype=dtype)
    out["h"], out["a"], out["v"], out["k"] = hashes, neg_area, values, keys
    return out


def _unpack(parts: Iterable[np.ndarray]) -> np.ndarray:
    parts = list(parts)
    width = max(p.dtype["k"].itemsize for p in parts)
    dtype = [("h", "<u8"), ("a", "<i8"), ("v", "<i8"), ("k", f"S{width}")]
    return np.concatenate([p.astype(dtype) for p in parts])


class _PartitionFn(beam.DoFn):
    def __init__(self, max_distance: int, partitions: int):
        self._k = max_distance
        self._partitions = partitions

    def process(self, batch):
        bands = bands_for(self._k)
        hashes = hashes_from_hex([r["phash"] for r in batch])
        keys = np.array([r["key"].encode("utf-8") for r in batch], dtype=bytes)
        # The survivor rank is (minus original pixels, key): ship the first part with the key.
        neg_area = np.array([survivor_rank(r)[0] for r in batch], dtype=np.int64)
        vals = bands.values(hashes)
        for b in range(bands.num_bands):
            packed = _pack(hashes, keys, neg_area, vals[b])
            part = vals[b] % self._partitions
            order = np.argsort(part, kind="stable")
            cuts = np.flatnonzero(np.diff(part[order])) + 1
            for idx in np.split(order, cuts):
                yield (b, int(part[idx[0]])), packed[idx]


class _VerifyFn(beam.DoFn):
    def __init__(self, max_distance: int):
        self._k = max_distance

    def process(self, item):
        (band, _), parts = item
        data = _unpack(parts)
        labels = band_components(data["h"], band, bands_for(self._k), self._k, values=data["v"])
        if (labels >= 0).any():
            keys = np.array([k.decode("utf-8") for k in data["k"][labels >= 0]], dtype=object)
            full = np.empty(len(data), dtype=object)
            full[labels >= 0] = keys
            yield from group_edges(full, data["a"], labels)


class _UnionFindFn(beam.CombineFn):
    def create_accumulator(self):
        return UnionFind()

    def add_input(self, acc, edge):
        a, ra, b, rb = edge
        acc.union(a, ra, b, rb)
        return acc

    def merge_accumulators(self, accs):
        # Beam allows modifying (and returning) only the first accumulator.
        accs = iter(accs)
        out = next(accs)
        for a in accs:
            out.merge(a)
        return out

    def extract_output(self, acc):
        return acc.survivors()


@beam.ptransform_fn
def _UnionFindMembers(edges):
    """Edges -> ``(key, survivor key)``, merged by one union-find (on one worker)."""
    return (
        edges
        | "UnionFind" >> beam.CombineGlobally(_UnionFindFn())
        | "Members" >> beam.FlatMap(lambda d: sorted(d.items()))
    )


# Beam metric: nodes of groups that label propagation did not finish (left to the union-find).
RESIDUE_NODES_METRIC = "label_rounds_unconverged_nodes"


def _adjacency(item):
    """(key, [(rank, neighbour, neighbour rank), ...]) -> (key, (label, rank, neighbours)).

    A key can come with several ranks (copies read from overlapping inputs): the best counts, as
    in ``UnionFind.add``. The first label is the best rank among the key and its neighbours.
    """
    key, entries = item
    rank = None
    neighbours: dict[str, tuple] = {}
    for r, u, ru in entries:
        r, ru = tuple(r), tuple(ru)
        rank = r if rank is None or r < rank else rank
        if u not in neighbours or ru < neighbours[u]:
            neighbours[u] = ru
    label = min([rank, *neighbours.values()])
    return key, (label, rank, tuple(sorted(neighbours.items())))


def _send_label(item):
    """A node's state to itself and its label to each neighbour."""
    key, state = item
    yield key, state
    label = state[0]
    for u, _ in state[2]:
        yield u, (label, None, None)


def _keep_best_label(item):
    key, values = item
    label, rank, neighbours = None, None, None
    received = 0
    for lab, r, nb in values:
        lab = tuple(lab)
        received += 1
        if nb is not None:
            rank, neighbours = r, nb
        if label is None or lab < label:
            label = lab
    if neighbours is None:
        # Every node sends its own state to itself each round: without it, an element was lost
        # between rounds (seen once, at 3M images on Dask with an experimental disk shuffle
        # that was withdrawn for it; BENCHMARKS.md "Scale").
        raise RuntimeError(
            f"label propagation: node {key!r} received {received} label(s) but not its own "
            "state; an element was lost between two rounds"
        )
    return key, (label, rank, neighbours)


def _disagreeing_labels(item):
    """Both labels of every edge whose ends disagree: the labels of unconverged groups."""
    _, values = item
    values = list(values)
    own = next(tuple(lab) for lab, _, nb in values if nb is not None)
    for lab, _, nb in values:
        if nb is None and tuple(lab) != own:
            yield own
            yield tuple(lab)


class _SplitConvergedFn(beam.DoFn):
    """Converged nodes -> (key, survivor key); nodes of unconverged groups -> their edges."""

    RESIDUE = "residue"

    def __init__(self):
        self._left = beam.metrics.Metrics.counter("dedup", RESIDUE_NODES_METRIC)

    def process(self, item, bad_labels):
        key, (label, rank, neighbours) = item
        bad = self._bad_set(bad_labels)
        if tuple(label) not in bad:
            yield key, label[1]
            return
        self._left.inc()
        for u, ru in neighbours:
            if key < u:
                yield TaggedOutput(self.RESIDUE, (key, tuple(rank), u, tuple(ru)))

    def _bad_set(self, bad_labels):
        # The side input is the same object for every element of a bundle: convert it once.
        if getattr(self, "_bad_source", None) is not bad_labels:
            self._bad_source = bad_labels
            self._bad = {tuple(b) for b in bad_labels}
        return self._bad


class LabelComponents(beam.PTransform):
    """Edges ``(a, rank_a, b, rank_b)`` -> ``(key, survivor key)`` for every node of the edges.

    The survivor of a connected group is its best-ranked node (smallest rank tuple), as
    ``UnionFind`` gives it, but no worker holds every node: each node starts with the best rank
    among itself and its neighbours, and ``rounds`` rounds of min-label propagation (one
    ``GroupByKey`` each, holding one node and its neighbours' labels per key) spread the best
    label ``rounds`` hops further. A group is converged when every edge's two ends agree; then
    every node carries the group's best rank (the best node keeps its own). Groups wider than the
    rounds reach (rare: groups are unions of stars) are found by their disagreeing edges and
    finished by a union-find on one worker that holds only those groups.
    """

    def __init__(self, *, rounds: int = 4):
        super().__init__()
        if rounds < 0:
            raise ValueError("rounds must be >= 0")
        self._rounds = rounds

    def expand(self, edges):
        state = (
            edges
            | "BothEnds"
            >> beam.FlatMap(lambda e: [(e[0], (e[1], e[2], e[3])), (e[2], (e[3], e[0], e[1]))])
            | "GroupEnds" >> beam.GroupByKey()
            | "Adjacency" >> beam.Map(_adjacency)
        )
        for r in range(self._rounds):
            state = (
                state
                | f"Send{r}" >> beam.FlatMap(_send_label)
                | f"Gather{r}" >> beam.GroupByKey()
                | f"Update{r}" >> beam.Map(_keep_best_label)
            )
        bad = (
            state
            | "SendCheck" >> beam.FlatMap(_send_label)
            | "GatherCheck" >> beam.GroupByKey()
            | "Disagreements" >> beam.FlatMap(_disagreeing_labels)
            | "DistinctBad" >> beam.Distinct()
        )
        split = state | "Split" >> beam.ParDo(
            _SplitConvergedFn(), beam.pvalue.AsList(bad)
        ).with_outputs(_SplitConvergedFn.RESIDUE, main="converged")
        residue = split[_SplitConvergedFn.RESIDUE] | "UnionFindResidue" >> _UnionFindMembers()
        return (split.converged, residue) | "AllMembers" >> beam.Flatten()


class FindNearDuplicates(beam.PTransform):
    """Records with ``phash`` -> ``(key, survivor key)`` for every image with a near duplicate.

    Images without a near duplicate are absent from the output. See the module docstring for
    the banding, the partitions and the grouping. ``label_rounds`` is the number of min-label
    propagation rounds (``LabelComponents``); ``None`` merges every edge with one union-find on
    one worker instead.
    """

    def __init__(
        self,
        *,
        max_distance: int,
        partitions: int = 64,
        batch_size: int = 16384,
        label_rounds: int | None = 4,
    ):
        super().__init__()
        bands_for(max_distance)
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        if label_rounds is not None and label_rounds < 0:
            raise ValueError("label_rounds must be >= 0")
        self._k = max_distance
        self._partitions = partitions
        self._batch_size = batch_size
        self._label_rounds = label_rounds

    def expand(self, records):
        edges = (
            records
            | "Batch"
            >> beam.BatchElements(min_batch_size=self._batch_size, max_batch_size=self._batch_size)
            | "ToBands" >> beam.ParDo(_PartitionFn(self._k, self._partitions))
            | "GroupByBand" >> beam.GroupByKey()
            | "Verify" >> beam.ParDo(_VerifyFn(self._k))
        )
        if self._label_rounds is not None:
            return edges | "Groups" >> LabelComponents(rounds=self._label_rounds)
        return edges | "UnionFind" >> _UnionFindMembers()
