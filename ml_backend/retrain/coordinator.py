"""The retraining coordinator: counts webhooks, starts jobs, coalesces triggers, reports status.

Every decision is one atomic update of the shared :mod:`state`, so any number of gunicorn
threads, backend processes and RQ workers agree that a project runs at most one training at a
time and that triggers arriving meanwhile become a single follow-up run, which still waits for
the minimum interval and any back-off. The webhook path only updates a counter and maybe hands a
job to the executor: it never exports or trains.

When the shared state cannot be written (Redis down), a webhook's change is kept in this
process under a unique id and answered at once; it is applied when the state is back (next
webhook or tick). The state remembers the ids it applied, so a change replayed after an
ambiguous failure is counted once.

A ticker thread re-evaluates the policy every ``tick_s`` (the interval may pass with no new
webhook; the fixed schedule; back-off), reconciles jobs that died without recording their
outcome (killed workers, restarted backends, in-process timeouts) and applies kept changes.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ml_backend import metrics
from ml_backend.retrain.jobs import Executor
from ml_backend.retrain.policy import (
    ANNOTATION_EVENTS,
    DELETION_EVENTS,
    START_TRAINING,
    Changes,
    TrainingPolicy,
    accepted_changes,
    project_key,
)
from ml_backend.retrain.spec import JobSpec
from ml_backend.retrain.state import ProjectState, StateStore, StateStoreError

logger = logging.getLogger(__name__)

HISTORY = 10
TICK_S = 30.0
UNSENT_MAX = 100_000  # changes kept while the shared state is unreachable

SpecFactory = Callable[[int, str, str], JobSpec]  # (project, job id, reason) -> spec


@dataclass(frozen=True)
class Decision:
    # "started", "queued" (coalesced into a follow-up), "counted", "refused" (forced but impossible),
    # "kept" (shared state unreachable: applied later), "finished", "ignored"
    action: str
    job_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class _Unsent:
    project: int
    change_id: str
    changes: Changes


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
        self._unsent: list[_Unsent] = []
        self._unsent_lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if tick_s > 0:
            self._ticker = threading.Thread(target=self._tick_loop, args=(tick_s,), name="retrain-ticker",
                                            daemon=True)
            self._ticker.start()

    @classmethod
    def for_worker(cls, connection, spec: JobSpec) -> "Retrainer":
        """The coordinator an RQ worker uses to record its job's outcome (the backend starts follow-ups)."""
        from ml_backend.retrain.jobs import RQExecutor
        from ml_backend.retrain.state import RedisStateStore

        def follow_up(project: int, job_id: str, reason: str) -> JobSpec:
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
            if not changes.count:
                return {"event": event, "project": project, "status": "ignored",
                        "reason": "not an accepted brush annotation"}
            decision = self._count(_Unsent(project, uuid.uuid4().hex, changes))
        return {"event": event, "project": project, "status": decision.action, "job_id": decision.job_id,
                "reason": decision.reason}

    def _count(self, unsent: _Unsent) -> Decision:
        """Keep the change, then apply every kept change in order; this one's decision, or "kept"."""
        with self._unsent_lock:
            if len(self._unsent) >= UNSENT_MAX:
                dropped = self._unsent.pop(0)
                logger.error("project %s: dropped a kept annotation change: the retraining state has been "
                             "unreachable for %d changes", dropped.project, UNSENT_MAX)
            self._unsent.append(unsent)
        decisions = self.flush()
        if unsent.change_id in decisions:
            return decisions[unsent.change_id]
        return Decision("kept", reason="the retraining state is unreachable; the change is kept and counted once it "
                                       "is back")

    def flush(self) -> dict[str, Decision]:
        """Apply the kept changes in order until the shared state fails; their decisions by change id."""
        decisions: dict[str, Decision] = {}
        with self._unsent_lock:
            pending = list(self._unsent)
        for unsent in pending:
            try:
                decisions[unsent.change_id] = self.request(unsent.project, None, forced=False,
                                                           changes=unsent.changes, change_id=unsent.change_id)
            except StateStoreError as exc:
                logger.warning("retraining state unavailable; %d annotation change(s) kept for later: %s",
                               len(pending) - len(decisions), exc.message)
                break
            with self._unsent_lock:
                self._unsent = [u for u in self._unsent if u.change_id != unsent.change_id]
        return decisions

    def request(self, project: int, reason: str | None, *, forced: bool, changes: Changes | None = None,
                change_id: str | None = None) -> Decision:
        """Add ``changes`` and start a job if forced or due; a forced trigger while running becomes a follow-up.

        ``change_id`` makes applying ``changes`` idempotent (a replay after an ambiguous failure).
        """
        job_id = uuid.uuid4().hex
        now = self.clock()

        def change(state: ProjectState) -> Decision:
            if change_id is not None:
                if change_id in state.applied:
                    return Decision("counted", reason="already counted")
                state.mark_applied(change_id)
            if changes is not None:
                state.changes += changes.count
                state.add_tasks(list(changes.added), list(changes.removed))
            if state.running:
                if forced:
                    state.pending = True
                    return Decision("queued", state.job_id, reason)
                return Decision("counted", state.job_id)
            if forced:
                blocked = self.policy.blocker(state, now, forced=True) if self.policy else None
                if blocked is not None:
                    return Decision("refused", reason=blocked)
                why = reason
            else:
                why = self.policy.due(state, now) if self.policy else None
            if why is None:
                return Decision("counted", reason=self.policy.explain(state, now) if self.policy else None)
            self._mark_started(state, job_id, why, now)
            return Decision("started", job_id, why)

        return self._apply(project, job_id, change)

    def _apply(self, project: int, job_id: str, change: Callable[[ProjectState], Decision]) -> Decision:
        """Apply ``change`` to the project's shared state atomically; submit ``job_id`` if it started it."""
        decision = self.store.update(project, change)
        if decision.action == "started":
            self._submit(project, job_id, decision.reason or "")
        return decision

    def _mark_started(self, state: ProjectState, job_id: str, reason: str, now: float) -> None:
        state.running, state.pending, state.retry = True, False, False
        state.job_id, state.job_owner, state.reason = job_id, self.executor.owner, reason
        state.started_at = now
        state.started_changes, state.changes = state.changes, 0  # changes during the run count towards the next
        state.run_tasks = []

    def _submit(self, project: int, job_id: str, reason: str) -> None:
        logger.info("project %s: starting training job %s (%s)", project, job_id, reason)
        try:
            self.executor.submit(self.make_spec(project, job_id, reason), self.finish)
        except Exception as exc:  # e.g. Redis down, queue full: record it, so the project is not stuck "running"
            logger.exception("project %s: could not start training job %s", project, job_id)
            self.finish(project, job_id, {"status": "failed", "error": f"could not start the job: {exc}"})

    # --- completion ------------------------------------------------------------------------------
    def finish(self, project: int, job_id: str, outcome: dict[str, Any]) -> Decision:
        """Record a job's outcome (once: later calls for the same job do nothing); start a due follow-up."""
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
            status = outcome.get("status")
            if isinstance(outcome.get("usable"), int):
                state.usable = outcome["usable"]
            if isinstance(outcome.get("tasks"), list):
                state.exported([t for t in outcome["tasks"] if isinstance(t, int)])
            state.run_tasks = []
            if status == "succeeded":
                state.last_success = record
                state.failures, state.retry = 0, False
            elif status == "not_enough_data":  # nothing to retry until new data arrives
                state.failures, state.retry = 0, False
                state.changes += state.started_changes
            else:
                state.failures += 1
                state.retry = True
                state.changes += state.started_changes
            state.started_changes = 0
            state.history = (state.history + [record])[-HISTORY:]
            why = self.policy.due(state, now) if self.policy else None
            if why is None:
                return Decision("finished")
            self._mark_started(state, next_id, why, now)
            return Decision("started", next_id, why)

        decision = self._apply(project, next_id, change)
        if decision.action != "ignored":  # counted once, by the process that recorded it
            metrics.training_finished(outcome)
        return decision

    def reconcile(self, project: int) -> None:
        """Record a failure for a running job that can no longer finish (its worker died, it timed out)."""
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

    def start_if_due(self, project: int) -> None:
        """Start the project's training if the policy says it is due (reading first: most calls write nothing)."""
        if self.policy is not None and self.policy.due(self.store.get(project), self.clock()) is not None:
            self.request(project, None, forced=False)

    # --- periodic ------------------------------------------------------------------------------
    def tick(self) -> None:
        self.flush()
        for project in self.store.projects():
            self.reconcile(project)
            self.start_if_due(project)

    def _tick_loop(self, tick_s: float) -> None:
        while not self._stop.wait(tick_s):
            try:
                self.tick()
            except Exception:  # the ticker must survive a Redis hiccup or a full disk
                logger.exception("retraining ticker failed; retrying in %.0f s", tick_s)

    # --- status ------------------------------------------------------------------------------
    def status(self, project: object | None) -> dict[str, Any]:
        """``/is_training``: one project's state (reconciled first), or every project's."""
        key = project_key(project) if project is not None else None
        if key is None:
            projects = {str(p): self._describe(p) for p in self.store.projects()}
            return {"is_training": any(p["is_training"] for p in projects.values()), "projects": projects,
                    "changes_kept": len(self._unsent)}
        return {"project": key, **self._describe(key)}

    def _describe(self, project: int) -> dict[str, Any]:
        self.reconcile(project)
        self.start_if_due(project)
        state = self.store.get(project)
        now = self.clock()
        waiting_for_slot = getattr(self.executor, "waiting", None)
        retry_after = self.policy.retry_after(state) if self.policy else None
        return {
            "is_training": state.running,
            "job_id": state.job_id if state.running else None,
            "reason": state.reason if state.running else None,
            "started_at": state.started_at if state.running else None,
            "waiting_for_slot": bool(state.running and waiting_for_slot and waiting_for_slot(state.job_id)),
            "not_training_because": self.policy.explain(state, now) if self.policy else None,
            "follow_up_queued": state.pending,
            "accepted_changes": state.changes,
            "annotated_tasks_known": len(state.tasks),
            "consecutive_failures": state.failures,
            "retry_after": retry_after if state.retry else None,
            "trainings": state.trainings,
            "last": state.last,
            "last_success": state.last_success,
            "history": state.history,
        }
