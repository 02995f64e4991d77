"""The prompt state's types, below the rules and both storages: whose object (:class:`TaskKey`), what is
remembered of it (:class:`ObjectState`, :class:`RegionMemory`) and where it is kept (:class:`StateStorage`)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Union

import numpy as np

from ml_backend.labeling.context import GroupKey, KeyPoint, Rectangle
from ml_backend.security import limits

Item = Union[KeyPoint, Rectangle]
Signature = tuple  # (box rounded or None, frozenset of (x, y, label) rounded)


@dataclass(frozen=True)
class TaskKey:
    """Whose object: ``project`` is the id in Label Studio's ``"<id>.<timestamp>"``."""

    project: str
    task: str
    image: str


def task_key(project: Any, task: Mapping[str, Any], image_url: str) -> TaskKey | None:
    """The key of a request's object, or None when the task has no id (then nothing is remembered)."""
    task_id = task.get("id")
    if isinstance(task_id, bool) or not isinstance(task_id, (int, str)) or task_id == "":
        return None
    project_id = project.split(".", 1)[0] if isinstance(project, str) else str(project) if isinstance(project, int) \
        else ""
    return TaskKey(project=project_id[:64], task=str(task_id)[:64], image=limits.url_key(image_url))


@dataclass(frozen=True)
class RegionMemory:
    """What SAM was given for one region of the object and what it answered."""

    signature: Signature
    given: np.ndarray | None
    answered: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.answered.nbytes + (0 if self.given is None else self.given.nbytes)


@dataclass(frozen=True)
class ObjectState:
    """The object being segmented on one task."""

    groups: Mapping[GroupKey, tuple[Item, ...]]  # the latest items of each editor group
    label: str | None  # lower-cased positive label of the object (None: unlabelled)
    size: tuple[int, int]
    regions: tuple[RegionMemory, ...] = ()
    result_ids: frozenset[str] = frozenset()

    @property
    def nbytes(self) -> int:
        return sum(region.nbytes for region in self.regions)

    @property
    def rectangles(self) -> list[Rectangle]:
        return [item for items in self.groups.values() for item in items if isinstance(item, Rectangle)]

    @property
    def positive_points(self) -> list[KeyPoint]:
        return [item for items in self.groups.values() for item in items if isinstance(item, KeyPoint)
                and item.positive]


class StateStorage(Protocol):
    """Where objects are kept between clicks, bounded by ``max_entries``, ``max_bytes`` and ``ttl_s``."""

    max_bytes: int
    max_entries: int
    ttl_s: float

    def hold(self, key: TaskKey) -> contextlib.AbstractContextManager[None]:
        """Exclusive use of ``key``'s object (against every thread and process sharing the storage); it never
        waits for a click on another task."""

    def load(self, key: TaskKey) -> ObjectState | None:
        """The live object (None when unknown, expired or unreadable)."""

    def save(self, key: TaskKey, state: ObjectState) -> None:
        """Keep ``state`` for ``ttl_s``, then drop what exceeds the bounds (least recently used first)."""

    def delete(self, key: TaskKey) -> None: ...

    def __len__(self) -> int: ...

    @property
    def current_bytes(self) -> int: ...
