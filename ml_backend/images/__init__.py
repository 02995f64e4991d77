"""Image loading: bytes from Label Studio and elsewhere (``fetch``), decoded to RGB (``decode``)."""

from ml_backend.images.cache import DownloadCache
from ml_backend.images.decode import decode_image, load_image_file
from ml_backend.images.fetch import ImageLoader

__all__ = ["DownloadCache", "ImageLoader", "decode_image", "load_image_file"]
