#!/usr/bin/env bash
# Installs what is needed, builds sqkv, then shows the whole path on a small synthetic context:
# generate it, import it (K-means index + segment file), query one layer sparsely and compare
# with dense attention. The store lives in $SQKV_DATA (default ./sqkv-data).
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/install-deps.sh
mkdir -p build
echo "== building sqkv (log: build/demo-build.log)"
if ! { cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release &&
       cmake --build build --target sqkv; } >build/demo-build.log 2>&1; then
  tail -40 build/demo-build.log
  echo "build failed: see build/demo-build.log" >&2
  exit 1
fi

sqkv=build/tools/sqkv
export SQKV_DATA="${SQKV_DATA:-$PWD/sqkv-data}"
work="${SQKV_DEMO_DIR:-$PWD/build/demo}"
mkdir -p "$work"

echo "== 1. a synthetic context: 4 layers, 4 kv heads (16 query heads), 8192 tokens, head_dim 128, bf16"
"$sqkv" synth "$work/demo.safetensors" --queries-out "$work/q.npy" --layers 4 --kv-heads 4 \
  --q-heads 16 --tokens 8192 --head-dim 128 -n 4

echo "== 2. import it into $SQKV_DATA (centroids 5% of tokens, 16-token pages)"
"$sqkv" rm demo >/dev/null 2>&1 || true
"$sqkv" import demo "$work/demo.safetensors"
"$sqkv" ls

echo "== 3. attention of 4 query tokens x 16 heads over layer 0, keeping 10% of the keys"
"$sqkv" query demo --layer 0 --queries "$work/q.npy" --keep 0.1 --out "$work/out" --compare-dense

echo "== done: outputs in $work/out (output.npy, lse.npy, selection.json)"
