#!/usr/bin/env bash
# Copies executables and the non-system shared libraries they load into one folder, for running
# them on a machine that has a GPU but not our Debian packages (see bench/run_store_gpu.sh).
#   tools/collect-devbin.sh OUT_DIR EXECUTABLE...
set -euo pipefail
out="$1"; shift
mkdir -p "$out"
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
