import dataclasses
import io

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from wit_pipeline.stages.dedup import phash


def _ref(images):
    return [str(imagehash.phash(im)) for im in images]


def _ours(images):
    return [phash.to_hex(h) for h in phash.PHasher().hash_images(images)]


def test_identical_to_imagehash_on_flickr8k_photos(shared_data):
    files = sorted((shared_data / "flickr8k" / "images").glob("*.jpg"))[:1500]
    images = [Image.open(f) for f in files]
    assert _ours(images) == _ref(images)


def test_identical_to_imagehash_on_cifar10_test_from_bytes(shared_data):
    table = pq.read_table(shared_data / "cifar10" / "test.parquet").slice(0, 2000)
    blobs = table.column("image").to_pylist()
    hashes, errors = phash.PHasher().hash_bytes(blobs)
    assert errors == [None] * len(blobs)
    ref = [str(imagehash.phash(Image.open(io.BytesIO(b)))) for b in blobs]
    assert [phash.to_hex(h) for h in hashes] == ref


def _edge_images():
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    rgb = Image.fromarray(noise, "RGB")
    gradient = np.tile(np.arange(200, dtype=np.uint8), (120, 1))
    images = {
        "1x1": Image.new("RGB", (1, 1), (200, 10, 30)),
        "2x3": Image.fromarray(noise[:3, :2]),
        "row": Image.fromarray(noise[:1, :70]),
        "column": Image.fromarray(noise[:90, :1]),
        "exactly_32": Image.fromarray(noise[:32, :32]),
        "32_wide": Image.fromarray(noise[:90, :32]),
        "32_high": Image.fromarray(noise[:32, :70]),
        # taller than 100 x width: Pillow resizes vertically first
        "tall": Image.fromarray(rng.integers(0, 256, (700, 5, 3), dtype=np.uint8)),
        "wide": Image.fromarray(rng.integers(0, 256, (5, 700, 3), dtype=np.uint8)),
        "upscale": Image.fromarray(noise[:9, :13]),
        "large": Image.fromarray(rng.integers(0, 256, (700, 1000, 3), dtype=np.uint8)),
        "gray_L": Image.fromarray(gradient, "L"),
        "rgba": Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA"),
        "la": Image.fromarray(noise[:, :, :2].copy(), "LA"),
        "palette": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "bilevel": rgb.convert("1"),
        "int32": Image.fromarray(gradient.astype(np.int32) * 300, "I"),
        "int16": Image.fromarray(gradient.astype(np.uint16) * 200).convert("I;16"),
        "float": Image.fromarray(gradient.astype(np.float32) / 3.0, "F"),
        "cmyk": rgb.convert("CMYK"),
        "ycbcr": rgb.convert("YCbCr"),
        # constant images: every AC coefficient is rounding noise, imagehash's bits come from
        # scipy's FFT noise, which the batched code must reproduce exactly
        "black": Image.new("RGB", (64, 64), (0, 0, 0)),
        "white": Image.new("L", (50, 80), 255),
        "gray": Image.new("RGB", (96, 96), (128, 128, 128)),
        "half": Image.fromarray(np.repeat(np.array([[0, 255]], np.uint8), 64, 0).repeat(32, 1)),
    }
    return images


def test_identical_to_imagehash_on_edge_cases():
    images = _edge_images()
    names = list(images)
    ours = _ours([images[n] for n in names])
    ref = _ref([images[n] for n in names])
    assert dict(zip(names, ours, strict=True)) == dict(zip(names, ref, strict=True))


def test_each_image_alone_equals_the_batch():
    images = list(_edge_images().values())
    batch = phash.PHasher().hash_images(images)
    alone = [phash.phash_image(im) for im in images]
    assert [int(h) for h in batch] == alone


@pytest.mark.parametrize("size", [1, 2, 7, 31, 33, 64, 95, 96, 97, 255, 256, 257, 1000, 5000])
def test_resize_matches_pillow_lanczos(size):
    rng = np.random.default_rng(size)
    for other in (1, 32, 100):
        for shape in ((other, size), (size, other)):
            # three images side by side, as hash_images lays them out
            arrays = rng.integers(0, 256, (3, *shape), dtype=np.uint8)
            got = phash.PHasher()._resize(arrays.transpose(1, 0, 2))
            for a, g in zip(arrays, got, strict=True):
                ref = Image.fromarray(a, "L").resize((32, 32), Image.Resampling.LANCZOS)
                np.testing.assert_array_equal(g.astype(np.uint8), np.asarray(ref))


def _exact_rows(axis, x):
    return phash._round_clip8(x.astype(np.float64) @ axis.exact.T)


@pytest.mark.parametrize("size", [40, 96, 256, 1000])
def test_float32_error_stays_within_the_bound(size):
    axis = phash._Axis.build(size)
    assert axis.eps is not None and axis.eps < 0.01
    x = np.random.default_rng(size).integers(0, 256, (4000, size)).astype(np.float32)
    approx = np.concatenate([x[:, b.lo : b.hi] @ b.single for b in axis.bands], axis=1)
    err = np.abs(approx.astype(np.float64) - x.astype(np.float64) @ axis.exact.T).max()
    assert err < axis.eps / 4  # the bound is a worst case: real errors are far below it
    rounded, unsure = phash._round_clip8_checked(approx.copy(), axis.eps)
    np.testing.assert_array_equal(rounded[~unsure], _exact_rows(axis, x)[~unsure])


@pytest.mark.parametrize("size", [96, 256])
def test_unsure_roundings_are_recomputed_exactly(size):
    # With a margin of 0.3 about 60% of the roundings count as unsure and go through the
    # float64 recomputation, whose result must be Pillow's in every one of them.
    axis = dataclasses.replace(phash._Axis.build(size), eps=0.3)
    x = np.random.default_rng(1).integers(0, 256, (500, size)).astype(np.float32)
    np.testing.assert_array_equal(axis.resize_rows(x), _exact_rows(axis, x))
    t = np.ascontiguousarray(x.T)  # (size, 500): the columns pass
    exact_columns = phash._round_clip8(axis.exact @ t.astype(np.float64))
    np.testing.assert_array_equal(axis.resize_columns(t), exact_columns)


def test_large_downscale_uses_float64():
    axis = phash._Axis.build(5000)
    assert axis.eps is None
    x = np.random.default_rng(2).integers(0, 256, (3, 5000)).astype(np.float32)
    np.testing.assert_array_equal(axis.resize_rows(x), _exact_rows(axis, x))


def test_mixed_modes_of_one_size_share_a_canvas_across_chunks(monkeypatch):
    # 4 images per chunk: chunk boundaries fall between images of different modes, and palette
    # images with different palettes sit next to each other.
    monkeypatch.setattr(phash, "_CHUNK_PIXELS", 4 * 60 * 45)
    rng = np.random.default_rng(3)
    images = []
    for i in range(30):
        rgb = Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8), "RGB")
        mode = ["RGB", "L", "P", "RGBA", "CMYK", "LA", "1", "I"][i % 8]
        if mode == "P":
            images.append(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8 + i))
        elif mode == "I":
            images.append(rgb.convert("L").convert("I"))
        else:
            images.append(rgb.convert(mode))
    tall = [Image.fromarray(rng.integers(0, 256, (500, 4), dtype=np.uint8)) for _ in range(3)]
    images += tall
    assert _ours(images) == _ref(images)


def _noise_images(sizes, seed):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes
    ]


def test_mixed_sizes_share_width_and_height_passes(monkeypatch):
    # Blocks that share a width (rows pass together), share a height (columns pass together),
    # skip a pass (a side of 32), upscale, or resize vertically first (tall), in random order
    # and over several chunks; one hasher for all of it, so scratch buffers are reused.
    monkeypatch.setattr(phash, "_CHUNK_PIXELS", 150_000)
    sizes = [(256, 300), (256, 320), (300, 256), (320, 256), (256, 256), (32, 50), (50, 32)]
    sizes += [(32, 32), (5, 700), (4, 500), (1, 1), (13, 9), (96, 96), (256, 32), (32, 256)]
    rng = np.random.default_rng(4)
    order = rng.permutation(np.repeat(np.arange(len(sizes)), 3))
    images = _noise_images([sizes[i] for i in order], seed=5)
    hasher = phash.PHasher()
    for batch in (images, images[:7], images[7:]):
        got = [phash.to_hex(h) for h in hasher.hash_images(batch)]
        assert got == _ref(batch)
    # one chunk, in the given (unsorted) order
    assert [phash.to_hex(h) for h in hasher._hash_chunk(images)] == _ref(images)


def test_resampling_weights_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(phash, "_MAX_AXES", 3)
    hasher = phash.PHasher()
    for seed, sizes in enumerate(([(40, 50)], [(40, 60)], [(70, 70)])):
        images = _noise_images(sizes, seed)
        assert [phash.to_hex(h) for h in hasher.hash_images(images)] == _ref(images)
        assert len(hasher._axes) <= 3
    assert list(hasher._axes) == [40, 60, 70]  # 50 was the least recently used


def test_bytes_are_decoded_and_hashed_in_slices(monkeypatch):
    monkeypatch.setattr(phash, "_DECODED_PIXELS", 5000)  # a slice every 1-2 images
    blobs = []
    for im in _noise_images([(60, 50), (70, 40), (60, 50), (33, 90)] * 3, seed=6):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        blobs.append(buf.getvalue())
    blobs.insert(3, b"broken")
    hashes, errors = phash.PHasher().hash_bytes(blobs)
    assert [e is None for e in errors] == [i != 3 for i in range(len(blobs))]
    ref = [str(imagehash.phash(Image.open(io.BytesIO(b)))) for i, b in enumerate(blobs) if i != 3]
    assert [phash.to_hex(h) for i, h in enumerate(hashes) if i != 3] == ref


def test_undecodable_bytes_are_reported_not_hashed():
    good = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(good, "PNG")
    hashes, errors = phash.PHasher().hash_bytes([b"not an image", good.getvalue(), b""])
    assert errors[0] is not None and errors[2] is not None and errors[1] is None
    assert phash.to_hex(hashes[1]) == str(imagehash.phash(Image.open(good)))
    assert hashes[0] == 0 and hashes[2] == 0


def test_hex_helpers():
    assert phash.to_hex(0x00FF) == "00000000000000ff"
    assert phash.from_hex("8000000000000001") == (1 << 63) + 1
    assert phash.hamming(0b1011, 0b0001) == 2
    with pytest.raises(ValueError):
        phash.from_hex("abc")
    assert len(phash.PHasher().hash_images([])) == 0


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("size", [None, (256, 192), (192, 256), (300, 300)])
def test_draft_decoding_stays_within_a_bit_or_two_of_the_exact_hash(shared_data, size):
    """``decode="draft"`` (libjpeg's grayscale output and DCT scaling) is not imagehash's
    hash, but close to it on real photos, at the native 96 px and at download sizes."""
    files = sorted((shared_data / "flickr8k" / "images").glob("*.jpg"))[:300]
    blobs = [f.read_bytes() for f in files]
    if size:
        blobs = [_jpeg(Image.open(io.BytesIO(b)).resize(size, Image.BICUBIC)) for b in blobs]
    exact, e_err = phash.PHasher("exact").hash_bytes(blobs)
    draft, d_err = phash.PHasher("draft").hash_bytes(blobs)
    assert e_err == d_err == [None] * len(blobs)
    assert [phash.to_hex(h) for h in exact[:20]] == [
        str(imagehash.phash(Image.open(io.BytesIO(b)))) for b in blobs[:20]
    ]
    dist = [phash.hamming(a, b) for a, b in zip(exact, draft, strict=True)]
    assert max(dist) <= 4
    assert np.mean(dist) < 0.5
    assert sum(d == 0 for d in dist) > 0.6 * len(dist)


def test_draft_decoding_leaves_other_formats_exact():
    images = _noise_images([(60, 50), (256, 192)], seed=3)
    blobs = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        blobs.append(buf.getvalue())
    draft, _ = phash.PHasher("draft").hash_bytes([*blobs, b"broken"])
    exact, _ = phash.PHasher("exact").hash_bytes(blobs)
    assert list(draft[:2]) == list(exact) and draft[2] == 0
    with pytest.raises(ValueError, match="decode must be one of"):
        phash.PHasher("fast")
