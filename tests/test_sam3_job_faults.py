"""Issue 21, item 9: a prediction Label Studio refuses (``POST /api/predictions`` failing) is that task's
failure: counted and logged, and the project job goes on with the other tasks. Only Label Studio refusing
every prediction, one after the other, stops the job (as failed, with the reason)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ml_backend.sam3.job import MAX_REFUSED_IN_A_ROW, JobContext, ProjectPreannotationJobs

TOKEN = "b" * 40
VERSION = "sam3-tiny"


@contextmanager
def label_studio(task_count: int, refuse: set[int] | None) -> Iterator[tuple[str, list[dict]]]:
    """One project's config, tasks and predictions; ``POST /api/predictions`` answers 500 for the tasks in
    ``refuse`` (every task when None) and stores the others."""

    stored: list[dict] = []

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
            path = self.path.split("?", 1)[0]
            if path == "/api/projects/7":
                return self._send(200, {"id": 7, "label_config": "<View/>"})
            if path == "/api/tasks":
                return self._send(200, {"tasks": [{"id": i, "data": {"image": f"/data/{i}.png"}}
                                                  for i in range(1, task_count + 1)], "total": task_count})
            if path == "/api/predictions":
                return self._send(200, [])
            return self._send(404, {"detail": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if refuse is None or body["task"] in refuse:
                return self._send(500, {"detail": "database is locked"})
            stored.append(body)
            self._send(201, {"id": len(stored), **body})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", stored
    finally:
        server.shutdown()
        server.server_close()


def run(url: str, state: Path) -> tuple[dict, list[int]]:
    predicted: list[int] = []

    def predict(task: dict, label_config: str, project: int) -> dict:
        predicted.append(task["id"])
        return {"result": [{"value": {"task": task["id"]}}], "score": 0.5, "model_version": VERSION}

    jobs = ProjectPreannotationJobs(JobContext(access=lambda: (url, TOKEN), predict=predict,
                                               model_version=lambda project: VERSION), state)
    jobs.start(7)
    assert jobs.wait_idle(30)
    return jobs.status()["projects"]["7"], predicted


def test_a_refused_prediction_fails_only_its_task(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING), label_studio(5, refuse={2}) as (url, stored):
        progress, predicted = run(url, tmp_path / "jobs.json")
    assert predicted == [1, 2, 3, 4, 5]
    assert [p["task"] for p in stored] == [1, 3, 4, 5]
    assert all(p["result"] == [{"value": {"task": p["task"]}}] for p in stored)
    assert (progress["state"], progress["written"], progress["failed"], progress["error"]) == ("done", 4, 1, "")
    assert "task 2: Label Studio did not store its SAM 3 prediction" in caplog.text and "HTTP 500" in caplog.text


def test_label_studio_refusing_every_prediction_stops_the_job_with_the_reason(tmp_path: Path) -> None:
    with label_studio(3 * MAX_REFUSED_IN_A_ROW, refuse=None) as (url, stored):
        progress, predicted = run(url, tmp_path / "jobs.json")
    assert stored == [] and len(predicted) == MAX_REFUSED_IN_A_ROW  # not an hour of SAM 3 for nothing
    assert progress["state"] == "failed" and progress["failed"] == MAX_REFUSED_IN_A_ROW
    assert f"refused {MAX_REFUSED_IN_A_ROW} predictions in a row" in progress["error"]
    assert "HTTP 500" in progress["error"]
