"""Synthetic scenes with captions that say what is in them.

Each scene is a few shapes of one colour and kind on a plain background ("two red circles on a
grey background"). A tiny CLIP can learn colour and shape words from a few thousand of these on
two CPU cores, and its zero-shot accuracy on held-out renders (new positions, sizes, counts and
backgrounds) tells whether the pipeline produced usable data. Rendering is deterministic per
seed.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (150, 150, 150),
    "black": (20, 20, 20),
}
# Caption templates: {n} count word, {c} colour, {s} shape (plural when n > 1), {b} background.
TEMPLATES = (
    "{n} {c} {s} on a {b} background",
    "A drawing of {n} {c} {s}.",
    "{N} {c} {s}",
    "a picture with {n} {c} {s} in it",
    "Clip art: {n} {c} {s}, {b} background",
    "photo of {n} {c} {s}",
)


@dataclasses.dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    count: int
    background: str
    seed: int

    @property
    def label(self) -> str:
        """The zero-shot class: colour and shape ("red circle")."""
        return f"{self.colour} {self.shape}"

    def caption(self, template_index: int | None = None) -> str:
        """A caption from one of ``TEMPLATES`` (chosen by the seed unless given)."""
        rng = random.Random(self.seed * 7919 + 1)
        template = TEMPLATES[
            rng.randrange(len(TEMPLATES)) if template_index is None else template_index
        ]
        n = COUNT_WORDS[self.count]
        if self.count == 1 and not template.startswith(("{n}", "{N}")):
            n = "an" if self.colour[0] in "aeiou" else "a"
        shape = self.shape if self.count == 1 else self.shape + "s"
        return template.format(n=n, N=n.capitalize(), c=self.colour, s=shape, b=self.background)


def random_scene(rng: random.Random, *, seed: int) -> Scene:
    return Scene(
        colour=rng.choice(list(COLOURS)),
        shape=rng.choice(SHAPES),
        count=rng.choice(list(COUNT_WORDS)),
        background=rng.choice(list(BACKGROUNDS)),
        seed=seed,
    )


def _star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = rot + k * math.pi / 5
        pts.append((cx + rad * math.sin(a), cy - rad * math.cos(a)))
    return pts


# Strength of the background's shading, in 8-bit levels (see ``background``).
SHADING = 60.0


def background(scene: Scene, size: int) -> Image.Image:
    """The scene's background colour with a seeded smooth shading (a gradient and a wave).

    Flat backgrounds make scenes with one shape look alike to a perceptual hash: on 3,000 flat
    renders 218 pairs of different scenes were within pHash distance 4 (so dedup merged them);
    with this shading, none. Real photos are never flat either.
    """
    rng = random.Random(scene.seed * 31 + 17)
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    gradient = xx * math.cos(angle) + yy * math.sin(angle)
    fx, fy, px, py = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.random(), rng.random()
    wave = np.sin(2 * math.pi * (fx * xx + px)) * np.sin(2 * math.pi * (fy * yy + py))
    shade = SHADING * (1.4 * gradient + 0.6 * wave)
    pixels = np.clip(base[None, None, :] + shade[..., None], 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def render(scene: Scene, size: int = 96) -> Image.Image:
    """Draw the scene: ``count`` non-overlapping shapes with jittered size, place and tint."""
    rng = random.Random(scene.seed)
    img = background(scene, size)
    draw = ImageDraw.Draw(img)
    base = COLOURS[scene.colour]
    placed: list[tuple[float, float, float]] = []
    radius_max = size / (3.2 + scene.count)
    for _ in range(scene.count):
        for _attempt in range(50):
            r = rng.uniform(radius_max * 0.6, radius_max)
            cx = rng.uniform(r + 2, size - r - 2)
            cy = rng.uniform(r + 2, size - r - 2)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
                break
        placed.append((cx, cy, r))
        tint = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in base)
        if scene.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tint)
        elif scene.shape == "square":
            a = rng.uniform(0, math.pi / 2)
            pts = [
                (cx + r * math.cos(a + k * math.pi / 2), cy + r * math.sin(a + k * math.pi / 2))
                for k in range(4)
            ]
            draw.polygon(pts, fill=tint)
        elif scene.shape == "triangle":
            a = rng.uniform(-0.3, 0.3)
            pts = [
                (
                    cx + r * math.sin(a + k * 2 * math.pi / 3),
                    cy - r * math.cos(a + k * 2 * math.pi / 3),
                )
                for k in range(3)
            ]
            draw.polygon(pts, fill=tint)
        else:
            draw.polygon(_star(cx, cy, r * 1.15, rng.uniform(0, 1.2)), fill=tint)
    return img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def eval_scenes(n_per_class: int, *, seed: int = 10_000_000) -> list[Scene]:
    """Held-out scenes for zero-shot evaluation: every colour x shape, seeds disjoint from training."""
    rng = random.Random(seed)
    out = []
    i = 0
    for colour in COLOURS:
        for shape in SHAPES:
            for _ in range(n_per_class):
                out.append(
                    Scene(
                        colour,
                        shape,
                        rng.choice(list(COUNT_WORDS)),
                        rng.choice(list(BACKGROUNDS)),
                        seed + i,
                    )
                )
                i += 1
    return out


def class_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]
