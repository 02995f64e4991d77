"""Faults with real processes: Redis stopped and restarted while webhooks arrive, Label Studio unreachable
during an export, the backend SIGKILLed during a training."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from fake_label_studio import TOKEN, fake_label_studio
from ml_backend.app import create_app
from ml_backend.runtime import Runtime
from ml_backend.settings import Settings
from processes import free_port, start_gunicorn_backend, stop, wait_for
from redis_fixture import redis_server  # noqa: F401  (fixture: skips like the other Redis tests)
from conftest_training import _fitted_store, fitted_store, tiny_data  # noqa: F401  (fixtures)
from test_retrain import created

WEBHOOK_LIMIT_S = 1.0  # what Label Studio waits for a webhook


class StubEngine:
    source = "stub"
    cache: dict = {}
    store = None  # no embedding store
    images_encoded = 0


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    """A redis-server that keeps its data across a restart (append-only file), as a deployment's does."""
    from redis import Redis

    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "yes", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    client = Redis(host="127.0.0.1", port=port)
    wait_for(lambda: _pings(client), 20, "redis-server")
    return process


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@pytest.mark.redis
def test_webhooks_answer_at_once_while_redis_is_down_and_count_once_when_it_is_back(redis_server, tmp_path):
    port = free_port()
    redis = start_redis(port, tmp_path)
    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "models", redis_url=f"redis://127.0.0.1:{port}/0",
                                   retrain_min_annotations=100, retrain_min_interval_min=0)
    runtime = Runtime(settings, engine=StubEngine())
    runtime.retrainer.close()  # the test ticks by hand
    client = create_app(settings, runtime=runtime).test_client()

    def send(project: int = 8) -> dict:
        began = time.monotonic()
        answer = client.post("/webhook", json=created(project))
        assert time.monotonic() - began < WEBHOOK_LIMIT_S and answer.status_code == 200, answer.json
        return answer.json

    try:
        assert [send()["status"] for _ in range(3)] == ["counted"] * 3
        stop(redis)
        assert [send()["status"] for _ in range(4)] == ["kept"] * 4
        down = client.get("/is_training?project=8")
        assert down.status_code == 503 and "Redis" in down.json["error"]
        status = client.get("/status")  # the operator's page still shows everything else, and why training cannot
        assert status.status_code == 200 and "Redis" in status.json["training"]["error"]
        assert status.json["sam"]["state"] == "ready"
        redis = start_redis(port, tmp_path)
        runtime.retrainer.tick()  # the ticker applies what was kept
        assert client.get("/is_training?project=8").json["accepted_changes"] == 7
        assert send()["status"] == "counted"
        runtime.retrainer.tick()
        state = client.get("/is_training?project=8").json
        assert state["accepted_changes"] == 8 and state["annotated_tasks_known"] == 8  # none lost, none twice
        # A hung Redis (stopped, not gone) is bounded by the client's timeouts too.
        redis.send_signal(signal.SIGSTOP)
        try:
            assert send()["status"] == "kept"
        finally:
            redis.send_signal(signal.SIGCONT)
        assert send()["status"] == "counted"
        assert client.get("/is_training?project=8").json["accepted_changes"] == 10
    finally:
        stop(redis)


def test_a_change_replayed_after_an_ambiguous_failure_counts_once(tmp_path):
    from ml_backend.retrain import build_retrainer
    from ml_backend.retrain.policy import Changes

    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "RETRAIN_MIN_ANNOTATIONS": "50"})
    retrainer = build_retrainer(settings, lambda: ("", ""), tick_s=0)
    for _ in range(2):  # the write landed, but the caller saw an error and applies it again
        retrainer.request(4, None, forced=False, changes=Changes(1, (11,)), change_id="c-1")
    assert retrainer.status(4)["accepted_changes"] == 1


def test_label_studio_unreachable_during_an_export_fails_cleanly_and_is_retried_by_policy(tmp_path):
    from ml_backend.retrain import build_retrainer

    access = {"url": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "models"), "RETRAIN_MIN_ANNOTATIONS": "2",
                                  "RETRAIN_MIN_INTERVAL_MIN": "0", "RETRAIN_BACKOFF_MIN": "1",
                                  "IMAGE_CACHE_DIR": str(tmp_path / "cache")})
    clock = [1_000_000.0]
    retrainer = build_retrainer(settings, lambda: (access["url"], TOKEN), tick_s=0, clock=lambda: clock[0])
    retrainer.on_webhook("ANNOTATION_CREATED", created(1))
    assert retrainer.on_webhook("ANNOTATION_CREATED", created(1))["status"] == "started"
    retrainer.executor.join(60)
    status = retrainer.status(1)
    assert status["last"]["status"] == "failed" and "cannot reach Label Studio" in status["last"]["error"]
    assert not status["is_training"] and status["retry_after"] == clock[0] + 60
    assert not list((tmp_path / "models").glob(".staging/*"))
    with fake_label_studio(n_tasks=1) as ls:  # back, with one annotated task left
        access["url"] = ls.url
        retrainer.tick()
        assert retrainer.status(1)["trainings"] == 1  # still backing off
        clock[0] += 60
        retrainer.tick()
        retrainer.executor.join(60)
    status = retrainer.status(1)
    assert status["history"][-1]["reason"] == "retry after 1 failed training(s)"
    assert status["last"]["status"] == "not_enough_data" and status["last"]["usable"] == 1
    assert status["consecutive_failures"] == 0 and "the last export and webhooks since show 1 task(s)" in status["not_training_because"]


def _backend(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    process, url = start_gunicorn_backend({**os.environ, **env, "HOST": "127.0.0.1"}, log, new_session=True)

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"backend exited:\n{log.read_text()[-3000:]}")
        try:
            return requests.get(url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_for(up, 180, "the backend", log)
    return process, url


@pytest.mark.slow
def test_sigkill_during_a_training_leaves_current_serving_and_nothing_stuck(fitted_store, tiny_sam_preset, tmp_path):
    from training.store import ModelStore

    model_dir = tmp_path / "backend-models"
    project_dir = model_dir / "projects" / "1"
    project_dir.parent.mkdir(parents=True)
    fitted_store.rename(project_dir)  # project 1's own store
    store = ModelStore(project_dir)
    current = store.current_version_id()
    model_bytes = store.current().model_path.read_bytes()
    temp = tmp_path / "tmp"
    temp.mkdir()
    log = tmp_path / "backend.log"
    with fake_label_studio(n_tasks=6) as ls:
        env = {"MODEL_DIR": str(model_dir), "SAM_MODEL": str(tiny_sam_preset), "LABEL_STUDIO_URL": ls.url,
               "LABEL_STUDIO_API_KEY": TOKEN, "TMPDIR": str(temp), "IMAGE_CACHE_DIR": str(tmp_path / "cache"),
               "RETRAIN_EPOCHS": "500", "RETRAIN_IMAGE_SIZE": "16", "RETRAIN_BATCH_SIZE": "2",
               "RETRAIN_COMPARE_MAX_TRAIN": "0"}  # straight into a long fit: no comparison of starts first
        backend, url = _backend(env, log)
        try:
            assert requests.post(url + "/train", json={"project": 1}, timeout=10).json()["status"] == "started"
            wait_for(lambda: list((project_dir / ".staging").glob("*/model.keras")), 300,
                     "the first checkpoint of the fit", log)
            assert requests.get(url + "/is_training?project=1", timeout=10).json()["is_training"]
        finally:
            os.killpg(backend.pid, signal.SIGKILL)  # gunicorn's master and worker at once
            backend.wait()
        [export_root] = temp.glob("sam-trimap-retrain-*")  # private, with the installation's token in its name
        assert list(export_root.iterdir())  # the kill left the export and the staging folder
        backend, url = _backend(env, log)
        try:
            status = requests.get(url + "/is_training?project=1", timeout=30).json()
            versions = requests.get(url + "/versions?project=1", timeout=30).json()["versions"]
        finally:
            stop(backend)
    assert not status["is_training"] and status["last"]["status"] == "failed"
    assert "ended before the job finished" in status["last"]["error"] or "restarted" in status["last"]["error"]
    assert store.current_version_id() == current and store.current().model_path.read_bytes() == model_bytes
    assert [v["id"] for v in versions if v["current"]] == [current]
    assert not [p for p in (project_dir / ".staging").iterdir() if p.is_dir()]
    assert not [p for p in export_root.iterdir() if p.is_dir()]
    state = json.loads((model_dir / "retraining.json").read_text())["1"]
    assert not state["running"] and state["failures"] == 1
