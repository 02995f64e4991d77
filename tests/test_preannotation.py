"""Batch pre-annotation with a promoted trimap model: brush results, hot reload, SAM refinement."""

from __future__ import annotations

import base64
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.app import create_app
from ml_backend.brush import decode_rle
from ml_backend.preannotation import mask_bounding_box
from ml_backend.runtime import Runtime
from ml_backend.sam import Prompts, SamEngine
from ml_backend.settings import Settings
from training.model import build_model
from training.predict import predict_object, predict_trimap
from training.layout import project_store_dir
from training.store import MODEL_FILE, ModelStore

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Pet"/></BrushLabels></View>"""


def store_random_model(model_dir: Path, seed: int, project: int | None = 1) -> str:
    """A random-weight version made current in ``project``'s store (``None``: a single store at ``model_dir``)."""
    import keras

    keras.utils.set_random_seed(seed)
    store = ModelStore(model_dir if project is None else project_store_dir(model_dir, project))
    version = store.new_version_id()
    with store.staging(version) as staged:
        build_model(32).save(staged / MODEL_FILE)
        store.publish(staged, {"val_foreground_iou": 0.5}, make_current=True)
    return version


@pytest.fixture
def image() -> np.ndarray:
    pixels = np.full((50, 70, 3), 30, np.uint8)
    pixels[10:40, 20:55] = (220, 180, 40)
    return pixels


def task(image: np.ndarray, task_id: int = 1) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return {"id": task_id, "data": {"image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}}


def client_for(settings: Settings, engine: SamEngine):
    return create_app(settings, runtime=Runtime(settings, engine=engine)).test_client()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache")


def batch(client, tasks: list[dict]) -> dict:
    response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "1.1"})
    assert response.status_code == 200, response.json
    return response.json


def test_the_promoted_trimap_becomes_a_brush_region_and_reloads_after_promotion(settings, tiny_segmenter, image):
    client = client_for(settings, SamEngine(tiny_segmenter))
    first = store_random_model(settings.model_dir, seed=1)
    answer = batch(client, [task(image, 1), task(image, 2)])
    assert [p["model_version"] for p in answer["results"]] == [f"trimap-{first}"] * 2
    classes = predict_trimap(ModelStore(project_store_dir(settings.model_dir, 1)).load_model(first), image)
    [item] = answer["results"][0]["result"]
    assert item["value"]["brushlabels"] == ["Pet"] and (item["original_width"], item["original_height"]) == (70, 50)
    expected = (classes == 0) | (classes == 2)
    assert 0 < expected.sum() < expected.size  # a mask with both sides, so the comparison means something
    np.testing.assert_array_equal(decode_rle(item["value"]["rle"], 50, 70), expected)
    # The score is the model's edge confidence for that mask (docs/active-learning.md), the same on the region.
    model = ModelStore(project_store_dir(settings.model_dir, 1)).load_model(first)
    score = predict_object(model, image, include_boundary=True).score
    assert 0.0 < score < 1.0
    assert answer["results"][0]["score"] == item["score"] == pytest.approx(score, abs=1e-6)

    second = store_random_model(settings.model_dir, seed=2)
    assert batch(client, [task(image)])["results"][0]["model_version"] == f"trimap-{second}"
    assert client.post("/setup", json={"schema": CONFIG, "project": "1.1700000000"}).json["model_version"] == (
        f"trimap-{second}")


def test_foreground_only_when_the_boundary_is_excluded(settings, tiny_segmenter, image):
    settings = dataclasses.replace(settings, trimap_include_boundary=False)
    version = store_random_model(settings.model_dir, seed=1)
    [item] = batch(client_for(settings, SamEngine(tiny_segmenter)), [task(image)])["results"][0]["result"]
    classes = predict_trimap(ModelStore(project_store_dir(settings.model_dir, 1)).load_model(version), image)
    assert 0 < (classes == 0).sum() and (classes == 2).any()  # excluding the boundary changes the mask
    np.testing.assert_array_equal(decode_rle(item["value"]["rle"], 50, 70), classes == 0)


def test_sam_refines_the_trimap_foreground_box(settings, tiny_segmenter, image):
    settings = dataclasses.replace(settings, trimap_sam_refine=True)
    engine = SamEngine(tiny_segmenter)
    version = store_random_model(settings.model_dir, seed=3)
    [item] = batch(client_for(settings, engine), [task(image)])["results"][0]["result"]
    classes = predict_trimap(ModelStore(project_store_dir(settings.model_dir, 1)).load_model(version), image)
    box = mask_bounding_box((classes == 0) | (classes == 2))
    assert box is not None
    expected = engine.segment(image, Prompts.from_lists(box=box))
    np.testing.assert_array_equal(decode_rle(item["value"]["rle"], 50, 70), expected.mask)
    assert item["score"] == pytest.approx(expected.score, abs=1e-4)


def test_mask_bounding_box_uses_pixel_edges() -> None:
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    assert mask_bounding_box(mask) == (3.0, 2.0, 9.0, 5.0)
    assert mask_bounding_box(np.zeros((4, 4), bool)) is None


def test_predictions_go_under_the_first_foreground_label(settings, tiny_segmenter, image):
    config = """<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">
    <Label value="Background"/><Label value="Edge"/><Label value="Cat"/></BrushLabels></View>"""
    store_random_model(settings.model_dir, seed=1)
    client = client_for(settings, SamEngine(tiny_segmenter))
    response = client.post("/predict", json={"tasks": [task(image)], "label_config": config, "project": "1.1"})
    assert response.json["results"][0]["result"][0]["value"]["brushlabels"] == ["Cat"]


def _mask(answer: dict, index: int = 0) -> np.ndarray:
    [item] = answer["results"][index]["result"]
    return decode_rle(item["value"]["rle"], 50, 70)


def test_each_project_is_served_by_its_own_store_and_training_one_leaves_the_other_byte_identical(
        settings, tiny_segmenter, image):
    client = client_for(settings, SamEngine(tiny_segmenter))
    one, two = store_random_model(settings.model_dir, seed=1, project=1), store_random_model(
        settings.model_dir, seed=2, project=2)
    first = batch(client, [task(image)])
    other = client.post("/predict", json={"tasks": [task(image)], "label_config": CONFIG, "project": "2.1"}).json
    assert first["results"][0]["model_version"] == f"trimap-{one}" and other["model_version"] == f"trimap-{two}"
    assert not np.array_equal(_mask(first), _mask(other))  # different weights, different masks
    two_dir = project_store_dir(settings.model_dir, 2)
    before = {p.relative_to(two_dir): p.read_bytes() for p in two_dir.rglob("*") if p.is_file()}
    newer = store_random_model(settings.model_dir, seed=3, project=1)  # project 1 gets a new version
    assert batch(client, [task(image)])["results"][0]["model_version"] == f"trimap-{newer}"
    again = client.post("/predict", json={"tasks": [task(image)], "label_config": CONFIG, "project": "02"}).json
    assert again["model_version"] == f"trimap-{two}" and np.array_equal(_mask(again), _mask(other))
    assert {p.relative_to(two_dir): p.read_bytes() for p in two_dir.rglob("*") if p.is_file()} == before
    versions = client.get("/versions?project=1").json
    assert versions["serving"] == newer and [v["current"] for v in versions["versions"]] == [False, True]
    assert client.get("/status?project=2").json["trimap_model_version"] == two
    assert client.get("/versions?project=x").status_code == 400


def test_a_project_without_a_model_is_served_by_the_base_model(settings, tiny_segmenter, image, tmp_path):
    from training.layout import export_base

    source = store_random_model(tmp_path / "elsewhere", seed=4, project=None)
    base = export_base(ModelStore(tmp_path / "elsewhere"), None, tmp_path / "base" / "pets.keras")
    client = client_for(dataclasses.replace(settings, base_model=str(base)), SamEngine(tiny_segmenter))
    answer = batch(client, [task(image)])
    assert answer["results"][0]["model_version"] == "trimap-base-pets"
    expected = predict_trimap(ModelStore(tmp_path / "elsewhere").load_model(source), image)
    np.testing.assert_array_equal(_mask(answer), (expected == 0) | (expected == 2))
    assert client.get("/versions").json == {"project": None, "serving": "base-pets", "versions": []}
    own = store_random_model(settings.model_dir, seed=5, project=1)  # its first promoted version takes over
    assert batch(client, [task(image)])["results"][0]["model_version"] == f"trimap-{own}"


def test_an_older_single_store_is_served_as_the_base_model_until_adopted(settings, tiny_segmenter, image):
    from training.layout import adopt

    old = store_random_model(settings.model_dir, seed=6, project=None)  # MODEL_DIR/versions, MODEL_DIR/current
    client = client_for(settings, SamEngine(tiny_segmenter))
    assert batch(client, [task(image)])["results"][0]["model_version"] == f"trimap-base-{old}"
    adopt(settings.model_dir, 1)
    assert batch(client, [task(image)])["results"][0]["model_version"] == f"trimap-{old}"  # project 1's own now
    assert [v["id"] for v in client.get("/versions?project=1").json["versions"]] == [old]


def test_an_empty_or_tiny_predicted_mask_gives_no_region(settings, tiny_segmenter, image):
    version = store_random_model(settings.model_dir, seed=1)
    classes = predict_trimap(ModelStore(project_store_dir(settings.model_dir, 1)).load_model(version), image)
    area = int(((classes == 0) | (classes == 2)).sum())
    for min_area, regions in ((area, 1), (area + 1, 0)):
        client = client_for(dataclasses.replace(settings, min_mask_area=min_area), SamEngine(tiny_segmenter))
        prediction = batch(client, [task(image)])["results"][0]
        assert len(prediction["result"]) == regions and prediction["model_version"] == f"trimap-{version}"
