"""The one way to load SAM: a keras-hub preset name, a local preset directory, or an official checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ml_backend.errors import ModelSourceError

if TYPE_CHECKING:
    from ml_backend.sam.store import EmbeddingStore
    from ml_backend.sam.engine import SamEngine
    from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

KNOWN_PRESETS = ("sam_base_sa1b", "sam_large_sa1b", "sam_huge_sa1b")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin")


def default_source(gpu_available: bool) -> str:
    """The huge model where a GPU makes it affordable, the base model on CPU."""
    return "sam_huge_sa1b" if gpu_available else "sam_base_sa1b"


def _converted_preset_dir(checkpoint: Path, converted_root: Path) -> Path:
    # Keyed by path, size and mtime: hashing a 2.5 GB checkpoint on every start would cost seconds.
    stat = checkpoint.stat()
    key = f"{checkpoint.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return converted_root / f"{checkpoint.stem}-{digest}"


def _is_preset_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "metadata.json").is_file()


def resolve_source(source: str, converted_root: Path) -> str:
    """Return a preset name or preset directory for ``source``, converting official checkpoints once."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not _is_preset_dir(path):
            raise ModelSourceError(
                f"SAM model directory {path} is not a keras-hub preset (no config.json/metadata.json). "
                "Point SAM_MODEL at a preset directory, an official SAM checkpoint (.pth) or a preset name."
            )
        return str(path)
    if path.is_file():
        preset_dir = _converted_preset_dir(path, converted_root)
        if not _is_preset_dir(preset_dir):
            from ml_backend.sam.convert import convert_checkpoint

            logger.info("converting official SAM checkpoint %s to %s", path, preset_dir)
            convert_checkpoint(path, preset_dir)
        return str(preset_dir)
    if path.suffix in CHECKPOINT_SUFFIXES or "/" in source or source.startswith("."):
        raise ModelSourceError(f"SAM model file {source} does not exist.")
    if source not in KNOWN_PRESETS and not source.startswith(("kaggle://", "hf://")):
        raise ModelSourceError(
            f"Unknown SAM model {source!r}. Use one of {', '.join(KNOWN_PRESETS)}, "
            "a local preset directory, or an official SAM checkpoint file (sam_vit_b_01ec64.pth, ...)."
        )
    return source


def load_segmenter(source: str, *, converted_root: Path, dtype: str | None = None):
    """Load a ``keras_hub.models.SAMImageSegmenter`` from any supported source."""
    import keras_hub

    resolved = resolve_source(source, converted_root)
    try:
        return keras_hub.models.SAMImageSegmenter.from_preset(resolved, dtype=dtype)
    except Exception as exc:  # keras-hub raises many types for missing files or no network
        if resolved in KNOWN_PRESETS:
            raise ModelSourceError(
                f"Could not download SAM preset {resolved!r} ({exc.__class__.__name__}: {exc}). Without network "
                f"access, set SAM_MODEL to a local preset directory or an official checkpoint file "
                f"(sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or sam_vit_h_4b8939.pth); other presets: "
                f"{', '.join(p for p in KNOWN_PRESETS if p != resolved)}."
            ) from exc
        raise ModelSourceError(f"Could not load SAM model from {resolved}: {exc}") from exc


def load_engine(settings: "Settings") -> "SamEngine":
    """Build the engine the service uses, from the settings (device, precision, cache, source)."""
    import torch

    from ml_backend.sam.engine import SamEngine

    device = None if settings.sam_device == "auto" else settings.sam_device
    gpu = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError(f"SAM_DEVICE={device} but torch sees no GPU; use SAM_DEVICE=auto or cpu.")
    dtype = None
    if settings.sam_half:
        if gpu:
            dtype = "float16"
        else:
            logger.warning("SAM_HALF is set but SAM runs on the CPU; using float32")
    source = settings.sam_model or default_source(gpu)
    logger.info("loading SAM from %s (device %s, dtype %s)", source, device or ("cuda" if gpu else "cpu"), dtype or "float32")
    import keras

    # Variables are created on the device in scope at load time; the engine computes under the same scope.
    with keras.device(device) if device else contextlib.nullcontext():
        segmenter = load_segmenter(source, converted_root=settings.model_dir / "sam-presets", dtype=dtype)
    return SamEngine(segmenter, cache_bytes=settings.embedding_cache_bytes, device=device, source=source,
                     traced_decoder=settings.sam_trace_decoder, store=open_store(settings, segmenter))


def open_store(settings: "Settings", segmenter) -> "EmbeddingStore | None":
    """The on-disk embedding store for this model, or None when disabled or unusable (memory only then)."""
    if settings.embedding_store_mb <= 0:
        return None
    from ml_backend.sam.identity import model_identity
    from ml_backend.sam.store import EmbeddingStore

    model_id = model_identity(segmenter.backbone.image_encoder)
    try:
        store = EmbeddingStore(settings.embedding_store_dir, model_id, max_bytes=settings.embedding_store_bytes,
                               dtype=settings.embedding_store_dtype)
    except OSError as exc:
        logger.warning("embedding store disabled: cannot use %s (%s)", settings.embedding_store_dir, exc)
        return None
    logger.info("embedding store %s (model %s, %s, %d MB)", store.directory, model_id,
                settings.embedding_store_dtype, settings.embedding_store_mb)
    return store
