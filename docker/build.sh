#!/usr/bin/env bash
# Build the trainer image (docker/Dockerfile) with docker where a Docker engine answers, else with
# podman (Debian: apt-get install podman buildah debootstrap). `make image` runs this.
#
#   docker/build.sh                      # tag ctrlnet-trainer:<version> (IMAGE=... to change it)
#   CTRLNET_BASE=local docker/build.sh   # a local Debian base instead of the CUDA image
#
# Where no container registry can be reached (CTRLNET_BASE=auto, the default, probes it), the base
# is made locally: debootstrap of Debian bookworm (minbase), imported as localhost/ctrlnet-base:
# bookworm and kept for the next build (the CUDA image stays the default where a registry answers).
# podman builds get this machine's pip settings (find-links folders, CA bundle, constraints, extra
# indexes) as read-only mounts for the RUN steps: used by pip, never written into a layer.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
IMAGE=${IMAGE:-ctrlnet-trainer:${VERSION}}
BASE=${CTRLNET_BASE:-auto}
LOCAL_BASE=localhost/ctrlnet-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE=$(git remote get-url origin 2>/dev/null | sed -E 's#//[^/@]*@#//#' || true)
say() { echo "build.sh: $*" >&2; }

if command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1; then
  ENGINE=docker
elif command -v podman >/dev/null; then
  ENGINE=podman
else
  say "no container engine: install docker, or podman (apt-get install podman buildah debootstrap)"
  exit 2
fi

registry_reachable() {
  timeout 10 "$ENGINE" manifest inspect docker.io/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 >/dev/null 2>&1 \
    || timeout 10 "$ENGINE" image exists nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 2>/dev/null
}

local_base() {
  if "$ENGINE" image exists "$LOCAL_BASE" 2>/dev/null; then
    say "base: $LOCAL_BASE (cached)"
    return
  fi
  command -v debootstrap >/dev/null || { say "no debootstrap: apt-get install debootstrap"; exit 2; }
  local root
  root=$(mktemp -d /var/tmp/ctrlnet-base.XXXXXX)
  say "base: debootstrap bookworm from $DEBIAN_MIRROR into $root (once per machine)"
  debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | "$ENGINE" import --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
  rm -rf "$root"
}

BUILD_ARGS=(--build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" --build-arg "SOURCE=${SOURCE:-unknown}")
case "$BASE" in
  local) local_base; BUILD_ARGS+=(--build-arg "CUDA_IMAGE=$LOCAL_BASE") ;;
  auto)
    if registry_reachable; then
      say "base: the CUDA image (registry reachable)"
    else
      say "no registry reachable: building on a local Debian base instead of the CUDA image"
      local_base
      BUILD_ARGS+=(--build-arg "CUDA_IMAGE=$LOCAL_BASE")
    fi
    ;;
  cuda) ;;
  *) say "CTRLNET_BASE must be auto, local or cuda (got $BASE)"; exit 2 ;;
esac

if [ "$ENGINE" = docker ]; then
  exec docker build -f docker/Dockerfile -t "$IMAGE" "${BUILD_ARGS[@]}" .
fi

# podman: pip's settings of this machine, mounted read-only into the RUN steps.
conf=$(mktemp -d /var/tmp/ctrlnet-pip.XXXXXX)
trap 'rm -rf "$conf"' EXIT
MOUNTS=()
{
  echo "[global]"
  cert=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}
  if [ -n "$cert" ] && [ -f "$cert" ]; then
    MOUNTS+=(-v "$cert:/run/ctrlnet-build/ca.crt:ro")
    echo "cert = /run/ctrlnet-build/ca.crt"
  fi
  links=""
  for dir in ${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}; do
    if [ -d "$dir" ]; then
      n=${#MOUNTS[@]}
      MOUNTS+=(-v "$dir:/run/ctrlnet-build/links$n:ro")
      links="$links /run/ctrlnet-build/links$n"
    fi
  done
  [ -n "$links" ] && echo "find-links =$links"
  extra=$(pip config get global.extra-index-url 2>/dev/null | tr ' ' '\n' | grep -v '^file:' | tr '\n' ' ' || true)
  [ -n "${extra// /}" ] && echo "extra-index-url = $extra"
  index=${PIP_INDEX_URL:-$(pip config get global.index-url 2>/dev/null || true)}
  [ -n "$index" ] && echo "index-url = $index"
  constraint=$(pip config get global.constraint 2>/dev/null || true)
  if [ -n "$constraint" ] && [ -f "$constraint" ]; then
    MOUNTS+=(-v "$constraint:/run/ctrlnet-build/constraints.txt:ro")
    echo "constraint = /run/ctrlnet-build/constraints.txt"
  fi
  echo "timeout = 180"
} > "$conf/pip.conf"
MOUNTS+=(-v "$conf/pip.conf:/etc/pip.conf:ro")
# Disk: the build stage (~2.8 GB), the image (~2.7 GB) and the layer being committed need about
# 12 GB at once under podman's storage. Each build leaves the previous image of this tag and the
# build stage untagged; they are dropped after a good build, and --force-rm drops a failed build's
# working containers, so repeated builds on one machine (CI) do not fill its disk.
store=$(podman info --format '{{.Store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers/storage)
mkdir -p "$store"
free_gb=$(df -Pk "$store" | awk 'NR==2 {printf "%d", $4/1048576}')
if [ "${free_gb:-0}" -lt "${CTRLNET_BUILD_MIN_FREE_GB:-12}" ]; then
  say "only ${free_gb} GB free under $store; the build needs about 12 GB: free space (podman image prune; buildah rm --all) and rerun"
  exit 2
fi
say "podman build -> $IMAGE"
podman build --network host --isolation chroot --force-rm -f docker/Dockerfile -t "$IMAGE" "${BUILD_ARGS[@]}" "${MOUNTS[@]}" .
# Untagged images only (the replaced image, the build stage): tagged images and the local base stay.
podman image prune -f >/dev/null 2>&1 || say "could not prune untagged images (podman image prune)"
podman image inspect "$IMAGE" --format '{{.Size}}' | awk -v img="$IMAGE" '{printf "build.sh: %s: %.2f GB\n", img, $1/1e9}' >&2
