"""Bytes to an RGB array, the way SAM's official predictor sees the image.

The official predictor reads images with OpenCV (``cv2.imread`` + BGR->RGB): alpha is
dropped (not composited), 16-bit samples are reduced to 8 bits by their high byte, and
we add what OpenCV does not do but Label Studio's display does: EXIF orientation.

Only the common raster formats are opened (:data:`FORMATS`: PNG, JPEG, WebP, GIF, BMP,
TIFF); Pillow's other parsers (PSD, EPS via Ghostscript, ICNS, PCX, SGI, FITS...) are
never reached with outside bytes. Multi-frame files (GIF, animated WebP/PNG, multi-page
TIFF) give their first frame. Before any pixel is decoded, the header's size is checked
against ``max_pixels``, the RGB result's size (width x height x 3 bytes) against
``max_bytes``, and the peak the decoding path allocates for the file's colour mode
(:func:`peak_bytes_per_pixel`: Pillow's storage, its conversions and our array) against the
peak an RGB image of ``max_bytes`` costs, so a few kilobytes declaring a huge image, or a
16-bit/float image that needs more bytes a pixel, cost nothing.
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
WIDE_CHUNK_PIXELS = 1 << 20  # 16/32-bit and float samples are scaled this many at a time
# Bytes a pixel in Pillow's own storage, by mode (1-byte modes, 16-bit grey, everything else 4).
_PILLOW_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


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
        peak = width * height * peak_bytes_per_pixel(image)
        budget = max_bytes // RGB_BYTES_PER_PIXEL * peak_bytes_per_pixel_of("RGB")
        if peak > budget:
            raise InvalidImageError(
                f"{source}: a {width}x{height} {image.mode} image needs {peak / 2**20:,.0f} MiB to decode, over the "
                f"{budget / 2**20:,.0f} MiB an RGB image within MAX_IMAGE_MB needs (MAX_IMAGE_MB)"
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


def peak_bytes_per_pixel_of(mode: str, *, transposed: bool = False, transparency: bool = False,
                            tiff: bool = False) -> int:
    """The bytes a pixel that :func:`decode_image` allocates at its peak for an image in ``mode``.

    Pillow's storage, plus what :func:`_to_rgb_array` makes of it: RGB 4 + the array's 3; 1-bit
    1 + its grey copy 1 + the array 1 + RGB 3; grey 1 + 1 + 3; palette 1 + indices 1 + 3 (with
    transparency via RGBA: 1 + 4 + 4 + 3); 16-bit grey 2 + 3, 32-bit integer and float 4 + 3 (read and
    scaled in blocks of :data:`WIDE_CHUNK_PIXELS`); any other mode 4 + Pillow's RGB 4 + 3.
    An EXIF rotation (``transposed``) holds a second Pillow copy while it runs; libtiff (``tiff``)
    decodes a strip, up to the whole image, into a buffer of Pillow's size before unpacking it
    (measured: a one-strip float TIFF peaks at ~9 bytes a pixel, not 7).
    """
    pillow = _PILLOW_BYTES.get(mode, 4)
    if mode == "RGB":
        extra = 3
    elif mode == "1":
        extra = 1 + 1 + 3
    elif mode == "L" or (mode == "P" and not transparency):
        extra = 1 + 3
    elif mode == "P":
        extra = 4 + 4 + 3
    elif mode.startswith(("I", "F")):
        extra = 3
    else:
        extra = 4 + 3
    return pillow * (1 + transposed + tiff) + extra


def peak_bytes_per_pixel(image: Image.Image) -> int:
    """:func:`peak_bytes_per_pixel_of` for an opened (not yet decoded) image, from its header."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block: counted as rotated, the costlier case
        orientation = 0
    return peak_bytes_per_pixel_of(image.mode, transposed=orientation not in (1, None),
                                   transparency="transparency" in image.info, tiff=image.format == "TIFF")


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """The image as (H, W, 3) uint8, with as few full-size copies as each mode allows
    (:func:`peak_bytes_per_pixel_of` states the peak of each)."""
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
        return _wide_to_rgb(image)
    else:  # Pillow drops alpha and expands palettes like OpenCV; raises ValueError on LAB/HSV
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)


def _wide_to_rgb(image: Image.Image) -> np.ndarray:
    """Reduce 16/32-bit integer or float samples to 8-bit RGB without clipping.

    Samples in the 16-bit range keep their high byte (what OpenCV does for 16-bit PNG
    and TIFF); floats in [0, 1] are scaled by 255; anything else is stretched from its
    own min..max to 0..255 (non-finite values to the ends). Read from Pillow in blocks of
    about :data:`WIDE_CHUNK_PIXELS` and written straight into the result: no full-size copy
    of the samples (``np.asarray(image)`` peaks at twice their size) and no float64 one.
    """
    width, height = image.size
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, WIDE_CHUNK_PIXELS // width)

    def blocks():
        for top in range(0, height, rows):
            yield top, np.asarray(image.crop((0, top, width, min(top + rows, height))))

    low, high = np.inf, -np.inf
    floats = False
    for _, block in blocks():
        floats = block.dtype.kind == "f"
        finite = block[np.isfinite(block)] if floats else block
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if not floats and low >= 0 and high <= 0xFFFF:
        for top, block in blocks():
            rgb[top:top + block.shape[0], :, 0] = block >> 8
    else:
        if low > high:  # no finite sample at all
            low, high = 0.0, 0.0
        if floats and low >= 0.0 and high <= 1.0:
            low, high = 0.0, 1.0
        scale = 255.0 / max(high - low, 1e-12)
        for top, block in blocks():
            block = np.nan_to_num(block.astype(np.float64), nan=low, posinf=high, neginf=low)
            rgb[top:top + block.shape[0], :, 0] = np.clip(np.rint((block - low) * scale), 0, 255)
    rgb[:, :, 1] = rgb[:, :, 0]
    rgb[:, :, 2] = rgb[:, :, 0]
    return rgb
