#!/usr/bin/env bash
# Device run for the whole store on the GPU (one call): the GPU test suites, then `sqkv import`
# of a 32-layer x 8-kv-head x 32K-token bf16 context with GPU K-means (issue 6: <= 60 s including
# I/O), then GPU and CPU queries of it through the CLI (layer 0: `synth --queries-out` writes
# layer-0 queries; on another layer they match no topic, and --sparsity 0.9 keeps ~99%).
#   bash bench/run_store_gpu.sh [BIN_DIR]     (BIN_DIR holds sqkv, the tests and their libraries)
set -uo pipefail
bin="${1:-.devbin-store}"
out="${OUT:-/tmp/sqkv-out}"
mkdir -p "$out"
export LD_LIBRARY_PATH="$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
status=0  # 1 when a test, the import, verify or a query failed
date -u | tee "$out/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee -a "$out/summary.txt"

echo "== api_gpu_test"
"$bin/api_gpu_test" > "$out/api_gpu_test.log" 2>&1 || status=1
grep -E "differ|OK|FAILED|PASSED|Failure" "$out/api_gpu_test.log" | tail -40
echo "== gpu_test"
"$bin/gpu_test" > "$out/gpu_test.log" 2>&1 || status=1
grep -E "^\[  (PASSED|FAILED)|FAILED|tests ran" "$out/gpu_test.log" | tail -10

work=/tmp/sqkv-big
rm -rf "$work"
mkdir -p "$work"
echo "== synth 32 x 8 x 32768 x 128 bf16"
s0=$(date +%s.%N)
"$bin/sqkv" synth "$work/big.st" --queries-out "$work/q.npy" --layers 32 --kv-heads 8 \
  --q-heads 32 --tokens 32768 --head-dim 128 --window 64 -n 1 | tee -a "$out/summary.txt"
s1=$(date +%s.%N)
echo "synth seconds: $(python3 -c "print(round($s1 - $s0, 2))")" | tee -a "$out/summary.txt"
sync
echo "== import with GPU K-means (includes reading the file, indexing, writing and publishing)"
t0=$(date +%s.%N)
"$bin/sqkv" --data "$work/data" import big "$work/big.st" --kmeans-device gpu --json > "$out/import.json"
rc=$?
[ "$rc" = 0 ] || status=1
t1=$(date +%s.%N)
echo "import rc=$rc wall seconds: $(python3 -c "print(round($t1 - $t0, 2))")" | tee -a "$out/summary.txt"
grep -E '"build_seconds"|"segment_bytes"|"pages"' "$out/import.json" | tee -a "$out/summary.txt"
"$bin/sqkv" --data "$work/data" verify | tee -a "$out/summary.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
for dev in gpu cpu; do
  for mode in "--keep 0.1" "--sparsity 0.9" "--dense"; do
    echo "== query --device $dev $mode" | tee -a "$out/summary.txt"
    "$bin/sqkv" --data "$work/data" query big --layer 0 --queries "$work/q.npy" $mode \
      --out "$work/o-$dev" --device "$dev" --json > "$work/q.json" || status=1
    grep -E '"device"|kept_fraction|total_ms|pages_from' "$work/q.json" | tr -d '\n ' \
      | tee -a "$out/summary.txt"
    echo | tee -a "$out/summary.txt"
  done
done
python3 - "$work" <<'PY' | tee -a "$out/summary.txt"
import sys, numpy as np
w = sys.argv[1]
a, b = np.load(w + "/o-gpu/output.npy"), np.load(w + "/o-cpu/output.npy")
print("dense gpu vs cpu: rel err %.2e" % (np.linalg.norm(a - b) / np.linalg.norm(b)))
PY
exit $status
