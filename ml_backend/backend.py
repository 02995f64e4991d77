"""The ``LabelStudioMLBase`` subclass: interactive SAM masks and batch trimap pre-annotation.

Instances are cheap (Label Studio calls ``/setup`` often and the library builds a
model object each time): everything heavy lives in the shared :class:`Runtime`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from label_studio_ml.model import LabelStudioMLBase

from ml_backend import labeling
from ml_backend.errors import BackendError, ImageFetchError, InvalidPromptError, LabelConfigError
from ml_backend.formats import PolygonOptions
from ml_backend.preannotation import NO_TRIMAP_VERSION, mask_bounding_box, trimap_model_version
from ml_backend.prompt_state import task_key
from ml_backend.runtime import Runtime
from ml_backend.sam.prompts import Prompts
from ml_backend.sam3.phrase import typed_phrase
from ml_backend.trimaps import LabelRoles, TrimapValue

logger = logging.getLogger(__name__)

def sam_model_version(source: str) -> str:
    """``sam-<preset name or file/directory name>``: no local paths in Label Studio's UI."""
    return f"sam-{Path(source).name or source}"


class SegmentationBackend(LabelStudioMLBase):
    """Serves one labeling config with the process's shared :class:`Runtime` (built per request by the app)."""

    def __init__(self, label_config: str | None = None, train_output: dict | None = None, *, runtime: Runtime,
                 project: object = None, **kwargs: Any) -> None:
        from ml_backend.retrain.policy import project_key

        if not label_config:
            raise LabelConfigError("No labeling config was sent; connect the backend from a Label Studio project.")
        # before the library's parser: clearer errors
        self.config = labeling.parse_label_config(label_config, mask_tag=runtime.settings.mask_tag or None)
        # Not the config: the library would parse it again (label-studio-tools, per request) for
        # ``parsed_label_config``, which nothing here reads.
        super().__init__(label_config=None, train_output=train_output, **kwargs)
        self.label_config = label_config
        self.runtime = runtime
        # Label Studio sends "<id>.<created timestamp>"; batch predictions and versions are per project.
        self.project = project_key(project)
        # What predict() served, for the request metrics: batch, or a click on a new object (first_click) or
        # on one segmented before (further_click: its earlier answer goes back to SAM); "click" until known.
        self.request_kind = "other"

    @property
    def model_version(self) -> str:
        trimap_version = self.runtime.trimaps.current_version(self.project)
        if self.runtime.concepts is not None:  # PREANNOTATE=sam3|both
            return self.runtime.concepts.model_version(trimap_version)
        return trimap_model_version(trimap_version)

    # --- entry point ---------------------------------------------------------
    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> list[dict]:
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise BackendError("'tasks' must be a list of task objects.")
        if context and context.get("result"):
            self.request_kind = "click"
            if len(tasks) != 1:
                raise BackendError(f"Interactive annotation works on one task at a time, got {len(tasks)}.")
            prediction = self._interactive(tasks[0], context)
            # Its look-ahead, once this one is served ("project" as Label Studio sends it: "<id>.<timestamp>").
            self.runtime.preencoding.task_opened(tasks[0], self.config.image_key, kwargs.get("project"))
            return [prediction]
        self.request_kind = "batch"
        if len(tasks) == 1:  # Label Studio's automatic /predict when an annotator opens a task
            self.runtime.preencoding.task_opened(tasks[0], self.config.image_key, kwargs.get("project"))
        return [self._preannotate(task) for task in tasks]

    def _task_image_url(self, task: dict) -> tuple[str, int | None]:
        data = task.get("data")
        url = data.get(self.config.image_key) if isinstance(data, dict) else None
        if not isinstance(url, str) or not url:
            raise ImageFetchError(
                f"Task {task.get('id', '?')} has no image under data.{self.config.image_key}; "
                f"the labeling config's <Image> reads ${self.config.image_key}."
            )
        task_id = task.get("id")
        return url, task_id if isinstance(task_id, int) else None

    def _task_image(self, task: dict) -> np.ndarray:
        return self.runtime.load_image(*self._task_image_url(task), self.project)

    # --- interactive SAM -----------------------------------------------------
    def _interactive(self, task: dict, context: dict) -> dict:
        """Parse this request, add what earlier clicks on the task said, embed, decode, answer (rectangles of
        ``SAM3_EXEMPLAR_LABELS`` and typed phrases go to SAM 3 instead: :mod:`ml_backend.sam3.exemplar`,
        :mod:`ml_backend.sam3.phrase`)."""
        settings = self.runtime.settings
        if (phrase := typed_phrase(context)) is not None:  # a <TextArea>'s text: SAM 3 (ml_backend.sam3.phrase)
            if self.runtime.phrases is None:
                raise InvalidPromptError("Typed phrases are answered by SAM 3, which this backend does not run: "
                                         "the administrator sets SAM3_MODEL.")
            return self.runtime.phrases.predict(self._task_image(task), phrase, self.label_config, self.config)
        request = labeling.read_context(context, self.config, negative_labels=settings.negative_labels)
        if request is None:
            raise InvalidPromptError("The request carries no keypoint or rectangle prompts for this image.")
        if self.runtime.exemplars is not None and (exemplar := self.runtime.exemplars.match(request)) is not None:
            return self.runtime.exemplars.predict(self._task_image(task), exemplar, self.label_config, self.config)
        url, task_id = self._task_image_url(task)
        memory = self.runtime.prompt_state
        key = task_key(self.project, task, url)
        memory.plan(key, request, task)  # a click with nothing to segment is refused before any download or encode
        engine = self.runtime.sam()
        # Not held: the encode may wait for other tasks' encodes, and this task's next click must not wait for it.
        embedding = self.runtime.task_embedding(url, task_id, self.project)
        with memory.hold(key):  # the next click on this task, in any worker process, plans after this one
            plan = memory.plan(key, request, task)
            self.request_kind = "further_click" if plan.state.regions else "first_click"
            height, width = embedding.geometry.original_size
            results, scores, answered = [], [], []
            for region in plan.regions:
                decoded = engine.decode(embedding, _rescale(region.prompts, region.original_size, (width, height)))
                label = labeling.choose_brush_label(self.config, region.label, settings.brush_label or None)
                results += labeling.build_mask_results(decoded.mask, config=self.config, label=label,
                                                       score=decoded.score,
                                                       polygon=PolygonOptions.from_settings(settings),
                                                       arrays=True)  # RLE, points: for the app's orjson answer
                scores.append(decoded.score)
                answered.append(decoded.low_res_logits)
            memory.remember(plan, answered, [result["id"] for result in results])
        return labeling.build_prediction(results, float(np.mean(scores)), sam_model_version(engine.source))

    # --- batch pre-annotation ------------------------------------------------
    def _foreground_label(self) -> str | None:
        """The first mask label that retraining maps to foreground, so predictions and training agree."""
        roles = LabelRoles.from_settings(self.runtime.settings)
        return next((name for name in self.config.mask.labels if roles.role(name) == TrimapValue.FOREGROUND), None)

    def _preannotate(self, task: dict) -> dict:
        try:
            return self.preannotation(task)
        except BackendError as exc:  # one bad image fails only its own task
            logger.warning("task %s: no prediction: %s", task.get("id"), exc.message)
            return labeling.build_prediction([], 0.0, self.model_version)

    def preannotation(self, task: dict) -> dict:
        """The task's batch prediction by ``PREANNOTATE``: the trimap model, SAM 3 concepts, or both (see
        :mod:`ml_backend.sam3.concepts`). Raises :class:`BackendError` (the project job counts it as failed)."""
        settings = self.runtime.settings
        image = self._task_image(task)
        if self.runtime.concepts is not None:
            trimap = None
            if self.runtime.concepts.with_trimap:
                trimap = self.runtime.trimaps.predict_mask(image, include_boundary=settings.trimap_include_boundary,
                                                           project=self.project)
                if trimap is not None and trimap.mask is None:  # below MIN_MASK_AREA: no trimap foreground
                    trimap = trimap._replace(mask=np.zeros(image.shape[:2], bool))
            return self.runtime.concepts.predict(image, self.label_config, self.config, trimap,
                                                 trimap_label=self._foreground_label())
        predicted = self.runtime.trimaps.predict_mask(image, include_boundary=settings.trimap_include_boundary,
                                                      project=self.project)
        if predicted is None:
            logger.info("task %s: no trimap model for project %s and no base model; empty prediction",
                        task.get("id"), self.project)
            return labeling.build_prediction([], 0.0, NO_TRIMAP_VERSION)
        version, mask, score = predicted
        if mask is None:  # an empty region would only be noise for the annotator
            logger.info("task %s: the predicted object is smaller than MIN_MASK_AREA; no region", task.get("id"))
            return labeling.build_prediction([], 0.0, trimap_model_version(version))
        if settings.trimap_sam_refine and (box := mask_bounding_box(mask)) is not None:
            refined = self.runtime.sam().segment(image, Prompts.from_lists(box=box))
            mask, score = refined.mask, refined.score
        label = labeling.choose_brush_label(self.config, self._foreground_label(), settings.brush_label or None)
        results = labeling.build_mask_results(mask, config=self.config, label=label, score=score,
                                              polygon=PolygonOptions.from_settings(settings))
        return labeling.build_prediction(results, score, trimap_model_version(version))


def _rescale(prompts: Prompts, expressed_in: tuple[int, int] | None, actual: tuple[int, int]) -> Prompts:
    """Map prompts from the size Label Studio measured to the size of the image we loaded.

    They differ when a file was replaced or Label Studio read the size before EXIF
    rotation; percentages stay right, so the pixels are rescaled.
    """
    if expressed_in is None or tuple(expressed_in) == tuple(actual):
        return prompts
    sx, sy = actual[0] / expressed_in[0], actual[1] / expressed_in[1]
    logger.warning("prompts given for a %dx%d image, loaded %dx%d; rescaling", *expressed_in, *actual)
    points = prompts.points * np.array([sx, sy], np.float32)
    box = None if prompts.box is None else (prompts.box[0] * sx, prompts.box[1] * sy,
                                            prompts.box[2] * sx, prompts.box[3] * sy)
    return Prompts(points, prompts.labels, box, prompts.mask_logits)


def serve_project_jobs(runtime: Runtime) -> None:
    """Give ``runtime``'s project jobs their prediction: this backend's batch pre-annotation of one task.

    The runtime sits below the backend and so cannot build a :class:`SegmentationBackend` itself; the
    process that serves jobs (the app, a SAM 3 worker) calls this once after building its runtime."""
    def predict(task: dict, label_config: str, project: int) -> dict:
        return SegmentationBackend(label_config, runtime=runtime, project=project).preannotation(task)

    runtime.sam3_wiring.predict_task = predict
