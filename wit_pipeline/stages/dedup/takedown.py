"""Takedown hash entries, applied to every downloaded image before deduplication.

``sha256`` entries match the downloaded bytes as served (the ``sha256`` img2dataset computed),
``phash`` entries the image's pHash within their distance (``takedown.Blocklist``). Each
downloaded copy is checked on its own, before near duplicates are merged, so that nothing of a
taken-down image (neither its bytes nor its captions, which would otherwise move to the
survivor of its group) reaches balancing, scoring, the shards or the report. A match is
dropped by the dedup stage with reason ``takedown`` and the entry in ``detail``; its pairs are
counted as dropped pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam

from wit_pipeline import stage
from wit_pipeline.stages.dedup import STAGE
from wit_pipeline.takedown import TAKEDOWN, Blocklist


def drop_taken_down(records: Sequence[Mapping[str, Any]], blocklist: Blocklist) -> stage.Result:
    """Records whose sha256 or pHash matches a hash entry -> rejected (``takedown``)."""
    by_phash = blocklist.match_phashes([r.get("phash") for r in records])
    kept, rejected = [], []
    for r, phash_hit in zip(records, by_phash, strict=True):
        sha = str(r.get("sha256") or "").lower()
        hit = f"sha256 {sha}" if sha and sha in blocklist.sha256 else phash_hit
        if hit is None:
            kept.append(r)
        else:
            rejected.append({**r, "reason": TAKEDOWN, "detail": hit})
    return stage.Result(kept, rejected)


class _TakedownFn(stage.StageFn):
    """Batches of records -> kept records; takedown matches rejected (drops counted only)."""

    def __init__(self, blocklist: Blocklist):
        super().__init__(stage=STAGE, flow=False, pairs=True)
        self._blocklist = blocklist

    def core(self, batch, *args):
        return drop_taken_down(batch, self._blocklist)


class DropTakenDown(beam.PTransform):
    """Records (with ``sha256`` and ``phash``) -> the stage outputs (``stage.apply``): records
    that no hash entry of ``blocklist`` matches, and the matches as ``takedown`` drops."""

    def __init__(self, *, blocklist: Blocklist, batch_size: int = 1024):
        super().__init__()
        self._blocklist = blocklist
        self._batch_size = batch_size

    def expand(self, records):
        batches = records | "Batch" >> beam.BatchElements(
            min_batch_size=1, max_batch_size=self._batch_size
        )
        return stage.apply(batches, "DropTakenDown", _TakedownFn(self._blocklist))
