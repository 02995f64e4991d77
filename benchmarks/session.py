"""``python -m benchmarks.session``: annotators working through a project, with and without pre-encoding.

One or more simulated annotators go through a project of 4000x3000 images in Label Studio's
order against the backend under gunicorn (started as the README does: ``python -m ml_backend
serve``), base-size random SAM: open a task (Label Studio's automatic ``/predict``), first click
after ``--pause`` seconds, ``--clicks`` refinement clicks, next task after ``--think`` seconds.
The same work runs twice, side by side: pre-encoding on (the default) and off (what the
backend did before). Reported: the share of first clicks answered from a ready embedding (in
the shared store when the click is sent), first-click p50/p95, further-click p50.

Two more checks: after a restart of the backend every stored image is served without encoding
(``images_encoded`` stays 0), and with two gunicorn workers pre-encoding the same project no
image is encoded twice (the backend's "encoded image" log lines, counted per image).

A small stand-in for Label Studio's task API serves the project (the images are local files
under ``LOCAL_FILES_DOCUMENT_ROOT``); the end-to-end tests use the real Label Studio.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import requests

import ml_backend  # noqa: F401  (selects the torch backend before keras is imported)

LABEL_CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
<KeyPointLabels name="click" toName="image" smart="true"><Label value="Object"/></KeyPointLabels></View>"""
TOKEN = "b" * 40
PROJECT = 1
REPO = Path(__file__).resolve().parents[1]
PRESET_CACHE = Path.home() / ".cache" / "sam-trimap-backend" / "bench-presets"


def ensure_preset(quick: bool) -> Path:
    """A random-weight SAM saved as a keras-hub preset once (base size: 375 MB), reused by later runs."""
    import keras

    from benchmarks.sam import base_architecture, quick_architecture
    from ml_backend.sam.convert import build_segmenter

    directory = PRESET_CACHE / ("quick-random-0" if quick else "base-random-0")
    if not (directory / "config.json").is_file():
        keras.utils.set_random_seed(0)
        build_segmenter(quick_architecture() if quick else base_architecture()).save_to_preset(str(directory))
    return directory


def write_images(root: Path, count: int, size: tuple[int, int]) -> list[dict]:
    from PIL import Image

    from benchmarks.sam import synthetic_image

    (root / "images").mkdir(parents=True, exist_ok=True)
    tasks = []
    for i in range(count):
        Image.fromarray(synthetic_image(size[0], size[1], seed=i)).save(root / "images" / f"{i}.jpg", quality=92)
        tasks.append({"id": i + 1, "project": PROJECT, "data": {"image": f"/data/local-files/?d=images/{i}.jpg"}})
    return tasks


def serve_task_api(tasks: list[dict], images: Path) -> ThreadingHTTPServer:
    """Label Studio's project, paged task list and the project's local storage (``images``), nothing else."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            from urllib.parse import parse_qs, urlsplit

            parts = urlsplit(self.path)
            if self.headers.get("Authorization") != f"Token {TOKEN}":
                body, status = {"detail": "no token"}, 401
            elif parts.path == f"/api/projects/{PROJECT}":
                body, status = {"id": PROJECT, "label_config": LABEL_CONFIG}, 200
            elif parts.path == "/api/tasks":
                query = parse_qs(parts.query)
                page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
                listed = tasks[(page - 1) * size: page * size]
                body, status = ({"tasks": listed, "total": len(tasks)}, 200) if listed else ({"detail": "page"}, 404)
            elif parts.path == "/api/storages/localfiles":  # the backend reads a project's local files only in these
                body, status = [{"id": 1, "project": PROJECT, "path": str(images)}], 200
            else:
                body, status = {"detail": "not found"}, 404
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Backend:
    """``python -m ml_backend serve`` (gunicorn) with the given settings."""

    def __init__(self, root: Path, name: str, env: dict[str, str]) -> None:
        sys.path.insert(0, str(REPO / "tests"))
        from processes import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"backend-{name}.log"
        full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "THREADS": "8", "LOG_LEVEL": "INFO",
                    "PYTHONPATH": str(REPO), **env}
        self.process = subprocess.Popen([sys.executable, "-m", "ml_backend", "serve"], cwd=REPO, env=full_env,
                                        stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"backend exited:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=5).json()["sam"]["state"] == "ready":
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(1)
        raise RuntimeError("backend not ready in 900 s")

    def status(self) -> dict:
        return requests.get(self.url + "/status", timeout=30).json()

    def post(self, path: str, body: dict) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=600)

    def stop(self) -> None:
        sys.path.insert(0, str(REPO / "tests"))
        from processes import stop

        stop(self.process, timeout_s=30)


def keypoint(index: int, width: int, height: int) -> dict:
    return {"original_width": width, "original_height": height, "image_rotation": 0, "from_name": "click",
            "to_name": "image", "type": "keypointlabels", "is_positive": True,
            "value": {"x": 30 + 3 * index, "y": 40 + 2 * index, "width": 0.5, "keypointlabels": ["Object"]}}


def click(backend: Backend, task: dict, points: list[dict]) -> float:
    started = time.perf_counter()
    response = backend.post("/predict", {"tasks": [task], "label_config": LABEL_CONFIG,
                                         "project": f"{PROJECT}.1", "params": {"context": {"result": points}}})
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or not response.json()["results"][0]["result"]:
        raise RuntimeError(f"click failed: {response.status_code} {response.text[:300]}")
    return elapsed


def stored(store: Path, key: str) -> bool:
    return any(store.glob(f"*/emb/{key}.safetensors"))


def annotate(backend: Backend, tasks: list[dict], keys: dict[int, str], store: Path, args, size) -> dict:
    """The annotators' session; per first click whether its embedding was ready, and all latencies."""
    height, width = size
    backend.post("/setup", {"project": f"{PROJECT}.{int(time.time())}", "schema": LABEL_CONFIG,
                            "hostname": "", "access_token": ""})
    first, further, ready = [], [], []
    lock = threading.Lock()

    def annotator(index: int) -> None:
        for task in tasks[index:: args.annotators]:
            backend.post("/predict", {"tasks": [task], "label_config": LABEL_CONFIG})  # opening the task
            time.sleep(args.pause)
            was_ready = stored(store, keys[task["id"]])
            points = [keypoint(0, width, height)]
            took = click(backend, task, points)
            later = []
            for n in range(1, args.clicks + 1):
                time.sleep(args.click_gap)
                points = points + [keypoint(n, width, height)]
                later.append(click(backend, task, points))
            with lock:
                first.append(took)
                further.extend(later)
                ready.append(was_ready)
            time.sleep(args.think)

    threads = [threading.Thread(target=annotator, args=(i,)) for i in range(args.annotators)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"first_clicks_ready": sum(ready) / len(ready), "first_click_p50_s": statistics.median(first),
            "first_click_p95_s": float(np.percentile(first, 95)), "further_click_p50_s": statistics.median(further),
            "first_clicks": len(first)}


def encoded_per_image(log: Path) -> collections.Counter:
    return collections.Counter(re.findall(r"encoded image ([0-9a-f]{12}) in", log.read_text(errors="replace")))


def run(args) -> dict:
    from ml_backend.images import load_image_file
    from ml_backend.sam.engine import image_key

    size = (480, 640) if args.quick else (3000, 4000)
    preset = ensure_preset(args.quick)
    report: dict = {"images": args.images, "size": f"{size[1]}x{size[0]}", "annotators": args.annotators,
                    "pause_s": args.pause, "think_s": args.think, "refinement_clicks": args.clicks,
                    "model": "quick random SAM" if args.quick else "base-size random SAM (vit_b shapes)"}
    with tempfile.TemporaryDirectory(prefix="session-bench-") as tmp:
        root = Path(tmp)
        tasks = write_images(root, args.images, size)
        keys = {t["id"]: image_key(load_image_file(root / "images" / f"{t['id'] - 1}.jpg", max_pixels=10**8))
                for t in tasks}
        server = serve_task_api(tasks, root / "images")
        base_env = {"SAM_MODEL": str(preset), "SAM_DEVICE": getattr(args, "device", "cpu"), "LABEL_STUDIO_URL": f"http://127.0.0.1:{server.server_address[1]}",
                    "LABEL_STUDIO_API_KEY": TOKEN, "LOCAL_FILES_DOCUMENT_ROOT": str(root), "MODEL_DIR": str(root / "models"),
                    "IMAGE_CACHE_DIR": str(root / "image-cache"), "PREENCODE_LOOKAHEAD": str(args.lookahead)}
        for mode in ("on", "off"):
            store = root / f"store-{mode}"
            env = {**base_env, "EMBEDDING_STORE_DIR": str(store), "PREENCODE": "true" if mode == "on" else "false",
                   "WORKERS": "1"}
            backend = Backend(root, mode, env)
            try:
                report[f"preencode_{mode}"] = annotate(backend, tasks, keys, store, args, size)
                report[f"preencode_{mode}"]["images_encoded"] = backend.status()["sam"]["images_encoded"]
            finally:
                backend.stop()
            print(f"pre-encoding {mode}: {report[f'preencode_{mode}']}", file=sys.stderr)
            if mode == "on":  # restart on the same store: every stored image without encoding
                backend = Backend(root, "restarted", env)
                try:
                    stored_ids = [t for t in tasks if stored(store, keys[t["id"]])]
                    for task in stored_ids:
                        click(backend, task, [keypoint(0, size[1], size[0])])
                    report["restart"] = {"stored_images": len(stored_ids),
                                         "served_without_encoding": len(stored_ids) - backend.status()["sam"]["images_encoded"]}
                finally:
                    backend.stop()
                print(f"restart: {report['restart']}", file=sys.stderr)
        if args.two_workers_images:
            store = root / "store-two-workers"
            env = {**base_env, "EMBEDDING_STORE_DIR": str(store), "PREENCODE": "true", "WORKERS": "2"}
            subset = tasks[: args.two_workers_images]
            backend = Backend(root, "two-workers", env)
            try:
                for _ in range(6):  # Label Studio calls /setup often; gunicorn hands them to either worker
                    backend.post("/setup", {"project": f"{PROJECT}.{int(time.time())}", "schema": LABEL_CONFIG})
                for task in subset:  # an annotator opens tasks while both workers pre-encode
                    backend.post("/predict", {"tasks": [task], "label_config": LABEL_CONFIG})
                    click(backend, task, [keypoint(0, size[1], size[0])])
                deadline = time.monotonic() + 3600
                while not all(stored(store, keys[t["id"]]) for t in tasks) and time.monotonic() < deadline:
                    time.sleep(2)
                time.sleep(2)
                counts = encoded_per_image(backend.log)
                report["two_workers"] = {"images": len(tasks), "encodes": sum(counts.values()),
                                         "distinct_images_encoded": len(counts),
                                         "encoded_twice": sum(1 for n in counts.values() if n > 1)}
            finally:
                backend.stop()
            print(f"two workers: {report['two_workers']}", file=sys.stderr)
        server.shutdown()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.session", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20, help="tasks in the project (20)")
    parser.add_argument("--annotators", type=int, default=1, help="simulated annotators (1)")
    parser.add_argument("--pause", type=float, default=5.0, help="seconds from opening a task to the first click (5)")
    parser.add_argument("--clicks", type=int, default=3, help="refinement clicks after the first (3)")
    parser.add_argument("--click-gap", type=float, default=1.0, help="seconds between clicks (1)")
    parser.add_argument("--think", type=float, default=30.0, help="seconds before opening the next task (30)")
    parser.add_argument("--lookahead", type=int, default=3, help="PREENCODE_LOOKAHEAD (3)")
    parser.add_argument("--two-workers-images", type=int, default=20,
                        help="images for the two-worker check (0 skips it)")
    parser.add_argument("--quick", action="store_true", help="small SAM and 640x480 images (a smoke run)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    on, off = report["preencode_on"], report["preencode_off"]
    print(f"{report['model']}, {report['images']} images of {report['size']}, {report['annotators']} annotator(s), "
          f"pause {report['pause_s']:g} s, think {report['think_s']:g} s, {report['refinement_clicks']} refinement clicks")
    print(f"{'':32}{'pre-encoding on':>18}{'off (before)':>18}")
    print(f"{'first clicks ready':32}{on['first_clicks_ready']:>17.0%} {off['first_clicks_ready']:>17.0%}")
    for name in ("first_click_p50_s", "first_click_p95_s", "further_click_p50_s"):
        print(f"{name.replace('_s', ' (s)').replace('_', ' '):32}{on[name]:>18.3f}{off[name]:>18.3f}")
    print(f"{'first p50 / further p50':32}{on['first_click_p50_s'] / on['further_click_p50_s']:>18.2f}"
          f"{off['first_click_p50_s'] / off['further_click_p50_s']:>18.2f}")
    restart = report["restart"]
    print(f"after a restart: {restart['served_without_encoding']}/{restart['stored_images']} stored images served "
          "without encoding")
    if "two_workers" in report:
        two = report["two_workers"]
        print(f"two gunicorn workers: {two['encodes']} encodes for {two['images']} images, "
              f"{two['encoded_twice']} encoded twice")
    return 0


if __name__ == "__main__":
    sys.exit(main())
