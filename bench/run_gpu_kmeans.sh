#!/usr/bin/env bash
# The one script run on the device machine for the GPU K-means (issue 6, "Fast K-means"):
# gpu_test's K-means tests, gpu_kmeans_bench (GPU at 4K / 32K / 128K keys with the CPU at 4K and
# 32K, then the 32-layer x 8-head x 32K context), compute-sanitizer memcheck on the small tests,
# and last the CPU (FAISS) at 128K keys under whatever time is left, so that a slow CPU run cannot
# cost the GPU figures.
#
# Binaries come prebuilt in $BIN (default .devbin-kmeans: gpu_test, gpu_kmeans_bench and the
# shared libraries they need). cuBLAS is not carried (~600 MB): the K-means loads
# libcublas.so.13 with dlopen, from the loader path, /usr/local/cuda/lib64, or the folder this
# script finds (e.g. PyTorch's pip wheel); without it the built-in product runs and the cuBLAS
# rows say "unavailable". Logs go to $OUT (default ./kmeans-out).
#   bench/run_gpu_kmeans.sh [--budget SECONDS]   (default 225: every step's timeout fits in it)
set -uo pipefail
BIN=${BIN:-.devbin-kmeans}
OUT=${OUT:-./kmeans-out}
BUDGET=225
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
status=0
left() { echo $((BUDGET - SECONDS)); }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm \
    --format=csv
  nproc
  if ! ldconfig -p | grep -q 'libcublas.so.13 ' && [ ! -e /usr/local/cuda/lib64/libcublas.so.13 ]; then
    lib=$(find /usr /opt -name 'libcublas.so.13' 2>/dev/null | head -1)
    if [ -n "$lib" ]; then
      export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$(dirname "$lib")"
      echo "cublas: $lib"
    else
      echo "cublas: not found (built-in product only)"
    fi
  else
    echo "cublas: on the loader path or in /usr/local/cuda/lib64"
  fi
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

echo "== gpu_test (K-means)"
timeout 70 "$BIN/gpu_test" --gtest_filter='*KMeans*' > "$OUT/gpu_test.log" 2>&1
rc=$?
grep -E "\[quality\]|\[index\]|\[note\]|OK \]|FAILED|PASSED|SKIPPED|Failure|error|seed\]" \
  "$OUT/gpu_test.log" | head -80
echo "gpu_test rc=$rc"
[ "$rc" = 0 ] || status=1

echo "== gpu_kmeans_bench (GPU; CPU up to 32K keys; context)"
timeout 100 "$BIN/gpu_kmeans_bench" --cpu-max 32768 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== compute-sanitizer memcheck (small tests)"
t=$(left); [ "$t" -gt 45 ] && t=45
if [ "$t" -gt 10 ]; then
  timeout "$t" compute-sanitizer --tool memcheck --error-exitcode 3 "$BIN/gpu_test" \
    --gtest_filter='GpuKMeans.KEqualsN:GpuKMeans.Duplicates:GpuKMeans.ZeroRows:GpuKMeans.TilingDoesNotChangeTheResult' \
    > "$OUT/sanitizer.log" 2>&1
  rc=$?
  echo "memcheck rc=$rc"
  [ "$rc" = 0 ] || status=1
  grep -E "ERROR SUMMARY|FAILED \]|PASSED|Invalid|out of bounds" "$OUT/sanitizer.log" | head -20
else
  echo "memcheck skipped: no time left"
fi

echo "== CPU (FAISS) at 128K keys, $(left) s left"
t=$(left)
if [ "$t" -gt 10 ]; then
  timeout "$t" "$BIN/gpu_kmeans_bench" --sizes 131072 --only-cpu --no-context 2>&1 \
    | tee "$OUT/cpu128k.log"
  echo "cpu 128K rc=${PIPESTATUS[0]} (124: ran out of time)"
else
  echo "cpu 128K skipped: no time left"
fi
exit $status
