"""A private Docker engine and the compose stack of docker/docker-compose.yml on it, for tests/test_compose_stack.py.

The engine (scripts/docker_engine.sh) keeps its image layers in a persistent data root outside the
repository (``SAM_TRIMAP_DOCKER_ROOT``, default /var/lib/sam-trimap-docker), so a second run reuses every
image layer it built before; its socket lives in a temporary directory. One test run at a time holds the
data root (a lock file beside it).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("SAM_TRIMAP_DOCKER_ROOT", "/var/lib/sam-trimap-docker"))
DOCKER = shutil.which("docker", path="/usr/bin") or shutil.which("docker") or "docker"


def missing_engine() -> str | None:
    """Why this machine cannot run the compose test, or None."""
    for tool in ("dockerd", "docker-compose", "debootstrap"):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            return f"{tool} is not installed (scripts/install.sh --test installs docker.io, docker-compose, debootstrap)"
    if os.geteuid() != 0:
        return "dockerd needs root"
    return None


@dataclass
class Engine:
    env: dict[str, str]  # os.environ with DOCKER_HOST pointing at this engine

    def run(self, *args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout,
                                cwd=REPO, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited with {result.returncode}:\n{result.stdout[-3000:]}\n"
                               f"{result.stderr[-3000:]}")
        return result

    def docker(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(DOCKER, *args, **kwargs)

    def inspect(self, what: str) -> dict:
        return json.loads(self.docker("inspect", what).stdout)[0]


@contextmanager
def private_engine() -> Iterator[Engine]:
    """dockerd on its own socket and the persistent data root; stopped (and its socket removed) afterwards."""
    DATA_ROOT.parent.mkdir(parents=True, exist_ok=True)
    with open(DATA_ROOT.with_name(DATA_ROOT.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run using the same data root waits here
        run_dir = Path(tempfile.mkdtemp(prefix="sam-docker-", dir="/tmp"))  # short: unix socket paths <= 108 bytes
        try:
            started = subprocess.run(["bash", str(REPO / "scripts" / "docker_engine.sh"), "start", str(run_dir),
                                      str(DATA_ROOT)], capture_output=True, text=True, timeout=180)
            if started.returncode != 0:
                raise RuntimeError(f"dockerd did not start: {started.stderr[-3000:]}")
            host = started.stdout.strip().splitlines()[-1].split("=", 1)[1]
            engine = Engine(env={**os.environ, "DOCKER_HOST": host, "DOCKER_BUILDKIT": "0"})
            sweep(engine)
            yield engine
        finally:
            subprocess.run(["bash", str(REPO / "scripts" / "docker_engine.sh"), "stop", str(run_dir)], timeout=120)
            shutil.rmtree(run_dir, ignore_errors=True)


def sweep(engine: Engine) -> None:
    """Containers, networks and volumes a killed earlier run left in this (test-only) data root; images stay.

    dockerd would otherwise restart such containers (restart: unless-stopped) on their fixed addresses.
    """
    containers = engine.docker("ps", "-aq").stdout.split()
    if containers:
        engine.docker("rm", "-f", "-v", *containers)
    engine.docker("network", "prune", "-f")
    engine.docker("volume", "prune", "-f")


@dataclass
class Stack:
    """One compose project on an engine: ``compose(...)`` runs docker-compose with its files and env file."""

    engine: Engine
    project: str
    env_file: Path
    files: tuple[str, ...]

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        command = ["docker-compose", "-p", self.project, "--env-file", str(self.env_file)]
        for name in self.files:
            command += ["-f", str(REPO / "docker" / name)]
        return self.engine.run(*command, *args, check=check, timeout=timeout)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.split()
        if len(ids) != 1:
            raise RuntimeError(f"service {service}: containers {ids}")
        return ids[0]

    def health(self, service: str) -> str:
        state = self.engine.inspect(self.container(service))["State"]
        return state.get("Health", {}).get("Status", state["Status"])

    def wait_health(self, service: str, wanted: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        status = ""
        while time.monotonic() < deadline:
            status = self.health(service)
            if status == wanted:
                return
            time.sleep(1)
        raise AssertionError(f"{service} is {status}, not {wanted}, after {timeout_s} s:\n{self.logs(service)}")

    def address(self, service: str, network: str) -> str:
        networks = self.engine.inspect(self.container(service))["NetworkSettings"]["Networks"]
        return networks[f"{self.project}_{network}"]["IPAddress"]

    def logs(self, service: str, tail: int = 80) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), service, check=False).stdout

    def down(self) -> None:
        """Containers, networks and volumes of this project go; the images (and their layers) stay."""
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)
