"""Bytes to an RGB array, the way SAM's official predictor sees the image.

The official predictor reads images with OpenCV (``cv2.imread`` + BGR->RGB): alpha is
dropped (not composited), 16-bit samples are reduced to 8 bits by their high byte, and
we add what OpenCV does not do but Label Studio's display does: EXIF orientation.

Only the common raster formats are opened (:data:`FORMATS`: PNG, JPEG, WebP, GIF, BMP,
TIFF); Pillow's other parsers (PSD, EPS via Ghostscript, ICNS, PCX, SGI, FITS...) are
never reached with outside bytes. Multi-frame files (GIF, animated WebP/PNG, multi-page
TIFF) give their first frame. Before any pixel is decoded, the header's size is checked
against ``max_pixels`` and the RGB result's size (width x height x 3 bytes) against
``max_bytes``, so a few kilobytes declaring a huge image cost nothing.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ml_backend.errors import InvalidImageError

MIN_SIDE = 2
# Pillow format ids (JPEG also opens phones' MPO files, whose first picture is the photo).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
RGB_BYTES_PER_PIXEL = 3


def decode_image(
    data: bytes, *, max_pixels: int, max_bytes: int | None = None, source: str = "image"
) -> np.ndarray:
    """Decode ``data`` to a C-contiguous (H, W, 3) uint8 RGB array, EXIF orientation applied.

    The pixel count and the RGB result's byte size are checked from the header, before any
    pixel is decoded, so a small file claiming a huge size (a decompression bomb) costs
    nothing. ``max_bytes`` defaults to what ``max_pixels`` implies (3 bytes a pixel).

    Raises:
        InvalidImageError: naming ``source`` and the problem, for empty bytes, non-images,
            formats outside :data:`FORMATS`, truncated or corrupt files, images under 2 pixels
            a side, over ``max_pixels`` or over ``max_bytes``.
    """
    if max_bytes is None:
        max_bytes = max_pixels * RGB_BYTES_PER_PIXEL
    if not data:
        raise InvalidImageError(f"{source}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check replaces Pillow's warning; its hard error is caught below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            f"{source}: not an image in a supported format ({', '.join(FORMATS)}; {len(data):,} bytes)"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"{source}: image too large, refused as a decompression bomb ({exc})") from exc
    except Exception as exc:  # Pillow's header parsers raise many types on malformed input
        raise InvalidImageError(f"{source}: unreadable image header ({exc})") from exc

    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidImageError(
                f"{source}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
                f"{max_pixels:,} (MAX_IMAGE_PIXELS)"
            )
        if width * height * RGB_BYTES_PER_PIXEL > max_bytes:
            raise InvalidImageError(
                f"{source}: {width}x{height} would decode to {width * height * RGB_BYTES_PER_PIXEL / 2**20:,.0f} MiB "
                f"of RGB, over the limit of {max_bytes / 2**20:,.0f} MiB (MAX_IMAGE_MB)"
            )
        if min(width, height) < MIN_SIDE:
            raise InvalidImageError(
                f"{source}: image is {width}x{height}; each side must be at least {MIN_SIDE} pixels"
            )
        try:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: no second copy of the pixels
        except Exception as exc:  # truncated data, corrupt streams, bad EXIF: all Pillow-specific types
            raise InvalidImageError(f"{source}: corrupt or truncated image data ({exc})") from exc
        try:
            return _to_rgb_array(image)
        except ValueError as exc:  # a colour mode Pillow cannot convert to RGB (e.g. LAB, HSV)
            raise InvalidImageError(f"{source}: unsupported colour mode {image.mode!r} ({exc})") from exc


def load_image_file(path: str | Path, *, max_pixels: int, max_bytes: int | None = None) -> np.ndarray:
    """Read and decode an image file (for the CLI); errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    return decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes, source=str(path))


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """The image as (H, W, 3) uint8, with as few full-size copies as each mode allows: peak memory
    is about 7 bytes a pixel for RGB (Pillow's 4 and the array's 3), 6 for 1-bit and grey, 5 for
    palette images without transparency (Pillow's RGB conversion would add 4 more)."""
    mode = image.mode
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(image))
    if mode in ("1", "L"):
        gray = np.asarray(image if mode == "L" else image.convert("L"))
        rgb = np.empty((*gray.shape, 3), dtype=np.uint8)
        rgb[...] = gray[:, :, None]  # not np.repeat: it peaks ~80 MiB higher at the size limit
        return rgb
    if mode == "P" and "transparency" not in image.info:
        lut = np.zeros((256, 3), dtype=np.uint8)  # entries the palette lacks are black, as in Pillow
        palette = np.frombuffer(bytes(image.getpalette("RGB") or ()), dtype=np.uint8)[: lut.size]
        lut.reshape(-1)[: palette.size] = palette
        return lut[np.asarray(image)]  # not np.take, which first widens every index to 8 bytes
    if mode == "P" and "transparency" in image.info:
        # Via RGBA to avoid Pillow's palette-transparency warning; the palette colours are
        # kept and alpha dropped, as OpenCV does.
        image = image.convert("RGBA")
    if mode.startswith(("I", "F")):
        rgb = np.repeat(_wide_to_uint8(np.asarray(image))[:, :, None], 3, axis=2)
    else:  # Pillow drops alpha and expands palettes like OpenCV; raises ValueError on LAB/HSV
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)


def _wide_to_uint8(values: np.ndarray) -> np.ndarray:
    """Reduce 16/32-bit integer or float samples to 8 bits without clipping.

    Samples in the 16-bit range keep their high byte (what OpenCV does for 16-bit PNG
    and TIFF); floats in [0, 1] are scaled by 255; anything else is stretched from its
    own min..max to 0..255.
    """
    kind = values.dtype.kind
    if kind in "iu" and values.size and values.min() >= 0 and values.max() <= 0xFFFF:
        return (values.astype(np.uint32) >> 8).astype(np.uint8)
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(finite.min()), float(finite.max())
    if kind == "f" and low >= 0.0 and high <= 1.0:
        low, high = 0.0, 1.0
    scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) / max(high - low, 1e-12)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
