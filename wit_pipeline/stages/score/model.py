"""The seed model: embeddings of images and captions, and the pair scores they give.

Each sample's image is embedded once and each of its captions once (identical caption texts of a
batch once); a pair's ``clip_score`` is the cosine similarity of the two normalized embeddings,
computed in float64 from the float32 embeddings and rounded to float32 (:func:`pair_score`), the
value every later step compares, stores and histograms. The null distribution of the auto
threshold (``calibrate.py``) is scored by the same function.

- :func:`embed_samples`: images and each image's captions -> :class:`SampleEmbedding`;
- :func:`score_pairs`: one caption per image -> scores (``None`` where the image does not decode);
- :class:`OpenClipModelHandler`: a Beam ``ModelHandler`` for ``RunInference`` (batched, model
  loaded once per worker, GPU when present): a record with an image and its captions (``pairs``,
  or one ``caption``) -> its pair scores, and the embeddings of its null candidate when the record
  is marked as one (``NULL_MARK``);
- :class:`ScoreWithClip`: records in, the same records with ``clip_score`` out (per pair when the
  records carry ``pairs``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from wit_pipeline import fileio
from wit_pipeline.config import ScoreConfig
from wit_pipeline.errors import WitError

SCORE_FIELD = "clip_score"
NULL_MARK = "_null"  # set on a record selected for the null (calibrate.MarkNullSamples)
NULL_FIELD = "_null_candidate"  # what the scorer adds to such a record (calibrate.NullCandidate)


@dataclasses.dataclass
class SampleEmbedding:
    """One image's embedding (``None``: it does not decode) and one row per caption."""

    image: np.ndarray | None  # (D,) float32, unit norm
    texts: np.ndarray  # (k, D) float32, unit norm; empty when the image does not decode

    def scores(self) -> list[float] | None:
        """The pair scores, in caption order; ``None`` when the image does not decode."""
        if self.image is None:
            return None
        return [pair_score(self.image, t) for t in self.texts]


def pair_score(image: np.ndarray, text: np.ndarray) -> float:
    """Cosine similarity of two unit embeddings: float64 dot product, rounded to float32."""
    return float(np.float32(np.dot(image.astype(np.float64), text.astype(np.float64))))


def _decode(data: bytes | None) -> Any:
    from PIL import Image

    if not data:
        return None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception:  # PIL raises many types for corrupt or unsupported images
        return None


def _prepare(data: bytes | None, preprocess: Any) -> Any:
    """Decoded and preprocessed image tensor, or None when the image does not decode."""
    img = _decode(data)
    return None if img is None else preprocess(img)


def embed_samples(
    loaded: Any,
    images: Sequence[bytes | None],
    captions: Sequence[Sequence[str]],
    *,
    threads: int = 0,
    text_batch: int = 256,
) -> list[SampleEmbedding]:
    """Embed each image once and each of its captions once (``loaded``: ``models.load_model``).

    Images are decoded and preprocessed on ``threads`` threads (PIL and torchvision release the
    GIL; 0: up to 8, one per core), which keeps a GPU fed; the model then runs on the batch.
    Captions of decodable images are encoded in batches of at most ``text_batch`` distinct
    texts.
    """
    import torch

    from wit_pipeline.models import autocast as _autocast

    if len(images) != len(captions):
        raise ValueError("one caption list per image")
    threads = threads or min(8, os.cpu_count() or 1)
    if threads > 1 and len(images) > 1:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            tensors = list(pool.map(lambda b: _prepare(b, loaded.preprocess), images))
    else:
        tensors = [_prepare(b, loaded.preprocess) for b in images]
    ok = [i for i, t in enumerate(tensors) if t is not None]
    texts = list(dict.fromkeys(c for i in ok for c in captions[i]))
    model = loaded.model
    img_emb: dict[int, np.ndarray] = {}
    txt_emb: dict[str, np.ndarray] = {}
    with torch.inference_mode(), _autocast(loaded.device):
        if ok:
            x = torch.stack([tensors[i] for i in ok]).to(loaded.device, non_blocking=True)
            out = model.encode_image(x, normalize=True).float().cpu().numpy()
            img_emb = dict(zip(ok, out, strict=True))
        for start in range(0, len(texts), max(1, text_batch)):
            chunk = texts[start : start + max(1, text_batch)]
            t = loaded.tokenizer(chunk).to(loaded.device)
            out = model.encode_text(t, normalize=True).float().cpu().numpy()
            txt_emb.update(zip(chunk, out, strict=True))
    return [_sample_embedding(img_emb.get(i), captions[i], txt_emb) for i in range(len(images))]


def _sample_embedding(
    image: np.ndarray | None, captions: Sequence[str], txt: Mapping[str, np.ndarray]
) -> SampleEmbedding:
    if image is None:
        return SampleEmbedding(None, np.zeros((0, 0), np.float32))
    dim = image.shape[0]
    rows = [txt[c] for c in captions]
    texts = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    return SampleEmbedding(np.asarray(image, np.float32), texts)


def score_pairs(
    loaded: Any,
    images: Sequence[bytes | None],
    captions: Sequence[str],
    *,
    threads: int = 0,
) -> list[float | None]:
    """Cosine similarity of each (image, caption) pair; ``None`` where the image does not decode."""
    if len(images) != len(captions):
        raise ValueError("one caption per image")
    embedded = embed_samples(loaded, images, [[c] for c in captions], threads=threads)
    return [None if e.image is None else e.scores()[0] for e in embedded]  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# RunInference


def record_captions(record: Mapping[str, Any], caption_field: str = "caption") -> list[str]:
    """A record's captions: one per pair when it has ``pairs``, else its one caption."""
    if "pairs" in record:
        return [str(p.get("caption") or "") for p in record["pairs"]]
    return [str(record.get(caption_field) or "")]


def first_pair_index(record: Mapping[str, Any]) -> int:
    """Index of the caption the null uses for this record: its first pair by ``uid``."""
    pairs = record.get("pairs")
    if not pairs:
        return 0
    return min(range(len(pairs)), key=lambda i: (pairs[i].get("uid") or "", i))


def inference_output(record: Mapping[str, Any], emb: SampleEmbedding) -> dict[str, Any]:
    """What the handler returns for a record: ``scores`` (None: undecodable) and, for a record
    marked for the null, ``null``: ``(uid, image embedding, caption embedding)``."""
    out: dict[str, Any] = {"scores": emb.scores(), "null": None}
    if record.get(NULL_MARK) and emb.image is not None and len(emb.texts):
        i = first_pair_index(record)
        pairs = record.get("pairs") or [{}]
        out["null"] = (str(pairs[i].get("uid") or ""), emb.image, emb.texts[i])
    return out


class OpenClipModelHandler(ModelHandler[dict, PredictionResult, Any]):
    """``RunInference`` handler: records with image bytes and captions -> their pair scores.

    A record's captions are its ``pairs``' captions, or its ``caption_field``
    (:func:`record_captions`). The model is loaded once per worker process (``RunInference``
    shares it between threads); ``score.device = auto`` uses the GPU when one is present.
    Records are batched to ``score.batch_size``. A subclass may replace :meth:`embed` (tests use
    a model with known embeddings).
    """

    def __init__(
        self, *, config: ScoreConfig, image_field: str = "image", caption_field: str = "caption"
    ):
        super().__init__(min_batch_size=config.batch_size, max_batch_size=config.batch_size)
        self._model_name = config.model
        self._pretrained = config.pretrained
        self._device = config.device
        self._image_field = image_field
        self._caption_field = caption_field

    def load_model(self) -> Any:
        from wit_pipeline import models

        return models.load_model(
            self._model_name or None, self._pretrained or None, device=self._device
        )

    def embed(self, batch: Sequence[dict], model: Any) -> list[SampleEmbedding]:
        images = [r.get(self._image_field) for r in batch]
        captions = [record_captions(r, self._caption_field) for r in batch]
        return embed_samples(model, images, captions)

    def run_inference(
        self,
        batch: Sequence[dict],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        embedded = self.embed(batch, model)
        return [
            PredictionResult(r, inference_output(r, e))
            for r, e in zip(batch, embedded, strict=True)
        ]

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(
            len(r.get(self._image_field) or b"") + sum(len(c) for c in record_captions(r))
            for r in batch
        )

    def get_metrics_namespace(self) -> str:
        return "wit_score"


def merge_scores(result: PredictionResult) -> dict[str, Any]:
    """The record with its scores: per pair (``pairs[i].clip_score``) when it has pairs, and
    ``clip_score`` (its best pair's; None when the image does not decode); a null candidate's
    embeddings under ``NULL_FIELD``."""
    record = dict(result.example)
    scores = result.inference["scores"]
    if "pairs" in record:
        record["pairs"] = [
            {**p, SCORE_FIELD: None if scores is None else scores[i]}
            for i, p in enumerate(record["pairs"])
        ]
        record[SCORE_FIELD] = max(scores) if scores else None
    else:
        record[SCORE_FIELD] = scores[0] if scores else None
    if result.inference["null"] is not None:
        record[NULL_FIELD] = result.inference["null"]
    return record


def make_handler(
    config: ScoreConfig | None, model_handler: ModelHandler | None, **fields: str
) -> ModelHandler:
    """``model_handler``, or an :class:`OpenClipModelHandler` for ``config``'s seed."""
    if model_handler is not None:
        return model_handler
    if config is None or not config.pretrained:
        raise WitError("the scorer needs a seed model: --pretrained CHECKPOINT_OR_TAG")
    if not config.model and not fileio.exists(config.pretrained):
        raise WitError(f"--model is required with the pretrained tag {config.pretrained!r}")
    return OpenClipModelHandler(config=config, **fields)


class ScoreWithClip(beam.PTransform):
    """Adds ``clip_score`` to every record (per pair for records with ``pairs``).

    Records are dicts with the encoded image under ``image_field`` and either ``pairs`` (each
    with a ``caption``) or one caption under ``caption_field``; everything else passes through
    (:func:`merge_scores`). The seed model is ``score.pretrained`` (a checkpoint path or an
    open_clip tag) with ``score.model``, or a ready ``model_handler``.
    """

    def __init__(
        self,
        *,
        config: ScoreConfig | None = None,
        image_field: str = "image",
        caption_field: str = "caption",
        model_handler: ModelHandler | None = None,
    ):
        super().__init__()
        self._handler = make_handler(
            config, model_handler, image_field=image_field, caption_field=caption_field
        )

    def expand(self, pcoll):
        return (
            pcoll
            | "RunInference" >> RunInference(self._handler)
            | "AddScore" >> beam.Map(merge_scores)
        )
