#!/usr/bin/env bash
# Copies executables and the non-system shared libraries they load into one folder, for running
# them on a machine that has a GPU but not our Debian packages (see bench/run_store_gpu.sh).
#   tools/collect-devbin.sh OUT_DIR EXECUTABLE...
# An executable of a Ninja build tree is built by name first: the benchmarks are not in the
# default target, so a plain `ninja` can leave them linked against older libraries.
set -euo pipefail
out="$1"; shift
mkdir -p "$out"
# One ninja run per build tree for its executables.
declare -A targets
for exe in "$@"; do
  root=$(cd "$(dirname "$exe")" && pwd)
  while [ "$root" != / ] && [ ! -f "$root/build.ninja" ]; do root=$(dirname "$root"); done
  if [ -f "$root/build.ninja" ]; then
    targets[$root]+=" $(realpath --relative-to="$root" "$exe")"
  fi
done
if command -v ninja > /dev/null; then
  for root in "${!targets[@]}"; do
    # shellcheck disable=SC2086  # the target list is split on purpose
    ninja -C "$root" ${targets[$root]} > /dev/null
  done
fi
for exe in "$@"; do
  cp -f "$exe" "$out/"
  ldd "$exe" | awk '/=>/ {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libstdc++.so*|libgcc_s.so*|libpthread.so*|libdl.so*|librt.so*) ;;
      *) cp -fL "$lib" "$out/" ;;
    esac
  done
done
du -sh "$out"
