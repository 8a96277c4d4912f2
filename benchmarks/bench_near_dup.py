"""Near-duplicate grouping of 1M pHashes: LSH banding vs an all-pairs scan.

    python benchmarks/bench_near_dup.py              # 1,000,000 hashes, all-pairs on 20,000
    python benchmarks/bench_near_dup.py --quick      # 100,000 hashes, all-pairs on 5,000
    python benchmarks/bench_near_dup.py --no-beam    # skip the Beam runs

Hashes are synthetic but shaped like real pHashes: every pHash of the 17,000 Flickr8k and
CIFAR-10 images has exactly 32 bits set and its first (DC) bit set, other bits about evenly
split; so each base hash sets the DC bit and 31 of the other 63 at random. Planted on top:
near-duplicate clusters (3% of the hashes; each member differs from its seed by 0, 2 or 4 bits,
as re-encodes and resizes do, and 1 in 10 by 5-6 bits, just outside the default distance),
exact copies (1%), and one heavy group of 2,000 identical hashes (blank images).

Three measurements, in one run:
1. a subset: ``lsh.near_duplicate_pairs`` (banding) vs ``lsh.all_pairs_within`` (every pair,
   numpy-vectorized per row): both must find the same pairs;
2. all hashes, in process: ``groups.find_groups`` (bands, partitions, verification, union-find);
3. all hashes through the Beam transform ``groups.FindNearDuplicates`` on FnApiRunner, twice:
   groups formed by label propagation (``--label-rounds``, the default) and by the one-worker
   union-find; both checked equal to (2). The all-pairs time for all hashes is extrapolated
   (quadratic) from (1).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import pathlib
import pickle
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wit_pipeline.stages.dedup import groups, lsh  # noqa: E402


def random_phashes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` hashes with the DC bit and 31 of the other 63 bits set."""
    out = np.empty(n, dtype=np.uint64)
    weights = np.left_shift(np.uint64(1), np.arange(62, -1, -1, dtype=np.uint64))
    for start in range(0, n, 100_000):
        m = min(n, start + 100_000) - start
        keys = rng.random((m, 63), dtype=np.float32)
        ones = np.argpartition(keys, 31, axis=1)[:, :31]
        bits = np.zeros((m, 63), dtype=np.uint64)
        np.put_along_axis(bits, ones, np.uint64(1), axis=1)
        out[start : start + m] = (bits * weights).sum(axis=1) | (np.uint64(1) << np.uint64(63))
    return out


def swap_bits(rng: np.random.Generator, h: int, swaps: int) -> int:
    """Move ``swaps`` set bits to unset positions (distance 2 per swap; 32 bits stay set)."""
    ones = [b for b in range(63) if h >> b & 1]
    zeros = [b for b in range(63) if not h >> b & 1]
    for a, z in zip(
        rng.choice(ones, swaps, replace=False), rng.choice(zeros, swaps, replace=False), strict=True
    ):
        h ^= (1 << int(a)) | (1 << int(z))
    return h


def make_hashes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_cluster = int(n * 0.03)
    n_copies = int(n * 0.01)
    n_blank = min(2000, n // 50)
    n_base = n - n_cluster - n_copies - n_blank
    base = random_phashes(rng, n_base)
    extra = []
    while len(extra) < n_cluster:
        s = int(base[rng.integers(n_base)])
        for _ in range(int(rng.geometric(1 / 3))):
            far = rng.random() < 0.1
            extra.append(
                swap_bits(rng, s, int(rng.integers(3, 4)) if far else int(rng.integers(0, 3)))
            )
    extra = extra[:n_cluster]
    copies = base[rng.integers(0, n_base, n_copies)]
    blank = np.full(n_blank, 0x8000000000000000 | 0x7FFFFFFF, dtype=np.uint64)
    h = np.concatenate([base, np.array(extra, dtype=np.uint64), copies, blank])
    return h[rng.permutation(len(h))]


def _records(item, path):
    start, stop = item
    h = np.load(path, mmap_mode="r")
    for i in range(start, stop):
        yield {
            "key": f"{i:08d}",
            "phash": f"{int(h[i]):016x}",
            "original_width": 96 + i % 3,
            "original_height": 96,
        }


def _save(mapping, path):
    with open(path, "wb") as f:
        pickle.dump(mapping, f)


def run_beam(
    h: np.ndarray, k: int, partitions: int, label_rounds: int | None, tmp: str
) -> tuple[float, dict]:
    import apache_beam as beam

    from wit_pipeline import beam_utils

    npy = os.path.join(tmp, "hashes.npy")
    np.save(npy, h)
    out = os.path.join(tmp, "groups.pkl")
    chunks = [(s, min(len(h), s + 50_000)) for s in range(0, len(h), 50_000)]
    t = time.perf_counter()
    with beam.Pipeline(options=beam_utils.pipeline_options([])) as p:
        _ = (
            p
            | beam.Create(chunks)
            | beam.FlatMap(_records, npy)
            | groups.FindNearDuplicates(
                max_distance=k, partitions=partitions, label_rounds=label_rounds
            )
            | beam.combiners.ToDict()
            | beam.Map(_save, out)
        )
    elapsed = time.perf_counter() - t
    with open(out, "rb") as f:
        return elapsed, pickle.load(f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100,000 hashes, subset 5,000")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--subset", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=4, help="max Hamming distance (default 4)")
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--no-beam", action="store_true", help="skip the Beam pipelines")
    ap.add_argument(
        "--label-rounds",
        type=int,
        default=4,
        help="rounds of label propagation in the Beam run (default 4, as dedup.label_rounds); "
        "the one-worker union-find (label_rounds -1) is also run, for comparison",
    )
    args = ap.parse_args()
    n, sub = (100_000, 5_000) if args.quick else (args.n, args.subset)
    h = make_hashes(n)
    keys = [f"{i:08d}" for i in range(n)]
    areas = [(96 + i % 3) * 96 for i in range(n)]

    # 1. subset: banded pairs vs all pairs
    hs = h[:sub]
    t = time.perf_counter()
    brute = lsh.all_pairs_within(hs, args.k)
    t_brute = time.perf_counter() - t
    t = time.perf_counter()
    banded = lsh.near_duplicate_pairs(hs, args.k)
    t_banded_sub = time.perf_counter() - t
    if banded != brute:
        print(f"MISMATCH on the subset: {len(banded)} vs {len(brute)} pairs", file=sys.stderr)
        return 1

    # 2. all hashes in process
    t = time.perf_counter()
    survivors = groups.find_groups(h, keys, areas, args.k, partitions=args.partitions)
    t_local = time.perf_counter() - t
    n_groups = len(set(survivors.values()))

    # 3. all hashes through Beam: label propagation, then the one-worker union-find
    beam_times = {}
    if not args.no_beam:
        for rounds in (args.label_rounds, None):
            with tempfile.TemporaryDirectory() as tmp:
                t_beam, beam_groups = run_beam(h, args.k, args.partitions, rounds, tmp)
            if beam_groups != survivors:
                print(f"MISMATCH: Beam ({rounds=}) and in-process groups differ", file=sys.stderr)
                return 1
            beam_times[rounds] = t_beam

    extrapolated = t_brute * (n / sub) ** 2
    print(
        f"Near-duplicate grouping, k={args.k}, {n:,} synthetic pHashes "
        f"({len(survivors):,} in {n_groups:,} groups), {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}\n"
    )
    print("| method | hashes | time | vs all-pairs | result |")
    print("|---|---|---|---|---|")
    print(f"| all pairs (baseline) | {sub:,} | {t_brute:.2f} s | 1x | {len(brute):,} pairs |")
    print(
        f"| LSH banding, in process | {sub:,} | {t_banded_sub:.2f} s | "
        f"{t_brute / t_banded_sub:.0f}x | same {len(banded):,} pairs |"
    )
    print(f"| all pairs (extrapolated, quadratic) | {n:,} | {extrapolated:,.0f} s | 1x | - |")
    print(
        f"| LSH banding + union-find, in process | {n:,} | {t_local:.1f} s | "
        f"{extrapolated / t_local:,.0f}x | {n_groups:,} groups |"
    )
    for rounds, t_beam in beam_times.items():
        how = f"{rounds} label rounds" if rounds is not None else "one-worker union-find"
        print(
            f"| `FindNearDuplicates` (Beam, FnApiRunner, {how}) | {n:,} | {t_beam:.1f} s | "
            f"{extrapolated / t_beam:,.0f}x | same groups |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
