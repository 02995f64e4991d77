"""Serving faults with real processes: the backend under gunicorn as the README starts it
(``python -m ml_backend serve``), SIGKILLed during a click, must come back by itself (worker)
or on restart (master), answer the next click, and leave nothing stuck. Also: readiness tells
the truth (``/ready`` and the Docker healthcheck commands), while ``/health`` stays 200.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image
from processes import PngServer, free_port, start_gunicorn_backend, wait_for

from ml_backend.app import create_app
from ml_backend.brush import decode_rle
from ml_backend.settings import Settings

REPO = Path(__file__).resolve().parents[1]
IMAGE_PATH = "/data/upload/1/photo.png"
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
<KeyPointLabels name="click" toName="image" smart="true"><Label value="Object"/></KeyPointLabels></View>"""
WIDTH, HEIGHT = 160, 120


class SlowLabelStudio:
    """Serves one PNG at ``IMAGE_PATH``, holding each request while ``hold`` is set, so a click is
    known to be in flight when the test kills the backend."""

    def __init__(self) -> None:
        buffer = io.BytesIO()
        rng = np.random.default_rng(3)
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(buffer, format="PNG")
        self.png = buffer.getvalue()
        self.hold = threading.Event()
        self.requested = threading.Event()
        self.released = threading.Event()
        self.server = PngServer(self._pick)
        self.url = self.server.url

    def _pick(self, path: str) -> bytes | None:
        self.requested.set()
        if self.hold.is_set():
            self.released.wait(60)
        return self.png if path.split("?")[0] == IMAGE_PATH else None

    def close(self) -> None:
        self.released.set()
        self.server.close()


@pytest.fixture
def label_studio() -> Iterator[SlowLabelStudio]:
    server = SlowLabelStudio()
    yield server
    server.close()


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []


class Backends:
    """Starts ``python -m ml_backend serve`` in its own process group; kills every group it started at the end."""

    def __init__(self, tmp_path: Path, tiny_sam_preset: Path, label_studio: SlowLabelStudio) -> None:
        self.tmp_path = tmp_path
        self.groups: list[int] = []
        self.env = {
            **os.environ, "PYTHONPATH": str(REPO), "HOST": "127.0.0.1", "THREADS": "4", "LOG_LEVEL": "INFO",
            "SAM_MODEL": str(tiny_sam_preset), "MODEL_DIR": str(tmp_path / "models"),
            "IMAGE_CACHE_DIR": str(tmp_path / "image-cache"), "LABEL_STUDIO_URL": label_studio.url,
            "EMBEDDING_STORE_DIR": str(tmp_path / "embeddings"),  # not the user's: a known image would skip the click
            "LABEL_STUDIO_API_KEY": "0123456789abcdef0123456789abcdef01234567", "DOWNLOAD_TIMEOUT_S": "60",
        }

    def start(self, port: int | None = None, **env: str) -> Server:
        port = port or free_port()
        log = self.tmp_path / f"backend-{port}-{len(self.groups)}.log"
        process, url = start_gunicorn_backend({**self.env, **env}, log, port=port, new_session=True)
        self.groups.append(process.pid)
        return Server(url, process, log)

    def close(self) -> None:
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def backends(tmp_path: Path, tiny_sam_preset: Path, label_studio: SlowLabelStudio) -> Iterator[Backends]:
    started = Backends(tmp_path, tiny_sam_preset, label_studio)
    yield started
    started.close()


def get(server: Server, path: str) -> requests.Response | None:
    try:
        return requests.get(server.url + path, timeout=5)
    except requests.RequestException:
        return None


def wait_ready(server: Server, timeout_s: float = 400) -> None:  # a loaded 2-core machine is slow
    def ready() -> bool:
        if server.process.poll() is not None:
            raise AssertionError(f"backend exited with {server.process.returncode}:\n"
                                 f"{server.log.read_text(errors='replace')[-4000:]}")
        answer = get(server, "/ready")
        return answer is not None and answer.status_code == 200

    wait_for(ready, timeout_s, "backend /ready", server.log)


def click(server: Server, timeout_s: float = 60) -> requests.Response:
    point = {"original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0, "from_name": "click",
             "to_name": "image", "type": "keypointlabels", "is_positive": True,
             "value": {"x": 40, "y": 50, "width": 1, "keypointlabels": ["Object"]}}
    body = {"tasks": [{"id": 1, "data": {"image": IMAGE_PATH}}], "label_config": CONFIG,
            "params": {"context": {"result": [point]}}}
    return requests.post(server.url + "/predict", json=body, timeout=timeout_s)


def assert_a_mask(response: requests.Response) -> None:
    assert response.status_code == 200, response.text
    value = response.json()["results"][0]["result"][0]["value"]
    mask = decode_rle(value["rle"], HEIGHT, WIDTH)
    assert mask.shape == (HEIGHT, WIDTH) and 0 < mask.sum() < mask.size


def click_in_background(server: Server) -> dict:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["response"] = click(server, timeout_s=90)
        except requests.RequestException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    return outcome


def test_sigkill_of_the_worker_during_a_click_is_survived(backends: Backends, label_studio: SlowLabelStudio) -> None:
    server = backends.start()
    wait_ready(server)
    assert get(server, "/ready").json() == {"ready": True, "sam": "ready"}
    assert run_healthchecks(server) == {"Dockerfile": 0, "docker-compose.yml": 0}  # healthy once SAM is loaded
    [worker] = server.children()
    label_studio.hold.set()
    outcome = click_in_background(server)
    assert label_studio.requested.wait(30), "the click never asked for its image"
    os.kill(worker, signal.SIGKILL)  # as the OOM killer would
    outcome["thread"].join(30)
    assert not outcome["thread"].is_alive(), "the click in flight hung instead of failing"
    assert "error" in outcome or outcome["response"].status_code >= 500  # that one click is lost, not hung

    wait_for(lambda: server.children() and server.children() != [worker], 30, "a new worker", server.log)
    wait_ready(server)
    label_studio.hold.clear()
    label_studio.released.set()
    assert_a_mask(click(server))
    assert_a_mask(click(server))  # and the further (cached) click
    assert server.process.poll() is None
    assert get(server, "/health").status_code == 200
    assert "Control socket listening" not in server.log.read_text()  # per-user path: servers would share it


def test_sigkill_of_the_master_during_a_click_restarts_cleanly_on_the_same_port(
        backends: Backends, label_studio: SlowLabelStudio) -> None:
    server = backends.start()
    wait_ready(server)
    [worker] = server.children()
    label_studio.hold.set()
    outcome = click_in_background(server)
    assert label_studio.requested.wait(30), "the click never asked for its image"
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    # Nothing stuck: the orphaned worker goes at once (it must not keep the port while its click waits).
    wait_for(lambda: not Path(f"/proc/{worker}").exists() or _is_zombie(worker), 10, "the orphaned worker to exit")
    outcome["thread"].join(30)
    assert not outcome["thread"].is_alive(), "the click in flight hung instead of failing"

    port = int(server.url.rsplit(":", 1)[1])
    restarted = backends.start(port)  # what a supervisor (Docker's restart policy, systemd) does
    wait_ready(restarted)
    label_studio.hold.clear()
    label_studio.released.set()
    assert_a_mask(click(restarted))
    assert_a_mask(click(restarted))
    assert not list((backends.tmp_path / "image-cache").glob(".tmp-*")), "a half-written download was left behind"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


# --- readiness ------------------------------------------------------------------------

def healthcheck_commands() -> dict[str, list[str]]:
    """The Dockerfile's and the compose file's healthcheck commands, as argument lists."""
    dockerfile = (REPO / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    [line] = [line for line in dockerfile.splitlines() if line.startswith("HEALTHCHECK")]
    docker_cmd = shlex.split(line.split(" CMD ", 1)[1])
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    test = compose["services"]["backend"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return {"Dockerfile": docker_cmd, "docker-compose.yml": test[1:]}


def run_healthchecks(server: Server) -> dict[str, int]:
    env = {**os.environ, "PORT": server.url.rsplit(":", 1)[1]}
    codes = {}
    for where, command in healthcheck_commands().items():
        assert command[0] == "python"
        codes[where] = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True,
                                      timeout=30).returncode
    return codes


def test_ready_and_the_healthchecks_fail_and_clicks_get_503_while_sam_failed_to_load_but_health_stays_up(
        backends: Backends) -> None:
    server = backends.start(SAM_MODEL=str(backends.tmp_path / "no-such-model.pth"))
    wait_for(lambda: (a := get(server, "/health")) is not None and a.json()["sam"]["state"] == "failed", 400,
             "SAM to fail", server.log)
    assert get(server, "/health").status_code == 200  # Label Studio can still connect and pre-annotate
    ready = get(server, "/ready")
    assert ready.status_code == 503 and ready.json() == {"ready": False, "sam": "failed"}
    assert set(run_healthchecks(server).values()) == {1}
    answer = click(server)  # unavailable, not broken: 503 with the reason, no Retry-After (a restart is needed)
    assert answer.status_code == 503 and "Retry-After" not in answer.headers
    assert answer.json()["error"].startswith("SAM is unavailable: ") and "no-such-model.pth" in answer.json()["error"]
    assert "restart the backend" in answer.json()["error"] and "Internal error" not in answer.text


def test_ready_answers_503_while_sam_is_loading(tmp_path: Path, monkeypatch) -> None:
    import ml_backend.sam.loading as loading

    release = threading.Event()
    monkeypatch.setattr(loading, "load_engine", lambda settings: release.wait(30) and None)
    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "m", image_cache_dir=tmp_path / "c")
    client = create_app(settings).test_client()
    try:
        loading_answer = client.get("/ready")
        assert loading_answer.status_code == 503 and loading_answer.json == {"ready": False, "sam": "loading"}
        assert client.get("/health").status_code == 200
    finally:
        release.set()
