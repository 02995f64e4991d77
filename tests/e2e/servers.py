"""Start a real Label Studio 1.23.2 and our backend under gunicorn, on free loopback ports."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from processes import free_port, start_gunicorn_backend, stop  # noqa: F401  (stop is part of this module's API)

REPO = Path(__file__).resolve().parents[2]
LABEL_STUDIO_BIN = REPO / ".venv-ls" / "bin" / "label-studio"
LS_USER, LS_PASSWORD = "annotator@example.com", "e2e-secret-123"


def wait_until(check, *, timeout_s: float, what: str, process: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail}")
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log else ""
    raise TimeoutError(f"{what} not ready after {timeout_s} s\n{tail}")


@dataclass
class LabelStudio:
    url: str
    token: str
    document_root: Path
    process: subprocess.Popen
    session: requests.Session = field(default_factory=requests.Session)

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        headers = {"Authorization": f"Token {self.token}", **kwargs.pop("headers", {})}
        return self.session.request(method, self.url + path, headers=headers, **kwargs)

    def ok(self, method: str, path: str, **kwargs):
        response = self.api(method, path, **kwargs)
        assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response.json() if response.content else None


def start_label_studio(workdir: Path) -> LabelStudio:
    if not LABEL_STUDIO_BIN.exists():
        raise RuntimeError(f"{LABEL_STUDIO_BIN} missing: run scripts/install.sh --test")
    port = free_port()
    token = secrets.token_hex(20)
    data_dir, document_root = workdir / "ls-data", workdir / "ls-files"
    data_dir.mkdir(parents=True)
    (document_root / "images").mkdir(parents=True)
    env = {
        **os.environ,
        "LABEL_STUDIO_USERNAME": LS_USER,
        "LABEL_STUDIO_PASSWORD": LS_PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
    }
    env.pop("KERAS_BACKEND", None)
    url = f"http://127.0.0.1:{port}"
    log = workdir / "label-studio.log"
    process = subprocess.Popen(
        [str(LABEL_STUDIO_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
         "--host", url, "--data-dir", str(data_dir)],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=workdir,
    )
    server = LabelStudio(url=url, token=token, document_root=document_root, process=process)
    try:
        wait_until(lambda: server.api("GET", "/api/projects", timeout=5).status_code == 200,
                   timeout_s=900, what="Label Studio", process=process, log=log)  # ~30 s; >10 min seen when busy
    except BaseException:
        stop(process)  # a server that did not come up in time must not outlive the test run
        raise
    return server


@dataclass
class Backend:
    url: str
    process: subprocess.Popen
    log: Path
    auth: tuple[str, str] | None = None

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, auth=self.auth, timeout=60, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, auth=self.auth, timeout=120, **kwargs)


def start_backend(workdir: Path, env_overrides: dict[str, str]) -> Backend:
    port = free_port()
    log = workdir / f"backend-{port}.log"
    env = {**os.environ, "HOST": "127.0.0.1", "THREADS": "4", "LOG_LEVEL": "INFO",
           "IMAGE_CACHE_DIR": str(workdir / f"image-cache-{port}"), **env_overrides}
    process, url = start_gunicorn_backend(env, log, port=port)
    backend = Backend(url=url, process=process, log=log)
    if env_overrides.get("BASIC_AUTH_USER"):
        backend.auth = (env_overrides["BASIC_AUTH_USER"], env_overrides["BASIC_AUTH_PASS"])

    def sam_ready() -> bool:
        health = requests.get(backend.url + "/health", timeout=5).json()
        if health["sam"]["state"] == "failed":
            raise RuntimeError(f"backend could not load SAM: {health}")
        return health["sam"]["state"] == "ready"

    try:
        wait_until(sam_ready, timeout_s=180, what="backend", process=process, log=log)
    except BaseException:
        stop(process)
        raise
    return backend
