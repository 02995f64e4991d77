#!/usr/bin/env bash
# Idempotent installer: builds .venv in the repository (and, with --test, the test tools).
#   --deps-only   the dependencies without the project itself (docker/Dockerfile: cached apart from the code)
# Two packages must go in with --no-deps (see README "Why the installer exists"), so a plain
# `pip install .` is not enough; this script runs the steps in the order that works.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # install torch first: a looser pin pulls a CUDA build on CPU-only hosts
WITH_TEST=0
DEPS_ONLY=0
[ "${1:-}" = "--test" ] && WITH_TEST=1
[ "${1:-}" = "--deps-only" ] && DEPS_ONLY=1

log() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

.venv/bin/python -c "import torch" 2>/dev/null || { log "installing $TORCH_SPEC"; "${PIP[@]}" "$TORCH_SPEC"; }

log "installing runtime dependencies"
"${PIP[@]}" "keras>=3.15" absl-py numpy packaging regex rich "kagglehub!=1.0.1" "kagglesdk==0.1.28" \
    sentencepiece tokenizers "flask>=3" requests label-studio-tools lxml attrs appdirs colorama \
    "rq>=1.16" "redis>=5" "gunicorn>=22" "pillow>=10" "matplotlib>=3.8" tqdm safetensors "prometheus-client>=0.20" \
    "opencv-python-headless>=4.12,<4.13" "orjson>=3.9" "isal>=1.6"  # opencv: what the tests run with (label-studio-sdk pins the same); orjson: the /predict answer; isal: the bitmask PNG's deflate
"${PIP[@]}" --no-deps "keras-hub==0.32.0" "label-studio-ml==1.0.9"
[ "$DEPS_ONLY" = 1 ] || "${PIP[@]}" --no-deps --no-build-isolation -e .

if [ "$WITH_TEST" = 1 ]; then
    log "installing test tools (pip's complaint that keras-hub lacks tensorflow-text is expected: we never use it)"
    "${PIP[@]}" "pytest>=8" pytest-timeout pyyaml "hypothesis>=6.100" "selenium>=4.20"
    "${PIP[@]}" --no-deps "segment-anything==1.0"
    "${PIP[@]}" "label-studio-sdk==2.1.2"
    # SAM 3 parity reference (test only); needs neither TensorFlow nor a newer torch (checked: pip keeps 2.13.0)
    "${PIP[@]}" "transformers>=5.24,<6"
    if [ ! -x .venv-ls/bin/label-studio ]; then
        log "installing Label Studio 1.23.2 into .venv-ls (end-to-end tests)"
        "$PYTHON" -m venv .venv-ls
        .venv-ls/bin/python -m pip install --disable-pip-version-check -q "label-studio==1.23.2"
    fi
    # Debian packages: a real Redis for the queue tests; the Docker engine, docker-compose and debootstrap for
    # the compose test (tests/test_compose_stack.py builds every image here: no image registry is reachable);
    # Chromium and its driver for the browser test (selenium drives /usr/bin/chromedriver: nothing downloads one).
    missing=()
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo); fi
        # --error-on=any: without it apt-get update exits 0 when it could not fetch the package lists.
        "${SUDO[@]}" apt-get update -qq --error-on=any \
            || die "apt-get update failed, so ${missing[*]} cannot be installed (the tests need them)"
        DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed (the tests need them)"
    fi
    # The tests that need these fail under CI=true when they are missing: say so here, first.
    command -v redis-server >/dev/null 2>&1 || die "redis-server is still missing"
    command -v dockerd >/dev/null 2>&1 || die "dockerd is still missing after installing docker.io (compose test)"
    command -v docker-compose >/dev/null 2>&1 || die "docker-compose is still missing (compose test)"
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] \
        || die "debootstrap is still missing (the compose test builds its base image with it)"
    # segment_anything imports torchvision only to resize; the benchmarks' loader supplies a stand-in
    # (PyPI's torchvision does not load beside the torch we pin), so check the import the tests use.
    .venv/bin/python -c "import label_studio_sdk.converter.brush
from benchmarks.official_sam import segment_anything_module
segment_anything_module().SamPredictor" \
        || die "the test oracles (label-studio-sdk, segment-anything) do not import"
    [ -x .venv-ls/bin/label-studio ] || die ".venv-ls/bin/label-studio is missing (end-to-end tests)"
    for tool in /usr/bin/chromium /usr/bin/chromedriver; do
        [ -x "$tool" ] || die "$tool is missing after installing chromium and chromium-driver (browser test)"
    done
    .venv/bin/python -c "import selenium" || die "selenium does not import (browser test)"

    # --- Kubernetes manifests (issue 25): tests/test_kubernetes.py validates deploy/kubernetes offline against
    # the Kubernetes JSON schemas this package ships (1.25 to its own version; no download at test time) ---
    "${PIP[@]}" "kubernetes-validate>=1.34,<2"
    .venv/bin/python -c "import kubernetes_validate.utils" \
        || die "kubernetes-validate does not import (tests/test_kubernetes.py checks the Kubernetes manifests)"

    # --- the manual (issue 24): tests/test_docs.py runs `mkdocs build --strict` on docs/ ---
    "${PIP[@]}" "mkdocs>=1.6,<2"
    .venv/bin/python -c "import mkdocs" || die "mkdocs does not import (tests/test_docs.py builds the manual)"
fi
log "done"
