"""Label Studio's ``BitmaskLabels`` value: a PNG data URL of the mask.

What the 1.23.2 editor reads and writes, from its bundled sources
(``web/dist/apps/labelstudio/358.js.map`` in the label-studio 1.23.2 wheel:
``libs/editor/src/regions/BitmaskRegion.jsx`` and ``BitmaskRegion/utils.ts``):

- A region serialises as ``{"imageDataURL": canvas.toDataURL("image/png")}`` (plus
  ``bitmasklabels``) with ``original_width``/``original_height`` like every image region.
- The canvas is ``naturalWidth`` x ``naturalHeight`` of the image: the PNG has the image's
  original (EXIF-oriented) size, one PNG pixel per image pixel.
- ``getImageSnapshotCanvas`` paints the region's pixels opaque black on a transparent canvas
  (``destination-atop`` over a black fill), so the PNG is 8-bit RGBA: (0, 0, 0, 255) inside,
  (0, 0, 0, 0) outside. Colour is applied only on screen.
- Reading (``restoreFromImageDataURL``) draws the decoded PNG at (0, 0) on a canvas of the
  PNG's own size, and every reader of that canvas (outline, bounding box, hover) counts a
  pixel as inside when its **alpha > 0**. A PNG without an alpha channel is therefore all inside.

We write a PNG that decodes to exactly that RGBA form and read any PNG by the same alpha > 0 rule.
It is a 1-bit palette PNG (colour 0 transparent black, colour 1 opaque black; ``tRNS``): a browser or
Pillow decodes it to the same RGBA pixels as an 8-bit RGBA PNG, from a fraction of the bytes to
compress, so a 4000x3000 mask takes milliseconds instead of the ~1 s Pillow takes for RGBA. The
deflate stream is ISA-L's (python-isal, level 1): a standard zlib stream, written about five times
faster than zlib's fastest level and smaller (a random SAM's noise-like 4000x3000 mask: ~4 ms and
444 KiB against zlib's 17-19 ms and 486 KiB).
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zlib

import numpy as np
from isal import isal_zlib
from PIL import Image

from ml_backend.formats.bounds import MaskFormatError, check_mask_size

DATA_URL_PREFIX = "data:image/png;base64,"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PALETTE = bytes(6)  # two colours, both black
_ALPHA = b"\x00\xff"  # colour 0 transparent, colour 1 opaque
_COMPRESSION = 1  # ISA-L level (0-3): smaller than level 0 at about the same speed


def encode_bitmask(mask: np.ndarray) -> str:
    """The ``imageDataURL`` of a 2-D mask (non-zero inside): a PNG decoding to opaque black inside,
    transparent outside."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"A bitmask must be a non-empty 2-D array, got shape {mask.shape}.")
    return DATA_URL_PREFIX + base64.b64encode(_one_bit_png(mask)).decode("ascii")


def _one_bit_png(mask: np.ndarray) -> bytes:
    """The PNG file, written here (PNG spec, colour type 3, bit depth 1): neither Pillow (~100 ms at
    4000x3000) nor OpenCV (no transparency at one bit) writes this form at the speed of a click."""
    height, width = mask.shape
    bits = np.packbits(mask if mask.dtype == np.bool_ else mask != 0, axis=1)  # rows, MSB first
    scanlines = np.zeros((height, bits.shape[1] + 1), np.uint8)  # each row: filter type 0, then its bytes
    scanlines[:, 1:] = bits
    header = struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0)  # 1 bit, palette, deflate, no interlace
    return b"".join((_PNG_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"PLTE", _PALETTE), _chunk(b"tRNS", _ALPHA),
                     _chunk(b"IDAT", isal_zlib.compress(scanlines.data, _COMPRESSION)), _chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decode_bitmask(data_url: object, *, max_pixels: int) -> np.ndarray:
    """The (height, width) bool mask of an ``imageDataURL`` at the PNG's own size (alpha > 0 is inside).

    Raises :class:`MaskFormatError` for anything but a base64 PNG data URL, or a PNG larger
    than ``max_pixels`` (checked from its header, before its pixels are decoded).
    """
    if not isinstance(data_url, str) or not data_url[:len(DATA_URL_PREFIX)].lower() == DATA_URL_PREFIX:
        shown = data_url[:40] if isinstance(data_url, str) else type(data_url).__name__
        raise MaskFormatError(f"A bitmask's imageDataURL must start with {DATA_URL_PREFIX!r}, got {shown!r}.")
    try:
        data = base64.b64decode(data_url[len(DATA_URL_PREFIX):], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MaskFormatError(f"A bitmask's imageDataURL is not valid base64 ({exc}).") from exc
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            check_mask_size(*image.size, max_pixels=max_pixels, what="A bitmask PNG")
            image.load()
            if "A" in image.getbands():
                alpha = image.getchannel("A")
            elif image.mode == "P" or "transparency" in image.info:
                alpha = image.convert("RGBA").getchannel("A")
            else:
                return np.ones((image.height, image.width), bool)  # no alpha: every pixel opaque
            return np.asarray(alpha) > 0
    except MaskFormatError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MaskFormatError(f"A bitmask's imageDataURL is not a readable PNG ({exc}).") from exc
