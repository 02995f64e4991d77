"""The project's exception types.

Every error caused by a request or an input carries an HTTP status and a message
an annotator can act on; the web layer turns them into 4xx JSON answers.
"""

from __future__ import annotations


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when the server is unreachable or refuses (redis is imported on first use: a
    backend without REDIS_URL never loads it)."""
    from redis.exceptions import RedisError

    return (RedisError, OSError)


class BackendError(Exception):
    """Base class for errors caused by input; ``status_code`` is the HTTP answer."""

    status_code: int = 400

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class InvalidImageError(BackendError):
    """Bytes that are not a usable image: unreadable, empty, too small or too large."""

    status_code = 422


class InvalidPromptError(BackendError):
    """Prompts SAM cannot use: empty, non-finite, outside the image, malformed."""

    status_code = 422


class ModelSourceError(BackendError):
    """A model source that cannot be loaded: unknown preset, bad directory, not a SAM checkpoint."""

    status_code = 500


class ModelUnavailableError(BackendError):
    """A model this request needs is not serving (still loading, or its load failed): HTTP 503, not a broken
    request nor a crash. ``retry_after_s`` (the ``Retry-After`` header) only when waiting may help."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ImageFetchError(BackendError):
    """An image URL that is refused, missing, too large or too slow."""

    status_code = 422


class LabelConfigError(BackendError):
    """A labeling config this backend cannot serve."""

    status_code = 422
