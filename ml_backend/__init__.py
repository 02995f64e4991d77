"""Label Studio ML backend: interactive SAM brush masks and trimap pre-annotation."""

from training.keras_backend import ensure_torch_backend

ensure_torch_backend()
