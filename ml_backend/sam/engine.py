"""SAM inference: embed an image once, decode many prompts against it.

Like ``segment_anything.SamPredictor``, the expensive image encoder runs once per
image (cached by pixel content) and each click only runs the prompt encoder and
the light mask decoder. Inputs and outputs are in original-image pixels; the
model's padded square never leaves this module.

Embeddings are looked up in memory (an LRU by bytes), then in the optional on-disk
:class:`~ml_backend.sam.store.EmbeddingStore` shared with other processes, and
only then encoded, under a per-image encode lock so no two processes encode the
same image: the store's ``flock`` (one host), or what :attr:`SamEngine.encode_locks`
is given (Redis, for replicas on several hosts).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from ml_backend.errors import InvalidImageError, InvalidPromptError
from ml_backend.sam.cache import ByteBoundedLRU
from ml_backend.sam.decoder import PROMPT_KEYS, PromptDecoder
from ml_backend.sam.prompts import Prompts, SegmentationResult
from ml_backend.sam.transforms import InputGeometry, logits_to_mask, prepare_image

if TYPE_CHECKING:
    from ml_backend.sam.store import EmbeddingStore, StoredEmbedding

logger = logging.getLogger(__name__)

MASK_THRESHOLD = 0.0
PADDING_LABEL = -1


class EncodeLocks(Protocol):
    """Per-image encode locks; :meth:`~ml_backend.sam.store.EmbeddingStore.lock` is one."""

    def lock(self, key: str, *, blocking: bool = True,
             timeout_s: float | None = None) -> contextlib.AbstractContextManager[bool]:
        """Hold ``key``'s lock for the block; it yields whether the lock was taken."""


@dataclass(frozen=True)
class ImageEmbedding:
    """The encoder's output for one image, with the geometry needed to decode against it."""

    key: str
    geometry: InputGeometry
    features: torch.Tensor  # (1, h, w, C) on the model's device

    @property
    def nbytes(self) -> int:
        return self.features.element_size() * self.features.nelement()


def image_key(image: np.ndarray) -> str:
    """A content hash of the decoded pixels, so one image under two URLs is one cache entry."""
    digest = hashlib.sha256()  # hardware-accelerated on current CPUs: ~1.5x faster than blake2b on 36 MB
    digest.update(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        raise InvalidImageError(f"SAM needs an RGB uint8 image of shape (H, W, 3); got {shape}.")
    if min(image.shape[:2]) < 2:
        raise InvalidImageError(f"Image of {image.shape[1]}x{image.shape[0]} pixels is too small to segment.")


class SamEngine:
    """Segments images with a keras-hub ``SAMImageSegmenter``.

    ``device`` pins computation (``"cpu"``, ``"cuda"``, ``"cuda:1"``); ``None`` lets
    Keras pick the GPU when torch sees one. ``traced_decoder`` replays the prompt encoder
    and mask decoder as a traced graph (see :mod:`ml_backend.sam.decoder`); ``False``
    runs the Keras layers eagerly.
    """

    def __init__(
        self,
        segmenter,
        *,
        cache_bytes: int = 1 << 30,
        device: str | None = None,
        source: str = "",
        traced_decoder: bool = True,
        store: "EmbeddingStore | None" = None,
    ) -> None:
        self.segmenter = segmenter
        self.source = source
        self.device = device
        self.store = store
        backbone = segmenter.backbone
        self._image_encoder = backbone.image_encoder
        self._prompt_encoder = backbone.prompt_encoder
        self._decoder = PromptDecoder(self._prompt_encoder, backbone.mask_decoder, traced=traced_decoder)
        self.input_size = int(self._image_encoder.image_shape[0])
        embed_h, embed_w = self._prompt_encoder.image_embedding_size
        self.mask_input_shape = (4 * int(embed_h), 4 * int(embed_w))
        self.cache: ByteBoundedLRU[ImageEmbedding] = ByteBoundedLRU(cache_bytes, lambda e: e.nbytes)
        self.images_encoded = 0  # images this process ran the encoder on (store and memory hits excluded)
        self._count_lock = threading.Lock()
        self.encode_locks: EncodeLocks | None = None  # None: the store's own file locks

    def _device_scope(self):
        import keras

        return keras.device(self.device) if self.device else contextlib.nullcontext()

    # --- embedding -------------------------------------------------------------
    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """Return the embedding of an (H, W, 3) uint8 RGB image: from memory, the store, or the encoder."""
        check_image(image)
        key = image_key(image)
        return self.cache.get_or_compute(key, lambda: self._stored_or_encoded(key, image))

    def cached(self, key: str) -> ImageEmbedding | None:
        """The embedding for a pixel key from memory or the store, without the image; None if neither has it."""
        embedding = self.cache.get(key)
        if embedding is None and self.store is not None:
            embedding = self._from_store(key)
            if embedding is not None:
                self.cache.put(key, embedding)
        return embedding

    def is_ready(self, key: str) -> bool:
        """Whether ``key`` would be served without encoding (memory or store)."""
        return key in self.cache or (self.store is not None and self.store.contains(key))

    def _locks(self) -> EncodeLocks | None:
        """The encode locks, when there is a store for the encoding process to leave the embedding in."""
        return None if self.store is None else self.encode_locks or self.store

    def encoding_elsewhere(self, key: str) -> bool:
        """Whether another process (or replica) holds ``key``'s encode lock now."""
        if (locks := self._locks()) is None:
            return False
        with locks.lock(key, blocking=False) as free:
            return not free

    def wait_for_encode_elsewhere(self, key: str) -> None:
        """Wait until no one holds ``key``'s encode lock (then the store has the embedding, unless its holder died
        or the locks' bound on waiting ran out)."""
        if (locks := self._locks()) is not None:
            with locks.lock(key):
                pass

    @contextlib.contextmanager
    def _encode_lock(self, key: str) -> Iterator[None]:
        with self._locks().lock(key) as held:
            if not held:
                logger.warning("image %s: its encode lock was not free in time; encoding it here as well", key[:12])
            yield

    def _stored_or_encoded(self, key: str, image: np.ndarray) -> ImageEmbedding:
        if self.store is None:
            return self._encode(key, image)
        embedding = self._from_store(key)
        if embedding is not None:
            return embedding
        with self._encode_lock(key):
            embedding = self._from_store(key)  # another process may have encoded it while we waited
            if embedding is not None:
                return embedding
            embedding = self._encode(key, image)
            height, width = embedding.geometry.original_size
            self.store.put(key, embedding.features.detach().float().cpu().numpy(), (height, width))
        return embedding

    def _from_store(self, key: str) -> ImageEmbedding | None:
        from keras import ops

        stored: StoredEmbedding | None = self.store.get(key) if self.store is not None else None
        if stored is None:
            return None
        height, width = stored.original_size
        with self._device_scope():
            features = ops.convert_to_tensor(stored.features, dtype=self._image_encoder.compute_dtype)
        return ImageEmbedding(key=key, geometry=InputGeometry.for_image(height, width, self.input_size),
                              features=features)

    def _encode(self, key: str, image: np.ndarray) -> ImageEmbedding:
        embedding = self._run_encoder(key, image)
        with self._count_lock:
            self.images_encoded += 1
        logger.debug("encoded image %s (%dx%d)", key[:12], image.shape[1], image.shape[0])
        return embedding

    def _run_encoder(self, key: str, image: np.ndarray) -> ImageEmbedding:
        from keras import ops

        geometry = InputGeometry.for_image(image.shape[0], image.shape[1], self.input_size)
        batch = prepare_image(image, geometry)[None]
        with torch.no_grad(), self._device_scope():
            features = self._image_encoder(ops.convert_to_tensor(batch))
        return ImageEmbedding(key=key, geometry=geometry, features=features)

    def warm_up(self) -> None:
        """Pay torch's first-call costs and build the decoder's traces (each prompt kind) on a blank
        image, outside the cache, the store and the encode count, so annotators' clicks do not."""
        from ml_backend.sam.prompts import Prompts

        embedding = self._run_encoder("warm-up", np.full((64, 64, 3), 127, np.uint8))
        for box in (None, (8.0, 8.0, 40.0, 40.0)):
            first = self.decode(embedding, Prompts.from_lists(points=[(20.0, 20.0)], box=box))
            self.decode(embedding, Prompts.from_lists(points=[(20.0, 20.0), (30.0, 30.0)], box=box,
                                                      mask_logits=first.low_res_logits))

    # --- decoding --------------------------------------------------------------
    def decode(self, embedding: ImageEmbedding, prompts: Prompts) -> SegmentationResult:
        """Decode prompts (original-image pixels) against an embedding."""
        height, width = embedding.geometry.original_size
        prompts.validate(width, height)
        from keras import ops

        inputs = self._prompt_inputs(embedding.geometry, prompts)
        with torch.no_grad(), self._device_scope():
            tensors = {key: ops.convert_to_tensor(inputs[key]) for key in PROMPT_KEYS}
            masks, iou_pred = self._decoder(embedding.features, tensors)
        all_logits = masks[0].float()  # (4, h, w)
        all_scores = iou_pred[0].float()
        if prompts.is_single_point:
            # One click is ambiguous: take the multimask outputs and keep the best predicted IoU.
            best = 1 + int(torch.argmax(all_scores[1:]))
        else:
            best = 0
        low_res = all_logits[best : best + 1]
        mask = logits_to_mask(low_res, embedding.geometry, MASK_THRESHOLD)[0]
        return SegmentationResult(
            mask=mask.cpu().numpy(),
            score=float(all_scores[best]),
            low_res_logits=low_res[0].cpu().numpy().astype(np.float32),
        )

    def segment(self, image: np.ndarray, prompts: Prompts) -> SegmentationResult:
        """Embed (or reuse the cached embedding of) ``image`` and decode ``prompts``."""
        check_image(image)
        prompts.validate(image.shape[1], image.shape[0])
        return self.decode(self.embed(image), prompts)

    def _prompt_inputs(self, geometry: InputGeometry, prompts: Prompts) -> dict[str, np.ndarray]:
        points = geometry.scale_coords(prompts.points)
        labels = prompts.labels.astype(np.float32)
        if prompts.box is None:
            # As the official SAM: points without a box get one padding point.
            points = np.concatenate([points, np.zeros((1, 2), np.float32)])
            labels = np.concatenate([labels, np.array([PADDING_LABEL], np.float32)])
            boxes = np.zeros((1, 0, 2, 2), np.float32)
        else:
            boxes = geometry.scale_coords(np.asarray(prompts.box, np.float32).reshape(1, 1, 2, 2))
        if prompts.mask_logits is None:
            masks = np.zeros((1, 0, *self.mask_input_shape, 1), np.float32)
        else:
            logits = np.asarray(prompts.mask_logits, np.float32)
            if logits.shape != self.mask_input_shape:
                raise InvalidPromptError(
                    f"Previous mask logits have shape {logits.shape}; this model expects {self.mask_input_shape}."
                )
            masks = logits.reshape(1, 1, *self.mask_input_shape, 1)
        return {"points": points[None], "labels": labels[None], "boxes": boxes, "masks": masks}

