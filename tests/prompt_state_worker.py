"""A process holding a shared PromptMemory, as a gunicorn worker does (tests/test_prompt_state_shared.py).

``python tests/prompt_state_worker.py serve DIR BASE``: reads recorded editor bodies, one JSON
object per line on stdin, plans and remembers each as the backend does (answering with logits
filled with BASE + n), and writes one JSON line per body: the rule that decided, the fill value of
the previous logits each region was given (null: none) and the fill it answered.

``python tests/prompt_state_worker.py hammer DIR NAME N``: N read-modify-writes of one task's object
under ``hold``, each adding the result id ``NAME-i`` and logits filled with a fresh value.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ml_backend.errors import InvalidPromptError
from ml_backend.labeling import parse_label_config, read_context
from ml_backend.prompt_state import ObjectState, PromptMemory, RegionMemory, TaskKey, task_key
from ml_backend.prompt_state.files import FileStorage

LIMITS = {"max_bytes": 64 << 20, "max_entries": 100, "ttl_s": 900.0}
HAMMER_KEY = TaskKey(project="1", task="1", image="/data/upload/1/a.png")


def fill(array: np.ndarray | None) -> float | None:
    return None if array is None else float(array.flat[0])


def serve(directory: Path, base: float) -> None:
    memory = PromptMemory(**LIMITS, storage=FileStorage(directory, **LIMITS))
    answers = 0
    for line in sys.stdin:
        request = json.loads(line)
        prompts = read_context(request["params"]["context"], parse_label_config(request["label_config"]))
        task = request["tasks"][0]
        key = task_key(request["project"], task, task["data"]["image"])
        try:
            with memory.hold(key):
                plan = memory.plan(key, prompts, task)
                answered = []
                for _ in plan.regions:
                    answers += 1
                    answered.append(np.full((256, 256), base + answers, np.float32))
                memory.remember(plan, answered, [f"{base}-{answers}"])
        except InvalidPromptError as exc:
            print(json.dumps({"error": exc.message}), flush=True)
            continue
        print(json.dumps({"reason": plan.reason, "given": [fill(r.prompts.mask_logits) for r in plan.regions],
                          "answered": [fill(a) for a in answered],
                          "boxes": [r.prompts.box is not None for r in plan.regions]}), flush=True)


def hammer(directory: Path, name: str, count: int) -> None:
    storage = FileStorage(directory, **LIMITS)
    for i in range(count):
        with storage.hold(HAMMER_KEY):
            current = storage.load(HAMMER_KEY)
            ids = set() if current is None else set(current.result_ids)
            value = float(hash((name, i)) % 100000)
            logits = np.full((256, 256), value, np.float32)
            storage.save(HAMMER_KEY, ObjectState(
                groups={}, label=None, size=(4, 3), result_ids=frozenset(ids | {f"{name}-{i}"}),
                regions=(RegionMemory(signature=(None, frozenset({(1.0, 1.0, 1)})), given=logits, answered=logits),)))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), float(sys.argv[3]))
    else:
        hammer(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
