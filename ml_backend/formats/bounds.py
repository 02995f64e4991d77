"""How large a mask a result may declare before we allocate it.

A result states its image size (``original_width``/``original_height``, a PNG header, an
RLE header) in a few bytes; decoding then allocates that many pixels. Every reader checks
the declared size here first, against the same ``MAX_IMAGE_PIXELS`` bound images get.
"""

from __future__ import annotations

from ml_backend.errors import BackendError


class MaskFormatError(BackendError, ValueError):
    """A mask result that cannot be read: malformed, of an unknown form, or too large."""

    status_code = 422


def check_mask_size(width: object, height: object, *, max_pixels: int, what: str = "A mask") -> tuple[int, int]:
    """(width, height) as ints when both are positive whole numbers and width·height <= ``max_pixels``.

    ``what`` names the offending region in the message. Raises :class:`MaskFormatError` otherwise.
    """
    if isinstance(width, float) and width.is_integer():
        width = int(width)
    if isinstance(height, float) and height.is_integer():
        height = int(height)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (width, height)):
        raise MaskFormatError(f"{what} has no valid size: width and height must be positive whole numbers, "
                              f"got {width!r}x{height!r}.")
    if width * height > max_pixels:
        raise MaskFormatError(f"{what} declares {width}x{height} = {width * height} pixels, more than "
                              f"MAX_IMAGE_PIXELS={max_pixels}.")
    return width, height
