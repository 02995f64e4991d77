"""The chapter-11 trimap segmentation model: data, fitting, evaluation and a versioned store.

This package knows nothing of Label Studio; ``ml_backend`` builds on it.
"""

from training.keras_backend import ensure_torch_backend

ensure_torch_backend()
