"""At most N image encodes at once per process; the rest queue by priority, then arrival.

SAM's image encoder takes every core it is given (seconds per image on a CPU). Eight
annotators opening new images at once must not run eight encodes side by side (each
then takes eight times as long and all miss Label Studio's 100 s); one at a time
answers the first quickly and the rest in turn. A caller who would wait longer than
the bound is refused at once with :class:`EncodeBusyError` (HTTP 503 with
``Retry-After``) instead of timing out; the wait is estimated from the encodes
measured so far. A caller once queued is served even when the estimate was too
hopeful (encodes slow down while other clicks decode), as long as its answer can
still reach the client in time (``answer_within_s``, less one encode): refusing it
then would throw away the wait it already sat through. Without an estimate (no
encode measured yet) the bound is all there is.

Interactive first clicks go before background encodes (warm-up, pre-encoding), which
wait without a bound. A caller waiting for another process or replica to finish encoding
the same image waits outside the slots (:meth:`EncodeGate.waiting_elsewhere`), so this
process's other first clicks do not queue behind it, and is counted there: the status's
``waiting_elsewhere`` and the encode-wait histogram. Decoding (further clicks) never passes through the gate.

Other CPU-bound work shares the slots under its own ``kind`` (SAM 3's image encode and each
of its phrases): every kind's duration is measured apart, so the wait estimate counts the
piece of SAM 3 work holding a slot as what it is, not as a SAM encode. Background work
takes one slot per piece, so a first click waits at most for the piece in progress.

Hand-written because a semaphore has neither priorities nor a wait estimate.

Usage::

    gate = EncodeGate(slots=1, max_wait_s=45, answer_within_s=90)
    with gate.slot():                                   # interactive: bounded wait, may raise
        embedding = engine.embed(image)
    with gate.slot(Priority.BACKGROUND):                # background: waits for free slots
        engine.embed(image)
    with gate.slot(Priority.BACKGROUND, kind="sam3 phrase"):  # another kind of work, timed apart
        ...
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum

from ml_backend import metrics
from ml_backend.errors import BackendError
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

# A first click queued for an encode is served while its answer still fits in Label Studio's 100 s,
# less this much for downloading, decoding, the decoder and the JSON answer.
ENCODE_ANSWER_WITHIN_S = 85.0
EWMA_WEIGHT = 0.3  # weight of the newest measured encode in the running estimate
ENCODE = "encode"  # the kind of a SAM image encode, the gate's first job


class Priority(IntEnum):
    """Lower goes first."""

    INTERACTIVE = 0
    BACKGROUND = 1


class EncodeBusyError(BackendError):
    """Every encode slot is taken for longer than a click may wait: HTTP 503 with ``Retry-After``."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class GateCounters:
    admitted: int = 0
    refused_at_once: int = 0
    refused_after_waiting: int = 0


class Slot:
    """One admitted encode; call :meth:`untimed` when it turned out not to encode (e.g. found in a cache)."""

    def __init__(self, waited_s: float) -> None:
        self.waited_s = waited_s
        self.timed = True

    def untimed(self) -> None:
        self.timed = False


_DEFAULT = object()


class EncodeGate:
    """A priority queue in front of ``slots`` concurrent encodes."""

    @classmethod
    def from_settings(cls, settings: Settings) -> "EncodeGate":
        """``ENCODE_CONCURRENCY`` slots (by device when 0), ``ENCODE_QUEUE_TIMEOUT_S``, Label Studio's answer time."""
        return cls(encode_slots(settings), settings.encode_queue_timeout_s, answer_within_s=ENCODE_ANSWER_WITHIN_S)

    def __init__(self, slots: int, max_wait_s: float, *, answer_within_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if slots < 1:
            raise ValueError(f"an encode gate needs at least one slot (got {slots})")
        self.slots = slots
        self.max_wait_s = max_wait_s
        self.answer_within_s = answer_within_s
        self._clock = clock
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, int]] = []  # heap of (priority, arrival number)
        self._kinds: dict[int, str] = {}  # arrival number -> kind of work, for those waiting or running
        self._arrivals = itertools.count()
        self._active: dict[int, float] = {}  # arrival number -> start time of the work running now
        self._means: dict[str, float] = {}  # kind -> running estimate of one piece's duration
        self._preparing = 0  # interactive callers admitted by :meth:`preparing`, still downloading or decoding
        self._elsewhere = 0  # callers waiting for another process's encode of their image
        self.counters = GateCounters()

    # --- the estimate ---------------------------------------------------------------
    @property
    def _mean_s(self) -> float | None:
        return self._means.get(ENCODE)

    @property
    def mean_encode_s(self) -> float | None:
        """Running estimate of one encode's duration; None before the first was measured."""
        return self._mean_s

    def mean_s(self, kind: str) -> float | None:
        """Running estimate of one piece of ``kind``; None before the first was measured."""
        return self._means.get(kind)

    def _duration_locked(self, number: int) -> float | None:
        """The expected duration of ticket ``number``'s work: its kind's, else a SAM encode's."""
        return self._means.get(self._kinds[number], self._mean_s)

    def _estimate_locked(self, priority: int, extra: int = 0) -> float | None:
        """Seconds until a slot frees for a caller of ``priority`` arriving now (it queues behind the waiting
        callers of its priority or better, and after the work running now, each of its own kind's length;
        ``extra`` more SAM encodes ahead: first clicks still preparing theirs)."""
        ahead = [number for p, number in self._waiting if p <= priority]
        if len(self._active) < self.slots and not ahead and not extra:
            return 0.0
        durations = [self._duration_locked(n) for n in (*self._active, *ahead)] + [self._mean_s] * extra
        if any(d is None for d in durations):
            return None
        now = self._clock()
        free_at = [max(d - (now - start), 0.0) for d, start in zip(durations, self._active.values())]
        free_at += [0.0] * (self.slots - len(free_at))
        heapq.heapify(free_at)
        for duration in durations[len(self._active):]:
            heapq.heapreplace(free_at, free_at[0] + duration)
        return free_at[0]

    def estimated_wait_s(self, priority: Priority = Priority.INTERACTIVE) -> float | None:
        """How long a caller arriving now would wait for a slot (None: no encode measured yet)."""
        with self._cond:
            return self._estimate_locked(int(priority))

    def _give_up_after_locked(self, max_wait_s: float) -> float:
        """How long an admitted caller may wait for its slot: the bound, or longer while its answer (one
        more encode) still fits in ``answer_within_s``."""
        if self.answer_within_s is None or self._mean_s is None:
            return max_wait_s
        return max(max_wait_s, self.answer_within_s - self._mean_s)

    def _ahead_locked(self, priority: int) -> int:
        return sum(1 for p, _ in self._waiting if p <= priority)

    def status(self) -> dict:
        with self._cond:
            return {
                "slots": self.slots,
                "active": len(self._active),
                "waiting": len(self._waiting),
                "waiting_elsewhere": self._elsewhere,
                "mean_encode_s": None if self._mean_s is None else round(self._mean_s, 3),
                "mean_s": {kind: round(mean, 3) for kind, mean in self._means.items()},
                "running": sorted(self._kinds[number] for number in self._active),
                "admitted": self.counters.admitted,
                "refused": self.counters.refused_at_once + self.counters.refused_after_waiting,
            }

    # --- admission ------------------------------------------------------------------
    def _refusal(self, ahead: int, estimate: float | None, max_wait_s: float) -> EncodeBusyError:
        if estimate is not None and estimate > max_wait_s:
            retry_after, work = estimate - max_wait_s, f"about {estimate:.0f} s of work ahead"
        else:  # the wait reached the bound: the queue moves one encode at a time
            retry_after, work = self._mean_s or max_wait_s, f"waited {max_wait_s:.0f} s"
        retry_after_s = max(1, math.ceil(retry_after))
        return EncodeBusyError(
            f"The backend is busy encoding other images ({len(self._active)} running, {ahead} waiting, {work}; "
            f"a click waits at most {max_wait_s:.0f} s). Click again in about {retry_after_s} s.",
            retry_after_s=retry_after_s,
        )

    def check(self, priority: Priority = Priority.INTERACTIVE) -> None:
        """Raise :class:`EncodeBusyError` now if a caller arriving now would be refused (nothing is queued):
        lets a caller skip expensive preparation (download, decoding) of an encode it would not get."""
        with self._cond:
            self._check_locked(int(priority))

    def _check_locked(self, priority: int) -> None:
        ahead = self._ahead_locked(priority) + self._preparing
        estimate = self._estimate_locked(priority, extra=self._preparing)
        if estimate is not None and estimate > self.max_wait_s:
            self.counters.refused_at_once += 1
            metrics.encode_refused("at_once")
            raise self._refusal(ahead, estimate, self.max_wait_s)

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """:meth:`check` for an interactive caller, which then counts as queued while it prepares its encode
        (download, decoding): first clicks arriving together are refused at once, not each after preparing an
        image whose encode would then be refused (seconds per 4000x3000 image on a busy CPU)."""
        with self._cond:
            self._check_locked(int(Priority.INTERACTIVE))
            self._preparing += 1
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= 1

    @contextmanager
    def waiting_elsewhere(self, priority: Priority = Priority.INTERACTIVE) -> Iterator[None]:
        """Count the block as a wait for an encode running in another process or replica: shown in
        :meth:`status` while it lasts, observed as an encode wait of ``priority`` when it ends."""
        with self._cond:
            self._elsewhere += 1
        started = self._clock()
        try:
            yield
        finally:
            with self._cond:
                self._elsewhere -= 1
            metrics.encode_waited(priority.name.lower(), self._clock() - started)

    @contextmanager
    def slot(self, priority: Priority = Priority.INTERACTIVE, *, kind: str = ENCODE,
             max_wait_s: float | None | object = _DEFAULT) -> Iterator[Slot]:
        """Hold one encode slot for the ``with`` block; ``kind`` names the work, timed apart from others.

        ``max_wait_s`` defaults to the gate's bound for interactive callers and to no
        bound (None) for background ones; with a bound, raises :class:`EncodeBusyError`
        at once when the estimated wait exceeds it, or when the wait reaches it.
        """
        if max_wait_s is _DEFAULT:
            max_wait_s = self.max_wait_s if priority == Priority.INTERACTIVE else None
        with self._cond:
            ticket = (int(priority), next(self._arrivals))
            ahead = self._ahead_locked(ticket[0])
            if max_wait_s is not None:
                estimate = self._estimate_locked(ticket[0])
                if estimate is not None and estimate > max_wait_s:
                    self.counters.refused_at_once += 1
                    metrics.encode_refused("at_once")
                    raise self._refusal(ahead, estimate, max_wait_s)
            self._kinds[ticket[1]] = kind
            heapq.heappush(self._waiting, ticket)
            arrived = self._clock()
            while not (len(self._active) < self.slots and self._waiting[0] == ticket):
                remaining = (None if max_wait_s is None
                             else arrived + self._give_up_after_locked(max_wait_s) - self._clock())
                if remaining is not None and remaining <= 0:
                    self._waiting.remove(ticket)
                    del self._kinds[ticket[1]]
                    heapq.heapify(self._waiting)
                    self._cond.notify_all()  # the head may have changed
                    self.counters.refused_after_waiting += 1
                    metrics.encode_refused("after_waiting")
                    raise self._refusal(self._ahead_locked(ticket[0]), None, self._clock() - arrived)
                self._cond.wait(remaining)
            heapq.heappop(self._waiting)
            started = self._clock()
            self._active[ticket[1]] = started
            self.counters.admitted += 1
            self._cond.notify_all()  # the next in line may take another free slot
        slot = Slot(waited_s=started - arrived)
        ok = False
        try:
            yield slot
            ok = True
        finally:
            with self._cond:
                del self._active[ticket[1]]
                del self._kinds[ticket[1]]
                if ok and slot.timed:
                    took = self._clock() - started
                    mean = self._means.get(kind)
                    self._means[kind] = took if mean is None else EWMA_WEIGHT * took + (1 - EWMA_WEIGHT) * mean
                self._cond.notify_all()


def encode_slots(settings: Settings) -> int:
    """ENCODE_CONCURRENCY, or by device: 1 on CPU (an encode takes every core), 2 on a GPU (one
    image's host-side resizing and transfer overlap the other's encode)."""
    if settings.encode_concurrency:
        return settings.encode_concurrency
    if settings.sam_device.startswith("cuda"):
        return 2
    if settings.sam_device == "auto":
        import torch

        return 2 if torch.cuda.is_available() else 1
    return 1
