"""Property tests for the request parsers: image bytes, base64 images, latent vectors and interpolation.

Every input either parses to exactly the documented array or raises a VaeError carrying a 4xx status; no
other exception may escape to become a 500.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from app.errors import CorruptImage, VaeError
from app.images import (
    PILLOW_DATA_ERRORS,
    PNG_SIGNATURE,
    _plain_png,
    _png_chunk,
    decode_images,
    encode_pngs,
    read_image_header,
)
from app.inputs import _base64_image
from app.latents import interpolate, latents_array

MODEL_SHAPES = [(1, 28, 28), (3, 32, 32)]
MAX_IMAGE_PIXELS = 128 * 128
LATENT_DIM = 8
# Bounded, deadline-free settings: the machine is shared and loaded, so timing must not fail a test.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
IMAGES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
LATENTS = settings(max_examples=200, deadline=None, database=None)


def encode(image: Image.Image, format_name: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format_name)
    return buffer.getvalue()


def seed_images() -> list[bytes]:
    """One small valid file per accepted format: mutations of these reach past the signature checks."""
    rgb = Image.fromarray(np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3))
    return [encode(rgb, name) for name in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")] + [
        encode(rgb.convert("P"), "PNG"),
        encode(Image.new("I;16", (5, 6), 40000), "PNG"),
    ]


SEEDS = seed_images()


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """A valid image file truncated, with bytes overwritten, and/or with junk appended."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    data = data[: draw(st.integers(0, len(data)))]
    return bytes(data) + draw(st.binary(max_size=32))


def assert_model_batch(batch: np.ndarray, count: int, shape: tuple[int, int, int]) -> None:
    assert batch.shape == (count, *shape)
    assert batch.dtype == np.float32
    assert np.isfinite(batch).all()
    assert batch.min() >= 0.0 and batch.max() <= 1.0


# Damaged files that once made Pillow raise ValueError/TypeError past the parser (a 500 on /encode).
PNG_TRUNCATED_IHDR = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x04IHDR\x00\x00\x00\x05"
TIFF_TEXT_STRIP_OFFSETS = (  # a 5x6 RGB TIFF whose StripOffsets tag (0x111) has type ASCII instead of LONG
    b"II*\x00\x08\x00\x00\x00\n\x00\x00\x01\x04\x00\x01\x00\x00\x00\x05\x00\x00\x00\x01\x01\x04\x00"
    b"\x01\x00\x00\x00\x06\x00\x00\x00\x02\x01\x03\x00\x03\x00\x00\x00\x86\x00\x00\x00\x03\x01\x03\x00"
    b"\x01\x00\x00\x00\x01\x00\x00\x00\x06\x01\x03\x00\x01\x00\x00\x00\x02\x00\x00\x00\x11\x01\x02\x00"
    b"\x01\x00\x00\x00\x8c\x00\x00\x00\x15\x01\x03\x00\x01\x00\x00\x00\x03\x00\x00\x00\x16\x01\x04\x00"
    b"\x01\x00\x00\x00\x06\x00\x00\x00\x17\x01\x04\x00\x01\x00\x00\x00Z\x00\x00\x00\x1c\x01\x03\x00"
    b"\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x08\x00\x08\x00\x08\x00"
)


def decode_or_4xx(data: bytes, shape: tuple[int, int, int]) -> None:
    try:
        batch = decode_images([data], shape, MAX_IMAGE_PIXELS)
    except VaeError as error:
        assert 400 <= error.status < 500, f"{type(error).__name__} has status {error.status}"
    else:
        assert_model_batch(batch, 1, shape)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damaged TIFF tags it skips
@FUZZ
@given(data=st.binary(max_size=512) | damaged_images(), shape=st.sampled_from(MODEL_SHAPES))
@example(data=b"", shape=(1, 28, 28))
@example(data=b"\x89PNG\r\n\x1a\n", shape=(1, 28, 28))
def test_any_bytes_decode_to_the_model_shape_or_raise_a_4xx_vae_error(
    data: bytes, shape: tuple[int, int, int]
) -> None:
    decode_or_4xx(data, shape)


PNG_MODES = ["L", "LA", "RGB", "RGBA", "P", "I;16"]


@st.composite
def valid_images(draw: st.DrawFn) -> tuple[Image.Image, str]:
    """A random-pixel image of a random size and mode, and a format that stores that mode."""
    format_name = draw(st.sampled_from(["PNG", "JPEG"]))
    mode = draw(st.sampled_from(PNG_MODES if format_name == "PNG" else ["L", "RGB"]))
    width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        bands = len(mode) if mode != "P" else 1
        pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
        image = Image.fromarray(pixels[:, :, 0] if bands == 1 else pixels, "L" if mode == "P" else mode)
        if mode == "P":
            image = image.convert("RGB").quantize(colors=draw(st.integers(2, 256)))
            if draw(st.booleans()):
                image.info["transparency"] = 0
    return image, format_name


@IMAGES
@given(image_and_format=valid_images(), shape=st.sampled_from(MODEL_SHAPES))
def test_valid_png_and_jpeg_of_any_size_and_mode_decode_to_the_model_shape(
    image_and_format: tuple[Image.Image, str], shape: tuple[int, int, int]
) -> None:
    image, format_name = image_and_format
    data = encode(image, format_name)
    assert_model_batch(decode_images([data, data], shape, MAX_IMAGE_PIXELS), 2, shape)


@IMAGES
@given(
    mode=st.sampled_from(["L", "RGB", "I;16"]),
    level=st.integers(0, 255),
    size=st.tuples(st.integers(1, 64), st.integers(1, 64)),
    shape=st.sampled_from(MODEL_SHAPES),
)
def test_a_solid_png_decodes_to_its_exact_level(
    mode: str, level: int, size: tuple[int, int], shape: tuple[int, int, int]
) -> None:
    """Resizing a constant image keeps it constant; 16-bit levels are scaled by 1/257 and rounded."""
    colour = level * 257 if mode == "I;16" else (level, level, level) if mode == "RGB" else level
    data = encode(Image.new(mode, size, colour), "PNG")
    batch = decode_images([data], shape, MAX_IMAGE_PIXELS)
    np.testing.assert_array_equal(batch, np.full((1, *shape), np.float32(level) * np.float32(1 / 255)))


def pillow_decoded(data: bytes) -> tuple[str, np.ndarray] | None:
    """Mode and pixels by Pillow's general PNG path, or None where it refuses the bytes or the size."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                return None
            image.load()
            return image.mode, np.asarray(image)
    except (*PILLOW_DATA_ERRORS, UnidentifiedImageError, Image.DecompressionBombError):
        return None


def with_chunk_damage(data: bytes, draw: st.DrawFn) -> bytes:
    """Overwrite bytes inside one chunk and fix its checksum, so the damage reaches past the CRC check."""
    offsets, offset = [], len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        offsets.append(offset)
        offset += 12 + int.from_bytes(data[offset : offset + 4], "big")
    start = draw(st.sampled_from(offsets))
    length = int.from_bytes(data[start : start + 4], "big")
    body = bytearray(data[start + 8 : start + 8 + length])
    for _ in range(draw(st.integers(1, 3)) if body else 0):
        body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
    return data[:start] + _png_chunk(data[start + 4 : start + 8], bytes(body)) + data[start + 12 + length :]


@st.composite
def pngs(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A PNG by Pillow (any mode and compress level) or by the service's writer, and whether it is intact."""
    if draw(st.booleans()):
        image, _ = draw(valid_images().filter(lambda pair: pair[1] == "PNG"))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=draw(st.integers(0, 9)))
        data = buffer.getvalue()
    else:
        shape = (1, draw(st.sampled_from([1, 3])), draw(st.integers(1, 40)), draw(st.integers(1, 40)))
        data = encode_pngs(np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(shape))[0]
    damage = draw(st.sampled_from(["none", "chunk", "bytes", "cut"]))
    if damage == "chunk":
        data = with_chunk_damage(data, draw)
    elif damage == "bytes":  # checksums left as they were
        damaged = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            damaged[draw(st.integers(0, len(damaged) - 1))] = draw(st.integers(0, 255))
        data = bytes(damaged)
    elif damage == "cut":
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=16))
    return data, damage == "none"


def flipped(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1 :]


GRAY_PNG = encode_pngs(np.linspace(0, 1, 30).reshape(1, 1, 5, 6))[0]


def with_idat_split(data: bytes) -> bytes:
    """The same PNG with its one IDAT chunk cut in two, and an empty IDAT between the halves."""
    header_end = len(PNG_SIGNATURE) + 25
    idat_length = int.from_bytes(data[header_end : header_end + 4], "big")
    compressed = data[header_end + 8 : header_end + 8 + idat_length]
    half = len(compressed) // 2
    idats = (
        _png_chunk(b"IDAT", compressed[:half])
        + _png_chunk(b"IDAT", b"")
        + _png_chunk(b"IDAT", compressed[half:])
    )
    return data[:header_end] + idats + data[header_end + 12 + idat_length :]


# A damaged header can claim a huge size, and Pillow's own path (the reference) warns about it as it reads it.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@settings(IMAGES, max_examples=300)
@given(png=pngs())
@example(png=(flipped(GRAY_PNG, len(PNG_SIGNATURE) + 8 + 13), False))  # IHDR checksum: Pillow refuses
@example(png=(flipped(GRAY_PNG, len(GRAY_PNG) - 13), False))  # the IDAT checksum, which Pillow ignores
@example(png=(with_idat_split(GRAY_PNG), True))
def test_plain_png_fast_path_decodes_exactly_as_pillow(png: tuple[bytes, bool]) -> None:
    """Where the fast path takes a PNG, Pillow's general path gives the same mode and pixels, and every
    intact 8-bit gray or RGB PNG without transparency is taken; the rest go to Pillow."""
    data, intact = png
    fast = _plain_png(data, MAX_IMAGE_PIXELS)
    expected = pillow_decoded(data)
    if fast is not None:
        assert expected is not None, "the fast path decoded a PNG that Pillow refuses"
        assert fast.mode == expected[0]
        np.testing.assert_array_equal(np.asarray(fast), expected[1])
    elif intact and expected is not None and expected[0] in ("L", "RGB"):
        with Image.open(io.BytesIO(data)) as image:
            assert "transparency" in image.info, "an intact plain PNG was left to Pillow"


def test_plain_pngs_are_decoded_at_once_only_within_the_pixel_budget() -> None:
    """Past `decode_max_pixels` (what the event loop may still decode) a plain PNG is opened lazily, to be
    decoded off the loop; within it, it comes back decoded, and the two give the same pixels."""
    decoded = read_image_header(GRAY_PNG, MAX_IMAGE_PIXELS, decode_max_pixels=30)
    lazy = read_image_header(GRAY_PNG, MAX_IMAGE_PIXELS, decode_max_pixels=29)
    assert not isinstance(decoded, PngImagePlugin.PngImageFile) and decoded.size == (6, 5)
    assert isinstance(lazy, PngImagePlugin.PngImageFile)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(lazy))


@FUZZ
@given(payload=st.binary(max_size=64), data_url=st.booleans())
def test_base64_images_round_trip_with_or_without_a_data_url(payload: bytes, data_url: bool) -> None:
    text = base64.b64encode(payload).decode("ascii")
    assert _base64_image(f"data:image/png;base64,{text}" if data_url else text, "start") == payload


@FUZZ
@given(text=st.text(max_size=64))
def test_any_string_is_base64_bytes_or_a_4xx_vae_error(text: str) -> None:
    try:
        assert isinstance(_base64_image(text, "start"), bytes)
    except VaeError as error:
        assert error.status == 422


special_floats = st.sampled_from([np.nan, np.inf, -np.inf, 3.5e38, -3.5e38, 1e308, 3.4e38, -0.0, 5e-324])
latent_values = st.floats(allow_nan=True, allow_infinity=True) | special_floats
latent_rows = st.lists(
    st.lists(latent_values, min_size=LATENT_DIM - 1, max_size=LATENT_DIM + 1) | st.lists(latent_values),
    max_size=8,
)


@LATENTS
@given(rows=latent_rows)
@example(rows=[[1.0] * LATENT_DIM, [1.0] * (LATENT_DIM - 1)])
def test_latent_lists_parse_to_finite_float32_or_raise_a_4xx_vae_error(rows: list[list[float]]) -> None:
    try:
        latents = latents_array(rows, LATENT_DIM)
    except VaeError as error:
        assert error.status == 422
        well_formed = all(len(row) == LATENT_DIM for row in rows)
        with np.errstate(over="ignore"):  # values beyond float32 become inf, as in the parser
            as_float32 = np.array(rows, dtype=np.float64).astype(np.float32) if well_formed else None
        assert as_float32 is None or not np.isfinite(as_float32).all()
    else:
        assert latents.shape == (len(rows), LATENT_DIM)
        assert latents.dtype == np.float32
        assert np.isfinite(latents).all()
        np.testing.assert_array_equal(
            latents, np.array(rows, dtype=np.float32).reshape(len(rows), LATENT_DIM)
        )


moderate = st.floats(-1e3, 1e3, allow_nan=False, width=32)
vectors = st.lists(moderate, min_size=LATENT_DIM, max_size=LATENT_DIM).map(lambda v: np.array(v, np.float32))
steps_counts = st.integers(2, 64)
methods = st.sampled_from(["linear", "slerp"])


@LATENTS
@given(start=vectors, end=vectors, steps=steps_counts, method=methods)
def test_interpolation_has_steps_frames_starting_and_ending_exactly_at_the_endpoints(
    start: np.ndarray, end: np.ndarray, steps: int, method: str
) -> None:
    frames = interpolate(start, end, steps, method)  # type: ignore[arg-type]
    assert frames.shape == (steps, LATENT_DIM)
    assert frames.dtype == np.float32
    assert np.isfinite(frames).all()
    np.testing.assert_array_equal(frames[0], start)
    np.testing.assert_array_equal(frames[-1], end)


@LATENTS
@given(start=vectors, end=vectors, steps=steps_counts)
def test_linear_frames_are_evenly_spaced_on_the_segment(
    start: np.ndarray, end: np.ndarray, steps: int
) -> None:
    frames = interpolate(start, end, steps, "linear").astype(np.float64)
    t = np.linspace(0.0, 1.0, steps)[:, np.newaxis]
    expected = (1 - t) * start.astype(np.float64) + t * end.astype(np.float64)
    np.testing.assert_allclose(frames, expected, rtol=1e-6, atol=1e-6 * (1 + np.abs(expected).max()))


def angle_between(a: np.ndarray, b: np.ndarray) -> float:
    cosine = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.arccos(np.clip(cosine, -1.0, 1.0)))


@LATENTS
@given(start=vectors, end=vectors, scale=st.floats(0.1, 100.0), steps=st.integers(3, 32))
def test_slerp_between_equal_norms_keeps_the_norm_and_moves_at_constant_angular_speed(
    start: np.ndarray, end: np.ndarray, scale: float, steps: int
) -> None:
    a, b = start.astype(np.float64), end.astype(np.float64)
    assume(np.linalg.norm(a) > 1e-3 and np.linalg.norm(b) > 1e-3)
    a, b = scale * a / np.linalg.norm(a), scale * b / np.linalg.norm(b)
    assume(np.sin(angle_between(a, b)) > 1e-3)  # (anti)parallel pairs fall back to linear, by design
    frames = interpolate(a.astype(np.float32), b.astype(np.float32), steps, "slerp").astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(frames, axis=1), scale, rtol=1e-5)
    steps_taken = [angle_between(frames[i], frames[i + 1]) for i in range(steps - 1)]
    np.testing.assert_allclose(steps_taken, angle_between(a, b) / (steps - 1), atol=1e-4)


def test_slerp_frame_norms_stay_between_the_endpoint_norms() -> None:
    start = np.array([1.0, 0.0], np.float32)
    end = np.array([-2.0, 0.001], np.float32)
    norms = np.linalg.norm(interpolate(start, end, 5, "slerp").astype(np.float64), axis=1)
    assert np.all((norms >= 1.0 - 1e-6) & (norms <= np.linalg.norm(end) + 1e-6)), norms


def test_a_png_with_a_truncated_header_chunk_is_a_corrupt_image() -> None:
    with pytest.raises(CorruptImage):
        decode_images([PNG_TRUNCATED_IHDR], (1, 28, 28), MAX_IMAGE_PIXELS)


def test_a_tiff_with_text_strip_offsets_is_a_corrupt_image() -> None:
    with pytest.raises(CorruptImage):
        decode_images([TIFF_TEXT_STRIP_OFFSETS], (1, 28, 28), MAX_IMAGE_PIXELS)
