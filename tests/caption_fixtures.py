"""Caption sets in every format, and a deterministic fake CLIP whose recalls are known by hand.

Images are solid PNGs; image ``i`` has red value ``10 * i``, so its embedding is the unit
vector ``e_i``. Caption ``(g, c)`` reads "photo g caption c": its embedding puts 0.05 on ``e_g``
(its own image) and, for caption 0 only, 0.06 on every image below ``g`` (hard negatives), plus
a slack coordinate that makes it unit length, so every similarity is exactly one of those
values. For the 12 images 0..11 with 5 captions each:

- text -> image: captions 1-4 rank their image first; caption 0 of image ``g`` ranks it after
  ``g`` hard negatives, so it is a hit at k when ``g < k``: R@1 = (48 + 1) / 60, R@5 = (48 + 5)
  / 60, R@10 = (48 + 10) / 60;
- image -> text: image ``j`` is a hard negative of caption 0 of each ``g > j`` (``11 - j`` of
  them, at 0.06), ranked above its own captions (0.05): a hit at k when ``11 - j < k``:
  R@1 = 1/12 (j = 11), R@5 = 5/12 (j >= 7), R@10 = 10/12 (j >= 2).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from typing import ClassVar

import torch
from PIL import Image

N_IMAGES = 12
N_CAPTIONS = 5
DIM = 32  # image indices below 31; coordinate 31 is the slack
EXPECTED = {
    "image_to_text_R@1": 1 / 12,
    "image_to_text_R@5": 5 / 12,
    "image_to_text_R@10": 10 / 12,
    "text_to_image_R@1": 49 / 60,
    "text_to_image_R@5": 53 / 60,
    "text_to_image_R@10": 58 / 60,
    "num_images": 12,
    "num_texts": 60,
}
_CAPTION = re.compile(r"photo (\d+) caption (\d+)")
_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's normalization (open_clip's default)
_STD = (0.26862954, 0.26130258, 0.27577711)


def caption(g: int, c: int) -> str:
    return f"photo {g} caption {c}"


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def image_name(i: int) -> str:
    return f"img_{i:02d}.png"


def write_images(directory, indices) -> str:
    os.makedirs(directory, exist_ok=True)
    for i in indices:
        with open(os.path.join(directory, image_name(i)), "wb") as f:
            f.write(png(i))
    return str(directory)


def text_vector(g: int, c: int) -> torch.Tensor:
    v = torch.zeros(DIM, dtype=torch.float64)
    v[g] = 0.05
    if c == 0:
        v[:g] = 0.06
    v[DIM - 1] = math.sqrt(1.0 - float((v * v).sum()))
    return v.float()


class FakeVisual(torch.nn.Module):
    preprocess_cfg: ClassVar[dict] = {
        "size": 16,
        "mode": "RGB",
        "mean": _MEAN,
        "std": _STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }


class FakeClip(torch.nn.Module):
    """encode_image: the image index from the (normalized) red channel; encode_text: the
    vectors above. Works with open_clip's eval transform (``evaluate.eval_transform``)."""

    def __init__(self):
        super().__init__()
        self.visual = FakeVisual()

    def encode_image(self, x, normalize=True):
        red = (x[:, 0, 0, 0].double() * _STD[0] + _MEAN[0]) * 255
        idx = torch.round(red / 10).long()
        return torch.nn.functional.one_hot(idx, DIM).float()

    def encode_text(self, tokens, normalize=True):
        return torch.stack([text_vector(int(g), int(c)) for g, c in tokens.tolist()])


def fake_tokenizer(texts):
    pairs = []
    for t in texts:
        m = _CAPTION.search(t)
        assert m, t
        pairs.append((int(m.group(1)), int(m.group(2))))
    return torch.tensor(pairs, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# The 12 test images in every format


def write_coco(path, *, gz: bool = False) -> str:
    """COCO captions: the 12 images with five captions each (interleaved in the file), an image
    with no annotation, and an empty caption."""
    images = [
        {"id": 100 + g, "file_name": image_name(g), "height": 8, "width": 8} for g in range(13)
    ]
    anns = [
        {"id": 1000 + 10 * g + c, "image_id": 100 + g, "caption": f" {caption(g, c)}. "}
        for c in range(N_CAPTIONS)
        for g in range(N_IMAGES)
    ]
    anns.append({"id": 9999, "image_id": 103, "caption": "   "})
    data = json.dumps({"info": {}, "images": images, "annotations": anns}).encode()
    if gz:
        import gzip

        data = gzip.compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


KARPATHY_SPLITS = {"test": range(12), "val": (12, 13), "train": (14, 15, 16), "restval": (17,)}


def write_karpathy(path, *, splits=KARPATHY_SPLITS, filepath: str = "val2014") -> str:
    images = []
    for split, indices in splits.items():
        for g in indices:
            item = {
                "filename": image_name(g),
                "split": split,
                "imgid": g,
                "sentences": [
                    {"raw": caption(g, c) + " .", "tokens": caption(g, c).split()}
                    for c in range(N_CAPTIONS)
                ],
            }
            if filepath:
                item["filepath"] = filepath
            images.append(item)
    with open(path, "w") as f:
        json.dump({"images": images, "dataset": "coco"}, f)
    return str(path)


def _csv_line(cells, sep):
    out = []
    for cell in cells:
        cell = str(cell)
        if sep == "," and ("," in cell or '"' in cell):
            cell = '"' + cell.replace('"', '""') + '"'
        out.append(cell)
    return sep.join(out) + "\n"


def write_table(path, header, rows, sep=",") -> str:
    with open(path, "w") as f:
        f.write(_csv_line(header, sep))
        for row in rows:
            f.write(_csv_line(row, sep))
    return str(path)


def long_rows(split_of=lambda g: "test"):
    """(image, caption, split) per caption, captions with a comma and quotes."""
    return [
        (image_name(g), f'{caption(g, c)}, a "red" square', split_of(g))
        for g in range(N_IMAGES)
        for c in range(N_CAPTIONS)
    ]
