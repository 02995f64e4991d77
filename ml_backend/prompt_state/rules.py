"""Prompt state per image: the object an annotator is segmenting on a task, remembered between clicks.

Label Studio's editor (1.23.2) sends, each time a smart region is drawn, only the smart
regions of the same type and label as that one (a *group*: e.g. all "Cat" keypoints). A
"Background" click arrives alone; keypoints never arrive with the rectangle they are meant
to refine; accepting or rejecting a suggestion sends nothing. So what SAM must get -- every
prompt of the object and its previous low-resolution logits -- is put together here, from
what this request says (``labeling.read_context``) and what earlier requests on the same
task said. The rules (the README repeats them):

1. **Key.** One object per (project id, task id, image URL). Label Studio 1.23.2 does not
   say which annotator is clicking (the task's ``drafts`` name the user, but only after the
   editor's first autosave, so keying by it would split an object), so two annotators on
   the same task at the same time share it. A request without a task id is stateless.
2. **Same group again** (a request whose group the object already has): when it shares at
   least one region id with what that group held, the group is replaced (clicks accumulate,
   Alt-clicks, deletions); when it shares none, the earlier regions are gone -- the
   annotator accepted or rejected the suggestion, or deleted them -- and a new object starts.
3. **Negative-label keypoints** (a label in ``NEGATIVE_LABELS`` such as "Background", which
   arrive with ``is_positive: true`` and alone) join the current object. With no current
   object they are an error that says to click the object first.
4. **Another group with the same label** joins the current object when it is near it:
   keypoints after a rectangle join when every positive keypoint lies within the reach of
   one of the object's rectangles (the rectangle grown by ``RECTANGLE_REACH`` = 25 % of its
   size beyond each side); a rectangle after keypoints joins when it reaches every positive
   keypoint of the object. A positive keypoint out of reach starts a new object.
5. **Another label** (not a negative one) starts a new object.
6. **Accepted suggestion.** When the task sent with the request holds, in a draft or an
   annotation, a region id we answered for the current object, the annotator accepted it:
   the next request starts a new object.
7. **A request that carries several groups** (an API client sending every prompt at once)
   is taken as complete: it replaces the object.
8. **Previous logits.** A region's previous low-resolution logits go back to SAM when the
   region has the same box and its keypoints are a strict superset of the ones SAM answered
   before (the next click); the same prompts again get the logits they were first given, so
   the answer repeats. Objects live ``PROMPT_STATE_TTL_S`` after their last click, at most
   ``PROMPT_STATE_ENTRIES`` tasks and ``PROMPT_STATE_MB`` of logits (least recently used go).

Where the objects live is a :class:`~ml_backend.prompt_state.types.StateStorage`: in this
process's memory (:class:`~ml_backend.prompt_state.memory.MemoryStorage`), or one small file per
task in a directory every worker process of the backend shares
(:class:`~ml_backend.prompt_state.files.FileStorage`, chosen by ``PROMPT_STATE_SHARED``; by
default when ``WORKERS`` > 1, where consecutive clicks of one annotator may reach different
processes), or in Redis, shared by every replica of the backend on any host
(:class:`~ml_backend.prompt_state.redis_storage.RedisStorage`, when ``REDIS_URL`` is set). The rules above are
applied here, the same for all three. The backend holds
:meth:`PromptMemory.hold` from :meth:`~PromptMemory.plan` to :meth:`~PromptMemory.remember`, so
two clicks on one task (from any process) never interleave; the hold is per task
(:mod:`ml_backend.prompt_state.locking`) and never spans an image's download or encode.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ml_backend.errors import InvalidPromptError
from ml_backend.labeling.context import ContextPrompts, GroupKey, KeyPoint, PromptRegion, Rectangle, group_regions
from ml_backend.prompt_state.files import FileStorage, state_directory
from ml_backend.prompt_state.memory import MemoryStorage
from ml_backend.prompt_state.redis_storage import RedisStorage
from ml_backend.prompt_state.types import Item, ObjectState, RegionMemory, Signature, StateStorage, TaskKey
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

MAX_RESULT_IDS = 256  # region ids answered for one object that rule 6 looks for


@dataclass(frozen=True)
class Plan:
    """What to decode for one request: ``regions`` carry their previous logits; ``reason`` says which rule."""

    key: TaskKey | None
    state: ObjectState
    regions: list[PromptRegion]
    reason: str


class PromptMemory:
    """Per-task object state: the rules, over a :class:`StateStorage` (a :class:`MemoryStorage` of these limits
    unless ``storage`` is given, which has its own)."""

    def __init__(self, *, max_bytes: int, max_entries: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic, storage: StateStorage | None = None) -> None:
        self.storage: StateStorage = storage if storage is not None else MemoryStorage(
            max_bytes=max_bytes, max_entries=max_entries, ttl_s=ttl_s, clock=clock)

    @classmethod
    def from_settings(cls, settings: Settings, redis: Any = None) -> "PromptMemory":
        """In memory, shared by the worker processes (``PROMPT_STATE_SHARED``, ``PROMPT_STATE_DIR``), or in Redis,
        shared by every replica, when given a client of ``REDIS_URL`` (unless ``PROMPT_STATE_SHARED=off``)."""
        limits = {"max_bytes": settings.prompt_state_mb << 20, "max_entries": settings.prompt_state_entries,
                  "ttl_s": settings.prompt_state_ttl_s}
        if redis is not None and settings.prompt_state_shared != "off":
            logger.info("prompt state shared by every replica in Redis")
            return cls(**limits, storage=RedisStorage(redis, **limits))
        if not shared_state(settings):
            return cls(**limits)
        directory = state_directory(settings)
        logger.info("prompt state shared by the worker processes in %s", directory)
        return cls(**limits, storage=FileStorage(directory, **limits))

    @property
    def max_bytes(self) -> int:
        return self.storage.max_bytes

    @property
    def max_entries(self) -> int:
        return self.storage.max_entries

    @property
    def ttl_s(self) -> float:
        return self.storage.ttl_s

    def __len__(self) -> int:
        return len(self.storage)

    @property
    def current_bytes(self) -> int:
        return self.storage.current_bytes

    @contextlib.contextmanager
    def hold(self, key: TaskKey | None) -> Iterator[None]:
        """Hold ``key``'s object from :meth:`plan` to :meth:`remember` (nothing to hold without a key)."""
        if key is None:
            yield
            return
        with self.storage.hold(key):
            yield

    # --- reading -------------------------------------------------------------
    def get(self, key: TaskKey | None) -> ObjectState | None:
        """The live object for ``key`` (None when unknown or expired)."""
        return None if key is None else self.storage.load(key)

    def plan(self, key: TaskKey | None, request: ContextPrompts, task: Mapping[str, Any] | None = None) -> Plan:
        """Apply the rules to this request; raise :class:`InvalidPromptError` when there is nothing to segment."""
        current = self.get(key)
        if current is not None and current.size != request.size:
            current = None  # the image changed under the same URL
        if current is not None and _accepted(current, task):
            current, accepted = None, True
        else:
            accepted = False
        groups, label, reason = _decide(current, request)
        if accepted:
            reason = "new object: the last suggestion was accepted"
        state = ObjectState(groups=groups, label=label, size=request.size,
                            regions=current.regions if current and not reason.startswith("new") else ())
        points = [item for items in groups.values() for item in items if isinstance(item, KeyPoint)]
        rectangles = [item for items in groups.values() for item in items if isinstance(item, Rectangle)]
        if not rectangles and not any(p.positive for p in points):
            raise InvalidPromptError(
                "This click only removes area (Alt-click, or a label such as 'Background'), but no object is being "
                "segmented on this image yet (or it was forgotten): click the object with its own label, or draw a "
                "rectangle around it, first."
            )
        regions = [_with_previous_logits(region, state.regions) for region in
                   group_regions(points, rectangles, request.size)]
        logger.debug("prompt state %s: %s", key, reason)
        return Plan(key=key, state=state, regions=regions, reason=reason)

    # --- writing -------------------------------------------------------------
    def remember(self, plan: Plan, answered: Iterable[np.ndarray], result_ids: Iterable[str]) -> None:
        """Store the plan's object with the logits SAM answered for each of its regions."""
        if plan.key is None:
            return
        regions = tuple(
            RegionMemory(signature=_signature(region), given=region.prompts.mask_logits,
                         answered=np.asarray(logits, np.float32))
            for region, logits in zip(plan.regions, answered)
        )
        state = replace(plan.state, regions=regions, result_ids=frozenset(list(result_ids)[:MAX_RESULT_IDS]))
        if state.nbytes > self.max_bytes:
            logger.warning("prompt state of %s (%d bytes) exceeds PROMPT_STATE_MB; not kept", plan.key, state.nbytes)
            self.storage.delete(plan.key)
            return
        self.storage.save(plan.key, state)

    def forget(self, key: TaskKey) -> None:
        self.storage.delete(key)


def shared_state(settings: Settings) -> bool:
    """Whether the worker processes share the prompt state (``PROMPT_STATE_SHARED``: auto = when WORKERS > 1)."""
    return settings.prompt_state_shared == "on" or (settings.prompt_state_shared == "auto" and settings.workers > 1)


def _decide(current: ObjectState | None, request: ContextPrompts) -> tuple[dict[GroupKey, tuple[Item, ...]],
                                                                             str | None, str]:
    """(the object's groups, its label, the rule that decided) for this request."""
    incoming: dict[GroupKey, list[Item]] = {}
    for item in (*request.rectangles, *request.points):
        incoming.setdefault(item.group, []).append(item)
    fresh = {group: tuple(items) for group, items in incoming.items()}
    if len(fresh) > 1:
        return fresh, _label_of(fresh), "complete request: it carries several groups"
    [(group, items)] = fresh.items()
    if current is None:
        return fresh, _label_of(fresh), "new object: none on this task"
    if group in current.groups:
        if {_identity(i) for i in items} & {_identity(i) for i in current.groups[group]}:
            return {**current.groups, group: items}, current.label, "same object: its group again"
        return fresh, _label_of(fresh), "new object: the earlier regions of this group are gone"
    if all(isinstance(i, KeyPoint) and i.negative_label for i in items):
        return {**current.groups, group: items}, current.label, "same object: negative-label keypoints"
    label = _label_of(fresh)
    if label != current.label:
        return fresh, label, "new object: another label"
    if _near(current, items):
        return {**current.groups, group: items}, current.label, "same object: same label, within reach"
    return fresh, label, "new object: same label, out of reach"


def _near(current: ObjectState, items: tuple[Item, ...]) -> bool:
    """Rule 4: keypoints within reach of the object's rectangles, or a rectangle reaching its keypoints."""
    rectangles = current.rectangles
    if all(isinstance(i, KeyPoint) for i in items):
        positives = [p for p in items if isinstance(p, KeyPoint) and p.positive]
        if not rectangles:
            return True  # keypoints of the same label from another keypoint tag
        return all(any(r.reaches(p.x, p.y) for r in rectangles) for p in positives)
    new_rectangles = [r for r in items if isinstance(r, Rectangle)]
    return not rectangles and all(any(r.reaches(p.x, p.y) for r in new_rectangles) for p in current.positive_points)


def _label_of(groups: Mapping[GroupKey, tuple[Item, ...]]) -> str | None:
    """The object's label (lower case): its rectangles', else its first positive keypoint's, else that of
    its first keypoint with a label that is not a negative one (an Alt-click)."""
    items = [i for items in groups.values() for i in items]
    ranked = sorted(items, key=lambda i: 0 if isinstance(i, Rectangle) else 1 if i.positive else 2)
    label = next((item.label for item in ranked if item.label), None)
    return label.lower() if label else None


def _identity(item: Item) -> object:
    if item.item_id is not None:
        return item.item_id
    if isinstance(item, Rectangle):
        return tuple(round(v, 1) for v in item.box)
    return round(item.x, 1), round(item.y, 1), item.positive


def _signature(region: PromptRegion) -> Signature:
    prompts = region.prompts
    box = None if prompts.box is None else tuple(round(float(v), 1) for v in prompts.box)
    points = frozenset((round(float(x), 1), round(float(y), 1), int(label))
                       for (x, y), label in zip(prompts.points.tolist(), prompts.labels.tolist()))
    return box, points


def _with_previous_logits(region: PromptRegion, memories: tuple[RegionMemory, ...]) -> PromptRegion:
    """Rule 8: the logits to feed back for this region, if an earlier answer is its previous state."""
    box, points = _signature(region)
    logits = None
    for memory in memories:
        earlier_box, earlier_points = memory.signature
        if earlier_box != box:
            continue
        if earlier_points < points:
            logits = memory.answered
        elif earlier_points == points:
            logits = memory.given
        else:
            continue
        break
    if logits is None:
        return region
    return replace(region, prompts=replace(region.prompts, mask_logits=logits))


def _accepted(current: ObjectState, task: Mapping[str, Any] | None) -> bool:
    """Rule 6: a draft or annotation of the task holds a region we answered for this object."""
    if not current.result_ids or not isinstance(task, Mapping):
        return False
    for kind in ("drafts", "annotations"):
        records = task.get(kind)
        if not isinstance(records, list):
            continue
        for record in records:
            results = record.get("result") if isinstance(record, Mapping) else None
            if isinstance(results, list) and any(
                isinstance(r, Mapping) and isinstance(r.get("id"), str) and r["id"] in current.result_ids
                for r in results
            ):
                return True
    return False
