"""Basic Auth on, with a real Label Studio 1.23.2: everything Label Studio calls still works.

The backend starts without ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY`` (the README's default), so
it learns Label Studio's address and token only from the authenticated ``/setup``. Label Studio
connects with Basic Auth; the backend adds its webhook secret to the webhook Label Studio registered
(Label Studio sends no credentials on those deliveries); clicks, annotation webhooks and Start
Training all arrive and are accepted, while the same webhook without credentials or the secret is
refused.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
from PIL import Image

from e2e.servers import Backend, LabelStudio
from fake_label_studio import brush_result, pet_image
from ml_backend.brush import decode_rle
from ml_backend.images import decode_image
from ml_backend.sam import Prompts, SamEngine, load_segmenter
from ml_backend.security.auth import SECRET_HEADER
from processes import wait_for

USER, PASSWORD = "label-studio", "s3cret-pässword"  # Label Studio sends it Latin-1 encoded
LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Pet"/></BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Pet" smart="true"/></KeyPointLabels>
</View>
"""
SIZE = 48


def png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pet_image(index, SIZE)[0]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def guarded(backend_factory, e2e_dir) -> Backend:
    return backend_factory(BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD, LABEL_STUDIO_URL="",
                           LABEL_STUDIO_API_KEY="", RETRAIN_MIN_ANNOTATIONS="1000", RETRAIN_IMAGE_SIZE="32",
                           RETRAIN_EPOCHS="1", RETRAIN_BATCH_SIZE="2", MODEL_DIR=str(e2e_dir / "auth-models"))


def test_label_studio_drives_a_backend_behind_basic_auth(label_studio: LabelStudio, guarded: Backend,
                                                        tiny_sam_preset) -> None:
    project = label_studio.ok("POST", "/api/projects", json={"title": "auth", "label_config": LABEL_CONFIG})
    without = label_studio.api("POST", "/api/ml", json={"url": guarded.url, "project": project["id"],
                                                        "is_interactive": True, "title": "no auth"})
    assert without.status_code >= 400
    ml = label_studio.ok("POST", "/api/ml", json={
        "url": guarded.url, "project": project["id"], "is_interactive": True, "title": "sam",
        "auth_method": "BASIC_AUTH", "basic_auth_user": USER, "basic_auth_pass": PASSWORD})

    # The backend (holding the token from the authenticated /setup) puts its secret on its own webhook.
    def our_webhook() -> dict | None:
        hooks = label_studio.ok("GET", f"/api/webhooks/?project={project['id']}")
        ours = [h for h in hooks if h["url"] == guarded.url + "/webhook"]
        return ours[0] if ours and ours[0]["headers"].get(SECRET_HEADER) else None

    hook = wait_for(our_webhook, 60, "the webhook secret header", guarded.log)
    secret = hook["headers"][SECRET_HEADER]  # random, the project's own (MODEL_DIR/webhook-secrets.json)
    assert len(secret) == 64 and list(hook["headers"]) == [SECRET_HEADER]

    imported = label_studio.ok("POST", f"/api/projects/{project['id']}/import?return_task_ids=true",
                               files=[(f"file{i}", (f"pet-{i}.png", png(i))) for i in range(2)])
    tasks = sorted(imported["task_ids"])

    # A click: /predict with Basic Auth; the image comes from Label Studio with the token /setup gave.
    click = {"original_width": SIZE, "original_height": SIZE, "image_rotation": 0, "from_name": "click",
             "to_name": "image", "type": "keypointlabels", "is_positive": True,
             "value": {"x": 50, "y": 50, "width": 1, "keypointlabels": ["Pet"]}}
    answer = label_studio.ok("POST", f"/api/ml/{ml['id']}/interactive-annotating",
                             json={"task": tasks[0], "context": {"result": [click]}})
    assert "errors" not in answer, answer
    [item] = answer["data"]["result"]
    mask = decode_rle(item["value"]["rle"], SIZE, SIZE)
    engine = SamEngine(load_segmenter(str(tiny_sam_preset), converted_root=tiny_sam_preset.parent / "c"))
    expected = engine.segment(decode_image(png(0), max_pixels=10**6), Prompts.from_lists([(SIZE / 2, SIZE / 2)]))
    np.testing.assert_array_equal(mask, expected.mask)

    # Annotation webhooks (no credentials from Label Studio, only the secret header) are accepted and counted.
    for i, task in enumerate(tasks):
        label_studio.ok("POST", f"/api/tasks/{task}/annotations",
                        json={"result": [{**brush_result(pet_image(i, SIZE)[1]), "from_name": "mask"}],
                              "lead_time": 1.0})
    status = wait_for(lambda: (s := guarded.get(f"/is_training?project={project['id']}").json())
                      ["accepted_changes"] == 2 and s, 30, "two counted annotation webhooks", guarded.log)
    assert not status["is_training"]

    # Start Training (a webhook Label Studio sends with Basic Auth) starts a job that exports through the API.
    label_studio.ok("POST", f"/api/ml/{ml['id']}/train", json={})
    state = wait_for(lambda: (s := guarded.get(f"/is_training?project={project['id']}").json())["last"] and s,
                     300, "the training job", guarded.log)
    assert state["last"]["reason"] == "START_TRAINING"
    assert state["last"]["status"] == "succeeded", state["last"]
    assert state["last"]["export"]["written"] == 2

    # The same webhook from anyone else is refused.
    event = {"action": "START_TRAINING", "project": {"id": project["id"]}}
    assert requests.post(guarded.url + "/webhook", json=event, timeout=10).status_code == 401
    assert requests.post(guarded.url + "/webhook", json=event, headers={SECRET_HEADER: "0" * 64},
                         timeout=10).status_code == 401
    assert requests.post(guarded.url + "/setup", json={"schema": LABEL_CONFIG, "hostname": "http://evil:1"},
                         timeout=10).status_code == 401
    assert guarded.get("/health").json()["status"] == "UP"
    log = guarded.log.read_text(errors="replace")
    assert "ERROR ml_backend.app" not in log

