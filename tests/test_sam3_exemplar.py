"""Interactive SAM 3 exemplars through the HTTP app, on the editor's recorded rectangle request.

The backend serves a tiny random SAM 3 (transformers' classes, loaded through our loader); the expected
regions are computed here from the same engine with the boxes read from the request by hand.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sam3_fixture import assert_same_regions, checkpoint, sam3_engine  # noqa: F401  (fixtures)

from ml_backend.app import create_app
from ml_backend.brush import decode_rle
from ml_backend.errors import InvalidPromptError
from ml_backend.labeling import parse_label_config, read_context
from ml_backend.runtime import Runtime
from ml_backend.sam import SamEngine
from ml_backend.sam3.concepts import select_instances
from ml_backend.sam3.exemplar import ExemplarSegmenter
from ml_backend.settings import Settings, SettingsError

EDITOR = Path(__file__).parent / "fixtures" / "editor"
THRESHOLD, DEDUP = 0.2, 0.5


@pytest.fixture
def settings(tmp_path: Path, checkpoint: Path) -> Settings:
    return dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache",
                               preannotate="trimap", sam3_model=str(checkpoint), sam3_exemplar_labels=("dog",),
                               sam3_score_threshold=THRESHOLD, sam3_dedup_iou=DEDUP)


@pytest.fixture
def client(settings: Settings, tiny_segmenter, sam3_engine):
    runtime = Runtime(settings, engine=SamEngine(tiny_segmenter, source="tiny"), sam3_engine=sam3_engine)
    return create_app(settings, runtime=runtime).test_client()


def _data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _rectangle_request(image: np.ndarray) -> dict:
    """The editor's recorded request for a smart "Dog" rectangle on a 400x300 image, on ``image``."""
    request = json.loads((EDITOR / "05_rectangle.json").read_text())
    request["tasks"][0]["data"]["image"] = _data_uri(image)
    return request


def _box(item: dict, width: int, height: int) -> tuple[float, float, float, float]:
    v = item["value"]
    x, y = v["x"] * width / 100, v["y"] * height / 100
    return x, y, x + v["width"] * width / 100, y + v["height"] * height / 100


def _expected(engine, image: np.ndarray, boxes: list) -> list[tuple[float, np.ndarray]]:
    found = engine.segment(image, ["Dog"], threshold=THRESHOLD, boxes=boxes, box_labels=[1] * len(boxes))[0]
    kept = select_instances([("Dog", found)], iou_threshold=DEDUP, max_instances=Settings().sam3_max_instances)
    return [(k.instance.score, k.instance.mask) for k in kept]


def _regions(answer) -> list[tuple[float, np.ndarray]]:
    assert answer.status_code == 200, answer.get_data(as_text=True)
    [prediction] = answer.get_json()["results"]
    regions = []
    for r in prediction["result"]:
        assert r["type"] == "brushlabels" and r["from_name"] == "mask" and r["value"]["brushlabels"] == ["Dog"]
        regions.append((r["score"], decode_rle(r["value"]["rle"], r["original_height"], r["original_width"]) > 0))
    return regions


def test_an_exemplar_rectangle_returns_every_similar_instance(client, sam3_engine) -> None:
    image = np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    request = _rectangle_request(image)
    [item] = request["params"]["context"]["result"]
    answer = client.post("/predict", json=request)
    assert answer.get_json()["results"][0]["model_version"] == "sam3-sam3-tiny"
    box = _box(item, 400, 300)
    expected = _expected(sam3_engine, image, [box])
    assert_same_regions(_regions(answer), expected)
    # The box reached SAM 3 as an exemplar: without it the answer is another one.
    without = [s for s, _ in _expected(sam3_engine, image, [])]
    assert without != pytest.approx([s for s, _ in expected], abs=1e-5)


def test_a_second_rectangle_of_the_label_adds_an_exemplar(client, sam3_engine) -> None:
    """The editor sends every rectangle of the label drawn: the answer is for all of them."""
    image = np.random.default_rng(4).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    request = _rectangle_request(image)
    first = request["params"]["context"]["result"][0]
    second = copy.deepcopy(first)
    second["id"], second["value"]["x"], second["value"]["y"] = "second", 60.0, 50.0
    request["params"]["context"]["result"].append(second)
    expected = _expected(sam3_engine, image, [_box(first, 400, 300), _box(second, 400, 300)])
    assert_same_regions(_regions(client.post("/predict", json=request)), expected)


def test_boxes_follow_the_image_when_label_studio_measured_another_size(client, sam3_engine) -> None:
    image = np.random.default_rng(5).integers(0, 256, (150, 200, 3), dtype=np.uint8)  # half of 400x300
    request = _rectangle_request(image)
    [item] = request["params"]["context"]["result"]
    assert_same_regions(_regions(client.post("/predict", json=request)),
                        _expected(sam3_engine, image, [_box(item, 200, 150)]))


def test_other_labels_still_get_sam_and_batch_predictions_stay_trimap(client) -> None:
    image = np.random.default_rng(6).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    request = _rectangle_request(image)
    request["params"]["context"]["result"][0]["value"]["rectanglelabels"] = ["Cat"]
    answer = client.post("/predict", json=request)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    [prediction] = answer.get_json()["results"]
    assert prediction["model_version"] == "sam-tiny" and len(prediction["result"]) == 1
    assert prediction["result"][0]["value"]["brushlabels"] == ["Cat"]
    batch = client.post("/predict", json={"tasks": request["tasks"], "label_config": request["label_config"],
                                          "project": request["project"]})
    assert batch.get_json()["results"][0]["model_version"] == "trimap-none"
    assert client.get("/status").get_json()["sam3"]["state"] == "ready"


def test_requests_the_editor_never_sends_are_refused_with_a_message(client, settings: Settings) -> None:
    image = np.random.default_rng(7).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    request = _rectangle_request(image)
    items = request["params"]["context"]["result"]
    cat = copy.deepcopy(items[0])
    cat["id"], cat["value"]["rectanglelabels"] = "cat", ["Cat"]
    point = {"original_width": 400, "original_height": 300, "value": {"x": 40.0, "y": 40.0, "keypointlabels": ["Dog"]},
             "id": "p", "from_name": "click", "to_name": "image", "type": "keypointlabels", "is_positive": True}
    for extra in (cat, point):
        body = copy.deepcopy(request)
        body["params"]["context"]["result"].append(extra)
        answer = client.post("/predict", json=body)
        assert answer.status_code == 422 and "SAM3_EXEMPLAR_LABELS" in answer.get_json()["error"]
    config = parse_label_config(request["label_config"])
    both = ExemplarSegmenter(dataclasses.replace(settings, sam3_exemplar_labels=("dog", "cat")), lambda *a: [])
    with pytest.raises(InvalidPromptError, match="several labels"):
        both.match(read_context({"result": [items[0], cat]}, config))


def test_exemplar_labels_need_a_sam3_model() -> None:
    with pytest.raises(SettingsError, match="SAM3_EXEMPLAR_LABELS needs SAM3_MODEL"):
        Settings.from_env({"SAM3_EXEMPLAR_LABELS": "Dog"})
    assert Settings.from_env({"SAM3_EXEMPLAR_LABELS": " Dog, Car ,", "SAM3_MODEL": "sam3_pcs"}
                             ).sam3_exemplar_labels == ("dog", "car")
