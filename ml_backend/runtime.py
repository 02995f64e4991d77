"""What a running backend process holds: settings, the SAM engine, the image loader, the trimap model.

Built once per process by the app factory (never at import). SAM loads in a
background thread so the server answers ``/health`` and ``/setup`` at once; the
first click waits for it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from ml_backend.errors import BackendError, ModelSourceError
from ml_backend.sam.cache import ByteBoundedLRU
from ml_backend.sam.encode_gate import EncodeGate, Priority
from ml_backend.sam.engine import ImageEmbedding, image_key
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

REFINEMENT_CACHE_BYTES = 64 << 20  # low-resolution logits: 256 KiB each for the official SAM sizes
URL_KEY_ENTRIES = 100_000
SAM_WAIT_S = 80.0  # Label Studio gives /predict 100 s: answer 503 "still loading" before that


@dataclass
class LabelStudioAccess:
    """Where Label Studio is and the token to reach it: from the settings, else from ``/setup``."""

    url: str = ""
    token: str = ""


class Runtime:
    """The long-lived parts of one backend process."""

    def __init__(self, settings: Settings, *, engine=None, sam3_engine=None) -> None:
        from ml_backend.images import ImageLoader
        from ml_backend.preannotation import TrimapPredictor

        self.settings = settings
        self.access = LabelStudioAccess(settings.label_studio_url, settings.label_studio_api_key)
        self.images = ImageLoader(settings)
        self.trimaps = TrimapPredictor(settings.model_dir)
        # The last low-resolution logits per (image, prompt region), fed back to SAM on the next click.
        self.refinements: ByteBoundedLRU[np.ndarray] = ByteBoundedLRU(REFINEMENT_CACHE_BYTES, lambda a: a.nbytes)
        # Image URL -> pixel-content key of its embedding, so a further click skips download and decoding.
        self.url_keys: ByteBoundedLRU[str] = ByteBoundedLRU(URL_KEY_ENTRIES, lambda key: 1)
        # At most N encodes at once; further first clicks queue briefly, then get 503 + Retry-After.
        self.encode_gate = EncodeGate(encode_slots(settings), settings.encode_queue_timeout_s)
        self._engine = engine
        self._engine_error: BackendError | None = None
        self._engine_ready = threading.Event()
        if engine is not None:
            self._engine_ready.set()
        self.retrainer = _build_retrainer(settings, lambda: (self.access.url, self.access.token))
        self._build_concept_preannotation(sam3_engine)

    # --- SAM -----------------------------------------------------------------
    def start_loading_sam(self) -> None:
        if self._engine_ready.is_set():
            return
        threading.Thread(target=self._load_sam, name="sam-loader", daemon=True).start()

    def _load_sam(self) -> None:
        from ml_backend.sam.loading import load_engine

        try:
            self._engine = load_engine(self.settings)
            logger.info("SAM ready: %s", self._engine.source)
        except BackendError as exc:
            logger.error("SAM could not be loaded: %s", exc.message)
            self._engine_error = exc
        except Exception as exc:  # keep serving batch predictions and health even without SAM
            logger.exception("SAM could not be loaded")
            self._engine_error = ModelSourceError(f"SAM could not be loaded: {exc}")
        finally:
            self._engine_ready.set()

    def sam(self, timeout_s: float | None = None):
        """The SAM engine, waiting for it to finish loading (less long than Label Studio waits for us)."""
        if not self._engine_ready.wait(SAM_WAIT_S if timeout_s is None else timeout_s):
            raise BackendError("SAM is still loading; try again in a minute.", status_code=503)
        if self._engine is None:
            raise self._engine_error or ModelSourceError("SAM is not loaded.")
        return self._engine

    def sam_status(self) -> dict:
        if not self._engine_ready.is_set():
            return {"state": "loading", "source": self.settings.sam_model or "default"}
        if self._engine is None:
            return {"state": "failed", "error": self._engine_error.message if self._engine_error else "unknown"}
        return {"state": "ready", "source": self._engine.source, "cached_images": len(self._engine.cache),
                "encodes": self.encode_gate.status()}

    def embed(self, image: np.ndarray, priority: Priority = Priority.INTERACTIVE) -> ImageEmbedding:
        """The SAM embedding of a decoded image: from the cache at once, else encoded when the gate
        admits it (interactive callers may get :class:`EncodeBusyError`, HTTP 503)."""
        engine = self.sam()
        key = image_key(image)
        if (embedding := engine.cache.get(key)) is not None:
            return embedding
        with self.encode_gate.slot(priority) as slot:
            if key in engine.cache:  # encoded while this caller queued
                slot.untimed()
            started = time.perf_counter()
            embedding = engine.embed(image)
            if slot.timed:
                logger.info("encoded image %s in %.2f s after queueing %.2f s (%s)", key[:12],
                            time.perf_counter() - started, slot.waited_s, priority.name.lower())
        return embedding

    # --- images --------------------------------------------------------------
    def remember_label_studio(self, hostname: str | None, token: str | None) -> None:
        """Use what ``/setup`` tells us where the settings left it open."""
        if hostname and not self.settings.label_studio_url:
            self.access.url = hostname.rstrip("/")
        if token and not self.settings.label_studio_api_key:
            self.access.token = token

    def load_image(self, url: str, task_id: int | None = None) -> np.ndarray:
        return self.images.load(url, label_studio_url=self.access.url or None, token=self.access.token or None,
                                task_id=task_id)

    def task_embedding(self, url: str, task_id: int | None = None) -> ImageEmbedding:
        """The SAM embedding of the image at ``url``: from the cache without touching the image when
        a click on it came before, else loaded, decoded and embedded."""
        engine = self.sam()
        key = self.url_keys.get(url)
        if key is not None and (embedding := engine.cache.get(key)) is not None:
            return embedding
        embedding = self.embed(self.load_image(url, task_id))
        self.url_keys.put(url, embedding.key)
        return embedding

    def _load_and_remember(self, url: str, task_id: int | None) -> np.ndarray:
        image = self.load_image(url, task_id)
        self.url_keys.put(url, image_key(image))
        return image

    def warm(self, tasks: list[dict], image_key_name: str) -> int:
        """Embed the tasks' images in the background, once SAM is loaded; the number queued."""
        loaders = [
            functools.partial(self._load_and_remember, task["data"][image_key_name],
                              task.get("id") if isinstance(task.get("id"), int) else None)
            for task in tasks
            if isinstance(task, dict) and isinstance(task.get("data"), dict)
            and isinstance(task["data"].get(image_key_name), str)
        ]

        def embed_all() -> None:
            try:
                self.sam()
            except BackendError as exc:
                logger.warning("warm-up skipped: %s", exc.message)
                return
            for load in loaders:
                try:
                    self.embed(load(), Priority.BACKGROUND)  # after any waiting first click
                except BackendError as exc:
                    logger.warning("warm-up: skipping an image: %s", exc.message)
                except Exception:  # one bad image must not stop warming the rest
                    logger.warning("warm-up: skipping an image that could not be embedded", exc_info=True)

        threading.Thread(target=embed_all, name="sam-warmup", daemon=True).start()
        return len(loaders)

    # --- SAM 3 concept pre-annotation (sam3) ------------------------------------
    def _build_concept_preannotation(self, sam3_engine) -> None:
        from ml_backend.sam3.job import JobContext, ProjectPreannotationJobs
        from ml_backend.sam3.preannotate import ConceptPreannotator
        from ml_backend.sam3.service import Sam3Service

        self.sam3 = Sam3Service(self.settings, sam3_engine) if self.settings.preannotate != "trimap" else None
        self.concepts = ConceptPreannotator(self.settings, self.sam3.engine) if self.sam3 else None
        self.preannotation_jobs = ProjectPreannotationJobs(
            JobContext(access=lambda: (self.access.url, self.access.token), predict=self._job_prediction,
                       model_version=self.batch_model_version, background_slot=self._background_slot),
            self.settings.model_dir / "sam3-jobs.json")

    def batch_model_version(self) -> str:
        """The model version of batch predictions under the current PREANNOTATE and trimap version."""
        from ml_backend.backend import trimap_model_version

        trimap_version = self.trimaps.current_version()
        return self.concepts.model_version(trimap_version) if self.concepts else trimap_model_version(trimap_version)

    def _job_prediction(self, task: dict, label_config: str) -> dict:
        from ml_backend.backend import SegmentationBackend

        return SegmentationBackend(label_config, runtime=self).preannotation(task)

    @contextlib.contextmanager
    def _background_slot(self):
        """Project jobs run one image at a time behind annotators' first clicks (the SAM encode gate)."""
        with self.encode_gate.slot(Priority.BACKGROUND) as slot:
            slot.untimed()  # a SAM 3 image is not a SAM encode: keep the gate's wait estimate clean
            yield

    def start_background_work(self) -> None:
        """Load SAM 3 (when pre-annotation uses it) and resume the project jobs a previous process left."""
        if self.sam3 is not None:
            self.sam3.start_loading()
        self.preannotation_jobs.resume()

    # --- training ------------------------------------------------------------
    def on_webhook(self, event: str, payload: dict) -> dict:
        """Webhooks and ``/train``: count accepted annotations, maybe start a job; never train inline."""
        return self.retrainer.on_webhook(event, payload)

    def training_status(self, project: str | None) -> dict:
        """One project's training state (``?project=``), or every project's."""
        return self.retrainer.status(project)

    def trimap_versions(self) -> list[dict]:
        return self.trimaps.list_versions()


def encode_slots(settings: Settings) -> int:
    """ENCODE_CONCURRENCY, or by device: 1 on CPU (an encode takes every core), 2 on a GPU (one
    image's host-side resizing and transfer overlap the other's encode)."""
    if settings.encode_concurrency:
        return settings.encode_concurrency
    if settings.sam_device.startswith("cuda"):
        return 2
    if settings.sam_device == "auto":
        import torch

        return 2 if torch.cuda.is_available() else 1
    return 1


def _build_retrainer(settings: Settings, access):
    from ml_backend.retrain import build_retrainer

    return build_retrainer(settings, access)
