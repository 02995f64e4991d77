"""Helpers for tests that start servers and workers: ports, waiting, stopping."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]


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


def start_gunicorn_backend(env: Mapping[str, str], log: Path, *, port: int | None = None,
                  new_session: bool = False) -> tuple[subprocess.Popen, str]:
    """``python -m ml_backend serve`` (gunicorn, as the README starts it) on 127.0.0.1 and ``port`` (a free one
    by default), its output appended to ``log``; the process and its URL. ``env`` is the whole environment
    (start from ``os.environ``; ``HOST`` is 127.0.0.1 unless it says otherwise); ``PORT`` is set here. ``new_session`` gives gunicorn's master and
    workers a process group of their own, so a test can kill them all at once. Each caller waits for what it
    needs (``/health``, SAM ready, ``/ready``)."""
    port = port or free_port()
    process = subprocess.Popen([sys.executable, "-m", "ml_backend", "serve"], cwd=REPO,
                               env={"HOST": "127.0.0.1", **env, "PORT": str(port)}, stdout=log.open("ab"),
                               stderr=subprocess.STDOUT, start_new_session=new_session)
    return process, f"http://127.0.0.1:{port}"


class PngServer:
    """Label Studio's /data/upload/ as far as a backend needs it: every GET answers the PNG ``pick(path)`` gives,
    or 404 when it gives None."""

    def __init__(self, pick: Callable[[str], bytes | None]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                data = pick(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
