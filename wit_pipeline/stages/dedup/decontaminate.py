"""Eval-set decontamination: drop training images within a few bits of an evaluation image.

The hashes of evaluation images (folders of images, Parquet files with an image column, or
TSV/CSV lists of image files, e.g. CIFAR-10 test and the Flickr8k dev split) form an
:class:`EvalIndex` built with the same banding as near-duplicate search
(:mod:`~wit_pipeline.stages.dedup.lsh`), broadcast to workers as a side input
(:class:`BuildEvalIndex`); a training image within ``dedup.eval_max_distance`` of any evaluation
image is dropped with reason ``eval_contamination`` before near-duplicate grouping
(:class:`Decontaminate`), and ``contamination.json`` says which eval sets were hit
(:class:`WriteContamination`).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np

from wit_pipeline import fileio, stage
from wit_pipeline.errors import WitError
from wit_pipeline.stages.dedup import STAGE
from wit_pipeline.stages.dedup.lsh import bands_for, hashes_from_hex, popcount

EVAL_CONTAMINATION = "eval_contamination"
CONTAMINATION = "contamination.json"
HITS = "hits"  # output of Decontaminate: (eval set, eval id, sample key, distance)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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


def decontaminate(records: Sequence[Mapping[str, Any]], index: EvalIndex | None) -> stage.Result:
    """Drop the records within the index's distance of an eval image (``eval_contamination``).

    Each rejected record names its closest match (``eval_set``, ``eval_id``, ``distance``);
    ``outputs[HITS]`` lists every match as ``(eval set, eval id, sample key, distance)``.
    """
    matches = {}
    if index is not None and len(index):
        matches = contamination_matches(index, hashes_from_hex([r["phash"] for r in records]))
    kept, rejected, hits = [], [], []
    for i, r in enumerate(records):
        m = matches.get(i)
        if not m:
            kept.append(r)
            continue
        name, eval_id, dist = m[0]
        sets = sorted({s for s, _, _ in m})
        rejected.append(
            {
                **r,
                "reason": EVAL_CONTAMINATION,
                "detail": f"{len(m)} eval image(s) within distance; sets: {', '.join(sets)}",
                "distance": dist,
                "eval_set": name,
                "eval_id": eval_id,
            }
        )
        hits.extend((s, e, r["key"], d) for s, e, d in m)
    return stage.Result(kept, rejected, outputs={HITS: hits})


# ---------------------------------------------------------------------------------------------
# Beam


class _HashEvalChunkFn(beam.DoFn):
    def __init__(self, decode: str = "exact"):
        super().__init__()
        self._decode = decode

    def setup(self):
        from wit_pipeline.stages.dedup.phash import PHasher

        self._hasher = PHasher(self._decode)

    def process(self, item):
        es, ids = item
        yield hash_eval_chunk(es, ids, self._hasher)


class BuildEvalIndex(beam.PTransform):
    """Pipeline root -> a one-element PCollection holding the ``EvalIndex`` of the eval sets.

    Images are listed when the pipeline is built and hashed on workers in chunks, decoded as
    the downloads are (``phash_decode``, ``dedup.phash_decode``), so that both sides' hashes
    are comparable.
    """

    def __init__(
        self,
        *,
        eval_sets: Sequence[EvalSet],
        max_distance: int,
        chunk: int = 1000,
        phash_decode: str = "exact",
    ):
        super().__init__()
        self._decode = phash_decode
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
            | "HashEval" >> beam.ParDo(_HashEvalChunkFn(self._decode))
            | "Collect" >> beam.combiners.ToList()
            | "Index" >> beam.Map(lambda chunks: EvalIndex(chunks, k))
        )


class _DecontaminateFn(stage.StageFn):
    def __init__(self):
        super().__init__(stage=STAGE, flow=False, pairs=True, outputs=(HITS,))

    def core(self, batch, index):
        return decontaminate(batch, index)


class Decontaminate(beam.PTransform):
    """Drop records within the index's distance of an eval image (``eval_contamination``).

    ``index`` is a one-element PCollection holding an ``EvalIndex`` (``BuildEvalIndex``).
    Returns the stage outputs (``stage.apply``): ``kept``, ``rejected``, ``counts`` and ``hits``.
    """

    def __init__(self, *, index, batch_size: int = 1024):
        super().__init__()
        self._index = index
        self._batch_size = batch_size

    def expand(self, records):
        batches = records | "Batch" >> beam.BatchElements(
            min_batch_size=self._batch_size, max_batch_size=self._batch_size
        )
        return stage.apply(
            batches, "Probe", _DecontaminateFn(), beam.pvalue.AsSingleton(self._index)
        )


def _write_contamination(_, path: str, report_args: Mapping[str, Any], hits, index) -> str:
    fileio.write_json(path, contamination_report(index, hits, **report_args))
    return path


class WriteContamination(beam.PTransform):
    """Eval hits + the eval index -> ``contamination.json`` (which sets were hit, how much)."""

    def __init__(self, path: str, *, index, eval_sets: Sequence[EvalSet], max_distance: int):
        super().__init__()
        self._path = path
        self._index = index
        self._args = {"eval_sets": list(eval_sets), "max_distance": max_distance}

    def expand(self, hits):
        all_hits = hits | "Hits" >> beam.combiners.ToList()
        return (
            hits.pipeline
            | "Once" >> beam.Create([None])
            | "Write"
            >> beam.Map(
                _write_contamination,
                self._path,
                self._args,
                beam.pvalue.AsSingleton(all_hits),
                beam.pvalue.AsSingleton(self._index),
            )
        )
