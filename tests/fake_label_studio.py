"""A stand-in for Label Studio's export API and uploads, for job tests without the real server.

Serves ``GET /api/projects/<id>`` (the labeling config), ``GET /api/projects/<id>/export`` (the
tasks; optionally held until the test releases it), ``GET /api/tasks`` (paged; a page past the
end answers 404 as Label Studio does) and ``GET /data/upload/...`` images, and
checks the ``Authorization: Token`` header as Label Studio does.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import numpy as np
from PIL import Image

from ml_backend.brush import encode_rle

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Pet"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Pet"/></KeyPointLabels>
</View>"""
TOKEN = "f" * 40


def pet_image(index: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A smooth background with a bright disc (the "pet") at a position that varies with ``index``."""
    y, x = np.mgrid[0:size, 0:size]
    cy, cx = size * (0.35 + 0.3 * ((index * 7) % 5) / 4), size * (0.35 + 0.3 * ((index * 3) % 5) / 4)
    mask = (y - cy) ** 2 + (x - cx) ** 2 <= (size / 5) ** 2
    image = np.stack([x * 3 + 20, y * 3 + 30, np.full_like(x, 60)], axis=-1).astype(np.uint8)
    image[mask] = (230, 200, 40)
    return image, mask


def brush_result(mask: np.ndarray) -> dict:
    height, width = mask.shape
    return {"id": "r1", "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": width,
            "original_height": height, "value": {"format": "rle", "rle": encode_rle(mask), "brushlabels": ["Pet"]}}


@dataclass
class FakeLabelStudio:
    url: str
    tasks: list[dict]
    images: dict[str, bytes]
    hold_export: threading.Event | None = None  # export waits until this is set
    export_requested: threading.Event = field(default_factory=threading.Event)


@contextmanager
def fake_label_studio(n_tasks: int = 6, size: int = 32, hold_export: bool = False) -> Iterator[FakeLabelStudio]:
    tasks, images = [], {}
    for i in range(n_tasks):
        image, mask = pet_image(i, size)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        images[f"/data/upload/1/pet-{i}.png"] = buffer.getvalue()
        tasks.append({"id": i + 1, "data": {"image": f"/data/upload/1/pet-{i}.png"}, "annotations": [
            {"id": 100 + i, "result": [brush_result(mask)], "was_cancelled": False, "ground_truth": False,
             "updated_at": "2026-11-25T10:00:00Z"}]})
    state = FakeLabelStudio("", tasks, images, threading.Event() if hold_export else None)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.headers.get("Authorization") != f"Token {TOKEN}":
                return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
            path = self.path.split("?", 1)[0]
            if path.startswith("/api/projects/") and path.endswith("/export"):
                state.export_requested.set()
                if state.hold_export is not None:
                    state.hold_export.wait(120)
                return self._send(200, json.dumps(state.tasks).encode())
            if path.startswith("/api/projects/"):
                return self._send(200, json.dumps({"id": 1, "label_config": LABEL_CONFIG}).encode())
            if path == "/api/tasks":  # paged like Label Studio's task list
                query = parse_qs(self.path.split("?", 1)[1] if "?" in self.path else "")
                page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
                listed = [{"id": t["id"], "data": t["data"]} for t in state.tasks[(page - 1) * size: page * size]]
                if not listed:
                    return self._send(404, b'{"detail": "Invalid page."}')
                return self._send(200, json.dumps({"tasks": listed, "total": len(state.tasks)}).encode())
            if path in state.images:
                return self._send(200, state.images[path], "image/png")
            return self._send(404, b'{"detail": "Not found."}')

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        if state.hold_export is not None:
            state.hold_export.set()
        server.shutdown()
        server.server_close()
