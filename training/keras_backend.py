"""Make sure Keras runs on the torch backend before anything imports keras.

Both packages call :func:`ensure_torch_backend` from their ``__init__`` so that
``import ml_backend`` or ``import training`` is enough; it must run before the
first ``import keras`` because Keras fixes its backend at import time.
"""

from __future__ import annotations

import os
import sys

REQUIRED_BACKEND = "torch"


class KerasBackendError(RuntimeError):
    """Keras was forced onto a backend other than torch."""


def ensure_torch_backend() -> None:
    """Select the torch backend, or explain clearly why it cannot be selected."""
    forced = os.environ.get("KERAS_BACKEND")
    if forced and forced != REQUIRED_BACKEND:
        raise KerasBackendError(
            f"KERAS_BACKEND={forced!r} is set, but this project runs Keras on the "
            f"{REQUIRED_BACKEND!r} backend only. Unset KERAS_BACKEND or set it to {REQUIRED_BACKEND!r}."
        )
    os.environ["KERAS_BACKEND"] = REQUIRED_BACKEND
    keras = sys.modules.get("keras")
    if keras is not None:
        active = keras.backend.backend()
        if active != REQUIRED_BACKEND:
            raise KerasBackendError(
                f"keras was imported before this package with the {active!r} backend; "
                f"import this package first or set KERAS_BACKEND={REQUIRED_BACKEND}."
            )
