"""deploy/kubernetes: every manifest is valid Kubernetes, and the pieces fit the backend and each other.

Offline: the JSON schemas come with the ``kubernetes-validate`` package (scripts/install.sh --test), and the
kustomization is rendered here by reading it (kustomize is not a Debian package this installer can rely on).
The renderer supports exactly what deploy/kubernetes/kustomization.yaml uses and fails on anything else, so a
new kustomize feature there means extending it here, not silently validating something else.
"""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes_validate import utils as k8s_schemas

from ml_backend.security.auth import PUBLIC_PATHS, check_exposure
from ml_backend.security.hosts import HostPolicy
from ml_backend.settings import Settings

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "deploy" / "kubernetes"
COMPOSE = REPO / "docker" / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
SUPPORTED_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "secretGenerator", "images"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
# Oldest Kubernetes the manifests are checked against, and the newest schemas the package ships.
OLDEST = "1.28"
NEWEST = k8s_schemas.latest_version()
# Values for secrets.env.example's empty keys (as a user fills them in).
TEST_SECRETS = {"BASIC_AUTH_PASS": "backendPass1", "LABEL_STUDIO_API_KEY": "0123456789abcdef0123456789abcdef01234567",
                "REDIS_PASSWORD": "redisPass1"}
# Variables the manifests set that are not settings: REDIS_PASSWORD only builds REDIS_URL (and Redis's own flag).
NOT_SETTINGS = {"REDIS_PASSWORD"}


def read_env_file(path: Path) -> dict[str, str]:
    """kustomize's env-file form: KEY=VALUE lines, '#' comments, blank lines (no quoting).

    Hand-written (a few lines): python-dotenv would accept quoting that kustomize passes through verbatim."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        assert key not in values, f"{path.name}:{number}: {key} twice"
        values[key] = value
    return values


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((FOLDER / "kustomization.yaml").read_text())


def generated(generator: dict[str, Any], kind: str, secrets: dict[str, str]) -> dict[str, Any]:
    assert set(generator) <= {"name", "envs"}, f"unsupported {kind} generator fields: {sorted(generator)}"
    data: dict[str, str] = {}
    for name in generator["envs"]:
        path = FOLDER / name
        if name == "secrets.env":  # git-ignored: the user makes it from the example
            path = FOLDER / "secrets.env.example"
        values = read_env_file(path)
        if name == "secrets.env":
            values = {key: value or secrets[key] for key, value in values.items()}
        data.update(values)
    if kind == "Secret":
        encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
        return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": generator["name"]},
                "data": encoded}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def render(secrets: dict[str, str] = TEST_SECRETS) -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes` applies, less kustomize's name hashes."""
    config = kustomization()
    assert set(config) <= SUPPORTED_KEYS, f"kustomization uses {sorted(set(config) - SUPPORTED_KEYS)}: extend render()"
    docs: list[dict[str, Any]] = []
    for name in config["resources"]:
        docs += [doc for doc in yaml.safe_load_all((FOLDER / name).read_text()) if doc]
    docs += [generated(g, "ConfigMap", secrets) for g in config.get("configMapGenerator", [])]
    docs += [generated(g, "Secret", secrets) for g in config.get("secretGenerator", [])]
    images = {entry["name"]: entry for entry in config.get("images", [])}
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED and "namespace" in config:
            doc["metadata"]["namespace"] = config["namespace"]
        for container in containers(doc):
            entry = images.get(container["image"])
            assert entry, f"{doc['metadata']['name']}: image {container['image']!r} is not in kustomization images"
            name = entry.get("newName", entry["name"])
            container["image"] = f"{name}:{entry['newTag']}" if "newTag" in entry else name
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def settings_names() -> set[str]:
    """The environment variables Settings.from_env reads (recorded while it reads an empty environment)."""

    class Recorder(dict):
        def get(self, key, default=None):
            seen.add(key)
            return super().get(key, default)

    seen: set[str] = set()
    Settings.from_env(Recorder())
    return seen


def container_environment(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment Kubernetes gives a container: envFrom, then env with $(VAR) expanded from earlier ones."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            secret = find(docs, "Secret", source["secretRef"]["name"])["data"]
            env.update({k: base64.b64decode(v).decode() for k, v in secret.items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = base64.b64decode(find(docs, "Secret", ref["name"])["data"][ref["key"]]).decode()
    return env


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and In expressions) against a set of labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", "extend selects() for other operators"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert numbers, f"no container port named {port!r}"
    return numbers[0]


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render()


# --- valid Kubernetes ---

@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_every_manifest_is_valid_against_the_kubernetes_schemas(docs, version):
    kinds = set()
    for doc in docs:
        try:
            k8s_schemas.validate(doc, version, strict=True)  # strict: unknown fields (typos) are errors too
        except k8s_schemas.ValidationError as exc:
            error = exc.caused_by
            where = "/".join(str(p) for p in error.absolute_path)
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} at {where}: {error.message} (Kubernetes {version})")
        kinds.add(doc["kind"])
    assert kinds == {"Namespace", "PersistentVolumeClaim", "Service", "StatefulSet", "Deployment", "NetworkPolicy",
                     "PodDisruptionBudget", "ConfigMap", "Secret"}


def test_the_schema_check_catches_a_misspelt_field(docs):
    broken = copy.deepcopy(find(docs, "Deployment", "sam-trimap-backend"))
    container = containers(broken)[0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(k8s_schemas.ValidationError):
        k8s_schemas.validate(broken, NEWEST, strict=True)


def test_the_kustomization_lists_every_file_and_the_secrets_stay_out_of_git():
    config = kustomization()
    listed = set(config["resources"]) | {name for g in config["configMapGenerator"] + config["secretGenerator"]
                                         for name in g["envs"]}
    present = {p.name for p in FOLDER.iterdir()} - {"secrets.env"}
    extras = {"kustomization.yaml", "secrets.env.example", ".gitignore"}
    assert present - extras == listed - {"secrets.env"}
    assert "secrets.env" in (FOLDER / ".gitignore").read_text().split()
    assert config["namespace"] == find(render(), "Namespace", config["namespace"])["metadata"]["name"]


# --- the backend ---

def test_backend_probes_hit_ready_and_health_on_the_served_port(docs):
    deployment = find(docs, "Deployment", "sam-trimap-backend")
    container = containers(deployment)[0]
    port = int(container_environment(docs, container)["PORT"])
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/ready"  # 503 while SAM loads or failed: no clicks sent there
    assert probes["livenessProbe"]["path"] == "/health"  # 200 whenever the process is up
    assert probes["startupProbe"]["path"] == "/ready"
    for probe in probes.values():
        assert port_number(container, probe["port"]) == port
        assert probe["path"] in PUBLIC_PATHS  # probes carry no credentials
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # SAM's download and load


def test_the_service_reaches_the_backend_port_and_its_dotted_name_passes_the_host_check(docs):
    service = find(docs, "Service", "sam-trimap-backend")
    deployment = find(docs, "Deployment", "sam-trimap-backend")
    container = containers(deployment)[0]
    assert service["spec"]["type"] == "ClusterIP"
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(deployment))
    assert not selects({"matchLabels": service["spec"]["selector"]},
                       pod_labels(find(docs, "Deployment", "sam-trimap-worker")))
    (port,) = service["spec"]["ports"]
    settings = Settings.from_env(container_environment(docs, container))
    assert port_number(container, port["targetPort"]) == settings.port
    namespace = service["metadata"]["namespace"]
    # Label Studio 1.23.2 registers no webhook for a dotless host: the name users connect must have dots.
    url_host = f"{service['metadata']['name']}.{namespace}.svc"
    policy = HostPolicy(settings)
    assert policy.allowed(f"{url_host}:{port['port']}")
    assert policy.allowed(f"{url_host}.cluster.local:{port['port']}")
    assert not policy.allowed(f"{service['metadata']['name']}.elsewhere.svc:{port['port']}")


@pytest.mark.parametrize("name", ["sam-trimap-backend", "sam-trimap-worker"])
def test_every_variable_is_a_setting_and_the_settings_load(docs, name):
    container = containers(find(docs, "Deployment", name))[0]
    env = container_environment(docs, container)
    unknown = set(env) - settings_names() - NOT_SETTINGS
    assert not unknown, f"{name}: not settings (ml_backend/settings.py): {sorted(unknown)}"
    settings = Settings.from_env(env)  # raises SettingsError on a bad value
    redis = find(docs, "Service", "sam-trimap-redis")
    url = urlsplit(settings.redis_url)
    assert (url.hostname, url.port) == (redis["metadata"]["name"], redis["spec"]["ports"][0]["port"])
    assert url.password == TEST_SECRETS["REDIS_PASSWORD"]
    assert settings.label_studio_api_key == TEST_SECRETS["LABEL_STUDIO_API_KEY"]
    if name == "sam-trimap-backend":
        check_exposure(settings)  # HOST=0.0.0.0 is served only with basic auth
        assert settings.basic_auth and settings.basic_auth_pass == TEST_SECRETS["BASIC_AUTH_PASS"]
        assert settings.host == "0.0.0.0"
    else:
        assert settings.embedding_store_mb > 0  # the embedding worker refuses to start without a store


def test_backend_and_worker_share_the_model_embedding_and_image_volumes_read_write_many(docs):
    mounted: dict[str, dict[str, str]] = {}
    for name in ("sam-trimap-backend", "sam-trimap-worker"):
        deployment = find(docs, "Deployment", name)
        container = containers(deployment)[0]
        settings = Settings.from_env(container_environment(docs, container))
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in deployment["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        mounted[name] = {}
        for setting in ("model_dir", "embedding_store_dir", "image_cache_dir"):
            path = str(getattr(settings, setting))
            assert mounts.get(path) in claims, f"{name}: {setting.upper()}={path} is not on a volume claim"
            mounted[name][setting] = claims[mounts[path]]
    assert mounted["sam-trimap-backend"] == mounted["sam-trimap-worker"]
    assert len(set(mounted["sam-trimap-backend"].values())) == 3
    for claim in mounted["sam-trimap-backend"].values():
        assert find(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]


# --- the worker ---

def test_the_worker_runs_the_compose_workers_on_a_gpu_node(docs):
    compose = yaml.safe_load(COMPOSE.read_text())
    deployment = find(docs, "Deployment", "sam-trimap-worker")
    container = containers(deployment)[0]
    assert container["args"] == compose["services"]["worker"]["command"]
    assert "command" not in container  # the image's own entry point, as in compose
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    backend = containers(find(docs, "Deployment", "sam-trimap-backend"))[0]
    assert container["image"] == backend["image"]
    assert backend["args"] == ["python", "-m", "ml_backend", "serve"]  # the image's CMD (docker/Dockerfile)
    assert '["python", "-m", "ml_backend", "serve"]' in DOCKERFILE.read_text()


# --- Redis, the secrets, the pods' security ---

def test_only_backend_and_worker_pods_reach_redis_and_it_needs_the_password(docs):
    policy = find(docs, "NetworkPolicy", "sam-trimap-redis")
    redis = find(docs, "StatefulSet", "sam-trimap-redis")
    assert selects(policy["spec"]["podSelector"], pod_labels(redis))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    allowed = rule["from"]
    assert all(set(p) == {"podSelector"} for p in allowed)  # no namespace- or IP-wide allowance
    container = containers(redis)[0]
    assert [p["port"] for p in rule["ports"]] == [port_number(container, "redis")]
    for name in ("sam-trimap-backend", "sam-trimap-worker"):
        labels = pod_labels(find(docs, "Deployment", name))
        assert any(selects(p["podSelector"], labels) for p in allowed), name
    others = [{"app.kubernetes.io/name": "label-studio"}, pod_labels(redis),
              {"app.kubernetes.io/name": "other", "app.kubernetes.io/component": "backend"},
              *({"app.kubernetes.io/name": "sam-trimap", "app.kubernetes.io/component": c}
                for c in ("label-studio", "redis", "ingress", ""))]
    for labels in others:
        assert not any(selects(p["podSelector"], labels) for p in allowed), labels
    args = container["args"]
    env = container_environment(docs, container)
    password = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], args[args.index("--requirepass") + 1])
    assert password == TEST_SECRETS["REDIS_PASSWORD"]


def test_every_secret_and_config_reference_names_a_generated_key(docs):
    config = kustomization()
    secret_name = config["secretGenerator"][0]["name"]
    secret_keys = set(read_env_file(FOLDER / "secrets.env.example"))
    assert secret_keys == {"BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_API_KEY", "REDIS_PASSWORD"}
    used = set()
    for doc in docs:
        for container in containers(doc):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret_name and ref["key"] in secret_keys, ref
                    used.add(ref["key"])
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] == config["configMapGenerator"][0]["name"]
    assert used == secret_keys
    # secrets only in the Secret: none of them in the ConfigMap
    assert not secret_keys & set(find(docs, "ConfigMap", config["configMapGenerator"][0]["name"])["data"])


def test_pods_run_as_non_root_on_read_only_root_file_systems(docs):
    image_uid = int(re.search(r"useradd .*--uid (\d+)", DOCKERFILE.read_text()).group(1))
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        assert selects(doc["spec"]["selector"], pod_labels(doc))
        if doc["metadata"]["name"] != "sam-trimap-redis":
            assert pod["securityContext"]["runAsUser"] == image_uid
        for container in containers(doc):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"requests", "limits"} <= set(container["resources"])
            assert "memory" in container["resources"]["limits"]
