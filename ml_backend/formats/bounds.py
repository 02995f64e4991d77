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

    The rule is :func:`ml_backend.security.limits.declared_mask_size` (what a request may hold);
    ``what`` names the offending region in the message. Raises :class:`MaskFormatError` otherwise.
    """
    from ml_backend.security.limits import RequestLimitError, declared_mask_size

    try:
        return declared_mask_size(width, height, max_pixels=max_pixels, what=what)
    except RequestLimitError as exc:
        raise MaskFormatError(exc.message) from None
