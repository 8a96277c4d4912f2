"""Batched perceptual hashes, bit-identical to ``imagehash.phash`` (64 bits).

``imagehash.phash(image)`` converts to 8-bit grayscale (``convert("L")``), resizes to 32x32 with
Pillow's Lanczos filter, takes the 2-D DCT-II (``scipy.fftpack.dct`` on both axes), keeps the
8x8 lowest frequencies and sets a bit where a coefficient is above their median. Most of its
time goes to per-image overhead, so this module does the same steps for a whole batch:

- ``convert("L")`` stays Pillow's (its C code is faster than any numpy version, and exact), called
  on the C core without ``Image.convert``'s per-call overhead; the gray images of one size are
  pasted side by side into one canvas and read out in one call;
- the resize reproduces Pillow's ``ImagingResample`` for 8-bit images exactly: the same
  fixed-point Lanczos coefficients (22 fractional bits, computed with the same double-precision
  formulas), the same horizontal-then-vertical passes with rounding and clipping to 0..255 in
  between, done as matrix products over all images of one size. The products run in float32,
  in bands that skip the zero weights; a proven bound on float32's error tells which roundings
  are certain, and the few that are not (about 0.1%) are recomputed in float64, where every
  partial sum is an integer below 2**53 and so exact (``_Axis``);
- the 8x8 low-frequency DCT is two small matrix products for the whole batch. It can differ from
  scipy's FFT in the last bits, which only matters when a coefficient lies within rounding noise
  of the median (constant or symmetric images); those images are recomputed with
  ``scipy.fftpack.dct`` exactly as imagehash does.

Hashes are ``uint64`` with the first bit of imagehash's row-major bit string as the most
significant bit, so ``f"{h:016x}" == str(imagehash.phash(image))``.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
# Images of one size are hashed together in chunks of at most this many pixels.
_CHUNK_PIXELS = 1 << 20
# Outputs per band of the float32 resampling product (see ``_Axis``).
_BAND = 8
# Above this error margin (about 2% of roundings unsure) the float32 path is not worth it.
_MAX_FLOAT32_EPS = 1e-2
# Modes for which ``Image.convert("L")`` does more than ``image.im.convert("L", dither)`` (palette
# transparency, LAB colour management); for the others it runs just that, or, when the core
# raises ValueError, a conversion through another mode.
_INDIRECT_MODES = frozenset({"P", "PA", "LAB"})


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


def _round_clip8_checked(approx: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``_round_clip8`` of a float32 approximation within ``eps`` of the exact value.

    Returns ``(rounded, unsure)``. ``unsure`` marks the entries where ``approx - eps`` and
    ``approx + eps`` round differently; every other entry of ``rounded`` is exact (see
    ``_Axis``). ``approx`` is overwritten.
    """
    rounded = approx + np.float32(0.5 + eps)
    np.floor(rounded, out=rounded)
    # Certain iff approx + 0.5 - eps has the same floor, i.e. rounded - approx <= 0.5 - eps.
    np.subtract(rounded, approx, out=approx)
    unsure = approx > np.float32(0.5 - eps)
    np.clip(rounded, 0, 255, out=rounded)
    return rounded, unsure


@dataclasses.dataclass(frozen=True)
class _Band:
    """Outputs ``j0:j0 + width`` of one axis, which read only inputs ``lo:hi``."""

    j0: int
    lo: int
    hi: int
    single: np.ndarray  # (hi - lo, width) float32 weights, laid out for ``x[:, lo:hi] @ single``


@dataclasses.dataclass(frozen=True)
class _Axis:
    """Resampling of one axis from ``size`` pixels to 32, as Pillow does it.

    ``exact`` holds the weights as float64, where every product and partial sum is exact. The
    fast path multiplies in float32, whose error is bounded: with 8-bit inputs, rows of at most
    ``nnz`` nonzero weights and ``l1`` the largest row sum of ``|weight|``, any summation order
    is within ``gamma(nnz) * 255 * l1`` of the exact sum (``gamma(k) = k u / (1 - k u)``,
    ``u = 2**-24``; products and sums with zero weights are exact). ``eps`` adds the rounding of
    adding ``0.5 +- eps`` in float32, so an entry that ``_round_clip8_checked`` calls certain is
    Pillow's value; the others (a few per image) are recomputed one by one in float64.
    ``eps`` is ``None`` where the bound is so loose (large downscales) that float64 is cheaper.

    Lanczos weights are zero away from the diagonal, so outputs are computed in bands of
    ``_BAND`` that multiply only the inputs they read (one band of 32 for small inputs).
    """

    size: int
    exact: np.ndarray  # (32, size) float64
    bands: tuple[_Band, ...]
    eps: float | None
    # Output j reads only inputs ``starts[j] : starts[j] + window``, with weights ``compact[j]``
    # (float64): the recomputation of single unsure entries reads just those.
    starts: np.ndarray  # (32,) int
    compact: np.ndarray  # (32, window) float64

    @property
    def width(self) -> int:
        return IMG_SIZE // len(self.bands)

    @property
    def _window(self) -> np.ndarray:
        return np.arange(self.compact.shape[1])

    @classmethod
    def build(cls, size: int) -> _Axis:
        exact = _scaled_matrix(size)
        nonzero = exact != 0
        nnz = int(nonzero.sum(axis=1).max())
        l1 = float(np.abs(exact).sum(axis=1).max())
        u = 2.0**-24
        gamma = nnz * u / (1 - nnz * u)
        # |approx + 0.5 + eps| < 255 * l1 + 2, where float32 rounds by at most half an ulp; the
        # other half covers the final subtraction and the constants' own rounding.
        ulp = 2.0 ** (math.ceil(math.log2(255 * l1 + 2)) - 23)
        eps = gamma * 255 * l1 + ulp

        first = nonzero.argmax(axis=1)
        last = size - 1 - nonzero[:, ::-1].argmax(axis=1)
        window = int((last - first).max()) + 1
        starts = np.minimum(first, size - window)
        compact = np.stack([exact[j, s : s + window] for j, s in enumerate(starts)])
        if eps > _MAX_FLOAT32_EPS:
            return cls(size, exact, (), None, starts, compact)

        def band(j0: int, j1: int) -> _Band:
            lo, hi = int(first[j0:j1].min()), int(last[j0:j1].max()) + 1
            return _Band(j0, lo, hi, exact[j0:j1, lo:hi].T.astype(np.float32, order="C"))

        bands = [band(j0, j0 + _BAND) for j0 in range(0, IMG_SIZE, _BAND)]
        if sum(_BAND * (b.hi - b.lo) for b in bands) > 0.75 * exact.size:
            bands = [band(0, IMG_SIZE)]
        return cls(size, exact, tuple(bands), eps, starts, compact)

    def resize_rows(self, x: np.ndarray) -> np.ndarray:
        """``(r, size)`` 8-bit values (float32) -> ``(r, 32)`` float32, each row resampled."""
        if self.eps is None:
            return _round_clip8(x.astype(np.float64) @ self.exact.T).astype(np.float32)
        out = np.empty((x.shape[0], IMG_SIZE), dtype=np.float32)
        width = self.width
        for b in self.bands:
            np.matmul(x[:, b.lo : b.hi], b.single, out=out[:, b.j0 : b.j0 + width])
        out, unsure = _round_clip8_checked(out, self.eps)
        unsure = np.flatnonzero(unsure)
        if unsure.size:  # a few per image: recompute just those entries in float64
            rows, cols = np.divmod(unsure, IMG_SIZE)
            inputs = x[rows[:, None], self.starts[cols][:, None] + self._window]
            exact = np.einsum("ek,ek->e", inputs.astype(np.float64), self.compact[cols])
            out.ravel()[unsure] = _round_clip8(exact)
        return out

    def resize_columns(self, x: np.ndarray) -> np.ndarray:
        """``(size, c)`` 8-bit values (float32) -> ``(32, c)`` float32, each column resampled."""
        if self.eps is None:
            return _round_clip8(self.exact @ x.astype(np.float64)).astype(np.float32)
        c = x.shape[1]
        out = np.empty((IMG_SIZE, c), dtype=np.float32)
        width = self.width
        for b in self.bands:
            np.matmul(b.single.T, x[b.lo : b.hi], out=out[b.j0 : b.j0 + width])
        out, unsure = _round_clip8_checked(out, self.eps)
        unsure = np.flatnonzero(unsure)
        if unsure.size:
            rows, cols = np.divmod(unsure, c)
            inputs = x[self.starts[rows][:, None] + self._window, cols[:, None]]
            exact = np.einsum("ek,ek->e", inputs.astype(np.float64), self.compact[rows])
            out.ravel()[unsure] = _round_clip8(exact)
        return out


class PHasher:
    """Computes pHashes for batches of images; caches resampling weights per input size.

    Not thread-safe (the cache); build one per worker (e.g. in ``DoFn.setup``).
    """

    def __init__(self) -> None:
        self._axes: dict[int, _Axis] = {}
        n = np.arange(IMG_SIZE)
        k = np.arange(HASH_SIZE)
        # scipy.fftpack.dct type II, norm=None: y_k = 2 * sum_n x_n cos(pi k (2n + 1) / (2N)).
        self._dct = 2.0 * np.cos(np.pi * np.outer(k, 2 * n + 1) / (2 * IMG_SIZE))

    def _axis(self, size: int) -> _Axis:
        axis = self._axes.get(size)
        if axis is None:
            axis = self._axes[size] = _Axis.build(size)
        return axis

    def _resize(self, canvas: np.ndarray) -> np.ndarray:
        """``(H, n, W)`` 8-bit grayscale -> ``(n, 32, 32)`` float32, as Pillow resizes each image.

        The input holds ``n`` images side by side (row ``r`` of all of them, then row ``r + 1``),
        so that the rows pass reads it as ``(H * n, W)`` and writes ``(H, n * 32)``, which is
        what the columns pass reads: no transposes in between.
        """
        h, n, w = canvas.shape
        x = canvas.reshape(h, n * w).astype(np.float32)
        # Pillow resizes very tall images (height > 100 x width) vertically first, else
        # horizontally first; a pass whose size does not change is skipped.
        tall = h > 100 * w and h > IMG_SIZE
        if tall:
            x = self._axis(h).resize_columns(x)
            h = IMG_SIZE
        if w != IMG_SIZE:
            x = self._axis(w).resize_rows(x.reshape(h * n, w))
        if h != IMG_SIZE:
            x = self._axis(h).resize_columns(x.reshape(h, n * IMG_SIZE))
        return x.reshape(IMG_SIZE, n, IMG_SIZE).transpose(1, 0, 2)

    def hash_gray32(self, pixels: np.ndarray) -> np.ndarray:
        """pHashes of ``(n, 32, 32)`` resized grayscale images -> ``(n,)`` uint64."""
        n = pixels.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.uint64)
        pixels = np.asarray(pixels, dtype=np.float64)
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
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            im.load()  # as ``convert`` does; a lazily opened image has no pixels before
            groups.setdefault(im.size, []).append(i)
        out = np.zeros(len(images), dtype=np.uint64)
        for (w, h), idx in groups.items():
            step = max(1, _CHUNK_PIXELS // max(1, w * h))
            for start in range(0, len(idx), step):
                part = idx[start : start + step]
                canvas = _gray_canvas([images[i] for i in part])
                out[part] = self.hash_gray32(self._resize(canvas))
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


def _gray_canvas(images: Sequence[Image.Image]) -> np.ndarray:
    """``convert("L")`` of images of one size, side by side: ``(H, n, W)`` uint8.

    Each image is converted by Pillow's C core (what ``Image.convert("L")`` runs, without its
    per-call Python overhead, for modes where it does nothing else) and pasted into one wide
    canvas, which is read out in one call.
    """
    w, h = images[0].size
    canvas = Image.new("L", (w * len(images), h))
    core = canvas.im
    for i, im in enumerate(images):
        gray = None
        if im.mode not in _INDIRECT_MODES:
            with contextlib.suppress(ValueError):  # Pillow then converts via another mode
                gray = im.im.convert("L", Image.Dither.FLOYDSTEINBERG)
        if gray is None:
            gray = im.convert("L").im
        core.paste(gray, (i * w, 0, (i + 1) * w, h))
    return np.frombuffer(canvas.tobytes(), dtype=np.uint8).reshape(h, len(images), w)


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
