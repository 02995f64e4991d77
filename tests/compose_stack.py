"""A private Docker engine and a compose stack of docker/ on it, for tests/test_compose_stack.py.

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
from dataclasses import dataclass, field
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
    scale: dict[str, int] = field(default_factory=dict)  # replicas per service, given to every `up`

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        command = ["docker-compose", "-p", self.project, "--env-file", str(self.env_file)]
        for name in self.files:
            command += ["-f", str(REPO / "docker" / name)]
        return self.engine.run(*command, *args, check=check, timeout=timeout)

    def up(self, *args: str) -> subprocess.CompletedProcess:
        """``up`` with the stack's replica counts (without them compose would scale a service back to one);
        ``args``: options, then services."""
        return self.compose("up", *(f"--scale={name}={count}" for name, count in self.scale.items()), *args)

    def containers(self, service: str) -> list[str]:
        return sorted(self.compose("ps", "-q", service).stdout.split())

    def container(self, service: str) -> str:
        ids = self.containers(service)
        if len(ids) != 1:
            raise RuntimeError(f"service {service}: containers {ids}")
        return ids[0]

    def health(self, container: str) -> str:
        state = self.engine.inspect(container)["State"]
        return state.get("Health", {}).get("Status", state["Status"])

    def wait_health(self, service: str, wanted: str, timeout_s: float) -> None:
        """Until every container of ``service`` (as many as its scale) is ``wanted``."""
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = {c: self.health(c) for c in self.containers(service)}
            if len(states) == self.scale.get(service, 1) and set(states.values()) == {wanted}:
                return
            time.sleep(1)
        raise AssertionError(f"{service}: {states}, not all {wanted}, after {timeout_s} s:\n{self.logs(service)}")

    def address(self, service: str, network: str, container: str | None = None) -> str:
        """A container's address on one of the stack's networks (the service's only container by default)."""
        networks = self.engine.inspect(container or self.container(service))["NetworkSettings"]["Networks"]
        return networks[f"{self.project}_{network}"]["IPAddress"]

    def get(self, container: str, path: str) -> tuple[int, str]:
        """GET ``path`` from the backend in ``container`` itself (not through the balancer), with its basic auth."""
        script = ("import base64, os, sys, urllib.error, urllib.request\n"
                  "auth = base64.b64encode((os.environ['BASIC_AUTH_USER'] + ':' + os.environ['BASIC_AUTH_PASS'])"
                  ".encode()).decode()\n"
                  f"request = urllib.request.Request('http://127.0.0.1:9090{path}', "
                  "headers={'Authorization': 'Basic ' + auth})\n"
                  "try:\n    answer = urllib.request.urlopen(request, timeout=30)\n"
                  "except urllib.error.HTTPError as error:\n    answer = error\n"
                  "sys.stdout.write(str(answer.status) + '\\n' + answer.read().decode())\n")
        status, _, body = self.engine.docker("exec", container, "python", "-c", script).stdout.partition("\n")
        return int(status), body

    def logs(self, service: str, tail: int = 80) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), service, check=False).stdout

    def down(self) -> None:
        """Containers, networks and volumes of this project go; the images (and their layers) stay."""
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)
