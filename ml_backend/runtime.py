"""What a running backend process holds: settings, the SAM engine, the image loader, the trimap model,
and the services wired to them (pre-encoding, SAM 3, retraining), each built from the settings.

Built once per process by the app factory (never at import). SAM loads in a
background thread so the server answers ``/health`` and ``/setup`` at once; the
first click waits for it.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from ml_backend import metrics
from ml_backend.embeddings.redis_shared import RedisEncodeLocks, RedisUrlRecords
from ml_backend.embeddings.service import PreEncoding
from ml_backend.embeddings.urls import UrlIndex
from ml_backend.errors import BackendError, ModelSourceError, ModelUnavailableError
from ml_backend.images import ImageLoader
from ml_backend.label_studio_api import LabelStudioAccess
from ml_backend.preannotation import TrimapPredictor
from ml_backend.prompt_state import PromptMemory
from ml_backend.retrain import build_retrainer
from ml_backend.retrain.jobs import redis_connection
from ml_backend.sam.encode_gate import EncodeGate, Priority
from ml_backend.sam.engine import ImageEmbedding, image_key
from ml_backend.sam import loading as sam_loading
from ml_backend.sam3.wiring import Sam3Wiring
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

SAM_WAIT_S = 80.0  # Label Studio gives /predict 100 s: answer 503 "still loading" before that
SAM_RETRY_AFTER_S = 60  # Retry-After of that answer
# A first click queued for an encode is served while its answer still fits in Label Studio's 100 s,
# less this much for downloading, decoding, the decoder and the JSON answer.
ENCODE_ANSWER_WITHIN_S = 85.0


class Runtime:
    """The long-lived parts of one backend process."""

    def __init__(self, settings: Settings, *, engine=None, sam3_engine=None) -> None:
        self.settings = settings
        self.access = LabelStudioAccess(settings.label_studio_url, settings.label_studio_api_key)
        self.images = ImageLoader(settings)
        self.trimaps = TrimapPredictor(settings.model_dir, settings.base_model, min_area=settings.min_mask_area)
        # With REDIS_URL, every replica shares the prompt state, the URL index and the encode locks through Redis.
        redis = redis_connection(settings.redis_url, fail_fast=True) if settings.redis_url else None
        # The object being segmented on each task (prompts and last logits), between clicks.
        self.prompt_state = PromptMemory.from_settings(settings, redis=redis)
        # Image URL -> pixel-content key of its embedding, so a click skips download and decoding.
        self.url_index = UrlIndex(lambda url, project: self.images.local_file(
                                      url, label_studio_url=self.access.url or None, token=self.access.token or None,
                                      project=project),
                                  ttl_s=settings.url_key_ttl_s, origin=lambda: self.access.url,
                                  shared=None if redis is None else RedisUrlRecords(
                                      redis, remote_ttl_s=settings.url_key_ttl_s))
        # One encode per image among the replicas; a first click waits for another's at most until its answer is due.
        self.encode_locks = None if redis is None else RedisEncodeLocks(redis, max_wait_s=ENCODE_ANSWER_WITHIN_S)
        # At most N encodes at once; further first clicks queue briefly, then get 503 + Retry-After.
        self.encode_gate = EncodeGate.from_settings(settings)
        self._engine = engine
        self._engine_error: BackendError | None = None
        self._engine_ready = threading.Event()
        if engine is not None:
            self._attach(engine)
            self._engine_ready.set()
        self.preencoding = PreEncoding(settings, sam=self.sam, embed=self.embed, load_image=self.load_image,
                                       url_index=self.url_index, label_studio=self.label_studio,
                                       store=lambda: self._engine.store if self._engine is not None else None)
        self.retrainer = build_retrainer(settings, self.label_studio)
        self.sam3_wiring = Sam3Wiring(settings, encode_gate=self.encode_gate, label_studio=self.label_studio,
                                      trimap_version=self.trimaps.current_version, sam3_engine=sam3_engine)
        # What the app, the backend and the workers reach for.
        self.preencoder = self.preencoding.scheduler
        w = self.sam3_wiring
        self.sam3, self.concepts, self.exemplars, self.phrases = w.sam3, w.concepts, w.exemplars, w.phrases
        self.preannotation_jobs = w.preannotation_jobs

    # --- SAM -----------------------------------------------------------------
    def start_loading_sam(self) -> None:
        if self._engine_ready.is_set():
            return
        threading.Thread(target=self._load_sam, name="sam-loader", daemon=True).start()

    def _load_sam(self) -> None:
        try:
            engine = sam_loading.load_engine(self.settings)  # looked up at call time: tests stand in for it
            self._warm_up(engine)
            self._attach(engine)
            self._engine = engine
            logger.info("SAM ready: %s", engine.source)
        except BackendError as exc:
            logger.error("SAM could not be loaded: %s", exc.message)
            self._engine_error = exc
        except Exception as exc:  # keep serving batch predictions and health even without SAM
            logger.exception("SAM could not be loaded")
            self._engine_error = ModelSourceError(f"SAM could not be loaded: {exc}")
        finally:
            self._engine_ready.set()

    def _attach(self, engine) -> None:
        """Give the URL index the engine's embedding store, and the engine the replicas' encode locks."""
        self.url_index.store = engine.store
        engine.encode_locks = self.encode_locks

    def _warm_up(self, engine) -> None:
        """One encode of a blank image and a decode of each prompt kind before SAM counts as ready:
        torch's first-call costs and the decoder's traces are paid here instead of by annotators'
        clicks, and the encode gate learns how long an encode takes, so it can refuse an overloaded
        first click at once rather than after waiting."""
        started = time.perf_counter()
        with self.encode_gate.slot(Priority.BACKGROUND):
            engine.warm_up()
        logger.info("SAM warm-up (one encode, four decodes) took %.2f s", time.perf_counter() - started)

    def sam(self, timeout_s: float | None = None):
        """The SAM engine, waiting for it to finish loading (less long than Label Studio waits for us)."""
        if not self._engine_ready.wait(SAM_WAIT_S if timeout_s is None else timeout_s):
            raise ModelUnavailableError("SAM is still loading; try again in a minute.", retry_after_s=SAM_RETRY_AFTER_S)
        if self._engine is None:  # unavailable, not broken: 503 with the reason (no Retry-After: it needs a restart)
            reason = self._engine_error.message if self._engine_error else "SAM is not loaded."
            raise ModelUnavailableError(f"SAM is unavailable: {reason} Fix the model settings (SAM_MODEL, SAM_DEVICE) "
                                        "and restart the backend; batch pre-annotation works meanwhile.")
        return self._engine

    def sam_status(self) -> dict:
        if not self._engine_ready.is_set():
            return {"state": "loading", "source": self.settings.sam_model or "default"}
        if self._engine is None:
            return {"state": "failed", "error": self._engine_error.message if self._engine_error else "unknown"}
        return {"state": "ready", "source": self._engine.source, "cached_images": len(self._engine.cache),
                "encodes": self.encode_gate.status(), "images_encoded": self._engine.images_encoded}

    def embed(self, image: np.ndarray, priority: Priority = Priority.INTERACTIVE) -> ImageEmbedding:
        """The SAM embedding of a decoded image: from memory or the embedding store at once, else encoded
        when the gate admits it (interactive callers may get :class:`EncodeBusyError`, HTTP 503)."""
        engine = self.sam()
        key = image_key(image)
        if (embedding := engine.cached(key)) is None and engine.encoding_elsewhere(key):
            # Another worker or replica encoding this image: wait for it outside the slots, so this
            # process's other first clicks do not queue behind a slot that only waits; the gate counts it.
            with self.encode_gate.waiting_elsewhere(priority):
                engine.wait_for_encode_elsewhere(key)
            embedding = engine.cached(key)
        if embedding is not None:
            metrics.embedding_lookup(True, priority.name.lower())
            return embedding
        with self.encode_gate.slot(priority) as slot:
            metrics.encode_waited(priority.name.lower(), slot.waited_s)
            if engine.is_ready(key):  # encoded (here or by another process) while this caller queued
                slot.untimed()
            started = time.perf_counter()
            encodes = engine.images_encoded
            embedding = engine.embed(image)
            metrics.embedding_lookup(engine.images_encoded == encodes, priority.name.lower())
            if engine.images_encoded == encodes:
                slot.untimed()
            if slot.timed:
                logger.info("encoded image %s in %.2f s after queueing %.2f s (%s)", key[:12],
                            time.perf_counter() - started, slot.waited_s, priority.name.lower())
        return embedding

    # --- images --------------------------------------------------------------
    def label_studio(self) -> tuple[str, str]:
        """Label Studio's URL and token as known now (``/setup`` may fill them in, an RQ job replace them)."""
        return self.access.url, self.access.token

    def remember_label_studio(self, hostname: str | None, token: str | None) -> None:
        """Use what ``/setup`` tells us where the settings left it open."""
        if hostname and not self.settings.label_studio_url:
            self.access.url = hostname.rstrip("/")
        if token and not self.settings.label_studio_api_key:
            self.access.token = token

    def load_image(self, url: str, task_id: int | None = None, project: int | None = None) -> np.ndarray:
        """A task's image; ``project``, the task's project, limits reads from this disk to its local storages."""
        return self.images.load(url, label_studio_url=self.access.url or None, token=self.access.token or None,
                                task_id=task_id, project=project)

    def task_embedding(self, url: str, task_id: int | None = None, project: int | None = None) -> ImageEmbedding:
        """The SAM embedding of the image at ``url``: without touching the image when its embedding is
        known (memory or store) and the URL still points at the same file, else loaded, decoded and embedded."""
        engine = self.sam()
        validator = self.url_index.validator(url, project)  # None for a file the project may not read
        key = self.url_index.lookup(url, validator)
        if key is not None and (embedding := engine.cached(key)) is not None:
            metrics.embedding_lookup(True, Priority.INTERACTIVE.name.lower())
            return embedding
        # Most likely a new image: when the queue (with the first clicks still preparing theirs) is already too
        # long, refuse before spending seconds on downloading, decoding and hashing it: answered at once.
        with self.encode_gate.preparing():
            image = self.load_image(url, task_id, project)
        embedding = self.embed(image)
        self.url_index.remember(url, embedding.key, validator)
        return embedding

    # --- training ------------------------------------------------------------
    def on_webhook(self, event: str, payload: dict) -> dict:
        """Webhooks and ``/train``: count accepted annotations, maybe start a job; never train inline.
        ``TASKS_CREATED`` also queues the new tasks' images for pre-encoding."""
        answer = self.retrainer.on_webhook(event, payload)
        if event == "TASKS_CREATED":
            answer = {**answer, "preencode_queued": self.preencoding.tasks_created(payload)}
        return answer

    def training_status(self, project: str | None) -> dict:
        """One project's training state (``?project=``), or every project's."""
        return self.retrainer.status(project)

    def trimap_versions(self, project: int | None) -> dict:
        """A project's versions and what serves it; without a project, what serves projects without a model."""
        return {"project": project, "serving": self.trimaps.current_version(project),
                "versions": self.trimaps.list_versions(project)}
