"""SAM 3 project jobs on RQ (``REDIS_URL``) against a real redis-server: one job per project whoever asks,
progress in Redis read by the web side, a dead worker's run reported failed and started again.

The jobs run in an RQ ``SimpleWorker`` in this process against the small stand-in for Label Studio's API of
``test_sam3_job.py`` (the real server, the real worker command and a tiny SAM 3 are in
tests/e2e/test_sam3_e2e.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from processes import free_port
from redis import Redis
from redis_fixture import redis_server  # noqa: F401  (fixture)
from rq import Queue, SimpleWorker
from rq.job import Job
from test_sam3_job import TOKEN, VERSION, fake_api

from ml_backend.errors import BackendError
from ml_backend.sam3 import rq_job, rq_jobs
from ml_backend.sam3.job import JobContext, JobSuperseded, ProjectProgress
from ml_backend.sam3.rq_job import ProgressWriter
from ml_backend.sam3.rq_jobs import RQProjectJobs, owner_key, progress_key

pytestmark = pytest.mark.redis
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def redis(redis_server: str) -> Redis:  # noqa: F811
    client = Redis.from_url(redis_server)
    client.flushdb()
    return client


def _jobs(redis: Redis, url: str = "http://ls.example", **kwargs) -> RQProjectJobs:
    return RQProjectJobs(redis, lambda: (url, TOKEN), **kwargs)


def _run_worker(redis: Redis) -> None:
    SimpleWorker([Queue(rq_jobs.QUEUE_NAME, connection=redis)], connection=redis).work(burst=True)


def _context_for(monkeypatch: pytest.MonkeyPatch, predict=None, seen: list | None = None) -> None:
    """The worker's context without a model: the job's own URL and token, a stand-in predictor."""

    def default_predict(task: dict, label_config: str, project: int) -> dict:
        return {"result": [{"value": {"task": task["id"]}}], "score": 0.5, "model_version": VERSION}

    def context(url: str, token: str) -> JobContext:
        if seen is not None:
            seen.append((url, token))
        return JobContext(access=lambda: (url, token), predict=predict or default_predict,
                          model_version=lambda project: VERSION)

    monkeypatch.setattr(rq_job, "worker_context", context)


def test_start_enqueues_once_per_project_whoever_asks(redis: Redis) -> None:
    replicas = [_jobs(redis) for _ in range(4)]  # four web workers or replicas
    answers: list[dict] = []
    threads = [threading.Thread(target=lambda j=j: answers.append(j.start(7))) for j in replicas for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue = Queue(rq_jobs.QUEUE_NAME, connection=redis)
    assert queue.count == 1
    job = queue.jobs[0]
    assert {a["job_id"] for a in answers} == {job.id} and all(a["state"] == "queued" for a in answers)
    assert job.args == ({"project": 7, "job_id": job.id, "label_studio_url": "http://ls.example", "token": TOKEN,
                         "restarts": 0},)
    assert job.func_name == "ml_backend.sam3.rq_job.run_job"
    _jobs(redis).start(8)
    assert queue.count == 2
    status = _jobs(redis).status()
    assert status["executor"] == "rq" and status["queue"] == [7, 8]
    assert status["projects"]["7"]["state"] == "queued"


def test_a_start_held_up_by_another_process_is_a_clear_503(redis: Redis) -> None:
    lock = redis.lock(f"{rq_jobs.PREFIX}lock:7", timeout=30)
    assert lock.acquire(blocking=False)  # another process stuck between its read and its enqueue
    with pytest.raises(BackendError) as raised:
        _jobs(redis).start(7)
    assert raised.value.status_code == 503 and "ask again" in raised.value.message
    lock.release()
    assert _jobs(redis).start(7)["state"] == "queued"


def test_a_worker_writes_predictions_and_the_web_side_reads_its_progress(redis: Redis, monkeypatch) -> None:
    seen: list = []
    _context_for(monkeypatch, seen=seen)
    existing = [{"task": 2, "model_version": VERSION}, {"task": 3, "model_version": "trimap-v1"}]
    with fake_api(4, existing) as (url, predictions):
        jobs = _jobs(redis, url)
        job_id = jobs.start(7)["job_id"]
        _run_worker(redis)
    assert seen == [(url, TOKEN)]  # the URL and token the web side knew travel with the job
    written = predictions[2:]
    assert sorted(p["task"] for p in written) == [1, 3, 4]
    assert all(p["model_version"] == VERSION and p["result"] == [{"value": {"task": p["task"]}}] for p in written)
    progress = jobs.status()["projects"]["7"]
    assert (progress["state"], progress["total"], progress["written"], progress["skipped"], progress["failed"]) == \
        ("done", 4, 3, 1, 0)
    assert progress["job_id"] == job_id and progress["model_version"] == VERSION
    assert progress["queued_at"] <= progress["started_at"] <= progress["finished_at"] <= progress["heartbeat_at"]
    assert Job.fetch(job_id, connection=redis).get_status() == "finished"
    assert redis.ttl(progress_key(7)) > 0  # progress does not stay in Redis for ever

    # Done: asking again runs it again, and Label Studio's predictions make it skip everything.
    with fake_api(4, [{"task": t, "model_version": VERSION} for t in (1, 2, 3, 4)]) as (url, predictions):
        jobs = _jobs(redis, url)
        assert jobs.start(7)["job_id"] != job_id
        _run_worker(redis)
    assert predictions[4:] == [] and jobs.status()["projects"]["7"]["skipped"] == 4


def test_failing_tasks_and_an_unreachable_label_studio_are_reported(redis: Redis, monkeypatch) -> None:
    def predict(task: dict, label_config: str, project: int) -> dict:
        if task["id"] == 2:
            raise BackendError("image is not an image")
        return {"result": [], "score": 0.0, "model_version": VERSION}

    _context_for(monkeypatch, predict)
    with fake_api(3, []) as (url, predictions):
        jobs = _jobs(redis, url)
        jobs.start(7)
        _run_worker(redis)
    assert sorted(p["task"] for p in predictions) == [1, 3]
    assert jobs.status()["projects"]["7"]["failed"] == 1

    jobs = _jobs(redis, "http://127.0.0.1:9")
    jobs.start(8)
    _run_worker(redis)
    progress = jobs.status()["projects"]["8"]
    assert progress["state"] == "failed" and "Label Studio" in progress["error"]


def test_a_running_job_without_heartbeat_is_failed_and_can_be_started_again(redis: Redis, monkeypatch) -> None:
    _context_for(monkeypatch)
    with fake_api(3, []) as (url, predictions):
        jobs = _jobs(redis, url)
        first = jobs.start(7)["job_id"]
        progress = ProjectProgress(7, state="running", total=10, written=3, started_at=time.time())
        writer = ProgressWriter(redis, first, progress)
        writer.write()  # what a worker writes when it starts
        assert jobs.status()["projects"]["7"]["state"] == "running"
        assert jobs.start(7)["job_id"] == first  # alive: not queued twice

        later = _jobs(redis, url, clock=lambda: time.time() + rq_jobs.STALE_AFTER_S + 1)  # the worker died
        stale = later.status()["projects"]["7"]
        assert stale["state"] == "failed" and stale["stale"] and "no progress" in stale["error"]
        assert stale["written"] == 3  # what it did is still shown
        second = later.start(7)
        assert second["state"] == "queued" and second["job_id"] != first
        assert Queue(rq_jobs.QUEUE_NAME, connection=redis).count == 2
        assert redis.get(owner_key(7)).decode() == second["job_id"]
        with pytest.raises(JobSuperseded):  # the old run, if it was only slow, stops at its next write
            writer.write()
        assert json.loads(redis.get(progress_key(7)))["job_id"] == second["job_id"]

        # A worker taking the superseded job (still queued in this staged test) does nothing; the new one works.
        _run_worker(redis)
    assert sorted(p["task"] for p in predictions) == [1, 2, 3]  # once each
    assert Job.fetch(first, connection=redis).return_value()["superseded"] is True
    final = jobs.status()["projects"]["7"]
    assert (final["state"], final["job_id"], final["written"]) == ("done", second["job_id"], 3)


def test_the_heartbeat_thread_keeps_a_slow_image_alive(redis: Redis) -> None:
    jobs = _jobs(redis)
    job_id = jobs.start(7)["job_id"]
    progress = ProjectProgress(7, state="running", started_at=time.time())
    writer = ProgressWriter(redis, job_id, progress, heartbeat_s=0.05)
    writer.write()
    first_beat = json.loads(redis.get(progress_key(7)))["heartbeat_at"]
    with writer:
        time.sleep(0.5)  # one long image: no progress, but heartbeats
    assert json.loads(redis.get(progress_key(7)))["heartbeat_at"] > first_beat


def test_a_queued_job_that_failed_or_vanished_is_reported_and_started_again(redis: Redis, monkeypatch) -> None:
    def broken(url: str, token: str) -> JobContext:
        raise RuntimeError("SAM 3 could not be loaded")

    monkeypatch.setattr(rq_job, "worker_context", broken)
    jobs = _jobs(redis)
    first = jobs.start(7)["job_id"]
    _run_worker(redis)  # the job fails before it reports any progress
    progress = jobs.status()["projects"]["7"]
    assert progress["state"] == "failed" and "SAM 3 could not be loaded" in progress["error"]
    assert jobs.start(7)["job_id"] != first

    second = jobs.start(8)["job_id"]
    Job.fetch(second, connection=redis).delete()  # Redis lost the job (flushed, evicted)
    assert "vanished" in jobs.status()["projects"]["8"]["error"]
    assert jobs.start(8)["job_id"] != second


def test_resume_restarts_only_dead_runs(redis: Redis) -> None:
    jobs = _jobs(redis)
    for project in (7, 8, 9):
        jobs.start(project)
    ProgressWriter(redis, redis.get(owner_key(7)).decode(), ProjectProgress(7, state="running")).write()
    ProgressWriter(redis, redis.get(owner_key(8)).decode(), ProjectProgress(8, state="done")).write()
    redis.set(progress_key(10), b"not json")  # damaged: ignored, not resumed
    later = _jobs(redis, clock=lambda: time.time() + rq_jobs.STALE_AFTER_S + 1)
    assert later.resume(watch_s=None) == [7]  # 8 is done, 9 is still queued (its job waits for a worker)
    assert later.resume(watch_s=None) == []
    assert later.status()["projects"]["7"]["restarts"] == 1
    # 7's first job is still on the queue in this staged test; a worker taking it stops at its first write.
    assert Queue(rq_jobs.QUEUE_NAME, connection=redis).count == 4


def test_a_project_whose_runs_keep_dying_is_restarted_a_few_times_only(redis: Redis) -> None:
    later = _jobs(redis, clock=lambda: time.time() + rq_jobs.STALE_AFTER_S + 1)
    _jobs(redis).start(7)
    for restart in range(1, rq_jobs.MAX_RESTARTS + 2):
        record = json.loads(redis.get(progress_key(7)))
        ProgressWriter(redis, record["job_id"], ProjectProgress(7, state="running"),
                       kept={"restarts": record["restarts"]}).write()  # a worker took it, then died
        resumed = later.resume(watch_s=None)
        assert resumed == ([7] if restart <= rq_jobs.MAX_RESTARTS else []), restart
    stuck = later.status()["projects"]["7"]
    assert stuck["state"] == "failed" and stuck["restarts"] == rq_jobs.MAX_RESTARTS
    assert later.start(7)["restarts"] == 0  # asked for again: afresh


def test_the_web_side_keeps_watching_for_dead_runs(redis: Redis) -> None:
    jobs = _jobs(redis)
    first = jobs.start(7)["job_id"]
    assert jobs.resume(watch_s=0.05) == []  # nothing dead yet; the watch goes on
    ProgressWriter(redis, first, ProjectProgress(7, state="running")).write()
    jobs.clock = lambda: time.time() + rq_jobs.STALE_AFTER_S + 1  # ... and its worker dies
    deadline = time.monotonic() + 10
    while redis.get(owner_key(7)).decode() == first and time.monotonic() < deadline:
        time.sleep(0.05)
    jobs.clock = time.time
    assert jobs.status()["projects"]["7"]["state"] == "queued" and redis.get(owner_key(7)).decode() != first


def test_redis_down_gives_clear_answers() -> None:
    from ml_backend.retrain.jobs import redis_connection

    jobs = RQProjectJobs(redis_connection(f"redis://127.0.0.1:{free_port()}/0", fail_fast=True), lambda: ("", ""))
    with pytest.raises(BackendError) as raised:
        jobs.start(7)
    assert raised.value.status_code == 503 and "REDIS_URL" in raised.value.message
    status = jobs.status()
    assert "unreachable" in status["error"] and status["projects"] == {}
    assert jobs.resume(watch_s=None) == []


def test_the_worker_command_needs_redis_and_a_model_it_can_load(tmp_path: Path, redis_server: str) -> None:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    answer = subprocess.run([sys.executable, "-m", "ml_backend.sam3.worker", "--burst"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert answer.returncode == 2 and "REDIS_URL is not set; the SAM 3 worker" in answer.stderr

    env.update(REDIS_URL=redis_server, SAM3_MODEL=str(tmp_path / "no-sam3"), MODEL_DIR=str(tmp_path / "models"),
               IMAGE_CACHE_DIR=str(tmp_path / "cache"))
    answer = subprocess.run([sys.executable, "-m", "ml_backend.sam3.worker", "--burst"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert answer.returncode == 1 and f"error: SAM 3 model directory {tmp_path / 'no-sam3'} does not exist" in \
        answer.stderr, answer.stderr[-2000:]


@pytest.mark.parametrize("redis_up", [True, False])
def test_the_app_queues_on_redis_and_answers_clearly_without_it(redis_up: bool, redis_server: str,  # noqa: F811
                                                                 tmp_path: Path, tiny_segmenter,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from ml_backend.app import create_app
    from ml_backend.runtime import Runtime
    from ml_backend.sam import SamEngine
    from ml_backend.settings import Settings

    # A database of its own: the job watchers earlier tests started (daemon threads) keep resuming their projects
    # in database 0 for as long as the session runs.
    own = redis_server.rsplit("/", 1)[0] + "/7"
    url = own if redis_up else f"redis://127.0.0.1:{free_port()}/0"
    Redis.from_url(own).flushdb()
    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache",
                                   preannotate="sam3", sam3_model="/models/sam3-tiny", redis_url=url,
                                   sam3_on_import=True)
    runtime = Runtime(settings, engine=SamEngine(tiny_segmenter, source="tiny"), sam3_engine=object())
    client = create_app(settings, runtime=runtime).test_client()
    monkeypatch.setattr("ml_backend.app.visible_project", lambda url, token, project: {"id": project})  # Label Studio
    answer = client.post("/preannotate", json={"project": 3})
    webhook = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 4}, "tasks": []})
    assert webhook.status_code == 200  # whether or not Redis answers
    if redis_up:
        assert answer.status_code == 202 and answer.get_json()["state"] == "queued"
        jobs = client.get("/status").get_json()["preannotation_jobs"]
        assert jobs["executor"] == "rq" and jobs["queue"] == [3, 4]
        assert Queue(rq_jobs.QUEUE_NAME, connection=Redis.from_url(url)).count == 2
    else:  # (/status is 503 then: the training state lives in Redis too)
        assert answer.status_code == 503 and "REDIS_URL" in answer.get_json()["error"]
