"""SAM 3 concept segmentation of one image for many phrases: the image is encoded once.

The engine runs keras-hub's SAM 3 layers itself instead of the backbone's functional graph, for two reasons:
the vision encoder (nearly all the compute) then runs once per image rather than once per phrase, and box
prompts reach the geometry encoder as (boxes, masks, labels) — keras-hub 0.32's backbone passes the labels
where the mask belongs and the mask where the labels belong, which turns a negative box into an ignored
positive one. Images are resized to the model's square as uint8 without keeping the aspect ratio and box
coordinates are normalised by the original size, as transformers' ``Sam3Processor`` does; masks come back at
the original size (bilinear, then > 0.5), as its ``post_process_instance_segmentation`` does.
``tests/test_sam3_parity.py`` holds this against transformers' pipeline from an image file.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ml_backend.errors import InvalidPromptError

PAD_LABEL = -10  # keras-hub's and transformers' padding value for box prompts
ENCODE_PIECE = "sam3 encode"  # the pieces of work :meth:`Sam3Engine.segment` runs in a caller's slots
PHRASE_PIECE = "sam3 phrase"
WorkSlot = Callable[[str], contextlib.AbstractContextManager]  # piece name -> the slot it runs in


def _no_slot(piece: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class ConceptInstance:
    """One instance found for one phrase, in original-image pixels."""

    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    mask: np.ndarray  # bool, (height, width)

    def materialize(self) -> ConceptInstance:
        return self


@dataclass(frozen=True)
class ConceptCandidate:
    """An instance as the engine finds it: its full-size mask is computed by :meth:`materialize`, so that only
    the instances kept after de-duplication ever exist at the image's size (each is a byte per pixel; a
    100-megapixel image with a hundred candidates would need ten gigabytes at once)."""

    score: float
    box: tuple[float, float, float, float]
    upsample: Callable[[], np.ndarray]

    def materialize(self) -> ConceptInstance:
        return ConceptInstance(self.score, self.box, self.upsample())


@dataclass(frozen=True)
class RawPrediction:
    """Every query's outputs for each phrase, before thresholds (what the parity test compares)."""

    scores: np.ndarray  # (phrases, queries) in [0, 1]: query score x presence score
    boxes: np.ndarray  # (phrases, queries, 4) xyxy in original pixels
    mask_probabilities: np.ndarray  # (phrases, queries, height, width) at the original size


class Sam3Engine:
    """Phrases (and optional exemplar boxes) to instances on one RGB image."""

    def __init__(self, backbone, tokenizer, *, device: str | None = None, source: str = "") -> None:
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.device = device
        self.source = source
        self.image_size = int(backbone.vision_encoder.image_shape[0])
        self._lock = threading.Lock()  # one forward pass at a time: the model is not re-entrant on one device

    def _device_scope(self):
        import keras

        return keras.device(self.device) if self.device else contextlib.nullcontext()

    def _pixels(self, image: np.ndarray) -> np.ndarray:
        """(1, S, S, 3) float32 pixels exactly as transformers' ``Sam3ImageProcessor`` makes them on the CPU.

        Its torchvision backend resizes the *uint8* image to the square (bilinear, antialiased, aspect ratio
        not kept) and the result stays uint8: torchvision resizes uint8 natively where torch's CPU build
        reports AVX2, and elsewhere in float32 rounded back to uint8 (``_do_native_uint8_resize_on_cpu``).
        Then rescale and normalisation, fused: ``(x - 127.5) / 127.5`` in float32. Resizing in float without
        the rounding moved mask borders by a pixel (IoU ~0.985 against the reference)."""
        import torch
        import torch.nn.functional as F

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidPromptError("SAM 3 needs an RGB uint8 image")
        # The channel-first copy is also writable: torch warns on a read-only array (decoded images are).
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
        size = (self.image_size, self.image_size)
        if tuple(tensor.shape[-2:]) != size:
            if "AVX2" in torch.backends.cpu.get_cpu_capability():
                tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)
            else:
                tensor = F.interpolate(tensor.float(), size=size, mode="bilinear", align_corners=False,
                                       antialias=True).round_().to(torch.uint8)
        pixels = tensor.to(torch.float32).sub_(127.5).div_(127.5)
        return pixels.permute(0, 2, 3, 1).numpy()

    @staticmethod
    def _box_prompts(boxes: list[tuple[float, float, float, float]] | None, labels: list[int] | None,
                     width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(1, N, 5) rows of (batch index 0, cx, cy, w, h) normalised by the original size, and (1, N) labels."""
        if not boxes:
            return np.zeros((1, 0, 5), np.float32), np.zeros((1, 0), np.int32)
        if labels is not None and len(labels) != len(boxes):
            raise InvalidPromptError("give one label per exemplar box")
        rows = []
        for x1, y1, x2, y2 in boxes:
            if not all(np.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
                raise InvalidPromptError(f"exemplar box {x1, y1, x2, y2} is empty or not finite")
            rows.append([0.0, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width,
                         (y2 - y1) / height])
        label_array = np.asarray(labels if labels is not None else [1] * len(boxes), np.int32)
        return np.asarray(rows, np.float32)[None], label_array[None]

    def _encode(self, pixels: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> tuple:
        """The image's features and the box prompts' encoding: shared by every phrase."""
        from keras import ops

        b = self.backbone
        fpn, pos = b.vision_encoder(pixels)
        fpn, pos = fpn[:-1], pos[:-1]
        # The box prompts do not depend on the phrase: encode them once, on the one image. (keras-hub's
        # geometry encoder also only broadcasts its 2-D prompt mask correctly for a batch of one.)
        geometry, geometry_mask = b.geometry_encoder(
            box_embeddings=ops.convert_to_tensor(boxes), box_masks=ops.convert_to_tensor(labels != PAD_LABEL),
            box_labels=ops.convert_to_tensor(np.where(labels == PAD_LABEL, 0, labels)),
            fpn_hidden_states=fpn[-1], fpn_position_encodings=pos[-1])
        return fpn, pos, geometry, geometry_mask

    def _decode(self, encoded_image: tuple, phrases: list[str]) -> dict:
        """Every query's outputs for ``phrases`` on the encoded image."""
        from keras import ops

        b = self.backbone
        count = len(phrases)
        fpn, pos, geometry, geometry_mask = encoded_image
        geometry, geometry_mask = ops.repeat(geometry, count, axis=0), ops.repeat(geometry_mask, count, axis=0)
        fpn = [ops.repeat(f, count, axis=0) for f in fpn]
        pos = [ops.repeat(p, count, axis=0) for p in pos]
        token_ids, padding = self.tokenizer(phrases)
        text = b.text_projection(b.text_encoder(token_ids, padding))
        prompts = ops.concatenate([text, geometry], axis=1)
        prompt_masks = ops.concatenate([ops.cast(ops.convert_to_tensor(padding), "bool"), geometry_mask], axis=1)
        encoded = b.detr_encoder(vision_features=fpn[-1], text_features=prompts, vision_pos_embeds=pos[-1],
                                 text_masks=prompt_masks)
        decoded = b.detr_decoder(vision_features=encoded[0], text_features=prompts, vision_pos_encodings=encoded[1],
                                 text_masks=prompt_masks)
        hidden = decoded[0]
        logits = b.dot_product_scoring(decoder_hidden_states=hidden, text_features=prompts, text_masks=prompt_masks)
        pred_boxes, pred_logits, presence_logits = b.box_decoder(
            box_offsets=b.detr_decoder.box_head(hidden), reference_boxes=decoded[1], pred_logits=logits,
            presence_logits=decoded[2])
        pred_masks, _ = b.mask_decoder(decoder_queries=hidden[:, -1], backbone_features=fpn,
                                       encoder_hidden_states=encoded[0], prompt_features=prompts,
                                       prompt_masks=prompt_masks)
        return {"logits": pred_logits, "presence": presence_logits, "boxes": pred_boxes, "masks": pred_masks}

    def _run(self, image: np.ndarray, phrases: list[str], boxes, box_labels, slot: WorkSlot | None = None):
        """Scores (P, Q), boxes in original pixels (P, Q, 4), low-resolution mask logits (P, Q, h, w): torch.

        With ``slot``, the image encode and then each phrase run inside ``slot(ENCODE_PIECE)`` and
        ``slot(PHRASE_PIECE)``: separate pieces of work, between which others (annotators' clicks) may go
        first. Without, every phrase runs in one batch."""
        import torch

        if not phrases:
            raise InvalidPromptError("SAM 3 needs at least one phrase")
        height, width = image.shape[:2]
        pixels = self._pixels(image)
        box_array, label_array = self._box_prompts(boxes, box_labels, width, height)
        slot = slot or _no_slot
        with slot(ENCODE_PIECE), self._lock, torch.no_grad(), self._device_scope():
            encoded_image = self._encode(pixels, box_array, label_array)
        parts = []
        for group in ([phrases] if slot is _no_slot else [[phrase] for phrase in phrases]):
            with slot(PHRASE_PIECE), self._lock, torch.no_grad(), self._device_scope():
                out = self._decode(encoded_image, group)
                scores = (torch.sigmoid(out["logits"]) * torch.sigmoid(out["presence"])).float()
                parts.append((scores, out["boxes"].float(), out["masks"].permute(0, 3, 1, 2).float()))
        scores, pboxes, masks = (torch.cat(column) for column in zip(*parts))
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=scores.device)
        return scores, pboxes * scale, masks

    @staticmethod
    def _upsample(logits, height: int, width: int) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            probabilities = torch.sigmoid(logits)[None]
            return F.interpolate(probabilities, size=(height, width), mode="bilinear",
                                 align_corners=False)[0].cpu().numpy()

    def predict_raw(self, image: np.ndarray, phrases: list[str],
                    boxes: list[tuple[float, float, float, float]] | None = None,
                    box_labels: list[int] | None = None) -> RawPrediction:
        """All queries for every phrase (full-size masks for every query: small images only)."""
        scores, pboxes, logits = self._run(image, phrases, boxes, box_labels)
        height, width = image.shape[:2]
        masks = np.stack([self._upsample(row, height, width) for row in logits])
        return RawPrediction(scores.cpu().numpy(), pboxes.cpu().numpy(), masks)

    def segment(self, image: np.ndarray, phrases: list[str], *, threshold: float,
                boxes: list[tuple[float, float, float, float]] | None = None,
                box_labels: list[int] | None = None, slot: WorkSlot | None = None) -> list[list[ConceptCandidate]]:
        """Instances scoring above ``threshold``, per phrase, best first; ``boxes`` are exemplars (xyxy pixels).
        Their masks are upsampled to the image's size only when asked (:meth:`ConceptCandidate.materialize`).
        ``slot`` (see :meth:`_run`) lets other work go first between the image encode and each phrase."""
        scores, pboxes, logits = self._run(image, phrases, boxes, box_labels, slot)
        height, width = image.shape[:2]
        scores, pboxes = scores.cpu().numpy(), pboxes.cpu().numpy()
        found: list[list[ConceptCandidate]] = []
        for row in range(len(phrases)):
            keep = [int(q) for q in np.argsort(-scores[row], kind="stable") if scores[row, q] > threshold]
            found.append([ConceptCandidate(float(scores[row, q]), tuple(float(v) for v in pboxes[row, q]),
                                           functools.partial(self._mask, logits[row, q], height, width))
                          for q in keep])
        return found

    @classmethod
    def _mask(cls, logits, height: int, width: int) -> np.ndarray:
        return cls._upsample(logits[None], height, width)[0] > 0.5
