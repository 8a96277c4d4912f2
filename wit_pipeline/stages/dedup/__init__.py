"""The dedup stage: near duplicates and eval-set contamination, over perceptual hashes.

- ``phash``: batched pHash, bit-identical to ``imagehash.phash``;
- ``lsh``: banding over 64-bit hashes, every pair within ``k`` bits without all pairs;
- ``groups``: the survivor rule, union-find and label propagation (``FindNearDuplicates``);
- ``decontaminate``: eval sets, their index and ``Decontaminate``;
- ``core``: the stage's transform (``DedupRecords``): decontaminate, group, collapse.
"""

STAGE = "dedup"  # the stage name in rejected rows
