"""Near-duplicate removal and eval-set decontamination over 64-bit perceptual hashes.

Every downloaded image gets a pHash (``wit_pipeline.stages.dedup.phash``, bit-identical to
``imagehash.phash``). Two images are near duplicates when their hashes differ in at most ``k``
bits. Comparing all pairs is quadratic, so candidates come from the pigeonhole principle: split
the 64 bits into ``k + 1`` bands; two hashes within distance ``k`` agree exactly on at least one
band. Hashes are grouped by ``(band, band value)``; only hashes in one group are compared, and
every candidate pair is verified with its exact Hamming distance. A pair is reported only in the
first band it agrees on, so each verified pair is found exactly once.

Bands interleave the bit positions (band ``b`` holds bits ``b, b + k + 1, ...``): pHash bits
of neighbouring DCT coefficients are correlated and the first bit (the DC term) is almost always
set, so contiguous bands would be less uniform and give larger groups to compare.

In Beam, hashes travel in batches: each batch is split by ``(band, partition)`` where a
partition is a range of band values, and ``GroupByKey`` brings every hash of one partition
together; within it the exact ``(band, value)`` groups are found by sorting. Each partition
reduces its verified pairs to a spanning forest (every member linked to the best member of its
local component), and the forests' edges are joined into groups by rounds of min-label
propagation (``LabelComponents``: one ``GroupByKey`` per round, one image and its neighbours per
key), with a union-find ``CombineFn`` on one worker only for the groups the rounds did not
finish. The result maps every image of a near-duplicate group to the group's survivor.

Survivor rule (deterministic, runner-independent): the image with the most original pixels
(``original_width * original_height``), ties broken by the smallest ``key``. The survivor keeps
the pairs (captions) of every member; the others are dropped with reason ``near_duplicate`` and
``duplicate_of`` pointing at the survivor. Several records of one key (one URL read from
overlapping input directories) become one record holding every copy's pairs; the other copies
are dropped with reason ``duplicate_input``.

Decontamination: the hashes of evaluation images (folders of images, Parquet files with an image
column, or TSV/CSV lists of image files, e.g. CIFAR-10 test and the Flickr8k dev split) form an
``EvalIndex`` built with the same banding, broadcast to workers as a side input; a training image
within ``eval_max_distance`` of any evaluation image is dropped with reason
``eval_contamination`` before near-duplicate grouping, and a report says which eval sets were hit.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import TaggedOutput

from wit_pipeline import beam_utils, fileio
from wit_pipeline import counters as counters_lib
from wit_pipeline.errors import WitError

NEAR_DUPLICATE = "near_duplicate"
DUPLICATE_INPUT = "duplicate_input"  # a second copy of one sample key (overlapping inputs)
EVAL_CONTAMINATION = "eval_contamination"
UNDECODABLE = "undecodable_image"
PAIR_PREFIX = "pairs:"  # pair-level counters travel in the same counts output, prefixed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_PAIR_BUDGET = 1 << 18  # hash comparisons held in memory at once (per numpy block)


def pair_counter(name: str) -> str:
    """The name of a pair-level counter (``pairs:input``, ``pairs:dropped:<reason>``)."""
    return f"{PAIR_PREFIX}{name}"


# ---------------------------------------------------------------------------------------------
# Banding (pigeonhole) and verification


@dataclasses.dataclass(frozen=True)
class Bands:
    """``num_bands`` interleaved bands over 64-bit hashes (bit 0 = the most significant)."""

    num_bands: int

    def __post_init__(self):
        if not 1 <= self.num_bands <= 64:
            raise ValueError(f"num_bands must be in 1..64, got {self.num_bands}")

    @functools.cached_property
    def masks(self) -> np.ndarray:
        """``(num_bands,)`` uint64 masks of each band's bits."""
        out = np.zeros(self.num_bands, dtype=np.uint64)
        for p in range(64):
            out[p % self.num_bands] |= np.uint64(1) << np.uint64(63 - p)
        return out

    def values(self, hashes: np.ndarray, band: int | None = None) -> np.ndarray:
        """``(num_bands, n)`` int64: each hash's value on each band (or ``(n,)`` for one band)."""
        h = np.ascontiguousarray(hashes, dtype=np.uint64)
        bits = np.unpackbits(h.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1)
        wanted = range(self.num_bands) if band is None else [band]
        out = np.empty((len(wanted), len(h)), dtype=np.int64)
        for row, b in enumerate(wanted):
            sel = bits[:, b :: self.num_bands]
            width = sel.shape[1]
            packed = np.packbits(sel, axis=1)  # MSB first, zero-padded to whole bytes
            padded = np.zeros((len(h), 8), dtype=np.uint8)
            padded[:, : packed.shape[1]] = packed
            out[row] = (padded.view(">u8").ravel() >> np.uint64(64 - width)).astype(np.int64)
        return out if band is None else out[0]

    def first_shared(self, xor: np.ndarray) -> np.ndarray:
        """For XORs of hash pairs: the first band on which the pair agrees (``num_bands``: none)."""
        agree = (xor[None, :] & self.masks[:, None]) == 0
        first = np.argmax(agree, axis=0)
        first[~agree.any(axis=0)] = self.num_bands
        return first


def bands_for(max_distance: int) -> Bands:
    """``max_distance + 1`` bands: hashes within ``max_distance`` share one band exactly."""
    if not 0 <= max_distance <= 32:
        raise WitError(f"max_distance must be between 0 and 32 bits, got {max_distance}")
    return Bands(max_distance + 1)


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.asarray(x, dtype=np.uint64))


_BLOCK_RUN = 1024  # runs up to this size are compared as (runs, s, s) blocks


def _near_in_runs(
    sorted_vals: np.ndarray, sorted_h: np.ndarray, max_distance: int, budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(i, j)``, ``i < j``, in the same run of equal values and within distance.

    Runs of one size are compared together as a ``(runs, s, s)`` block of XORs (no per-pair
    index arrays); runs longer than ``_BLOCK_RUN`` row block by row block. At most about
    ``budget`` comparisons are held in memory at once.
    """
    n = len(sorted_vals)
    empty = np.zeros(0, np.int64)
    if n < 2:
        return empty, empty
    change = np.flatnonzero(sorted_vals[1:] != sorted_vals[:-1]) + 1
    starts = np.concatenate(([0], change))
    sizes = np.diff(np.concatenate((starts, [n])))
    keep = sizes >= 2
    starts, sizes = starts[keep], sizes[keep]
    if not starts.size:
        return empty, empty
    out_i, out_j = [], []
    for s in np.unique(sizes).tolist():
        group = starts[sizes == s]
        if s <= _BLOCK_RUN:
            step = max(1, budget // (s * s))
            for c in range(0, len(group), step):
                idx = group[c : c + step, None] + np.arange(s)
                block = sorted_h[idx]
                near = np.bitwise_count(block[:, :, None] ^ block[:, None, :]) <= max_distance
                flat = np.flatnonzero(near)  # includes the diagonal and both (a, b) and (b, a)
                r, rest = np.divmod(flat, s * s)
                a, b = np.divmod(rest, s)
                upper = a < b
                out_i.append(idx[r[upper], a[upper]])
                out_j.append(idx[r[upper], b[upper]])
            continue
        rows_per_block = max(1, budget // s)
        for st in group.tolist():
            cols = st + np.arange(s)
            hc = sorted_h[cols]
            for a0 in range(0, s, rows_per_block):
                rows = cols[a0 : a0 + rows_per_block]
                near = np.bitwise_count(sorted_h[rows][:, None] ^ hc[None, :]) <= max_distance
                a, b = np.divmod(np.flatnonzero(near), s)
                upper = rows[a] < cols[b]
                out_i.append(rows[a[upper]])
                out_j.append(cols[b[upper]])
    if not out_i:
        return empty, empty
    return np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64)


def band_pairs(
    hashes: np.ndarray,
    band: int,
    bands: Bands,
    max_distance: int,
    *,
    values: np.ndarray | None = None,
    budget: int = _PAIR_BUDGET,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)`` of distinct hashes whose first shared band is ``band``, within distance.

    ``hashes`` should hold distinct values (identical hashes are handled by the caller);
    ``values`` are their values on ``band`` when already known.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    vals = bands.values(hashes, band) if values is None else np.asarray(values)
    order = np.argsort(vals, kind="stable")
    sorted_h = hashes[order]
    pi, pj = _near_in_runs(vals[order], sorted_h, max_distance, budget)
    if band and pi.size:  # report a pair only on the first band it agrees on
        first = bands.first_shared(sorted_h[pi] ^ sorted_h[pj]) == band
        pi, pj = pi[first], pj[first]
    return order[pi], order[pj]


def band_components(
    hashes: np.ndarray,
    band: int,
    bands: Bands,
    max_distance: int,
    *,
    values: np.ndarray | None = None,
    budget: int = _PAIR_BUDGET,
) -> np.ndarray:
    """Label items connected by verified pairs found on ``band``; ``-1`` for unconnected items.

    Items with identical hashes agree on every band, so they are linked on band 0 only; on other
    bands an item is labelled only when its hash has a verified neighbour of a different value.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    labels = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return labels
    uniq, first, inverse, counts = np.unique(
        hashes, return_index=True, return_inverse=True, return_counts=True
    )
    uvals = None if values is None else np.asarray(values)[first]
    i, j = band_pairs(uniq, band, bands, max_distance, values=uvals, budget=budget)
    m = len(uniq)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(m, m))
    _, ulabels = connected_components(graph, directed=False)
    in_pair = np.zeros(m, dtype=bool)
    in_pair[i] = True
    in_pair[j] = True
    linked = in_pair | (counts > 1) if band == 0 else in_pair
    item_linked = linked[inverse]
    labels[item_linked] = ulabels[inverse][item_linked]
    return labels


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    """Every pair ``(i, j)``, ``i < j``, of items within ``max_distance`` (banded, in memory).

    A reference for tests and the benchmark: the same pairs an all-pairs scan would find.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    bands = bands_for(max_distance)
    uniq, inverse = np.unique(hashes, return_inverse=True)
    members = collections.defaultdict(list)
    for item, u in enumerate(inverse):
        members[int(u)].append(item)
    out: set[tuple[int, int]] = set()
    for group in members.values():
        for a in range(len(group)):
            for b in range(a + 1, len(group)):
                out.add((group[a], group[b]))
    for band in range(bands.num_bands):
        i, j = band_pairs(uniq, band, bands, max_distance)
        for ui, uj in zip(i.tolist(), j.tolist(), strict=True):
            for a in members[ui]:
                for b in members[uj]:
                    out.add((min(a, b), max(a, b)))
    return out


def all_pairs_within(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    """The quadratic baseline: compare every pair (for tests and benchmarks on small sets)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    out: set[tuple[int, int]] = set()
    for a in range(len(hashes) - 1):
        d = popcount(hashes[a + 1 :] ^ hashes[a])
        for off in np.flatnonzero(d <= max_distance).tolist():
            out.add((a, a + 1 + off))
    return out


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
# Eval sets and their index


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """An evaluation image set: ``[NAME=]PATH[?key=value&...]``.

    ``PATH`` is a folder of images (searched recursively), a Parquet file with an image column
    (raw bytes or a ``{bytes, path}`` struct as HF ``datasets`` writes), or a ``.tsv``/``.csv``
    list of image files. Options: ``column`` (image column of a Parquet file, or file-name column
    of a list), ``id`` (column naming each image), ``root`` (folder of a list's files; default
    ``images/`` beside the list when it exists, else the list's folder); any other ``col=value``
    keeps only rows where ``col`` equals ``value`` (``split=dev``).
    """

    name: str
    path: str
    column: str | None = None
    id_column: str | None = None
    root: str | None = None
    filters: tuple[tuple[str, str], ...] = ()

    @property
    def kind(self) -> str:
        p = self.path.lower()
        if p.endswith(".parquet"):
            return "parquet"
        if p.endswith((".tsv", ".csv", ".txt")):
            return "table"
        return "folder"


def parse_eval_set(spec: str) -> EvalSet:
    """Parse ``[NAME=]PATH[?key=value&...]`` (see ``EvalSet``)."""
    from urllib.parse import parse_qsl

    text = spec.strip()
    name = ""
    head, sep, _ = text.partition("=")
    if sep and "/" not in head and "?" not in head and head:
        name, text = head, text[len(head) + 1 :]
    path, _, query = text.partition("?")
    if not path:
        raise WitError(f"eval set: no path in {spec!r}")
    opts = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    column = opts.pop("column", None)
    id_column = opts.pop("id", None)
    root = opts.pop("root", None)
    if not name:
        base = os.path.basename(path.rstrip("/"))
        stem = base.split(".", 1)[0] or base
        parent = os.path.basename(os.path.dirname(path.rstrip("/")))
        name = f"{parent}-{stem}" if parent and stem != parent else stem
        if opts:
            name += "-" + "-".join(v for _, v in sorted(opts.items()))
    return EvalSet(name, path, column, id_column, root, tuple(sorted(opts.items())))


def _blob(value: Any) -> bytes | None:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, Mapping):
        b = value.get("bytes")
        return bytes(b) if b is not None else None
    return None


def list_eval_items(es: EvalSet) -> list[str]:
    """The ids of the images of an eval set, in a fixed order (run where the files are)."""
    if es.kind == "folder":
        if not os.path.isdir(es.path):
            raise WitError(f"eval set {es.name}: folder not found: {es.path}")
        out = []
        for dirpath, dirnames, filenames in os.walk(es.path):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    out.append(os.path.relpath(os.path.join(dirpath, f), es.path))
        if not out:
            raise WitError(f"eval set {es.name}: no images in {es.path}")
        return out
    if es.kind == "parquet":
        table = _read_eval_parquet(es, with_images=False)
        return [str(v) for v in table.column("__id__").to_pylist()]
    return [name for name, _ in _eval_table_files(es)]


def _read_eval_parquet(es: EvalSet, *, with_images: bool):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not fileio.exists(es.path):
        raise WitError(f"eval set {es.name}: file not found: {es.path}")
    with fileio.open_file(es.path, "rb") as f:
        schema = pq.read_schema(f)
    names = schema.names
    column = es.column
    if column is None:
        for field in schema:
            t = field.type
            if pa.types.is_binary(t) or pa.types.is_large_binary(t):
                column = field.name
                break
            if pa.types.is_struct(t) and "bytes" in [t.field(i).name for i in range(t.num_fields)]:
                column = field.name
                break
    if column is None or column not in names:
        raise WitError(f"eval set {es.name}: no image column in {es.path} (columns: {names})")
    id_column = es.id_column or next(
        (c for c in ("name", "id", "key", "path", "filename", "file_name") if c in names), None
    )
    wanted = [c for c in {column, id_column, *(k for k, _ in es.filters)} if c]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise WitError(f"eval set {es.name}: no column {missing[0]} in {es.path}")
    cols = [c for c in wanted if with_images or c != column]
    with fileio.open_file(es.path, "rb") as f:
        table = pq.read_table(f, columns=cols)
    table = table.append_column("__row__", pa.array(np.arange(table.num_rows)))
    for k, v in es.filters:
        table = table.filter(pc.equal(pc.cast(table.column(k), pa.string()), v))
    ids = table.column(id_column) if id_column else table.column("__row__")
    table = table.append_column("__id__", pc.cast(ids, pa.string()))
    if with_images:
        table = table.append_column("__image__", table.column(column))
    return table


def _eval_table_files(es: EvalSet) -> list[tuple[str, str]]:
    """``(id, image path)`` of a TSV/CSV list, distinct images in first-seen order."""
    import csv

    if not fileio.exists(es.path):
        raise WitError(f"eval set {es.name}: file not found: {es.path}")
    delimiter = "," if es.path.lower().endswith(".csv") else "\t"
    with fileio.open_file(es.path, "r") as f:
        rows = list(csv.DictReader(f, delimiter=delimiter))
    if not rows:
        raise WitError(f"eval set {es.name}: {es.path} is empty")
    names = list(rows[0])
    column = es.column or next(
        (c for c in ("image", "path", "file", "filename", "file_name") if c in names), None
    )
    if column is None or column not in names:
        raise WitError(f"eval set {es.name}: no image file column in {es.path} (columns: {names})")
    for k, _ in es.filters:
        if k not in names:
            raise WitError(f"eval set {es.name}: no column {k} in {es.path}")
    base = os.path.dirname(es.path)
    root = es.root
    if root is None:
        root = os.path.join(base, "images") if os.path.isdir(os.path.join(base, "images")) else base
    out: dict[str, str] = {}
    for row in rows:
        if all(row.get(k) == v for k, v in es.filters):
            name = row[column]
            out.setdefault(row.get(es.id_column, name) if es.id_column else name, name)
    return [(i, os.path.join(root, name)) for i, name in out.items()]


def load_eval_images(es: EvalSet, ids: Sequence[str]) -> list[tuple[str, bytes | None]]:
    """``(id, encoded image or None when missing)`` for the given ids of an eval set."""
    wanted = set(ids)
    out: dict[str, bytes | None] = {}
    if es.kind == "folder":
        for i in ids:
            try:
                with open(os.path.join(es.path, i), "rb") as f:
                    out[i] = f.read()
            except OSError:
                out[i] = None
    elif es.kind == "parquet":
        table = _read_eval_parquet(es, with_images=True)
        for i, img in zip(
            table.column("__id__").to_pylist(), table.column("__image__").to_pylist(), strict=True
        ):
            if i in wanted and i not in out:
                out[i] = _blob(img)
    else:
        for i, path in _eval_table_files(es):
            if i in wanted:
                try:
                    with fileio.open_file(path, "rb") as f:
                        out[i] = f.read()
                except OSError:
                    out[i] = None
    return [(i, out.get(i)) for i in ids]


@dataclasses.dataclass
class EvalHashes:
    """Hashes of (a chunk of) one eval set."""

    name: str
    ids: list[str]
    hashes: np.ndarray  # uint64
    undecodable: int = 0


def hash_eval_chunk(es: EvalSet, ids: Sequence[str], hasher: Any = None) -> EvalHashes:
    from wit_pipeline.stages.dedup.phash import PHasher

    hasher = hasher or PHasher()
    items = load_eval_images(es, ids)
    blobs = [b for _, b in items if b is not None]
    names = [i for i, b in items if b is not None]
    hashes, errors = hasher.hash_bytes(blobs)
    ok = [k for k, e in enumerate(errors) if e is None]
    return EvalHashes(
        name=es.name,
        ids=[names[k] for k in ok],
        hashes=hashes[ok],
        undecodable=len(items) - len(ok),
    )


class EvalIndex:
    """Banded index of evaluation-image hashes; finds every eval image within ``max_distance``.

    Each band keeps its values sorted, so a query is a ``searchsorted`` per band plus an exact
    check of the candidates: compact (a few arrays) and cheap to ship to workers.
    """

    def __init__(self, chunks: Iterable[EvalHashes], max_distance: int):
        chunks = sorted(chunks, key=lambda c: (c.name, c.ids[:1]))
        self.max_distance = max_distance
        self.bands = bands_for(max_distance)
        self.set_names: list[str] = sorted({c.name for c in chunks})
        set_pos = {n: i for i, n in enumerate(self.set_names)}
        self.ids: list[str] = [i for c in chunks for i in c.ids]
        self.set_of = np.array(
            [set_pos[c.name] for c in chunks for _ in c.ids], dtype=np.int32
        ).reshape(-1)
        self.hashes = (
            np.concatenate([c.hashes for c in chunks]).astype(np.uint64)
            if chunks
            else np.zeros(0, np.uint64)
        )
        self.images: dict[str, int] = collections.Counter()
        self.undecodable: dict[str, int] = collections.Counter()
        for c in chunks:
            self.images[c.name] += len(c.ids)
            self.undecodable[c.name] += c.undecodable
        vals = self.bands.values(self.hashes)
        self._order = np.argsort(vals, axis=1, kind="stable")
        self._sorted = np.take_along_axis(vals, self._order, axis=1)

    def __len__(self) -> int:
        return len(self.hashes)

    def query(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(query index, eval index, distance)`` of every match within ``max_distance``."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        qs, es, ds = [], [], []
        if len(self) and len(hashes):
            qvals = self.bands.values(hashes)
            for b in range(self.bands.num_bands):
                lo = np.searchsorted(self._sorted[b], qvals[b], side="left")
                hi = np.searchsorted(self._sorted[b], qvals[b], side="right")
                counts = hi - lo
                has = np.flatnonzero(counts)
                if not has.size:
                    continue
                c = counts[has]
                q = np.repeat(has, c)
                offsets = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
                e = self._order[b][np.repeat(lo[has], c) + offsets]
                x = hashes[q] ^ self.hashes[e]
                d = popcount(x)
                keep = d <= self.max_distance
                if b:
                    keep &= self.bands.first_shared(x) == b
                qs.append(q[keep])
                es.append(e[keep])
                ds.append(d[keep])
        if not qs:
            z = np.zeros(0, np.int64)
            return z, z, z
        return np.concatenate(qs), np.concatenate(es), np.concatenate(ds).astype(np.int64)


def contamination_matches(
    index: EvalIndex, hashes: np.ndarray
) -> dict[int, list[tuple[str, str, int]]]:
    """``{query index: [(eval set, eval id, distance), ...]}`` sorted by distance, set, id."""
    q, e, d = index.query(hashes)
    out: dict[int, list[tuple[str, str, int]]] = collections.defaultdict(list)
    for qi, ei, di in zip(q.tolist(), e.tolist(), d.tolist(), strict=True):
        out[qi].append((index.set_names[index.set_of[ei]], index.ids[ei], di))
    for v in out.values():
        v.sort(key=lambda m: (m[2], m[0], m[1]))
    return dict(out)


# ---------------------------------------------------------------------------------------------
# Records: reading download shards, merging groups


def _pairs_from_meta(meta: Mapping[str, Any], extra: Mapping[str, Mapping[str, Any]]) -> list:
    pairs = []
    for p in meta.get("pairs") or []:
        pair = {
            "uid": str(p["uid"]),
            "caption": str(p.get("caption", "")),
            "query_ids": sorted(int(q) for q in p.get("query_ids") or []),
        }
        more = extra.get(pair["uid"], {})
        for col in ("language", "page_url", "source"):
            v = more.get(col)
            pair[col] = None if v is None else str(v)
        pairs.append(pair)
    if not pairs:  # a sample written without its pairs: fall back to its captions
        for c in meta.get("captions") or []:
            pairs.append(
                {
                    "uid": "",
                    "caption": str(c),
                    "query_ids": sorted(int(q) for q in meta.get("query_ids") or []),
                    "language": None,
                    "page_url": None,
                    "source": None,
                }
            )
    pairs.sort(key=lambda p: p["uid"])
    return pairs


def _read_pair_columns(parquet_path: str) -> dict[str, dict[str, Any]]:
    import pyarrow.parquet as pq

    if not fileio.exists(parquet_path):
        return {}
    with fileio.open_file(parquet_path, "rb") as f:
        schema = pq.read_schema(f)
        cols = [c for c in ("uid", "language", "page_url", "source") if c in schema.names]
        if "uid" not in cols:
            return {}
        f.seek(0)
        table = pq.read_table(f, columns=cols)
    return {r["uid"]: r for r in table.to_pylist()}


def read_download_shard(
    tar_path: str, hasher: Any = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read one download shard: ``(records, undecodable)``, one record per image, with pHash.

    A record holds the sample's metadata (``key``, ``url``, sizes, ``sha256``, ``pairs``,
    ``query_ids``), its ``phash`` (16 hex chars) and ``source_tar`` (where its bytes are), but
    not the image bytes: they are read again only for the samples that end in the final shards.
    """
    from wit_pipeline import shards
    from wit_pipeline.stages.dedup.phash import PHasher, to_hex

    hasher = hasher or PHasher()
    extra = _read_pair_columns(tar_path[: -len(".tar")] + ".parquet")
    metas, blobs = [], []
    for s in shards.iter_samples(tar_path):
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in s), None)
        meta = json.loads(s["json"]) if "json" in s else {}
        meta.setdefault("key", s["__key__"])
        meta["_image_ext"] = image_ext
        metas.append(meta)
        blobs.append(s.get(image_ext, b"") if image_ext else b"")
    hashes, errors = hasher.hash_bytes(blobs)
    records, bad = [], []
    for meta, h, err in zip(metas, hashes, errors, strict=True):
        rec = {
            "key": str(meta["key"]),
            "url": str(meta.get("url", "")),
            "source_tar": tar_path,
            "image_ext": meta["_image_ext"] or "jpg",
            "width": int(meta.get("width") or 0),
            "height": int(meta.get("height") or 0),
            "original_width": int(meta.get("original_width") or 0),
            "original_height": int(meta.get("original_height") or 0),
            "sha256": str(meta.get("sha256", "")),
            "pairs": _pairs_from_meta(meta, extra),
        }
        rec["query_ids"] = sorted({q for p in rec["pairs"] for q in p["query_ids"]})
        if err is None and meta["_image_ext"]:
            rec["phash"] = to_hex(h)
            records.append(rec)
        else:
            rec["detail"] = err or "no image member in the sample"
            bad.append(rec)
    return records, bad


def merge_group(survivor: Mapping[str, Any], duplicates: Sequence[Mapping[str, Any]]) -> dict:
    """The survivor of a near-duplicate group, holding every member's pairs (by ``uid``)."""
    from wit_pipeline.stages.dedup.phash import from_hex, hamming

    out = dict(survivor)
    pairs = {p["uid"] or f"{survivor['key']}:{i}": p for i, p in enumerate(survivor["pairs"])}
    dup_info = []
    sh = from_hex(survivor["phash"])
    for d in sorted(duplicates, key=lambda r: r["key"]):
        for i, p in enumerate(d["pairs"]):
            pairs.setdefault(p["uid"] or f"{d['key']}:{i}", p)
        dup_info.append(
            {
                "key": d["key"],
                "url": d["url"],
                "phash": d["phash"],
                "distance": hamming(sh, from_hex(d["phash"])),
            }
        )
    out["pairs"] = [pairs[u] for u in sorted(pairs)]
    out["query_ids"] = sorted({q for p in out["pairs"] for q in p["query_ids"]})
    out["duplicates"] = list(survivor.get("duplicates") or []) + dup_info
    return out


def _input_copy_rank(record: Mapping[str, Any]) -> tuple:
    return (*survivor_rank(record), str(record.get("source_tar", "")), str(record.get("phash")))


def merge_input_copies(
    records: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, Any], list[Mapping[str, Any]], int]:
    """One record from the copies of one sample key read from overlapping inputs.

    Same key = same image URL, which the download stage turns into one sample whose captions
    are all kept; copies are merged the same way. The kept copy has the most original pixels,
    then the smallest ``source_tar`` path; pairs of the other copies whose ``uid`` it lacks move
    to it. Returns ``(kept, other copies, pairs of the other copies that were already there)``.
    """
    ordered = sorted(records, key=_input_copy_rank)
    kept = dict(ordered[0])

    def ident(p: Mapping[str, Any]) -> str:
        return p["uid"] or f"caption:{p['caption']}"

    seen = {ident(p) for p in kept["pairs"]}
    pairs = list(kept["pairs"])
    repeated = 0
    for r in ordered[1:]:
        for p in r["pairs"]:
            if ident(p) in seen:
                repeated += 1
            else:
                seen.add(ident(p))
                pairs.append(p)
    kept["pairs"] = sorted(pairs, key=lambda p: p["uid"])
    kept["query_ids"] = sorted({q for p in kept["pairs"] for q in p["query_ids"]})
    return kept, ordered[1:], repeated


def rejected_row(
    record: Mapping[str, Any],
    reason: str,
    *,
    detail: str = "",
    duplicate_of: str | None = None,
    distance: int | None = None,
    eval_set: str | None = None,
    eval_id: str | None = None,
) -> dict[str, Any]:
    """One row of ``rejected/*.parquet`` for a dropped sample (see ``REJECTED_SCHEMA``)."""
    return {
        "key": record["key"],
        "url": record.get("url", ""),
        "uids": [p["uid"] for p in record.get("pairs", [])],
        "captions": [p["caption"] for p in record.get("pairs", [])],
        "phash": record.get("phash"),
        "reason": reason,
        "detail": detail,
        "duplicate_of": duplicate_of,
        "distance": distance,
        "eval_set": eval_set,
        "eval_id": eval_id,
    }


def rejected_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("url", pa.string()),
            ("uids", pa.list_(pa.string())),
            ("captions", pa.list_(pa.string())),
            ("phash", pa.string()),
            ("reason", pa.string()),
            ("detail", pa.string()),
            ("duplicate_of", pa.string()),
            ("distance", pa.int32()),
            ("eval_set", pa.string()),
            ("eval_id", pa.string()),
        ]
    )


def contamination_report(
    index: EvalIndex | None,
    hits: Iterable[tuple[str, str, str, int]],
    *,
    eval_sets: Sequence[EvalSet],
    max_distance: int,
) -> dict[str, Any]:
    """The ``contamination.json`` document from ``(eval set, eval id, sample key, distance)``."""
    per_set: dict[str, dict[str, Any]] = {}
    samples_by_set: dict[str, set] = collections.defaultdict(set)
    evals_by_set: dict[str, set] = collections.defaultdict(set)
    all_samples: set = set()
    for name, eval_id, key, _ in hits:
        samples_by_set[name].add(key)
        evals_by_set[name].add(eval_id)
        all_samples.add(key)
    for es in eval_sets:
        per_set[es.name] = {
            "path": es.path,
            "filters": dict(es.filters),
            "images": int(index.images.get(es.name, 0)) if index else 0,
            "undecodable": int(index.undecodable.get(es.name, 0)) if index else 0,
            "contaminated_samples": len(samples_by_set.get(es.name, ())),
            "eval_images_hit": len(evals_by_set.get(es.name, ())),
            "hit": bool(samples_by_set.get(es.name)),
        }
    return {
        "max_distance": max_distance,
        "eval_sets": per_set,
        "sets_hit": sorted(n for n, v in per_set.items() if v["hit"]),
        "contaminated_samples": len(all_samples),
    }


# ---------------------------------------------------------------------------------------------
# Beam transforms

HITS = "hits"  # tagged output of Decontaminate: (eval set, eval id, key, distance)


class _ReadShardFn(beam.DoFn):
    def setup(self):
        from wit_pipeline.stages.dedup.phash import PHasher

        self._hasher = PHasher()

    def process(self, tar_path: str):
        records, bad = read_download_shard(tar_path, self._hasher)
        c = collections.Counter()
        c[counters_lib.INPUT] += len(records) + len(bad)
        c[pair_counter(counters_lib.INPUT)] += sum(len(r["pairs"]) for r in records + bad)
        for r in bad:
            c[counters_lib.dropped(UNDECODABLE)] += 1
            c[pair_counter(counters_lib.dropped(UNDECODABLE))] += len(r["pairs"])
            yield TaggedOutput(
                beam_utils.REJECTED, rejected_row(r, UNDECODABLE, detail=r["detail"])
            )
        yield from records
        yield from beam_utils.emit_counts(c)


class ReadDownloadShards(beam.PTransform):
    """Download shard tar paths -> one metadata record per image, with its pHash.

    Outputs: main (records), ``rejected`` (undecodable images), ``counts``.
    """

    def expand(self, paths):
        return (
            paths
            | "Spread" >> beam.Reshuffle()
            | "ReadAndHash"
            >> beam.ParDo(_ReadShardFn()).with_outputs(
                beam_utils.COUNTS, beam_utils.REJECTED, main="records"
            )
        )


class _HashEvalChunkFn(beam.DoFn):
    def setup(self):
        from wit_pipeline.stages.dedup.phash import PHasher

        self._hasher = PHasher()

    def process(self, item):
        es, ids = item
        yield hash_eval_chunk(es, ids, self._hasher)


class BuildEvalIndex(beam.PTransform):
    """Pipeline root -> a one-element PCollection holding the ``EvalIndex`` of the eval sets.

    Images are listed when the pipeline is built and hashed on workers in chunks.
    """

    def __init__(self, *, eval_sets: Sequence[EvalSet], max_distance: int, chunk: int = 1000):
        super().__init__()
        bands_for(max_distance)
        self._sets = list(eval_sets)
        self._max_distance = max_distance
        self._chunks = []
        for es in self._sets:
            ids = list_eval_items(es)
            for i in range(0, len(ids), chunk):
                self._chunks.append((es, ids[i : i + chunk]))

    def expand(self, root):
        k = self._max_distance
        return (
            root
            | "EvalChunks" >> beam.Create(self._chunks, reshuffle=False)
            | "Spread" >> beam.Reshuffle()
            | "HashEval" >> beam.ParDo(_HashEvalChunkFn())
            | "Collect" >> beam.combiners.ToList()
            | "Index" >> beam.Map(lambda chunks: EvalIndex(chunks, k))
        )


class _DecontaminateFn(beam.DoFn):
    def process(self, batch, index):
        c = collections.Counter()
        kept = []
        if index is not None and len(index):
            hashes = hashes_from_hex([r["phash"] for r in batch])
            matches = contamination_matches(index, hashes)
        else:
            matches = {}
        for i, r in enumerate(batch):
            m = matches.get(i)
            if not m:
                kept.append(r)
                continue
            name, eval_id, dist = m[0]
            c[counters_lib.dropped(EVAL_CONTAMINATION)] += 1
            c[pair_counter(counters_lib.dropped(EVAL_CONTAMINATION))] += len(r["pairs"])
            sets = sorted({s for s, _, _ in m})
            yield TaggedOutput(
                beam_utils.REJECTED,
                rejected_row(
                    r,
                    EVAL_CONTAMINATION,
                    detail=f"{len(m)} eval image(s) within distance; sets: {', '.join(sets)}",
                    distance=dist,
                    eval_set=name,
                    eval_id=eval_id,
                ),
            )
            for s, e, d in m:
                yield TaggedOutput(HITS, (s, e, r["key"], d))
        yield from kept
        yield from beam_utils.emit_counts(c)


class Decontaminate(beam.PTransform):
    """Drop records within the index's distance of an eval image (``eval_contamination``).

    ``index`` is a one-element PCollection holding an ``EvalIndex`` (``BuildEvalIndex``).
    Outputs: main (kept), ``rejected``, ``counts``, ``hits`` (eval set, eval id, key, dist).
    """

    def __init__(self, *, index, batch_size: int = 1024):
        super().__init__()
        self._index = index
        self._batch_size = batch_size

    def expand(self, records):
        return (
            records
            | "Batch"
            >> beam.BatchElements(min_batch_size=self._batch_size, max_batch_size=self._batch_size)
            | "Probe"
            >> beam.ParDo(_DecontaminateFn(), beam.pvalue.AsSingleton(self._index)).with_outputs(
                beam_utils.COUNTS, beam_utils.REJECTED, HITS, main="kept"
            )
        )


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


def hashes_from_hex(hexes: Sequence[str]) -> np.ndarray:
    """``uint64`` array from 16-hex-char strings (vectorized)."""
    return np.frombuffer(bytes.fromhex("".join(hexes)), dtype=">u8").astype(np.uint64)


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
    for lab, r, nb in values:
        lab = tuple(lab)
        if nb is not None:
            rank, neighbours = r, nb
        if label is None or lab < label:
            label = lab
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


class _CollapseFn(beam.DoFn):
    """Join of records and survivor mapping by key -> (survivor key, tagged record).

    Several records of one key (overlapping inputs) become one (``merge_input_copies``); the
    other copies are dropped with ``duplicate_input``.
    """

    def process(self, item):
        from wit_pipeline.stages.dedup.phash import from_hex, hamming

        key, grouped = item
        records = list(grouped["records"])
        survivors = list(grouped["survivor"])
        if not records:
            return
        record = records[0]
        if len(records) > 1:
            record, others, repeated = merge_input_copies(records)
            c = collections.Counter()
            c[counters_lib.dropped(DUPLICATE_INPUT)] += len(others)
            c[pair_counter(counters_lib.dropped(DUPLICATE_INPUT))] += repeated
            for r in others:
                yield TaggedOutput(
                    beam_utils.REJECTED,
                    rejected_row(
                        r,
                        DUPLICATE_INPUT,
                        detail=f"same key read again from {r['source_tar']}; "
                        f"kept the copy from {record['source_tar']}",
                        duplicate_of=key,
                        distance=hamming(from_hex(record["phash"]), from_hex(r["phash"])),
                    ),
                )
            yield from beam_utils.emit_counts(c)
        survivor = survivors[0] if survivors else key
        yield (survivor, (survivor == key, record))


class _MergeFn(beam.DoFn):
    def __init__(self, collapse: bool):
        self._collapse = collapse

    def process(self, item):
        survivor_key, members = item
        members = list(members)
        survivor = next(r for is_s, r in members if is_s)
        dups = sorted((r for is_s, r in members if not is_s), key=lambda r: r["key"])
        c = collections.Counter()
        if not dups:
            yield survivor
            return
        if not self._collapse:
            # Keep every image; mark its group so that users can dedup later.
            yield {**survivor, "duplicate_of": None, "duplicate_group": survivor_key}
            for d in dups:
                yield {**d, "duplicate_of": survivor_key, "duplicate_group": survivor_key}
            return
        merged = merge_group(survivor, dups)
        by_key = {d["key"]: d for d in merged["duplicates"]}
        for d in dups:
            c[counters_lib.dropped(NEAR_DUPLICATE)] += 1
            yield TaggedOutput(
                beam_utils.REJECTED,
                rejected_row(
                    d,
                    NEAR_DUPLICATE,
                    detail=f"merged into {survivor_key}",
                    duplicate_of=survivor_key,
                    distance=by_key[d["key"]]["distance"],
                ),
            )
        yield merged
        yield from beam_utils.emit_counts(c)


class CollapseDuplicates(beam.PTransform):
    """Merge each near-duplicate group into its survivor (or only annotate the group).

    Input: ``{"records": records, "survivor": (key, survivor key) pairs}``. With
    ``collapse`` the survivor keeps every member's pairs and the others are dropped with
    ``near_duplicate``; without it every image is kept with ``duplicate_of``/
    ``duplicate_group`` set. Pairs of merged images stay in the dataset (they are counted as
    kept at pair level).
    """

    def __init__(self, *, collapse: bool = True):
        super().__init__()
        self._collapse = collapse

    def expand(self, inputs):
        keyed = inputs["records"] | "ByKey" >> beam.Map(lambda r: (r["key"], r))
        joined = (
            {"records": keyed, "survivor": inputs["survivor"]}
            | "JoinSurvivor" >> beam.CoGroupByKey()
            | "ToSurvivor"
            >> beam.ParDo(_CollapseFn()).with_outputs(
                beam_utils.COUNTS, beam_utils.REJECTED, main="members"
            )
        )
        merged = (
            joined.members
            | "GroupBySurvivor" >> beam.GroupByKey()
            | "Merge"
            >> beam.ParDo(_MergeFn(self._collapse)).with_outputs(
                beam_utils.COUNTS, beam_utils.REJECTED, main="samples"
            )
        )
        return {
            "samples": merged.samples,
            beam_utils.REJECTED: (joined[beam_utils.REJECTED], merged[beam_utils.REJECTED])
            | "AllRejected" >> beam.Flatten(),
            beam_utils.COUNTS: (joined[beam_utils.COUNTS], merged[beam_utils.COUNTS])
            | "AllCounts" >> beam.Flatten(),
        }


class DedupRecords(beam.PTransform):
    """Records (with pHash) -> decontaminated, near-duplicate-collapsed records.

    Returns a dict: ``samples``, ``rejected``, ``counts`` and ``hits`` (eval matches).
    ``eval_index`` is a one-element PCollection (``BuildEvalIndex``) or ``None``.
    """

    def __init__(
        self,
        *,
        max_distance: int,
        collapse: bool = True,
        eval_index=None,
        partitions: int = 64,
        batch_size: int = 4096,
        label_rounds: int | None = 4,
    ):
        super().__init__()
        bands_for(max_distance)
        self._k = max_distance
        self._collapse = collapse
        self._eval_index = eval_index
        self._partitions = partitions
        self._batch_size = batch_size
        self._label_rounds = label_rounds

    def expand(self, records):
        rejected, counts, hits = [], [], []
        if self._eval_index is not None:
            clean = records | "Decontaminate" >> Decontaminate(
                index=self._eval_index, batch_size=min(self._batch_size, 1024)
            )
            records = clean.kept
            rejected.append(clean[beam_utils.REJECTED])
            counts.append(clean[beam_utils.COUNTS])
            hits.append(clean[HITS])
        survivor = records | "FindNearDuplicates" >> FindNearDuplicates(
            max_distance=self._k,
            partitions=self._partitions,
            batch_size=self._batch_size,
            label_rounds=self._label_rounds,
        )
        merged = {"records": records, "survivor": survivor} | "Collapse" >> (
            CollapseDuplicates(collapse=self._collapse)
        )
        rejected.append(merged[beam_utils.REJECTED])
        counts.append(merged[beam_utils.COUNTS])
        p = records.pipeline

        def _flat(pcolls, label):
            if not pcolls:
                return p | f"No{label}" >> beam.Create([])
            return pcolls | f"Flatten{label}" >> beam.Flatten()

        return {
            "samples": merged["samples"],
            "rejected": _flat(rejected, "Rejected"),
            "counts": _flat(counts, "Counts"),
            "hits": _flat(hits, "Hits"),
        }


def iter_tar_members(tar_path: str, wanted: Mapping[str, str]) -> Iterator[tuple[str, bytes]]:
    """``(key, image bytes)`` for the keys in ``wanted`` (key -> image extension) of a tar."""
    with fileio.open_file(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if wanted.get(key) == ext:
                yield key, tar.extractfile(member).read()  # type: ignore[union-attr]
