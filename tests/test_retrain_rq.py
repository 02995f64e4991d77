"""Retraining on RQ with a real redis-server and real ``rq worker`` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fake_label_studio import TOKEN, fake_label_studio
from processes import free_port, wait_for
from ml_backend.retrain import build_retrainer
from training.layout import project_store_dir
from ml_backend.retrain.state import RedisStateStore
from ml_backend.settings import Settings
from redis_fixture import redis_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.redis


def settings_for(redis_url: str, model_dir: Path, **env: str) -> Settings:
    return Settings.from_env({"REDIS_URL": redis_url, "MODEL_DIR": str(model_dir), "RETRAIN_MIN_ANNOTATIONS": "1",
                              "RETRAIN_MIN_INTERVAL_MIN": "0", "RETRAIN_IMAGE_SIZE": "32", "RETRAIN_EPOCHS": "1",
                              "RETRAIN_BATCH_SIZE": "4", **env})


def start_worker(redis_url: str, workdir: Path) -> tuple[subprocess.Popen, Path]:
    log = workdir / f"rq-worker-{time.monotonic_ns()}.log"
    env = {**os.environ, "IMAGE_CACHE_DIR": str(workdir / "image-cache"), "REDIS_URL": redis_url}
    process = subprocess.Popen([sys.executable, "-m", "ml_backend.retrain.worker"],  # the image's worker command
                               env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return process, log


def stop_worker(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # rq: warm shutdown
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_redis_state_updates_are_atomic_across_threads(redis_server):
    from redis import Redis

    store = RedisStateStore(Redis.from_url(redis_server), prefix="test-atomic:")

    def add(state):
        state.changes += 1

    threads = [threading.Thread(target=lambda: [store.update(9, add) for _ in range(50)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get(9).changes == 200
    assert store.projects() == [9]


def test_killed_worker_leaves_current_version_and_records_failure(redis_server, tmp_path):
    from training.store import ModelStore

    model_dir = tmp_path / "models"
    store = ModelStore(model_dir)
    with store.staging("20260101-000000-aaaaaa") as staged:
        (staged / "model.keras").write_bytes(b"stand-in: never loaded by this test")
        store.publish(staged, {"val_foreground_iou": 0.5}, make_current=True)
    before = [v.id for v in store.list_versions()]

    with fake_label_studio(hold_export=True) as ls:
        settings = settings_for(redis_server, model_dir, RETRAIN_JOB_TIMEOUT_S="600")
        retrainer = build_retrainer(settings, lambda: (ls.url, TOKEN), tick_s=0)
        worker, log = start_worker(redis_server, tmp_path)
        try:
            started = retrainer.on_webhook("START_TRAINING", {"action": "START_TRAINING", "project": {"id": 5}})
            assert started["status"] == "started"
            wait_for(ls.export_requested.is_set, 60, "the job's export request", log)  # the job is running
            assert retrainer.status("5")["is_training"]
            assert retrainer.on_webhook("START_TRAINING", {"project": {"id": 5}})["status"] == "queued"
            horses = wait_for(lambda: children(worker.pid), 10, "the work horse", log)
            os.kill(horses[0], signal.SIGKILL)
            status = wait_for(lambda: (s := retrainer.status("5"))["last"] and s, 60, "the failure", log)
        finally:
            stop_worker(worker)
            retrainer.executor.queue.empty()  # the follow-up must not run in another test
    last = status["last"]
    assert last["job_id"] == started["job_id"] and last["status"] == "failed"
    assert "terminated unexpectedly" in last["error"] and "signal 9" in last["error"]
    # The coalesced trigger is one follow-up, which waits for the back-off after the failure.
    assert not status["is_training"] and status["follow_up_queued"] and status["consecutive_failures"] == 1
    assert "backing off after 1 failed training(s)" in status["not_training_because"]
    assert store.current_version_id() == "20260101-000000-aaaaaa"
    assert [v.id for v in store.list_versions()] == before


def test_rq_job_trains_and_promotes_a_version(redis_server, tmp_path):
    from training.store import ModelStore

    model_dir = tmp_path / "models"
    with fake_label_studio(n_tasks=6) as ls:
        retrainer = build_retrainer(settings_for(redis_server, model_dir), lambda: (ls.url, TOKEN), tick_s=0)
        worker, log = start_worker(redis_server, tmp_path)
        try:
            answer = retrainer.on_webhook("START_TRAINING", {"project": {"id": 6}})
            assert answer["status"] == "started"
            status = wait_for(lambda: (s := retrainer.status("6"))["last"] and s, 300, "the training job", log)
        finally:
            stop_worker(worker)
    last = status["last"]
    assert last["status"] == "succeeded", last
    assert last["export"]["written"] == 6 and last["train_count"] + last["val_count"] == 6
    store = ModelStore(project_store_dir(model_dir, 6))  # the project's own store
    assert last["parent"] is None  # the first version: from scratch
    # Promoted only if one epoch beat the trivial baselines; never a version that learned nothing.
    assert last["promoted"] == ("beats all foreground" in last["promotion"])
    assert store.current_version_id() == (last["version"] if last["promoted"] else None)
    assert store.get(last["version"]).val_foreground_iou == pytest.approx(last["val_foreground_iou"])


def test_unreachable_redis_gives_a_clear_error(tmp_path):
    from ml_backend.retrain.state import StateStoreError

    port = free_port()  # a port nobody listens on
    retrainer = build_retrainer(settings_for(f"redis://127.0.0.1:{port}/0", tmp_path), lambda: ("", ""), tick_s=0)
    with pytest.raises(StateStoreError, match="Redis"):
        retrainer.on_webhook("START_TRAINING", {"project": {"id": 1}})


def test_rq_job_past_its_timeout_is_recorded_as_failed(redis_server, tmp_path):
    """RETRAIN_JOB_TIMEOUT_S reaches RQ: the work horse is stopped and the failure recorded, current untouched."""
    with fake_label_studio(hold_export=True) as ls:
        settings = settings_for(redis_server, tmp_path / "models", RETRAIN_JOB_TIMEOUT_S="3")
        retrainer = build_retrainer(settings, lambda: (ls.url, TOKEN), tick_s=0)
        worker, log = start_worker(redis_server, tmp_path)
        try:
            started = retrainer.on_webhook("START_TRAINING", {"project": {"id": 7}})
            job = retrainer.executor.queue.fetch_job(started["job_id"])
            assert job.timeout == 3
            wait_for(ls.export_requested.is_set, 60, "the job's export request", log)
            status = wait_for(lambda: (s := retrainer.status(7))["last"] and s, 60, "the timeout", log)
        finally:
            stop_worker(worker)
    assert status["last"]["status"] == "failed" and status["last"]["job_id"] == started["job_id"]
    assert "JobTimeoutException" in status["last"]["error"] or "timeout" in status["last"]["error"].lower()
    assert status["consecutive_failures"] == 1 and status["retry_after"] is not None
