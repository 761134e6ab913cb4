#!/usr/bin/env bash
# Installs what is needed, builds everything the tests use, and runs the whole test suite.
# GPU tests (ctest label "gpu") skip themselves on machines without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)"
ctest --test-dir build --output-on-failure -j "$(nproc)" "$@"
