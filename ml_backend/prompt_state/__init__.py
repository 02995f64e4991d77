"""The object an annotator is segmenting on a task, remembered between clicks.

Layered so that nothing imports upwards: :mod:`~ml_backend.prompt_state.types` (keys, objects, the storage
interface) and :mod:`~ml_backend.prompt_state.locking` (per-task holds) below the two storages,
:mod:`~ml_backend.prompt_state.memory` and :mod:`~ml_backend.prompt_state.files`, below the rules,
:mod:`~ml_backend.prompt_state.rules` (:class:`PromptMemory`), which picks a storage from the settings.
"""

from ml_backend.prompt_state.memory import MemoryStorage
from ml_backend.prompt_state.rules import Plan, PromptMemory, shared_state
from ml_backend.prompt_state.types import ObjectState, RegionMemory, StateStorage, TaskKey, task_key

__all__ = ["MemoryStorage", "ObjectState", "Plan", "PromptMemory", "RegionMemory", "StateStorage", "TaskKey",
           "shared_state", "task_key"]
