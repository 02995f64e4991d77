"""What pre-encoding needs from Label Studio's tasks: their image URL, id and whether they are labeled."""

from __future__ import annotations

from ml_backend import labeling
from ml_backend.embeddings.scheduler import TaskImage
from ml_backend.label_studio_api import api_get, iter_project_tasks


def task_image(task: object, image_key: str) -> TaskImage | None:
    """The task's image, or None for anything that is not a task with an image URL under ``image_key``."""
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        return None
    url = task["data"].get(image_key)
    if not isinstance(url, str) or not url.strip():
        return None
    task_id = task.get("id")
    task_id = task_id if isinstance(task_id, int) and not isinstance(task_id, bool) else None
    annotations = task.get("total_annotations")
    labeled = task.get("is_labeled") is True or (isinstance(annotations, int) and annotations > 0)
    return TaskImage(task_id=task_id, url=url.strip(), labeled=labeled)


def image_key_of(label_config: str) -> str:
    return labeling.parse_label_config(label_config).image_key


def project_images(url: str, token: str, project: int, *, label_config: str | None,
                   max_tasks: int) -> tuple[str, list[TaskImage]]:
    """(the config's image field, the project's tasks in Label Studio's order, at most ``max_tasks``)."""
    if not label_config:
        label_config = (api_get(url, token, f"/api/projects/{project}") or {}).get("label_config")
    image_key = image_key_of(label_config)
    images = [image for task in iter_project_tasks(url, token, project, limit=max_tasks)
              if (image := task_image(task, image_key)) is not None]
    return image_key, images
