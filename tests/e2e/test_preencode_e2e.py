"""Pre-encoding with the real Label Studio 1.23.2: connecting a project encodes its images, new
tasks are encoded as they arrive, a click on a pre-encoded task does not encode, and a second
backend sharing the embedding store serves it without encoding."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from e2e.servers import REPO, Backend, LabelStudio
from processes import stop, wait_for
from redis_fixture import redis_server  # noqa: F401  (fixture)

LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Cat"/></BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Cat" smart="true"/></KeyPointLabels>
</View>
"""


def png_bytes(seed: int, width: int = 96, height: int = 72) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def keypoint(width: int = 96, height: int = 72) -> dict:
    return {"original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": 40, "y": 50, "width": 0.5, "keypointlabels": ["Cat"]}, "is_positive": True,
            "id": "kp1", "from_name": "click", "to_name": "image", "type": "keypointlabels", "origin": "manual"}


def status(backend: Backend) -> dict:
    return backend.get("/status").json()


def project_progress(backend: Backend, project: int) -> dict:
    return status(backend)["preencode"]["projects"].get(str(project), {})


def import_images(label_studio: LabelStudio, project: int, seeds: range) -> list[int]:
    files = {f"img{seed}.png": (f"img{seed}.png", png_bytes(seed)) for seed in seeds}
    imported = label_studio.ok("POST", f"/api/projects/{project}/import?return_task_ids=true", files=files)
    return imported["task_ids"]


@pytest.fixture(scope="module")
def store_dir(e2e_dir: Path) -> Path:
    return e2e_dir / "embedding-store"


@pytest.fixture(scope="module")
def preencoding_backend(backend_factory, store_dir: Path) -> Backend:
    return backend_factory(EMBEDDING_STORE_DIR=str(store_dir), PREENCODE="true", PREENCODE_LOG_EVERY="1")


@pytest.fixture(scope="module")
def connected(label_studio: LabelStudio, preencoding_backend: Backend) -> dict:
    """A project with three images, then connected to the backend (Label Studio calls /setup)."""
    created = label_studio.ok("POST", "/api/projects", json={"title": "preencode", "label_config": LABEL_CONFIG})
    task_ids = import_images(label_studio, created["id"], range(3))
    assert status(preencoding_backend)["sam"]["images_encoded"] == 0
    ml = label_studio.ok("POST", "/api/ml", json={"url": preencoding_backend.url, "project": created["id"],
                                                  "is_interactive": True, "title": "sam"})
    return {"id": created["id"], "ml": ml["id"], "tasks": task_ids}


def test_connecting_a_project_encodes_its_images(preencoding_backend: Backend, connected: dict) -> None:
    progress = wait_for(lambda: (p := project_progress(preencoding_backend, connected["id"])).get("done") == 3 and p,
                        300, "three images pre-encoded", log=preencoding_backend.log)
    assert progress == {"total": 3, "queued": 0, "running": 0, "done": 3, "failed": 0}
    current = status(preencoding_backend)
    assert current["sam"]["images_encoded"] == 3
    assert current["preencode"]["store"]["files"] == 3
    assert "pre-encoding project %d: 3/3 done" % connected["id"] in preencoding_backend.log.read_text()


def test_a_click_on_a_pre_encoded_task_does_not_encode(label_studio: LabelStudio, preencoding_backend: Backend,
                                                       connected: dict) -> None:
    wait_for(lambda: project_progress(preencoding_backend, connected["id"]).get("done") == 3, 300, "pre-encoded")
    before = status(preencoding_backend)["sam"]["images_encoded"]
    answer = label_studio.ok("POST", f"/api/ml/{connected['ml']}/interactive-annotating",
                             json={"task": connected["tasks"][1], "context": {"result": [keypoint()]}})
    assert "errors" not in answer, answer
    [item] = answer["data"]["result"]
    assert item["type"] == "brushlabels" and item["value"]["rle"]
    assert status(preencoding_backend)["sam"]["images_encoded"] == before


def test_tasks_created_later_are_encoded_as_they_arrive(label_studio: LabelStudio, preencoding_backend: Backend,
                                                         connected: dict) -> None:
    wait_for(lambda: project_progress(preencoding_backend, connected["id"]).get("done") == 3, 300, "pre-encoded")
    import_images(label_studio, connected["id"], range(10, 12))  # Label Studio sends TASKS_CREATED
    wait_for(lambda: project_progress(preencoding_backend, connected["id"]).get("done") == 5, 60,
             "the two new images pre-encoded", log=preencoding_backend.log)
    assert status(preencoding_backend)["sam"]["images_encoded"] == 5


def test_a_second_backend_sharing_the_store_serves_without_encoding(label_studio: LabelStudio, backend_factory,
                                                                     preencoding_backend: Backend, store_dir: Path,
                                                                     connected: dict) -> None:
    # At least the first three (an earlier test in this module may have added two more).
    wait_for(lambda: project_progress(preencoding_backend, connected["id"]).get("done", 0) >= 3, 300, "pre-encoded")
    second = backend_factory(EMBEDDING_STORE_DIR=str(store_dir), PREENCODE="false")
    tasks = label_studio.ok("GET", f"/api/tasks?project={connected['id']}&page_size=100")["tasks"]
    for task in tasks[:3]:
        response = second.post("/predict", json={"tasks": [task], "label_config": LABEL_CONFIG,
                                                  "project": f"{connected['id']}.1",
                                                  "params": {"context": {"result": [keypoint()]}}})
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["result"][0]["value"]["rle"]
    assert status(second)["sam"]["images_encoded"] == 0
    assert requests.get(second.url + "/status", timeout=10).json()["preencode"]["store"]["files"] >= 3


def test_with_redis_an_rq_worker_does_the_encoding(label_studio: LabelStudio, backend_factory, e2e_dir: Path,
                                                   tiny_sam_preset: Path, redis_server: str) -> None:  # noqa: F811
    store = e2e_dir / "rq-embedding-store"
    env = {"SAM_MODEL": str(tiny_sam_preset), "REDIS_URL": redis_server, "EMBEDDING_STORE_DIR": str(store),
           "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "LOCAL_FILES_DOCUMENT_ROOT": str(label_studio.document_root), "MODEL_DIR": str(e2e_dir / "rq-models"),
           "IMAGE_CACHE_DIR": str(e2e_dir / "rq-worker-cache")}
    log = e2e_dir / "embedding-worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "ml_backend.embeddings.worker"], cwd=REPO,
                              stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        web = backend_factory(**{k: v for k, v in env.items() if k != "IMAGE_CACHE_DIR"}, PREENCODE_EXECUTOR="rq")
        created = label_studio.ok("POST", "/api/projects", json={"title": "rq-encoding", "label_config": LABEL_CONFIG})
        task_ids = import_images(label_studio, created["id"], range(20, 23))
        ml = label_studio.ok("POST", "/api/ml", json={"url": web.url, "project": created["id"],
                                                      "is_interactive": True, "title": "sam"})
        wait_for(lambda: project_progress(web, created["id"]).get("done") == 3, 120,
                 "three images encoded by the worker", log=log)
        assert log.read_text().count(": encoded (") == 3, log.read_text()[-3000:]
        answer = label_studio.ok("POST", f"/api/ml/{ml['id']}/interactive-annotating",
                                 json={"task": task_ids[0], "context": {"result": [keypoint()]}})
        assert "errors" not in answer and answer["data"]["result"][0]["value"]["rle"], answer
        current = status(web)
        assert current["sam"]["images_encoded"] == 0, "the web process only decodes"
        assert current["preencode"]["executor"] == "rq" and current["preencode"]["store"]["files"] == 3
    finally:
        stop(worker)
