"""Interactive encodes before background ones, inside one process.

A click on an image that is not ready encodes at once; background pre-encoding starts its
next image only when no interactive encode is running. (An encode already under way is
not interrupted: torch cannot preempt it.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class EncodePriority:
    def __init__(self) -> None:
        self._idle = threading.Condition()
        self._interactive = 0

    @contextlib.contextmanager
    def interactive(self) -> Iterator[None]:
        with self._idle:
            self._interactive += 1
        try:
            yield
        finally:
            with self._idle:
                self._interactive -= 1
                self._idle.notify_all()

    @property
    def interactive_in_flight(self) -> int:
        return self._interactive

    def wait_for_interactive(self, timeout_s: float | None = None) -> bool:
        """Block while interactive encodes run; False if still busy after ``timeout_s``."""
        with self._idle:
            return self._idle.wait_for(lambda: self._interactive == 0, timeout=timeout_s)
