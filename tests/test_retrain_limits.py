"""Training that cannot run away: data check, back-off, coalescing with the interval, bounded queue,
timeout, canonical project ids, the state file's durability (in-process executor, gated job body)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ml_backend.retrain.spec import NotEnoughData
from ml_backend.retrain.state import ProjectState
from test_retrain import GatedJobs, created, gated, make, settle  # noqa: F401  (fixture)

START = {"action": "START_TRAINING", "project": {"id": 3}}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_no_job_without_data_to_split_and_the_reason_is_shown(tmp_path, gated: GatedJobs):
    """The issue's case: one annotated task, RETRAIN_MIN_ANNOTATIONS=1, a webhook and Start Training."""
    retrainer = make(tmp_path, RETRAIN_MIN_ANNOTATIONS="1")
    answer = retrainer.on_webhook("ANNOTATION_CREATED", created(task=1))
    assert answer["status"] == "counted" and "not enough data" in answer["reason"]
    assert retrainer.on_webhook("ANNOTATION_UPDATED", created(task=1))["status"] == "counted"  # same task: still 1
    status = retrainer.status(3)
    assert not status["is_training"] and "1 task(s)" in status["not_training_because"]
    # Start Training before any export: the export tells how much there is (one job, not three).
    gated.fail_with = NotEnoughData("project 3 has 1 task(s) with an accepted brush annotation", 1, [1])
    assert retrainer.on_webhook("START_TRAINING", START)["status"] == "started"
    gated.release.release()
    settle(retrainer)
    last = retrainer.status(3)["last"]
    assert last["status"] == "not_enough_data" and last["usable"] == 1
    refused = retrainer.on_webhook("START_TRAINING", START)
    assert refused["status"] == "refused" and "the last export and webhooks since show 1 task(s)" in refused["reason"]
    assert gated.calls == ["START_TRAINING"]
    assert retrainer.status(3)["consecutive_failures"] == 0  # not a failure: nothing to retry
    # A second annotated task makes a split possible: the counted changes start a training.
    gated.release.release()
    assert retrainer.on_webhook("ANNOTATION_CREATED", created(task=2))["status"] == "started"
    settle(retrainer)
    assert len(gated.calls) == 2 and retrainer.status(3)["last"]["status"] == "succeeded"


def test_failures_back_off_exponentially_and_are_retried_by_policy(tmp_path, gated: GatedJobs):
    clock = Clock()
    retrainer = make(tmp_path, RETRAIN_BACKOFF_MIN="5", RETRAIN_BACKOFF_MAX_MIN="12")
    retrainer.clock = clock
    gated.fail_next = "Label Studio is unreachable"
    retrainer.on_webhook("ANNOTATION_CREATED", created())
    assert retrainer.on_webhook("ANNOTATION_CREATED", created())["status"] == "started"
    gated.release.release()
    settle(retrainer)
    status = retrainer.status(3)
    assert status["last"]["status"] == "failed" and status["consecutive_failures"] == 1
    assert status["retry_after"] == clock.now + 300 and "backing off after 1" in status["not_training_because"]
    assert status["accepted_changes"] == 2  # the failed run's changes count again
    for delay, failures in ((299, 1), (1, 2)):  # not a second early; then the retry fails again
        clock.now += delay
        gated.fail_next = "Label Studio is unreachable"
        gated.release.release() if delay == 1 else None
        retrainer.tick()
        settle(retrainer)
        assert retrainer.status(3)["consecutive_failures"] == failures
    assert gated.calls[-1] == "retry after 1 failed training(s)"
    assert retrainer.status(3)["retry_after"] == clock.now + 600  # doubled
    clock.now += 600
    gated.release.release()
    assert retrainer.on_webhook("ANNOTATION_CREATED", created())["status"] == "started"  # a webhook starts it too
    settle(retrainer)
    status = retrainer.status(3)
    assert status["last"]["status"] == "succeeded" and status["consecutive_failures"] == 0
    assert status["retry_after"] is None and len(gated.calls) == 3
    third = json.loads((tmp_path / "retraining.json").read_text())["3"]
    assert third["failures"] == 0 and not third["retry"]
    # The cap: many failures never wait longer than RETRAIN_BACKOFF_MAX_MIN.
    assert retrainer.policy.retry_after(ProjectState(failures=30, last_finished_at=0)) == 720


def test_a_forced_trigger_during_a_run_queues_one_follow_up_that_waits_for_the_interval(tmp_path, gated: GatedJobs):
    clock = Clock()
    retrainer = make(tmp_path, RETRAIN_MIN_INTERVAL_MIN="10")
    retrainer.clock = clock
    assert retrainer.on_webhook("START_TRAINING", START)["status"] == "started"
    assert gated.started.acquire(timeout=10)
    assert retrainer.on_webhook("START_TRAINING", START)["status"] == "queued"
    assert retrainer.on_webhook("START_TRAINING", START)["status"] == "queued"
    clock.now += 30
    gated.release.release()
    settle(retrainer)
    status = retrainer.status(3)
    assert not status["is_training"] and status["follow_up_queued"] and "minimum interval" in status[
        "not_training_because"]
    clock.now += 599
    retrainer.tick()
    assert len(gated.calls) == 1
    clock.now += 1
    gated.release.release()
    retrainer.tick()
    settle(retrainer)
    assert gated.calls == ["START_TRAINING", "follow-up of triggers during the last run"]
    assert not retrainer.status(3)["follow_up_queued"]


def test_one_fit_at_a_time_per_process_and_a_bounded_queue(tmp_path, gated: GatedJobs):
    retrainer = make(tmp_path, RETRAIN_CONCURRENCY="1", RETRAIN_QUEUE_MAX="1")
    for project in (3, 4, 5):
        retrainer.on_webhook("ANNOTATION_CREATED", created(project))
    started = [retrainer.on_webhook("ANNOTATION_CREATED", created(project))["status"] for project in (3, 4, 5)]
    assert started == ["started", "started", "started"]
    assert gated.started.acquire(timeout=10)
    assert not gated.started.acquire(timeout=1)  # the second waits for the slot
    assert retrainer.status(4)["waiting_for_slot"] and not retrainer.status(3)["waiting_for_slot"]
    full = retrainer.status(5)  # the third found the queue full: a recorded failure, backing off
    assert not full["is_training"] and "RETRAIN_QUEUE_MAX=1" in full["last"]["error"]
    gated.release.release()
    assert gated.started.acquire(timeout=10)  # the slot passes to project 4
    gated.release.release()
    settle(retrainer)
    assert [retrainer.status(p)["last"]["status"] for p in (3, 4)] == ["succeeded", "succeeded"]


def test_an_in_process_job_past_its_timeout_is_failed_and_stopped(tmp_path, gated: GatedJobs):
    retrainer = make(tmp_path, RETRAIN_JOB_TIMEOUT_S="60")
    clock = Clock()
    retrainer.executor.clock = clock
    assert retrainer.on_webhook("START_TRAINING", START)["status"] == "started"
    assert gated.started.acquire(timeout=10)
    clock.now += 59
    assert retrainer.status(3)["is_training"]
    clock.now += 2
    status = retrainer.status(3)
    assert not status["is_training"] and "timed out after 60 s" in status["last"]["error"]
    assert gated.cancelled[-1].is_set()  # the fit is told to stop at its next batch
    gated.release.release()
    settle(retrainer)
    assert retrainer.status(3)["trainings"] == 1  # the late end of the stopped job is not recorded again


def test_project_ids_are_canonical(tmp_path, gated: GatedJobs):
    retrainer = make(tmp_path)
    for project in ("01", 1, "1.1700000000", " 1"):
        assert retrainer.on_webhook("ANNOTATION_CREATED", created(1) | {"project": project})["project"] == 1
    status = retrainer.status("001")  # the first two started a training, the next two count towards the next
    assert status["is_training"] and status["accepted_changes"] == 2
    assert gated.started.acquire(timeout=10)
    assert list(retrainer.status(None)["projects"]) == ["1"]
    gated.release.release()
    settle(retrainer)
    for bad in (-1, "x", True, 2**70, "", "\u0661"):  # "١" (Arabic-Indic one): ASCII digits only
        assert retrainer.on_webhook("START_TRAINING", {"project": bad})["status"] == "ignored"


def test_an_unreadable_state_file_is_kept_aside_with_a_warning(tmp_path, gated: GatedJobs, caplog):
    (tmp_path / "retraining.json").write_text('{"3": {"changes": 1')  # torn by a crash of an older version
    retrainer = make(tmp_path)
    assert retrainer.on_webhook("ANNOTATION_CREATED", created())["status"] == "counted"
    kept = list(tmp_path.glob("retraining.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_text() == '{"3": {"changes": 1'
    assert "kept it as retraining.json.corrupt-" in caplog.text
    assert json.loads((tmp_path / "retraining.json").read_text())["3"]["changes"] == 1


def test_folders_of_killed_jobs_are_removed_at_start_but_not_those_of_live_ones(tmp_path, monkeypatch):
    from ml_backend.retrain import jobs

    monkeypatch.setattr(jobs.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    hold = ("import sys, time; from pathlib import Path; from training.workdirs import held_folder\n"
            "with held_folder(Path(sys.argv[1])) as d:\n"
            "    (d / 'image.jpg').write_bytes(b'x'); print('held', flush=True); time.sleep(600)\n")
    folders = {"killed-work": jobs.work_root(tmp_path / "models") / "project-3-dead",
               "killed-staging": tmp_path / "models" / "projects" / "3" / ".staging" / "20260101-000000-000000-dead",
               "live-staging": tmp_path / "models" / ".staging" / "20260101-000000-000000-live"}
    holders = {name: subprocess.Popen([sys.executable, "-c", hold, str(path)], stdout=subprocess.PIPE, text=True)
               for name, path in folders.items()}
    try:
        for process in holders.values():
            assert process.stdout.readline().strip() == "held"
        for name in ("killed-work", "killed-staging"):
            holders[name].kill()
            holders[name].wait()
        make(tmp_path / "models")  # a backend starting
        assert not folders["killed-work"].exists() and not folders["killed-staging"].exists()
        assert (folders["live-staging"] / "image.jpg").is_file()
    finally:
        for process in holders.values():
            process.kill()
            process.wait()


def test_the_state_file_is_written_durably(tmp_path, gated: GatedJobs, monkeypatch):
    import os

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    make(tmp_path).on_webhook("ANNOTATION_CREATED", created())
    assert len(synced) >= 2  # the file's data and the folder's entry
    assert not list(Path(tmp_path).glob(".retraining.json.*.tmp"))


def test_a_training_export_bounds_declared_mask_sizes_by_this_process_settings(tmp_path, monkeypatch):
    """MAX_IMAGE_PIXELS of the process running the job (backend or RQ worker) bounds what an annotation may declare."""
    import pytest

    from ml_backend import export
    from ml_backend.retrain.jobs import execute_training
    from ml_backend.retrain.spec import JobSpec

    seen = []

    def export_stub(data_dir, *, options, **kwargs):
        seen.append(options.max_pixels)
        raise RuntimeError("stopped after the export's options")

    monkeypatch.setattr(export, "export_from_label_studio", export_stub)
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "123456")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    spec = JobSpec(job_id="j1", project=3, reason="test", model_dir=str(tmp_path / "models" / "3"),
                   label_studio_url="http://ls", token="t", epochs=1, image_size=64, batch_size=2,
                   promotion_margin=0.0, boundary_width=2, ground_truth_only=False, foreground_labels=("cat",),
                   background_labels=(), boundary_labels=())
    with pytest.raises(RuntimeError, match="stopped after"):
        execute_training(spec)
    assert seen == [123456]
