"""Every mask form through a real Label Studio 1.23.2: brush RLE, bitmask PNG and polygons.

For each form a project is made whose config holds that mask tag. Our backend answers a smart
click in that form; its answer and a known synthetic mask are saved as annotations through the
API (Label Studio validates results against the config), the project is exported, and our reader
must give the masks back: brush and bitmask exactly, polygons with IoU >= POLYGON_MIN_IOU on the
synthetic mask and exactly what the polygon encoder promises for the SAM mask. Label Studio's own
converters are the oracle where it has one: its ``BRUSH_TO_PNG`` export for brushes (and the SDK's
``decode_rle``), its ``COCO`` export (pixel polygons, shoelace areas) for polygons. Finally the
retraining export reads the bitmask and polygon annotations from Label Studio into trimaps.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from e2e.known_mask import HEIGHT, WIDTH, iou, known_mask
from e2e.servers import Backend, LabelStudio
from ml_backend.export import ExportOptions, export_from_label_studio
from ml_backend.formats import BITMASK, BRUSH, POLYGON, PolygonOptions, mask_values, polygon_to_mask, region_mask
from ml_backend.images import ImageLoader, decode_image
from ml_backend.sam import Prompts, SamEngine, load_segmenter
from ml_backend.settings import Settings
from ml_backend.trimaps import TrimapValue

POLYGON_MIN_IOU = 0.97  # default POLYGON_TOLERANCE (1 px) on a 100-px disk with a hole
TAGS = {BRUSH: "BrushLabels", BITMASK: "BitmaskLabels", POLYGON: "PolygonLabels"}


def label_config(result_type: str) -> str:
    tag = TAGS[result_type]
    return f"""<View>
  <Image name="image" value="$image"/>
  <{tag} name="mask" toName="image"><Label value="Cat"/><Label value="Background"/></{tag}>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Cat" smart="true"/></KeyPointLabels>
</View>"""


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def region(result_type: str, value: dict, label: str = "Cat") -> dict:
    return {"from_name": "mask", "to_name": "image", "type": result_type, "original_width": WIDTH,
            "original_height": HEIGHT, "image_rotation": 0, "value": {**value, result_type: [label]}}


@pytest.fixture(scope="module")
def engine(tiny_sam_preset: Path) -> SamEngine:
    return SamEngine(load_segmenter(str(tiny_sam_preset), converted_root=tiny_sam_preset.parent / "c"))


@pytest.fixture(scope="module", params=[BRUSH, BITMASK, POLYGON])
def project(request, label_studio: LabelStudio, backend: Backend) -> dict:
    result_type = request.param
    created = label_studio.ok("POST", "/api/projects", json={"title": f"formats-{result_type}",
                                                             "label_config": label_config(result_type)})
    ml = label_studio.ok("POST", "/api/ml", json={"url": backend.url, "project": created["id"],
                                                  "is_interactive": True, "title": "sam"})
    images = {"a.png": png(1), "b.png": png(2)}
    imported = label_studio.ok("POST", f"/api/projects/{created['id']}/import?return_task_ids=true",
                               files={name: (name, data) for name, data in images.items()})
    tasks = label_studio.ok("GET", f"/api/tasks?project={created['id']}&page_size=100")["tasks"]
    assert len(imported["task_ids"]) == len(tasks) == 2
    by_name = {name: next(t for t in tasks if t["data"]["image"].endswith("-" + name)) for name in images}
    values = mask_values(known_mask(), result_type, PolygonOptions.from_settings(Settings()))
    annotate(label_studio, by_name["b.png"], [region(result_type, v) for v in values])
    return {"id": created["id"], "ml": ml["id"], "type": result_type, "images": images, "tasks": by_name}


def annotate(label_studio: LabelStudio, task: dict, result: list[dict]) -> None:
    label_studio.ok("POST", f"/api/tasks/{task['id']}/annotations",
                    json={"result": result, "was_cancelled": False, "ground_truth": False})


def exported(label_studio: LabelStudio, project: dict) -> dict[int, list[dict]]:
    tasks = label_studio.ok("GET", f"/api/projects/{project['id']}/export", params={"exportType": "JSON"})
    return {t["id"]: t["annotations"][-1]["result"] for t in tasks}


def test_each_form_round_trips_through_label_studio(label_studio, project, engine) -> None:
    result_type = project["type"]
    options = PolygonOptions.from_settings(Settings())  # the backend runs with the default settings

    # 1. A smart click: the backend answers in the config's form.
    task = project["tasks"]["a.png"]
    click = {"original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0, "id": "k1",
             "value": {"x": 40.0, "y": 50.0, "width": 0.5, "keypointlabels": ["Cat"], "labels": ["Cat"]},
             "is_positive": True, "from_name": "click", "to_name": "image", "type": "keypointlabels"}
    answer = label_studio.ok("POST", f"/api/ml/{project['ml']}/interactive-annotating",
                             json={"task": task["id"], "context": {"result": [click]}})
    assert "errors" not in answer, answer
    suggestion = answer["data"]["result"]
    image = decode_image(project["images"]["a.png"], max_pixels=10**8)
    sam_mask = engine.segment(image, Prompts.from_lists([(0.4 * WIDTH, 0.5 * HEIGHT)])).mask
    assert sam_mask.any()
    expected_values = mask_values(sam_mask, result_type, options)
    assert [item["type"] for item in suggestion] == [result_type] * len(expected_values)
    if result_type == POLYGON:
        assert [item["value"]["points"] for item in suggestion] == [v["points"] for v in expected_values]

    # 2. Accept it: the suggestion's items become the annotation, as in the editor. (The fixture
    #    annotated the other task with the known mask.)
    accepted = [{k: v for k, v in item.items() if k not in ("score", "readonly")} for item in suggestion]
    annotate(label_studio, task, accepted)
    truth = known_mask()
    other = project["tasks"]["b.png"]

    # 3. Export and read back.
    results = exported(label_studio, project)
    assert [item["value"] for item in results[task["id"]]] == [item["value"] for item in accepted]
    restored_sam = np.zeros_like(sam_mask)
    for item in results[task["id"]]:
        restored_sam |= region_mask(item, (WIDTH, HEIGHT), max_pixels=10**8)
    restored = np.zeros_like(truth)
    for item in results[other["id"]]:
        restored |= region_mask(item, (WIDTH, HEIGHT), max_pixels=10**8)
    if result_type == POLYGON:
        promised = np.zeros_like(sam_mask)
        for value in expected_values:
            promised |= polygon_to_mask(value["points"], WIDTH, HEIGHT)
        np.testing.assert_array_equal(restored_sam, promised)
        assert iou(restored, truth) >= POLYGON_MIN_IOU
        assert len(results[other["id"]]) == 2  # one region per component; the hole is bridged in
        assert not restored[60, 60]
    else:
        np.testing.assert_array_equal(restored_sam, sam_mask)
        np.testing.assert_array_equal(restored, truth)


def test_label_studios_own_converters_agree(label_studio, project) -> None:
    result_type = project["type"]
    other = project["tasks"]["b.png"]
    truth = known_mask()
    if result_type == BRUSH:
        response = label_studio.api("GET", f"/api/projects/{project['id']}/export",
                                    params={"exportType": "BRUSH_TO_PNG"})
        assert response.status_code == 200, response.text[:300]
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            names = [n for n in archive.namelist() if f"task-{other['id']}-" in n and n.endswith(".png")]
            assert names, archive.namelist()
            with Image.open(io.BytesIO(archive.read(names[0]))) as converted:
                oracle = np.asarray(converted.convert("L")) > 0
        np.testing.assert_array_equal(oracle, truth)
        from label_studio_sdk.converter import brush as sdk_brush

        [item] = exported(label_studio, project)[other["id"]]
        decoded = sdk_brush.decode_rle(item["value"]["rle"]).reshape(HEIGHT, WIDTH, 4)[..., 3] > 0
        np.testing.assert_array_equal(decoded, truth)
    elif result_type == POLYGON:
        response = label_studio.api("GET", f"/api/projects/{project['id']}/export", params={"exportType": "COCO"})
        assert response.status_code == 200, response.text[:300]
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            coco = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith(".json"))))
        image_ids = {image["id"] for image in coco["images"] if image["file_name"].endswith("b.png")}
        annotations = [a for a in coco["annotations"] if a["image_id"] in image_ids]
        assert len(annotations) == 2
        # An independent rasterizer (Pillow) over Label Studio's pixel polygons; pixel centres at +0.5.
        canvas = Image.new("L", (WIDTH, HEIGHT))
        for annotation in annotations:
            xy = np.array(annotation["segmentation"][0]).reshape(-1, 2) - 0.5
            ImageDraw.Draw(canvas).polygon([tuple(p) for p in xy], fill=1, outline=1)
        assert iou(np.asarray(canvas) > 0, truth) >= POLYGON_MIN_IOU
        # Label Studio's shoelace areas: the outline through boundary-pixel centres is about half a
        # pixel inside the painted edge, so the area is below the pixel count by about half the perimeter.
        area = sum(a["area"] for a in annotations)
        perimeter = sum(cv2.arcLength(c, True) for c in cv2.findContours(
            truth.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)[0])
        assert abs(truth.sum() - perimeter / 2 - area) < 0.02 * truth.sum()
    else:
        # Label Studio 1.23.2 has no bitmask converter: its JSON export keeps the PNG as sent (a 1-bit palette
        # PNG with a transparent index, which a browser's canvas decodes to RGBA like any PNG). Pillow alone
        # (not our reader) must see the editor's pixels: image size, alpha 255 exactly on the mask.
        [item] = exported(label_studio, project)[other["id"]]
        data = base64.b64decode(item["value"]["imageDataURL"].split(",", 1)[1])
        with Image.open(io.BytesIO(data)) as converted:
            assert converted.size == (WIDTH, HEIGHT)
            alpha = np.asarray(converted.convert("RGBA"))[..., 3]
        np.testing.assert_array_equal(alpha, truth * 255)


def test_retraining_export_reads_every_form_from_label_studio(label_studio, project, tmp_path) -> None:
    settings = dataclasses.replace(Settings(), image_cache_dir=tmp_path / "cache")
    loader = ImageLoader(settings)
    try:
        report = export_from_label_studio(tmp_path / "data", url=label_studio.url, token=label_studio.token,
                                          project=project["id"], loader=loader,
                                          options=ExportOptions(boundary_width=0))
    finally:
        loader.close()
    other = project["tasks"]["b.png"]
    assert report.skipped == {} and f"task-{other['id']}" in report.written
    with Image.open(tmp_path / "data" / "annotations" / "trimaps" / f"task-{other['id']}.png") as trimap:
        foreground = np.asarray(trimap) == TrimapValue.FOREGROUND
    threshold = POLYGON_MIN_IOU if project["type"] == POLYGON else 1.0
    assert iou(foreground, known_mask()) >= threshold
