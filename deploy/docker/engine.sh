#!/usr/bin/env bash
# The container engine with the settings this kind of machine needs; every local container command
# (build-local.sh, tests/test_container.py, docs/operations.md) goes through it, so they live in one place.
#
#   deploy/docker/engine.sh images            # = podman images (or docker images)
#   SD_CONTAINER_ENGINE=docker deploy/docker/engine.sh ps
#
# podman (preferred when both exist), on a sandboxed host where setrlimit is refused and crun rejects the
# cgroup layout (measured on the development machine, Debian bookworm's podman 4.3):
#   - CONTAINERS_CONF=deploy/docker/podman-containers.conf  ([containers] default_ulimits = [])
#   - --runtime runc --cgroup-manager=cgroupfs              (SD_PODMAN_FLAGS overrides them, "" for none)
# Elsewhere these settings are harmless; docker is used as it is.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

engine="${SD_CONTAINER_ENGINE:-}"
if [[ -z "$engine" ]]; then
  if command -v podman >/dev/null 2>&1; then engine=podman
  elif command -v docker >/dev/null 2>&1; then engine=docker
  else
    echo "engine.sh: no container engine: install podman (Debian: apt-get install podman runc) or docker" >&2
    exit 127
  fi
fi

if [[ "$engine" == podman ]]; then
  export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/podman-containers.conf}"
  if [[ -z "${SD_PODMAN_FLAGS+set}" ]]; then
    SD_PODMAN_FLAGS=""
    command -v runc >/dev/null 2>&1 && SD_PODMAN_FLAGS="--runtime runc --cgroup-manager=cgroupfs"
  fi
  # shellcheck disable=SC2086  # the flags are words on purpose
  exec podman $SD_PODMAN_FLAGS "$@"
fi
exec "$engine" "$@"
