"""Retraining end to end: a real Label Studio 1.23.2, Redis, our backend and an RQ worker, two projects.

Annotations posted to Label Studio reach the backend as webhooks; the eighth accepted one in a project
starts a job that the worker runs (export through Label Studio's API, a small fit into that project's
own store, promotion by the rule). Each project's first version must learn enough to be promoted (beat
all background, all foreground and the random base model on its validation images); "Retrieve
Predictions" on tasks nobody annotated is then checked by content: non-empty brush masks under the
project's foreground label that overlap the drawn objects better than predicting all foreground. A project
without annotations is served by the base model. Training one project leaves the other's store
byte-identical. Two "Start Training" clicks during a run give one run and one follow-up.
(That a version which learned nothing is never served is proven by tests/test_training_fit.py.)
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2e.servers import REPO, Backend, LabelStudio, stop
from fake_label_studio import brush_result, pet_image
from ml_backend.brush import decode_rle
from processes import wait_for
from redis_fixture import redis_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.redis

SIZE = 48
CONFIGS = {
    "discs": """<View><Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Background"/><Label value="Disc"/></BrushLabels></View>""",
    "squares": """<View><Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Square"/></BrushLabels></View>""",
}
LABELS = {"discs": "Disc", "squares": "Square"}
TRAIN_SIZE = 64  # RETRAIN_IMAGE_SIZE
ACCEPTED = 8  # accepted annotations per project: the trigger, and the data each project trains on
HELD_OUT = 2  # tasks per project never annotated: what "Retrieve Predictions" is checked on


def square_image(index: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A dark background with a bright blue square whose place varies with ``index``."""
    y, x = np.mgrid[0:size, 0:size]
    top, left = (index * 5) % (size // 2), (index * 11) % (size // 2)
    mask = (y >= top) & (y < top + size // 2) & (x >= left) & (x < left + size // 2)
    image = np.stack([x + 10, y + 10, np.full_like(x, 30)], axis=-1).astype(np.uint8)
    image[mask] = (40, 90, 240)
    return image, mask


def sample(kind: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    return pet_image(index, SIZE) if kind == "discs" else square_image(index)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def brush(kind: str, index: int) -> dict:
    result = brush_result(sample(kind, index)[1])
    result["value"]["brushlabels"] = [LABELS[kind]]
    return {**result, "from_name": "mask"}


@pytest.fixture(scope="module")
def setup(e2e_dir: Path, label_studio: LabelStudio, backend_factory, redis_server) -> Iterator[dict]:
    import keras

    from training.model import build_model

    model_dir = e2e_dir / "retraining-models"
    base = e2e_dir / "base" / "random-base.keras"
    base.parent.mkdir(parents=True)
    keras.utils.set_random_seed(7)
    build_model(TRAIN_SIZE).save(base)
    # Training starts once every accepted annotation is in (no race between the export and the posts);
    # 64 px and enough epochs for the random base to learn the bright objects.
    env = {"REDIS_URL": redis_server, "MODEL_DIR": str(model_dir), "RETRAIN_MIN_ANNOTATIONS": str(ACCEPTED),
           "RETRAIN_MIN_INTERVAL_MIN": "0", "RETRAIN_IMAGE_SIZE": str(TRAIN_SIZE), "RETRAIN_EPOCHS": "25",
           "RETRAIN_BATCH_SIZE": "2", "BASE_MODEL": str(base), "BOUNDARY_WIDTH": "1", "MIN_MASK_AREA": "4",
           # One fit per job: the small-data rule (three fits) is proven through Label Studio by
           # test_first_annotations_e2e.py; here the subject is projects, stores and triggers.
           "RETRAIN_COMPARE_MAX_TRAIN": "0"}
    backend = backend_factory(**env)
    workers, logs = [], []
    for n in range(2):  # two projects may train at once
        log = e2e_dir / f"rq-worker-{n}.log"
        logs.append(log)
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "ml_backend.retrain.worker"], cwd=REPO, stdout=log.open("wb"),
            stderr=subprocess.STDOUT, env={**os.environ, **env, "IMAGE_CACHE_DIR": str(e2e_dir / f"worker-cache-{n}")}))
    try:
        yield {"backend": backend, "model_dir": model_dir, "worker_log": logs[0], "base": base}
    finally:
        for worker in workers:
            stop(worker)


def status(backend: Backend, project: int) -> dict:
    answer = backend.get(f"/is_training?project={project}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def create_project(label_studio: LabelStudio, backend: Backend, kind: str, count: int) -> tuple[dict, dict, list]:
    project = label_studio.ok("POST", "/api/projects", json={"title": kind, "label_config": CONFIGS[kind]})
    ml = label_studio.ok("POST", "/api/ml", json={"url": backend.url, "project": project["id"],
                                                  "is_interactive": False, "title": "trimap"})
    imported = label_studio.ok("POST", f"/api/projects/{project['id']}/import?return_task_ids=true",
                               files=[(f"file{i}", (f"{kind}-{i}.png", png(sample(kind, i)[0]))) for i in range(count)])
    tasks = sorted(imported["task_ids"])
    assert len(tasks) == count, imported
    return project, ml, tasks


def store_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def predictions(label_studio: LabelStudio, project: dict, tasks: list[int]) -> list[dict]:
    label_studio.ok("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project['id']}",
                    json={"selectedItems": {"all": False, "included": tasks}})
    found = []
    for task_id in tasks:
        stored = label_studio.ok("GET", f"/api/predictions?task={task_id}")
        assert len(stored) >= 1, stored
        found.append(stored[-1])
    return found


def check_content(kind: str, found: list[dict], indices: list[int], version: str) -> None:
    """What a promoted version must give: masks under the right label that beat predicting all foreground.

    ``indices``: which sample each prediction was made for (its task's image).
    """
    ious, trivial = [], []
    for index, prediction in zip(indices, found, strict=True):
        assert prediction["model_version"] == f"trimap-{version}", prediction
        truth = sample(kind, index)[1]
        [region] = prediction["result"]
        assert region["value"]["brushlabels"] == [LABELS[kind]]
        mask = decode_rle(region["value"]["rle"], SIZE, SIZE)
        assert mask.any()
        ious.append((mask & truth).sum() / (mask | truth).sum())
        trivial.append(truth.sum() / truth.size)
    assert np.mean(ious) > np.mean(trivial), (ious, trivial)


@pytest.mark.timeout(3000)  # four fits and a base model; minutes on a quiet machine, far more when shared
def test_two_projects_train_their_own_models_and_a_third_is_served_by_the_base(label_studio: LabelStudio,
                                                                                setup) -> None:
    backend: Backend = setup["backend"]
    model_dir: Path = setup["model_dir"]
    discs, ml, disc_tasks = create_project(label_studio, backend, "discs", ACCEPTED + 1 + HELD_OUT)
    squares, _, square_tasks = create_project(label_studio, backend, "squares", ACCEPTED + HELD_OUT)
    idle, _, idle_tasks = create_project(label_studio, backend, "discs", 2)
    assert backend.get(f"/versions?project={discs['id']}").json() == {"project": discs["id"],
                                                                    "serving": "base-random-base", "versions": []}

    def annotate(kind: str, tasks: list[int], i: int, **extra) -> None:
        label_studio.ok("POST", f"/api/tasks/{tasks[i]}/annotations",
                        json={"result": [brush(kind, i)], "lead_time": 1.0, **extra})

    annotate("discs", disc_tasks, 0)
    annotate("discs", disc_tasks, 1, was_cancelled=True)  # skipped: neither a trigger nor training data
    assert status(backend, discs["id"])["accepted_changes"] == 1
    for i in range(2, ACCEPTED + 1):
        annotate("discs", disc_tasks, i)
    for i in range(ACCEPTED):
        annotate("squares", square_tasks, i)

    done = {}
    for project in (discs, squares):
        state = wait_for(lambda p=project: (s := status(backend, p["id"]))["last"] and not s["is_training"] and s,
                         1500, f"project {project['id']}'s training", setup["worker_log"])
        last = state["last"]
        assert last["status"] == "succeeded", last
        assert last["export"]["written"] == ACCEPTED and last["usable"] == ACCEPTED
        assert last["parent"] is None and last["base_model"] == str(setup["base"].resolve())  # started from it
        done[project["id"]] = last
    assert done[discs["id"]]["export"]["not_accepted"] == 1

    for project, kind, tasks in ((discs, "discs", disc_tasks), (squares, "squares", square_tasks)):
        last = done[project["id"]]
        versions = backend.get(f"/versions?project={project['id']}").json()
        assert [v["id"] for v in versions["versions"]] == [last["version"]]  # its own store only
        assert (model_dir / "projects" / str(project["id"]) / "versions" / last["version"]).is_dir()
        assert last["promoted"], last  # learned: beat all background, all foreground and the base model
        assert versions["serving"] == last["version"]
        held_out = list(range(len(tasks) - HELD_OUT, len(tasks)))
        check_content(kind, predictions(label_studio, project, [tasks[i] for i in held_out]), held_out,
                      last["version"])

    # The project without annotations: the base model, no store of its own.
    for prediction in predictions(label_studio, idle, idle_tasks):
        assert prediction["model_version"] == "trimap-base-random-base"
    assert not (model_dir / "projects" / str(idle["id"])).exists()

    # Start Training twice in the disc project while the first click's run goes: one run, one follow-up;
    # the square project's store stays byte-identical.
    square_store = model_dir / "projects" / str(squares["id"])
    before = store_bytes(square_store)
    label_studio.ok("POST", f"/api/ml/{ml['id']}/train", json={})
    label_studio.ok("POST", f"/api/ml/{ml['id']}/train", json={})
    running = status(backend, discs["id"])
    assert running["is_training"] and running["follow_up_queued"] and running["reason"] == "START_TRAINING"
    state = wait_for(lambda: (s := status(backend, discs["id"]))["trainings"] == 3 and not s["is_training"] and s,
                     1500, "the two further jobs", setup["worker_log"])
    first, second, third = state["history"]
    assert [second["reason"], third["status"]] == ["START_TRAINING", "succeeded"] and "follow-up" in third["reason"]
    if first["promoted"]:  # fine-tuned from what was current
        assert second["parent"] == first["version"]
    else:  # nothing of its own was ever served: again from the base model
        assert second["parent"] is None and second["base_model"] == str(setup["base"].resolve())
    assert store_bytes(square_store) == before
