#!/usr/bin/env bash
# deploy/docker/compose.yaml on this machine, with podman-compose and no image registry:
#
#   bash deploy/docker/compose-local.sh build   # the three local images (cached; first time a few minutes)
#   SD_MODEL_DIR=/path/to/bundle bash deploy/docker/compose-local.sh up     # build if needed, then up -d
#   bash deploy/docker/compose-local.sh down    # stop and remove the stack (and the broker's volume)
#
# Images (compose.local.yaml swaps them in): localhost/stream-detector:cpu (build-local.sh),
# localhost/sd-kafka:4.1.1 (kafka/Dockerfile on a Debian JRE base, the jars fetched with Maven by
# deploy/kafka/broker.sh provision) and localhost/sd-prometheus:bookworm (Debian's prometheus package).
# Needs podman, podman-compose, runc, mmdebstrap and Maven (Debian: apt-get install podman podman-compose
# runc mmdebstrap maven). The gpu profile is not started (no CUDA base image without a registry).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
engine="$here/engine.sh"
kafka_version="${SD_KAFKA_VERSION:-4.1.1}"
cache="${SD_KAFKA_IMAGE_CACHE:-$HOME/.cache/stream-detector/kafka-image-$kafka_version}"
services=(kafka topics detector prometheus)

have_image() { "$engine" image exists "$1" 2>/dev/null; }

debian_image() {  # NAME PACKAGES [--change ...]: a Debian bookworm image with PACKAGES, made once with mmdebstrap
  local name=$1 packages=$2; shift 2
  have_image "$name" && return 0
  local scratch; scratch="$(mktemp -d)"
  echo "compose-local.sh: making $name (Debian bookworm + $packages) with mmdebstrap" >&2
  mmdebstrap --quiet --variant=apt --aptopt='APT::Install-Recommends "false"' --include="$packages" bookworm "$scratch/rootfs.tar"
  "$engine" import "$@" "$scratch/rootfs.tar" "$name" >/dev/null
  rm -rf "$scratch"
}

kafka_jars() {  # Kafka, its tools (kafka-topics.sh) and a log4j2 binding: broker.sh's own provisioning, once
  bash "$here/../kafka/broker.sh" provision --with-tools --version "$kafka_version" --cache-dir "$cache" >/dev/null
}

build() {
  bash "$here/build-local.sh" >/dev/null
  debian_image localhost/sd-jre:bookworm openjdk-17-jre-headless,ca-certificates
  debian_image localhost/sd-prometheus:bookworm prometheus \
    --change 'ENTRYPOINT ["/usr/bin/prometheus"]' --change 'WORKDIR /var/lib/prometheus'
  kafka_jars
  local ctx; ctx="$(mktemp -d)"
  cp -r "$cache/libs" "$here/kafka/bin" "$ctx/"
  "$engine" build --network host --format docker --build-arg JRE_IMAGE=localhost/sd-jre:bookworm \
    -t "localhost/sd-kafka:$kafka_version" -f "$here/kafka/Dockerfile" "$ctx" >&2
  rm -rf "$ctx"
}

compose() {
  export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/podman-containers.conf}"
  local flags="${SD_PODMAN_FLAGS-}"
  [[ -z "${SD_PODMAN_FLAGS+set}" ]] && command -v runc >/dev/null 2>&1 && flags="--runtime runc --cgroup-manager=cgroupfs"
  # shellcheck disable=SC2086
  podman-compose --podman-args="$flags" -p stream-detector -f "$here/compose.yaml" -f "$here/compose.local.yaml" "$@"
}

case "${1:-}" in
  build) build ;;
  up) shift; build; compose up -d "$@" "${services[@]}" ;;
  down) shift; compose down -v "$@" ;;
  *) echo "usage: compose-local.sh build|up|down" >&2; exit 2 ;;
esac
