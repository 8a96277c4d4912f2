"""How well a CLIP model separates true image-caption pairs from mismatched ones.

A filter network (``wit seed``, ``docs/score.md``) is judged by one thing: do the captions that
belong to an image score higher than captions of other images? On a held-out set of true pairs
(every caption with its own image) each caption is also paired with the image of another
sample, chosen by a hash of the two keys (:func:`partner_indices`: the same on every machine,
never the caption's own image), which makes a 50/50 mix of true and shuffled pairs. Two numbers
summarize the scores:

- ``auc``: the ROC AUC of true against shuffled pairs (the probability that a random true pair
  outscores a random shuffled one; ties count half): 0.5 is chance, 1.0 perfect;
- ``recall@p95``: the share of true pairs kept by the lowest threshold whose kept set is at
  least 95% true pairs on that 50/50 mix (0 when no threshold reaches it).

The metrics are pure functions of two score arrays (:func:`roc_auc`,
:func:`recall_at_precision`), so a benchmark can apply them to any labelled pairs (a pool's
truth). :class:`PairSet` reads images and their captions from shards; :func:`pair_scores` scores
every (image, caption) of one with a model, :func:`run_separation` measures its separation
(``--eval-pairs`` of the trainer, ``wit seed``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from wit_pipeline import shards
from wit_pipeline.errors import WitError

TARGET_PRECISION = 0.95


# ---------------------------------------------------------------------------------------------
# Pure metrics


def roc_auc(
    positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray
) -> float:
    """ROC AUC of ``positive`` against ``negative`` scores (Mann-Whitney U, ties count half)."""
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    if not len(pos) or not len(neg):
        raise WitError("the AUC needs at least one positive and one negative score")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks (1-based) over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def recall_at_precision(
    positive: Sequence[float] | np.ndarray,
    negative: Sequence[float] | np.ndarray,
    precision: float = TARGET_PRECISION,
) -> dict[str, float | None]:
    """The largest recall of ``positive`` at a threshold whose kept set has at least
    ``precision`` positives, over the mix as given (``positive`` and ``negative`` as counted).

    Pairs at or above the threshold are kept; every distinct score is tried as a threshold.
    Returns ``recall``, ``threshold`` (None when no threshold reaches the precision) and the
    ``precision`` actually reached there.
    """
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    if not len(pos):
        raise WitError("recall needs at least one positive score")
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    kept = np.arange(1, len(s) + 1)
    # a threshold keeps every pair scoring at least it: only the last index of a run of ties
    last = np.concatenate([s[1:] != s[:-1], [True]])
    prec = tp / kept
    ok = last & (prec >= precision)
    if not ok.any():
        return {"recall": 0.0, "threshold": None, "precision": None}
    i = int(np.flatnonzero(ok)[np.argmax(tp[ok])])
    return {
        "recall": float(tp[i] / len(pos)),
        "threshold": float(s[i]),
        "precision": float(prec[i]),
    }


def separation_metrics(
    true_scores: Sequence[float] | np.ndarray,
    shuffled_scores: Sequence[float] | np.ndarray,
    *,
    precision: float = TARGET_PRECISION,
) -> dict[str, Any]:
    """``auc``, ``recall@p95`` (for ``precision`` 0.95) and the score means of both kinds."""
    t = np.asarray(true_scores, dtype=np.float64)
    f = np.asarray(shuffled_scores, dtype=np.float64)
    at = recall_at_precision(t, f, precision)
    name = f"recall@p{round(precision * 100)}"
    return {
        "auc": roc_auc(t, f),
        name: at["recall"],
        f"{name}_threshold": at["threshold"],
        "true_mean": float(t.mean()),
        "shuffled_mean": float(f.mean()),
        "num_true": len(t),
        "num_shuffled": len(f),
    }


def _hash64(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256(":".join(parts).encode()).digest()[:8], "big")


def partner_indices(keys: Sequence[str], salt: str = "shuffled") -> list[int]:
    """For each sample ``i``, the index of another sample whose image its captions meet.

    Sample ``i`` is paired with sample ``(i + 1 + h) mod n`` where ``h`` is a hash of its key and
    ``salt`` modulo ``n - 1``: never itself, the same for a given set on every machine.
    Needs at least two samples.
    """
    n = len(keys)
    if n < 2:
        raise WitError("shuffled pairs need at least two samples")
    return [(i + 1 + _hash64(salt, k) % (n - 1)) % n for i, k in enumerate(keys)]


# ---------------------------------------------------------------------------------------------
# Sets of images with their captions


@dataclasses.dataclass
class PairSet:
    """Images and their captions, in key order: every (image, caption) is one pair."""

    keys: list[str]
    images: list[bytes]
    captions: list[list[str]]

    @property
    def num_pairs(self) -> int:
        return sum(len(c) for c in self.captions)

    def owners(self) -> np.ndarray:
        """The sample index of every pair, in pair order (captions of sample 0 first)."""
        return np.repeat(np.arange(len(self.keys)), [len(c) for c in self.captions])

    @classmethod
    def from_shards(cls, paths: Sequence[str], *, max_samples: int = 0) -> PairSet:
        """Samples with an image and a caption from shard tars (the trainer's reading rules:
        ``captions`` of ``KEY.json``, else ``KEY.txt``), in key order; ``max_samples`` keeps
        that many, evenly spaced (0: all)."""
        from wit_pipeline.train import data

        found: dict[str, tuple[bytes, list[str]]] = {}
        for path in paths:
            for sample in shards.iter_samples(path):
                image, caps = data.sample_image_bytes(sample), data.sample_captions(sample)
                if image is not None and caps:
                    found[sample["__key__"]] = (image, caps)
        keys = sorted(found)
        if max_samples and max_samples < len(keys):
            keys = [keys[int(i)] for i in np.linspace(0, len(keys) - 1, max_samples)]
        return cls(keys, [found[k][0] for k in keys], [found[k][1] for k in keys])


def encode_pairs(
    model: Any,
    preprocess: Callable[[Any], Any],
    tokenizer: Callable[..., Any],
    pairs: PairSet,
    *,
    device: str,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalized embeddings of every image ``[N, D]`` and every caption ``[T, D]`` (pair
    order) of ``pairs``, with the model in eval mode."""
    from wit_pipeline.train.evaluate import encode_images, encode_texts

    texts = [c for caps in pairs.captions for c in caps]
    was_training = model.training
    model.eval()
    try:
        img = encode_images(model, preprocess, pairs.images, device=device, batch_size=batch_size)
        txt = encode_texts(model, tokenizer, texts, device=device, batch_size=max(batch_size, 512))
    finally:
        model.train(was_training)
    return img.numpy(), txt.numpy()


def pair_scores(
    model: Any,
    preprocess: Callable[[Any], Any],
    tokenizer: Callable[..., Any],
    pairs: PairSet,
    *,
    device: str,
    batch_size: int = 256,
) -> np.ndarray:
    """The cosine similarity of every (image, caption) pair of ``pairs``, in pair order."""
    img, txt = encode_pairs(
        model, preprocess, tokenizer, pairs, device=device, batch_size=batch_size
    )
    return (img[pairs.owners()] * txt).sum(axis=1)


def run_separation(
    model: Any,
    preprocess: Callable[[Any], Any],
    tokenizer: Callable[..., Any],
    pairs: PairSet,
    *,
    device: str,
    batch_size: int = 256,
) -> dict[str, Any]:
    """:func:`separation_metrics` of ``model`` on ``pairs``: every caption with its own image
    (true) and with the image of :func:`partner_indices` (shuffled)."""
    if len(pairs.keys) < 2:
        raise WitError(f"held-out pairs need at least two samples, found {len(pairs.keys)}")
    img, txt = encode_pairs(
        model, preprocess, tokenizer, pairs, device=device, batch_size=batch_size
    )
    own = pairs.owners()
    partner = np.asarray(partner_indices(pairs.keys))
    true_scores = (img[own] * txt).sum(axis=1)
    shuffled_scores = (img[partner[own]] * txt).sum(axis=1)
    return separation_metrics(true_scores, shuffled_scores)
