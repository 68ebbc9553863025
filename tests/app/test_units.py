"""Pure helpers: image conversion and PNG encoding, latent validation, sampling and interpolation."""

from __future__ import annotations

import gc
import io
import sys

import numpy as np
import pytest
from PIL import Image

from app.errors import ImageTooLarge, InvalidLatents, NonFiniteValues
from app.images import decode_images, encode_png_grid, encode_pngs, grid_shape, to_uint8
from app.latents import draw_latents, interpolate, latents_array, reparameterize
from app.responses import wants_png
from app.server.process import GIL_SWITCH_INTERVAL_SECONDS, YOUNG_GENERATION_THRESHOLD, tune_interpreter


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_png_encoding_rounds_to_uint8() -> None:
    images = np.array([[[[0.0, 0.5, 1.0, 0.502, 0.0019]]]], dtype=np.float32)  # (1, 1, 1, 5)
    decoded = np.asarray(Image.open(io.BytesIO(encode_pngs(images)[0])))
    assert decoded.tolist() == [[0, 128, 255, 128, 0]]


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_pngs_decode_to_the_exact_pixels(channels: int, mode: str) -> None:
    images = np.random.default_rng(0).random((3, channels, 5, 7), dtype=np.float32)
    for png, expected in zip(encode_pngs(images), to_uint8(images), strict=True):
        decoded = Image.open(io.BytesIO(png))
        assert decoded.mode == mode and decoded.size == (7, 5)
        assert np.array_equal(np.asarray(decoded).reshape(expected.shape), expected)


def test_alpha_is_composited_onto_black_for_rgb_models() -> None:
    half_transparent_red = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    converted = decode_images([png(half_transparent_red)], (3, 4, 4), 1000)
    assert np.allclose(converted[0, :, 0, 0], [128 / 255, 0, 0])
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 255, 255] * 256)
    palette.info["transparency"] = 0
    assert decode_images([png(palette)], (1, 4, 4), 1000).max() == 0


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    wide = (np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4)  # 0 .. 65535
    converted = decode_images([png(Image.fromarray(wide))], (1, 4, 4), 1000)
    np.testing.assert_allclose(converted[0, 0], np.rint(wide / 257) / 255, atol=1e-6)


def test_pixel_limit_counts_width_times_height() -> None:
    with pytest.raises(ImageTooLarge, match="8x8 = 64 pixels; at most 63"):
        decode_images([png(Image.new("L", (8, 8)))], (1, 4, 4), 63)
    assert decode_images([png(Image.new("L", (8, 8)))], (1, 4, 4), 64).shape == (1, 1, 4, 4)


@pytest.mark.parametrize(
    ("count", "expected"), [(1, (1, 1)), (2, (1, 2)), (5, (2, 3)), (16, (4, 4)), (17, (4, 5))]
)
def test_grid_is_near_square(count: int, expected: tuple[int, int]) -> None:
    assert grid_shape(count) == expected


@pytest.mark.parametrize(
    ("count", "columns", "expected"), [(6, 3, (2, 3)), (6, 1, (6, 1)), (6, 10, (1, 6)), (7, 2, (4, 2))]
)
def test_grid_columns_set_its_width(count: int, columns: int, expected: tuple[int, int]) -> None:
    assert grid_shape(count, columns) == expected


def test_one_image_is_its_own_png_without_padding() -> None:
    image = np.random.default_rng(0).random((1, 3, 4, 4)).astype(np.float32)
    picture = Image.open(io.BytesIO(encode_png_grid(image)))
    assert picture.mode == "RGB" and picture.size == (4, 4)
    np.testing.assert_array_equal(np.asarray(picture), to_uint8(image)[0])


def test_grid_with_columns_lays_tiles_row_by_row() -> None:
    tiles = np.stack([np.full((1, 2, 2), k / 5, np.float32) for k in range(6)])
    grid = np.asarray(Image.open(io.BytesIO(encode_png_grid(tiles, columns=3, padding=1))))
    assert grid.shape == (1 + 2 * 3, 1 + 3 * 3)
    for k in range(6):
        row, column = divmod(k, 3)
        assert grid[1 + 3 * row, 1 + 3 * column] == round(k / 5 * 255)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [("image/png", True), ("image/*", True), ("*/*", False), ("", False), ("application/json", False),
     ("application/json, image/png;q=0.5", False), ("image/png, application/json;q=0.9", True)],
)  # fmt: skip
def test_accept_negotiation(accept: str, expected: bool) -> None:
    assert wants_png(accept) is expected


def test_latent_validation() -> None:
    assert latents_array([[1, 2], [3, 4]], 2).dtype == np.float32
    with pytest.raises(
        InvalidLatents, match=r"latents\[1\] has 1 values; this model's latent vectors have 2"
    ):
        latents_array([[1, 2], [3]], 2)
    with pytest.raises(NonFiniteValues):
        latents_array([[1, float("nan")]], 2)
    with pytest.raises(NonFiniteValues):
        latents_array([[1, 1e39]], 2)


def test_seeded_sampling_and_reparameterization() -> None:
    expected = (np.random.default_rng(3).standard_normal((2, 4)) * 0.5).astype(np.float32)
    latents, prior = draw_latents(None, 4, 2, seed=3, temperature=0.5)
    assert prior == "standard" and np.array_equal(latents, expected)
    mean, log_var = np.ones((1, 4), np.float32), np.zeros((1, 4), np.float32)
    eps = np.random.default_rng(9).standard_normal((1, 4)).astype(np.float32)
    assert np.array_equal(reparameterize(mean, log_var, 9), mean + eps)


def test_interpolation_includes_both_endpoints_exactly() -> None:
    start = np.array([0.1, 0.2, 0.3], np.float32)
    end = np.array([-1.0, 0.7, 2.0], np.float32)
    for method in ("linear", "slerp"):
        frames = interpolate(start, end, 6, method)  # type: ignore[arg-type]
        assert frames.shape == (6, 3) and frames.dtype == np.float32
        assert np.array_equal(frames[0], start) and np.array_equal(frames[-1], end)


def test_slerp_keeps_the_norm_between_orthogonal_unit_vectors() -> None:
    frames = interpolate(np.array([1, 0], np.float32), np.array([0, 1], np.float32), 5, "slerp")
    np.testing.assert_allclose(np.linalg.norm(frames, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(frames[2], [np.sqrt(0.5), np.sqrt(0.5)], atol=1e-6)


def test_slerp_falls_back_to_linear_for_parallel_and_zero_vectors() -> None:
    start = np.array([1.0, 2.0], np.float32)
    for end in (2 * start, -start, np.zeros(2, np.float32)):
        np.testing.assert_array_equal(
            interpolate(start, end, 4, "slerp"), interpolate(start, end, 4, "linear")
        )


def test_interpreter_tuning_freezes_the_start_up_heap_and_shortens_the_switch_interval() -> None:
    threshold, switch_interval = gc.get_threshold(), sys.getswitchinterval()
    try:
        tune_interpreter()
        assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, *threshold[1:])
        assert gc.get_freeze_count() > 0
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_SECONDS)
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        sys.setswitchinterval(switch_interval)
