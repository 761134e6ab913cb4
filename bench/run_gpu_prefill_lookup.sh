#!/usr/bin/env bash
# Device script for the prefill lookup work (issue 3): prefill timings first, each binary alone on
# the GPU (gpu_lookup_bench --cases prefill: lookup, score, the q conversion and both tensor-core
# passes, the global-memory selection, float32, whole engine path), then an optional Nsight Compute
# look at the two passes (stall reasons, pipe use), then the correctness runs side by side
# (gpu_test's lookup and engine suites, compute-sanitizer memcheck and racecheck on small
# large-path lookup tests; any gpu_test_<name> beside gpu_test runs the lookup suite too).
#
# Binaries come prebuilt in $BIN (gpu_test, gpu_lookup_bench and their shared libraries). Any
# gpu_lookup_bench_<name> beside them is timed too: gpu_lookup_bench_base at both context sizes,
# the others at $EXTRA_TOKENS. Logs go to $OUT (all.log, ncu.log, gpu_test*.log, sanitizers.log).
#   BIN=.devbin-prefill2 OUT=$OUT bench/run_gpu_prefill_lookup.sh
set -uo pipefail
BIN=${BIN:-.devbin-prefill2}
OUT=${OUT:-./prefill-out}
EXTRA_TOKENS=${EXTRA_TOKENS:-131072}
NCU=${NCU:-1}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
LOG="$OUT/all.log"
status=0
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
} 2>&1 | tee "$LOG"

bench() {  # name, time limit, args...
  local name=$1 limit=$2
  shift 2
  echo "== $name $*" | tee -a "$LOG"
  timeout "$limit" "$@" > "$OUT/bench.tmp" 2>&1
  local rc=$?
  cat "$OUT/bench.tmp" >> "$LOG"
  grep -E "^(32K|128K) prefill" "$OUT/bench.tmp" | cut -c1-120
  echo "$name rc=$rc"
  [ "$rc" = 0 ] || status=1
}
bench main 50 "$BIN/gpu_lookup_bench" --cases prefill --iters 100
for b in "$BIN"/gpu_lookup_bench_*; do
  [ -x "$b" ] || continue  # no extra builds: the pattern stays unexpanded
  name=${b##*/gpu_lookup_bench_}
  if [ "$name" = base ]; then
    bench base 50 "$b" --cases prefill --iters 100
  else
    bench "$name" 35 "$b" --cases prefill --tokens "$EXTRA_TOKENS" --iters 100
  fi
done
rm -f "$OUT/bench.tmp"

STALLS=$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' \
  wait short_scoreboard long_scoreboard barrier math_pipe_throttle mio_throttle not_selected \
  selected dispatch_stall lg_throttle no_instruction branch_resolving tex_throttle membar misc)
STALLS=${STALLS%,}
if [ "$NCU" = 1 ] && command -v ncu > /dev/null; then
  echo "== ncu (128K prefill, one launch of each pass)"
  # The passes on sm_90 are the wgmma kernels; elsewhere the mma.sync ones (lookup_mma.cu). The
  # anchors keep out the float32 path's CombineRowStatsKernel.
  timeout 60 ncu --kernel-name regex:'^(RowStatsWgmmaKernel|ColumnWgmmaKernel|RowStatsKernel|ColumnKernel)' \
    --kernel-name-base function --launch-skip 4 --launch-count 2 \
    --metrics "$STALLS",sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.per_cycle_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed,gpu__time_duration.sum,sm__cycles_elapsed.avg.per_second \
    "$BIN/gpu_lookup_bench" --cases prefill --tokens 131072 --iters 5 > "$OUT/ncu.log" 2>&1
  echo "ncu rc=$?"
  grep -E "Kernel|duration|per_second|pct_of_peak|per_cycle_active|stalled" "$OUT/ncu.log" |
    awk '$NF+0 >= 0.05 || /Kernel|duration|per_second|pct|per_cycle/' | sed 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//' |
    cut -c1-110 | head -70
else
  echo "== no ncu"
fi

echo "== correctness (side by side)"
timeout 150 "$BIN/gpu_test" --gtest_filter='GpuLookup*:GpuEngine*' > "$OUT/gpu_test.log" 2>&1 &
p_test=$!
pids=()
for t in "$BIN"/gpu_test_*; do
  [ -x "$t" ] || continue
  timeout 150 "$t" --gtest_filter='GpuLookup*' > "$OUT/${t##*/}.log" 2>&1 &
  pids+=($!)
done
{
  san=0
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 "$BIN/gpu_test" \
    --gtest_filter='GpuLookup.KeepNothing*:GpuLookup.TiesBreak*:GpuLookup.SplitTensorPasses*:GpuLookup.HeadDimsUpTo256'
  rc=$?; echo "memcheck rc=$rc"; [ "$rc" = 0 ] || san=1
  timeout 100 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 3 \
    "$BIN/gpu_test" --gtest_filter='GpuLookup.KeepNothing*:GpuLookup.TiesBreak*'
  rc=$?; echo "racecheck rc=$rc"; [ "$rc" = 0 ] || san=1
  exit $san
} > "$OUT/sanitizers.log" 2>&1 &
p_san=$!
wait $p_test
rc=$?
grep -E "FAILED|PASSED|Failure|differs|SplitTensor|ContextSized" "$OUT/gpu_test.log" | cut -c1-160 | head -30
echo "gpu_test rc=$rc"
[ "$rc" = 0 ] || status=1
for p in "${pids[@]}"; do wait "$p" || status=1; done
for t in "$OUT"/gpu_test_*.log; do
  [ -f "$t" ] && { echo "-- ${t##*/}"; grep -E "FAILED|PASSED|Failure|differs" "$t" | head -10; }
done
wait $p_san || status=1
grep -E "rc=|ERROR SUMMARY|RACECHECK SUMMARY|FAILED \]|PASSED|Invalid|Race" "$OUT/sanitizers.log" | head -20
exit $status
