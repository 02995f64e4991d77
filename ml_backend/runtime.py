"""What a running backend process holds: settings, the SAM engine, the image loader, the trimap model.

Built once per process by the app factory (never at import). SAM loads in a
background thread so the server answers ``/health`` and ``/setup`` at once; the
first click waits for it.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

import numpy as np

from ml_backend.errors import BackendError, ModelSourceError
from ml_backend.prompt_state import PromptMemory
from ml_backend.sam.cache import ByteBoundedLRU
from ml_backend.sam.engine import ImageEmbedding, image_key
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

URL_KEY_ENTRIES = 100_000
SAM_WAIT_S = 80.0  # Label Studio gives /predict 100 s: answer 503 "still loading" before that


@dataclass
class LabelStudioAccess:
    """Where Label Studio is and the token to reach it: from the settings, else from ``/setup``."""

    url: str = ""
    token: str = ""


class Runtime:
    """The long-lived parts of one backend process."""

    def __init__(self, settings: Settings, *, engine=None) -> None:
        from ml_backend.images import ImageLoader
        from ml_backend.preannotation import TrimapPredictor

        self.settings = settings
        self.access = LabelStudioAccess(settings.label_studio_url, settings.label_studio_api_key)
        self.images = ImageLoader(settings)
        self.trimaps = TrimapPredictor(settings.model_dir)
        # The object being segmented on each task (prompts and last logits), between clicks.
        self.prompt_state = PromptMemory.from_settings(settings)
        # Image URL -> pixel-content key of its embedding, so a further click skips download and decoding.
        self.url_keys: ByteBoundedLRU[str] = ByteBoundedLRU(URL_KEY_ENTRIES, lambda key: 1)
        self._engine = engine
        self._engine_error: BackendError | None = None
        self._engine_ready = threading.Event()
        if engine is not None:
            self._engine_ready.set()
        self.retrainer = _build_retrainer(settings, lambda: (self.access.url, self.access.token))

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
        return {"state": "ready", "source": self._engine.source, "cached_images": len(self._engine.cache)}

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
        embedding = engine.embed(self.load_image(url, task_id))
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

        def prefetch_when_ready() -> None:
            try:
                self.sam().prefetch(loaders)
            except BackendError as exc:
                logger.warning("warm-up skipped: %s", exc.message)

        threading.Thread(target=prefetch_when_ready, name="sam-warmup", daemon=True).start()
        return len(loaders)

    # --- training ------------------------------------------------------------
    def on_webhook(self, event: str, payload: dict) -> dict:
        """Webhooks and ``/train``: count accepted annotations, maybe start a job; never train inline."""
        return self.retrainer.on_webhook(event, payload)

    def training_status(self, project: str | None) -> dict:
        """One project's training state (``?project=``), or every project's."""
        return self.retrainer.status(project)

    def trimap_versions(self) -> list[dict]:
        return self.trimaps.list_versions()


def _build_retrainer(settings: Settings, access):
    from ml_backend.retrain import build_retrainer

    return build_retrainer(settings, access)
