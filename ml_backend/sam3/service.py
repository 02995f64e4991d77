"""The process's SAM 3 engine: loaded once in a background thread, waited for by its users."""

from __future__ import annotations

import logging
import threading

from ml_backend.errors import BackendError, ModelSourceError
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

SAM3_WAIT_S = 80.0  # under Label Studio's 100 s for /predict


class Sam3Service:
    def __init__(self, settings: Settings, engine=None) -> None:
        self.settings = settings
        self._engine = engine
        self._error: BackendError | None = None
        self._ready = threading.Event()
        if engine is not None:
            self._ready.set()

    def start_loading(self) -> None:
        if not self._ready.is_set():
            threading.Thread(target=self._load, name="sam3-loader", daemon=True).start()

    def _load(self) -> None:
        from ml_backend.sam3.loading import load_sam3_engine

        s = self.settings
        try:
            self._engine = load_sam3_engine(s.sam3_model, device=s.sam3_device, half=s.sam3_half)
            logger.info("SAM 3 ready: %s", s.sam3_model)
        except BackendError as exc:
            logger.error("SAM 3 could not be loaded: %s", exc.message)
            self._error = exc
        except Exception as exc:  # keep serving everything else
            logger.exception("SAM 3 could not be loaded")
            self._error = ModelSourceError(f"SAM 3 could not be loaded: {exc}")
        finally:
            self._ready.set()

    def engine(self, timeout_s: float | None = None):
        if not self._ready.wait(SAM3_WAIT_S if timeout_s is None else timeout_s):
            raise BackendError("SAM 3 is still loading; try again in a minute.", status_code=503)
        if self._engine is None:
            raise self._error or ModelSourceError("SAM 3 is not loaded.")
        return self._engine

    def status(self) -> dict:
        if not self._ready.is_set():
            return {"state": "loading", "source": self.settings.sam3_model}
        if self._engine is None:
            return {"state": "failed", "error": self._error.message if self._error else "unknown"}
        return {"state": "ready", "source": self.settings.sam3_model}
