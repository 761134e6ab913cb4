#!/usr/bin/env bash
# The one script run on the device machine for the GPU sparse paged attention (issue 3):
# gpu_test (paged attention + merge), the kernel benchmark, the dense SDPA peer with a speed-up
# table, then compute-sanitizer memcheck / racecheck / synccheck on the small tests (last, so a
# slow sanitizer cannot cost the timings).
#
# Binaries come prebuilt in $BIN (default .devbin-attn: gpu_test, gpu_attention_bench and the
# shared libraries they need). Logs and JSON lines go to $OUT (default ./attn-out).
#   bench/run_gpu_attention.sh [--quick] [--skip-tests] [--skip-sanitizer] [--ncu]
# --ncu adds Nsight Compute sections for the decode (batch 1) and prefill kernels at 128K / 10%.
set -uo pipefail
BIN=${BIN:-.devbin-attn}
OUT=${OUT:-./attn-out}
mkdir -p "$OUT"
QUICK=""
RUN_TESTS=1
RUN_SANITIZER=1
RUN_NCU=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=--quick ;;
    --skip-tests) RUN_TESTS=0 ;;
    --skip-sanitizer) RUN_SANITIZER=0 ;;
    --ncu) RUN_NCU=1 ;;
    *) echo "unknown argument $a" >&2; exit 2 ;;
  esac
done
export LD_LIBRARY_PATH="$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
status=0

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm \
    --format=csv
  nvidia-smi -q | grep -iE "persistence|power limit|compute mode" | head
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "$RUN_TESTS" = 1 ]; then
  echo "== gpu_test"
  timeout 180 "$BIN/gpu_test" --gtest_filter='PagedAttention*:MergeStatesGpu*' > "$OUT/gpu_test.log" 2>&1
  rc=$?
  grep -E "metric|OK \]|FAILED|PASSED|Failure|error" "$OUT/gpu_test.log"
  echo "gpu_test rc=$rc"
  [ "$rc" = 0 ] || status=1
fi

echo "== gpu_attention_bench"
timeout 240 "$BIN/gpu_attention_bench" --json "$OUT/sqkv.jsonl" $QUICK 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== sdpa peer"
PYTHONUNBUFFERED=1 LD_LIBRARY_PATH= timeout 240 python3 bench/sdpa_peer.py --json "$OUT/sdpa.jsonl" \
  --ours "$OUT/sqkv.jsonl" $QUICK 2>&1 | tee "$OUT/sdpa.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
if [ "$RUN_SANITIZER" = 1 ]; then
  echo "== compute-sanitizer"
  {
    echo "--- memcheck"
    san=0
    timeout 120 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 3 \
      "$BIN/gpu_test" --gtest_filter='*Small*'
    rc=$?; echo "memcheck rc=$rc"; [ "$rc" = 0 ] || san=1
    echo "--- racecheck"
    timeout 100 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 3 \
      "$BIN/gpu_test" --gtest_filter='*SmallDecode:*SmallPrefill:*SmallRepeatable:*SmallMatchesCpu'
    rc=$?; echo "racecheck rc=$rc"; [ "$rc" = 0 ] || san=1
    echo "--- synccheck"
    timeout 60 compute-sanitizer --tool synccheck --error-exitcode 3 \
      "$BIN/gpu_test" --gtest_filter='*SmallDecode:*SmallPrefill'
    rc=$?; echo "synccheck rc=$rc"; [ "$rc" = 0 ] || san=1
    exit $san
  } > "$OUT/sanitizer.log" 2>&1
  [ $? = 0 ] || status=1
  grep -E "rc=|ERROR SUMMARY|RACECHECK SUMMARY|FAILED \]|PASSED" "$OUT/sanitizer.log"
fi

if [ "$RUN_NCU" = 1 ]; then
  echo "== ncu"
  SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats"
  {
    timeout 150 ncu --clock-control none -k 'regex:DecodeKernel|SplitMerge' --launch-skip 40 \
      --launch-count 2 $SECTIONS "$BIN/gpu_attention_bench" --only decode_b1:131072:0.1 --iters 24
    timeout 150 ncu --clock-control none -k 'regex:PrefillKernel|CompactKernel' --launch-skip 8 \
      --launch-count 2 $SECTIONS "$BIN/gpu_attention_bench" --only prefill_1024:131072:0.1 \
      --iters 4
  } > "$OUT/ncu.log" 2>&1
  grep -E "^  [A-Za-z].*Kernel|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued" "$OUT/ncu.log" | head -60
fi

exit $status
