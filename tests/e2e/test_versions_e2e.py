"""Per-project versions in a real Label Studio 1.23.2: the backend connected as ``<backend>/projects/<id>/``.

Label Studio's ``GET /versions`` carries no project (it sends no body and no query), so through the plain URL
its version list (``GET /api/ml/<id>/versions``) is what serves projects without a model of their own. Label
Studio joins each route to the URL it was given (``/projects/<id>/`` + ``versions``), so a per-project URL
makes every call name the project: the list is the project's own versions, the live model's version in
Label Studio's "model version" selector (``/setup``'s answer) is the project's serving version, the
webhook Label Studio registers goes to ``/projects/<id>/webhook``, and batch predictions come from the
project's model.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2e.servers import Backend, LabelStudio

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels></View>"""


def publish(model_dir: Path, project: int, seed: int, iou: float) -> str:
    """A random-weight version made current in ``project``'s store."""
    import keras

    from training.layout import project_store_dir
    from training.model import build_model
    from training.store import MODEL_FILE, ModelStore

    keras.utils.set_random_seed(seed)
    store = ModelStore(project_store_dir(model_dir, project))
    version = store.new_version_id()
    with store.staging(version) as staged:
        build_model(32).save(staged / MODEL_FILE)
        store.publish(staged, {"val_foreground_iou": iou, "promotion": {"promoted": True}}, make_current=True)
    return version


def png() -> bytes:
    pixels = np.full((40, 40, 3), 30, np.uint8)
    pixels[10:30, 10:30] = (220, 180, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def backend(e2e_dir: Path, backend_factory) -> tuple[Backend, Path]:
    model_dir = e2e_dir / "versions-models"
    return backend_factory(MODEL_DIR=str(model_dir), PREENCODE="false"), model_dir


@pytest.mark.timeout(1200)
def test_a_per_project_backend_url_shows_the_projects_own_versions(label_studio: LabelStudio, backend) -> None:
    server, model_dir = backend
    project = label_studio.ok("POST", "/api/projects", json={"title": "versions", "label_config": CONFIG})["id"]
    other = label_studio.ok("POST", "/api/projects", json={"title": "plain url", "label_config": CONFIG})["id"]
    versions = [publish(model_dir, project, seed, iou) for seed, iou in ((1, 0.5), (2, 0.6))]

    ml = label_studio.ok("POST", "/api/ml", json={"url": f"{server.url}/projects/{project}/", "project": project,
                                                  "is_interactive": False, "title": "trimap"})
    plain = label_studio.ok("POST", "/api/ml", json={"url": server.url, "project": other, "is_interactive": False,
                                                     "title": "trimap"})
    assert ml["state"] == "CO" and plain["state"] == "CO", (ml, plain)  # /health and /setup answered

    # Label Studio's version list: the project's own versions through its URL, nothing through the plain one.
    listed = label_studio.ok("GET", f"/api/ml/{ml['id']}/versions")["versions"]
    assert [v["id"] for v in listed] == versions and [v["current"] for v in listed] == [False, True]
    assert label_studio.ok("GET", f"/api/ml/{plain['id']}/versions")["versions"] == []

    # The "model version" selector's live model: what /setup answered for this project.
    live = label_studio.ok("GET", f"/api/projects/{project}/model-versions",
                           params={"extended": "true", "include_live_models": "true"})["live"]
    assert [m["model_version"] for m in live] == [f"trimap-{versions[-1]}"]

    # The webhook Label Studio registered carries the project too.
    hooks = label_studio.ok("GET", "/api/webhooks/", params={"project": project})
    assert [h["url"] for h in hooks] == [f"{server.url}/projects/{project}/webhook"]

    # Batch predictions through the per-project URL come from the project's current version.
    [task] = label_studio.ok("POST", f"/api/projects/{project}/import?return_task_ids=true",
                             files=[("file0", ("object.png", png()))])["task_ids"]
    label_studio.ok("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                    json={"selectedItems": {"all": False, "included": [task]}})
    [prediction] = label_studio.ok("GET", f"/api/predictions?task={task}")
    assert prediction["model_version"] == f"trimap-{versions[-1]}"

    # A project's URL pasted into another project's settings is refused with a message saying so.
    answer = server.post(f"/projects/{project}/setup", json={"project": f"{other}.1700000000", "schema": CONFIG})
    assert answer.status_code == 400 and f"serves project {project}" in answer.json()["error"]
