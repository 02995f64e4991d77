"""The WSGI app through Flask's test client: routes, errors, auth, the library's faults fixed."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.app import create_app
from ml_backend.brush import decode_rle
from ml_backend.runtime import Runtime
from ml_backend.sam import Prompts, SamEngine
from ml_backend.settings import Settings

CONFIG = """<View><Image name="image" value="$img"/>
<BrushLabels name="mask" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Dog"/><Label value="Background"/></KeyPointLabels>
<RectangleLabels name="rect" toName="image" smart="true"><Label value="Cat"/></RectangleLabels></View>"""


def data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (60, 100, 3), dtype=np.uint8)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache")


@pytest.fixture
def engine(tiny_segmenter) -> SamEngine:
    return SamEngine(tiny_segmenter, source="tiny")


@pytest.fixture
def client(settings: Settings, engine: SamEngine):
    return create_app(settings, runtime=Runtime(settings, engine=engine)).test_client()


def keypoint(x: float, y: float, label: str = "Dog", positive: bool = True, name: str = "kp") -> dict:
    return {"original_width": 100, "original_height": 60, "image_rotation": 0, "from_name": name,
            "to_name": "image", "type": "keypointlabels", "is_positive": positive,
            "value": {"x": x, "y": y, "width": 1, "keypointlabels": [label]}}


def predict(client, tasks: list[dict], context: dict | None = None):
    return client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "1.1",
                                         "params": {"context": context}})


def test_predict_before_setup_works_and_places_the_mask(client, image, engine) -> None:
    response = predict(client, [{"id": 1, "data": {"img": data_uri(image)}}], {"result": [keypoint(30, 40)]})
    assert response.status_code == 200, response.json
    [prediction] = response.json["results"]
    [item] = prediction["result"]
    assert item["value"]["brushlabels"] == ["Dog"] and item["from_name"] == "mask"
    assert prediction["model_version"] == "sam-tiny"
    mask = decode_rle(item["value"]["rle"], 60, 100)
    np.testing.assert_array_equal(mask, engine.segment(image, Prompts.from_lists([(30, 24)])).mask)


def test_batch_predict_gives_one_prediction_per_task_even_when_an_image_fails(client, image) -> None:
    tasks = [{"id": 1, "data": {"img": data_uri(image)}}, {"id": 2, "data": {"img": "data:image/png;base64,AAAA"}},
             {"id": 3, "data": {}}]
    response = predict(client, tasks)
    assert response.status_code == 200
    assert [p["result"] for p in response.json["results"]] == [[], [], []]
    assert response.json["model_version"] == "trimap-none"


@pytest.mark.parametrize("body,status,words", [
    (b"{oops", 400, "JSON"),
    (b"[" * 100000 + b"]" * 100000, 413, "objects and lists"),  # denser than Label Studio's JSON: unparsed
    ((b"[" + b" " * 8) * 100000 + b"]" * 100000, 400, "nests"),
    (b'{"a": ' + b"9" * 5000 + b"}", 400, "JSON"),
    (b"\xff\xfe{}", 400, "JSON"),
    (b"[1, 2]", 400, "object"),
    (b'{"tasks": []}', 400, "tasks"),
    (b'{"tasks": [{"id": 1, "data": {}}], "label_config": "<View/>"}', 422, "Image"),
    (b'{"tasks": [{"id": 1, "data": {}}]}', 422, "labeling config"),
])
def test_malformed_requests_get_4xx_json(client, body: bytes, status: int, words: str) -> None:
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == status
    assert words in response.json["error"] and "Traceback" not in response.get_data(as_text=True)


def test_bad_prompts_get_422_and_the_app_stays_healthy(client, image) -> None:
    task = {"id": 1, "data": {"img": data_uri(image)}}
    for context in ({"result": [keypoint(130, 40)]}, {"result": [keypoint(30, 40, name="unknown")]},
                    {"result": [{**keypoint(30, 40), "value": {"x": "NaN", "y": 3}}]}):
        response = predict(client, [task], context)
        assert response.status_code == 422, response.json
        assert response.json["error"]
    assert client.get("/health").json["status"] == "UP"


def test_an_unexpected_failure_is_a_500_without_traceback(client, image, engine, monkeypatch) -> None:
    monkeypatch.setattr(engine, "decode", lambda *a, **k: 1 / 0)
    response = predict(client, [{"id": 1, "data": {"img": data_uri(image)}}], {"result": [keypoint(30, 40)]})
    assert response.status_code == 500 and "ZeroDivisionError" in response.json["error"]
    assert "Traceback" not in response.get_data(as_text=True)


def test_setup_is_cheap_and_reports_unservable_configs(client) -> None:
    ok = client.post("/setup", json={"project": "1.1", "schema": CONFIG, "hostname": "http://ls:8080",
                                     "access_token": "abc"})
    assert ok.status_code == 200 and ok.json["model_version"] == "trimap-none"
    bad = client.post("/setup", json={"project": "1.1", "schema": "<View><Image name='i' value='$i'/></View>"})
    assert bad.status_code == 422 and "BrushLabels" in bad.json["error"]


def basic(user: bytes, password: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user + b":" + password).decode()}


GOOD = basic(b"u", b"p")


@pytest.fixture
def guarded_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, basic_auth_user="u", basic_auth_pass="p")


def test_setup_takes_host_and_token_only_from_an_authenticated_caller(settings, guarded_settings, engine) -> None:
    body = {"project": "1.1", "schema": CONFIG, "hostname": "http://ls:8080/", "access_token": "abc"}
    open_runtime = Runtime(settings, engine=engine)  # no basic auth: nobody is authenticated
    assert create_app(settings, runtime=open_runtime).test_client().post("/setup", json=body).status_code == 200
    assert (open_runtime.access.url, open_runtime.access.token) == ("", "")

    runtime = Runtime(guarded_settings, engine=engine)
    client = create_app(guarded_settings, runtime=runtime).test_client()
    assert client.post("/setup", json=body).status_code == 401
    assert (runtime.access.url, runtime.access.token) == ("", "")
    assert client.post("/setup", json=body, headers=GOOD).status_code == 200
    assert (runtime.access.url, runtime.access.token) == ("http://ls:8080", "abc")


def test_setup_validates_before_it_applies_anything(guarded_settings, engine) -> None:
    runtime = Runtime(guarded_settings, engine=engine)
    client = create_app(guarded_settings, runtime=runtime).test_client()
    for body in ({"schema": "<View/>", "hostname": "http://evil:1", "access_token": "t"},
                 {"schema": CONFIG, "hostname": "http://127.0.0.1:8999\\@ls:8080", "access_token": "t"},
                 {"schema": CONFIG, "hostname": "http://user:pw@ls:8080", "access_token": "t"},
                 {"schema": CONFIG, "hostname": "file:///etc/passwd", "access_token": "t"},
                 {"schema": CONFIG, "hostname": "http://ls:8080", "access_token": "a\r\nX-Evil: 1"}):
        answer = client.post("/setup", json=body, headers=GOOD)
        assert answer.status_code == 422, (body, answer.json)
        assert (runtime.access.url, runtime.access.token) == ("", ""), body


def test_setup_never_overrides_label_studio_url(guarded_settings, engine) -> None:
    settings = dataclasses.replace(guarded_settings, label_studio_url="http://ls:8080", label_studio_api_key="key")
    runtime = Runtime(settings, engine=engine)
    client = create_app(settings, runtime=runtime).test_client()
    body = {"project": "1.1", "schema": CONFIG, "hostname": "http://evil:9", "access_token": "stolen?"}
    assert client.post("/setup", json=body, headers=GOOD).status_code == 200
    assert (runtime.access.url, runtime.access.token) == ("http://ls:8080", "key")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_only_json_bodies_are_read(client, content_type) -> None:
    body = b'{"project": "1.1", "schema": "x", "hostname": "http://evil"}'
    answer = client.post("/setup", data=body, content_type=content_type)
    assert answer.status_code == 415 and "application/json" in answer.json["error"]


def test_a_body_over_the_limit_gets_413_json(settings, engine) -> None:
    small = dataclasses.replace(settings, max_request_mb=1)
    client = create_app(small, runtime=Runtime(small, engine=engine)).test_client()
    answer = client.post("/predict", data=b'{"tasks": ["' + b"x" * (2 << 20) + b'"]}', content_type="application/json")
    assert answer.status_code == 413 and "MAX_REQUEST_MB" in answer.json["error"]


ROUTES = [("POST", "/predict"), ("POST", "/setup"), ("POST", "/webhook"), ("POST", "/train"), ("POST", "/warmup"),
          ("GET", "/status"), ("GET", "/versions"), ("POST", "/versions"), ("GET", "/is_training"),
          ("GET", "/metrics"), ("GET", "/nowhere")]


def test_every_route_but_health_needs_the_credentials(guarded_settings, engine) -> None:
    client = create_app(guarded_settings, runtime=Runtime(guarded_settings, engine=engine)).test_client()
    assert client.get("/health").status_code == 200
    bad_headers = [{}, basic(b"u", b"wrong"), basic(b"x", b"p"), {"Authorization": "Basic \u00e9\u00e9=="},
                   {"Authorization": "Basic !!!"}, {"Authorization": "Basic " + base64.b64encode(b"no colon").decode()},
                   basic("ü".encode(), "é".encode()), {"Authorization": "Bearer p"}, {"Authorization": "Basic"}]
    for method, path in ROUTES:
        for headers in bad_headers:
            answer = client.open(path, method=method, json={}, headers=headers)
            assert answer.status_code == 401, (method, path, headers, answer.status_code)
            assert "basic-auth" in answer.json["error"]
        assert client.open(path, method=method, json={}, headers=GOOD).status_code != 401


def test_raw_non_ascii_basic_auth_header_is_401_not_500(guarded_settings, engine) -> None:
    from werkzeug.test import EnvironBuilder

    client = create_app(guarded_settings, runtime=Runtime(guarded_settings, engine=engine)).test_client()
    builder = EnvironBuilder(path="/setup", method="POST", json={"schema": CONFIG})
    environ = builder.get_environ()
    environ["HTTP_AUTHORIZATION"] = "Basic \xff\xfe\xc3\xa9:\x00"  # raw latin-1 bytes, as WSGI passes them
    answer = client.open(environ)
    assert answer.status_code == 401 and answer.json["error"]


def test_the_webhook_secret_opens_its_projects_webhook_and_nothing_else(guarded_settings, engine) -> None:
    import hashlib
    import hmac

    from ml_backend.security.auth import SECRET_HEADER
    from ml_backend.security.secrets import WebhookSecrets

    store = WebhookSecrets(guarded_settings.model_dir)
    secret, other = store.current(1), store.current(2)
    assert len(secret) == 64 and secret != other and store.current(1) == secret
    assert (guarded_settings.model_dir / "webhook-secrets.json").stat().st_mode & 0o777 == 0o600
    client = create_app(guarded_settings, runtime=Runtime(guarded_settings, engine=engine)).test_client()
    event = {"action": "PROJECT_UPDATED", "project": {"id": 1}}
    assert client.post("/webhook", json=event).status_code == 401
    wrong = secret[:-1] + ("1" if secret.endswith("0") else "0")  # one hex digit off (the secret may end in 0)
    assert client.post("/webhook", json=event, headers={SECRET_HEADER: wrong}).status_code == 401
    assert client.post("/webhook", json=event, headers={SECRET_HEADER: "é"}).status_code == 401
    derived = hmac.new(f"{guarded_settings.basic_auth_user}:{guarded_settings.basic_auth_pass}".encode(),
                       b"sam-trimap-backend webhook secret v1", hashlib.sha256).hexdigest()
    assert client.post("/webhook", json=event, headers={SECRET_HEADER: derived}).status_code == 401  # the old one
    accepted = client.post("/webhook", json=event, headers={SECRET_HEADER: secret})
    assert accepted.status_code == 200 and accepted.json["status"] == "ignored"
    assert client.post("/webhook", json=event, headers={SECRET_HEADER: other}).status_code == 403  # project 2's
    for path in ("/setup", "/train", "/predict"):
        assert client.post(path, json={"schema": CONFIG}, headers={SECRET_HEADER: secret}).status_code == 401


def test_health_shows_states_but_no_paths(settings, tmp_path, engine) -> None:
    engine.source = str(tmp_path / "secret-dir" / "sam-preset")
    client = create_app(settings, runtime=Runtime(settings, engine=engine)).test_client()
    text = client.get("/health").get_data(as_text=True)
    assert client.get("/health").json["sam"] == {"state": "ready"}
    assert str(tmp_path) not in text and "secret-dir" not in text


def test_project_ids_are_canonical(client) -> None:
    first = client.post("/train", json={"project": 1})
    assert first.status_code == 201 and first.json["project"] == 1
    for same in ("01", "1.1700000000", " 1"):
        assert client.post("/train", json={"project": same}).json["project"] == 1
    for other in ("\u0661", "\u00b9", "1e3", "-1", True, 2**64, "9" * 30):
        answer = client.post("/train", json={"project": other})
        assert answer.json["status"] == "ignored", (other, answer.json)
    assert set(client.get("/is_training").json["projects"]) == {"1"}


def test_too_many_tasks_regions_or_points_are_refused(client, image) -> None:
    task = {"id": 1, "data": {"img": data_uri(image)}}
    answer = predict(client, [task] * 101)
    assert answer.status_code == 413 and "MAX_TASKS_PER_REQUEST" in answer.json["error"]
    rect = {"original_width": 100, "original_height": 60, "from_name": "rect", "to_name": "image",
            "type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["Cat"]}}
    answer = predict(client, [task], {"result": [rect] * 17})
    assert answer.status_code == 422 and "MAX_PROMPT_REGIONS" in answer.json["error"]
    answer = predict(client, [task], {"result": [keypoint(30, 40)] * 65})
    assert answer.status_code == 422 and "MAX_PROMPT_POINTS" in answer.json["error"]
    answer = predict(client, [task], {"result": [{**keypoint(30, 40), "original_width": 10**6,
                                                  "original_height": 10**6}]})
    assert answer.status_code == 422 and "MAX_IMAGE_PIXELS" in answer.json["error"]


@pytest.mark.parametrize("number", ["1" + "0" * 400, "1e400", "-1e400", "Infinity", "NaN", "1e300"])
def test_huge_or_non_finite_coordinates_get_422(client, image, number) -> None:
    body = json.dumps({"tasks": [{"id": 1, "data": {"img": data_uri(image)}}], "label_config": CONFIG,
                       "params": {"context": {"result": [keypoint(12345, 40)]}}}).replace("12345", number)
    answer = client.post("/predict", data=body, content_type="application/json")
    assert answer.status_code == 422 and "finite" in answer.json["error"], answer.json


def test_training_routes_answer_instead_of_500(client) -> None:
    assert client.get("/is_training?project=1.1").status_code == 200
    assert "is_training" in client.get("/is_training?project=1.1").json
    for method in (client.post, client.get):  # Label Studio 1.23 asks with GET, the library routed POST only
        response = method("/versions", json={"project": "1.1"})
        assert response.status_code == 200 and response.json["versions"] == []


def test_status_route_reports_sam_trimap_and_training(client) -> None:
    status = client.get("/status?project=3").json
    assert status["sam"]["state"] == "ready" and status["trimap_model_version"] is None
    assert "is_training" in status["training"]


def test_health_reports_sam_and_trimap_model(client) -> None:
    health = client.get("/health").json
    assert health["sam"] == {"state": "ready"}
    assert client.get("/status").json["sam"]["source"] == "tiny"  # the details are for authenticated callers
    assert health["trimap_model_version"] is None


def test_basic_auth_guards_everything_but_health(settings, engine, image) -> None:
    guarded = dataclasses.replace(settings, basic_auth_user="u", basic_auth_pass="p")
    client = create_app(guarded, runtime=Runtime(guarded, engine=engine)).test_client()
    assert client.get("/health").status_code == 200
    assert client.post("/setup", json={"schema": CONFIG}).status_code == 401
    bad = {"Authorization": "Basic " + base64.b64encode(b"u:wrong").decode()}
    assert client.post("/setup", json={"schema": CONFIG}, headers=bad).status_code == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
    assert client.post("/setup", json={"schema": CONFIG}, headers=good).status_code == 200


def test_clicks_on_the_same_region_refine_with_the_previous_logits(client, image, engine) -> None:
    task = {"id": 1, "data": {"img": data_uri(image)}}
    first = [keypoint(30, 40)]
    predict(client, [task], {"result": first})
    response = predict(client, [task], {"result": first + [keypoint(60, 20, positive=False)]})
    mask = decode_rle(response.json["results"][0]["result"][0]["value"]["rle"], 60, 100)
    previous = engine.segment(image, Prompts.from_lists([(30, 24)]))
    expected = engine.segment(image, Prompts.from_lists([(30, 24), (60, 12)], [1, 0],
                                                        mask_logits=previous.low_res_logits))
    np.testing.assert_array_equal(mask, expected.mask)


def test_warmup_embeds_a_projects_images_in_the_background(settings, engine) -> None:
    from fake_label_studio import TOKEN, fake_label_studio

    from ml_backend.images import decode_image
    from ml_backend.sam.engine import image_key

    with fake_label_studio(n_tasks=5) as ls:
        settings = dataclasses.replace(settings, label_studio_url=ls.url, label_studio_api_key=TOKEN)
        client = create_app(settings, runtime=Runtime(settings, engine=engine)).test_client()
        answer = client.post("/warmup", json={"project": 1, "limit": 3})
        assert answer.status_code == 202 and answer.json == {"queued": 3}
        wanted = [image_key(decode_image(ls.images[t["data"]["image"]], max_pixels=10**6)) for t in ls.tasks]
        deadline = time.monotonic() + 60
        while len(engine.cache) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [key in engine.cache for key in wanted] == [True, True, True, False, False]


@pytest.mark.parametrize("body,words", [
    ({"project": "one"}, "project id"),
    ({"project": "\u0661"}, "project id"),
    ({"project": 1, "limit": 0}, "limit"),
    ({"project": 1, "limit": 10**9}, "MAX_WARMUP_TASKS"),
    ({"project": 1, "limit": True}, "limit"),
    ({"tasks": [{}] * 1001, "label_config": CONFIG}, "MAX_WARMUP_TASKS"),
    ({}, "tasks"),
    ({"tasks": [], "label_config": "<View/>"}, "Image"),
])
def test_warmup_refuses_bad_requests(client, body, words) -> None:
    response = client.post("/warmup", json=body)
    assert response.status_code in (400, 422) and words in response.json["error"]


def test_warmup_without_label_studio_access_says_what_to_set(client) -> None:
    response = client.post("/warmup", json={"project": 1})
    assert response.status_code == 502 and "LABEL_STUDIO_URL" in response.json["error"]


def test_a_click_while_sam_is_still_loading_gets_503(settings, image, monkeypatch) -> None:
    import threading

    from ml_backend import runtime as runtime_module

    release = threading.Event()
    monkeypatch.setattr(runtime_module, "SAM_WAIT_S", 0.2)
    monkeypatch.setattr("ml_backend.sam.loading.load_engine", lambda settings: release.wait(30))
    runtime = Runtime(settings)
    client = create_app(settings, runtime=runtime).test_client()
    try:
        assert client.get("/health").json["sam"]["state"] == "loading"
        response = predict(client, [{"id": 1, "data": {"img": data_uri(image)}}], {"result": [keypoint(30, 40)]})
        assert response.status_code == 503 and "still loading" in response.json["error"]
    finally:
        release.set()


def test_further_clicks_on_an_image_skip_download_and_decoding(settings, engine, image, monkeypatch) -> None:
    runtime = Runtime(settings, engine=engine)
    client = create_app(settings, runtime=runtime).test_client()
    loads = []
    real_load = runtime.images.load
    monkeypatch.setattr(runtime.images, "load", lambda url, **kw: loads.append(url) or real_load(url, **kw))
    task = {"id": 1, "data": {"img": data_uri(image)}}
    first = predict(client, [task], {"result": [keypoint(30, 40)]})
    second = predict(client, [task], {"result": [keypoint(70, 20)]})
    assert first.status_code == second.status_code == 200 and len(loads) == 1
    mask = decode_rle(second.json["results"][0]["result"][0]["value"]["rle"], 60, 100)
    np.testing.assert_array_equal(mask, engine.segment(image, Prompts.from_lists([(70, 12)])).mask)

    engine.cache.clear()  # an evicted embedding is rebuilt from the image
    assert predict(client, [task], {"result": [keypoint(70, 20)]}).status_code == 200 and len(loads) == 2


def test_a_warmed_image_is_clicked_without_loading_it_again(settings, engine, image, monkeypatch) -> None:
    runtime = Runtime(settings, engine=engine)
    client = create_app(settings, runtime=runtime).test_client()
    task = {"id": 1, "data": {"img": data_uri(image)}}
    assert client.post("/warmup", json={"tasks": [task], "label_config": CONFIG}).status_code == 202
    deadline = time.monotonic() + 60
    while len(engine.cache) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    monkeypatch.setattr(runtime.images, "load", lambda *a, **k: pytest.fail("image loaded again"))
    assert predict(client, [task], {"result": [keypoint(30, 40)]}).status_code == 200


def test_click_bench_runs_through_the_app(capsys) -> None:
    import json

    from benchmarks.click import main

    assert main(["--quick", "--clicks", "2", "--json", "--shared-prompt-state"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["first_click_s"] > 0 and report["further_click_median_s"] > 0 and report["image"] == "640x480"
    assert report["further_click_shared_state_median_s"] > 0
