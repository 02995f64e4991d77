"""Typed phrases through the HTTP app, on the editor's recorded TextArea request (fixtures/editor/07_typed_phrase.json).

The backend serves a tiny random SAM 3; the expected regions are computed here from the same engine for the
same phrase with the pre-annotation rules (threshold, de-duplication, instance limit).
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

from ml_backend.app import create_app
from ml_backend.brush import decode_rle
from ml_backend.errors import InvalidPromptError
from ml_backend.runtime import Runtime
from ml_backend.sam import SamEngine
from ml_backend.sam3.concepts import MAX_PHRASE_CHARS, select_instances
from ml_backend.sam3.phrase import check_phrase
from ml_backend.settings import Settings
from sam3_fixture import assert_same_regions, checkpoint, sam3_engine  # noqa: F401  (fixtures)

EDITOR = Path(__file__).parent / "fixtures" / "editor"
THRESHOLD, DEDUP, MAX_INSTANCES = 0.2, 0.5, 3
PHRASE = "yellow school bus"  # what the recording's annotator typed


@pytest.fixture
def settings(tmp_path: Path, checkpoint: Path) -> Settings:
    return dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache",
                               preannotate="trimap", sam3_model=str(checkpoint), sam3_score_threshold=THRESHOLD,
                               sam3_dedup_iou=DEDUP, sam3_max_instances=MAX_INSTANCES, sam3_text_default_label="object")


def _client(settings: Settings, tiny_segmenter, sam3_engine=None):
    runtime = Runtime(settings, engine=SamEngine(tiny_segmenter, source="tiny"), sam3_engine=sam3_engine)
    return create_app(settings, runtime=runtime).test_client()


@pytest.fixture
def client(settings: Settings, tiny_segmenter, sam3_engine):
    return _client(settings, tiny_segmenter, sam3_engine)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (300, 400, 3), dtype=np.uint8)


def _request(image: np.ndarray, text: str | None = None) -> dict:
    """The editor's recorded request for a typed phrase, on ``image`` (and with ``text`` typed instead)."""
    request = json.loads((EDITOR / "07_typed_phrase.json").read_text())
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    request["tasks"][0]["data"]["image"] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    if text is not None:
        request["params"]["context"]["result"][0]["value"]["text"] = [text]
    return request


def _expected(engine, image: np.ndarray, phrase: str) -> list[tuple[float, np.ndarray]]:
    found = engine.segment(image, [phrase], threshold=THRESHOLD)[0]
    kept = select_instances([("any", found)], iou_threshold=DEDUP, max_instances=MAX_INSTANCES)
    return [(k.instance.score, k.instance.mask) for k in kept]


def _regions(answer, label: str) -> list[tuple[float, np.ndarray]]:
    assert answer.status_code == 200, answer.get_data(as_text=True)
    [prediction] = answer.get_json()["results"]
    assert prediction["model_version"] == "sam3-sam3-tiny"
    regions = []
    for r in prediction["result"]:
        assert r["type"] == "brushlabels" and r["from_name"] == "mask" and r["value"]["brushlabels"] == [label], r
        regions.append((r["score"], decode_rle(r["value"]["rle"], r["original_height"], r["original_width"]) > 0))
    return regions


def test_the_recorded_phrase_returns_every_instance_under_the_label_it_names(client, sam3_engine) -> None:
    """The recorded config's "Bus" label has the hint "yellow school bus": the phrase names it."""
    image = _image(3)
    request = _request(image)
    assert request["params"]["context"]["result"][0]["value"]["text"] == [PHRASE]
    expected = _expected(sam3_engine, image, PHRASE)
    assert_same_regions(_regions(client.post("/predict", json=request), "Bus"), expected)
    # It went through the encode gate as an interactive request, timed as its own kind.
    assert "sam3 phrase" in client.get("/status").get_json()["sam"]["encodes"]["mean_s"]
    # The phrase reached SAM 3 (not the label's name); the instance limit and threshold were applied.
    assert [s for s, _ in _expected(sam3_engine, image, "Bus")] != pytest.approx([s for s, _ in expected], abs=1e-5)
    everything = sam3_engine.segment(image, [PHRASE], threshold=0.0)[0]
    assert len(everything) > MAX_INSTANCES and len(expected) == MAX_INSTANCES


def test_the_last_phrase_typed_is_answered(client, sam3_engine) -> None:
    """The editor keeps a TextArea's submissions in one result: the newest is the last (no label is named so:
    SAM3_TEXT_DEFAULT_LABEL)."""
    image = _image(4)
    request = _request(image)
    request["params"]["context"]["result"][0]["value"]["text"] = ["dog", " red apple "]
    assert_same_regions(_regions(client.post("/predict", json=request), "Object"),
                 _expected(sam3_engine, image, "red apple"))


def test_a_phrase_naming_a_label_goes_under_that_label(client, sam3_engine) -> None:
    """Named by the label's value or its SAM 3 phrase (its hint), case-insensitively; SAM 3 reads what was typed."""
    image = _image(5)
    for typed, label in (("YELLOW School bus", "Bus"), ("bus", "Bus"), ("OBJECT", "Object")):
        request = _request(image, typed)
        assert_same_regions(_regions(client.post("/predict", json=request), label),
                            _expected(sam3_engine, image, typed))


@pytest.mark.parametrize(("text", "message"), [
    ("   ", "empty"),
    ("bus " * (MAX_PHRASE_CHARS // 4 + 1), "at most 200 characters"),
    ("school\nbus", "control or invisible"),
    ("school\u200bbus", "control or invisible"),
    ("bus\x00", "control or invisible"),
])
def test_unusable_phrases_are_refused_with_a_message(client, text: str, message: str) -> None:
    answer = client.post("/predict", json=_request(_image(6), text))
    assert answer.status_code == 422 and message in answer.get_json()["error"], answer.get_json()


def test_malformed_or_mixed_requests_are_refused(client) -> None:
    request = _request(_image(7))
    point = {"original_width": 400, "original_height": 300, "value": {"x": 40.0, "y": 40.0, "keypointlabels": ["Bus"]},
             "id": "p", "from_name": "click", "to_name": "image", "type": "keypointlabels", "is_positive": True}
    mixed = copy.deepcopy(request)
    mixed["params"]["context"]["result"].append(point)
    answer = client.post("/predict", json=mixed)
    assert answer.status_code == 422 and "send the phrase alone" in answer.get_json()["error"]
    for value in ({"text": "bus"}, {"text": []}, {"text": [3]}, "bus"):
        body = copy.deepcopy(request)
        body["params"]["context"]["result"][0]["value"] = value
        answer = client.post("/predict", json=body)
        assert answer.status_code == 422 and "value.text" in answer.get_json()["error"], value


def test_a_phrase_naming_no_label_without_a_default_is_refused(settings, tiny_segmenter, sam3_engine) -> None:
    client = _client(dataclasses.replace(settings, sam3_text_default_label=""), tiny_segmenter, sam3_engine)
    answer = client.post("/predict", json=_request(_image(8), "red apple"))
    assert answer.status_code == 422
    assert "SAM3_TEXT_DEFAULT_LABEL" in answer.get_json()["error"] and "['Bus', 'Object']" in answer.get_json()["error"]
    wrong = _client(dataclasses.replace(settings, sam3_text_default_label="Car"), tiny_segmenter, sam3_engine)
    answer = wrong.post("/predict", json=_request(_image(8), "red apple"))
    assert answer.status_code == 422 and "SAM3_TEXT_DEFAULT_LABEL='Car' is not a label" in answer.get_json()["error"]


def test_without_sam3_a_phrase_is_refused_with_what_to_set(tmp_path: Path, tiny_segmenter) -> None:
    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache")
    answer = _client(settings, tiny_segmenter).post("/predict", json=_request(_image(9)))
    assert answer.status_code == 422 and "SAM3_MODEL" in answer.get_json()["error"]


def test_check_phrase_and_the_setting() -> None:
    assert check_phrase("  yellow school bus\t") == "yellow school bus"  # surrounding spaces are not the phrase
    assert check_phrase("x" * MAX_PHRASE_CHARS) == "x" * MAX_PHRASE_CHARS
    with pytest.raises(InvalidPromptError):
        check_phrase("x" * (MAX_PHRASE_CHARS + 1))
    assert Settings.from_env({"SAM3_TEXT_DEFAULT_LABEL": " Object "}).sam3_text_default_label == "Object"
    assert Settings().sam3_text_default_label == ""
