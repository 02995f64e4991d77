"""The retraining coordinator: counts webhooks, starts jobs, coalesces triggers, reports status.

Every decision is one atomic update of the shared :mod:`state`, so any number of gunicorn
threads, backend processes and RQ workers agree that a project runs at most one training at a
time and that triggers arriving meanwhile become a single follow-up run. The webhook path only
updates a counter and maybe hands a job to the executor: it never exports or trains.

A ticker thread re-evaluates the policy every ``tick_s`` (the interval may pass with no new
webhook; the fixed schedule) and reconciles jobs that died without recording their outcome.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ml_backend.retrain.jobs import Executor, JobSpec
from ml_backend.retrain.policy import (
    ANNOTATION_EVENTS,
    DELETION_EVENTS,
    START_TRAINING,
    TrainingPolicy,
    accepted_changes,
    project_key,
)
from ml_backend.retrain.state import ProjectState, StateStore

logger = logging.getLogger(__name__)

HISTORY = 10
TICK_S = 30.0

SpecFactory = Callable[[str, str, str], JobSpec]  # (project, job id, reason) -> spec


@dataclass(frozen=True)
class Decision:
    action: str  # "started", "queued" (coalesced into a follow-up), "counted", "ignored"
    job_id: str | None = None
    reason: str | None = None


class Retrainer:
    def __init__(self, store: StateStore, executor: Executor, make_spec: SpecFactory, *,
                 policy: TrainingPolicy | None, ground_truth_only: bool = False, tick_s: float = TICK_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.executor = executor
        self.make_spec = make_spec
        self.policy = policy
        self.ground_truth_only = ground_truth_only
        self.clock = clock
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if tick_s > 0:
            self._ticker = threading.Thread(target=self._tick_loop, args=(tick_s,), name="retrain-ticker",
                                            daemon=True)
            self._ticker.start()

    @classmethod
    def for_worker(cls, connection, spec: JobSpec) -> "Retrainer":
        """The coordinator an RQ worker uses to record its job and start a coalesced follow-up."""
        from ml_backend.retrain.jobs import RQExecutor
        from ml_backend.retrain.state import RedisStateStore

        def follow_up(project: str, job_id: str, reason: str) -> JobSpec:
            return replace(spec, project=project, job_id=job_id, reason=reason)

        return cls(RedisStateStore(connection), RQExecutor(connection), follow_up, policy=None, tick_s=0)

    def close(self) -> None:
        self._stop.set()

    # --- triggers ------------------------------------------------------------------------------
    def on_webhook(self, event: str, payload: dict) -> dict[str, Any]:
        """Count or start; answers at once (Label Studio waits one second)."""
        if event != START_TRAINING and event not in ANNOTATION_EVENTS | DELETION_EVENTS:
            return {"event": event, "status": "ignored"}
        project = project_key(payload.get("project"))
        if project is None:
            return {"event": event, "status": "ignored", "reason": "no project id in the payload"}
        if event == START_TRAINING:
            decision = self.request(project, "START_TRAINING", forced=True)
        else:
            changes = accepted_changes(event, payload, ground_truth_only=self.ground_truth_only)
            if not changes:
                return {"event": event, "project": project, "status": "ignored",
                        "reason": "not an accepted brush annotation"}
            decision = self.request(project, None, forced=False, changes=changes)
        return {"event": event, "project": project, "status": decision.action, "job_id": decision.job_id,
                "reason": decision.reason}

    def request(self, project: str, reason: str | None, *, forced: bool, changes: int = 0) -> Decision:
        """Add ``changes`` and start a job if forced or due; a forced trigger while running becomes a follow-up."""
        job_id = uuid.uuid4().hex
        now = self.clock()

        def change(state: ProjectState) -> Decision:
            state.changes += changes
            if state.running:
                if forced:
                    state.pending = True
                    return Decision("queued", state.job_id, reason)
                return Decision("counted", state.job_id)
            why = reason if forced else (self.policy.due(state, now) if self.policy else None)
            if why is None:
                return Decision("counted")
            self._mark_started(state, job_id, why, now)
            return Decision("started", job_id, why)

        return self._apply(project, job_id, change)

    def _apply(self, project: str, job_id: str, change: Callable[[ProjectState], Decision]) -> Decision:
        """Apply ``change`` to the project's shared state atomically; submit ``job_id`` if it started it."""
        decision = self.store.update(project, change)
        if decision.action == "started":
            self._submit(project, job_id, decision.reason or "")
        return decision

    def _mark_started(self, state: ProjectState, job_id: str, reason: str, now: float) -> None:
        state.running, state.pending = True, False
        state.job_id, state.job_owner, state.reason = job_id, self.executor.owner, reason
        state.started_at = now
        state.changes = 0  # changes arriving during the run count towards the next one

    def _submit(self, project: str, job_id: str, reason: str) -> None:
        logger.info("project %s: starting training job %s (%s)", project, job_id, reason)
        try:
            self.executor.submit(self.make_spec(project, job_id, reason), self)
        except Exception as exc:  # e.g. Redis down: record it, so the project is not stuck "running"
            logger.exception("project %s: could not start training job %s", project, job_id)
            self.finish(project, job_id, {"status": "failed", "error": f"could not start the job: {exc}"})

    # --- completion ------------------------------------------------------------------------------
    def finish(self, project: str, job_id: str, outcome: dict[str, Any]) -> Decision:
        """Record a job's outcome (once: later calls for the same job do nothing); start the follow-up."""
        next_id = uuid.uuid4().hex
        now = self.clock()

        def change(state: ProjectState) -> Decision:
            if not state.running or state.job_id != job_id:
                return Decision("ignored")
            record = {"job_id": job_id, "reason": state.reason, "started_at": state.started_at,
                      "finished_at": now, **outcome}
            state.running, state.job_owner = False, None
            state.last_finished_at, state.last = now, record
            state.trainings += 1
            if outcome.get("status") == "succeeded":
                state.last_success = record
            state.history = (state.history + [record])[-HISTORY:]
            if state.pending:
                why = "follow-up of triggers during the last run"
            else:
                why = self.policy.due(state, now) if self.policy else None
            if why is None:
                return Decision("finished")
            self._mark_started(state, next_id, why, now)
            return Decision("started", next_id, why)

        return self._apply(project, next_id, change)

    def reconcile(self, project: str) -> None:
        """Record a failure for a running job that can no longer finish (its worker died)."""
        state = self.store.get(project)
        if not state.running or state.job_id is None:
            return
        try:
            why = self.executor.lost(state.job_id, state.job_owner)
        except Exception:
            logger.warning("project %s: could not check job %s", project, state.job_id, exc_info=True)
            return
        if why is not None:
            logger.error("project %s: training job %s failed: %s", project, state.job_id, why)
            self.finish(project, state.job_id, {"status": "failed", "error": why})

    # --- periodic ------------------------------------------------------------------------------
    def tick(self) -> None:
        for project in self.store.projects():
            self.reconcile(project)
            if self.policy is not None:
                self.request(project, None, forced=False)

    def _tick_loop(self, tick_s: float) -> None:
        while not self._stop.wait(tick_s):
            try:
                self.tick()
            except Exception:  # the ticker must survive a Redis hiccup or a full disk
                logger.exception("retraining ticker failed; retrying in %.0f s", tick_s)

    # --- status ------------------------------------------------------------------------------
    def status(self, project: str | None) -> dict[str, Any]:
        """``/is_training``: one project's state (reconciled first), or every project's."""
        key = project_key(project) if project is not None else None
        if key is None:
            projects = {p: self._describe(p) for p in self.store.projects()}
            return {"is_training": any(p["is_training"] for p in projects.values()), "projects": projects}
        return {"project": key, **self._describe(key)}

    def _describe(self, project: str) -> dict[str, Any]:
        self.reconcile(project)
        state = self.store.get(project)
        return {
            "is_training": state.running,
            "job_id": state.job_id if state.running else None,
            "reason": state.reason if state.running else None,
            "started_at": state.started_at if state.running else None,
            "follow_up_queued": state.pending,
            "accepted_changes": state.changes,
            "trainings": state.trainings,
            "last": state.last,
            "last_success": state.last_success,
            "history": state.history,
        }
