"""PREANNOTATE=sam3 through the HTTP app: /predict, /setup, /preannotate, /status and the import webhook."""

from __future__ import annotations

import base64
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.app import create_app
from ml_backend.errors import BackendError
from ml_backend.brush import decode_rle
from ml_backend.runtime import Runtime
from ml_backend.sam import SamEngine
from ml_backend.sam3.engine import ConceptInstance
from ml_backend.settings import Settings

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Cat"/><Label value="Background"/></BrushLabels></View>"""


class PlantedEngine:
    """Stands in for SAM 3: one instance covering the image's left half for the phrase "Cat"."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def segment(self, image, phrases, *, threshold, boxes=None, box_labels=None, slot=None):
        self.calls.append(list(phrases))
        mask = np.zeros(image.shape[:2], bool)
        mask[:, : image.shape[1] // 2] = True
        return [[ConceptInstance(0.9, (0.0, 0.0, image.shape[1] / 2, image.shape[0]), mask)] if p == "Cat" else []
                for p in phrases]


def _data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def app_parts(tmp_path: Path, tiny_segmenter):
    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache",
                                   preannotate="sam3", sam3_model="/models/sam3-tiny")
    sam3 = PlantedEngine()
    runtime = Runtime(settings, engine=SamEngine(tiny_segmenter, source="tiny"), sam3_engine=sam3)
    return create_app(settings, runtime=runtime).test_client(), runtime, sam3


def test_predict_uses_sam3_concepts(app_parts) -> None:
    client, _, sam3 = app_parts
    image = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    answer = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": _data_uri(image)}}],
                                           "label_config": CONFIG, "project": "1.1"})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    [prediction] = answer.get_json()["results"]
    assert prediction["model_version"] == "sam3-sam3-tiny" and sam3.calls == [["Cat"]]
    [region] = prediction["result"]
    assert region["value"]["brushlabels"] == ["Cat"] and region["score"] == pytest.approx(0.9)
    decoded = decode_rle(region["value"]["rle"], 30, 40) > 0
    assert decoded[:, :20].all() and not decoded[:, 20:].any()
    setup = client.post("/setup", json={"project": "1.1", "schema": CONFIG})
    assert setup.get_json()["model_version"] == "sam3-sam3-tiny"


def test_preannotate_route_and_status(app_parts, monkeypatch: pytest.MonkeyPatch) -> None:
    client, runtime, _ = app_parts
    for body in ({}, {"project": "x"}, {"project": True}, {"project": 0}, {"project": 1.5}, {"project": "\u0663"},
                 {"project": 10**30}):
        answer = client.post("/preannotate", json=body)
        assert answer.status_code == 400 and "project" in answer.get_json()["error"]
    started = []
    monkeypatch.setattr(runtime.preannotation_jobs, "start", lambda p: started.append(p) or {"project": p})

    def visible(url: str, token: str, project: int) -> dict:  # Label Studio shows the token projects 3 and 4 only
        if project not in (3, 4):
            raise BackendError(f"Label Studio has no project {project} that the backend's token can see.",
                               status_code=404)
        return {"id": project}

    monkeypatch.setattr("ml_backend.app.visible_project", visible)
    assert client.post("/preannotate", json={"project": 2**62}).status_code == 404  # issue 21 item 6: not queued
    assert client.post("/preannotate", json={"project": 3}).status_code == 202
    assert client.post("/preannotate", json={"project": "03"}).status_code == 202  # one project, one key
    assert client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 4}}).status_code == 200
    assert client.post("/webhook", json={"action": "TASKS_CREATED", "project": "x"}).status_code == 200
    assert client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": "\u0664"}}).status_code == 200
    assert started == [3, 3, 4]
    status = client.get("/status").get_json()
    assert status["preannotate"] == "sam3" and status["sam3"]["state"] == "ready"
    assert "projects" in status["preannotation_jobs"]


@pytest.mark.parametrize("on_connect", [True, False])
def test_a_connected_project_is_preannotated_once_unless_turned_off(tmp_path: Path, tiny_segmenter,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      on_connect: bool) -> None:
    """A project's first /setup queues its SAM 3 job (tasks lacking a prediction of the current version get
    one, as on import); later /setup calls (Label Studio sends many) do not; SAM3_ON_CONNECT=false turns it off."""
    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache",
                                   preannotate="sam3", sam3_model="/models/sam3-tiny", preencode=False,
                                   label_studio_url="http://127.0.0.1:9", label_studio_api_key="a" * 40,
                                   sam3_on_connect=on_connect)
    runtime = Runtime(settings, engine=SamEngine(tiny_segmenter, source="tiny"), sam3_engine=PlantedEngine())
    client = create_app(settings, runtime=runtime).test_client()
    started = []
    monkeypatch.setattr(runtime.preannotation_jobs, "start", lambda p: started.append(p) or {"project": p})
    for project in ("5.1732800000", "5.1732800001", "6", "x"):
        assert client.post("/setup", json={"project": project, "schema": CONFIG}).status_code == 200
    assert started == ([5, 6] if on_connect else [])


def test_setting_sam3_on_connect() -> None:
    assert Settings.from_env({}).sam3_on_connect is True
    assert Settings.from_env({"SAM3_ON_CONNECT": "false"}).sam3_on_connect is False
