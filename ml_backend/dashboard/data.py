"""What the dashboard shows, read from the runtime, the model stores and the metrics: plain dicts, no HTML."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ml_backend import metrics
from ml_backend.errors import BackendError
from ml_backend.security.artifacts import ARTIFACTS

logger = logging.getLogger(__name__)


@dataclass
class VersionRow:
    """One stored version and how it fared against the baselines on its validation images."""

    id: str
    created_at: str
    current: bool
    promoted: bool
    manual: bool  # made current by hand (python -m training promote), not by the rule
    val_iou: float | None
    baseline: str | None  # what it was compared with: the version current then, or the base model
    baseline_iou: float | None
    all_foreground_iou: float | None  # the trivial baseline
    reason: str
    train_count: int | None
    val_count: int | None
    files: dict[str, str] = field(default_factory=dict)  # artifact name -> what it shows


@dataclass
class ProjectView:
    project: int
    serving: str | None
    versions: list[VersionRow]
    training: dict[str, Any]
    preencode: dict[str, Any] | None
    sam3: dict[str, Any] | None
    clicks: dict[str, dict]


def _version_row(info) -> VersionRow:
    metrics_ = info.metrics
    promotion = metrics_.get("promotion") or {}
    data = metrics_.get("data") or {}
    return VersionRow(
        id=info.id, created_at=str(metrics_.get("created_at", "")), current=info.is_current, promoted=info.promoted,
        manual=bool(promotion.get("manual")), val_iou=metrics_.get("val_foreground_iou"),
        baseline=promotion.get("baseline_version"), baseline_iou=promotion.get("baseline_val_foreground_iou"),
        all_foreground_iou=promotion.get("all_foreground_val_foreground_iou"), reason=str(promotion.get("reason", "")),
        train_count=data.get("train_count"), val_count=data.get("val_count"),
        files={name: what for name, what in ARTIFACTS.items() if (info.path / name).is_file()},
    )


def project_versions(model_dir, project: int) -> list[VersionRow]:
    """A project's stored versions, oldest first (an unreadable one is logged and left out)."""
    from training.layout import project_store_dir
    from training.store import ModelStore

    store = ModelStore(project_store_dir(model_dir, project))
    try:
        return [_version_row(info) for info in store.list_versions()]
    except Exception as exc:  # a half-written or hand-edited store must not take the page down
        logger.warning("dashboard: cannot list project %s's versions: %s", project, exc)
        return []


def _section(read) -> dict[str, Any]:
    try:
        return read()
    except BackendError as exc:  # e.g. Redis down: the page says so and shows the rest
        return {"error": exc.message}


def projects_known(runtime, training: dict[str, Any], preencode: dict[str, Any], sam3: dict[str, Any]) -> list[int]:
    """Every project something is known about: a store, a training state, pre-encoding, a SAM 3 job or clicks."""
    from training.layout import project_ids

    found = set(project_ids(runtime.settings.model_dir)) | metrics.recent_click_projects()
    for section in (training.get("projects", {}), preencode.get("projects", {}), sam3.get("projects", {})):
        found |= {int(key) for key in section if str(key).isdigit() and int(key) > 0}
    return sorted(found)


def overview(runtime) -> dict[str, Any]:
    """Everything the page shows: the process-wide parts and one :class:`ProjectView` per project."""
    training = _section(lambda: runtime.training_status(None))
    preencode = runtime.preencoding.status()
    sam3 = _section(runtime.preannotation_jobs.status)
    views = []
    for project in projects_known(runtime, training, preencode, sam3):
        views.append(ProjectView(
            project=project,
            serving=runtime.trimaps.current_version(project),
            versions=project_versions(runtime.settings.model_dir, project),
            training=training.get("projects", {}).get(str(project)) or ({"error": training["error"]}
                                                                       if "error" in training else {}),
            preencode=preencode.get("projects", {}).get(str(project)),
            sam3=sam3.get("projects", {}).get(str(project)),
            clicks=metrics.recent_click_latency(project),
        ))
    return {
        "sam": runtime.sam_status(),
        "base_model": runtime.trimaps.current_version(None),
        "clicks": metrics.recent_click_latency(),
        "training_error": training.get("error"),
        "sam3_error": sam3.get("error"),
        "projects": views,
    }
