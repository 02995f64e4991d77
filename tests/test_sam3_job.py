"""The project pre-annotation job against a small stand-in for Label Studio's task and prediction API
(the real server is in tests/e2e/test_sam3_e2e.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ml_backend.errors import BackendError
from ml_backend.sam3.job import JobContext, ProjectPreannotationJobs

TOKEN = "a" * 40
VERSION = "sam3-tiny"


@contextmanager
def fake_api(task_count: int, predictions: list[dict], refuse: Collection[int] | None = ()
             ) -> Iterator[tuple[str, list[dict]]]:
    """Serves one project's config, its tasks (paged) and its predictions; records POSTed predictions, except
    that ``POST /api/predictions`` answers 500 for the tasks in ``refuse`` (every task when None)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, payload) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            if self.headers.get("Authorization") != f"Token {TOKEN}":
                return self._send(401, {"detail": "no"})
            path = self.path.split("?", 1)[0]
            if path == "/api/projects/7":
                return self._send(200, {"id": 7, "label_config": "<View/>"})
            if path == "/api/tasks":
                return self._send(200, {"tasks": [{"id": i, "data": {"image": f"/data/{i}.png"}}
                                                  for i in range(1, task_count + 1)], "total": task_count})
            if path == "/api/predictions":
                return self._send(200, predictions)
            return self._send(404, {"detail": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if refuse is None or body["task"] in refuse:
                return self._send(500, {"detail": "database is locked"})
            predictions.append(body)
            self._send(201, {"id": len(predictions), **body})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", predictions
    finally:
        server.shutdown()
        server.server_close()


def _jobs(url: str, state: Path, predict=None) -> ProjectPreannotationJobs:
    def default_predict(task: dict, label_config: str, project: int) -> dict:
        assert label_config == "<View/>" and isinstance(project, int)
        return {"result": [{"value": {"task": task["id"]}}], "score": 0.5, "model_version": VERSION}

    return ProjectPreannotationJobs(JobContext(access=lambda: (url, TOKEN), predict=predict or default_predict,
                                               model_version=lambda project: VERSION), state)


def test_writes_missing_predictions_and_skips_this_versions(tmp_path: Path) -> None:
    existing = [{"task": 2, "model_version": VERSION}, {"task": 3, "model_version": "trimap-v1"}]
    with fake_api(4, existing) as (url, predictions):
        jobs = _jobs(url, tmp_path / "jobs.json")
        assert jobs.start(7)["state"] == "queued"
        assert jobs.wait_idle(30)
    written = predictions[2:]
    assert sorted(p["task"] for p in written) == [1, 3, 4]  # task 3 had another version's prediction only
    assert all(p["model_version"] == VERSION and p["result"] == [{"value": {"task": p["task"]}}] for p in written)
    progress = jobs.status()["projects"]["7"]
    assert (progress["state"], progress["total"], progress["written"], progress["skipped"]) == ("done", 4, 3, 1)
    assert json.loads((tmp_path / "jobs.json").read_text()) == {"pending": []}


def test_one_failing_task_does_not_stop_the_project(tmp_path: Path) -> None:
    def predict(task: dict, label_config: str, project: int) -> dict:
        if task["id"] == 2:
            raise BackendError("image is not an image")
        return {"result": [], "score": 0.0, "model_version": VERSION}

    with fake_api(3, []) as (url, predictions):
        jobs = _jobs(url, tmp_path / "jobs.json", predict)
        jobs.start(7)
        assert jobs.wait_idle(30)
    assert sorted(p["task"] for p in predictions) == [1, 3]
    assert jobs.status()["projects"]["7"]["failed"] == 1


def test_resumes_what_a_previous_process_left(tmp_path: Path) -> None:
    state = tmp_path / "jobs.json"
    state.write_text(json.dumps({"pending": [7, "junk", True]}))
    with fake_api(3, [{"task": 1, "model_version": VERSION}]) as (url, predictions):
        jobs = _jobs(url, state)
        assert jobs.resume() == [7]
        assert jobs.wait_idle(30)
        assert _jobs(url, state).resume() == []  # this process holds the resume lock: another worker does not resume
    assert sorted(p["task"] for p in predictions[1:]) == [2, 3]


def test_unreachable_label_studio_fails_the_project_with_a_message(tmp_path: Path) -> None:
    jobs = _jobs("http://127.0.0.1:9", tmp_path / "jobs.json")
    jobs.start(7)
    assert jobs.wait_idle(30)
    progress = jobs.status()["projects"]["7"]
    assert progress["state"] == "failed" and "Label Studio" in progress["error"]


@pytest.mark.parametrize("raw", ["not json", '{"pending": "x"}'])
def test_a_damaged_state_file_resumes_nothing(tmp_path: Path, raw: str) -> None:
    (tmp_path / "jobs.json").write_text(raw)
    jobs = _jobs("http://127.0.0.1:9", tmp_path / "jobs.json")
    assert jobs.resume() == []


def test_the_log_has_one_line_at_start_per_tenth_and_at_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from ml_backend.sam3.job import ProjectProgress, run_project

    caplog.set_level(logging.INFO, logger="ml_backend.sam3.job")
    with fake_api(20, [{"task": 1, "model_version": VERSION}]) as (url, _):
        jobs = _jobs(url, tmp_path / "jobs.json")
        run_project(ProjectProgress(7), jobs.context)
    lines = [r.getMessage() for r in caplog.records if r.name == "ml_backend.sam3.job"]
    assert lines[0] == f"SAM 3 pre-annotation of project 7 started: model version {VERSION}"
    assert lines[1:10] == [f"SAM 3 pre-annotation of project 7: {n} of 20 tasks ({n - 1} written, 1 skipped, 0 failed)"
                           for n in range(2, 20, 2)]
    assert lines[10].startswith("SAM 3 pre-annotation of project 7 done in ")
    assert lines[10].endswith(": 19 written, 1 skipped, 0 failed of 20") and len(lines) == 11


def test_queued_and_remembered_projects_are_capped(tmp_path: Path) -> None:
    """Issue 21 item 6: at most MAX_QUEUED_PROJECTS wait (then 429), and the state file lists only those."""
    from ml_backend.sam3 import job as job_module

    jobs = ProjectPreannotationJobs(JobContext(access=lambda: ("", ""), predict=None, model_version=lambda p: VERSION),
                                    tmp_path / "jobs.json")
    jobs._ensure_thread = lambda: None  # nothing runs: every project stays queued
    for project in range(1, job_module.MAX_QUEUED_PROJECTS + 1):
        jobs.start(project)
    with pytest.raises(BackendError) as refused:
        jobs.start(10_000)
    assert refused.value.status_code == 429
    assert len(json.loads((tmp_path / "jobs.json").read_text())["pending"]) == job_module.MAX_QUEUED_PROJECTS
