"""A seed model with known embeddings, for exact tests of the score stage.

``FakeClipHandler`` is the real ``OpenClipModelHandler`` with its embedding step replaced: an
image's embedding is a unit vector drawn from a hash of its image id (``image_key`` or ``key``),
and a caption's is a unit vector drawn from a hash of its text, except for captions listed in
``matches``: ``{caption: (image_id, cos)}``, whose embedding is ``cos * u(image) + sqrt(1 -
cos^2) * w`` (``w`` orthogonal to ``u(image)``), so that the pair scores exactly ``cos`` with its
image and like a random caption with every other. Images that do not decode have no embedding,
as with the real model. :func:`fake_score` gives any pair's score without Beam.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wit_pipeline.config import ScoreConfig
from wit_pipeline.stages.score import calibrate, model

DIM = 32


def _unit(text: str, dim: int = DIM) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float64)


def image_vector(image_id: str) -> np.ndarray:
    return _unit(f"image:{image_id}").astype(np.float32)


def text_vector(caption: str, matches: Mapping[str, tuple[str, float]]) -> np.ndarray:
    w = _unit(f"text:{caption}")
    if caption not in matches:
        return w.astype(np.float32)
    iid, cos = matches[caption]
    u = image_vector(iid).astype(np.float64)
    w = w - np.dot(w, u) * u
    w /= np.linalg.norm(w)
    return (cos * u + np.sqrt(1.0 - cos * cos) * w).astype(np.float32)


def fake_score(image_id: str, caption: str, matches: Mapping[str, tuple[str, float]]) -> float:
    """The score the fake model gives the pair (the value the pipeline must write)."""
    return model.pair_score(image_vector(image_id), text_vector(caption, matches))


class FakeClipHandler(model.OpenClipModelHandler):
    def __init__(self, matches: Mapping[str, tuple[str, float]] | None = None, batch_size: int = 8):
        super().__init__(config=ScoreConfig(model="fake", pretrained="fake", batch_size=batch_size))
        self._matches = dict(matches or {})

    def load_model(self) -> Any:
        return None

    def embed(self, batch: Sequence[dict], loaded: Any) -> list[model.SampleEmbedding]:
        out = []
        for r in batch:
            if model._decode(r.get("image")) is None:
                out.append(model.SampleEmbedding(None, np.zeros((0, 0), np.float32)))
                continue
            caps = model.record_captions(r)
            texts = np.stack([text_vector(c, self._matches) for c in caps])
            out.append(model.SampleEmbedding(image_vector(calibrate.image_id(r)), texts))
        return out
