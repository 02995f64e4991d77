"""A new domain from its first annotations, end to end: a real Label Studio 1.23.2, Redis, our backend, an RQ worker.

The situation of issue #20 item 0, reproduced from outside: the base model was fitted on one kind of synthetic
image (``shapes``) and is confidently wrong on the project's kind (``muted``: its masks on the project's
held-out images overlap the objects less than predicting all foreground). Seven accepted annotations of the
new kind, then Start Training (``POST /api/ml/{id}/train``, what the button does). Before the small-data rule
(training/selection.py) that fine-tuned the base for 30 optimizer steps and nothing was promoted; now the job
fits three starts, keeps the average of the two best on the validation images, and its version must be
promoted and must serve, through "Retrieve Predictions" on tasks nobody annotated, brush masks that beat
predicting all foreground and beat the base model on the same tasks (checked by content).

With the rule off (``RETRAIN_COMPARE_MAX_TRAIN=0``: fine-tuning only, epochs as given) this test fails, on the
rule's record (no ``start_choice``), not on content: this fixture's base (validation IoU about 0.72 on its own
kind, where the issue's was 0.94) is weak enough that the old 30-step fine-tune, judged on the two validation
images the data split now keeps, was also promoted and served about as well (held-out 0.515 against the
rule's 0.510, all foreground 0.410, on 2026-12-07).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest_training import DOMAIN_SIZE, base_of_another_domain  # noqa: F401  (fixture)
from e2e.servers import REPO, Backend, LabelStudio, stop
from fake_label_studio import brush_result
from ml_backend.brush import decode_rle
from processes import wait_for
from redis_fixture import redis_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.redis
logger = logging.getLogger(__name__)

CONFIG = """<View><Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels></View>"""
ACCEPTED = 7  # what the project had when Start Training was clicked
HELD_OUT = 5  # tasks never annotated: what "Retrieve Predictions" is checked on
PROJECT_SEED = 9  # the project's images: write_synthetic(kind="muted", seed=PROJECT_SEED)
# The job's fit is not seeded (the fresh weights of the "decoder" and "scratch" candidates are a random draw).
# In-process, the same fit on these images kept a version with held-out IoU 0.49, 0.55 and 0.59 in three draws
# (all foreground: 0.41); the old fine-tune alone 0.25.


@pytest.fixture(scope="module")
def muted(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, np.ndarray]]:
    """The project's images (the JPEG bytes Label Studio gets) and their object masks (object and its edge band)."""
    from training.data import find_pairs, load_trimap, write_synthetic
    from training.model import BOUNDARY, FOREGROUND

    root = tmp_path_factory.mktemp("muted")
    write_synthetic(root, count=ACCEPTED + HELD_OUT, size=DOMAIN_SIZE, seed=PROJECT_SEED, kind="muted")
    return [(pair.image.read_bytes(), np.isin(load_trimap(pair.trimap), (FOREGROUND, BOUNDARY)))
            for pair in find_pairs(root).pairs]


@pytest.fixture(scope="module")
def setup(e2e_dir: Path, backend_factory, redis_server, base_of_another_domain) -> Iterator[dict]:  # noqa: F811
    base, _, _ = base_of_another_domain
    model_dir = e2e_dir / "first-annotations-models"
    # The settings (RETRAIN_EPOCHS 30, RETRAIN_BATCH_SIZE 16 are the defaults) at the base's 32 px;
    # no trigger by count: training starts when Start Training is clicked.
    env = {"REDIS_URL": redis_server, "MODEL_DIR": str(model_dir), "BASE_MODEL": str(base),
           "RETRAIN_MIN_ANNOTATIONS": "1000", "RETRAIN_MIN_INTERVAL_MIN": "0",
           "RETRAIN_IMAGE_SIZE": str(DOMAIN_SIZE), "BOUNDARY_WIDTH": "1", "MIN_MASK_AREA": "4"}
    backend = backend_factory(**env)
    log = e2e_dir / "first-annotations-worker.log"
    # One torch thread: less spread between a 2-core VM and a many-core CI runner (tests/conftest_training.py),
    # and no threads fighting over a shared machine's cores.
    worker = subprocess.Popen(
        [sys.executable, "-m", "ml_backend.retrain.worker"], cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, **env, "OMP_NUM_THREADS": "1", "IMAGE_CACHE_DIR": str(e2e_dir / "first-annotations-cache")})
    try:
        yield {"backend": backend, "model_dir": model_dir, "worker_log": log, "base": base}
    finally:
        stop(worker)


def status(backend: Backend, project: int) -> dict:
    answer = backend.get(f"/is_training?project={project}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def served_ious(label_studio: LabelStudio, project: int, tasks: list[int], truths: list[np.ndarray],
                model_version: str) -> list[float]:
    """"Retrieve Predictions" on ``tasks``: the IoU of each served brush mask (none: 0) with its truth."""
    label_studio.ok("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                    json={"selectedItems": {"all": False, "included": tasks}})
    ious = []
    for task, truth in zip(tasks, truths, strict=True):
        stored = [p for p in label_studio.ok("GET", f"/api/predictions?task={task}")
                  if p["model_version"] == model_version]
        assert len(stored) == 1, (model_version, label_studio.ok("GET", f"/api/predictions?task={task}"))
        mask = np.zeros_like(truth)
        for region in stored[0]["result"]:
            assert region["value"]["brushlabels"] == ["Object"]
            mask |= decode_rle(region["value"]["rle"], *truth.shape)
        ious.append(float((mask & truth).sum() / (mask | truth).sum()))
    return ious


@pytest.mark.timeout(1800)  # about 2 minutes on a quiet machine; far more when shared
def test_seven_annotations_of_a_new_domain_give_a_promoted_version_that_beats_all_foreground(
        label_studio: LabelStudio, setup, muted) -> None:
    from training.selection import TIE

    backend: Backend = setup["backend"]
    project = label_studio.ok("POST", "/api/projects", json={"title": "muted", "label_config": CONFIG})
    ml = label_studio.ok("POST", "/api/ml", json={"url": backend.url, "project": project["id"],
                                                  "is_interactive": False, "title": "trimap"})
    imported = label_studio.ok("POST", f"/api/projects/{project['id']}/import?return_task_ids=true",
                               files=[(f"file{i}", (f"muted-{i}.jpg", image)) for i, (image, _) in enumerate(muted)])
    tasks = sorted(imported["task_ids"])
    assert len(tasks) == ACCEPTED + HELD_OUT, imported
    truths = [truth for _, truth in muted]
    held_out, held_truths = tasks[ACCEPTED:], truths[ACCEPTED:]
    all_foreground = float(np.mean([truth.mean() for truth in held_truths]))  # its IoU with each truth

    # Precondition, through Label Studio: the base model is confidently wrong on this kind.
    base_version = f"trimap-base-{Path(setup['base']).name}"
    base_ious = served_ious(label_studio, project["id"], held_out, held_truths, base_version)
    assert np.mean(base_ious) < all_foreground, (base_ious, all_foreground)

    for i in range(ACCEPTED):
        result = {**brush_result(truths[i]), "from_name": "mask"}
        result["value"]["brushlabels"] = ["Object"]
        label_studio.ok("POST", f"/api/tasks/{tasks[i]}/annotations", json={"result": [result], "lead_time": 1.0})
    before = status(backend, project["id"])
    assert before["accepted_changes"] == ACCEPTED and not before["last"]  # no trigger by count: nothing trained
    label_studio.ok("POST", f"/api/ml/{ml['id']}/train", json={})  # Start Training
    state = wait_for(lambda: (s := status(backend, project["id"]))["last"] and not s["is_training"] and s,
                     1500, "the training started by Start Training", setup["worker_log"])
    last = state["last"]
    assert last["status"] == "succeeded", last
    assert last["usable"] == ACCEPTED and last["base_model"] == str(Path(setup["base"]).resolve())
    assert last["val_count"] >= 2  # chosen and promoted on more than one image
    assert last["promoted"], last  # beat all background, all foreground and the base on the validation images

    # Content: what the project is now served on tasks nobody annotated.
    ious = served_ious(label_studio, project["id"], held_out, held_truths, f"trimap-{last['version']}")
    logger.info("held-out IoU: served %.3f, base %.3f, all foreground %.3f; validation IoU %.4f, start_choice %s",
                np.mean(ious), np.mean(base_ious), all_foreground, last["val_foreground_iou"], last["start_choice"])
    assert np.mean(ious) > all_foreground, (ious, all_foreground, last)
    assert np.mean(ious) > np.mean(base_ious), (ious, base_ious)

    # The rule's record: three starts fitted; kept, the average of the two best on the validation images (or the
    # best alone).
    metrics = json.loads((setup["model_dir"] / "projects" / str(project["id"]) / "versions" / last["version"]
                          / "metrics.json").read_text())
    choice = metrics["start_choice"]
    assert choice is not None, f"one start fitted, no choice: the small-data rule did not run ({metrics['params']})"
    assert choice == last["start_choice"] and set(choice["candidates"]) == {"finetune", "decoder", "scratch"}
    assert metrics["start"] == choice["start"] and metrics["params"]["small_data_rule"] is True
    figures = sorted((c["val_foreground_iou"] for c in choice["candidates"].values()), reverse=True)
    kept = choice["start"].split("+")
    assert [choice["candidates"][k]["val_foreground_iou"] for k in kept] == pytest.approx(figures[:len(kept)],
                                                                                            abs=TIE)
    judged = choice["average"] if len(kept) == 2 else choice["candidates"][kept[0]]
    assert metrics["val_foreground_iou"] == judged["val_foreground_iou"]
