#!/usr/bin/env bash
# The one script run on the device machine for issue 6's benchmark item "hierarchical vs
# single-level lookup time and attention mass captured at equal keep": gpu_hier_bench (32K and
# 128K contexts, flat and two-level indexes of the same keys, decode b1 / b8 / prefill 1,024 at
# keep 0.1). Extra arguments go to the bench.
#
# The binary comes prebuilt in $BIN (default .devbin-hier: gpu_hier_bench and the shared libraries
# it needs, from tools/collect-devbin.sh). Logs go to $OUT (default ./hier-out).
#   bench/run_gpu_hier.sh [--iters N] [--keep F] [--topics T] [--sizes 32768,131072]
set -uo pipefail
BIN=${BIN:-.devbin-hier}
OUT=${OUT:-./hier-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm \
    --format=csv
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "== gpu_hier_bench $*"
start=$(date +%s)
timeout 160 "$BIN/gpu_hier_bench" "$@" > "$OUT/hier_bench.log" 2> "$OUT/hier_bench.err"
rc=$?
echo "gpu_hier_bench rc=$rc, $(( $(date +%s) - start )) s"
tail -n 30 "$OUT/hier_bench.err"
cat "$OUT/hier_bench.log"
exit $rc
