"""A real Label Studio 1.23.2 drives our backend (tiny random SAM) under gunicorn.

Random weights give arbitrary masks, so alignment is checked by comparing the mask
that comes back through Label Studio with the engine's own mask for the same image
and prompts, pixel for pixel.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from e2e.servers import Backend, LabelStudio
from ml_backend.brush import decode_rle
from ml_backend.images import decode_image
from ml_backend.sam import Prompts, SamEngine, load_segmenter

LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Cat"/><Label value="Dog"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="Cat" smart="true"/><Label value="Background" smart="true"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Dog" smart="true"/>
  </RectangleLabels>
</View>
"""


def png_bytes(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (250, 40, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def exif_rotated_jpeg(width: int, height: int, seed: int) -> bytes:
    """A JPEG stored ``width`` x ``height`` whose EXIF says: rotate 90° clockwise to display."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def engine(tiny_sam_preset: Path) -> SamEngine:
    return SamEngine(load_segmenter(str(tiny_sam_preset), converted_root=tiny_sam_preset.parent / "c"))


@pytest.fixture(scope="module")
def project(label_studio: LabelStudio, backend: Backend) -> dict:
    created = label_studio.ok("POST", "/api/projects", json={"title": "interactive", "label_config": LABEL_CONFIG})
    ml = label_studio.ok("POST", "/api/ml", json={"url": backend.url, "project": created["id"],
                                                  "is_interactive": True, "title": "sam"})
    images = {
        "landscape.png": png_bytes(160, 100, 1),
        "portrait.png": png_bytes(90, 150, 2),
        "rotated.jpg": exif_rotated_jpeg(150, 96, 3),
    }
    imported = label_studio.ok(
        "POST", f"/api/projects/{created['id']}/import?return_task_ids=true",
        files={name: (name, data) for name, data in images.items()},  # one form field per file
    )
    assert len(imported["task_ids"]) == len(images)
    # Listing (unlike opening a task) does not make Label Studio ask for a prediction.
    listed = label_studio.ok("GET", f"/api/tasks?project={created['id']}&page_size=100")["tasks"]
    tasks = {name: next(t for t in listed if t["data"]["image"].endswith("-" + name)) for name in images}
    return {"id": created["id"], "ml": ml["id"], "images": images, "tasks": tasks}


def keypoint(x_pct: float, y_pct: float, width: int, height: int, *, label: str = "Cat",
             positive: bool = True) -> dict:
    return {
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": x_pct, "y": y_pct, "width": 0.5, "keypointlabels": [label]},
        "is_positive": positive, "id": f"kp{x_pct}{y_pct}", "from_name": "click", "to_name": "image",
        "type": "keypointlabels", "origin": "manual",
    }


def rectangle(x: float, y: float, w: float, h: float, width: int, height: int) -> dict:
    return {
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": ["Dog"]},
        "id": "rect1", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
    }


def interactive(label_studio: LabelStudio, project: dict, task: dict, result: list[dict]) -> dict:
    answer = label_studio.ok("POST", f"/api/ml/{project['ml']}/interactive-annotating",
                             json={"task": task["id"], "context": {"result": result}})
    assert "errors" not in answer, answer
    return answer["data"]


def brush_masks(prediction: dict) -> list[tuple[str, np.ndarray]]:
    masks = []
    for item in prediction["result"]:
        assert item["type"] == "brushlabels" and item["from_name"] == "mask" and item["to_name"] == "image"
        value = item["value"]
        assert value["format"] == "rle"
        masks.append((value["brushlabels"][0],
                      decode_rle(value["rle"], item["original_height"], item["original_width"])))
    return masks


def displayed(project: dict, name: str) -> np.ndarray:
    return decode_image(project["images"][name], max_pixels=10**8)


@pytest.mark.parametrize("name", ["landscape.png", "portrait.png", "rotated.jpg"])
def test_a_positive_keypoint_gives_the_engines_mask(label_studio, project, engine, name) -> None:
    image = displayed(project, name)
    height, width = image.shape[:2]
    prediction = interactive(label_studio, project, project["tasks"][name], [keypoint(37.5, 37.5, width, height)])
    [(label, mask)] = brush_masks(prediction)
    expected = engine.segment(image, Prompts.from_lists([(0.375 * width, 0.375 * height)]))
    assert label == "Cat"
    assert mask.shape == (height, width)
    np.testing.assert_array_equal(mask, expected.mask)


def test_positive_and_negative_keypoints(label_studio, project, engine) -> None:
    name = "landscape.png"
    image = displayed(project, name)
    height, width = image.shape[:2]
    clicks = [keypoint(30, 30, width, height), keypoint(80, 70, width, height, positive=False),
              keypoint(10, 90, width, height, label="Background")]
    [(label, mask)] = brush_masks(interactive(label_studio, project, project["tasks"][name], clicks))
    expected = engine.segment(image, Prompts.from_lists(
        [(0.3 * width, 0.3 * height), (0.8 * width, 0.7 * height), (0.1 * width, 0.9 * height)], [1, 0, 0]))
    np.testing.assert_array_equal(mask, expected.mask)


def test_a_rectangle_and_a_rectangle_with_keypoints(label_studio, project, engine) -> None:
    name = "portrait.png"
    image = displayed(project, name)
    height, width = image.shape[:2]
    box = (0.2 * width, 0.1 * height, 0.7 * width, 0.6 * height)
    [(label, mask)] = brush_masks(interactive(label_studio, project, project["tasks"][name],
                                              [rectangle(20, 10, 50, 50, width, height)]))
    assert label == "Dog"
    np.testing.assert_array_equal(mask, engine.segment(image, Prompts.from_lists(box=box)).mask)

    inside = keypoint(40, 30, width, height)
    [(_, refined)] = brush_masks(interactive(label_studio, project, project["tasks"][name],
                                             [rectangle(20, 10, 50, 50, width, height), inside]))
    # The backend feeds the rectangle's previous logits back to SAM when a click refines it.
    first = engine.segment(image, Prompts.from_lists(box=box))
    refined_expected = engine.segment(image, Prompts.from_lists(
        [(0.4 * width, 0.3 * height)], box=box, mask_logits=first.low_res_logits))
    np.testing.assert_array_equal(refined, refined_expected.mask)


def test_local_file_storage_images(label_studio, project, engine) -> None:
    folder = label_studio.document_root / "images"
    data = png_bytes(120, 80, 7)
    (folder / "local.png").write_bytes(data)
    storage = label_studio.ok("POST", "/api/storages/localfiles", json={
        "project": project["id"], "title": "local", "path": str(folder), "regex_filter": r".*\.png",
        "use_blob_urls": True})
    label_studio.ok("POST", f"/api/storages/localfiles/{storage['id']}/sync")
    tasks = label_studio.ok("GET", f"/api/tasks?project={project['id']}&page_size=100")["tasks"]
    task = next(t for t in tasks if "local-files" in t["data"]["image"])
    image = decode_image(data, max_pixels=10**8)
    [(_, mask)] = brush_masks(interactive(label_studio, project, task, [keypoint(50, 50, 120, 80)]))
    np.testing.assert_array_equal(mask, engine.segment(image, Prompts.from_lists([(60, 40)])).mask)


def test_a_task_never_reads_another_projects_local_file(label_studio, project, backend) -> None:
    """Issue 21, item 8, with the real Label Studio: two projects, two local storages (``images`` and ``images-b``,
    one name a prefix of the other). A task of the first project naming the second's file is refused by the
    backend, although Label Studio serves that file to the backend's token; the first project's own file works."""
    other = label_studio.ok("POST", "/api/projects", json={"title": "other team", "label_config": LABEL_CONFIG})
    folder = label_studio.document_root / "images-b"
    folder.mkdir()
    (folder / "secret.png").write_bytes(png_bytes(64, 48, 11))
    label_studio.ok("POST", "/api/storages/localfiles", json={
        "project": other["id"], "title": "other", "path": str(folder), "use_blob_urls": True})
    own = label_studio.document_root / "images" / "own.png"
    own.write_bytes(png_bytes(120, 80, 12))
    storages = label_studio.ok("GET", f"/api/storages/localfiles?project={project['id']}")
    if not any(s["path"] == str(own.parent) for s in storages):  # test_local_file_storage_images made one
        label_studio.ok("POST", "/api/storages/localfiles", json={
            "project": project["id"], "title": "local", "path": str(own.parent), "use_blob_urls": True})
    secret_url = "/data/local-files/?d=images-b/secret.png"
    # Label Studio itself serves the file to the backend's token (an administrator's): no fallback may ask it.
    assert label_studio.api("GET", secret_url).status_code == 200
    imported = label_studio.ok("POST", f"/api/projects/{project['id']}/import?return_task_ids=true", json=[
        {"data": {"image": secret_url}}, {"data": {"image": "/data/local-files/?d=images/own.png"}}])
    stolen, mine = imported["task_ids"]
    answer = label_studio.ok("POST", f"/api/ml/{project['ml']}/interactive-annotating",
                             json={"task": stolen, "context": {"result": [keypoint(50, 50, 64, 48)]}})
    assert "errors" in answer and "403" in str(answer["errors"]), answer  # Label Studio keeps only the status
    assert f"d=images-b/secret.png: the file is not inside any local storage of project {project['id']}" in \
        backend.log.read_text()
    [(_, mask)] = brush_masks(interactive(label_studio, project, {"id": mine}, [keypoint(50, 50, 120, 80)]))
    assert mask.shape == (80, 120)


def test_batch_retrieve_predictions_stores_one_prediction_per_task(label_studio, project) -> None:
    label_studio.ok("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project['id']}",
                    json={"selectedItems": {"all": True, "excluded": []}})
    tasks = label_studio.ok("GET", f"/api/tasks?project={project['id']}&page_size=100&fields=all")["tasks"]
    for task in tasks:
        predictions = label_studio.ok("GET", f"/api/predictions?task={task['id']}")
        assert len(predictions) == 1, (task["id"], predictions)
        assert predictions[0]["model_version"] == "trimap-none"


def test_bad_input_gets_a_clear_answer_and_the_server_stays_up(label_studio, project, backend) -> None:
    task = project["tasks"]["landscape.png"]
    answer = label_studio.ok("POST", f"/api/ml/{project['ml']}/interactive-annotating",
                             json={"task": task["id"], "context": {"result": [keypoint(150, 30, 160, 100)]}})
    assert "errors" in answer

    cases = [
        (dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400, "JSON"),
        (dict(json={"tasks": [task], "label_config": LABEL_CONFIG,
                    "params": {"context": {"result": [{**keypoint(5, 5, 160, 100), "from_name": "nope"}]}}}),
         422, "nope"),
        (dict(json={"tasks": [{"id": 1, "data": {}}], "label_config": LABEL_CONFIG,
                    "params": {"context": {"result": [keypoint(5, 5, 160, 100)]}}}), 422, "data.image"),
        (dict(json={"tasks": [{"id": 1, "data": {"image": "/data/upload/999/missing.png"}}],
                    "label_config": LABEL_CONFIG,
                    "params": {"context": {"result": [keypoint(5, 5, 160, 100)]}}}), 422, "missing.png"),
        (dict(json={"tasks": [task], "label_config": "<View><Image name='i' value='$image'/></View>"}),
         422, "BrushLabels"),
    ]
    for kwargs, status, words in cases:
        response = backend.post("/predict", **kwargs)
        assert response.status_code == status, (response.status_code, response.text)
        assert words in response.json()["error"]
        assert "Traceback" not in response.text
    setup = backend.post("/setup", json={"project": "1.1", "schema": "<View></View>"})
    assert setup.status_code == 422 and "Image" in setup.json()["error"]
    assert backend.get("/health").json()["status"] == "UP"


def test_basic_auth(label_studio, backend_factory, project) -> None:
    guarded = backend_factory(BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret")
    assert requests.get(guarded.url + "/health", timeout=10).status_code == 200
    denied = requests.post(guarded.url + "/setup", json={"schema": LABEL_CONFIG}, timeout=10)
    assert denied.status_code == 401 and "basic-auth" in denied.json()["error"]
    wrong = requests.post(guarded.url + "/setup", json={"schema": LABEL_CONFIG}, auth=("ls", "nope"), timeout=10)
    assert wrong.status_code == 401
    refused = label_studio.api("POST", "/api/ml", json={"url": guarded.url, "project": project["id"],
                                                        "is_interactive": True, "title": "no auth"})
    assert refused.status_code >= 400
    ml = label_studio.ok("POST", "/api/ml", json={
        "url": guarded.url, "project": project["id"], "is_interactive": True, "title": "auth",
        "auth_method": "BASIC_AUTH", "basic_auth_user": "ls", "basic_auth_pass": "s3cret"})
    name = "landscape.png"
    answer = label_studio.ok("POST", f"/api/ml/{ml['id']}/interactive-annotating",
                             json={"task": project["tasks"][name]["id"],
                                   "context": {"result": [keypoint(50, 50, 160, 100)]}})
    assert "errors" not in answer and answer["data"]["result"][0]["type"] == "brushlabels"
