"""Zero-shot classification and image-text retrieval: is the model (and so the data) any good?

- Zero-shot (CLIP paper, section 3.1.2): each class name is put into prompt templates ("a photo of
  a {}."), the text embeddings of a class are averaged into one classifier row, and an image is
  assigned the class with the highest cosine similarity. Labelled sets are a Parquet file with
  image bytes and a label (``cifar10/test.parquet``) or a folder of class folders. Templates:
  the 80 CLIP ImageNet templates (``open_clip.zero_shot_metadata``), the CLIP repository's
  per-dataset templates shipped in ``wit_pipeline/data/zeroshot_templates.json``, or a file.
- Retrieval: image-caption sets in COCO, Karpathy, CSV/TSV/Parquet/JSONL form
  (``retrieval_sets``); text-to-image R@k is the fraction of captions whose image ranks in the
  top k of all images, image-to-text R@k the fraction of images with at least one of their
  captions in the top k of all captions (CLIP's and open_clip/clip_benchmark's definition).

Everything runs offline; metrics are plain dicts, ready for JSON.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from wit_pipeline import fileio
from wit_pipeline.errors import WitError
from wit_pipeline.models import autocast
from wit_pipeline.train import retrieval_sets
from wit_pipeline.train.config import TrainConfig

TEMPLATES_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "zeroshot_templates.json"
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
RECALL_KS = (1, 5, 10)


# ---------------------------------------------------------------------------------------------
# Pure metrics over embeddings


def _topk_indices(scores: Any, k: int) -> Any:
    import torch

    return torch.topk(scores, min(k, scores.shape[1]), dim=1).indices


def zeroshot_metrics(
    logits: Any, labels: Sequence[int], classnames: Sequence[str], *, ks: Sequence[int] = (1, 5)
) -> dict[str, Any]:
    """Top-k accuracy, per-class top-1 accuracy and their mean, from ``[N, C]`` logits."""
    import torch

    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    n = len(labels_t)
    if n == 0:
        raise WitError("zero-shot evaluation on an empty set")
    out: dict[str, Any] = {"num_samples": n, "num_classes": len(classnames)}
    top = _topk_indices(logits, max(ks))
    for k in ks:
        hit = (top[:, :k] == labels_t[:, None]).any(dim=1)
        out[f"top{k}"] = float(hit.float().mean())
    pred = top[:, 0]
    per_class = {}
    for c, name in enumerate(classnames):
        mask = labels_t == c
        if int(mask.sum()):
            per_class[name] = float((pred[mask] == c).float().mean())
    out["per_class_top1"] = per_class
    out["mean_per_class_top1"] = float(np.mean(list(per_class.values()))) if per_class else 0.0
    return out


def retrieval_metrics(
    image_features: Any,
    text_features: Any,
    text_to_image: Sequence[int],
    *,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """``image_to_text_R@k`` and ``text_to_image_R@k`` from L2-normalized features.

    ``text_to_image[t]`` is the index of caption ``t``'s image.
    """
    import torch

    owner = torch.as_tensor(list(text_to_image), dtype=torch.long)
    sims = text_features.float() @ image_features.float().T  # [T, I]
    out: dict[str, float] = {}
    top_images = _topk_indices(sims, max(ks))
    for k in ks:
        hit = (top_images[:, :k] == owner[:, None]).any(dim=1)
        out[f"text_to_image_R@{k}"] = float(hit.float().mean())
    top_texts = _topk_indices(sims.T, max(ks))  # [I, k] caption indices
    top_owner = owner[top_texts]
    image_ids = torch.arange(sims.shape[1])[:, None]
    for k in ks:
        hit = (top_owner[:, :k] == image_ids).any(dim=1)
        out[f"image_to_text_R@{k}"] = float(hit.float().mean())
    out["num_images"] = int(sims.shape[1])
    out["num_texts"] = int(sims.shape[0])
    return dict(sorted(out.items()))


def text_to_image_ranks(
    image_features: Any, text_features: Any, text_to_image: Sequence[int]
) -> list[int]:
    """For every caption, the 0-based rank of its own image among all images (0: first)."""
    import torch

    owner = torch.as_tensor(list(text_to_image), dtype=torch.long)
    sims = text_features.float() @ image_features.float().T  # [T, I]
    own = sims.gather(1, owner[:, None])
    return [int(x) for x in (sims > own).sum(dim=1)]


def bootstrap_interval(
    hits: Any, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean hit rate, resampling captions with replacement.

    ``hits`` is ``[C]`` or ``[R, C]`` (0/1 per caption, for each of ``R`` runs evaluated on the
    same captions): each resample draws the same captions for every run and averages over runs
    and captions, so the interval is that of the runs' mean.
    """
    h = np.asarray(hits, dtype=np.float64)
    if h.ndim == 1:
        h = h[None, :]
    n = h.shape[1]
    if n == 0:
        raise WitError("bootstrap over no captions")
    rng = np.random.default_rng(seed)
    per_caption = h.mean(axis=0)
    means = np.empty(resamples)
    for i in range(resamples):
        means[i] = per_caption[rng.integers(0, n, n)].mean()
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


# ---------------------------------------------------------------------------------------------
# Encoding


def _open_rgb(item: Any) -> Any:
    from PIL import Image

    if isinstance(item, bytes | bytearray):
        img = Image.open(io.BytesIO(item))
    elif isinstance(item, str):
        img = Image.open(item)
    else:
        img = item
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode == "P" else img.convert("RGB")
    return img


def encode_images(
    model: Any,
    preprocess: Callable[[Any], Any],
    images: Sequence[Any],
    *,
    device: str,
    batch_size: int = 256,
) -> Any:
    """L2-normalized image embeddings ``[N, D]`` (float32, on CPU) of bytes, paths or PIL images."""
    import torch

    feats = []
    with torch.inference_mode(), autocast(device):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            x = torch.stack([preprocess(_open_rgb(im)) for im in chunk]).to(device)
            f = model.encode_image(x, normalize=True)
            feats.append(f.float().cpu())
    if not feats:
        return torch.zeros((0, 1))
    return torch.cat(feats)


def encode_texts(
    model: Any,
    tokenizer: Callable[..., Any],
    texts: Sequence[str],
    *,
    device: str,
    batch_size: int = 512,
) -> Any:
    """L2-normalized text embeddings ``[N, D]`` (float32, on CPU)."""
    import torch

    feats = []
    with torch.inference_mode(), autocast(device):
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(list(texts[start : start + batch_size])).to(device)
            feats.append(model.encode_text(tokens, normalize=True).float().cpu())
    if not feats:
        return torch.zeros((0, 1))
    return torch.cat(feats)


# ---------------------------------------------------------------------------------------------
# Labelled sets and templates


@dataclasses.dataclass
class LabelledSet:
    name: str
    images: list[Any]  # encoded bytes or file paths
    labels: list[int]
    classnames: list[str]


def _known_templates() -> dict[str, Any]:
    with open(TEMPLATES_FILE) as f:
        return json.load(f)


def _prompt_name(label: str) -> str:
    return label.replace("_", " ").strip()


def load_labelled_set(
    path: str,
    *,
    image_column: str = "image",
    label_column: str = "label",
    classnames: Sequence[str] | None = None,
    max_samples: int = 0,
) -> LabelledSet:
    """A Parquet file (image bytes + label) or a folder of class folders, as a labelled set.

    String labels are the class names (sorted); integer labels need ``classnames`` (a list in
    label order) unless the set is one with known names (cifar10).
    """
    name = retrieval_sets.dataset_name(path)
    if os.path.isdir(path):
        classes = sorted(
            d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and d[0] != "."
        )
        images, labels = [], []
        for c, cls in enumerate(classes):
            folder = os.path.join(path, cls)
            for f in sorted(os.listdir(folder)):
                if f.lower().endswith(IMAGE_SUFFIXES):
                    images.append(os.path.join(folder, f))
                    labels.append(c)
        if not images:
            raise WitError(f"{path}: no images in class folders")
        names = list(classnames) if classnames else [_prompt_name(c) for c in classes]
        keep = retrieval_sets.subsample(len(images), max_samples)
        return LabelledSet(name, [images[i] for i in keep], [labels[i] for i in keep], names)

    if not fileio.exists(path):
        raise WitError(f"evaluation set not found: {path}")
    import pyarrow.parquet as pq

    try:
        with fileio.open_file(path, "rb") as f:
            table = pq.read_table(f)
    except Exception as e:  # pyarrow raises several error types for bad files
        raise WitError(f"cannot read evaluation set {path}: {e}") from None
    for col in (image_column, label_column):
        if col not in table.column_names:
            raise WitError(
                f"{path}: no column {col!r} (columns: {', '.join(table.column_names)}); "
                f"set --image-column/--label-column"
            )
    keep = retrieval_sets.subsample(table.num_rows, max_samples)
    raw_images = table.column(image_column).to_pylist()
    raw_labels = table.column(label_column).to_pylist()
    images = []
    for i in keep:
        v = raw_images[i]
        if isinstance(v, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
            v = v.get("bytes")
        if not isinstance(v, bytes | bytearray):
            raise WitError(f"{path}: column {image_column!r} must hold encoded image bytes")
        images.append(bytes(v))
    all_labels = [raw_labels[i] for i in keep]
    if all(isinstance(v, str) for v in raw_labels):
        known = _known_templates().get(name, {}).get("classnames")
        distinct = sorted(set(raw_labels))
        classes = known if known and set(distinct) <= set(known) else distinct
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[v] for v in all_labels]
        names = list(classnames) if classnames else [_prompt_name(c) for c in classes]
    elif all(isinstance(v, int) for v in raw_labels):
        names = list(classnames or _known_templates().get(name, {}).get("classnames") or [])
        if not names:
            raise WitError(
                f"{path}: labels are integers; give the class names with --classnames FILE"
            )
        if max(raw_labels) >= len(names) or min(raw_labels) < 0:
            raise WitError(f"{path}: label out of range for {len(names)} class names")
        labels = [int(v) for v in all_labels]
    else:
        raise WitError(f"{path}: column {label_column!r} must hold strings or integers")
    return LabelledSet(name, images, labels, names)


def read_classnames(path: str) -> list[str]:
    """One class name per line (in label order)."""
    try:
        with fileio.open_file(path, "r") as f:
            names = [ln.strip() for ln in f if ln.strip()]
    except FileNotFoundError:
        raise WitError(f"class names file not found: {path}") from None
    if not names:
        raise WitError(f"{path}: no class names")
    return names


def resolve_templates(spec: str, dataset_name: str = "") -> list[str]:
    """Prompt templates as format strings with ``{}`` for the class name.

    ``auto``: the dataset's own templates when known (cifar10, cifar100), else ``imagenet``;
    ``imagenet``: the 80 CLIP ImageNet templates; ``simple``: "a photo of a {}."; a known dataset
    name; or a file with one template per line (``{}`` or ``{c}`` marks the class name).
    """
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    known = _known_templates()
    spec = spec or "auto"
    if spec == "auto":
        spec = dataset_name if dataset_name in known and dataset_name[0] != "_" else "imagenet"
    if spec == "imagenet":
        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    if spec in known and spec[0] != "_":
        return list(known[spec]["templates"])
    if fileio.exists(spec):
        with fileio.open_file(spec, "r") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        templates = [ln.replace("{c}", "{}") for ln in lines]
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise WitError(
                f"{spec}: every template needs exactly one {{}} or {{c}} (got {bad[:1]})"
            )
        return templates
    choices = ", ".join(["auto", "imagenet", *sorted(k for k in known if k[0] != "_")])
    raise WitError(f"unknown templates {spec!r}: use {choices}, or a file")


# ---------------------------------------------------------------------------------------------
# Runs


def run_zeroshot(
    model: Any,
    preprocess: Callable[[Any], Any],
    tokenizer: Callable[..., Any],
    dataset: LabelledSet,
    *,
    templates: Sequence[str],
    device: str,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``dataset`` with a template ensemble."""
    from open_clip import build_zero_shot_classifier

    was_training = model.training
    model.eval()
    try:
        with autocast(device):
            classifier = build_zero_shot_classifier(
                model,
                tokenizer=tokenizer,
                classnames=dataset.classnames,
                templates=list(templates),
                num_classes_per_batch=max(1, 2048 // max(1, len(templates))),
                device=device,
            )
        feats = encode_images(
            model, preprocess, dataset.images, device=device, batch_size=batch_size
        )
        logits = feats @ classifier.float().cpu()
    finally:
        model.train(was_training)
    out = zeroshot_metrics(logits, dataset.labels, dataset.classnames)
    out["dataset"] = dataset.name
    out["num_templates"] = len(templates)
    return out


def run_retrieval(
    model: Any,
    preprocess: Callable[[Any], Any],
    tokenizer: Callable[..., Any],
    dataset: retrieval_sets.RetrievalSet,
    *,
    device: str,
    batch_size: int = 256,
    bootstrap: int = 0,
    ranks: bool = False,
) -> dict[str, Any]:
    """Recall@1/5/10 in both directions on a caption set (``retrieval_sets.load_retrieval_set``).

    ``bootstrap`` > 0 adds ``text_to_image_R@k_ci95`` (a 95% percentile interval from that many
    resamples of the captions); ``ranks`` adds ``text_to_image_ranks`` (every caption's image
    rank, for intervals over several runs).
    """
    texts, owner = dataset.texts_and_owners()
    was_training = model.training
    model.eval()
    try:
        img = encode_images(model, preprocess, dataset.images, device=device, batch_size=batch_size)
        txt = encode_texts(model, tokenizer, texts, device=device, batch_size=max(batch_size, 512))
    finally:
        model.train(was_training)
    out: dict[str, Any] = dict(retrieval_metrics(img, txt, owner))
    if bootstrap or ranks:
        rank = np.asarray(text_to_image_ranks(img, txt, owner))
        for k in RECALL_KS if bootstrap else ():
            lo, hi = bootstrap_interval(rank < k, resamples=bootstrap)
            out[f"text_to_image_R@{k}_ci95"] = [lo, hi]
        if ranks:
            out["text_to_image_ranks"] = rank.tolist()
    out.update(
        dataset=dataset.name, format=dataset.format, split=dataset.split, skipped=dataset.skipped
    )
    return out


def eval_transform(model: Any) -> Callable[[Any], Any]:
    """The open_clip inference transform (resize, center crop, CLIP normalization) of ``model``."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)


# ---------------------------------------------------------------------------------------------
# During training


class EpochEvaluator:
    """The trainer's ``--eval-*`` sets, loaded once and run on the current model after epochs."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.sets: list[tuple[str, Any, list[str]]] = []
        for spec in cfg.eval_zeroshot:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = "", spec
            ds = load_labelled_set(path, max_samples=cfg.eval_max_samples)
            name = name or ds.name
            templates = resolve_templates(cfg.eval_zeroshot_templates, ds.name)
            self.sets.append((name, ds, templates))
        self.retrieval: retrieval_sets.RetrievalSet | None = None
        if cfg.eval_retrieval_captions:  # a bad file fails now, not after the first epoch
            self.retrieval = retrieval_sets.load_retrieval_set(
                cfg.eval_retrieval_captions,
                images=cfg.eval_retrieval_images,
                options=retrieval_sets.CaptionOptions.from_values(
                    dataclasses.asdict(cfg), "eval_retrieval_"
                ),
                max_images=cfg.eval_max_samples,
                option=lambda field: "--eval-retrieval-" + field.replace("_", "-"),
            )
        self.pairs = None
        if cfg.eval_pairs:  # read once: held-out sets for a filter are small
            from wit_pipeline.train import data, separation

            self.pairs = separation.PairSet.from_shards(
                data.expand_shard_patterns([cfg.eval_pairs]), max_samples=cfg.eval_max_samples
            )
            if len(self.pairs.keys) < 2:
                raise WitError(f"--eval-pairs {cfg.eval_pairs}: fewer than two captioned samples")

    @property
    def enabled(self) -> bool:
        return bool(self.sets or self.retrieval or self.pairs)

    def __call__(self, model: Any, tokenizer: Any, device: str) -> dict[str, Any]:
        """Metrics of ``model`` (not DDP-wrapped) on every set, keyed ``NAME/top1`` etc."""
        preprocess = eval_transform(model)
        out: dict[str, Any] = {}
        for name, ds, templates in self.sets:
            res = run_zeroshot(
                model,
                preprocess,
                tokenizer,
                ds,
                templates=templates,
                device=device,
                batch_size=self.cfg.eval_batch_size,
            )
            for k in ("top1", "top5", "mean_per_class_top1"):
                out[f"{name}/{k}"] = res[k]
        if self.retrieval is not None:
            res = run_retrieval(
                model,
                preprocess,
                tokenizer,
                self.retrieval,
                device=device,
                batch_size=self.cfg.eval_batch_size,
            )
            for k, v in res.items():
                if "R@" in k:
                    out[f"retrieval/{k}"] = v
        if self.pairs is not None:
            from wit_pipeline.train import separation

            res = separation.run_separation(
                model,
                preprocess,
                tokenizer,
                self.pairs,
                device=device,
                batch_size=self.cfg.eval_batch_size,
            )
            out["pairs/auc"] = res["auc"]
            out["pairs/recall@p95"] = res["recall@p95"]
        return out
