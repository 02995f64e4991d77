"""Attacks on the backend as the README starts it (``python -m ml_backend serve`` under gunicorn).

A stand-in Label Studio holds the real token; a trap listener on loopback records everything that
reaches it. Every attack class of issue 9 (and the ones found since) is thrown at batch and
interactive ``/predict``, ``/setup``, ``/webhook``, ``/train`` and ``/warmup``. Afterwards:
the trap never saw the token, Label Studio saw it only on the paths that need it, every answer was
a 4xx JSON (or an empty batch prediction) without a traceback, ``/health`` still answers, and the
worker's peak memory (VmHWM) stayed within :data:`RSS_BUDGET_MB`. ``ATTACKS`` (printed with ``-s``)
is the table in SECURITY.md.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from ml_backend.brush import encode_rle
from ml_backend.security.auth import SECRET_HEADER
from processes import free_port, start_gunicorn_backend, stop, wait_for

REPO = Path(__file__).resolve().parents[1]
TOKEN = "5ec7e7" + "ab" * 17  # 40 hex characters, as Label Studio's legacy tokens
USER, PASSWORD = "ls", "pässwörd-123"
RSS_BUDGET_MB = 1536  # the worker's peak resident memory over the whole attack run (tiny SAM, torch, Keras)
MAX_REQUEST_MB = 4
LABEL_CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Pet"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Pet"/></KeyPointLabels>
<RectangleLabels name="rect" toName="image" smart="true"><Label value="Pet"/></RectangleLabels></View>"""
# Paths where Label Studio legitimately receives the token from the backend.
TOKEN_PATHS = ("/api/projects/", "/api/tasks", "/api/webhooks/", "/api/storages/localfiles", "/data/upload/")


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels) if mode == "RGB" else Image.new(mode, (width, height))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Recorder:
    """A loopback HTTP server that records (method, path, headers) and answers like a file server."""

    label: str
    routes: dict[str, tuple[int, bytes, str]] = field(default_factory=dict)
    seen: list[tuple[str, str, dict]] = field(default_factory=list)
    url: str = ""

    def start(self) -> ThreadingHTTPServer:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.seen.append((self.command, self.path, {**dict(self.headers), "_body": body[:2000]}))
                path = self.path.split("?", 1)[0]  # a route may name its query too: that one first
                status, payload, kind = recorder.routes.get(self.path, recorder.routes.get(path, (200, png(8, 8),
                                                                                                   "image/png")))
                if recorder.label == "label-studio" and self.headers.get("Authorization") != f"Token {TOKEN}":
                    status, payload, kind = 401, b'{"detail": "no"}', "application/json"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_PUT = _answer  # noqa: N815

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def token_requests(self) -> list[tuple[str, str]]:
        return [(method, path) for method, path, headers in self.seen
                if any(TOKEN in str(v) for v in headers.values()) or TOKEN in path]


def rle_header(width: int, height: int, payload: bytes) -> list[int]:
    """A brush RLE list whose header declares ``width`` x ``height`` RGBA values, then ``payload``."""
    header = (width * height * 4) << 24 | (7 << 19) | (2 << 15) | (3 << 11) | (7 << 7) | (15 << 3)
    return list(header.to_bytes(7, "big")) + list(payload)


def malicious_export(ls_url: str, trap_url: str) -> list[dict]:
    """Tasks whose accepted annotations attack the export a training job runs."""
    def task(i: int, result: list, image: str | None = None) -> dict:
        return {"id": i, "data": {"image": image or f"/data/upload/1/pet-{i}.png"},
                "annotations": [{"id": 100 + i, "result": result, "was_cancelled": False, "ground_truth": False}]}

    def brush(value: dict, width, height) -> dict:
        return {"type": "brushlabels", "from_name": "mask", "to_name": "image", "original_width": width,
                "original_height": height, "value": {"format": "rle", "brushlabels": ["Pet"], **value}}

    full = np.ones((4000, 6000), bool)
    return [
        task(1, [brush({"rle": rle_header(32767, 32768, os.urandom(1 << 20))}, 32767, 32768)]),  # 1 MB, 4 GiB declared
        task(2, [brush({"rle": encode_rle(full)}, 6000, 4000)]),  # within MAX_IMAGE_PIXELS: decoded, then resized
        task(3, [brush({"rle": [1, 2, 3], "brushlabels": 5}, 8, 8)]),
        task(4, [brush({"rle": [0] * 10}, float("inf"), 8)]),
        task(5, [brush({"rle": [0] * 10}, 10**400, 8)]),
        task(6, [brush({"rle": [{"a": 1}], "brushlabels": ["Pet"]}, 8, 8)]),
        task(7, [brush({"rle": "not a list"}, 8, 8)]),
        task(8, [{"to_name": ["unhashable"], "type": "brushlabels", "value": {"rle": []}}]),
        task(9, [brush({"rle": encode_rle(np.ones((8, 8), bool))}, 8, 8)],
             image=f"{trap_url}\\@{ls_url.split('//', 1)[1]}/data/upload/1/x.png"),
        task(10, [brush({"rle": encode_rle(np.ones((8, 8), bool))}, 8, 8)], image="/api/current-user/token"),
    ]


@dataclass
class Attack:
    name: str
    method: str
    path: str
    kwargs: dict
    expect: str  # "4xx", "empty" (a 200 batch answer with no result), "ok"
    outcome: str = ""


def attacks(ls: str, trap: str, auth: tuple[str, str]) -> list[Attack]:
    ls_host = ls.split("//", 1)[1]
    trap_host = trap.split("//", 1)[1]
    small = "data:image/png;base64," + base64.b64encode(png(40, 30)).decode()
    bit_bomb = "data:image/png;base64," + base64.b64encode(png(10000, 10000, mode="1")).decode()

    def task(url: str) -> dict:
        return {"id": 1, "data": {"image": url}}

    def batch(url: str, name: str) -> Attack:
        return Attack(f"batch /predict: {name}", "POST", "/predict",
                      {"json": {"tasks": [task(url)], "label_config": LABEL_CONFIG}, "auth": auth}, "empty")

    def click(url: str, name: str, items: list | None = None, expect: str = "4xx") -> Attack:
        items = items if items is not None else [keypoint(50, 50)]
        return Attack(f"interactive /predict: {name}", "POST", "/predict",
                      {"json": {"tasks": [task(url)], "label_config": LABEL_CONFIG,
                                "params": {"context": {"result": items}}}, "auth": auth}, expect)

    leaks = {
        "backslash before @ (urllib3 connects to the trap)": f"http://{trap_host}\\@{ls_host}/data/upload/1/x.png",
        "userinfo": f"http://{trap_host}@{ls_host}/data/upload/1/x.png",
        "userinfo to the trap": f"http://x:{TOKEN[:4]}@{trap_host}/data/upload/1/x.png",
        "another loopback port": f"{trap}/data/upload/1/x.png",
        "token path on Label Studio": f"{ls}/api/current-user/token",
        "relative token path": "/api/current-user/token",
        "dot-dot to the token path": "/data/upload/../../api/current-user/token",
        "percent-encoded dot-dot": "/data/upload/%2e%2e/%2e%2e/api/current-user/token",
        "scheme-relative to the trap": f"//{trap_host}/data/upload/1/x.png",
        "tab in the host": f"http://{trap_host}\t@{ls_host}/data/upload/1/x.png",
        "file URL": "file:///etc/passwd",
        "gopher": f"gopher://{trap_host}/_x",
    }
    many_rects = [rect(i % 90, 1, 5, 5) for i in range(200)]
    out = [batch(url, name) for name, url in leaks.items()]
    out += [click(url, name) for name, url in leaks.items()]
    out += [
        batch(bit_bomb, "1-bit 10000x10000 PNG (12 KB, 100 M pixels)"),
        click(small, "200 rectangles", many_rects),
        click(small, "coordinate 10**400", [keypoint(10**400, 5)]),
        Attack("interactive /predict: coordinate 1e400 (read as inf)", "POST", "/predict",
               {"data": json.dumps({"tasks": [task(small)], "label_config": LABEL_CONFIG,
                                    "params": {"context": {"result": [keypoint(12345, 5)]}}}).replace("12345", "1e400"),
                "headers": {"Content-Type": "application/json"}, "auth": auth}, "4xx"),
        click(small, "declared 1x1 image, click at 100 % (rescale past the edge)",
              [{**keypoint(100, 100), "original_width": 1, "original_height": 1}], expect="ok"),
        click(small, "declared 10**6 x 10**6 image", [{**keypoint(5, 5), "original_width": 10**6,
                                                      "original_height": 10**6}]),
        Attack("batch /predict: 101 tasks", "POST", "/predict",
               {"json": {"tasks": [task(small)] * 101, "label_config": LABEL_CONFIG}, "auth": auth}, "4xx"),
        Attack(f"/predict: {MAX_REQUEST_MB + 1} MB body", "POST", "/predict",
               {"data": b'{"tasks": ["' + b"x" * ((MAX_REQUEST_MB + 1) << 20) + b'"]}',
                "headers": {"Content-Type": "application/json"}, "auth": auth}, "4xx"),
        Attack("/predict: JSON nested 100000 deep", "POST", "/predict",
               {"data": b"[" * 100000 + b"]" * 100000, "headers": {"Content-Type": "application/json"},
                "auth": auth}, "4xx"),
        Attack("/predict: 5000-digit integer", "POST", "/predict",
               {"data": b'{"tasks": ' + b"9" * 5000 + b"}", "headers": {"Content-Type": "application/json"},
                "auth": auth}, "4xx"),
        Attack("/setup without credentials re-points Label Studio to the trap", "POST", "/setup",
               {"json": {"project": "1.1", "schema": LABEL_CONFIG, "hostname": trap, "access_token": "x"}}, "4xx"),
        Attack("/setup with credentials, bad schema, trap hostname (applied before the 422?)", "POST", "/setup",
               {"json": {"project": "1.1", "schema": "<View/>", "hostname": trap, "access_token": TOKEN},
                "auth": auth}, "4xx"),
        Attack("/setup with credentials, backslash hostname", "POST", "/setup",
               {"json": {"project": "1.1", "schema": LABEL_CONFIG, "hostname": f"http://{trap_host}\\@{ls_host}"},
                "auth": auth}, "4xx"),
        Attack("/setup as a cross-site text/plain form post", "POST", "/setup",
               {"data": json.dumps({"project": "1.1", "schema": LABEL_CONFIG, "hostname": trap}),
                "headers": {"Content-Type": "text/plain"}, "auth": auth}, "4xx"),
        Attack("/webhook without credentials", "POST", "/webhook",
               {"json": {"action": "START_TRAINING", "project": {"id": 7}}}, "4xx"),
        Attack("/webhook with a wrong secret", "POST", "/webhook",
               {"json": {"action": "START_TRAINING", "project": {"id": 7}}, "headers": {SECRET_HEADER: "0" * 64}},
               "4xx"),
        Attack("/train without credentials", "POST", "/train", {"json": {"project": 7}}, "4xx"),
        Attack("/warmup limit 10**9", "POST", "/warmup", {"json": {"project": 1, "limit": 10**9}, "auth": auth},
               "4xx"),
        Attack("/warmup 5000 tasks", "POST", "/warmup",
               {"json": {"tasks": [task(small)] * 5000, "label_config": LABEL_CONFIG}, "auth": auth}, "4xx"),
        Attack("/warmup without credentials", "POST", "/warmup", {"json": {"project": 1}}, "4xx"),
        Attack("/status without credentials", "GET", "/status", {}, "4xx"),
        Attack("/versions without credentials", "GET", "/versions", {}, "4xx"),
        Attack("/is_training without credentials", "GET", "/is_training", {}, "4xx"),
        Attack("/metrics without credentials", "GET", "/metrics", {}, "4xx"),
        Attack("/setup with a wrong password", "POST", "/setup",
               {"json": {"schema": LABEL_CONFIG, "hostname": trap}, "auth": (USER, "wrong")}, "4xx"),
    ]
    return out


def keypoint(x, y) -> dict:
    return {"original_width": 40, "original_height": 30, "from_name": "kp", "to_name": "image",
            "type": "keypointlabels", "is_positive": True, "value": {"x": x, "y": y, "keypointlabels": ["Pet"]}}


def rect(x, y, w, h) -> dict:
    return {"original_width": 40, "original_height": 30, "from_name": "rect", "to_name": "image",
            "type": "rectanglelabels", "value": {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": ["Pet"]}}


def worker_pid(master: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                return int(entry.name)
    raise AssertionError(f"no gunicorn worker under {master}")


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_sam_preset) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("security")
    trap, ls = Recorder("trap"), Recorder("label-studio")
    ls.routes = {"/api/projects/1": (200, json.dumps({"id": 1, "label_config": LABEL_CONFIG}).encode(),
                                     "application/json"),
                 "/api/webhooks/": (200, b"[]", "application/json")}
    trap_server, ls_server = trap.start(), ls.start()
    ls.routes["/api/projects/1/export"] = (200, json.dumps(malicious_export(ls.url, trap.url)).encode(),
                                           "application/json")
    (work / "files").mkdir()
    env = {**os.environ, "HOST": "127.0.0.1", "THREADS": "4", "SAM_MODEL": str(tiny_sam_preset),
           "LOCAL_FILES_DOCUMENT_ROOT": str(work / "files"),
           "MODEL_DIR": str(work / "models"), "IMAGE_CACHE_DIR": str(work / "cache"), "BASIC_AUTH_USER": USER,
           "BASIC_AUTH_PASS": PASSWORD, "MAX_REQUEST_MB": str(MAX_REQUEST_MB), "RETRAIN_MIN_ANNOTATIONS": "1000"}
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "REDIS_URL", "ALLOWED_HOSTS", "WEBHOOK_SECRET"):
        env.pop(name, None)
    log = work / "backend.log"
    port = free_port()
    process, url = start_gunicorn_backend(env, log, port=port)

    def ready() -> bool:
        try:
            return requests.get(url + "/health", timeout=2).json()["sam"]["state"] == "ready"
        except requests.RequestException:
            return False

    try:
        wait_for(ready, 600, "the backend", log)
        yield {"url": url, "trap": trap, "ls": ls, "process": process, "log": log, "model_dir": work / "models",
               "port": port, "files": work / "files"}
    finally:
        stop(process)
        trap_server.shutdown()
        ls_server.shutdown()


def project_secret(servers: dict, project: int) -> str:
    """The project's webhook secret as the backend stored it (random; made by the authenticated /setup)."""
    path = servers["model_dir"] / "webhook-secrets.json"
    wait_for(path.exists, 30, "the webhook secrets file", servers["log"])
    return json.loads(path.read_text())["projects"][str(project)]["secret"]


def call(url: str, attack: Attack) -> requests.Response:
    return requests.request(attack.method, url + attack.path, timeout=120, **attack.kwargs)


def test_attacks_get_4xx_json_and_never_the_token(servers) -> None:
    url, trap, ls = servers["url"], servers["trap"], servers["ls"]
    auth = (USER, PASSWORD)
    # Label Studio connects: an authenticated /setup says where it is and hands over the token.
    setup = requests.post(url + "/setup", auth=auth, timeout=30, json={
        "project": "1.1700000000", "schema": LABEL_CONFIG, "hostname": ls.url, "access_token": TOKEN})
    assert setup.status_code == 200, setup.text
    worker = worker_pid(servers["process"].pid)
    baseline = peak_rss_mb(worker)

    results, failures = [], []
    for attack in attacks(ls.url, trap.url, auth):
        answer = call(url, attack)
        text = answer.text
        try:
            body = answer.json()
        except ValueError:
            body = {}
        if attack.expect == "4xx":
            ok = 400 <= answer.status_code < 500 and bool(body.get("error"))
            attack.outcome = f"{answer.status_code}: {str(body.get('error', text))[:100]}"
        elif attack.expect == "empty":
            ok = answer.status_code == 200 and [p["result"] for p in body.get("results", [])] == [[]]
            attack.outcome = f"{answer.status_code}, empty prediction" if ok else f"{answer.status_code} {text[:100]}"
        else:
            ok = answer.status_code in (200, 422)
            attack.outcome = f"{answer.status_code}"
        if not ok or "Traceback" in text or 'File "' in text:
            failures.append((attack.name, answer.status_code, text[:300]))
        results.append(attack)
    assert failures == [], "\n".join(f"{name}: {status} {text[:150]}" for name, status, text in failures)

    # A raw non-ASCII Authorization header (bytes no client library would send).
    connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    connection.putrequest("POST", "/setup")
    connection.putheader("Authorization", b"Basic \xff\xfe\xc3\xa9dXNlcjpw")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", "2")
    connection.endheaders(b"{}")
    raw = connection.getresponse()
    assert raw.status == 401 and json.loads(raw.read())["error"]
    results.append(Attack("raw non-ASCII Authorization: Basic header", "POST", "/setup", {}, "4xx", "401"))

    # Projects 1, 01 and ١ are one project (or no project): one training job, not three.
    for project in (5, "05", "5.1700000000", "\u0665"):
        answer = requests.post(url + "/train", json={"project": project}, auth=auth, timeout=30)
        assert answer.status_code == 201, answer.text
    projects = requests.get(url + "/is_training", auth=auth, timeout=30).json()["projects"]
    assert "5" in projects and not {"05", "\u0665"} & set(projects)
    results.append(Attack("/train for projects 5, 05, 5.<ts> and \u0665", "POST", "/train", {}, "4xx",
                          f"one project key: {sorted(projects)}"))

    # The webhook secret opens /webhook; training on the malicious export skips every bad annotation.
    secret = project_secret(servers, 1)
    answer = requests.post(url + "/webhook", json={"action": "START_TRAINING", "project": {"id": 1}},
                           headers={SECRET_HEADER: secret}, timeout=30)
    assert answer.status_code == 200 and answer.json()["status"] == "started", answer.text
    state = wait_for(lambda: (s := requests.get(url + "/is_training?project=1", auth=auth, timeout=30).json())["last"]
                     and s, 240, "the training job", servers["log"])
    last = state["last"]
    # Only task 2 (a legitimate 6000x4000 mask) gives a pair; one pair cannot be split, so the job ends cleanly
    # without training, every malicious task skipped.
    assert last["status"] != "succeeded" and "1 task(s) with an accepted" in last["error"], last
    assert "training needs at least 2" in last["error"] and "skipped" in last["error"], last
    results.append(Attack("training on an export with a 1 MB brush annotation declaring 32767x32768, "
                          "brushlabels 5, original_width Infinity and 10**400, non-byte RLE, an unhashable "
                          "to_name, image URLs to the trap and the token path", "POST", "/webhook", {}, "4xx",
                          "every malicious task skipped with its reason, the one valid mask used; the job ends cleanly: "
                          + last["error"][:60]))

    assert requests.get(url + "/health", timeout=10).json()["status"] == "UP"
    assert trap.token_requests() == [], trap.token_requests()
    wrong_paths = [(m, p) for m, p in ls.token_requests() if not p.startswith(TOKEN_PATHS)]
    assert wrong_paths == [], wrong_paths
    peak = peak_rss_mb(worker)
    log = servers["log"].read_text(errors="replace")
    print(f"\nworker peak RSS: {baseline:.0f} MB after start-up, {peak:.0f} MB after the attacks "
          f"(budget {RSS_BUDGET_MB} MB); trap requests: {len(trap.seen)}, none with the token")
    for attack in results:
        print(f"| {attack.name} | {attack.path} | {attack.outcome} |")
    assert peak <= RSS_BUDGET_MB, (baseline, peak)
    assert "ERROR ml_backend.app" not in log, log[-3000:]  # no view failed (no 500)


def test_an_exposed_backend_without_authentication_refuses_to_start(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASIC_AUTH")}
    for host in ("0.0.0.0", "::", "192.0.2.7"):
        result = subprocess.run([sys.executable, "-m", "ml_backend", "serve"], env={**env, "HOST": host,
                                "PORT": str(free_port()), "MODEL_DIR": str(tmp_path)},
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2
        assert "BASIC_AUTH_USER" in result.stderr and "ALLOW_UNAUTHENTICATED=true" in result.stderr


# --- issue 21: the second round ----------------------------------------------------------------------------------

def reset_peak(pid: int) -> float:
    """Reset the process's peak RSS to its current RSS (Linux ``clear_refs`` 5); that RSS in MB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


def setup_project(url: str, ls_url: str, project: int = 1) -> None:
    answer = requests.post(url + "/setup", auth=(USER, PASSWORD), timeout=30, json={
        "project": f"{project}.1700000000", "schema": LABEL_CONFIG, "hostname": ls_url, "access_token": TOKEN})
    assert answer.status_code == 200, answer.text


def json_post(url: str, path: str, body: bytes, **kwargs) -> requests.Response:
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return requests.post(url + path, data=body, headers=headers, timeout=120, **kwargs)


def test_dns_rebinding_host_names_are_refused_before_any_work(servers) -> None:
    """Item 1: a page whose name rebinds to 127.0.0.1 sends its own name in Host: 421 before auth or routing."""
    url, ls, port = servers["url"], servers["ls"], servers["port"]
    seen = len(ls.seen)
    evil = {"Host": f"rebind.attacker.example:{port}"}
    for method, path, body in (("POST", "/predict", {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/x.png"}}]}),
                               ("POST", "/webhook", {"action": "START_TRAINING", "project": {"id": 1}}),
                               ("POST", "/preannotate", {"project": 1}), ("GET", "/status", None),
                               ("GET", "/health", None), ("POST", "/setup", {"schema": LABEL_CONFIG})):
        answer = requests.request(method, url + path, json=body, headers=evil, auth=(USER, PASSWORD), timeout=30)
        assert answer.status_code == 421 and "BACKEND_HOSTNAMES" in answer.json()["error"], (path, answer.text)
    assert len(ls.seen) == seen  # nothing reached Label Studio on the way
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"10.1.2.3:{port}"):
        answer = requests.get(url + "/status", headers={"Host": host}, auth=(USER, PASSWORD), timeout=30)
        assert answer.status_code == 200, (host, answer.text)
    print("\n| DNS rebinding: Host rebind.attacker.example on /predict, /webhook, /preannotate, /status, /health, "
          "/setup | each | 421 before auth and routing; loopback names and IP literals served |")


def test_json_amplification_is_bounded_before_parsing(servers) -> None:
    """Item 2: the densest body is refused unparsed; the costliest admitted one and four at once stay bounded."""
    url, auth = servers["url"], (USER, PASSWORD)
    worker = worker_pid(servers["process"].pid)
    limit = MAX_REQUEST_MB << 20
    empties = b'{"tasks":[' + b",".join([b"{}"] * ((limit - 16) // 3)) + b"]}"
    strings = b'{"tasks":[' + b",".join([b'"ab"'] * ((limit - 16) // 5)) + b"]}"
    small = b'{"schema":[' + b",".join([b'"ab"'] * (((1 << 20) - 16) // 5)) + b"]}"
    figures = {}
    base = reset_peak(worker)
    answer = json_post(url, "/predict", empties, auth=auth)
    assert answer.status_code == 413 and "objects and lists" in answer.json()["error"], answer.text
    figures["empty objects, 4 MB /predict"] = peak_rss_mb(worker) - base
    base = reset_peak(worker)
    answer = json_post(url, "/predict", strings, auth=auth)
    assert answer.status_code == 413 and "MAX_TASKS_PER_REQUEST" in answer.json()["error"], answer.text
    figures["short strings, 4 MB /predict"] = peak_rss_mb(worker) - base
    base = reset_peak(worker)
    answer = json_post(url, "/setup", small + b" " * ((1 << 20) - len(small) + 1), auth=auth)
    assert answer.status_code == 413 and "KB" in answer.json()["error"], answer.text  # 1 MB + 1 byte: unread
    answer = json_post(url, "/setup", small, auth=auth)
    assert 400 <= answer.status_code < 500, answer.text
    figures["short strings, 1 MB /setup"] = peak_rss_mb(worker) - base
    base = reset_peak(worker)
    threads = [threading.Thread(target=json_post, args=(url, "/predict", strings), kwargs={"auth": auth})
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    figures["4 x short strings, 4 MB /predict at once"] = peak_rss_mb(worker) - base
    print("\n" + "; ".join(f"{name}: +{mb:.0f} MB peak RSS" for name, mb in figures.items()))
    assert figures["empty objects, 4 MB /predict"] < 30, figures  # was ~200 MB parsed
    assert figures["short strings, 4 MB /predict"] < 90, figures
    assert figures["4 x short strings, 4 MB /predict at once"] < 1.6 * figures["short strings, 4 MB /predict"] + 30


def float_tiff(pixels: int) -> bytes:
    values = np.full((pixels // 4000, 4000), 0.5, dtype=np.float32)
    values[0, 0] = 2.0
    buffer = io.BytesIO()
    Image.fromarray(values, "F").save(buffer, "TIFF", compression="tiff_adobe_deflate")
    return buffer.getvalue()


def test_request_data_kept_by_the_backend_is_bounded(servers) -> None:
    """Items 3 and 4: whitespace-padded data: URIs are not kept whole (prompt state, scheduler); a 100 KB float TIFF
    within MAX_IMAGE_MB's RGB size but needing ~2 GB through float64 is refused from its header."""
    url, auth = servers["url"], (USER, PASSWORD)
    worker = worker_pid(servers["process"].pid)
    small = base64.b64encode(png(40, 30)).decode()
    before = rss_mb(worker)
    for i in range(12):
        padded = "data:image/png;base64," + " " * (3 << 20) + small + " " * i  # 3 MB of spaces, 12 distinct URIs
        answer = requests.post(url + "/predict", auth=auth, timeout=120, json={
            "tasks": [{"id": 5000 + i, "data": {"image": padded}}], "label_config": LABEL_CONFIG, "project": "3.1",
            "params": {"context": {"result": [keypoint(50, 50)]}}})
        assert answer.status_code == 200 and answer.json()["results"][0]["result"], answer.text[:300]
        warm = requests.post(url + "/warmup", auth=auth, timeout=60, json={
            "tasks": [{"id": 9000 + i, "data": {"image": padded}}], "label_config": LABEL_CONFIG})
        assert warm.status_code == 202 and warm.json()["queued"] == 1, warm.text  # queued compact
    kept = rss_mb(worker) - before
    bomb = float_tiff(60_000_000)
    assert len(bomb) < 400_000
    base = reset_peak(worker)
    answer = requests.post(url + "/predict", auth=auth, timeout=120, json={
        "tasks": [{"id": 1, "data": {"image": "data:image/tiff;base64," + base64.b64encode(bomb).decode()}}],
        "label_config": LABEL_CONFIG})
    assert answer.status_code == 200 and answer.json()["results"][0]["result"] == [], answer.text[:300]
    bomb_peak = peak_rss_mb(worker) - base
    assert "needs" in servers["log"].read_text(errors="replace") and "MAX_IMAGE_MB" in servers["log"].read_text()
    print(f"\n12 clicks and 12 warm-ups with 3 MB whitespace-padded data: URIs: RSS +{kept:.0f} MB kept; "
          f"{len(bomb) // 1024} KB float TIFF of 60 Mpx: refused, +{bomb_peak:.0f} MB peak RSS")
    assert kept < 24, kept  # was 12 x 3 MB in prompt-state keys, and 12 x 3 MB in the scheduler
    assert bomb_peak < 40, bomb_peak


def test_webhook_secrets_are_random_per_project_and_rotated_by_setup(servers) -> None:
    """Item 5: the secret on Label Studio's webhook is random (not the password's HMAC), opens its own project only,
    is stored 0600 under MODEL_DIR, and a rotation installed by /setup retires the old one."""
    import hashlib
    import hmac

    from ml_backend.security.secrets import WebhookSecrets

    url, ls = servers["url"], servers["ls"]
    hook = {"id": 41, "url": f"{url}/webhook", "project": 1, "headers": {}}
    ls.routes["/api/webhooks/"] = (200, json.dumps([hook]).encode(), "application/json")
    try:
        setup_project(url, ls.url)

        def patched() -> list[str]:
            return [json.loads(headers["_body"])["headers"][SECRET_HEADER] for method, path, headers in ls.seen
                    if method == "PATCH" and path == "/api/webhooks/41/"]

        def send(event: dict, secret: str) -> requests.Response:
            return requests.post(url + "/webhook", json=event, headers={SECRET_HEADER: secret}, timeout=30)

        first = wait_for(patched, 60, "the secret header PATCH", servers["log"])[-1]
        derived = hmac.new(f"{USER}:{PASSWORD}".encode(), b"sam-trimap-backend webhook secret v1",
                           hashlib.sha256).hexdigest()
        assert len(first) == 64 and first != derived and first == project_secret(servers, 1)
        assert (servers["model_dir"] / "webhook-secrets.json").stat().st_mode & 0o777 == 0o600
        event = {"action": "PROJECT_UPDATED", "project": {"id": 1}}
        assert send(event, first).status_code == 200
        other = requests.post(url + "/webhook", json={**event, "project": {"id": 2}}, headers={SECRET_HEADER: first},
                              timeout=30)
        assert other.status_code == 403, other.text  # project 1's secret cannot start work on project 2
        assert requests.post(url + "/webhook", json=event, headers={SECRET_HEADER: derived},
                             timeout=30).status_code == 401
        # Rotation (as when the secret is older than a day): the old one works until the new one is installed.
        second = WebhookSecrets(servers["model_dir"], rotate_after_s=0).current(1, rotate=True)
        assert second != first
        assert send(event, first).status_code == 200
        setup_project(url, ls.url)
        wait_for(lambda: second in patched(), 60, "the rotated secret's PATCH", servers["log"])
        wait_for(lambda: requests.post(url + "/webhook", json=event, headers={SECRET_HEADER: first},
                                       timeout=30).status_code == 401, 30, "the old secret retired")
        assert send(event, second).status_code == 200
    finally:
        ls.routes["/api/webhooks/"] = (200, b"[]", "application/json")
    print("\n| webhook secret: random per project (not HMAC of the password), 0600 under MODEL_DIR; project 1's secret "
          "on project 2: 403; the old derived secret: 401; rotated by /setup, old secret 401 once the new one is "
          "installed | /webhook |")


def test_whole_project_work_is_bounded(servers) -> None:
    """Item 6: /preannotate only for a project Label Studio shows the token; retraining.json stays small."""
    url, ls, auth = servers["url"], servers["ls"], (USER, PASSWORD)
    setup_project(url, ls.url)
    ls.routes["/api/projects/4611686018427387904"] = (404, b'{"detail": "Not found."}', "application/json")
    answer = requests.post(url + "/preannotate", json={"project": 2**62}, auth=auth, timeout=30)
    assert answer.status_code == 404 and "token can see" in answer.json()["error"], answer.text
    status = requests.get(url + "/status", auth=auth, timeout=30).json()["preannotation_jobs"]
    assert str(2**62) not in status.get("projects", {}) and 2**62 not in status.get("queue", [])
    for project in range(100, 400):  # annotation webhooks for 300 project ids
        answer = requests.post(url + "/webhook", auth=auth, timeout=30, json={
            "action": "ANNOTATION_CREATED", "project": {"id": project}, "task": {"id": 1},
            "annotation": {"id": project, "was_cancelled": False, "result": [{
                "type": "brushlabels", "from_name": "mask", "to_name": "image", "original_width": 8,
                "original_height": 8, "value": {"format": "rle", "rle": encode_rle(np.ones((8, 8), bool)),
                                                "brushlabels": ["Pet"]}}]}})
        assert answer.status_code == 200, answer.text
    state = servers["model_dir"] / "retraining.json"
    projects = json.loads(state.read_text()) if state.exists() else {}
    print(f"\n/preannotate for 2**62: 404; 300 projects' webhooks: retraining.json holds {len(projects)} projects, "
          f"{state.stat().st_size if state.exists() else 0} bytes")
    assert 100 <= len(projects) <= 200 and state.stat().st_size < 200_000, (len(projects), state.stat().st_size)


def test_local_files_of_another_project_are_never_read(servers) -> None:
    """Item 8: with LOCAL_FILES_DOCUMENT_ROOT set, a task of project 1 naming a file of project 2's local storage
    (``d=``, ``..``, a link, ``file:``, a bare path, a storage name sharing a prefix) gets a refusal and none of
    its pixels, and is not fetched from Label Studio instead; project 1's own file is read; a Label Studio that
    fails or lists no storage refuses the read."""
    url, ls, auth, root = servers["url"], servers["ls"], (USER, PASSWORD), servers["files"]
    (root / "a").mkdir()
    (root / "ab").mkdir()  # project 2's storage: its name starts with project 1's
    (root / "a" / "own.png").write_bytes(png(24, 16))
    (root / "ab" / "secret.png").write_bytes(png(40, 30))
    (root / "a" / "link.png").symlink_to(root / "ab" / "secret.png")

    def storages(project: int, *paths: Path) -> None:
        listing = [{"id": 10 + i, "project": project, "path": str(path), "title": path.name}
                   for i, path in enumerate(paths)]
        ls.routes[f"/api/storages/localfiles?project={project}"] = (200, json.dumps(listing).encode(),
                                                                     "application/json")

    storages(1, root / "a")
    storages(2, root / "ab")
    storages(4)  # no local storage at all
    ls.routes["/api/storages/localfiles?project=3"] = (500, b'{"detail": "boom"}', "application/json")
    setup_project(url, ls.url)

    def click(image: str, project: int, task_id: int = 700) -> requests.Response:
        return requests.post(url + "/predict", auth=auth, timeout=120, json={
            "tasks": [{"id": task_id, "data": {"image": image}}], "label_config": LABEL_CONFIG,
            "project": f"{project}.1700000000", "params": {"context": {"result": [keypoint(50, 50)]}}})

    def size_of(answer: requests.Response) -> tuple[int, int]:
        region = answer.json()["results"][0]["result"][0]
        return region["original_width"], region["original_height"]

    # Project 2 reads its own file (the backend now knows its URL and embedding) ...
    secret = "/data/local-files/?d=ab/secret.png"
    answer = click(secret, 2, task_id=701)
    assert answer.status_code == 200 and size_of(answer) == (40, 30), answer.text[:300]
    seen = len(ls.seen)
    attacks = {"d= of project 2's file": secret, "absolute d=": f"{ls.url}{secret}",
               "dot-dot out of project 1's storage": "/data/local-files/?d=a/../ab/secret.png",
               "link in project 1's storage to project 2's file": "/data/local-files/?d=a/link.png",
               "file: URL": (root / "ab" / "secret.png").as_uri(), "bare path": str(root / "ab" / "secret.png")}
    outcomes = {}
    for name, image in attacks.items():
        answer = click(image, 1)  # ... project 1 gets none of its pixels, not even through that embedding
        assert answer.status_code == 403 and "local storage of project 1" in answer.json()["error"], (name, answer.text)
        batch = requests.post(url + "/predict", auth=auth, timeout=120, json={
            "tasks": [{"id": 700, "data": {"image": image}}], "label_config": LABEL_CONFIG, "project": "1.1700000000"})
        assert batch.status_code == 200 and batch.json()["results"][0]["result"] == [], batch.text[:300]
        outcomes[name] = answer.json()["error"]
    asked = [path for _, path, _ in ls.seen[seen:]]
    assert not [path for path in asked if path.startswith("/data/")], asked  # no fallback over HTTP
    assert any(path.startswith("/api/storages/localfiles?project=1") for path in asked), asked
    answer = click("/data/local-files/?d=a/own.png", 1)
    assert answer.status_code == 200 and size_of(answer) == (24, 16), answer.text[:300]
    failing = click("/data/local-files/?d=a/own.png", 3, task_id=703)
    assert failing.status_code == 403 and "HTTP 500" in failing.json()["error"], failing.text
    empty = click("/data/local-files/?d=a/own.png", 4, task_id=704)
    assert empty.status_code == 403 and "no local storage" in empty.json()["error"], empty.text
    for name, error in outcomes.items():
        print(f"| {name} (task of project 1) | interactive / batch /predict | 403 {error[:90]} / empty |")
    print(f"| Label Studio fails (HTTP 500) / lists no storage | /predict | 403 {failing.json()['error'][:60]} / "
          f"403 {empty.json()['error'][:60]} |")
