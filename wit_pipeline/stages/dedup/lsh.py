"""LSH banding over 64-bit perceptual hashes: every pair within ``k`` bits, without all pairs.

Two images are near duplicates when their hashes differ in at most ``k`` bits. Comparing all
pairs is quadratic, so candidates come from the pigeonhole principle: split the 64 bits into
``k + 1`` bands; two hashes within distance ``k`` agree exactly on at least one band. Hashes are
grouped by ``(band, band value)``; only hashes in one group are compared, and every candidate
pair is verified with its exact Hamming distance. A pair is reported only in the first band it
agrees on, so each verified pair is found exactly once.

Bands interleave the bit positions (band ``b`` holds bits ``b, b + k + 1, ...``): pHash bits
of neighbouring DCT coefficients are correlated and the first bit (the DC term) is almost always
set, so contiguous bands would be less uniform and give larger groups to compare.

A band has only ``64 / (k + 1)`` bits, so the hashes sharing one band value grow with the data;
a long run of them is compared by the same principle once more: its hashes differ only outside
the band, so a pair within ``k`` agrees exactly on one of ``k + 1`` groups of the other bits
(``Bands.sub_bands``), and only hashes equal on a group are compared.

Pure numpy; :mod:`~wit_pipeline.stages.dedup.groups` runs it over Beam partitions and
:mod:`~wit_pipeline.stages.dedup.decontaminate` probes an eval-set index with the same bands.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from wit_pipeline.config import MAX_HASH_DISTANCE
from wit_pipeline.errors import WitError

_PAIR_BUDGET = 1 << 18  # hash comparisons held in memory at once (per numpy block)


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
        bits = _bits(hashes)
        wanted = range(self.num_bands) if band is None else [band]
        out = np.empty((len(wanted), len(bits)), dtype=np.int64)
        for row, b in enumerate(wanted):
            out[row] = _packed(bits, np.arange(b, 64, self.num_bands))
        return out if band is None else out[0]

    def sub_bands(self, band: int) -> list[np.ndarray]:
        """The bit positions outside ``band``, dealt into ``num_bands`` groups.

        Hashes equal on ``band`` and within ``num_bands - 1`` bits of each other differ only
        outside it, so they agree exactly on at least one of these groups (pigeonhole again):
        a long run of one band value is compared by sub-band instead of all pairs.
        """
        rest = np.array([p for p in range(64) if p % self.num_bands != band], dtype=np.int64)
        return [rest[g :: self.num_bands] for g in range(self.num_bands)]

    def first_shared(self, xor: np.ndarray) -> np.ndarray:
        """For XORs of hash pairs: the first band on which the pair agrees (``num_bands``: none)."""
        agree = (xor[None, :] & self.masks[:, None]) == 0
        first = np.argmax(agree, axis=0)
        first[~agree.any(axis=0)] = self.num_bands
        return first


def bands_for(max_distance: int) -> Bands:
    """``max_distance + 1`` bands: hashes within ``max_distance`` share one band exactly."""
    if not 0 <= max_distance <= MAX_HASH_DISTANCE:
        raise WitError(
            f"max_distance must be between 0 and {MAX_HASH_DISTANCE} bits, got {max_distance}"
        )
    return Bands(max_distance + 1)


def _bits(hashes: np.ndarray) -> np.ndarray:
    """``(n, 64)`` uint8 bits of 64-bit hashes, the most significant first."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    return np.unpackbits(h.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1)


def _packed(bits: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """int64 value of the given bit columns of ``_bits`` (the first the most significant)."""
    width = len(columns)
    packed = np.packbits(bits[:, columns], axis=1)  # MSB first, zero-padded to whole bytes
    padded = np.zeros((len(bits), 8), dtype=np.uint8)
    padded[:, : packed.shape[1]] = packed
    return (padded.view(">u8").ravel() >> np.uint64(64 - width)).astype(np.int64)


def _mask(columns: np.ndarray) -> np.uint64:
    return np.uint64(sum(1 << (63 - int(p)) for p in columns))


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.asarray(x, dtype=np.uint64))


_BLOCK_RUN = 1024  # runs up to this size are compared as (runs, s, s) blocks
# Runs longer than this are split by sub-bands (``Bands.sub_bands``) before comparing. A band
# of k + 1 has 64 / (k + 1) bits, so its runs grow with the data (k = 4: ~1,200 hashes per
# value at 10M distinct hashes): all pairs of them made the LSH quadratic in the data
# (band_components at 10M: 9.5 us per hash, 3.6 with sub-bands; at 1M, runs of ~120 are
# compared directly: sub-bands gain nothing below a few hundred).
_SUB_BAND_RUN = 256


def _near_in_runs(
    sorted_vals: np.ndarray,
    sorted_h: np.ndarray,
    max_distance: int,
    budget: int,
    sub_bands: Sequence[np.ndarray] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(i, j)``, ``i < j``, in the same run of equal values and within distance.

    Runs of one size are compared together as a ``(runs, s, s)`` block of XORs (no per-pair
    index arrays); runs longer than ``_BLOCK_RUN`` row block by row block. At most about
    ``budget`` comparisons are held in memory at once. With ``sub_bands`` (the bit groups
    outside the band the values come from), runs longer than ``_SUB_BAND_RUN`` are split
    by them first (``_near_in_long_runs``).
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
    if len(sub_bands) > 1:
        long = sizes > _SUB_BAND_RUN
        if long.any():
            i, j = _near_in_long_runs(
                starts[long], sizes[long], sorted_h, max_distance, budget, sub_bands
            )
            out_i.append(i)
            out_j.append(j)
            starts, sizes = starts[~long], sizes[~long]
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


def _near_in_long_runs(
    starts: np.ndarray,
    sizes: np.ndarray,
    sorted_h: np.ndarray,
    max_distance: int,
    budget: int,
    sub_bands: Sequence[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """``_near_in_runs`` for long runs: a run's pairs within distance agree on one sub-band,
    so each sub-band's (run, value) runs are compared instead, and a pair is kept only on the
    first sub-band it agrees on (found once). Positions are ``sorted_h``'s, ``i < j``."""
    run = np.repeat(np.arange(len(starts), dtype=np.int64), sizes)
    offsets = np.arange(len(run)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    pos = np.repeat(starts, sizes) + offsets
    h = sorted_h[pos]
    bits = _bits(h)
    masks = [_mask(cols) for cols in sub_bands]
    out_i, out_j = [], []
    for g, cols in enumerate(sub_bands):
        key = (run << np.int64(len(cols))) | _packed(bits, cols)  # width <= 32 bits
        order = np.argsort(key, kind="stable")
        a, b = _near_in_runs(key[order], h[order], max_distance, budget)
        a, b = order[a], order[b]
        if g and a.size:
            xor = h[a] ^ h[b]
            first = np.ones(a.size, dtype=bool)
            for m in masks[:g]:
                first &= (xor & m) != 0
            a, b = a[first], b[first]
        out_i.append(pos[np.minimum(a, b)])
        out_j.append(pos[np.maximum(a, b)])
    return np.concatenate(out_i), np.concatenate(out_j)


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
    pi, pj = _near_in_runs(
        vals[order], sorted_h, max_distance, budget, sub_bands=bands.sub_bands(band)
    )
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


def hashes_from_hex(hexes: Sequence[str]) -> np.ndarray:
    """``uint64`` array from 16-hex-char strings (vectorized)."""
    return np.frombuffer(bytes.fromhex("".join(hexes)), dtype=">u8").astype(np.uint64)
