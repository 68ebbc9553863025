"""Image bytes <-> model arrays. The one place that touches Pillow.

Uploads are converted to the model's channels and size: alpha is composited onto black, colour becomes
grayscale with Pillow's "L" conversion (ITU-R 601-2 luma) for 1-channel models or "RGB" for 3-channel models,
and the image is stretched to the model's height x width with Pillow's antialiased bilinear filter
(`Image.Resampling.BILINEAR`; the aspect ratio is not kept). Model output is written as PNG after
round(x * 255) to uint8, mode "L" or "RGB".
"""

from __future__ import annotations

import base64
import io
import math
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.errors import CorruptImage, ImageTooLarge, NotAnImage

# Only these decoders ever see uploaded bytes: fewer formats to probe, less parser surface.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
RESAMPLING_FILTER = Image.Resampling.BILINEAR
GRID_PADDING_PIXELS = 2
# Uploads up to this many pixels (about a millisecond of decoding) are decoded on the event loop, where a
# thread hop would cost more than the work; larger ones in a worker thread, so the loop keeps serving.
INLINE_DECODE_MAX_PIXELS = 512 * 512
# Fast zlib level: model outputs are small and the bytes are sent once; the pixels are identical at any level.
PNG_COMPRESS_LEVEL = 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What Pillow's format plugins raise on malformed data, depending on the plugin and where the damage is
# (e.g. ValueError for a short PNG IHDR chunk, TypeError for TIFF tags of the wrong type). Uploads are
# untrusted, so every one of these means "corrupt image", never a server error.
PILLOW_DATA_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    EOFError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    struct.error,
)


# Our own limit (read_image_header) decides; Pillow's bomb check only stops images far past its default, and
# its warning for large ones would repeat ours. Filtered once here: a filter per call costs 1% of /encode.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _format_from_signature(data: bytes) -> str | None:
    """The image format the first bytes announce, to tell a damaged image from something else entirely."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for signature, name in _SIGNATURES if data.startswith(signature)), None)


def read_image_header(
    data: bytes, max_image_pixels: int, decode_max_pixels: int = INLINE_DECODE_MAX_PIXELS
) -> Image.Image:
    """Open image bytes and check the pixel count before anything is decoded: lazily (header only), except
    plain PNGs of at most `decode_max_pixels`, which `_plain_png` decodes at once after the same check."""
    plain = _plain_png(data, min(max_image_pixels, decode_max_pixels))
    if plain is not None:
        return plain
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        format_name = _format_from_signature(data)
        if format_name is not None:
            raise CorruptImage(f"the data starts like a {format_name} image but cannot be read") from None
        raise NotAnImage(
            "the data is not an image in a format the server reads (PNG, JPEG, WebP, GIF, BMP, TIFF)"
        ) from None
    except Image.DecompressionBombError as error:
        raise ImageTooLarge.from_message(f"{error}; at most {max_image_pixels} pixels are allowed") from None
    except PILLOW_DATA_ERRORS as error:
        raise CorruptImage(f"the image header cannot be read: {error}") from None
    width, height = image.size
    if width * height > max_image_pixels:
        raise ImageTooLarge(width, height, max_image_pixels)
    if width == 0 or height == 0:
        raise CorruptImage(f"the image is {width}x{height} pixels; it must not be empty")
    return image


# IHDR of a plain PNG: 8 bits per sample, grayscale (0) or RGB (2), compression 0, filter 0, not interlaced.
_PLAIN_PNG_RAW_MODES = {(8, 0, 0, 0, 0): "L", (8, 2, 0, 0, 0): "RGB"}


def _plain_png(data: bytes, max_pixels: int) -> Image.Image | None:
    """The decoded image, if `data` is a plain PNG of at most `max_pixels`: 8-bit gray or RGB, not
    interlaced, chunks IHDR, IDAT..., IEND only, every checksum right. None for anything else, which then
    takes Pillow's general path.

    Clients mostly send such PNGs; Pillow's Python chunk reader and loader take 3x longer than the C
    decoder they end in, which this calls directly (PIL.Image.frombytes with the "zip" PNG decoder).
    """
    view = memoryview(data)
    header_end = len(PNG_SIGNATURE) + 8 + 13
    if (
        view[: len(PNG_SIGNATURE)] != PNG_SIGNATURE
        or view[len(PNG_SIGNATURE) : len(PNG_SIGNATURE) + 8] != b"\x00\x00\x00\x0dIHDR"
        or len(data) < header_end + 4 + 12  # IHDR's checksum, IEND
        or zlib.crc32(view[len(PNG_SIGNATURE) + 4 : header_end])
        != struct.unpack_from(">I", data, header_end)[0]
    ):
        return None
    width, height, *format_fields = struct.unpack_from(">IIBBBBB", data, len(PNG_SIGNATURE) + 8)
    raw_mode = _PLAIN_PNG_RAW_MODES.get(tuple(format_fields))
    if raw_mode is None or not 0 < width * height <= min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels):
        return None
    compressed: list[memoryview] = []
    offset, kind, length = header_end + 4, b"", -1
    while offset + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        end = offset + 8 + length
        if (
            end + 4 > len(data)
            or zlib.crc32(view[offset + 4 : end]) != struct.unpack_from(">I", data, end)[0]
        ):
            return None
        body, offset = view[offset + 8 : end], end + 4
        if kind == b"IEND":
            break
        if kind != b"IDAT":
            return None
        compressed.append(body)
    if kind != b"IEND" or length != 0 or offset != len(data) or not compressed:
        return None
    try:
        return Image.frombytes(raw_mode, (width, height), b"".join(compressed), "zip", raw_mode)
    except PILLOW_DATA_ERRORS:  # e.g. corrupt or short zlib data: Pillow's general path says what is wrong
        return None


def to_model_array(image: Image.Image, channels: int, height: int, width: int) -> np.ndarray:
    """Decode and convert one opened image to (C, H, W) float32 in [0, 1]."""
    try:
        image.load()
    except PILLOW_DATA_ERRORS as error:
        raise CorruptImage(f"the image data is corrupt or truncated: {error}") from None
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: scale to 8 bits, don't clip
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != (width, height):
        image = image.resize((width, height), RESAMPLING_FILTER)
    pixels = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    return pixels[np.newaxis] if channels == 1 else pixels.transpose(2, 0, 1)


def to_model_batch(images: list[Image.Image], shape: tuple[int, int, int]) -> np.ndarray:
    """Opened images -> (N, C, H, W) float32 in [0, 1] for a model taking images of `shape` (C, H, W)."""
    channels, height, width = shape
    batch = np.empty((len(images), channels, height, width), dtype=np.float32)
    for index, image in enumerate(images):
        batch[index] = to_model_array(image, channels, height, width)
    return batch


def decode_images(blobs: list[bytes], shape: tuple[int, int, int], max_image_pixels: int) -> np.ndarray:
    """Image files -> (N, C, H, W) float32 in [0, 1]: headers checked first, then decoded and converted."""
    return to_model_batch([read_image_header(blob, max_image_pixels) for blob in blobs], shape)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] -> (N, H, W, C) uint8 by round(x * 255)."""
    return np.rint(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bytes(pixels: np.ndarray) -> bytes:
    """(H, W, C) uint8 with C in {1, 3} -> PNG bytes, 8-bit grayscale or RGB.

    Written directly (signature, IHDR, one IDAT of unfiltered rows, IEND): Pillow's writer spends about
    100 us of Python per image, more than compressing a 28x28 digit.
    """
    height, width, channels = pixels.shape
    rows = np.zeros((height, 1 + width * channels), dtype=np.uint8)  # each row: filter type 0, then pixels
    rows[:, 1:] = pixels.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), PNG_COMPRESS_LEVEL)),
            _png_chunk(b"IEND", b""),
        )
    )


def encode_pngs(images: np.ndarray) -> list[bytes]:
    """(N, C, H, W) float in [0, 1] -> one PNG per image."""
    return [_png_bytes(pixels) for pixels in to_uint8(images)]


def encode_base64_pngs(images: np.ndarray) -> list[str]:
    """(N, C, H, W) float in [0, 1] -> one base64 (standard alphabet) PNG string per image."""
    return [base64.b64encode(png).decode("ascii") for png in encode_pngs(images)]


def grid_shape(count: int, columns: int | None = None) -> tuple[int, int]:
    """(rows, columns) of a grid holding `count` tiles: near-square, or `columns` wide (at most count)."""
    columns = math.ceil(math.sqrt(count)) if columns is None else max(1, min(columns, count))
    return math.ceil(count / columns), columns


def encode_png_grid(
    images: np.ndarray, columns: int | None = None, padding: int = GRID_PADDING_PIXELS
) -> bytes:
    """(N, C, H, W) float in [0, 1] -> one PNG: a grid (near-square unless `columns` is given) with `padding`
    black pixels around tiles; a single image is returned as it is, without padding.
    """
    tiles = to_uint8(images)
    if len(tiles) == 1:
        return _png_bytes(tiles[0])
    count, height, width, channels = tiles.shape
    rows, columns = grid_shape(count, columns)
    grid = np.zeros(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels), dtype=np.uint8
    )
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        top = padding + row * (height + padding)
        left = padding + column * (width + padding)
        grid[top : top + height, left : left + width] = tile
    return _png_bytes(grid)
