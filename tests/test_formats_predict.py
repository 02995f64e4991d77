"""Interactive suggestions and batch pre-annotation answer in the labeling config's mask form."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ml_backend.formats import BITMASK, BRUSH, POLYGON, PolygonOptions, mask_values, region_mask
from ml_backend.sam import Prompts, SamEngine
from ml_backend.settings import Settings
from test_preannotation import client_for, store_random_model, task
from training.predict import predict_trimap
from training.layout import project_store_dir  # the store of project 1, which the requests name
from training.store import ModelStore

TAGS = {BRUSH: "BrushLabels", BITMASK: "BitmaskLabels", POLYGON: "PolygonLabels"}


def label_config(result_type: str) -> str:
    tag = TAGS[result_type]
    return (f'<View><Image name="image" value="$image"/>'
            f'<{tag} name="mask" toName="image"><Label value="Background"/><Label value="Pet"/></{tag}>'
            '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Pet"/></KeyPointLabels></View>')


@pytest.fixture
def image() -> np.ndarray:
    pixels = np.full((50, 70, 3), 30, np.uint8)
    pixels[10:40, 20:55] = (220, 180, 40)
    return pixels


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache",
                               polygon_min_area=4, polygon_tolerance=0.5)


def read_back(items: list[dict], result_type: str) -> np.ndarray:
    mask = np.zeros((50, 70), bool)
    for item in items:
        assert item["type"] == result_type and item["from_name"] == "mask" and item["value"][result_type] == ["Pet"]
        assert (item["original_width"], item["original_height"]) == (70, 50)
        mask |= region_mask(item, (70, 50), max_pixels=10**6)
    return mask


def promised(mask: np.ndarray, result_type: str, settings: Settings) -> np.ndarray:
    """What the form can hold of ``mask`` with these settings (all of it, for brush and bitmask)."""
    values = mask_values(mask, result_type, PolygonOptions.from_settings(settings))
    return read_back([{"type": result_type, "from_name": "mask", "original_width": 70, "original_height": 50,
                       "value": {**v, result_type: ["Pet"]}} for v in values], result_type)


@pytest.mark.parametrize("result_type", [BRUSH, BITMASK, POLYGON])
def test_batch_preannotation_in_each_form(settings, tiny_segmenter, image, result_type) -> None:
    version = store_random_model(settings.model_dir, seed=1)
    client = client_for(settings, SamEngine(tiny_segmenter))
    response = client.post("/predict", json={"tasks": [task(image)], "label_config": label_config(result_type),
                                             "project": "1.1"})
    assert response.status_code == 200, response.json
    [prediction] = response.json["results"]
    assert prediction["model_version"] == f"trimap-{version}"
    classes = predict_trimap(ModelStore(project_store_dir(settings.model_dir, 1)).load_model(version), image)
    expected = (classes == 0) | (classes == 2)
    assert 0 < expected.sum() < expected.size
    restored = read_back(prediction["result"], result_type)
    if result_type == POLYGON:
        np.testing.assert_array_equal(restored, promised(expected, POLYGON, settings))
        assert (restored & expected).sum() / (restored | expected).sum() > 0.8
    else:
        np.testing.assert_array_equal(restored, expected)


@pytest.mark.parametrize("result_type", [BRUSH, BITMASK, POLYGON])
def test_interactive_suggestions_in_each_form(settings, tiny_segmenter, image, result_type) -> None:
    from test_app import data_uri

    engine = SamEngine(tiny_segmenter)
    client = client_for(settings, engine)
    click = {"original_width": 70, "original_height": 50, "image_rotation": 0, "from_name": "kp",
             "to_name": "image", "type": "keypointlabels", "is_positive": True,
             "value": {"x": 50, "y": 50, "width": 1, "keypointlabels": ["Pet"]}}
    response = client.post("/predict", json={
        "tasks": [{"id": 1, "data": {"image": data_uri(image)}}], "label_config": label_config(result_type),
        "project": "1.1", "params": {"context": {"result": [click]}}})
    assert response.status_code == 200, response.json
    [prediction] = response.json["results"]
    expected = engine.segment(image, Prompts.from_lists([(35, 25)])).mask
    assert expected.any()
    restored = read_back(prediction["result"], result_type)
    np.testing.assert_array_equal(restored, promised(expected, result_type, settings))
    if result_type != POLYGON:
        np.testing.assert_array_equal(restored, expected)


def test_mask_tag_setting_picks_the_form(settings, tiny_segmenter, image) -> None:
    settings = dataclasses.replace(settings, mask_tag="outline")
    store_random_model(settings.model_dir, seed=1)
    config = ('<View><Image name="image" value="$image"/>'
              '<BrushLabels name="mask" toName="image"><Label value="Pet"/></BrushLabels>'
              '<PolygonLabels name="outline" toName="image"><Label value="Pet"/></PolygonLabels></View>')
    client = client_for(settings, SamEngine(tiny_segmenter))
    response = client.post("/predict", json={"tasks": [task(image)], "label_config": config, "project": "1.1"})
    assert response.status_code == 200, response.json
    items = response.json["results"][0]["result"]
    assert items and {(i["type"], i["from_name"]) for i in items} == {(POLYGON, "outline")}
