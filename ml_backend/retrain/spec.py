"""What a training job is given and how it can fail: shared by the coordinator, the executors and workers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ml_backend.errors import BackendError

QUEUE_NAME = "sam-trimap-training"
MIN_USABLE_PAIRS = 2  # one image to train on and one to validate with


class TrainingJobError(BackendError):
    """A job that cannot train (Label Studio unknown, the job timed out or was cancelled)."""

    status_code = 409


class NotEnoughData(TrainingJobError):
    """The export gave fewer usable pairs than a training/validation split needs: not a failure to retry."""

    def __init__(self, message: str, usable: int, tasks: list[int] | None = None) -> None:
        super().__init__(message)
        self.usable = usable
        self.tasks = tasks or []


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs, decided by the backend when it starts the job (JSON-able for RQ)."""

    job_id: str
    project: int
    reason: str
    model_dir: str  # the project's model store
    label_studio_url: str
    token: str
    epochs: int
    image_size: int
    batch_size: int
    promotion_margin: float
    boundary_width: int
    ground_truth_only: bool
    foreground_labels: tuple[str, ...]
    background_labels: tuple[str, ...]
    boundary_labels: tuple[str, ...]
    redis_url: str = ""
    timeout_s: int = 6 * 3600
    keep_versions: int = 0  # 0: never prune
    base_model: str = ""  # what a store without a current version starts from ("" : from scratch)
    compare_max_train: int = 64  # training pairs up to which training/selection.py's small-data rule applies

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("foreground_labels", "background_labels", "boundary_labels"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)
