"""Batched perceptual hashes, bit-identical to ``imagehash.phash`` (64 bits).

``imagehash.phash(image)`` converts to 8-bit grayscale (``convert("L")``), resizes to 32x32 with
Pillow's Lanczos filter, takes the 2-D DCT-II (``scipy.fftpack.dct`` on both axes), keeps the
8x8 lowest frequencies and sets a bit where a coefficient is above their median. Most of its
time goes to per-image overhead, so this module does the same steps for a whole batch:

- ``convert("L")`` stays Pillow's (its C code is faster than any numpy version, and exact);
- the resize reproduces Pillow's ``ImagingResample`` for 8-bit images exactly: the same
  fixed-point Lanczos coefficients (22 fractional bits, computed with the same double-precision
  formulas), the same horizontal-then-vertical passes with rounding and clipping to 0..255 in
  between, done as float64 matrix products over all images of one size (every partial sum is an
  integer below 2**53, so the products are exact);
- the 8x8 low-frequency DCT is two small matrix products for the whole batch. It can differ from
  scipy's FFT in the last bits, which only matters when a coefficient lies within rounding noise
  of the median (constant or symmetric images); those images are recomputed with
  ``scipy.fftpack.dct`` exactly as imagehash does.

Hashes are ``uint64`` with the first bit of imagehash's row-major bit string as the most
significant bit, so ``f"{h:016x}" == str(imagehash.phash(image))``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

HASH_SIZE = 8
HIGHFREQ_FACTOR = 4
IMG_SIZE = HASH_SIZE * HIGHFREQ_FACTOR  # 32
_PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c
_LANCZOS_SUPPORT = 3.0
# A coefficient closer than this to the median could flip between FFT and matrix-product
# rounding (both are ~1e-8 off at most for values up to ~1e6); such images are redone exactly.
_MEDIAN_MARGIN = 1e-3
# Images of one size are resized together in chunks of at most this many pixels (float64).
_CHUNK_PIXELS = 1 << 18


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


def resample_matrix(in_size: int, out_size: int = IMG_SIZE) -> np.ndarray:
    """Pillow's fixed-point Lanczos weights for one axis as a dense ``(out, in)`` float64 matrix.

    Mirrors ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` in Pillow's ``Resample.c``
    (same operation order, Python floats are C doubles, ``int()`` truncates like a C cast).
    """
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = _LANCZOS_SUPPORT * filterscale
    m = np.zeros((out_size, in_size), dtype=np.float64)
    one = 1 << _PRECISION_BITS
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        weights = []
        ww = 0.0
        for x in range(xmax):
            w = _lanczos((x + xmin - center + 0.5) * ss)
            weights.append(w)
            ww += w
        for x, w in enumerate(weights):
            if ww != 0.0:
                w /= ww
            m[xx, xmin + x] = int(-0.5 + w * one) if w < 0 else int(0.5 + w * one)
    return m


def _scaled_matrix(in_size: int) -> np.ndarray:
    # Weights / 2**22: multiplying by a power of two is exact, and so is every partial sum of
    # ``pixel * weight`` (integers times 2**-22 below 2**9: 31 significant bits < 53).
    return resample_matrix(in_size) / (1 << _PRECISION_BITS)


def _round_clip8(scaled: np.ndarray) -> np.ndarray:
    """Pillow's ``clip8``: ``(acc + 2**21) >> 22`` clamped to 0..255, in place.

    ``scaled`` is ``acc / 2**22`` (the weights are pre-scaled by a power of two, which is exact).
    """
    np.add(scaled, 0.5, out=scaled)
    np.floor(scaled, out=scaled)
    return np.clip(scaled, 0, 255, out=scaled)


class PHasher:
    """Computes pHashes for batches of images; caches resampling matrices per input size.

    Not thread-safe (the cache); build one per worker (e.g. in ``DoFn.setup``).
    """

    def __init__(self) -> None:
        self._matrices: dict[int, np.ndarray] = {}
        n = np.arange(IMG_SIZE)
        k = np.arange(HASH_SIZE)
        # scipy.fftpack.dct type II, norm=None: y_k = 2 * sum_n x_n cos(pi k (2n + 1) / (2N)).
        self._dct = 2.0 * np.cos(np.pi * np.outer(k, 2 * n + 1) / (2 * IMG_SIZE))

    def _matrix(self, size: int) -> np.ndarray:
        m = self._matrices.get(size)
        if m is None:
            m = self._matrices[size] = _scaled_matrix(size)
        return m

    def _resize(self, stack: np.ndarray) -> np.ndarray:
        """``(n, H, W)`` 8-bit grayscale (any dtype) -> ``(n, 32, 32)`` float64, as Pillow."""
        n, h, w = stack.shape
        x = stack.astype(np.float64)
        # Pillow resizes very tall images (height > 100 x width) vertically first, else
        # horizontally first; a pass whose size does not change is skipped.
        tall = h > 100 * w and h > IMG_SIZE
        if w != IMG_SIZE and not tall:
            x = self._horizontal(x)
        if h != IMG_SIZE:
            cols = x.shape[2]
            t = x.transpose(1, 0, 2).reshape(h, n * cols)
            t = _round_clip8(self._matrix(h) @ t)
            x = t.reshape(IMG_SIZE, n, cols).transpose(1, 0, 2)
        if w != IMG_SIZE and tall:
            x = self._horizontal(np.ascontiguousarray(x))
        return x

    def _horizontal(self, x: np.ndarray) -> np.ndarray:
        n, h, w = x.shape
        return _round_clip8(x.reshape(n * h, w) @ self._matrix(w).T).reshape(n, h, IMG_SIZE)

    def hash_gray32(self, pixels: np.ndarray) -> np.ndarray:
        """pHashes of ``(n, 32, 32)`` resized grayscale images -> ``(n,)`` uint64."""
        n = pixels.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.uint64)
        coef = (self._dct @ pixels @ self._dct.T).reshape(n, HASH_SIZE * HASH_SIZE)
        med = _median64(coef)
        margin = np.abs(coef - med[:, None]).min(axis=1)
        unsure = np.flatnonzero(margin < _MEDIAN_MARGIN)
        if unsure.size:
            import scipy.fftpack

            exact = pixels[unsure].astype(np.uint8).astype(np.float64)
            d = scipy.fftpack.dct(scipy.fftpack.dct(exact, axis=1), axis=2)
            d = d[:, :HASH_SIZE, :HASH_SIZE].reshape(len(unsure), -1)
            coef[unsure] = d
            med[unsure] = _median64(d)
        bits = coef > med[:, None]
        return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)

    def hash_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """pHashes of PIL images (any mode Pillow can convert to ``L``) -> ``(n,)`` uint64."""
        gray = [_gray_array(im) for im in images]
        out = np.zeros(len(gray), dtype=np.uint64)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(gray):
            by_size.setdefault(g.shape, []).append(i)
        for (h, w), idx in by_size.items():
            step = max(1, _CHUNK_PIXELS // max(1, h * w))
            for start in range(0, len(idx), step):
                part = idx[start : start + step]
                small = self._resize(np.stack([gray[i] for i in part]))
                out[part] = self.hash_gray32(small)
        return out

    def hash_bytes(self, blobs: Sequence[bytes]) -> tuple[np.ndarray, list[str | None]]:
        """Decode encoded images and hash them.

        Returns ``(hashes, errors)``: ``errors[i]`` is ``None`` when image ``i`` was hashed, else
        a short description of why it could not be decoded (its hash is then 0).
        """
        images: list[Image.Image] = []
        ok: list[int] = []
        errors: list[str | None] = [None] * len(blobs)
        for i, blob in enumerate(blobs):
            try:
                im = Image.open(io.BytesIO(blob))
                im.load()
            except Exception as e:  # PIL raises many types for corrupt data
                errors[i] = f"{type(e).__name__}: {e}"[:200]
                continue
            images.append(im)
            ok.append(i)
        out = np.zeros(len(blobs), dtype=np.uint64)
        if images:
            out[ok] = self.hash_images(images)
        return out, errors


def _gray_array(image: Image.Image) -> np.ndarray:
    g = image.convert("L")  # exactly imagehash's first step, whatever the mode
    w, h = g.size
    return np.frombuffer(g.tobytes(), dtype=np.uint8).reshape(h, w)


def _median64(coef: np.ndarray) -> np.ndarray:
    """Row medians of ``(n, 64)``, computed as ``numpy.median`` does (mean of the middle two)."""
    mid = coef.shape[1] // 2
    part = np.partition(coef, (mid - 1, mid), axis=1)
    return (part[:, mid - 1] + part[:, mid]) / 2


def phash_images(images: Sequence[Image.Image]) -> np.ndarray:
    """pHashes (``uint64``) of PIL images, equal to ``imagehash.phash``."""
    return PHasher().hash_images(images)


def phash_image(image: Image.Image) -> int:
    """The pHash of one image as a Python int (use ``PHasher`` for many)."""
    return int(PHasher().hash_images([image])[0])


def to_hex(h: int | np.integer) -> str:
    """16 hex chars, as ``str(imagehash.phash(...))``."""
    return f"{int(h):016x}"


def from_hex(s: str) -> int:
    if len(s) != 16:
        raise ValueError(f"a 64-bit pHash has 16 hex chars, got {s!r}")
    return int(s, 16)


def hamming(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()
