"""docker/compose.cpu.yml built, started and driven end to end, as a team would run it on a CPU machine.

A private dockerd (own socket; image layers kept in a persistent data root) builds every image here,
since no image registry is reachable: a Debian-bootstrapped stand-in for the Python base image, Label
Studio 1.23.2 from PyPI and Debian's Redis (scripts/docker_images.sh standins), the backend from
docker/Dockerfile as it is, with a CPU torch (scripts/docker_images.sh backend), and the HAProxy balancer
from docker/balancer/Dockerfile on the stand-in Debian base. The compose stack then runs exactly as
configured (SSRF protection on, Basic Auth, Redis with a password on its own network), with two backend
replicas behind the balancer (``--scale backend=2``) and a tiny random SAM in the models volume, and is
driven through Label Studio's API: a click, round robin over the replicas, training on the worker
container, pre-encoding on the worker and restarted replicas, the healthchecks, and the SSRF list.
Containers, networks and volumes go afterwards, also after a failure; image layers stay.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import socket
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from compose_stack import REPO, Engine, Stack, missing_engine, private_engine
from fake_label_studio import brush_result, pet_image
from processes import free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

BACKEND_TAG = "sam-trimap-backend:compose-test"
BALANCER_TAG = "sam-trimap-balancer:compose-test"
REPLICAS = 2  # backend containers behind the balancer
CPU_TORCH = "torch==2.13.0+cpu"  # the wheel in this host's pip find-links folder (no CUDA download)
USER, PASSWORD = "label-studio", "backend-" + secrets.token_hex(8)
SIZE = 48
ACCEPTED = 8  # accepted annotations before Start Training
HELD_OUT = 2
LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Background"/><Label value="Pet"/></BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Pet" smart="true"/></KeyPointLabels>
</View>
"""
BACKEND_URL = "http://backend.internal:9090"  # its compose address, as a user types it in Label Studio


def png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pet_image(index, SIZE)[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def click(x_percent: float = 50, y_percent: float = 50) -> dict:
    return {"original_width": SIZE, "original_height": SIZE, "image_rotation": 0, "from_name": "click",
            "to_name": "image", "type": "keypointlabels", "is_positive": True,
            "value": {"x": x_percent, "y": y_percent, "width": 1, "keypointlabels": ["Pet"]}}


class LabelStudioApi:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Token {self.token}"}
        return requests.request(method, self.url + path, headers=headers, timeout=120, **kwargs)

    def ok(self, method: str, path: str, **kwargs):
        response = self.api(method, path, **kwargs)
        assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text[:800]}"
        return response.json() if response.content else None

    def connect(self, project: int, url: str = BACKEND_URL) -> requests.Response:
        return self.api("POST", "/api/ml", json={
            "url": url, "project": project, "is_interactive": True, "title": "sam",
            "auth_method": "BASIC_AUTH", "basic_auth_user": USER, "basic_auth_pass": PASSWORD})

    def project_with_images(self, title: str, indices: range) -> tuple[int, list[int]]:
        project = self.ok("POST", "/api/projects", json={"title": title, "label_config": LABEL_CONFIG})["id"]
        imported = self.ok("POST", f"/api/projects/{project}/import?return_task_ids=true",
                           files=[(f"file{i}", (f"pet-{i}.png", png(i))) for i in indices])
        return project, sorted(imported["task_ids"])


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    reason = missing_engine()
    if reason:
        pytest.skip(reason)  # a failure under CI=true (tests/ci_policy.py)
    with private_engine() as started:
        yield started


@pytest.fixture(scope="module")
def images(engine: Engine) -> dict[str, str]:
    """The stand-in images and the backend image; prints how long each took and the backend's size."""
    began = time.monotonic()
    built = engine.run("bash", "scripts/docker_images.sh", "standins", timeout=3000).stdout
    names = dict(line.split("=", 1) for line in built.split() if "=" in line)
    standins_s = time.monotonic() - began
    began = time.monotonic()
    engine.run("bash", "scripts/docker_images.sh", "backend", BACKEND_TAG, "-q",
               f"--build-arg=BASE_IMAGE={names['BASE_IMAGE']}", f"--build-arg=TORCH_SPEC={CPU_TORCH}", timeout=3000)
    backend_s = time.monotonic() - began
    began = time.monotonic()
    engine.run("bash", "scripts/docker_images.sh", "balancer", BALANCER_TAG, "-q",
               f"--build-arg=DEBIAN_IMAGE={names['BASE_IMAGE']}", timeout=1200)
    balancer_s = time.monotonic() - began
    size = engine.inspect(BACKEND_TAG)["Size"]
    print(f"\n[compose] stand-in images {standins_s:.0f} s, backend image {backend_s:.0f} s, "
          f"balancer image {balancer_s:.0f} s, backend image size {size / 1e9:.2f} GB ({size / 2**20:.0f} MiB), "
          f"balancer image size {engine.inspect(BALANCER_TAG)['Size'] / 2**20:.0f} MiB")
    return {**names, "BACKEND_IMAGE": BACKEND_TAG, "BALANCER_IMAGE": BALANCER_TAG}


@pytest.fixture(scope="module")
def stack(engine: Engine, images: dict[str, str], tiny_sam_preset: Path, request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    workdir = tmp_path_factory.mktemp("compose")
    ls_port, backend_port = free_port(), free_port()
    token = secrets.token_hex(20)
    settings = {
        **images,
        "LABEL_STUDIO_API_KEY": token, "LABEL_STUDIO_PASSWORD": secrets.token_hex(8),
        "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD, "REDIS_PASSWORD": secrets.token_hex(16),
        "LABEL_STUDIO_PORT": f"127.0.0.1:{ls_port}", "BACKEND_PORT": str(backend_port),
        "SAM_MODEL": "/models/tiny-sam", "SAM_DEVICE": "cpu", "THREADS": "4",
        "BACKEND_HEALTH_INTERVAL": "2s", "BACKEND_HEALTH_START_PERIOD": "30s",
        # Training only on Start Training; small and quick, with the recipe tests/e2e/test_retraining_e2e.py
        # shows learns the discs.
        "RETRAIN_MIN_ANNOTATIONS": "1000", "RETRAIN_MIN_INTERVAL_MIN": "0", "RETRAIN_IMAGE_SIZE": "64",
        "RETRAIN_EPOCHS": "25", "RETRAIN_BATCH_SIZE": "2", "BOUNDARY_WIDTH": "1",
    }
    env_file = workdir / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    compose = Stack(engine, f"samtest{secrets.token_hex(3)}", env_file, ("compose.cpu.yml",),
                    scale={"backend": REPLICAS})
    failed_before = request.session.testsfailed
    try:
        compose.up("--no-start", "--no-build")  # containers and volumes, nothing running yet
        # The tiny SAM into the models volume, owned by the backend's user as the volume's other files.
        engine.docker("cp", str(tiny_sam_preset), f"{compose.containers('backend')[0]}:/models/tiny-sam")
        compose.up("-d", "--no-build")
        api = LabelStudioApi(f"http://127.0.0.1:{ls_port}", token)
        wait_for(lambda: _answers(api), 600, "Label Studio in its container", interval_s=2)
        compose.wait_health("backend", "healthy", 300)
        wait_until_balanced(f"http://127.0.0.1:{backend_port}")
        yield {"compose": compose, "api": api, "backend": f"http://127.0.0.1:{backend_port}", "workdir": workdir,
               "settings": settings}
    except BaseException:
        print_logs(compose)
        raise
    else:
        if request.session.testsfailed > failed_before:
            print_logs(compose)
    finally:
        compose.down()


def print_logs(compose: Stack) -> None:
    for service in ("backend", "balancer", "worker", "label-studio", "redis"):
        print(f"--- {service} ---\n{compose.logs(service, 150)}")


def _answers(api: LabelStudioApi) -> bool:
    try:
        return api.api("GET", "/api/projects").status_code == 200
    except requests.RequestException:
        return False


def backend_get(stack: dict, path: str) -> dict:
    """Through the balancer (any replica): for what the replicas share (Redis, the volumes)."""
    answer = requests.get(stack["backend"] + path, auth=(USER, PASSWORD), timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def replica_status(compose: Stack) -> dict[str, dict]:
    """Each replica's own /status (what a process holds: its SAM, its pre-encoding), asked in its container."""
    answers = {}
    for container in compose.containers("backend"):
        status, body = compose.get(container, "/status")
        assert status == 200, body
        answers[container] = json.loads(body)
    return answers


def clicks_served(compose: Stack) -> dict[str, float]:
    """Each replica's count of interactive /predict requests answered (its Prometheus counter)."""
    counts = {}
    for container in compose.containers("backend"):
        status, body = compose.get(container, "/metrics")
        assert status == 200, body
        counts[container] = sum(float(m.group(1)) for m in re.finditer(
            r'^ml_backend_requests_total\{[^}]*kind="(?:first|further)_click"[^}]*\} (\S+)$', body, re.M))
    return counts


def wait_until_balanced(balancer: str) -> None:
    """Until the balancer's health checks have found a ready replica (it answers 503 itself before)."""
    wait_for(lambda: requests.get(balancer + "/ready", timeout=10).status_code == 200, 120,
             "a ready replica behind the balancer", interval_s=1)


def test_backend_image_runs_as_non_root_and_holds_no_test_tools_or_build_settings(engine: Engine, images) -> None:
    config = engine.inspect(BACKEND_TAG)["Config"]
    assert config["User"] not in ("", "root", "0"), config["User"]
    probe = engine.docker("run", "--rm", "--network", "none", BACKEND_TAG, "python", "-c",
                          "import importlib.util, os, pwd; "
                          "print(pwd.getpwuid(os.getuid()).pw_name, os.getuid()); "
                          "print([m for m in ('pytest', 'hypothesis', 'selenium', 'label_studio', 'segment_anything') "
                          "if importlib.util.find_spec(m)]); "
                          "print([p for p in ('/app/.venv-ls', '/app/tests', '/tmp/pip', '/app/docker') "
                          "if os.path.exists(p)]); import torch; print(torch.__version__)").stdout.splitlines()
    assert probe[0] == "app 1000", probe
    assert probe[1] == "[]", f"test tools in the image: {probe[1]}"
    assert probe[2] == "[]", f"in the image: {probe[2]}"
    assert probe[3].endswith("+cpu"), f"a CPU build was asked for: torch {probe[3]}"
    # The build stage's pip settings (CA bundle, wheel folder, index URLs) stay out of the final image.
    history = engine.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", BACKEND_TAG).stdout
    everything = history + str(config)
    for leak in ("/tmp/pip", "PIP_CERT", "PIP_FIND_LINKS", "PIP_INDEX_URL", "ca.pem", "/opt/"):
        assert leak not in everything, f"{leak} in the final image's history or config"


def test_label_studio_reaches_the_backend_and_no_other_private_address(stack: dict) -> None:
    compose: Stack = stack["compose"]
    api: LabelStudioApi = stack["api"]
    project, _ = api.project_with_images("ssrf", range(1))
    addresses = {
        **{f"backend replica {i}": f"http://{compose.address('backend', 'ml', container)}:9090"
           for i, container in enumerate(compose.containers("backend"))},
        "redis (queue network)": f"http://{compose.address('redis', 'queue')}:6379",
        "worker": f"http://{compose.address('worker', 'ml')}:9090",
        "label studio itself": "http://172.30.99.2:8080",
        "the network's gateway (the host)": "http://172.30.99.1:8080",
        "the balancer's neighbour": "http://172.30.99.11:9090",
        "loopback": "http://127.0.0.1:8080",
        "metadata service": "http://169.254.169.254/latest",
    }
    for what, url in addresses.items():
        refused = api.connect(project, url)
        assert refused.status_code == 403, (what, refused.status_code, refused.text)
        assert "reserved network address" in refused.text, (what, refused.text)
    # Redis is not even visible from Label Studio's container: neither its name nor its address.
    unknown = api.connect(project, "http://redis:6379")
    assert unknown.status_code >= 400 and "resolve" in unknown.text, unknown.text
    probe = compose.engine.docker(
        "exec", compose.container("label-studio"), "python3", "-c",
        "import socket, sys; s = socket.socket(); s.settimeout(3)\n"
        f"try: s.connect(('{compose.address('redis', 'queue')}', 6379)); print('connected')\n"
        "except OSError as e: print('unreachable', e)").stdout
    assert probe.startswith("unreachable"), probe
    # Redis itself wants its password (the worker and backend have it in REDIS_URL).
    noauth = compose.engine.docker("exec", "-e", "REDISCLI_AUTH=", compose.container("redis"), "redis-cli", "ping")
    assert "NOAUTH" in noauth.stdout + noauth.stderr, noauth
    # The one private address Label Studio may call: the balancer's, by its name backend.internal.
    assert compose.address("balancer", "ml") == "172.30.99.10"
    connected = api.connect(project)
    assert connected.status_code == 201, connected.text


@pytest.fixture(scope="module")
def interactive(stack: dict) -> dict:
    """A project connected to the backend by its compose address; the worker pre-encodes its images."""
    api: LabelStudioApi = stack["api"]
    project, tasks = api.project_with_images("interactive", range(3))
    connected = api.connect(project)
    assert connected.status_code == 201, connected.text
    wait_for(lambda: any(s["preencode"]["projects"].get(str(project), {}).get("done") == 3
                         for s in replica_status(stack["compose"]).values()),
             300, "three images pre-encoded by the worker")
    return {"project": project, "tasks": tasks, "ml": connected.json()["id"]}


def test_a_click_through_label_studio_equals_the_engines_mask(stack: dict, interactive: dict,
                                                               tiny_sam_preset: Path) -> None:
    from ml_backend.brush import decode_rle
    from ml_backend.images import decode_image
    from ml_backend.sam import Prompts, SamEngine, load_segmenter

    answer = stack["api"].ok("POST", f"/api/ml/{interactive['ml']}/interactive-annotating",
                             json={"task": interactive["tasks"][0], "context": {"result": [click(40, 60)]}})
    assert "errors" not in answer, answer
    [item] = answer["data"]["result"]
    mask = decode_rle(item["value"]["rle"], SIZE, SIZE)
    engine = SamEngine(load_segmenter(str(tiny_sam_preset), converted_root=stack["workdir"] / "converted"))
    expected = engine.segment(decode_image(png(0), max_pixels=10**6), Prompts.from_lists([(SIZE * 0.4, SIZE * 0.6)]))
    assert expected.mask.any() and not expected.mask.all()
    np.testing.assert_array_equal(mask, expected.mask)


def test_the_balancer_spreads_clicks_over_the_replicas_and_bounds_bodies(stack: dict, interactive: dict) -> None:
    compose: Stack = stack["compose"]
    before = clicks_served(compose)
    assert len(before) == REPLICAS
    masks = []
    for _ in range(2 * REPLICAS):
        answer = stack["api"].ok("POST", f"/api/ml/{interactive['ml']}/interactive-annotating",
                                 json={"task": interactive["tasks"][1], "context": {"result": [click(45, 55)]}})
        assert "errors" not in answer, answer
        masks.append(answer["data"]["result"][0]["value"]["rle"])
    after = clicks_served(compose)
    served = {container: after[container] - before[container] for container in before}
    assert all(count >= 1 for count in served.values()), f"clicks per replica: {served}"
    assert sum(served.values()) >= 2 * REPLICAS, served
    assert all(mask == masks[0] for mask in masks), "replicas answered one click differently"
    # A body beyond MAX_REQUEST_MB is refused by the balancer itself, before it is sent on.
    host, port = stack["backend"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: backend.internal\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % ((32 << 20) + 1))
        refusal = connection.recv(4096).decode()
    assert refusal.startswith("HTTP/1.1 413") and "the load balancer refuses" in refusal, refusal


def test_the_worker_pre_encodes_into_the_shared_store_and_a_restarted_backend_serves_from_it(
        stack: dict, interactive: dict) -> None:
    compose: Stack = stack["compose"]
    for status in replica_status(compose).values():
        assert status["preencode"]["executor"] == "rq"
        assert status["sam"]["images_encoded"] == 0, "the backend only decodes: the worker encodes"
    assert compose.logs("worker", 400).count(": encoded (") >= 3
    stored = compose.engine.docker("exec", compose.container("worker"), "sh", "-c",
                                   "find /cache/embeddings -type f | wc -l").stdout
    assert int(stored) >= 3, stored

    compose.compose("restart", "--timeout", "10", "backend")
    compose.wait_health("backend", "healthy", 300)
    wait_until_balanced(stack["backend"])
    for task in interactive["tasks"] * REPLICAS:  # round robin: each replica gets clicks
        answer = stack["api"].ok("POST", f"/api/ml/{interactive['ml']}/interactive-annotating",
                                 json={"task": task, "context": {"result": [click()]}})
        assert "errors" not in answer and answer["data"]["result"][0]["value"]["rle"], answer
    for status in replica_status(compose).values():
        assert status["sam"]["images_encoded"] == 0, "a restarted replica encoded an image"


def test_start_training_runs_on_the_worker_and_the_backend_serves_the_promoted_version(stack: dict) -> None:
    from ml_backend.brush import decode_rle
    from ml_backend.images import decode_image
    from ml_backend.preannotation import TrimapPredictor
    from ml_backend.settings import Settings

    compose: Stack = stack["compose"]
    api: LabelStudioApi = stack["api"]
    project, tasks = api.project_with_images("training", range(ACCEPTED + HELD_OUT))
    connected = api.connect(project)
    assert connected.status_code == 201, connected.text
    ml = connected.json()["id"]
    # Label Studio sends no credentials on its webhook deliveries: the backend adds its secret header to the
    # webhook first (tests/e2e/test_auth_e2e.py), and only then are annotation webhooks accepted.
    wait_for(lambda: any(hook["url"] == BACKEND_URL + "/webhook" and hook["headers"]
                         for hook in api.ok("GET", f"/api/webhooks/?project={project}")),
             120, "the backend's secret header on its webhook", interval_s=1)
    for i, task in enumerate(tasks[:ACCEPTED]):
        api.ok("POST", f"/api/tasks/{task}/annotations",
               json={"result": [{**brush_result(pet_image(i, SIZE)[1]), "from_name": "mask"}], "lead_time": 1.0})
    wait_for(lambda: backend_get(stack, f"/is_training?project={project}")["accepted_changes"] == ACCEPTED, 60,
             "the annotation webhooks counted")
    api.ok("POST", f"/api/ml/{ml}/train", json={})
    state = wait_for(lambda: (s := backend_get(stack, f"/is_training?project={project}"))["last"]
                     and not s["is_training"] and s, 1500, "the training job")
    last = state["last"]
    assert last["status"] == "succeeded" and last["reason"] == "START_TRAINING", last
    assert last["export"]["written"] == ACCEPTED and last["promoted"], last
    worker_log = compose.logs("worker", 2000)
    assert "sam-trimap-training" in worker_log and last["version"] in worker_log, worker_log[-3000:]
    assert backend_get(stack, f"/versions?project={project}")["serving"] == last["version"]

    # The models volume as the worker left it, read here: what the backend must serve, computed in-process.
    models = stack["workdir"] / "models"
    shutil.rmtree(models, ignore_errors=True)
    compose.engine.docker("cp", f"{compose.container('worker')}:/models", str(models))
    predictor = TrimapPredictor(models, min_area=Settings().min_mask_area)
    api.ok("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
           json={"selectedItems": {"all": False, "included": tasks[ACCEPTED:]}})
    for index, task in zip(range(ACCEPTED, ACCEPTED + HELD_OUT), tasks[ACCEPTED:], strict=True):
        [prediction] = api.ok("GET", f"/api/predictions?task={task}")
        assert prediction["model_version"] == f"trimap-{last['version']}", prediction
        predicted = predictor.predict_mask(decode_image(png(index), max_pixels=10**6),
                                           include_boundary=True, project=project)
        assert predicted.version == last["version"]
        expected = predicted.mask
        [region] = prediction["result"]
        assert region["value"]["brushlabels"] == ["Pet"]
        np.testing.assert_array_equal(decode_rle(region["value"]["rle"], SIZE, SIZE), expected)
        truth = pet_image(index, SIZE)[1]
        assert (expected & truth).sum() / (expected | truth).sum() > truth.mean(), "learned nothing"


def test_a_backend_whose_sam_failed_is_unhealthy(stack: dict) -> None:
    compose: Stack = stack["compose"]
    compose.wait_health("backend", "healthy", 60)
    env_file: Path = compose.env_file
    env_file.write_text(env_file.read_text().replace("SAM_MODEL=/models/tiny-sam", "SAM_MODEL=/models/no-such-sam"))
    compose.up("-d", "--no-build", "--no-deps", "backend")  # the replicas recreated with the broken setting
    compose.wait_health("backend", "unhealthy", 300)
    for container in compose.containers("backend"):
        status, body = compose.get(container, "/ready")
        assert status == 503 and json.loads(body)["sam"] == "failed", body
    # The balancer's own health checks took every replica out: it answers 503 itself, sending nothing on.
    wait_for(lambda: "No server is available" in requests.get(stack["backend"] + "/ready", timeout=10).text, 60,
             "the balancer to take the failed replicas out")
    assert requests.get(stack["backend"] + "/ready", timeout=10).status_code == 503


def test_compose_files_stay_valid_for_cpu_and_gpu(stack: dict) -> None:
    for files in (("compose.cpu.yml",), ("docker-compose.yml",)):
        checked = Stack(stack["compose"].engine, "configcheck", stack["compose"].env_file, files)
        assert checked.compose("config", "-q").returncode == 0

