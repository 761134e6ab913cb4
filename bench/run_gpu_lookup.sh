#!/usr/bin/env bash
# The one script run on the device machine for the GPU lookup (issue 3): timings first, each step
# alone on the GPU (gpu_lookup_bench: lookup and the whole engine path; the dense SDPA peer; the
# attention kernel alone at 128K decode batch 1), then the correctness runs side by side (they
# time nothing): gpu_test's lookup and engine suites, compute-sanitizer memcheck and racecheck on
# small lookup tests. Each step has its own time limit, so the script ends inside about 225 s.
#
# Binaries come prebuilt in $BIN (default .devbin-lookup2: gpu_test, gpu_lookup_bench,
# gpu_attention_bench and the shared libraries they need). Logs go to $OUT (default ./lookup-out).
#   bench/run_gpu_lookup.sh
set -uo pipefail
BIN=${BIN:-.devbin-lookup2}
OUT=${OUT:-./lookup-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
status=0

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm \
    --format=csv
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "== gpu_lookup_bench"
timeout 90 "$BIN/gpu_lookup_bench" > "$OUT/lookup_bench.log" 2>&1
rc=$?
cat "$OUT/lookup_bench.log"
echo "gpu_lookup_bench rc=$rc"
[ "$rc" = 0 ] || status=1

echo "== sdpa peer"
PYTHONUNBUFFERED=1 LD_LIBRARY_PATH= timeout 45 python3 bench/sdpa_peer.py \
  --json "$OUT/sdpa.jsonl" > "$OUT/sdpa.log" 2>&1
rc=$?
grep -vE "refused" "$OUT/sdpa.log"
echo "sdpa rc=$rc"
[ "$rc" = 0 ] || status=1

echo "== attention alone, 128K decode b1"
timeout 15 "$BIN/gpu_attention_bench" --only decode_b1:131072:0.1 > "$OUT/attention.log" 2>&1
tail -n 12 "$OUT/attention.log"

echo "== correctness (side by side)"
timeout 75 "$BIN/gpu_test" --gtest_filter='GpuLookup.*:GpuEngine.*:GpuEnginePaging.*' > "$OUT/gpu_test.log" 2>&1 &
p_test=$!
{
  echo "--- memcheck"
  timeout 75 compute-sanitizer --tool memcheck --error-exitcode 3 "$BIN/gpu_test" \
    --gtest_filter='GpuLookup.KeepNothing*:GpuLookup.TiesBreak*:GpuLookup.HeadDimsUpTo256:GpuLookup.ManySegments*'
  echo "memcheck rc=$?"
} > "$OUT/memcheck.log" 2>&1 &
p_mem=$!
{
  echo "--- racecheck"
  timeout 75 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 3 \
    "$BIN/gpu_test" --gtest_filter='GpuLookup.KeepNothing*:GpuLookup.TiesBreak*'
  echo "racecheck rc=$?"
} > "$OUT/racecheck.log" 2>&1 &
p_race=$!
wait $p_test
rc=$?
grep -E "metric|OK \]|FAILED|PASSED|Failure|error|tol " "$OUT/gpu_test.log" | head -80
echo "gpu_test rc=$rc"
[ "$rc" = 0 ] || status=1
wait $p_mem
wait $p_race
grep -E "rc=|ERROR SUMMARY|RACECHECK SUMMARY|FAILED \]|PASSED|Invalid|Race" "$OUT/memcheck.log" \
  "$OUT/racecheck.log" | head -30
exit $status
