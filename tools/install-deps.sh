#!/usr/bin/env bash
# Installs every Debian package that building and testing SqueezeKV needs.
# Non-interactive and idempotent: safe to run on a fresh machine or again on a warm one.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config
  librocksdb-dev            # catalog
  libfaiss-dev libopenblas-dev libomp-dev   # CPU K-means
  capnproto libcapnp-dev    # wire protocol
  libboost1.81-dev          # Asio/Beast (1.81: as_tuple, awaitable operators)
  libgtest-dev libgmock-dev # tests
  libcli11-dev nlohmann-json3-dev libxxhash-dev liburing-dev
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
