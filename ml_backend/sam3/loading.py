"""The one way to load SAM 3: keras-hub preset name, local keras-hub preset, or Hugging Face checkpoint directory.

Same conventions as :mod:`ml_backend.sam.loading`: weights are created on the chosen device (``keras.device``
scope), a missing or malformed source is a :class:`ModelSourceError` naming the path, nothing loads at import.
A Hugging Face directory (``config.json`` of model type ``sam3_video`` plus safetensors, as published for
``facebook/sam3``) goes through keras-hub's own converter; the tokenizer always comes from the source's own
vocabulary and merges (:mod:`ml_backend.sam3.tokenizer`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ml_backend.errors import ModelSourceError

if TYPE_CHECKING:
    from ml_backend.sam3.engine import Sam3Engine

logger = logging.getLogger(__name__)

KNOWN_PRESETS = ("sam3_pcs",)
# keras-hub's converter warns "Skipping mask_decoder.pixel_decoder.{conv_layers,norms}.N" for the checkpoint's
# last pixel-decoder stage: the model never runs it (transformers issue 43065; keras-hub does not even build it),
# so its weights have nowhere to go and nothing is lost. Any other skipped weight still warns.
EXPECTED_SKIPS = r"Skipping mask_decoder\.pixel_decoder\.(conv_layers|norms)\.\d+$"
HF_MODEL_TYPE = "sam3_video"


def _source_kind(path: Path) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise ModelSourceError(f"SAM 3 model directory {path} has no config.json: point SAM3_MODEL at a keras-hub "
                               "preset directory, a Hugging Face SAM 3 checkpoint directory or the preset sam3_pcs.")
    if (path / "metadata.json").is_file():
        return "keras-hub"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelSourceError(f"{config} is not readable JSON: {exc}") from exc
    if model_type != HF_MODEL_TYPE:
        raise ModelSourceError(f"{config} has model_type {model_type!r}; keras-hub converts SAM 3 checkpoints of "
                               f"model type {HF_MODEL_TYPE!r} (the one facebook/sam3 publishes).")
    return "huggingface"


def _tokenizer_dir(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from keras_hub.src.utils.preset_utils import get_file

    get_file(source, "assets/tokenizer/merges.txt")
    return Path(get_file(source, "assets/tokenizer/vocabulary.json")).parent.parent.parent


def resolve_source(source: str) -> str:
    """Check ``source`` before anything heavy is imported; returns what keras-hub's ``from_preset`` takes."""
    path = Path(source).expanduser()
    if path.is_dir():
        _source_kind(path)
        return str(path)
    if ("/" in source and not source.startswith(("kaggle://", "hf://"))) or source.startswith("."):
        raise ModelSourceError(f"SAM 3 model directory {source} does not exist.")
    if source not in KNOWN_PRESETS and not source.startswith(("kaggle://", "hf://")):
        raise ModelSourceError(f"Unknown SAM 3 model {source!r}: use {', '.join(KNOWN_PRESETS)}, a local keras-hub "
                               "preset directory or a Hugging Face SAM 3 checkpoint directory.")
    return source


def load_backbone(source: str, *, dtype: str | None = None):
    """keras-hub's ``SAM3PromptableConceptBackbone`` with our corrections (:mod:`ml_backend.sam3.compat`) and
    copy-free convolutions and group norms (:mod:`ml_backend.sam3.fast_layers`)."""
    import keras_hub

    from ml_backend.sam3 import compat
    from ml_backend.sam3.fast_layers import use_fast_layers

    resolved = resolve_source(source)
    compat.install()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=EXPECTED_SKIPS, category=UserWarning)
            backbone = keras_hub.models.SAM3PromptableConceptBackbone.from_preset(resolved, dtype=dtype)
    except ModelSourceError:
        raise
    except Exception as exc:  # keras-hub raises many types for missing files, bad configs or no network
        hint = " Without network access, point SAM3_MODEL at a local directory." if resolved in KNOWN_PRESETS else ""
        raise ModelSourceError(f"Could not load SAM 3 from {resolved} ({exc.__class__.__name__}: {exc}).{hint}") \
            from exc
    compat.match_reference_epsilons(backbone)
    use_fast_layers(backbone)
    return backbone


def load_sam3_engine(source: str, *, device: str = "auto", half: bool = False) -> "Sam3Engine":
    """Build the engine from a source on a device (``auto``: GPU when torch sees one)."""
    import keras
    import torch

    from ml_backend.sam3.engine import Sam3Engine
    from ml_backend.sam3.tokenizer import Sam3Tokenizer

    chosen = None if device == "auto" else device
    if chosen and chosen.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError(f"SAM3_DEVICE={device} but torch sees no GPU; use SAM3_DEVICE=auto or cpu.")
    gpu = torch.cuda.is_available() and (chosen is None or chosen.startswith("cuda"))
    dtype = "float16" if half and gpu else None
    logger.info("loading SAM 3 from %s (device %s, dtype %s)", source, chosen or ("cuda" if gpu else "cpu"),
                dtype or "float32")
    with keras.device(chosen) if chosen else contextlib.nullcontext():
        backbone = load_backbone(source, dtype=dtype)
    tokenizer = Sam3Tokenizer.from_directory(_tokenizer_dir(resolve_source(source)))
    return Sam3Engine(backbone, tokenizer, device=chosen, source=source)
