#!/usr/bin/env bash
# The one script run on the device machine for the device tier of paging (issue 4): gpu_test's
# engine and paging tests, gpu_paging_bench, then compute-sanitizer memcheck on the paging tests.
# Binaries come prebuilt in $BIN (default .devbin-paging: gpu_test, gpu_paging_bench and the
# shared libraries they need). Logs go to $OUT (default ./paging-out).
#   bench/run_gpu_paging.sh
set -uo pipefail
BIN=${BIN:-.devbin-paging}
OUT=${OUT:-./paging-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
status=0
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,pcie.link.gen.current,pcie.link.width.current \
    --format=csv
  nproc
} 2>&1 | tee "$OUT/machine.txt"

echo "== gpu_test (engine + paging)"
timeout 80 "$BIN/gpu_test" \
  --gtest_filter='PagePool*:GpuEnginePaging*:Uploads/PagedQuery*:GpuEngine.*' \
  > "$OUT/gpu_test.log" 2>&1
rc=$?
grep -E "OK \]|FAILED|PASSED|SKIPPED|Failure|rror|seed|Expected|Which is|actual" "$OUT/gpu_test.log" | head -70
echo "gpu_test rc=$rc"
[ "$rc" = 0 ] || status=1

echo "== gpu_paging_bench"
timeout 75 "$BIN/gpu_paging_bench" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== compute-sanitizer memcheck (paging tests)"
timeout 70 compute-sanitizer --tool memcheck --error-exitcode 3 "$BIN/gpu_test" \
  --gtest_filter='GpuEnginePaging.*:Uploads/PagedQuery.*/GatherFromPinned:Uploads/PagedQuery.*/CopyFromPageable:Uploads/PagedQuery.*/BatchCopyFromPinned' \
  > "$OUT/sanitizer.log" 2>&1
rc=$?
echo "memcheck rc=$rc (124: out of time)"
grep -E "ERROR SUMMARY|OK \]|FAILED|PASSED|Invalid|out of bounds|rror" "$OUT/sanitizer.log" | head -30
exit $status
