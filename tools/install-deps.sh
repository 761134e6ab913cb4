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
  clang libclang-rt-14-dev  # libFuzzer for the decoder fuzzer (tests/net)
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
else
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The Python client (python/) and its tests, for the python3 on PATH: pycapnp and numpy from PyPI,
# pytest to run them (torch/transformers for the HF export test are optional and not installed).
if python3 -c 'import capnp, numpy, pytest' 2>/dev/null; then
  echo "install-deps: python packages present"
elif python3 -m pip --version >/dev/null 2>&1; then
  echo "install-deps: installing pycapnp numpy pytest"
  # Debian's own python3 refuses installs into it (PEP 668, "externally-managed-environment"):
  # then into the user's site beside it. A failure here only makes the Python tests skip.
  python3 -m pip install -q pycapnp numpy pytest 2>/dev/null ||
    python3 -m pip install -q --user --break-system-packages pycapnp numpy pytest ||
    echo "install-deps: pip could not install pycapnp numpy pytest; the Python client tests will skip"
else
  echo "install-deps: python3 has no pip; the Python client tests will skip"
fi
