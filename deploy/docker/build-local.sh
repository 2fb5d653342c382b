#!/usr/bin/env bash
# Build the stream-detector image here, with podman (or docker), without an image registry:
#
#   bash deploy/docker/build-local.sh            # the cpu target -> localhost/stream-detector:cpu
#   SD_BASE=registry bash deploy/docker/build-local.sh   # FROM python:3.11-slim-bookworm, as a user would
#
# SD_BASE=local (the default when mmdebstrap is installed): the base image is Debian bookworm with
# python3 and python3-venv, made by mmdebstrap from this machine's apt sources (about 20 s, root) and
# imported as localhost/sd-base:bookworm once; later runs reuse it. The image build itself is cached
# by the engine layer by layer, so a second run with unchanged sources takes seconds.
# pip inside the build uses this machine's CA bundle (mounted read-only), so a TLS-intercepting proxy
# that the host trusts works in the build too. Prints "image=<name>" last.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
engine="$repo/deploy/docker/engine.sh"
target="${SD_TARGET:-cpu}"
image="${SD_IMAGE:-localhost/stream-detector:$target}"
base_image="localhost/sd-base:bookworm"
ca=/etc/ssl/certs/ca-certificates.crt

base="${SD_BASE:-}"
if [[ -z "$base" ]]; then
  if command -v mmdebstrap >/dev/null 2>&1; then base=local; else base=registry; fi
fi

build_args=(--target "$target" -t "$image" -f "$repo/deploy/docker/Dockerfile" --network host)
if [[ "$base" == local ]]; then
  [[ "$target" == cpu ]] || { echo "build-local.sh: SD_BASE=local builds the cpu target only (the gpu target needs the CUDA base image)" >&2; exit 2; }
  if ! "$engine" image exists "$base_image" 2>/dev/null && ! "$engine" image inspect "$base_image" >/dev/null 2>&1; then
    command -v mmdebstrap >/dev/null 2>&1 || { echo "build-local.sh: SD_BASE=local needs mmdebstrap (Debian: apt-get install mmdebstrap)" >&2; exit 2; }
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    echo "build-local.sh: making the base image $base_image with mmdebstrap (Debian bookworm + python3-venv)" >&2
    mmdebstrap --quiet --variant=apt --include=python3,python3-venv,ca-certificates bookworm "$scratch/rootfs.tar"
    "$engine" import "$scratch/rootfs.tar" "$base_image" >/dev/null
  fi
  build_args+=(--build-arg "PYTHON_IMAGE=$base_image")
fi
if [[ -f "$ca" ]]; then
  build_args+=(-v "$ca:/etc/ssl/host-ca.crt:ro" --build-arg PIP_CERT=/etc/ssl/host-ca.crt)
fi
if [[ "$("$engine" --version 2>/dev/null)" == podman* ]]; then
  build_args+=(--format docker)  # keeps the HEALTHCHECK (the OCI image format has no field for it)
fi
"$engine" build "${build_args[@]}" "$repo" >&2
echo "image=$image"
