"""The dedup stage: decontaminate, find near-duplicate groups, collapse each into its survivor.

Every downloaded image gets a pHash (:mod:`~wit_pipeline.stages.dedup.phash`, bit-identical to
``imagehash.phash``; :class:`wit_pipeline.samples.ReadDownloadShards` hashes them while reading
the download shards). :class:`DedupRecords`, the stage's transform, then

1. drops images within ``dedup.eval_max_distance`` bits of an evaluation image
   (``eval_contamination``, :mod:`~wit_pipeline.stages.dedup.decontaminate`);
2. finds the groups of images within ``dedup.max_distance`` bits of each other (LSH banding,
   :mod:`~wit_pipeline.stages.dedup.lsh`; groups and survivors,
   :mod:`~wit_pipeline.stages.dedup.groups`);
3. collapses each group into its survivor (:class:`CollapseDuplicates`).

Survivor rule (deterministic, runner-independent): the image with the most original pixels
(``original_width * original_height``), ties broken by the smallest ``key``. The survivor keeps
the pairs (captions) of every member; the others are dropped with reason ``near_duplicate`` and
``duplicate_of`` pointing at the survivor (their pairs stay in the dataset, as the survivor's).
Several records of one key (one URL read from overlapping input directories) become one record
holding every copy's pairs; the other copies are dropped with reason ``duplicate_input``. With
``dedup.collapse = false`` every image is kept and only marked with its group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam

from wit_pipeline import beam_utils, counters, stage
from wit_pipeline.config import DedupConfig
from wit_pipeline.stages.dedup import STAGE
from wit_pipeline.stages.dedup.decontaminate import (
    HITS,
    BuildEvalIndex,
    Decontaminate,
    WriteContamination,
    parse_eval_set,
)
from wit_pipeline.stages.dedup.groups import FindNearDuplicates, survivor_rank
from wit_pipeline.stages.dedup.phash import from_hex, hamming

NEAR_DUPLICATE = "near_duplicate"
ALONE = "alone"  # collapse_key's output of samples in no near-duplicate group
DUPLICATE_INPUT = "duplicate_input"  # a second copy of one sample key (overlapping inputs)


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
                "sha256": d.get("sha256"),
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
    to it. A copy whose bytes or pHash differ from the kept one's is listed in ``duplicates``
    (``KEY.json``), so that a takedown of its hash finds the sample. Returns ``(kept, other
    copies, pairs of the other copies that were already there)``.
    """
    ordered = sorted(records, key=_input_copy_rank)
    kept = dict(ordered[0])
    other_bytes = [
        {
            "key": r["key"],
            "url": r["url"],
            "phash": r["phash"],
            "distance": hamming(from_hex(kept["phash"]), from_hex(r["phash"])),
            "sha256": r.get("sha256"),
        }
        for r in ordered[1:]
        if (r.get("sha256"), r["phash"]) != (kept.get("sha256"), kept["phash"])
    ]
    if other_bytes:
        kept["duplicates"] = list(kept.get("duplicates") or []) + other_bytes

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


def collapse_key(item: tuple[str, Mapping[str, Sequence[Any]]]) -> stage.Result:
    """The records of one key and its survivor -> ``(survivor key, (is survivor, record))``.

    Several records of one key (overlapping inputs) become one (``merge_input_copies``); the
    other copies are dropped with ``duplicate_input`` (their pairs that the kept copy already
    holds are counted as dropped pairs; the others move to it). A key in no near-duplicate
    group (no survivor) is its sample already: it goes to the ``ALONE`` output, so that only
    group members are shuffled again to meet their survivor.
    """
    key, grouped = item
    records = list(grouped["records"])
    survivors = list(grouped["survivor"])
    if not records:
        return stage.Result([])
    record, rejected, counts = records[0], [], {}
    if len(records) > 1:
        record, others, repeated = merge_input_copies(records)
        counts = {counters.scoped(stage.PAIR, counters.dropped(DUPLICATE_INPUT)): repeated}
        for r in others:
            rejected.append(
                {
                    **r,
                    "reason": DUPLICATE_INPUT,
                    "detail": f"same key read again from {r['source_tar']}; "
                    f"kept the copy from {record['source_tar']}",
                    "duplicate_of": key,
                    "distance": hamming(from_hex(record["phash"]), from_hex(r["phash"])),
                }
            )
    if not survivors:  # in no near-duplicate group: final as it is, past the second shuffle
        return stage.Result([], rejected, counts, outputs={ALONE: [record]})
    survivor = survivors[0]
    return stage.Result([(survivor, (survivor == key, record))], rejected, counts)


def merge_survivor(
    item: tuple[str, Sequence[tuple[bool, Mapping[str, Any]]]], *, collapse: bool
) -> stage.Result:
    """A survivor and its group's members -> the merged sample (``near_duplicate`` drops).

    Without ``collapse`` every member is kept, marked with ``duplicate_of`` and
    ``duplicate_group`` so that users can dedup later.
    """
    survivor_key, members = item
    members = list(members)
    survivor = next(r for is_s, r in members if is_s)
    dups = sorted((r for is_s, r in members if not is_s), key=lambda r: r["key"])
    if not dups:
        return stage.Result([survivor])
    if not collapse:
        kept = [{**survivor, "duplicate_of": None, "duplicate_group": survivor_key}]
        kept += [{**d, "duplicate_of": survivor_key, "duplicate_group": survivor_key} for d in dups]
        return stage.Result(kept)
    merged = merge_group(survivor, dups)
    distance = {d["key"]: d["distance"] for d in merged["duplicates"]}
    rejected = [
        {
            **d,
            "reason": NEAR_DUPLICATE,
            "detail": f"merged into {survivor_key}",
            "duplicate_of": survivor_key,
            "distance": distance[d["key"]],
        }
        for d in dups
    ]
    return stage.Result([merged], rejected)


class _CollapseFn(stage.StageFn):
    # Drops only; a dropped member's pairs move to the survivor: pair drops are the core's.
    def __init__(self):
        super().__init__(stage=STAGE, flow=False, outputs=(ALONE,))

    def core(self, item, *args):
        return collapse_key(item)


class _MergeFn(stage.StageFn):
    def __init__(self, collapse: bool):
        super().__init__(stage=STAGE, flow=False)
        self._collapse = collapse

    def core(self, item, *args):
        return merge_survivor(item, collapse=self._collapse)


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
        grouped = {"records": keyed, "survivor": inputs["survivor"]} | "JoinSurvivor" >> (
            beam.CoGroupByKey()
        )
        joined = stage.apply(grouped, "ToSurvivor", _CollapseFn())
        members = joined["kept"] | "GroupBySurvivor" >> beam.GroupByKey()
        merged = stage.apply(members, "Merge", _MergeFn(self._collapse))
        samples = (merged["kept"], joined[ALONE]) | "AllSamples" >> beam.Flatten()
        return {
            "samples": samples,
            beam_utils.REJECTED: (joined[beam_utils.REJECTED], merged[beam_utils.REJECTED])
            | "AllRejected" >> beam.Flatten(),
            beam_utils.COUNTS: (joined[beam_utils.COUNTS], merged[beam_utils.COUNTS])
            | "AllCounts" >> beam.Flatten(),
        }


class DedupRecords(beam.PTransform):
    """Records (with pHash) -> decontaminated, near-duplicate-collapsed records.

    With ``dedup.eval_sets``, the eval index is built from them and ``contamination.json``
    written to ``contamination_path`` (when given). Returns a dict: ``samples``, ``rejected``,
    ``counts`` and ``hits`` (eval matches: eval set, eval id, sample key, distance).
    """

    def __init__(self, *, config: DedupConfig, contamination_path: str = ""):
        super().__init__()
        self._config = config
        self._eval_sets = [parse_eval_set(s) for s in config.eval_sets]
        self._contamination_path = contamination_path

    def expand(self, records):
        c = self._config
        p = records.pipeline
        rejected, counts, hits = [], [], []
        if self._eval_sets:
            index = p | "EvalIndex" >> BuildEvalIndex(
                eval_sets=self._eval_sets,
                max_distance=c.eval_max_distance,
                phash_decode=c.phash_decode,
            )
            clean = records | "Decontaminate" >> Decontaminate(
                index=index, batch_size=min(c.batch_size, 1024)
            )
            records = clean["kept"]
            rejected.append(clean[beam_utils.REJECTED])
            counts.append(clean[beam_utils.COUNTS])
            hits.append(clean[HITS])
            if self._contamination_path:
                _ = clean[HITS] | "Contamination" >> WriteContamination(
                    self._contamination_path,
                    index=index,
                    eval_sets=self._eval_sets,
                    max_distance=c.eval_max_distance,
                )
        survivor = records | "FindNearDuplicates" >> FindNearDuplicates(
            max_distance=c.max_distance,
            partitions=c.partitions,
            batch_size=c.batch_size,
            label_rounds=None if c.label_rounds == -1 else c.label_rounds,
        )
        merged = {"records": records, "survivor": survivor} | "Collapse" >> (
            CollapseDuplicates(collapse=c.collapse)
        )
        rejected.append(merged[beam_utils.REJECTED])
        counts.append(merged[beam_utils.COUNTS])

        def flat(pcolls, label):
            if not pcolls:
                return p | f"No{label}" >> beam.Create([])
            return pcolls | f"Flatten{label}" >> beam.Flatten()

        return {
            "samples": merged["samples"],
            beam_utils.REJECTED: flat(rejected, "Rejected"),
            beam_utils.COUNTS: flat(counts, "Counts"),
            HITS: flat(hits, "Hits"),
        }
