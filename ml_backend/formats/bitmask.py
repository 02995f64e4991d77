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

We write exactly that RGBA form and read any PNG by the same alpha > 0 rule.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image

from ml_backend.formats.bounds import MaskFormatError, check_mask_size

DATA_URL_PREFIX = "data:image/png;base64,"


def encode_bitmask(mask: np.ndarray) -> str:
    """The ``imageDataURL`` of a 2-D mask (non-zero inside): RGBA PNG, opaque black inside, transparent outside."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"A bitmask must be a non-empty 2-D array, got shape {mask.shape}.")
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[..., 3][mask != 0] = 255
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return DATA_URL_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


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
