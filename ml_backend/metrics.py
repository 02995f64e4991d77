"""Prometheus metrics (``prometheus_client``) and the recent click latencies the dashboard shows.

What is counted where: requests by route, kind (first click, further click, batch) and status in the
app's request hooks; encode-gate waits and refusals in the gate; embedding lookups (served without
encoding, or encoded) in the runtime; training outcomes where a job's outcome is recorded. Each is a
counter increment or a histogram observation: nothing on a hot path reads or writes more than that.
Gauges that describe a state (encode queue, pre-encode backlog, SAM 3 job progress) are sampled from
the runtime by :class:`Sampler`, a thread of each worker, and by the worker that answers a scrape.

Several gunicorn workers: the master creates a private folder and names it in ``PROMETHEUS_MULTIPROC_DIR``
(the library's variable, set by :mod:`ml_backend.gunicorn_hooks` before any worker imports this module),
so every worker's values land in memory-mapped files there and a scrape answered by any worker adds them
up (the library's multiprocess mode). Without it (one process, tests) the process's own registry is served.

Recent click latencies: each worker keeps its last clicks in memory (an append per click) and the sampler
writes them to ``clicks-<pid>.json`` in that folder, so the dashboard's p50/p95 cover every worker.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable (not a setting: the master sets it)
SAMPLE_S = 5.0  # how often each worker samples its gauges and writes its recent clicks
RECENT_CLICKS = 500  # clicks kept per worker for the dashboard's percentiles
RECENT_WINDOW_S = 3600.0  # clicks older than this are not "recent"
CLICK_KINDS = ("first_click", "further_click")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0)

REQUESTS = Counter("ml_backend_requests", "HTTP requests by route, kind and status code.",
                   ["route", "kind", "status"])
LATENCY = Histogram("ml_backend_request_duration_seconds", "Time to answer a request, by route and kind.",
                    ["route", "kind"], buckets=LATENCY_BUCKETS)
ENCODE_WAIT = Histogram("ml_backend_encode_wait_seconds", "Time an image encode waited for the encode gate.",
                        ["priority"], buckets=LATENCY_BUCKETS)
ENCODE_REFUSED = Counter("ml_backend_encode_refused", "Encodes refused by the encode gate (HTTP 503), by when.",
                         ["when"])
ENCODE_QUEUE = Gauge("ml_backend_encode_queue_length", "Encodes waiting for the encode gate (all workers).",
                     multiprocess_mode="livesum")
ENCODE_ACTIVE = Gauge("ml_backend_encode_active", "Encodes running now (all workers).", multiprocess_mode="livesum")
EMBEDDINGS = Counter("ml_backend_embedding_lookups",
                     "Image embeddings asked for: hit (memory or embedding store) or miss (encoded).",
                     ["result", "priority"])
PREENCODE_BACKLOG = Gauge("ml_backend_preencode_backlog", "Images queued or being encoded by pre-encoding, "
                          "per project (the largest of the workers' queues).", ["project"],
                          multiprocess_mode="livemax")
TRAININGS = Counter("ml_backend_training_jobs", "Training jobs finished, by outcome.", ["outcome"])
SAM3_TASKS = Gauge("ml_backend_sam3_job_tasks", "SAM 3 pre-annotation jobs' tasks, per project and state "
                   "(total, written, skipped, failed).", ["project", "state"], multiprocess_mode="livemostrecent")
SAM3_RUNNING = Gauge("ml_backend_sam3_job_running", "1 while a project's SAM 3 pre-annotation job is queued or "
                     "running, else 0.", ["project"], multiprocess_mode="livemostrecent")

_recent: deque[tuple[float, str, float, int | None]] = deque(maxlen=RECENT_CLICKS)  # (time, kind, seconds, project)


def multiproc_dir() -> Path | None:
    """The folder shared by the workers, when the master set one up."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


# --- what the rest of the backend calls (cheap) -------------------------------------------------
def observe_request(route: str, kind: str, status: int, seconds: float, project: int | None = None) -> None:
    REQUESTS.labels(route, kind, str(status)).inc()
    LATENCY.labels(route, kind).observe(seconds)
    if kind in CLICK_KINDS and status < 400:
        _recent.append((time.time(), kind, seconds, project))


def encode_waited(priority: str, seconds: float) -> None:
    ENCODE_WAIT.labels(priority).observe(seconds)


def encode_refused(when: str) -> None:
    ENCODE_REFUSED.labels(when).inc()


def embedding_lookup(hit: bool, priority: str) -> None:
    EMBEDDINGS.labels("hit" if hit else "miss", priority).inc()


def training_finished(outcome: dict) -> None:
    """One recorded training outcome: promoted, not_promoted, not_enough_data or failed."""
    status = outcome.get("status")
    if status == "succeeded":
        label = "promoted" if outcome.get("promoted") else "not_promoted"
    else:
        label = status if status == "not_enough_data" else "failed"
    TRAININGS.labels(label).inc()


# --- the scrape -----------------------------------------------------------------------------------
def exposition() -> tuple[bytes, str]:
    """The text a Prometheus scrape gets: every worker's values when several share the folder."""
    folder = multiproc_dir()
    if folder is None:
        from prometheus_client import REGISTRY

        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    return generate_latest(registry), CONTENT_TYPE_LATEST


# --- recent clicks --------------------------------------------------------------------------------
def _clicks_file(folder: Path, pid: int) -> Path:
    return folder / f"clicks-{pid}.json"


def write_recent_clicks() -> None:
    """This worker's recent clicks to its file in the shared folder (atomic replace)."""
    folder = multiproc_dir()
    if folder is None:
        return
    path = _clicks_file(folder, os.getpid())
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(list(_recent)), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        logger.debug("could not write recent clicks: %s", exc)


def _all_recent_clicks() -> Iterable[tuple]:
    folder = multiproc_dir()
    if folder is None:
        return list(_recent)
    write_recent_clicks()
    clicks: list[tuple] = []
    for path in folder.glob("clicks-*.json"):
        try:
            clicks += [tuple(item) for item in json.loads(path.read_text(encoding="utf-8"))]
        except (OSError, ValueError, TypeError):
            continue  # being replaced, or removed by the master
    return clicks


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by the nearest-rank rule; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def recent_click_projects() -> set[int]:
    """Projects clicked in during the last hour (any worker)."""
    now = time.time()
    return {project for stamp, _, _, project in _all_recent_clicks()
            if isinstance(project, int) and now - stamp <= RECENT_WINDOW_S}


def recent_click_latency(project: int | None = None, now: float | None = None) -> dict[str, dict]:
    """p50/p95 (seconds) and count of the last hour's clicks of each kind, over every worker; one project's
    when ``project`` is given."""
    now = time.time() if now is None else now
    by_kind: dict[str, list[float]] = {kind: [] for kind in CLICK_KINDS}
    for stamp, kind, seconds, clicked in _all_recent_clicks():
        if kind in by_kind and now - stamp <= RECENT_WINDOW_S and (project is None or clicked == project):
            by_kind[kind].append(float(seconds))
    return {kind: {"count": len(values), "p50_s": percentile(values, 0.5), "p95_s": percentile(values, 0.95)}
            for kind, values in by_kind.items()}


# --- sampled gauges -------------------------------------------------------------------------------
class Sampler:
    """Sets the state gauges from the runtime's status every :data:`SAMPLE_S` (a daemon thread per worker)."""

    def __init__(self, gate_status: Callable[[], dict], preencode_status: Callable[[], dict],
                 sam3_status: Callable[[], dict]) -> None:
        self._gate_status = gate_status
        self._preencode_status = preencode_status
        self._sam3_status = sam3_status
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="metrics-sampler", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            for part in (self._sample_gate, self._sample_preencode, self._sample_sam3):
                try:
                    part()
                except Exception:  # a status that cannot be read (Redis down) must not stop the others
                    logger.debug("metrics: %s failed", part.__name__, exc_info=True)
            write_recent_clicks()

    def _sample_gate(self) -> None:
        status = self._gate_status()
        ENCODE_QUEUE.set(status.get("waiting", 0))
        ENCODE_ACTIVE.set(status.get("active", 0))

    def _sample_preencode(self) -> None:
        for project, counts in self._preencode_status().items():
            PREENCODE_BACKLOG.labels(project).set(counts.get("queued", 0) + counts.get("running", 0))

    def _sample_sam3(self) -> None:
        for project, progress in self._sam3_status().get("projects", {}).items():
            for state in ("total", "written", "skipped", "failed"):
                SAM3_TASKS.labels(project, state).set(progress.get(state) or 0)
            SAM3_RUNNING.labels(project).set(1 if progress.get("state") in ("queued", "running") else 0)
