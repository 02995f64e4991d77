"""A backend URL per project (``/projects/<id>/``): the project comes from the path, a body naming another
project is refused, and authentication treats the prefixed routes like the plain ones."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import pytest

from ml_backend.app import create_app
from ml_backend.runtime import Runtime
from ml_backend.sam import SamEngine
from ml_backend.security.auth import SECRET_HEADER, Authenticator, route_path
from ml_backend.security.secrets import WebhookSecrets
from ml_backend.settings import Settings
from test_preannotation import store_random_model

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels></View>"""


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache",
                               preencode=False)


def client_for(settings: Settings, tiny_segmenter):
    return create_app(settings, runtime=Runtime(settings, engine=SamEngine(tiny_segmenter, source="tiny"))).test_client()


def test_versions_and_setup_take_the_project_from_the_path(settings: Settings, tiny_segmenter) -> None:
    version = store_random_model(settings.model_dir, seed=3, project=7)
    client = client_for(settings, tiny_segmenter)
    assert client.get("/versions").json["versions"] == []  # Label Studio's GET: no project
    listed = client.get("/projects/7/versions").json
    assert listed["project"] == 7 and listed["serving"] == version and [v["id"] for v in listed["versions"]] == [version]
    assert client.post("/projects/7/versions").json["project"] == 7
    assert client.get("/projects/8/versions").json["versions"] == []
    setup = client.post("/projects/7/setup", json={"project": "7.1700000000", "schema": CONFIG})
    assert setup.status_code == 200 and setup.json["model_version"] == f"trimap-{version}"
    assert client.post("/projects/7/setup", json={"schema": CONFIG}).json["model_version"] == f"trimap-{version}"


@pytest.mark.parametrize("path, body", [
    ("/projects/7/setup", {"project": "8.1700000000", "schema": CONFIG}),
    ("/projects/7/predict", {"project": "8.1700000000", "label_config": CONFIG,
                             "tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}]}),
    ("/projects/7/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 8}}),
])
def test_a_body_for_another_project_is_refused(settings: Settings, tiny_segmenter, path: str, body: dict) -> None:
    answer = client_for(settings, tiny_segmenter).post(path, json=body)
    assert answer.status_code == 400 and "serves project 7" in answer.json["error"], answer.json


def test_prefixed_routes_follow_the_same_authentication(settings: Settings) -> None:
    settings = dataclasses.replace(settings, basic_auth_user="ls", basic_auth_pass="pw")
    auth = Authenticator(settings, WebhookSecrets(settings.model_dir))
    secret = {SECRET_HEADER: auth.secrets.current(12)}
    assert route_path("/projects/12/webhook") == "/webhook" and route_path("/projects/x/webhook") == "/projects/x/webhook"
    assert auth.may_pass("/projects/12/health", False) and auth.may_pass("/projects/12/ready", False)
    for path in ("/projects/12/predict", "/projects/12/versions", "/projects/12/", "/projects/12/metrics",
                 "/projects/12/projects/3/health", "/projects/x/health", "/dashboard"):
        assert not auth.may_pass(path, auth.basic({}) or auth.secret_project(path, {}) is not None), path
    assert auth.secret_project("/projects/12/webhook", secret) == "12"  # Label Studio's webhook deliveries
    assert auth.secret_project("/projects/12/predict", secret) is None  # the secret opens the webhook only
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    assert auth.basic(good) and not auth.basic(secret)
