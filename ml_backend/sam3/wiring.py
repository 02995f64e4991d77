"""SAM 3 in one process: the engine, concept pre-annotation, interactive exemplars and typed phrases, and the
project jobs that pre-annotate whole projects.

Built by the runtime from the settings; what it needs of the process (the encode gate, Label Studio's address
and token, a project's trimap version) it receives as an object or callables, read at call time.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable

import numpy as np

from ml_backend.embeddings.scheduler import project_id
from ml_backend.errors import BackendError
from ml_backend.preannotation import trimap_model_version
from ml_backend.retrain.jobs import redis_connection
from ml_backend.sam.encode_gate import EncodeGate, Priority
from ml_backend.sam3.exemplar import ExemplarSegmenter
from ml_backend.sam3.job import JobContext, ProjectPreannotationJobs
from ml_backend.sam3.phrase import PhraseSegmenter
from ml_backend.sam3.preannotate import ConceptPreannotator
from ml_backend.sam3.rq_jobs import RQProjectJobs
from ml_backend.sam3.service import Sam3Service
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

# Set while a project job runs on this thread: the priority its SAM 3 work takes in the encode gate.
_SAM3_PRIORITY: contextvars.ContextVar[Priority | None] = contextvars.ContextVar("sam3_priority", default=None)


class Sam3Wiring:
    """Project jobs on RQ workers when ``REDIS_URL`` is set (:mod:`ml_backend.sam3.rq_jobs`), else on a
    thread of this process (:class:`ml_backend.sam3.job.ProjectPreannotationJobs`); interactive exemplars
    (:mod:`ml_backend.sam3.exemplar`) when ``SAM3_EXEMPLAR_LABELS`` names labels; typed phrases
    (:mod:`ml_backend.sam3.phrase`) whenever ``SAM3_MODEL`` is set."""

    def __init__(self, settings: Settings, *, encode_gate: EncodeGate, label_studio: Callable[[], tuple[str, str]],
                 trimap_version: Callable[[int | None], str], sam3_engine=None) -> None:
        """``label_studio()``: its URL and token as known now; ``trimap_version(project)``: the trimap
        version serving a project."""
        s = self.settings = settings
        self.encode_gate = encode_gate
        self._label_studio = label_studio
        self._trimap_version = trimap_version
        self._preannotated_on_connect: set[int] = set()  # projects whose SAM 3 job /setup queued here
        self._connect_lock = threading.Lock()
        # The batch pre-annotation of one task (task, label config, project) -> prediction, for project jobs.
        # The backend layer owns it; whoever serves jobs (the app, a SAM 3 worker) installs it here.
        self.predict_task: Callable[[dict, str, int], dict] | None = None
        self.sam3 = Sam3Service(s, sam3_engine) if s.sam3_model else None
        self.concepts = ConceptPreannotator(s, self.sam3.engine, self._sam3_piece) if s.preannotate != "trimap" \
            else None
        self.exemplars = ExemplarSegmenter(s, self._segment_exemplars) if s.sam3_exemplar_labels else None
        self.phrases = PhraseSegmenter(s, self._segment_phrase) if self.sam3 is not None else None
        if s.redis_url:
            self.preannotation_jobs = RQProjectJobs(redis_connection(s.redis_url, fail_fast=True), label_studio)
        else:
            self.preannotation_jobs = ProjectPreannotationJobs(self.job_context(), s.model_dir / "sam3-jobs.json")

    def job_context(self):
        """What a project job needs from this process (the thread here, or an RQ worker's own runtime)."""
        return JobContext(access=self._label_studio, predict=self._job_prediction,
                          model_version=self.batch_model_version, background_slot=self._background_slot)

    def batch_model_version(self, project: int | None = None) -> str:
        """The model version of a project's batch predictions under PREANNOTATE and its trimap version."""
        trimap_version = self._trimap_version(project)
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
        url, token = self._label_studio()
        if not self.settings.sam3_on_connect or self.concepts is None or project is None or not (url and token):
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
