"""Memory of near-duplicate grouping's final union-find merge, per image that has a duplicate.

    python benchmarks/bench_union_find_memory.py             # 1,000,000 entries
    python benchmarks/bench_union_find_memory.py --n 200000

``FindNearDuplicates`` merges star edges into one union-find accumulator (``CombineGlobally``)
for the groups that label propagation did not finish, or for all of them with
``dedup.label_rounds: -1``: the worker running the final merge holds one entry per image in
those groups. This builds such an accumulator from star edges of groups of 2-4 images with
real sample keys (``urls.url_uid``: 32 hex characters), pickles it (what crosses the shuffle),
unpickles it under ``tracemalloc`` (the final worker's copy: its own key strings and rank
tuples), then runs ``extract_output`` and the ``sorted(items)`` of the next step on top.
Prints bytes per entry. Also measures label propagation's largest key (``groups.LabelComponents``):
one image whose group has ``--n`` members, its state built from the unpickled edge ends.
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import pickle
import sys
import tracemalloc

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wit_pipeline import urls  # noqa: E402
from wit_pipeline.stages.dedup import groups  # noqa: E402


def star_edges(n: int, seed: int = 0) -> list[tuple[str, tuple, str, tuple]]:
    """Edges ``(member, rank, best, best rank)`` for ``n`` images in groups of 2-4."""
    rng = np.random.default_rng(seed)
    keys = [urls.url_uid(f"http://img.test/{i}.jpg") for i in range(n)]
    neg_area = (-rng.integers(1_000, 1_000_000, n)).tolist()
    edges = []
    start = 0
    while start < n:
        members = range(start, min(n, start + int(rng.integers(2, 5))))
        best = min(members, key=lambda j: (neg_area[j], keys[j]))
        for j in members:
            if j != best:
                edges.append(
                    (keys[j], (neg_area[j], keys[j]), keys[best], (neg_area[best], keys[best]))
                )
        start = members.stop
    return edges


def hub_state_bytes(n: int) -> tuple[float, float]:
    """Label propagation's largest key: one image with ``n`` neighbours (one big group).

    Returns bytes per neighbour for its state (``groups._adjacency``'s output) and at the peak
    while building it from the grouped, unpickled edge ends.
    """
    hub = urls.url_uid("http://img.test/placeholder.jpg")
    ends = [
        ((-900, hub), k, (-100, k))
        for k in (urls.url_uid(f"http://img.test/{i}.jpg") for i in range(n))
    ]
    blob = pickle.dumps(ends, protocol=pickle.HIGHEST_PROTOCOL)
    del ends
    gc.collect()
    tracemalloc.start()
    values = pickle.loads(blob)
    state = groups._adjacency((hub, values))
    del values
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(state[1][2]) == n
    return held / n, peak / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000, help="images that have a near duplicate")
    args = ap.parse_args()
    held, peak = hub_state_bytes(args.n)
    print(f"label propagation, one group of {args.n:,}: its key's state {held:.0f} B/neighbour,")
    print(f"  peak while building it {peak:.0f} B/neighbour")
    uf = groups.UnionFind()
    for edge in star_edges(args.n):
        uf.union(*edge)
    blob = pickle.dumps(uf, protocol=pickle.HIGHEST_PROTOCOL)
    entries = len(uf.parent)
    del uf
    gc.collect()
    tracemalloc.start()
    acc = pickle.loads(blob)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    items = sorted(acc.survivors().items())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(items) == entries
    print(f"entries: {entries:,}")
    print(f"pickled accumulator: {len(blob) / entries:.0f} B/entry")
    print(f"accumulator in memory: {held / entries:.0f} B/entry")
    print(f"peak, accumulator + extract_output + sorted items: {peak / entries:.0f} B/entry")


if __name__ == "__main__":
    main()
