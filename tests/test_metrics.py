"""/metrics: Prometheus text, protected unless METRICS_PUBLIC=true, and under gunicorn with WORKERS=2 the sum
of both workers' counts (prometheus_client's multiprocess mode, in a private folder the master removes)."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ml_backend.app import create_app
from ml_backend.runtime import Runtime
from ml_backend.sam import SamEngine
from ml_backend.settings import Settings
from processes import free_port, stop, wait_for

REPO = Path(__file__).resolve().parents[1]
CONFIG = """<View><Image name="image" value="$img"/>
<BrushLabels name="mask" toName="image"><Label value="Dog"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Dog"/></KeyPointLabels></View>"""
AUTH = ("ops", "s3cret")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def data_uri(seed: int) -> str:
    image = np.random.default_rng(seed).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def click_body(task_id: int, seed: int, clicks: int) -> dict:
    points = [{"original_width": 100, "original_height": 60, "image_rotation": 0, "from_name": "kp", "to_name": "image",
               "type": "keypointlabels", "is_positive": True,
               "value": {"x": 30 + 3 * n, "y": 40, "width": 1, "keypointlabels": ["Dog"]}} for n in range(clicks)]
    return {"tasks": [{"id": task_id, "data": {"img": data_uri(seed)}}], "label_config": CONFIG, "project": "2.1700000000",
            "params": {"context": {"result": points}}}


def batch_body(task_id: int) -> dict:
    return {"tasks": [{"id": task_id, "data": {"img": data_uri(task_id)}}], "label_config": CONFIG, "project": "2"}


def headers(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# --- one process (Flask's test client) ------------------------------------------------------------------
def app_client(tmp_path: Path, engine, **changes):
    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache",
                                   preencode=False, **changes)
    return create_app(settings, runtime=Runtime(settings, engine=engine)).test_client()


@pytest.fixture
def engine(tiny_segmenter) -> SamEngine:
    return SamEngine(tiny_segmenter, source="tiny")


def test_metrics_are_prometheus_text_counting_routes_kinds_and_statuses(tmp_path: Path, engine) -> None:
    client = app_client(tmp_path, engine, basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
    before = samples(client.get("/metrics", headers=headers(*AUTH)).get_data(as_text=True))
    assert client.get("/metrics").status_code == 401  # protected like every route
    for task_id in (1, 2):
        assert client.post("/predict", json=batch_body(task_id), headers=headers(*AUTH)).status_code == 200
    # The per-project URL counts under the route it reaches.
    assert client.post("/projects/2/predict", json=batch_body(3), headers=headers(*AUTH)).status_code == 200
    assert client.post("/predict", json={"tasks": "x"}, headers=headers(*AUTH)).status_code in (400, 422)
    answer = client.get("/metrics", headers=headers(*AUTH))
    assert answer.status_code == 200 and answer.content_type.startswith("text/plain; version=")
    after = samples(answer.get_data(as_text=True))

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("ml_backend_requests_total", route="/predict", kind="batch", status="200") == 3
    assert moved("ml_backend_request_duration_seconds_count", route="/predict", kind="batch") == 3
    assert moved("ml_backend_request_duration_seconds_bucket", route="/predict", kind="batch", le="+Inf") == 3
    assert moved("ml_backend_requests_total", route="/metrics", kind="other", status="401") == 1
    assert sum(moved("ml_backend_requests_total", route="/predict", kind="other", status=s) for s in ("400", "422")) == 1


def test_metrics_public_opens_metrics_only(tmp_path: Path, engine) -> None:
    client = app_client(tmp_path, engine, basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1], metrics_public=True)
    assert client.get("/metrics").status_code == 200
    for path in ("/status", "/dashboard", "/versions", "/projects/2/versions"):
        assert client.get(path).status_code == 401, path


# --- gunicorn with two workers -----------------------------------------------------------------------------
@pytest.fixture
def two_workers(tmp_path: Path, tiny_sam_preset: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    port = free_port()
    log = tmp_path / "backend.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOST": "127.0.0.1", "PORT": str(port), "WORKERS": "2",
           "THREADS": "2", "SAM_MODEL": str(tiny_sam_preset), "MODEL_DIR": str(tmp_path / "models"),
           "IMAGE_CACHE_DIR": str(tmp_path / "cache"), "EMBEDDING_STORE_DIR": str(tmp_path / "embeddings"),
           "PROMPT_STATE_DIR": str(tmp_path / "prompts"), "PREENCODE": "false",
           "BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1],
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "inherited")}  # replaced by the backend's own folder
    (tmp_path / "inherited").mkdir()
    process = subprocess.Popen([sys.executable, "-m", "ml_backend", "serve"], cwd=REPO, env=env,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert process.poll() is None, log.read_text(errors="replace")[-4000:]
            try:
                return requests.get(url + "/ready", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        wait_for(ready, 400, "backend /ready", log)
        yield url, process, log
    finally:
        stop(process)


def workers_of(process: subprocess.Popen) -> list[int]:
    path = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    return [int(pid) for pid in path.read_text().split()]


@pytest.mark.timeout(900)
def test_two_workers_counts_add_up_and_the_folder_goes_with_the_master(two_workers, tmp_path: Path) -> None:
    url, process, log = two_workers
    workers = wait_for(lambda: len(w := workers_of(process)) == 2 and w, 60, "two workers", log)
    folder = Path(re.search(r"workers' metrics in (\S+)", log.read_text()).group(1))
    assert folder != tmp_path / "inherited" and folder.is_dir() and folder.stat().st_mode & 0o077 == 0  # private

    def post(path: str, body: dict) -> None:
        answer = requests.post(url + path, json=body, auth=AUTH, timeout=120)
        assert answer.status_code == 200, answer.text

    # Each worker in turn serves alone (the other stopped), so both hold counts the scrape must add up.
    for serving, paused in ((workers[0], workers[1]), (workers[1], workers[0])):
        os.kill(paused, signal.SIGSTOP)
        try:
            seed = 1 if serving == workers[0] else 2
            post("/predict", batch_body(10 + seed))
            post("/predict", click_body(seed, seed, 1))  # a first click: its image is encoded
            post("/predict", click_body(seed, seed, 2))  # a further click on the same object
            assert requests.get(url + "/metrics", timeout=30).status_code == 401
        finally:
            os.kill(paused, signal.SIGCONT)
    assert {p.name for p in folder.glob("counter_*.db")} >= {f"counter_{pid}.db" for pid in workers}

    found = samples(requests.get(url + "/metrics", auth=AUTH, timeout=30).text)
    assert value(found, "ml_backend_requests_total", route="/predict", kind="batch", status="200") == 2
    assert value(found, "ml_backend_requests_total", route="/predict", kind="first_click", status="200") == 2
    assert value(found, "ml_backend_requests_total", route="/predict", kind="further_click", status="200") == 2
    assert value(found, "ml_backend_requests_total", route="/metrics", kind="other", status="401") == 2
    for kind in ("first_click", "further_click", "batch"):
        assert value(found, "ml_backend_request_duration_seconds_count", route="/predict", kind=kind) == 2
        assert value(found, "ml_backend_request_duration_seconds_bucket", route="/predict", kind=kind, le="+Inf") == 2
        assert value(found, "ml_backend_request_duration_seconds_sum", route="/predict", kind=kind) > 0
    assert value(found, "ml_backend_embedding_lookups_total", result="miss", priority="interactive") == 2
    assert value(found, "ml_backend_embedding_lookups_total", result="hit", priority="interactive") == 2
    assert value(found, "ml_backend_encode_wait_seconds_count", priority="interactive") == 2
    assert value(found, "ml_backend_encode_queue_length") == 0
    assert value(found, "ml_backend_encode_refused_total", when="at_once") == 0

    stop(process, timeout_s=120)
    assert not folder.exists()


# --- training outcomes ----------------------------------------------------------------------------------
class HeldExecutor:
    """Takes jobs and runs nothing: the test records their outcomes."""

    owner = None

    def submit(self, spec, record) -> None:
        pass

    def lost(self, job_id: str, owner: str | None) -> str | None:
        return None


@pytest.mark.parametrize("outcome, label", [({"status": "succeeded", "promoted": True}, "promoted"),
                                            ({"status": "succeeded", "promoted": False}, "not_promoted"),
                                            ({"status": "not_enough_data"}, "not_enough_data"),
                                            ({"status": "failed", "error": "boom"}, "failed")])
def test_a_training_outcome_is_counted_once_by_outcome(tmp_path: Path, outcome: dict, label: str) -> None:
    from prometheus_client import REGISTRY

    from ml_backend.retrain.coordinator import Retrainer
    from ml_backend.retrain.state import FileStateStore

    def count() -> float:
        return REGISTRY.get_sample_value("ml_backend_training_jobs_total", {"outcome": label}) or 0.0

    retrainer = Retrainer(FileStateStore(tmp_path), HeldExecutor(), lambda project, job_id, reason: None,
                          policy=None, tick_s=0)
    started = retrainer.request(4, "START_TRAINING", forced=True)
    before = count()
    assert retrainer.finish(4, started.job_id, outcome).action == "finished"
    assert retrainer.finish(4, started.job_id, outcome).action == "ignored"  # recorded once: counted once
    assert count() - before == 1
