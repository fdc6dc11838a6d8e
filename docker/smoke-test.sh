#!/usr/bin/env bash
# Smoke test of docker/Dockerfile.cpu on a CPU machine with no image registry:
#   docker daemon -> Debian base image from debootstrap -> build -> run -> /health -> one completion -> stop.
#
#   bash docker/smoke-test.sh          (as root, from anywhere; uses the checkout it lies in)
#
# Needs root, Debian's packages (docker.io and debootstrap are installed if missing) and PyPI (pip
# inside the build). The torch wheel comes from `pip download torch==$TORCH_VERSION` on this host when
# that gives a CPU build (no torch download in the build), else the build fetches the CPU build.
# Cached between runs: the base image (and its tarball under $CACHE_DIR) and docker's build cache.
# Environment: CACHE_DIR, DEBIAN_MIRROR, HOST_CA_BUNDLE (CAs the base image trusts besides Debian's),
# TORCH_VERSION, TORCH_WHEEL (a wheel file to use), PORT, NO_CACHE=1 (build without docker's layer
# cache), KEEP_DOCKERD=1 (leave running a daemon this script started).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${CACHE_DIR:-/var/cache/deltaserve-smoke}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PORT="${PORT:-8000}"  # the image's HEALTHCHECK asks port 8000; another port skips that check
BASE_PACKAGES="python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates"
HOST_CA_BUNDLE="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
BASE_RECIPE=2  # bump when the way the base image is made changes, so cached ones are remade
BASE_TAG="deltaserve-smoke/bookworm-base:$(cat <(echo "$BASE_RECIPE $BASE_PACKAGES") "$HOST_CA_BUNDLE" 2>/dev/null \
    | sha256sum | cut -c1-12)"
IMAGE="deltaserve-smoke:cpu"
CONTAINER="deltaserve-smoke-$$"
HEALTH_TIMEOUT=180

started_dockerd=""
copied_wheel=""
t_all=$SECONDS
t_phase=$SECONDS
phase_name=""

log() { echo "[smoke] $*"; }
die() { echo "[smoke] FAILED${phase_name:+ in phase '$phase_name'}: $*" >&2; exit 1; }
phase() {
    [ -n "$phase_name" ] && log "phase '$phase_name' took $((SECONDS - t_phase)) s"
    phase_name="$1"; t_phase=$SECONDS
    [ -n "$phase_name" ] && log "phase '$phase_name' ..."
    return 0
}

cleanup() {
    local rc=$?
    set +e
    if docker inspect "$CONTAINER" >/dev/null 2>&1; then
        if [ "$rc" -ne 0 ]; then
            echo "[smoke] last lines of the container's log:" >&2
            docker logs --tail 40 "$CONTAINER" >&2 2>&1
        fi
        docker rm -f "$CONTAINER" >/dev/null 2>&1
    fi
    [ -n "$copied_wheel" ] && rm -f "$copied_wheel"
    if [ -n "$started_dockerd" ] && [ -z "${KEEP_DOCKERD:-}" ]; then
        kill "$started_dockerd" 2>/dev/null && wait "$started_dockerd" 2>/dev/null
    fi
    if [ "$rc" -eq 0 ]; then log "PASSED in $((SECONDS - t_all)) s"; fi
    exit "$rc"
}
trap cleanup EXIT

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages, starts dockerd and runs debootstrap)"

# --- docker daemon --------------------------------------------------------------------------------
phase "docker daemon"
apt_updated=""
apt_install() {
    [ -n "$apt_updated" ] || { apt-get update -qq || die "apt-get update failed"; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}
command -v dockerd >/dev/null || { log "installing docker.io"; apt_install docker.io; }
command -v docker >/dev/null || die "no docker client after installing docker.io"
if ! docker info >/dev/null 2>&1; then
    log "starting dockerd (vfs storage, no iptables, no bridge; log in $CACHE_DIR/dockerd.log)"
    mkdir -p "$CACHE_DIR"
    dockerd --storage-driver=vfs --iptables=false --bridge=none >"$CACHE_DIR/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$started_dockerd" 2>/dev/null || die "dockerd exited: $(tail -3 "$CACHE_DIR/dockerd.log")"
        sleep 1
    done
    docker info >/dev/null 2>&1 || die "dockerd did not answer within 60 s"
fi

# --- base image -----------------------------------------------------------------------------------
phase "base image"
if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    log "using $BASE_TAG"
else
    tarball="$CACHE_DIR/${BASE_TAG##*:}-bookworm.tar"
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || { log "installing debootstrap"; apt_install debootstrap; }
        rootfs="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
        log "debootstrap bookworm (minbase + $BASE_PACKAGES) from $DEBIAN_MIRROR"
        debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$DEBIAN_MIRROR" \
            >"$CACHE_DIR/debootstrap.log" 2>&1 || die "debootstrap failed: see $CACHE_DIR/debootstrap.log"
        # Trust what this host trusts (a TLS-inspecting proxy's CA, say), so that pip inside the
        # build reaches PyPI wherever pip on the host does.
        if [ -s "$HOST_CA_BUNDLE" ]; then
            cp "$HOST_CA_BUNDLE" "$rootfs/usr/local/share/ca-certificates/host-bundle.crt"
            chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed"
        fi
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        chmod 755 "$rootfs"  # mktemp made it 0700, and it becomes the image's /
        tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    log "docker import $tarball"
    docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$tarball" "$BASE_TAG" >/dev/null \
        || die "docker import failed"
fi

# --- build ----------------------------------------------------------------------------------------
phase "build"
wheel="${TORCH_WHEEL:-}"
if [ -z "$wheel" ]; then
    mkdir -p "$CACHE_DIR/wheels"
    if python3 -m pip download --quiet "torch==$TORCH_VERSION" --no-deps -d "$CACHE_DIR/wheels" >/dev/null 2>&1; then
        wheel="$(ls "$CACHE_DIR/wheels"/torch-"$TORCH_VERSION"+cpu-*.whl 2>/dev/null | head -1 || true)"
    fi
fi
if [ -n "$wheel" ]; then
    [ -f "$wheel" ] || die "no such wheel: $wheel"
    copied_wheel="$REPO/docker/wheels/$(basename "$wheel")"
    ln -f "$wheel" "$copied_wheel" 2>/dev/null || cp "$wheel" "$copied_wheel"
    log "torch from $(basename "$wheel") in the build context"
else
    log "no local CPU torch wheel: the build downloads torch $TORCH_VERSION"
fi
build_log="$CACHE_DIR/build.log"
mkdir -p "$CACHE_DIR"
docker build --network host ${NO_CACHE:+--no-cache} -f "$REPO/docker/Dockerfile.cpu" \
    --build-arg BASE_IMAGE="$BASE_TAG" --build-arg TORCH_VERSION="$TORCH_VERSION" -t "$IMAGE" "$REPO" \
    >"$build_log" 2>&1 || { tail -30 "$build_log" >&2; die "docker build failed (log: $build_log)"; }
log "image size: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"

# --- run ------------------------------------------------------------------------------------------
phase "start and /health"
python3 - "$PORT" <<'EOF' || die "port $PORT on 127.0.0.1 is taken; set PORT to a free one"
import socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", int(sys.argv[1])))
EOF
docker run -d --name "$CONTAINER" --network host --health-interval 2s "$IMAGE" \
    --host 127.0.0.1 --port "$PORT" >/dev/null || die "docker run failed"
deadline=$((SECONDS + HEALTH_TIMEOUT))
until curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; do
    [ "$(docker inspect -f '{{.State.Running}}' "$CONTAINER")" = true ] || die "the container exited"
    [ "$SECONDS" -lt "$deadline" ] || die "/health did not answer 200 within $HEALTH_TIMEOUT s"
    sleep 1
done

phase "completion"
reply="$(curl -fsS "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "deltaserve-stdlib", "prompt": "def fibonacci(n):", "max_tokens": 8, "temperature": 0}')" \
    || die "POST /v1/completions failed"
python3 - "$reply" <<'EOF' || die "unexpected completion reply: $reply"
import json, sys
reply = json.loads(sys.argv[1])
assert reply["object"] == "text_completion", reply
assert reply["model"] == "deltaserve-stdlib", reply
choice = reply["choices"][0]
assert isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop"), choice
assert 1 <= reply["usage"]["completion_tokens"] <= 8, reply["usage"]
print(f"[smoke] completion: {reply['usage']['completion_tokens']} tokens, finish_reason {choice['finish_reason']}")
EOF

if [ "$PORT" = 8000 ]; then
    phase "image HEALTHCHECK"
    deadline=$((SECONDS + 60))
    until [ "$(docker inspect -f '{{.State.Health.Status}}' "$CONTAINER")" = healthy ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "docker never reported the container healthy"
        sleep 1
    done
fi

phase "stop"
# SIGTERM reaches the server directly (exec-form ENTRYPOINT): it drains and exits 0 well before
# docker's 10 s kill.
docker stop "$CONTAINER" >/dev/null || die "docker stop failed"
code="$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")"
[ "$code" = 0 ] || die "the server exited with $code on SIGTERM (137: it had to be killed)"
docker rm "$CONTAINER" >/dev/null
phase ""
