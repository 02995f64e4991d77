"""Pre-encoding in one process: which images to queue (a connected project's, an opened task's look-ahead,
new tasks, ``/warmup``'s) and how each is made ready (here through the encode gate, or on RQ workers).

Built by the runtime from the settings; what it needs of the process (SAM, the embedding of an image, the
image loader, Label Studio's address and token) it receives as callables, read at call time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from ml_backend.embeddings.jobs import IN_FLIGHT, RQEncoder
from ml_backend.embeddings.projects import image_key_of, project_images, task_image
from ml_backend.embeddings.scheduler import EncodeJob, PreEncodeScheduler, project_id
from ml_backend.embeddings.urls import UrlIndex
from ml_backend.errors import BackendError
from ml_backend.sam.encode_gate import Priority
from ml_backend.sam.engine import ImageEmbedding
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

PREENCODE_SAM_WAIT_S = 3600.0  # background work waits for SAM to load
WARMUP_PROJECT = 0  # /warmup with bare tasks: their progress shows under project "0"


class PreEncoding:
    """Queues images for encoding and makes each ready; ``scheduler`` holds the order and the progress."""

    def __init__(self, settings: Settings, *, sam: Callable[[float], object],
                 embed: Callable[[np.ndarray, Priority], ImageEmbedding],
                 load_image: Callable[[str, int | None, int | None], np.ndarray], url_index: UrlIndex,
                 label_studio: Callable[[], tuple[str, str]], store: Callable[[], object | None]) -> None:
        """``load_image(url, task_id, project)``: a task's image; ``sam(timeout_s)``: the SAM engine once loaded; ``label_studio()``: its URL and token as known now;
        ``store()``: the loaded SAM's embedding store (None while loading or without one)."""
        self.settings = settings
        self._sam, self._embed, self._load_image = sam, embed, load_image
        self.url_index = url_index
        self._label_studio = label_studio
        self._store = store
        self._connected: set[int] = set()
        self._image_keys: dict[int, str] = {}  # project -> its config's image field
        self._connect_lock = threading.Lock()
        self.scheduler = self._build_scheduler(settings)

    def _build_scheduler(self, settings: Settings) -> PreEncodeScheduler:
        """Encode here (one thread, through the encode gate) or on RQ workers (several jobs in flight)."""
        encode, threads = self._preencode, 1
        if settings.preencode_executor == "rq":
            on_workers = RQEncoder(settings.redis_url, self._label_studio)
            encode, threads = (lambda job: self._already_ready(job) or on_workers(job)), IN_FLIGHT
        return PreEncodeScheduler(encode, lookahead=settings.preencode_lookahead,
                                  log_every=settings.preencode_log_every, threads=threads)

    def _already_ready(self, job: EncodeJob) -> str | None:
        """"ready" when the URL's embedding is known and stored, without loading the image; else None."""
        engine = self._sam(PREENCODE_SAM_WAIT_S)
        key = self.url_index.lookup(job.url, self.url_index.validator(job.url, _task_project(job)))
        if key is None or not engine.is_ready(key):
            return None
        if job.urgent:
            engine.cached(key)  # about to be clicked: read it into memory now
        return "ready"

    def _preencode(self, job: EncodeJob) -> str:
        """Make one queued image ready: "ready" when it already was, "encoded" otherwise; raises on failure."""
        if self._already_ready(job):
            return "ready"
        engine = self._sam(PREENCODE_SAM_WAIT_S)
        validator = self.url_index.validator(job.url, _task_project(job))
        encodes = engine.images_encoded
        image = self._load_image(job.url, job.task_id, _task_project(job))
        embedding = self._embed(image, Priority.BACKGROUND)  # after waiting clicks
        self.url_index.remember(job.url, embedding.key, validator)
        return "encoded" if engine.images_encoded > encodes else "ready"

    def project_connected(self, project_value: object, label_config: str | None) -> None:
        """First ``/setup`` (or first opened task) of a project in this process: queue all its images.

        Listing runs in a thread: ``/setup`` must answer within Label Studio's 3 s.
        """
        project = project_id(project_value)
        url, token = self._label_studio()
        if not self.settings.preencode or project is None or not (url and token):
            return
        with self._connect_lock:
            if project in self._connected:
                return
            self._connected.add(project)
        threading.Thread(target=self._queue_project, args=(project, label_config), name=f"preencode-list-{project}",
                         daemon=True).start()

    def _queue_project(self, project: int, label_config: str | None) -> None:
        url, token = self._label_studio()
        try:
            image_field, images = project_images(url, token, project, label_config=label_config,
                                               max_tasks=self.settings.preencode_max_tasks)
        except BackendError as exc:
            logger.warning("pre-encoding project %d: cannot list its tasks: %s", project, exc.message)
            with self._connect_lock:
                self._connected.discard(project)  # try again at the next /setup
            return
        self._image_keys[project] = image_field
        self.scheduler.add_project(project, images)

    def task_opened(self, task: dict, image_field: str, project_value: object = None) -> None:
        """An annotator opened ``task`` (automatic ``/predict`` or a click): its image and the next ones first."""
        if not self.settings.preencode:
            return
        project = project_id(task.get("project")) or project_id(project_value)
        image = task_image(task, image_field)
        if project is None or image is None:
            return
        self._image_keys.setdefault(project, image_field)
        self.scheduler.opened(project, image)
        self.project_connected(project, None)

    def tasks_created(self, payload: dict) -> int:
        """``TASKS_CREATED``: queue the new tasks' images; the number queued."""
        project_info = payload.get("project")
        project = project_id(project_info.get("id") if isinstance(project_info, dict) else project_info)
        tasks = payload.get("tasks")
        if not self.settings.preencode or project is None or not isinstance(tasks, list):
            return 0
        image_field = self._image_keys.get(project)
        if image_field is None and isinstance(project_info, dict) and isinstance(project_info.get("label_config"), str):
            try:
                image_field = self._image_keys[project] = image_key_of(project_info["label_config"])
            except BackendError:
                return 0
        if image_field is None:
            return 0
        return self.scheduler.add_tasks(project, [image for task in tasks
                                                  if (image := task_image(task, image_field)) is not None])

    def warm(self, tasks: list[dict], image_key_name: str, project: int | None = None) -> int:
        """``/warmup``: queue the tasks' images (whatever ``PREENCODE`` says); the number queued."""
        images = [image for task in tasks if (image := task_image(task, image_key_name)) is not None]
        return self.scheduler.add_project(project or WARMUP_PROJECT, images)

    def status(self) -> dict:
        status: dict = {"enabled": self.settings.preencode, "executor": self.settings.preencode_executor,
                        "lookahead": self.settings.preencode_lookahead, "projects": self.scheduler.status()}
        store = self._store()
        if store is not None:
            usage = store.usage()
            status["store"] = {"model": store.model_id, "dtype": str(store.dtype), "files": usage.files,
                               "bytes": usage.bytes, "max_bytes": usage.max_bytes}
        return status


def _task_project(job: EncodeJob) -> int | None:
    """The project whose local storages the job's image must lie in; None for ``/warmup``'s bare tasks (sent
    with the backend's credentials, not by Label Studio), which only LOCAL_FILES_DOCUMENT_ROOT limits."""
    return None if job.project == WARMUP_PROJECT else job.project
