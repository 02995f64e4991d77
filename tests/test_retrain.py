"""The retraining coordinator with the in-process worker and the JSON state in MODEL_DIR.

The job body (export + fit) is replaced by a gate the test opens, to control when jobs end;
``test_retrain_rq.py`` and the end-to-end test run the real one.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ml_backend.retrain import build_retrainer
from ml_backend.retrain import jobs as jobs_module
from ml_backend.retrain.state import FileStateStore
from ml_backend.settings import Settings

BRUSH = [{"type": "brushlabels", "value": {"format": "rle", "rle": [0], "brushlabels": ["Pet"]}}]


_tasks = iter(range(1, 10**6))


def created(project: int = 3, task: int | None = None, **annotation) -> dict:
    """An accepted brush annotation on a new task (or on ``task``)."""
    task = next(_tasks) if task is None else task
    return {"action": "ANNOTATION_CREATED", "project": {"id": project}, "task": {"id": task},
            "annotation": {"id": 1, "result": BRUSH, "was_cancelled": False, "ground_truth": False, **annotation}}


class GatedJobs:
    """Stands in for execute_training: each call waits for the test to release it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.fail_next: str | None = None
        self.fail_with: BaseException | None = None
        self.cancelled: list[threading.Event] = []

    def __call__(self, spec, cancel=None):
        self.calls.append(spec.reason)
        self.cancelled.append(cancel)
        self.started.release()
        assert self.release.acquire(timeout=30), "test never released the job"
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc
        if self.fail_next:
            message, self.fail_next = self.fail_next, None
            raise RuntimeError(message)
        return {"status": "succeeded", "usable": 5, "tasks": [1, 2, 3, 4, 5], "fit": {"version_id": f"v{len(self.calls)}"}}


@pytest.fixture
def gated(monkeypatch) -> GatedJobs:
    fake = GatedJobs()
    monkeypatch.setattr(jobs_module, "execute_training", fake)
    return fake


def make(tmp_path: Path, **env: str):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "RETRAIN_MIN_ANNOTATIONS": "2",
                                  "RETRAIN_MIN_INTERVAL_MIN": "0", **env})
    return build_retrainer(settings, lambda: ("http://ls", "token"), tick_s=0)


def settle(retrainer) -> None:
    retrainer.executor.join(300)  # a fit on a loaded 2-core machine can take minutes


def test_threshold_starts_one_job_and_webhook_returns_before_it_ends(tmp_path, gated):
    retrainer = make(tmp_path)
    assert retrainer.on_webhook("TASKS_CREATED", {"project": {"id": 3}})["status"] == "ignored"
    assert retrainer.on_webhook("ANNOTATION_CREATED", created(was_cancelled=True))["status"] == "ignored"
    assert retrainer.on_webhook("ANNOTATION_CREATED", created())["status"] == "counted"
    answer = retrainer.on_webhook("ANNOTATION_CREATED", created())
    assert answer["status"] == "started" and "2 new" in answer["reason"]
    assert gated.started.acquire(timeout=10)
    status = retrainer.status("3.1700000000")
    assert status["is_training"] and status["job_id"] == answer["job_id"]  # the job runs after the answer
    gated.release.release()
    settle(retrainer)
    status = retrainer.status("3")
    assert not status["is_training"] and status["last"]["status"] == "succeeded"
    assert status["accepted_changes"] == 0 and status["trainings"] == 1


def test_triggers_during_a_run_coalesce_into_one_follow_up(tmp_path, gated):
    retrainer = make(tmp_path)
    first = retrainer.on_webhook("START_TRAINING", {"action": "START_TRAINING", "project": {"id": 3}})
    assert first["status"] == "started"
    assert gated.started.acquire(timeout=10)
    for _ in range(3):
        assert retrainer.on_webhook("START_TRAINING", {"project": {"id": 3}})["status"] == "queued"
    assert retrainer.on_webhook("ANNOTATION_CREATED", created())["status"] == "counted"
    assert retrainer.status("3")["follow_up_queued"]
    gated.release.release()  # first run ends -> exactly one follow-up starts
    assert gated.started.acquire(timeout=10)
    status = retrainer.status("3")
    assert status["is_training"] and status["job_id"] != first["job_id"] and not status["follow_up_queued"]
    gated.release.release()
    settle(retrainer)
    assert gated.calls == ["START_TRAINING", "follow-up of triggers during the last run"]
    assert retrainer.status("3")["trainings"] == 2
    other = retrainer.status("4")  # projects are independent
    assert not other["is_training"] and other["trainings"] == 0


def test_failure_is_recorded_with_its_reason_and_training_can_start_again(tmp_path, gated):
    retrainer = make(tmp_path)
    gated.fail_next = "out of memory on the GPU"
    retrainer.on_webhook("START_TRAINING", {"project": 3})
    gated.release.release()
    settle(retrainer)
    last = retrainer.status("3")["last"]
    assert last["status"] == "failed" and "out of memory on the GPU" in last["error"]
    assert retrainer.status("3")["last_success"] is None
    gated.release.release()
    assert retrainer.on_webhook("START_TRAINING", {"project": 3})["status"] == "started"
    settle(retrainer)
    assert retrainer.status("3")["last"]["status"] == "succeeded"


def test_interval_waits_and_the_ticker_starts_the_job_later(tmp_path, gated):
    clock = [1000.0]
    retrainer = make(tmp_path, RETRAIN_MIN_INTERVAL_MIN="10")
    retrainer.clock = lambda: clock[0]
    gated.release.release()
    retrainer.on_webhook("START_TRAINING", {"project": 3})
    settle(retrainer)
    for _ in range(2):
        assert retrainer.on_webhook("ANNOTATION_CREATED", created())["status"] == "counted"  # interval not over
    retrainer.tick()
    assert len(gated.calls) == 1
    clock[0] += 601
    gated.release.release()
    retrainer.tick()
    settle(retrainer)
    assert len(gated.calls) == 2 and "2 new" in gated.calls[1]


def test_state_is_shared_through_model_dir(tmp_path, gated):
    make(tmp_path).on_webhook("ANNOTATION_CREATED", created())
    assert make(tmp_path).status("3")["accepted_changes"] == 1  # another process (or restart) sees the count
    assert (tmp_path / "retraining.json").is_file()


def _mark_running(tmp_path: Path, owner: str, project: int = 3) -> None:
    def running(state):
        state.running, state.job_id, state.job_owner = True, "abc", owner

    FileStateStore(tmp_path).update(project, running)


def test_job_of_a_dead_backend_process_is_marked_failed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "from ml_backend.retrain.jobs import owner_id; print(owner_id())"],
                          capture_output=True, text=True, check=True)
    _mark_running(tmp_path, dead.stdout.strip())
    status = make(tmp_path).status("3")
    assert not status["is_training"]
    assert status["last"]["status"] == "failed" and "ended before the job finished" in status["last"]["error"]


def test_a_restart_with_the_same_pid_is_told_apart_by_the_boot_id(tmp_path):
    """A container restart can give the new backend the old one's pid and hostname."""
    from ml_backend.retrain.jobs import owner_id

    host, pid, ticks, _ = owner_id().split(":")
    _mark_running(tmp_path, f"{host}:{pid}:{ticks}:0123456789ab")
    status = make(tmp_path).status("3")
    assert not status["is_training"] and "restarted" in status["last"]["error"]


def test_a_live_process_with_a_reused_pid_is_told_apart_by_its_start_time(tmp_path):
    from ml_backend.retrain.jobs import owner_id

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host, _, _, boot = owner_id().split(":")
        _mark_running(tmp_path, f"{host}:{live.pid}:12345:{boot}", project=3)  # started at another time
        _mark_running(tmp_path, f"{host}:{live.pid}:-:{boot}", project=4)  # start time unknown: may be alive
        retrainer = make(tmp_path)
        assert "pid reused" in retrainer.status(3)["last"]["error"]
        assert retrainer.status(4)["is_training"]  # another live process may still run it
    finally:
        live.kill()
        live.wait()
    assert not retrainer.status(4)["is_training"]


def test_a_killed_backend_left_unreaped_counts_as_ended(tmp_path):
    """A SIGKILLed worker whose parent died with it stays a zombie where init does not reap (containers)."""
    from ml_backend.retrain.jobs import _start_ticks, owner_id

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host, _, _, boot = owner_id().split(":")
        ticks = _start_ticks(child.pid)
        assert ticks is not None
        child.kill()  # not reaped yet: a zombie, with the same start time in /proc
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the killed child never became a zombie"
            time.sleep(0.02)
        _mark_running(tmp_path, f"{host}:{child.pid}:{ticks}:{boot}")
        status = make(tmp_path).status("3")
        assert not status["is_training"] and "ended before the job finished" in status["last"]["error"]
    finally:
        child.kill()
        child.wait()


def test_unknown_label_studio_fails_clearly(tmp_path, monkeypatch):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path)})
    retrainer = build_retrainer(settings, lambda: ("", ""), tick_s=0)
    retrainer.on_webhook("START_TRAINING", {"project": 3})
    settle(retrainer)
    last = retrainer.status("3")["last"]
    assert last["status"] == "failed" and "LABEL_STUDIO_URL" in last["error"]


def test_in_process_jobs_train_then_fine_tune_from_the_current_version(tmp_path):
    """The real job body: export from a (stand-in) Label Studio, fit, promote; the second run fine-tunes."""
    from fake_label_studio import TOKEN, fake_label_studio

    from training.layout import project_store_dir
    from training.store import ModelStore

    with fake_label_studio(n_tasks=5) as ls:
        settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "models"), "RETRAIN_IMAGE_SIZE": "32",
                                      "RETRAIN_EPOCHS": "1", "RETRAIN_BATCH_SIZE": "4",
                                      "IMAGE_CACHE_DIR": str(tmp_path / "cache")})
        retrainer = build_retrainer(settings, lambda: (ls.url, TOKEN), tick_s=0)
        store = ModelStore(project_store_dir(tmp_path / "models", 1))
        assert retrainer.on_webhook("START_TRAINING", {"project": {"id": 1}})["status"] == "started"
        settle(retrainer)
        first = retrainer.status("1")["last"]
        assert first["status"] == "succeeded", first
        # One epoch rarely beats predicting all foreground: promoted only with a reason that says it did.
        assert first["parent"] is None and ("beats all foreground" in first["promotion"]) == first["promoted"]
        if not first["promoted"]:
            assert store.current_version_id() is None  # nothing is served that learned nothing
            store.promote(first["version"])  # by hand, as an operator may
        assert retrainer.on_webhook("START_TRAINING", {"project": {"id": 1}})["status"] == "started"
        settle(retrainer)
    second = retrainer.status("1")["last"]
    assert second["status"] == "succeeded", second
    assert second["parent"] == first["version"]  # fine-tuned from what was current
    assert store.current_version_id() == (second["version"] if second["promoted"] else first["version"])
    assert {v.id for v in store.list_versions()} == {first["version"], second["version"]}


def test_reading_state_creates_nothing(tmp_path):
    retrainer = make(tmp_path / "models")
    assert retrainer.status("3")["trainings"] == 0 and retrainer.status(None) == {"is_training": False, "projects": {},
                                                                                "changes_kept": 0}
    retrainer.tick()
    assert not (tmp_path / "models").exists()
