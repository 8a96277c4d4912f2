"""Image-caption sets for retrieval evaluation, in the formats they are distributed in.

- **coco**: COCO's caption files (``annotations/captions_val2017.json``): ``images`` (``id``,
  ``file_name``) and ``annotations`` (``image_id``, ``caption``). No splits: the file is one.
- **karpathy**: Karpathy's split files (``dataset_coco.json``, ``dataset_flickr30k.json``,
  ``dataset_flickr8k.json``), which every CLIP paper's retrieval numbers use: ``images[]`` with
  ``filename`` (joined to ``filepath`` when present), ``split`` (train/restval/val/test) and
  ``sentences[].raw``. The ``test`` split unless another is chosen.
- **csv**, **tsv**, **parquet**, **jsonl**: a table with an image column and a caption column,
  found among the usual names (:data:`IMAGE_COLUMNS`, :data:`CAPTION_COLUMNS`) or named, and an
  optional split column (``split``). A row holds one caption, or a list of them; an image is
  a file name (joined to ``filepath`` when the column is ``filename`` and a ``filepath``
  column exists, as in Karpathy's files), or encoded bytes (Hugging Face's ``{"bytes",
  "path"}`` too), so no image folder is needed. Rows of the same image are one image; a
  ``caption_index`` column orders its captions. The project's ``captions.tsv`` (``image``,
  ``split``, ``caption_index``, ``caption``; Flickr8k in ``../shared/data``) is such a table.

Every format has several captions per image. Splits: a file with no split, or only one, is used
whole; with several, one must be chosen (Karpathy files: ``test``), and a split the file does not
hold is an error that names those it does. Captions are trimmed; empty ones, and images left
with no caption, are skipped and counted (``skipped``). ``.gz`` files are read decompressed.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from wit_pipeline import fileio
from wit_pipeline.errors import WitError

FORMATS = ("auto", "coco", "karpathy", "csv", "tsv", "parquet", "jsonl")
# Auto-detected column names, in order of preference.
IMAGE_COLUMNS = (
    "image", "image_path", "image_file", "image_name", "img", "img_path",
    "filename", "file_name", "filepath", "file_path", "file", "path",
)  # fmt: skip
CAPTION_COLUMNS = ("caption", "captions", "text", "texts", "sentences", "sentence", "raw", "txt")
SPLIT_COLUMN = "split"
ORDER_COLUMN = "caption_index"
KARPATHY_DEFAULT_SPLIT = "test"
_SUFFIX_FORMATS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}


@dataclasses.dataclass(frozen=True)
class CaptionOptions:
    """How to read a caption file; empty strings mean "detect"."""

    format: str = "auto"  # one of FORMATS
    split: str = ""  # "" = the only split (or every row), Karpathy: test
    image_column: str = ""
    caption_column: str = ""
    split_column: str = ""

    @classmethod
    def from_values(cls, values: Mapping[str, Any], prefix: str = "") -> CaptionOptions:
        """From ``values[prefix + field]`` (parsed flags, a config as a dict, a suite set's
        options); missing or empty values keep the defaults."""
        out = {}
        for f in dataclasses.fields(cls):
            value = values.get(prefix + f.name)
            if value:
                out[f.name] = value
        return cls(**out)


def cli_option(field: str) -> str:
    """The ``wit eval retrieval`` flag of an option (for error messages)."""
    return {"format": "--captions-format"}.get(field, "--" + field.replace("_", "-"))


@dataclasses.dataclass
class RetrievalSet:
    """One split of a caption set: images (paths or encoded bytes) and their captions."""

    name: str
    source: str  # the caption file
    format: str  # coco | karpathy | csv | tsv | parquet | jsonl
    split: str  # the split evaluated; "all" when the file has none
    images: list[Any]
    captions: list[tuple[str, ...]]
    columns: dict[str, str]  # tables: the image/caption/split columns used
    skipped: dict[str, int]  # empty_captions, images_without_captions

    def texts_and_owners(self) -> tuple[list[str], list[int]]:
        """Every caption, and the index of its image."""
        texts, owner = [], []
        for i, caps in enumerate(self.captions):
            texts.extend(caps)
            owner.extend([i] * len(caps))
        return texts, owner


@dataclasses.dataclass
class _Record:
    """One image (COCO, Karpathy) or one table row, before a split is chosen and rows grouped."""

    key: str  # rows with the same key are the same image
    image: Any  # a file name or encoded bytes
    captions: list[Any]
    split: str | None
    order: Any = None  # caption_index


def _file_format(path: str, raw: bytes) -> str:
    """json | jsonl | parquet | csv | tsv, by name (without ``.gz``) or else by content."""
    found = fileio.sniff_format(path, raw, _SUFFIX_FORMATS)
    if found:
        return found
    if raw.lstrip()[:1] in (b"{", b"["):
        return "jsonl"  # not one JSON document: JSON lines
    first_line = raw.split(b"\n", 1)[0]
    return "tsv" if b"\t" in first_line else "csv"


def _load_json(path: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as e:
        raise WitError(f"cannot read captions file {path}: not JSON ({e})") from None


def _json_kind(doc: Any) -> str:
    if isinstance(doc, dict) and isinstance(doc.get("images"), list):
        if isinstance(doc.get("annotations"), list):
            return "coco"
        first = doc["images"][0] if doc["images"] else {}
        if isinstance(first, dict) and "sentences" in first:
            return "karpathy"
    return ""


def _coco_records(path: str, doc: Any) -> list[_Record]:
    try:
        names = {img["id"]: img["file_name"] for img in doc["images"]}
    except (KeyError, TypeError):
        raise WitError(f"{path}: COCO images need 'id' and 'file_name'") from None
    captions: dict[Any, list[Any]] = {iid: [] for iid in names}
    for ann in doc["annotations"]:
        if not isinstance(ann, dict) or "caption" not in ann:
            raise WitError(
                f"{path}: COCO annotations without 'caption' (instances or keypoints, not "
                f"captions?)"
            )
        iid = ann.get("image_id")
        if iid not in captions:
            raise WitError(
                f"{path}: annotation {ann.get('id')} names image_id {iid}, not in images"
            )
        captions[iid].append(ann["caption"])
    return [_Record(str(iid), name, captions[iid], None) for iid, name in names.items()]


def _karpathy_records(path: str, doc: Any) -> list[_Record]:
    out = []
    for i, img in enumerate(doc["images"]):
        if not isinstance(img, dict) or "filename" not in img:
            raise WitError(f"{path}: Karpathy image {i} has no 'filename'")
        name = os.path.join(img.get("filepath") or "", img["filename"])
        caps = [
            s.get("raw") if s.get("raw") is not None else " ".join(s.get("tokens") or [])
            for s in img.get("sentences") or []
        ]
        split = img.get("split")
        out.append(_Record(name, name, caps, None if split is None else str(split)))
    return out


def _table_columns(path: str, raw: bytes, fmt: str) -> dict[str, list[Any]]:
    """``{column: values}`` of a CSV (quoted fields), TSV (no quoting), Parquet or JSONL file."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(raw))
        except Exception as e:  # pyarrow raises several error types for bad files
            raise WitError(f"cannot read captions file {path}: {e}") from None
        return {name: table.column(name).to_pylist() for name in table.column_names}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WitError(f"cannot read captions file {path}: not UTF-8 text ({e})") from None
    if fmt == "jsonl":
        objs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise WitError(f"{path}: line {n} is not JSON") from None
                if not isinstance(obj, dict):
                    raise WitError(f"{path}: line {n} is not a JSON object")
                objs.append(obj)
        names = list(dict.fromkeys(k for obj in objs for k in obj))
        return {k: [obj.get(k) for obj in objs] for k in names}
    quoting = {"quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",", **quoting
    )
    rows = list(reader)
    if not rows:
        raise WitError(f"{path}: no header row")
    header = rows[0]
    return {h: [r[j] if j < len(r) else None for r in rows[1:]] for j, h in enumerate(header)}


def _pick_column(
    path: str,
    columns: Sequence[str],
    given: str,
    candidates: Sequence[str],
    field: str,
    option: Callable[[str], str],
) -> str:
    what = field.removesuffix("_column")
    if given:
        if given not in columns:
            raise WitError(f"{path}: no {what} column {given!r} (columns: {', '.join(columns)})")
        return given
    found = next((c for c in candidates if c in columns), "")
    if not found and field != "split_column":
        raise WitError(
            f"{path}: no {what} column among the usual names (columns: {', '.join(columns)}); "
            f"name it with {option(field)}"
        )
    return found


def _image_value(path: str, row: int, value: Any) -> tuple[str, Any]:
    """``(grouping key, image)`` of a table cell: a file name, or encoded bytes."""
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
        return "sha1:" + hashlib.sha1(data).hexdigest(), data
    if isinstance(value, str) and value:
        return value, value
    raise WitError(f"{path}: row {row} has no image (a file name or encoded bytes)")


def _table_records(
    path: str, raw: bytes, fmt: str, options: CaptionOptions, option: Callable[[str], str]
) -> tuple[list[_Record], dict[str, str]]:
    cols = _table_columns(path, raw, fmt)
    names = list(cols)
    image_col = _pick_column(
        path, names, options.image_column, IMAGE_COLUMNS, "image_column", option
    )
    caption_col = _pick_column(
        path, names, options.caption_column, CAPTION_COLUMNS, "caption_column", option
    )
    split_col = _pick_column(
        path, names, options.split_column, (SPLIT_COLUMN,), "split_column", option
    )
    used = {"image": image_col, "caption": caption_col, "split": split_col}
    folder = (
        cols["filepath"] if image_col in ("filename", "file_name") and "filepath" in cols else None
    )
    if folder is not None:
        used["image"] = f"filepath/{image_col}"
    splits = cols[split_col] if split_col else None
    order = cols.get(ORDER_COLUMN)
    out = []
    for i, (value, caption) in enumerate(zip(cols[image_col], cols[caption_col], strict=True)):
        key, image = _image_value(path, i, value)
        if folder is not None and folder[i]:
            key = image = os.path.join(str(folder[i]), image)
        caps = list(caption) if isinstance(caption, list | tuple) else [caption]
        caps = [c.get("raw") if isinstance(c, dict) else c for c in caps]
        split = None if splits is None or splits[i] is None else str(splits[i])
        index = None if order is None else order[i]
        out.append(_Record(key, image, caps, split, index))
    return out, used


def _choose_split(
    path: str, records: Sequence[_Record], requested: str, default: str, option: Callable
) -> str | None:
    """The split to evaluate; None: use every record."""
    splits = sorted({r.split for r in records if r.split is not None})
    if requested:
        if not splits:
            raise WitError(
                f"{path}: no split {requested!r} (the file has no splits: leave "
                f"{option('split')} out to use every image)"
            )
        if requested not in splits:
            raise WitError(f"{path}: no split {requested!r} (splits: {', '.join(splits)})")
        return requested
    if len(splits) <= 1:
        return None
    if default in splits:
        return default
    raise WitError(
        f"{path}: several splits ({', '.join(splits)}); choose one with {option('split')}"
    )


def _order_key(value: Any) -> tuple[int, Any]:
    try:
        return (0, int(value))
    except (TypeError, ValueError):
        return (1, str(value))


def subsample(n: int, max_items: int) -> list[int]:
    """Evenly spaced indices (deterministic) when a set is capped, every index otherwise."""
    if not max_items or max_items >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, max_items)})


def load_retrieval_set(
    captions: str,
    *,
    images: str = "",
    options: CaptionOptions = CaptionOptions(),
    max_images: int = 0,
    name: str = "",
    option: Callable[[str], str] = cli_option,
) -> RetrievalSet:
    """One split of the caption file ``captions`` (any format above), its images in ``images``
    (a folder; not needed when the file embeds the images or names absolute paths).

    ``max_images`` keeps that many evenly spaced images; ``option`` names an option in error
    messages (the trainer's and the suite's differ from ``wit eval retrieval``'s).
    """
    if options.format not in FORMATS:
        raise WitError(f"{option('format')} must be one of {', '.join(FORMATS)}")
    raw = fileio.read_bytes_gunzipped(captions, "captions file")[1]
    found = _file_format(captions, raw)
    fmt = options.format if options.format != "auto" else found
    columns: dict[str, str] = {}
    if fmt in ("json", "coco", "karpathy"):
        doc = _load_json(captions, raw)
        kind = _json_kind(doc)
        if not kind or (fmt != "json" and kind != fmt):
            raise WitError(
                f"{captions}: not a COCO caption file (images + annotations) or a Karpathy "
                f"split file (images with sentences)"
                if fmt == "json"
                else f"{captions}: not a {'COCO caption' if fmt == 'coco' else 'Karpathy split'} file"
            )
        fmt = kind
        records = (
            _coco_records(captions, doc) if kind == "coco" else _karpathy_records(captions, doc)
        )
    else:
        records, columns = _table_records(captions, raw, fmt, options, option)
    default = KARPATHY_DEFAULT_SPLIT if fmt == "karpathy" else ""
    split = _choose_split(captions, records, options.split, default, option)

    skipped = {"empty_captions": 0, "images_without_captions": 0}
    groups: dict[str, tuple[Any, list[tuple[Any, int, str]]]] = {}
    for r in records:
        if split is not None and r.split != split:
            continue
        caps = groups.setdefault(r.key, (r.image, []))[1]
        for c in r.captions:
            text = c.strip() if isinstance(c, str) else ""
            if text:
                caps.append((_order_key(r.order), len(caps), text))
            else:
                skipped["empty_captions"] += 1
    kept = [(image, caps) for image, caps in groups.values() if caps]
    skipped["images_without_captions"] = len(groups) - len(kept)
    if not kept:
        where = f" in split {split!r}" if split is not None else ""
        raise WitError(f"{captions}: no captioned images{where}")
    kept = [kept[i] for i in subsample(len(kept), max_images)]

    paths = [image for image, _ in kept if isinstance(image, str)]
    if paths and not images and not all(os.path.isabs(p) for p in paths):
        raise WitError(
            f"{captions} names image files ({paths[0]}, ...): give their folder with "
            f"{option('images')}"
        )
    resolved = [os.path.join(images, im) if isinstance(im, str) else im for im, _ in kept]
    missing = [p for p in resolved if isinstance(p, str) and not os.path.exists(p)]
    if missing:
        raise WitError(f"{len(missing)} image(s) of {captions} missing, e.g. {missing[0]}")
    recorded_split = split if split is not None else _only_split(records)
    return RetrievalSet(
        name=name or dataset_name(captions),
        source=captions,
        format=fmt,
        split=recorded_split,
        images=resolved,
        captions=[tuple(c for _, _, c in sorted(caps)) for _, caps in kept],
        columns={k: v for k, v in columns.items() if v},
        skipped=skipped,
    )


def _only_split(records: Sequence[_Record]) -> str:
    splits = {r.split for r in records if r.split is not None}
    return splits.pop() if len(splits) == 1 else "all"


def dataset_name(path: str) -> str:
    """A set's name from its path: ``.../cifar10/test.parquet`` -> ``cifar10``,
    ``.../flickr8k/captions.tsv`` -> ``flickr8k``, ``.../captions_val2017.json`` -> its stem."""
    norm = os.path.normpath(path[:-3] if path.endswith(".gz") else path)
    stem = os.path.splitext(os.path.basename(norm))[0]
    generic = ("test", "val", "validation", "train", "dev", "data", "captions")
    if stem in generic and os.path.dirname(norm):
        return os.path.basename(os.path.dirname(norm))
    return stem
