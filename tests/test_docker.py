"""The Docker files: the compose files are accepted by Compose, the CPU file is the GPU file without its GPU
reservations, the balancer is wired to the backend replicas, and the image's entry points exist.

``docker compose config`` (or the older ``docker-compose config``) validates and resolves the compose
files; no engine is needed. tests/test_compose_stack.py builds the images and runs the stack.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "docker-compose.yml"  # the default: GPU reservations for backend and worker
CPU = REPO / "docker" / "compose.cpu.yml"  # the same stack without them
HAPROXY_CFG = REPO / "docker" / "balancer" / "haproxy.cfg"
ENV = {"LABEL_STUDIO_API_KEY": "0123456789abcdef0123456789abcdef01234567", "LABEL_STUDIO_PASSWORD": "secret",
       "BASIC_AUTH_USER": "label-studio", "BASIC_AUTH_PASS": "backend-secret", "REDIS_PASSWORD": "redis-secret"}
# Label Studio 1.23.2's default banned networks (core/utils/io.py validate_ip), which its SSRF protection uses.
LABEL_STUDIO_BANNED = (
    "0.0.0.0/8 10.0.0.0/8 100.64.0.0/10 127.0.0.0/8 169.254.0.0/16 172.16.0.0/12 192.0.0.0/24 192.0.2.0/24 "
    "192.88.99.0/24 192.168.0.0/16 198.18.0.0/15 198.51.100.0/24 203.0.113.0/24 224.0.0.0/4 233.252.0.0/24 "
    "240.0.0.0/4 255.255.255.255/32 ::/128 ::1/128 ::ffff:0:0/96 ::ffff:0:0:0/96 64:ff9b::/96 64:ff9b:1::/48 "
    "100::/64 2001:0000::/32 2001:20::/28 2001:db8::/32 2002::/16 fc00::/7 fe80::/10 ff00::/8").split()


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def compose_config(env: dict[str, str], gpu: bool = True) -> subprocess.CompletedProcess:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("LABEL_STUDIO_", "RETRAIN_", "BASIC_AUTH_", "REDIS_", "BACKEND_", "BALANCER_",
                                  "MAX_REQUEST_MB"))}
    return subprocess.run([*command, "-f", str(COMPOSE if gpu else CPU), "config"], capture_output=True, text=True,
                          env={**clean, **env}, cwd=REPO / "docker", timeout=120)


def without_deploy(config: dict) -> dict:
    return {**config, "services": {name: {k: v for k, v in service.items() if k != "deploy"}
                                   for name, service in config["services"].items()}}


def test_the_cpu_file_is_the_gpu_file_without_its_gpu_reservations():
    """Two whole files (compose 1.29 can neither remove keys in an override nor `extends` a service with
    `depends_on`), kept as one: what Compose makes of them differs only in `deploy`."""
    gpu, cpu = (compose_config(ENV, gpu=g) for g in (True, False))
    assert gpu.returncode == 0 and cpu.returncode == 0, gpu.stderr + cpu.stderr
    gpu_config, cpu_config = yaml.safe_load(gpu.stdout), yaml.safe_load(cpu.stdout)
    assert without_deploy(gpu_config) == without_deploy(cpu_config)
    assert not any("deploy" in service for service in cpu_config["services"].values())
    assert {name for name, service in gpu_config["services"].items() if "deploy" in service} == {"backend", "worker"}


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_compose_config_is_accepted_and_wires_the_services(gpu):
    result = compose_config(ENV, gpu=gpu)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"label-studio", "balancer", "backend", "redis", "worker"}
    assert services["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"  # the official images by default
    assert services["redis"]["image"].startswith("redis:")
    for name in ("backend", "worker"):
        service = services[name]
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        assert any("gpu" in d["capabilities"] for d in devices) == gpu, f"{name}: {devices}"
        env = service["environment"]
        assert env["REDIS_URL"] == "redis://:redis-secret@redis:6379/0" and env["MODEL_DIR"] == "/models"
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert env["LABEL_STUDIO_API_KEY"] == ENV["LABEL_STUDIO_API_KEY"]
        volumes = {str(v).split(":")[-2] if isinstance(v, str) else v["target"]: v for v in service["volumes"]}
        assert "/models" in volumes and "/cache" in volumes, f"{name}: {service['volumes']}"
        assert Path(service["build"]["dockerfile"]).name == "Dockerfile"
    assert services["label-studio"]["environment"]["LABEL_STUDIO_USER_TOKEN"] == ENV["LABEL_STUDIO_API_KEY"]


def test_compose_takes_its_images_from_variables():
    mirrors = {"LABEL_STUDIO_IMAGE": "mirror.example/ls:1.23.2", "REDIS_IMAGE": "mirror.example/redis:7",
               "BACKEND_IMAGE": "mirror.example/backend:1", "BASE_IMAGE": "mirror.example/python:3.11",
               "TORCH_SPEC": "torch==2.13.0+cpu", "BALANCER_IMAGE": "mirror.example/balancer:1",
               "DEBIAN_IMAGE": "mirror.example/debian:bookworm-slim"}
    services = yaml.safe_load(compose_config({**ENV, **mirrors}).stdout)["services"]
    assert services["balancer"]["image"] == mirrors["BALANCER_IMAGE"]
    assert services["balancer"]["build"]["args"]["DEBIAN_IMAGE"] == mirrors["DEBIAN_IMAGE"]
    assert services["label-studio"]["image"] == mirrors["LABEL_STUDIO_IMAGE"]
    assert services["redis"]["image"] == mirrors["REDIS_IMAGE"]
    for name in ("backend", "worker"):
        assert services[name]["image"] == mirrors["BACKEND_IMAGE"]
        args = services[name]["build"]["args"]
        assert args["BASE_IMAGE"] == mirrors["BASE_IMAGE"] and args["TORCH_SPEC"] == mirrors["TORCH_SPEC"]


def test_redis_wants_a_password_and_is_kept_off_label_studios_network():
    services = yaml.safe_load(compose_config(ENV).stdout)["services"]
    redis = services["redis"]
    assert redis["command"][-2:] == ["--requirepass", "redis-secret"]
    label_studio_networks = set(services["label-studio"]["networks"])
    assert not label_studio_networks & set(redis["networks"]), "Redis shares a network with Label Studio"
    for name in ("backend", "worker"):  # both reach Redis and Label Studio
        assert set(redis["networks"]) & set(services[name]["networks"])
        assert label_studio_networks & set(services[name]["networks"])
    missing = compose_config({k: v for k, v in ENV.items() if k != "REDIS_PASSWORD"})
    assert missing.returncode != 0 and "REDIS_PASSWORD" in missing.stderr


def test_compose_refuses_to_start_without_the_key():
    result = compose_config({k: v for k, v in ENV.items() if k != "LABEL_STUDIO_API_KEY"})
    assert result.returncode != 0
    assert "LABEL_STUDIO_API_KEY" in result.stderr


@pytest.mark.parametrize("missing", ["BASIC_AUTH_USER", "BASIC_AUTH_PASS"])
def test_compose_refuses_to_start_the_backend_without_basic_auth(missing):
    result = compose_config({k: v for k, v in ENV.items() if k != missing})
    assert result.returncode != 0 and missing in result.stderr


def test_the_balancer_is_published_on_loopback_only_and_label_studio_keeps_ssrf_protection():
    import ipaddress

    config = yaml.safe_load(compose_config(ENV).stdout)
    services = config["services"]
    assert services["balancer"]["ports"], "the balancer serves /status and /warmup to this host"
    for port in services["balancer"]["ports"]:
        published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
        assert published.startswith("127.0.0.1:"), f"balancer published beyond loopback: {port}"
    for name in ("backend", "redis", "worker"):
        assert not services[name].get("ports"), f"{name} must not be published"
    env = services["label-studio"]["environment"]
    assert env["SSRF_PROTECTION_ENABLED"] == "true" and env["ML_BLOCK_LOCAL_IP"] == "true"
    backend_ip = ipaddress.ip_address(services["balancer"]["networks"]["ml"]["ipv4_address"])
    banned = [ipaddress.ip_network(n) for n in env["USER_ADDITIONAL_BANNED_SUBNETS"].split(",")]
    if env.get("USE_DEFAULT_BANNED_SUBNETS", "true") != "false":
        banned += [ipaddress.ip_network(n) for n in LABEL_STUDIO_BANNED]
    assert not any(backend_ip in network for network in banned), "Label Studio could not reach the balancer"
    # Label Studio creates the backend's webhook only for a dotted host name (Django's URLValidator).
    assert any("." in alias for alias in services["balancer"]["networks"]["ml"].get("aliases", [])), \
        "no dotted name for the balancer: Label Studio would silently register no webhook for http://backend:9090"
    # The replicas (and the worker) take their addresses from a range that holds no fixed address: however
    # many there are, none takes the balancer's or Label Studio's, and every one of them is banned.
    [ml] = config["networks"]["ml"]["ipam"]["config"]
    dynamic = ipaddress.ip_network(ml["ip_range"])
    fixed = [ipaddress.ip_address(s["networks"]["ml"]["ipv4_address"]) for s in services.values()
             if isinstance(s["networks"], dict) and (s["networks"].get("ml") or {}).get("ipv4_address")]
    assert backend_ip in fixed and not any(address in dynamic for address in fixed), (fixed, dynamic)
    assert any(dynamic.subnet_of(network) for network in banned if network.version == 4)
    assert not (services["backend"]["networks"].get("ml") or {}).get("ipv4_address"), "a fixed address cannot scale"
    # Narrowest: every address Label Studio bans by default stays banned, except the backend's one.
    for default in map(ipaddress.ip_network, LABEL_STUDIO_BANNED):
        rest = [default] if backend_ip not in default else list(default.address_exclude(
            ipaddress.ip_network(f"{backend_ip}/32")))
        for part in rest:
            assert any(part.subnet_of(network) for network in banned if network.version == part.version), part
    for name in ("backend", "worker"):
        environment = services[name]["environment"]
        assert environment.get("ALLOW_UNAUTHENTICATED", "false") != "true"
    assert services["backend"]["environment"]["BASIC_AUTH_PASS"] == ENV["BASIC_AUTH_PASS"]


def haproxy_settings() -> list[list[str]]:
    return [shlex.split(line) for line in HAPROXY_CFG.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_balancer_finds_the_replicas_checks_their_readiness_and_passes_what_the_backend_accepts():
    services = yaml.safe_load(compose_config({**ENV, "MAX_REQUEST_MB": "48"}).stdout)["services"]
    settings = haproxy_settings()
    # Every replica of the compose service, found through Docker's DNS (so --scale needs no change here).
    [template] = [words for words in settings if words[0] == "server-template"]
    host, port = template[3].split(":")
    assert host == "backend" and host in services and port == services["backend"]["environment"].get("PORT", "9090")
    assert ["nameserver", "dns", "127.0.0.11:53"] in settings
    assert any(words[0] == "default-server" and "check" in words and "resolvers" in words for words in settings)
    assert ["balance", "roundrobin"] in settings
    # Readiness: /ready, named by a Host the backend accepts (its Host check refuses others with 421).
    [check] = [words for words in settings if words[:2] == ["http-check", "send"]]
    assert check[check.index("uri") + 1] == "/ready"
    hostnames = services["backend"]["environment"]["BACKEND_HOSTNAMES"].split(",")
    assert check[check.index("Host") + 1] in hostnames
    assert "backend.internal" in hostnames  # what Label Studio connects, passed through by the balancer
    # A first click may wait for an encode: Label Studio waits 100 s, so must the balancer.
    [server_timeout] = [words[2] for words in settings if words[:2] == ["timeout", "server"]]
    assert server_timeout.endswith("s") and int(server_timeout[:-1]) > 100
    # Bodies: the balancer's limit is the backend's, from one setting.
    assert services["balancer"]["environment"]["MAX_REQUEST_MB"] == "48"
    assert services["backend"]["environment"]["MAX_REQUEST_MB"] == "48"
    assert "${MAX_REQUEST_MB}" in " ".join(w for words in settings if words[0] == "http-request" for w in words)
    dockerfile = (REPO / "docker" / "balancer" / "Dockerfile").read_text()
    from ml_backend.settings import Settings

    assert "ARG DEBIAN_IMAGE=debian:bookworm-slim" in dockerfile
    assert f"ENV MAX_REQUEST_MB={Settings().max_request_mb}" in dockerfile  # the backend's default
    assert re.search(r"^USER haproxy$", dockerfile, re.M)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_runs_as_non_root_with_volumes_and_healthcheck():
    instructions = dockerfile_instructions()
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    volumes = " ".join(arg for op, arg in instructions if op == "VOLUME")
    assert "/models" in volumes and "/cache" in volumes
    health = [arg for op, arg in instructions if op == "HEALTHCHECK"]
    assert health and "/ready" in health[0]  # run against a real backend in test_faults_serving.py
    run = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "scripts/install.sh" in run
    args = [arg for op, arg in instructions if op == "ARG"]
    assert 'TORCH_SPEC="torch>=2.4"' in args  # PyPI's CUDA build by default, not the installer's CPU pin
    assert "BASE_IMAGE=python:3.11-slim-bookworm" in args
    # Two stages: the build stage's pip settings (docker/pip/, index URLs) never reach the final image.
    stages = [arg for op, arg in instructions if op == "FROM"]
    assert len(stages) == 2 and stages[-1] == "${BASE_IMAGE}", stages
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    assert not any("docker/pip" in arg or "PIP_" in arg for op, arg in final if op in ("COPY", "ENV", "ARG"))
    for op, arg in instructions:
        if op == "COPY" and "--from=" not in arg:
            sources = [s for s in shlex.split(arg) if not s.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def module_of(command: list[str]) -> tuple[str, list[str]]:
    assert command[:2] == ["python", "-m"], command
    return command[2], command[3:]


def test_entry_points_exist_in_the_package():
    cmd = [arg for op, arg in dockerfile_instructions() if op == "CMD"][-1]
    module, args = module_of(yaml.safe_load(cmd))
    assert importlib.import_module(module) and args == ["serve"]
    help_text = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO)
    assert help_text.returncode == 0 and "serve" in help_text.stdout

    worker = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]["command"]
    module, args = module_of(worker)
    assert callable(importlib.import_module(module).main)
    help_text = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO)
    assert help_text.returncode == 0 and all(arg in help_text.stdout for arg in args), (args, help_text.stdout)
    without_redis = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    result = subprocess.run([sys.executable, "-m", module, "--burst"], capture_output=True, text=True, cwd=REPO,
                            env=without_redis, timeout=120)
    assert result.returncode == 2 and "REDIS_URL" in result.stderr


def test_dockerignore_keeps_environments_and_tests_out_of_the_build_context():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".venv-ls", "tests"} <= set(ignored)
