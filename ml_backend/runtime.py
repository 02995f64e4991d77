"""What a running backend process holds: settings, the SAM engine, the image loader, the trimap model.

Built once per process by the app factory (never at import). SAM loads in a
background thread so the server answers ``/health`` and ``/setup`` at once; the
first click waits for it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from ml_backend import metrics
from ml_backend.embeddings.jobs import IN_FLIGHT, RQEncoder
from ml_backend.embeddings.projects import image_key_of, project_images, task_image
from ml_backend.embeddings.scheduler import EncodeJob, PreEncodeScheduler, project_id
from ml_backend.embeddings.urls import UrlIndex
from ml_backend.errors import BackendError, ModelSourceError, ModelUnavailableError
from ml_backend.images import ImageLoader
from ml_backend.label_studio_api import LabelStudioAccess
from ml_backend.preannotation import TrimapPredictor, trimap_model_version
from ml_backend.prompt_state import PromptMemory
from ml_backend.retrain import build_retrainer
from ml_backend.retrain.jobs import redis_connection
from ml_backend.sam.encode_gate import EncodeGate, Priority
from ml_backend.sam.engine import ImageEmbedding, image_key
from ml_backend.sam import loading as sam_loading
from ml_backend.sam3.exemplar import ExemplarSegmenter
from ml_backend.sam3.job import JobContext, ProjectPreannotationJobs
from ml_backend.sam3.phrase import PhraseSegmenter
from ml_backend.sam3.preannotate import ConceptPreannotator
from ml_backend.sam3.rq_jobs import RQProjectJobs
from ml_backend.sam3.service import Sam3Service
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

SAM_WAIT_S = 80.0  # Label Studio gives /predict 100 s: answer 503 "still loading" before that
SAM_RETRY_AFTER_S = 60  # Retry-After of that answer
# A first click queued for an encode is served while its answer still fits in Label Studio's 100 s,
# less this much for downloading, decoding, the decoder and the JSON answer.
ENCODE_ANSWER_WITHIN_S = 85.0
PREENCODE_SAM_WAIT_S = 3600.0  # background work waits for SAM to load
WARMUP_PROJECT = 0  # /warmup with bare tasks: their progress shows under project "0"
# Set while a project job runs on this thread: the priority its SAM 3 work takes in the encode gate.
_SAM3_PRIORITY: contextvars.ContextVar[Priority | None] = contextvars.ContextVar("sam3_priority", default=None)


class Runtime:
    """The long-lived parts of one backend process."""

    def __init__(self, settings: Settings, *, engine=None, sam3_engine=None) -> None:
        self.settings = settings
        self.access = LabelStudioAccess(settings.label_studio_url, settings.label_studio_api_key)
        self.images = ImageLoader(settings)
        self.trimaps = TrimapPredictor(settings.model_dir, settings.base_model, min_area=settings.min_mask_area)
        # The object being segmented on each task (prompts and last logits), between clicks.
        self.prompt_state = PromptMemory.from_settings(settings)
        # Image URL -> pixel-content key of its embedding, so a click skips download and decoding.
        self.url_index = UrlIndex(lambda url: self.images.local_file(url, label_studio_url=self.access.url or None),
                                  ttl_s=settings.url_key_ttl_s, origin=lambda: self.access.url)
        # At most N encodes at once; further first clicks queue briefly, then get 503 + Retry-After.
        self.encode_gate = EncodeGate.from_settings(settings)
        self.preencoder = self._build_preencoder(settings)
        self._connected: set[int] = set()
        self._preannotated_on_connect: set[int] = set()  # projects whose SAM 3 job /setup queued here
        self._image_keys: dict[int, str] = {}  # project -> its config's image field
        self._connect_lock = threading.Lock()
        self._engine = engine
        self._engine_error: BackendError | None = None
        self._engine_ready = threading.Event()
        if engine is not None:
            self.url_index.store = engine.store
            self._engine_ready.set()
        # The batch pre-annotation of one task (task, label config, project) -> prediction, for project jobs.
        # The backend layer owns it; whoever serves jobs (the app, a SAM 3 worker) installs it here.
        self.predict_task: Callable[[dict, str, int], dict] | None = None
        self.retrainer = build_retrainer(settings, lambda: (self.access.url, self.access.token))
        self._build_concept_preannotation(sam3_engine)

    # --- SAM -----------------------------------------------------------------
    def start_loading_sam(self) -> None:
        if self._engine_ready.is_set():
            return
        threading.Thread(target=self._load_sam, name="sam-loader", daemon=True).start()

    def _load_sam(self) -> None:
        try:
            engine = sam_loading.load_engine(self.settings)  # looked up at call time: tests stand in for it
            self._warm_up(engine)
            self.url_index.store = engine.store
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
        if (embedding := engine.cached(key)) is None:
            # Another worker or replica encoding this image: wait for it outside the gate, so this
            # process's other first clicks do not queue behind a slot that only waits.
            engine.wait_while_encoded_elsewhere(key)
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
        """The SAM embedding of the image at ``url``: without touching the image when its embedding is
        known (memory or store) and the URL still points at the same file, else loaded, decoded and embedded."""
        engine = self.sam()
        validator = self.url_index.validator(url)
        key = self.url_index.lookup(url, validator)
        if key is not None and (embedding := engine.cached(key)) is not None:
            metrics.embedding_lookup(True, Priority.INTERACTIVE.name.lower())
            return embedding
        # Most likely a new image: when the queue (with the first clicks still preparing theirs) is already too
        # long, refuse before spending seconds on downloading, decoding and hashing it: answered at once.
        with self.encode_gate.preparing():
            image = self.load_image(url, task_id)
        embedding = self.embed(image)
        self.url_index.remember(url, embedding.key, validator)
        return embedding

    # --- pre-encoding ----------------------------------------------------------
    def _build_preencoder(self, settings: Settings) -> PreEncodeScheduler:
        """Encode here (one thread, through the encode gate) or on RQ workers (several jobs in flight)."""
        encode, threads = self._preencode, 1
        if settings.preencode_executor == "rq":
            on_workers = RQEncoder(settings.redis_url, lambda: (self.access.url, self.access.token))
            encode, threads = (lambda job: self._already_ready(job) or on_workers(job)), IN_FLIGHT
        return PreEncodeScheduler(encode, lookahead=settings.preencode_lookahead,
                                  log_every=settings.preencode_log_every, threads=threads)

    def _already_ready(self, job: EncodeJob) -> str | None:
        """"ready" when the URL's embedding is known and stored, without loading the image; else None."""
        engine = self.sam(PREENCODE_SAM_WAIT_S)
        key = self.url_index.lookup(job.url, self.url_index.validator(job.url))
        if key is None or not engine.is_ready(key):
            return None
        if job.urgent:
            engine.cached(key)  # about to be clicked: read it into memory now
        return "ready"

    def _preencode(self, job: EncodeJob) -> str:
        """Make one queued image ready: "ready" when it already was, "encoded" otherwise; raises on failure."""
        if self._already_ready(job):
            return "ready"
        engine = self.sam(PREENCODE_SAM_WAIT_S)
        validator = self.url_index.validator(job.url)
        encodes = engine.images_encoded
        embedding = self.embed(self.load_image(job.url, job.task_id), Priority.BACKGROUND)  # after waiting clicks
        self.url_index.remember(job.url, embedding.key, validator)
        return "encoded" if engine.images_encoded > encodes else "ready"

    def project_connected(self, project_value: object, label_config: str | None) -> None:
        """First ``/setup`` (or first opened task) of a project in this process: queue all its images.

        Listing runs in a thread: ``/setup`` must answer within Label Studio's 3 s.
        """
        project = project_id(project_value)
        if not self.settings.preencode or project is None or not (self.access.url and self.access.token):
            return
        with self._connect_lock:
            if project in self._connected:
                return
            self._connected.add(project)
        threading.Thread(target=self._queue_project, args=(project, label_config), name=f"preencode-list-{project}",
                         daemon=True).start()

    def _queue_project(self, project: int, label_config: str | None) -> None:
        try:
            image_field, images = project_images(self.access.url, self.access.token, project, label_config=label_config,
                                               max_tasks=self.settings.preencode_max_tasks)
        except BackendError as exc:
            logger.warning("pre-encoding project %d: cannot list its tasks: %s", project, exc.message)
            with self._connect_lock:
                self._connected.discard(project)  # try again at the next /setup
            return
        self._image_keys[project] = image_field
        self.preencoder.add_project(project, images)

    def task_opened(self, task: dict, image_field: str, project_value: object = None) -> None:
        """An annotator opened ``task`` (automatic ``/predict`` or a click): its image and the next ones first."""
        if not self.settings.preencode:
            return
        project = project_id(task.get("project")) or project_id(project_value)
        image = task_image(task, image_field)
        if project is None or image is None:
            return
        self._image_keys.setdefault(project, image_field)
        self.preencoder.opened(project, image)
        self.project_connected(project, None)

    def _tasks_created(self, payload: dict) -> int:
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
        return self.preencoder.add_tasks(project, [image for task in tasks
                                                   if (image := task_image(task, image_field)) is not None])

    def warm(self, tasks: list[dict], image_key_name: str, project: int | None = None) -> int:
        """``/warmup``: queue the tasks' images (whatever ``PREENCODE`` says); the number queued."""
        images = [image for task in tasks if (image := task_image(task, image_key_name)) is not None]
        return self.preencoder.add_project(project or WARMUP_PROJECT, images)

    def preencode_status(self) -> dict:
        status: dict = {"enabled": self.settings.preencode, "executor": self.settings.preencode_executor,
                        "lookahead": self.settings.preencode_lookahead, "projects": self.preencoder.status()}
        store = self._engine.store if self._engine is not None else None
        if store is not None:
            usage = store.usage()
            status["store"] = {"model": store.model_id, "dtype": str(store.dtype), "files": usage.files,
                               "bytes": usage.bytes, "max_bytes": usage.max_bytes}
        return status

    # --- SAM 3 concept pre-annotation (sam3) ------------------------------------
    def _build_concept_preannotation(self, sam3_engine) -> None:
        """Project jobs on RQ workers when ``REDIS_URL`` is set (:mod:`ml_backend.sam3.rq_jobs`), else on a
        thread of this process (:class:`ml_backend.sam3.job.ProjectPreannotationJobs`); interactive exemplars
        (:mod:`ml_backend.sam3.exemplar`) when ``SAM3_EXEMPLAR_LABELS`` names labels; typed phrases
        (:mod:`ml_backend.sam3.phrase`) whenever ``SAM3_MODEL`` is set."""
        s = self.settings
        self.sam3 = Sam3Service(s, sam3_engine) if s.sam3_model else None
        self.concepts = ConceptPreannotator(s, self.sam3.engine, self._sam3_piece) if s.preannotate != "trimap" \
            else None
        self.exemplars = ExemplarSegmenter(s, self._segment_exemplars) if s.sam3_exemplar_labels else None
        self.phrases = PhraseSegmenter(s, self._segment_phrase) if self.sam3 is not None else None
        if self.settings.redis_url:
            self.preannotation_jobs = RQProjectJobs(redis_connection(self.settings.redis_url, fail_fast=True),
                                                    lambda: (self.access.url, self.access.token))
        else:
            self.preannotation_jobs = ProjectPreannotationJobs(self.job_context(),
                                                               self.settings.model_dir / "sam3-jobs.json")

    def job_context(self):
        """What a project job needs from this process (the thread here, or an RQ worker's own runtime)."""
        return JobContext(access=lambda: (self.access.url, self.access.token), predict=self._job_prediction,
                          model_version=self.batch_model_version, background_slot=self._background_slot)

    def batch_model_version(self, project: int | None = None) -> str:
        """The model version of a project's batch predictions under PREANNOTATE and its trimap version."""
        trimap_version = self.trimaps.current_version(project)
        return self.concepts.model_version(trimap_version) if self.concepts else trimap_model_version(trimap_version)

    def _job_prediction(self, task: dict, label_config: str, project: int) -> dict:
        if self.predict_task is None:
            raise BackendError("This process serves no project jobs (no prediction function was installed).",
                               status_code=500)
        return self.predict_task(task, label_config, project)

    def _segment_exemplars(self, image: np.ndarray, phrase: str, boxes: list) -> list:
        """SAM 3 instances of ``phrase`` like the positive exemplar ``boxes``, as an interactive request: through
        the encode gate (a busy backend answers 503 with Retry-After), ahead of project jobs."""
        engine = self.sam3.engine()
        with self.encode_gate.slot(Priority.INTERACTIVE, kind="sam3 exemplar"):  # timed as its own kind
            return engine.segment(image, [phrase], threshold=self.settings.sam3_score_threshold, boxes=boxes,
                                  box_labels=[1] * len(boxes))[0]

    def _segment_phrase(self, image: np.ndarray, phrase: str) -> list:
        """SAM 3 instances of a typed ``phrase``, as an interactive request (like :meth:`_segment_exemplars`)."""
        engine = self.sam3.engine()
        with self.encode_gate.slot(Priority.INTERACTIVE, kind="sam3 phrase"):  # timed as its own kind
            return engine.segment(image, [phrase], threshold=self.settings.sam3_score_threshold)[0]

    @contextlib.contextmanager
    def _background_slot(self):
        """A project job's SAM 3 work on this thread goes through the encode gate at background priority, one
        piece at a time (:meth:`_sam3_piece`): annotators' first clicks go first between pieces."""
        token = _SAM3_PRIORITY.set(Priority.BACKGROUND)
        try:
            yield
        finally:
            _SAM3_PRIORITY.reset(token)

    def _sam3_piece(self, piece: str) -> contextlib.AbstractContextManager:
        """The slot one piece of SAM 3 work (its image encode, one phrase) runs in: the encode gate, timed as
        its own kind, when a project job runs it; nothing otherwise (a batch ``/predict``)."""
        priority = _SAM3_PRIORITY.get()
        return contextlib.nullcontext() if priority is None else self.encode_gate.slot(priority, kind=piece)

    def preannotate_on_connect(self, project_value: object) -> bool:
        """A project's first ``/setup`` in this process (``SAM3_ON_CONNECT``): queue its SAM 3 pre-annotation
        job, which writes a prediction for each task lacking one from the current model version (as an import
        does), so a project connected before it had any gets them without a curl. True when queued."""
        project = project_id(project_value)
        if (not self.settings.sam3_on_connect or self.concepts is None or project is None
                or not (self.access.url and self.access.token)):
            return False
        with self._connect_lock:
            if project in self._preannotated_on_connect:
                return False
            self._preannotated_on_connect.add(project)
        try:
            self.preannotation_jobs.start(project)
        except BackendError as exc:  # Redis down: /setup still answers; the next process or /preannotate retries
            logger.warning("SAM 3 pre-annotation of project %s not started on connect: %s", project, exc.message)
            with self._connect_lock:
                self._preannotated_on_connect.discard(project)
            return False
        logger.info("project %s connected: SAM 3 pre-annotation of its tasks without a prediction queued", project)
        return True

    def start_background_work(self) -> None:
        """Load SAM 3 (when pre-annotation uses it) and resume the project jobs a previous process left."""
        if self.sam3 is not None:
            self.sam3.start_loading()
        self.preannotation_jobs.resume()

    # --- training ------------------------------------------------------------
    def on_webhook(self, event: str, payload: dict) -> dict:
        """Webhooks and ``/train``: count accepted annotations, maybe start a job; never train inline.
        ``TASKS_CREATED`` also queues the new tasks' images for pre-encoding."""
        answer = self.retrainer.on_webhook(event, payload)
        if event == "TASKS_CREATED":
            answer = {**answer, "preencode_queued": self._tasks_created(payload)}
        return answer

    def training_status(self, project: str | None) -> dict:
        """One project's training state (``?project=``), or every project's."""
        return self.retrainer.status(project)

    def trimap_versions(self, project: int | None) -> dict:
        """A project's versions and what serves it; without a project, what serves projects without a model."""
        return {"project": project, "serving": self.trimaps.current_version(project),
                "versions": self.trimaps.list_versions(project)}
