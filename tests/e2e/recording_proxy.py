"""A loopback HTTP proxy that forwards everything to the backend and records ``/predict`` bodies.

Label Studio is connected to the proxy instead of the backend, so the browser test sees
the exact JSON the real editor makes Label Studio send (the fixtures in
``tests/fixtures/editor`` come from it) without any test-only code in the backend.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


class RecordingProxy:
    """``RecordingProxy(target).start()``; ``.url`` to give Label Studio; ``.predictions`` the recorded
    ``(request body, response status, response body)`` of every ``/predict``, in order."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.predictions: list[tuple[dict, int, dict]] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: pytest shows failures, not traffic
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream = requests.request(self.command, proxy.target + self.path, data=body, headers=headers,
                                            timeout=110)
                if self.path.split("?")[0].rstrip("/") == "/predict":
                    proxy._record(body, upstream)
                self.send_response(upstream.status_code)
                for key, value in upstream.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(upstream.content)))
                self.end_headers()
                self.wfile.write(upstream.content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _record(self, body: bytes, upstream: requests.Response) -> None:
        try:
            answer = upstream.json()
        except ValueError:
            answer = {"raw": upstream.text[:2000]}
        with self._changed:
            self.predictions.append((json.loads(body or b"null"), upstream.status_code, answer))
            self._changed.notify_all()

    def interactive(self) -> list[tuple[dict, int, dict]]:
        """The recorded ``/predict`` calls that carried an interactive context."""
        with self._lock:
            return [p for p in self.predictions if ((p[0].get("params") or {}).get("context") or {}).get("result")
                    is not None]

    def wait_for_count(self, count: int, timeout_s: float) -> list[tuple[dict, int, dict]]:
        """Wait until at least ``count`` interactive calls were recorded; return them all."""
        with self._changed:
            self._changed.wait_for(lambda: len([p for p in self.predictions
                                                if ((p[0].get("params") or {}).get("context") or {})
                                                .get("result") is not None]) >= count, timeout_s)
        return self.interactive()

    def start(self) -> "RecordingProxy":
        threading.Thread(target=self._server.serve_forever, name="recording-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
