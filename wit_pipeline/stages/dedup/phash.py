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

From encoded bytes (``PHasher.hash_bytes``) decoding is most of the cost. ``decode="draft"``
lets libjpeg do the first part of the work while decoding: grayscale output (its Y channel
instead of Pillow's RGB -> L) and DCT scaling by 1/2, 1/4 or 1/8 down to no less than
``DRAFT_SIZE`` pixels a side (Pillow's ``Image.draft``); the rest is the same resize and DCT.
Those hashes are not imagehash's bits: they differ from the exact ones by a fraction of a bit
on average (BENCHMARKS.md measures it, with its effect on near-duplicate groups).
``decode="exact"`` decodes fully and gives imagehash's hash. Non-JPEG images are decoded
fully either way.
"""

from __future__ import annotations

import collections
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
# Images, sorted by size, are hashed in chunks of about this many pixels.
_CHUNK_PIXELS = 1 << 20
# Images decoded by ``hash_bytes`` before they are hashed (bounds its memory).
_DECODED_PIXELS = 1 << 22
# Resampling weights kept per ``PHasher`` (one per image side length seen; least recently used
# dropped first).
_MAX_AXES = 512
# Scratch buffers larger than this are not kept from one batch to the next.
_MAX_SCRATCH_BYTES = 32 << 20
# Outputs per band of the float32 resampling product (see ``_Axis``).
_BAND = 8
# Above this error margin (about 2% of roundings unsure) the float32 path is not worth it.
_MAX_FLOAT32_EPS = 1e-2
# How ``PHasher.hash_bytes`` decodes: fully ("exact", imagehash's bits) or with libjpeg's
# grayscale output and DCT scaling ("draft").
DECODES = ("exact", "draft")
# "draft" decodes JPEGs to no less than this many pixels a side (twice the 32 px the hash
# resizes to, so that the Lanczos filter still averages over real pixels).
DRAFT_SIZE = 64
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


def _round_clip8_checked(
    approx: np.ndarray, eps: float, scratch: _Scratch | None = None, tag: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """``_round_clip8`` of a float32 approximation within ``eps`` of the exact value.

    Returns ``(rounded, unsure)``. ``unsure`` marks the entries where ``approx - eps`` and
    ``approx + eps`` round differently; every other entry of ``rounded`` is exact (see
    ``_Axis``). ``approx`` is overwritten.
    """
    rounded = _empty(scratch, f"{tag}rounded", approx.shape, np.float32)
    unsure = _empty(scratch, f"{tag}unsure", approx.shape, np.bool_)
    np.add(approx, np.float32(0.5 + eps), out=rounded)
    np.floor(rounded, out=rounded)
    # Certain iff approx + 0.5 - eps has the same floor, i.e. rounded - approx <= 0.5 - eps.
    np.subtract(rounded, approx, out=approx)
    np.greater(approx, np.float32(0.5 - eps), out=unsure)
    np.clip(rounded, 0, 255, out=rounded)
    return rounded, unsure


class _Scratch:
    """Buffers reused from batch to batch.

    Fresh arrays of a few MB are mapped from the OS and page-faulted in on every batch (glibc
    returns them when freed); that cost a quarter of the time of hashing 96 px photos.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        size = math.prod(shape)
        dt = np.dtype(dtype)
        if size * dt.itemsize > _MAX_SCRATCH_BYTES:  # a huge image: do not keep it
            return np.empty(shape, dtype=dt)
        buf = self._buffers.get((name, dt.str))
        if buf is None or buf.size < size:
            buf = self._buffers[(name, dt.str)] = np.empty(size, dtype=dt)
        return buf[:size].reshape(shape)


def _empty(scratch: _Scratch | None, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.empty(shape, dtype=dtype) if scratch is None else scratch.get(name, shape, dtype)


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
            return cls(exact, (), None, starts, compact)

        def band(j0: int, j1: int) -> _Band:
            lo, hi = int(first[j0:j1].min()), int(last[j0:j1].max()) + 1
            return _Band(j0, lo, hi, exact[j0:j1, lo:hi].T.astype(np.float32, order="C"))

        bands = [band(j0, j0 + _BAND) for j0 in range(0, IMG_SIZE, _BAND)]
        if sum(_BAND * (b.hi - b.lo) for b in bands) > 0.75 * exact.size:
            bands = [band(0, IMG_SIZE)]
        return cls(exact, tuple(bands), eps, starts, compact)

    def resize_rows(
        self, x: np.ndarray, scratch: _Scratch | None = None, tag: str = ""
    ) -> np.ndarray:
        """``(r, size)`` 8-bit values (float32) -> ``(r, 32)`` float32, each row resampled.

        With ``scratch``, the result lives in its buffers named after ``tag``.
        """
        if self.eps is None:
            return _round_clip8(x.astype(np.float64) @ self.exact.T).astype(np.float32)
        out = _empty(scratch, f"{tag}product", (x.shape[0], IMG_SIZE), np.float32)
        width = self.width
        for b in self.bands:
            np.matmul(x[:, b.lo : b.hi], b.single, out=out[:, b.j0 : b.j0 + width])
        out, unsure = _round_clip8_checked(out, self.eps, scratch, tag)
        unsure = np.flatnonzero(unsure)
        if unsure.size:  # a few per image: recompute just those entries in float64
            rows, cols = np.divmod(unsure, IMG_SIZE)
            inputs = x[rows[:, None], self.starts[cols][:, None] + self._window]
            exact = np.einsum("ek,ek->e", inputs.astype(np.float64), self.compact[cols])
            out.ravel()[unsure] = _round_clip8(exact)
        return out

    def resize_columns(
        self, x: np.ndarray, scratch: _Scratch | None = None, tag: str = ""
    ) -> np.ndarray:
        """``(size, c)`` 8-bit values (float32) -> ``(32, c)`` float32, each column resampled."""
        if self.eps is None:
            return _round_clip8(self.exact @ x.astype(np.float64)).astype(np.float32)
        c = x.shape[1]
        out = _empty(scratch, f"{tag}product", (IMG_SIZE, c), np.float32)
        width = self.width
        for b in self.bands:
            np.matmul(b.single.T, x[b.lo : b.hi], out=out[b.j0 : b.j0 + width])
        out, unsure = _round_clip8_checked(out, self.eps, scratch, tag)
        unsure = np.flatnonzero(unsure)
        if unsure.size:
            rows, cols = np.divmod(unsure, c)
            inputs = x[self.starts[rows][:, None] + self._window, cols[:, None]]
            exact = np.einsum("ek,ek->e", inputs.astype(np.float64), self.compact[rows])
            out.ravel()[unsure] = _round_clip8(exact)
        return out


class PHasher:
    """Computes pHashes for batches of images; caches resampling weights per side length.

    Not thread-safe (the cache); build one per worker (e.g. in ``DoFn.setup``). ``decode``
    says how ``hash_bytes`` decodes JPEGs (``DECODES``; module docstring).
    """

    def __init__(self, decode: str = "exact") -> None:
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
        self.decode = decode
        self._axes: collections.OrderedDict[int, _Axis] = collections.OrderedDict()
        self._scratch = _Scratch()
        n = np.arange(IMG_SIZE)
        k = np.arange(HASH_SIZE)
        # scipy.fftpack.dct type II, norm=None: y_k = 2 * sum_n x_n cos(pi k (2n + 1) / (2N)).
        self._dct = 2.0 * np.cos(np.pi * np.outer(k, 2 * n + 1) / (2 * IMG_SIZE))

    def _axis(self, size: int) -> _Axis:
        axis = self._axes.get(size)
        if axis is None:
            axis = self._axes[size] = _Axis.build(size)
            if len(self._axes) > _MAX_AXES:  # least recently used first
                del self._axes[next(iter(self._axes))]
        else:
            self._axes.move_to_end(size)
        return axis

    def _resize(self, canvas: np.ndarray) -> np.ndarray:
        """``(H, n, W)`` 8-bit grayscale -> ``(n, 32, 32)`` float32, as Pillow resizes each image.

        The result may be a view of a scratch buffer: valid until the next call.
        """
        return self._resize_side_by_side(canvas).reshape(IMG_SIZE, -1, IMG_SIZE).transpose(1, 0, 2)

    def _resize_side_by_side(self, canvas: np.ndarray) -> np.ndarray:
        """``(H, n, W)`` 8-bit grayscale -> ``(32, n * 32)`` float32, still side by side.

        The input holds ``n`` images side by side (row ``r`` of all of them, then row ``r + 1``),
        so that the rows pass reads it as ``(H * n, W)`` and writes ``(H, n * 32)``, which is
        what the columns pass reads: no transposes in between.
        """
        h, n, w = canvas.shape
        # Each pass writes to its own buffers (tags 1, 2), so a pass never overwrites its input.
        x = self._scratch.get("input", (h, n * w), np.float32)
        np.copyto(x, canvas.reshape(h, n * w))
        # Pillow resizes very tall images (height > 100 x width) vertically first, else
        # horizontally first; a pass whose size does not change is skipped.
        tall = h > 100 * w and h > IMG_SIZE
        if tall:
            x = self._axis(h).resize_columns(x, self._scratch, "1")
            h = IMG_SIZE
        if w != IMG_SIZE:
            x = self._axis(w).resize_rows(x.reshape(h * n, w), self._scratch, "2")
        if h != IMG_SIZE:
            x = self._axis(h).resize_columns(x.reshape(h, n * IMG_SIZE), self._scratch, "1")
        return x.reshape(IMG_SIZE, n * IMG_SIZE)

    def _hash_side_by_side(self, pixels: np.ndarray) -> np.ndarray:
        """pHashes of ``(32, n * 32)`` resized images side by side -> ``(n,)`` uint64.

        Side by side, each of the two DCT products is one matrix product for the whole batch.
        """
        n = pixels.shape[1] // IMG_SIZE
        if n == 0:
            return np.zeros(0, dtype=np.uint64)
        rows = self._dct @ pixels.astype(np.float64)  # (8, n * 32)
        coef = rows.reshape(HASH_SIZE * n, IMG_SIZE) @ self._dct.T  # (8 * n, 8): [u, image, v]
        coef = coef.reshape(HASH_SIZE, n, HASH_SIZE).transpose(1, 0, 2).reshape(n, -1)
        med = _median64(coef)
        margin = np.abs(coef - med[:, None]).min(axis=1)
        unsure = np.flatnonzero(margin < _MEDIAN_MARGIN)
        if unsure.size:
            import scipy.fftpack

            images = pixels.reshape(IMG_SIZE, n, IMG_SIZE)[:, unsure].transpose(1, 0, 2)
            exact = images.astype(np.uint8).astype(np.float64)
            d = scipy.fftpack.dct(scipy.fftpack.dct(exact, axis=1), axis=2)
            d = d[:, :HASH_SIZE, :HASH_SIZE].reshape(len(unsure), -1)
            coef[unsure] = d
            med[unsure] = _median64(d)
        bits = coef > med[:, None]
        return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)

    def hash_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """pHashes of PIL images (any mode Pillow can convert to ``L``) -> ``(n,)`` uint64."""
        for im in images:
            if getattr(im, "tile", None):  # opened lazily, not decoded yet: as ``convert`` does
                im.load()
        # Sorted by size, so that a chunk holds few distinct widths and heights.
        order = sorted(range(len(images)), key=lambda i: images[i].size)
        out = np.zeros(len(images), dtype=np.uint64)
        chunk: list[int] = []
        pixels = 0
        for i in order:
            chunk.append(i)
            w, h = images[i].size
            pixels += w * h
            if pixels >= _CHUNK_PIXELS:
                out[chunk] = self._hash_chunk([images[k] for k in chunk])
                chunk, pixels = [], 0
        if chunk:
            out[chunk] = self._hash_chunk([images[k] for k in chunk])
        return out

    def _hash_chunk(self, images: Sequence[Image.Image]) -> np.ndarray:
        """pHashes of loaded images of any sizes.

        Images of one size form a block, side by side (row ``r`` of each, then row ``r + 1``).
        The rows pass runs once per distinct width, over all blocks of that width; its output
        for a block is already the columns pass's input layout, and the columns pass runs once
        per distinct height. So photos that share one side (downloads resized to 256 on their
        short side) are batched even when their other side varies.
        """
        n = len(images)
        blocks: dict[tuple[int, int], list[int]] = {}
        for k, im in enumerate(images):
            blocks.setdefault(im.size, []).append(k)
        gray = self._scratch.get(
            "gray", (sum(w * h for w, h in (im.size for im in images)),), np.uint8
        )
        final = self._scratch.get("final", (IMG_SIZE, n, IMG_SIZE), np.float32)
        # Blocks laid out by width, then height: the blocks of one width are next to each other
        # in ``gray`` (and the tall ones, with the largest heights, last among them).
        starts: dict[tuple[int, int], int] = {}
        offset = 0
        for w, h in sorted(blocks):
            starts[w, h] = offset
            idx = blocks[w, h]
            _paste_gray(images, idx, gray[offset : offset + w * h * len(idx)])
            offset += w * h * len(idx)

        by_width: dict[int, list[tuple[int, int]]] = {}
        for w, h in sorted(blocks):
            if h > 100 * w and h > IMG_SIZE:  # Pillow resizes these vertically first
                k = len(blocks[w, h])
                side_by_side = gray[starts[w, h] : starts[w, h] + w * h * k].reshape(h, k, w)
                resized = self._resize_side_by_side(side_by_side)
                final[:, blocks[w, h]] = resized.reshape(IMG_SIZE, k, IMG_SIZE)
            else:
                by_width.setdefault(w, []).append((w, h))

        # Rows pass, once per width, over the (non-tall) blocks of that width at once.
        total_rows = sum(
            size[1] * len(blocks[size]) for sizes in by_width.values() for size in sizes
        )
        resized_rows = self._scratch.get("rows", (total_rows, IMG_SIZE), np.float32)
        rows: dict[tuple[int, int], np.ndarray] = {}  # block -> its (h, k * 32) rows
        y = 0
        for w, sizes in by_width.items():
            first, last = sizes[0], sizes[-1]
            end = starts[last] + w * last[1] * len(blocks[last])
            x = self._scratch.get("chunk", ((end - starts[first]) // w, w), np.float32)
            np.copyto(x, gray[starts[first] : end].reshape(-1, w))
            out = x if w == IMG_SIZE else self._axis(w).resize_rows(x, self._scratch, "w")
            resized_rows[y : y + len(out)] = out
            for size in sizes:
                h, k = size[1], len(blocks[size])
                rows[size] = resized_rows[y : y + h * k].reshape(h, k * IMG_SIZE)
                y += h * k

        # Columns pass, once per height, on the blocks of that height side by side.
        by_height: dict[int, list[tuple[int, int]]] = {}
        for size in rows:
            by_height.setdefault(size[1], []).append(size)
        for h, sizes in by_height.items():
            idx = [k for size in sizes for k in blocks[size]]
            if len(sizes) == 1:
                t = rows[sizes[0]]
            else:
                t = self._scratch.get("columns", (h, len(idx) * IMG_SIZE), np.float32)
                np.concatenate([rows[size] for size in sizes], axis=1, out=t)
            v = t if h == IMG_SIZE else self._axis(h).resize_columns(t, self._scratch, "h")
            final[:, idx] = v.reshape(IMG_SIZE, len(idx), IMG_SIZE)
        return self._hash_side_by_side(final.reshape(IMG_SIZE, n * IMG_SIZE))

    def hash_bytes(self, blobs: Sequence[bytes]) -> tuple[np.ndarray, list[str | None]]:
        """Decode encoded images and hash them.

        Returns ``(hashes, errors)``: ``errors[i]`` is ``None`` when image ``i`` was hashed, else
        a short description of why it could not be decoded (its hash is then 0).
        """
        out = np.zeros(len(blobs), dtype=np.uint64)
        errors: list[str | None] = [None] * len(blobs)
        # Decoded images are hashed every _DECODED_PIXELS, so that memory stays bounded however
        # many blobs come in (a download shard holds thousands).
        images: list[Image.Image] = []
        ok: list[int] = []
        pixels = 0
        draft = self.decode == "draft"
        for i, blob in enumerate(blobs):
            try:
                im = Image.open(io.BytesIO(blob))
                if draft and im.format == "JPEG":
                    im.draft("L", (DRAFT_SIZE, DRAFT_SIZE))
                im.load()
            except Exception as e:  # PIL raises many types for corrupt data
                errors[i] = f"{type(e).__name__}: {e}"[:200]
                continue
            images.append(im)
            ok.append(i)
            pixels += im.size[0] * im.size[1]
            if pixels >= _DECODED_PIXELS:
                out[ok] = self.hash_images(images)
                images, ok, pixels = [], [], 0
        if images:
            out[ok] = self.hash_images(images)
        return out, errors


def _paste_gray(images: Sequence[Image.Image], idx: Sequence[int], out: np.ndarray) -> None:
    """``convert("L")`` of ``images[idx]`` (one size), side by side in ``out`` (``(H, n, W)``).

    Each image is converted by Pillow's C core (what ``Image.convert("L")`` runs, without its
    per-call Python overhead, for modes where it does nothing else) and pasted straight into
    ``out`` through an image that shares its memory (``Image.frombuffer``): no canvas to
    allocate, clear and copy out.
    """
    w, h = images[idx[0]].size
    canvas = Image.frombuffer("L", (w * len(idx), h), memoryview(out), "raw", "L", 0, 1)
    core = canvas.im  # the core writes into ``out``; ``canvas`` itself is read-only
    for i, k in enumerate(idx):
        im = images[k]
        gray = None
        if im.mode not in _INDIRECT_MODES:
            with contextlib.suppress(ValueError):  # Pillow then converts via another mode
                gray = im.im.convert("L", Image.Dither.FLOYDSTEINBERG)
        if gray is None:
            gray = im.convert("L").im
        core.paste(gray, (i * w, 0, (i + 1) * w, h))


def _median64(coef: np.ndarray) -> np.ndarray:
    """Row medians of ``(n, 64)``, computed as ``numpy.median`` does (mean of the middle two)."""
    mid = coef.shape[1] // 2
    part = np.partition(coef, (mid - 1, mid), axis=1)
    return (part[:, mid - 1] + part[:, mid]) / 2


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
