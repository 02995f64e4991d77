#!/usr/bin/env bash
# Builds the images of docker/docker-compose.yml on a host that reaches package indexes (PyPI, Debian)
# but no image registry. Talks to the engine in DOCKER_HOST (scripts/docker_engine.sh starts one).
#
#   scripts/docker_images.sh standins        stand-ins for python:3.11-slim-bookworm (debootstrap),
#                                            heartexlabs/label-studio:1.23.2 (PyPI) and redis (Debian);
#                                            prints the LABEL_STUDIO_IMAGE= / REDIS_IMAGE= / BASE_IMAGE= lines
#   scripts/docker_images.sh backend TAG [docker build options...]
#                                            docker/Dockerfile with this host's pip settings (index URLs,
#                                            CA bundle, local wheel folders) handed to its build stage
#   scripts/docker_images.sh balancer TAG [docker build options...]
#                                            docker/balancer/Dockerfile (HAProxy from Debian's packages); the
#                                            test passes --build-arg DEBIAN_IMAGE=<the stand-in base>
#
# A stand-in is rebuilt only when its recipe changed (a label on the image holds the recipe's hash), so with
# a persistent data root a second run builds nothing. Heavy steps run under `nice`.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_TAG="${STANDIN_BASE_IMAGE:-sam-trimap-standin/python:3.11-slim-bookworm}"
LABEL_STUDIO_TAG="${STANDIN_LABEL_STUDIO_IMAGE:-sam-trimap-standin/label-studio:1.23.2}"
REDIS_TAG="${STANDIN_REDIS_IMAGE:-sam-trimap-standin/redis:7-bookworm}"
DOCKER="$(command -v /usr/bin/docker || command -v docker || true)"
export DOCKER_BUILDKIT=0  # the classic builder: Debian's docker.io has no buildx, and --network host works

log() { printf '[docker_images] %s\n' "$*" >&2; }
die() { printf '[docker_images] ERROR: %s\n' "$*" >&2; exit 1; }
[ -n "$DOCKER" ] || die "the docker client is missing: apt-get install docker.io"
[ -n "${DOCKER_HOST:-}" ] || log "DOCKER_HOST is not set: using the default engine"

# The first value pip has for KEY (environment first, then config files), e.g. cert, find-links.
pip_setting() {
    python3 -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" | head -n 1
}

# Fills DIR with ca.pem (this host's CA bundle for the package index) and wheels/ (the wheels of pip's
# local find-links folders): what a build stage may use and the final image never holds.
prepare_pip_context() {
    local dir="$1" cert links link
    rm -rf "$dir/ca.pem" "$dir/wheels"
    mkdir -p "$dir/wheels"
    cert="${PIP_CERT:-$(pip_setting cert)}"
    [ -n "$cert" ] || cert=/etc/ssl/certs/ca-certificates.crt
    [ -f "$cert" ] || die "CA bundle $cert not found (set PIP_CERT)"
    cp "$cert" "$dir/ca.pem"
    links="${PIP_FIND_LINKS:-$(pip_setting find-links)}"
    for link in $links; do
        link="${link#file://}"
        [ -d "$link" ] || continue  # URLs of wheel pages are reachable from the build as they are
        find "$link" -maxdepth 1 -name '*.whl' -exec cp -l {} "$dir/wheels/" \; 2>/dev/null \
            || find "$link" -maxdepth 1 -name '*.whl' -exec cp {} "$dir/wheels/" \;
    done
}

# The http(s) index URLs of this host's pip settings (file:// ones are host paths a build cannot see).
pip_index_args() {
    local index extra url kept=()
    index="${PIP_INDEX_URL:-$(pip_setting index-url)}"
    case "$index" in http://*|https://*) echo "--build-arg=PIP_INDEX_URL=$index" ;; esac
    extra="${PIP_EXTRA_INDEX_URL:-$(pip_setting extra-index-url)}"
    for url in $extra; do case "$url" in http://*|https://*) kept+=("$url") ;; esac; done
    [ "${#kept[@]}" -eq 0 ] || echo "--build-arg=PIP_EXTRA_INDEX_URL=${kept[*]}"
}

recipe_hash() { cat "$@" | sha256sum | cut -c1-16; }

# True when TAG exists and was built from the recipe with hash HASH.
is_current() {
    [ "$("$DOCKER" image inspect -f '{{ index .Config.Labels "sam-trimap.recipe" }}' "$1" 2>/dev/null)" = "$2" ]
}

debian_mirror() {
    local mirror="${DEBIAN_MIRROR:-}"
    [ -n "$mirror" ] || mirror="$(grep -h -A3 -E '^Types: deb$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | sed -n 's/^URIs: *\([^ ]*\).*/\1/p' | grep -E '/debian/?$' | head -n 1 || true)"
    [ -n "$mirror" ] || mirror="$(sed -n 's/^deb \(\[[^]]*\] \)\?\([^ ]*\) bookworm .*/\2/p' /etc/apt/sources.list 2>/dev/null \
        | head -n 1 || true)"
    echo "${mirror:-http://deb.debian.org/debian}"
}

build_base() {
    local hash root packages=python3,python3-venv,ca-certificates
    hash="$(echo "debootstrap minbase bookworm $packages" | sha256sum | cut -c1-16)"
    if is_current "$BASE_TAG" "$hash"; then log "$BASE_TAG is current"; return; fi
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is missing: apt-get install debootstrap"
    root="$(mktemp -d)"
    log "bootstrapping Debian bookworm into $root from $(debian_mirror) (about 2 minutes)"
    nice -n 10 debootstrap --variant=minbase --include="$packages" bookworm "$root" "$(debian_mirror)" \
        >"$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; rm -rf "$root" "$root.log"; die "debootstrap failed"; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | "$DOCKER" import --change "LABEL sam-trimap.recipe=$hash" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_TAG" >/dev/null
    rm -rf "$root" "$root.log"
    # The official image has `python`; Debian has python3 only. A one-line layer makes them alike.
    printf 'FROM %s\nRUN ln -s /usr/bin/python3 /usr/local/bin/python\nLABEL sam-trimap.recipe=%s\n' \
        "$BASE_TAG" "$hash" | "$DOCKER" build -q -t "$BASE_TAG" - >/dev/null
    log "built $BASE_TAG"
}

build_standin() {  # TAG RECIPE
    local tag="$1" recipe="$2" hash context
    hash="$(recipe_hash "$recipe" <(echo "$BASE_TAG") <("$DOCKER" image inspect -f '{{.Id}}' "$BASE_TAG"))"
    if is_current "$tag" "$hash"; then log "$tag is current"; return; fi
    context="$(mktemp -d)"
    prepare_pip_context "$context"
    log "building $tag from $recipe"
    nice -n 10 "$DOCKER" build -q --network host --build-arg "BASE_IMAGE=$BASE_TAG" --label "sam-trimap.recipe=$hash" \
        -f "$recipe" -t "$tag" "$context" >/dev/null || { rm -rf "$context"; die "building $tag failed"; }
    rm -rf "$context"
    log "built $tag"
}

case "${1:-}" in
standins)
    build_base
    build_standin "$LABEL_STUDIO_TAG" docker/standins/label-studio.Dockerfile
    build_standin "$REDIS_TAG" docker/standins/redis.Dockerfile
    echo "BASE_IMAGE=$BASE_TAG"
    echo "LABEL_STUDIO_IMAGE=$LABEL_STUDIO_TAG"
    echo "REDIS_IMAGE=$REDIS_TAG"
    ;;
backend)
    tag="${2:?usage: $0 backend TAG [docker build options...]}"
    shift 2
    prepare_pip_context docker/pip
    mapfile -t index_args < <(pip_index_args)
    log "building $tag from docker/Dockerfile"
    nice -n 10 "$DOCKER" build --network host "${index_args[@]}" "$@" -f docker/Dockerfile -t "$tag" .
    ;;
balancer)
    tag="${2:?usage: $0 balancer TAG [docker build options...]}"
    shift 2
    log "building $tag from docker/balancer/Dockerfile"
    nice -n 10 "$DOCKER" build --network host "$@" -t "$tag" docker/balancer
    ;;
*)
    die "usage: $0 standins | backend TAG [docker build options...] | balancer TAG [docker build options...]"
    ;;
esac
