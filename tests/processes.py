"""Helpers for tests that start servers and workers: ports, waiting, stopping."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """Terminate, then kill if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(check: Callable[[], T], timeout_s: float, what: str, log: Path | None = None,
             interval_s: float = 0.2) -> T:
    """Poll ``check`` until it returns something truthy; fail with the log's tail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    tail = f"\n{log.read_text(errors='replace')[-4000:]}" if log else ""
    raise AssertionError(f"{what} not within {timeout_s} s{tail}")
