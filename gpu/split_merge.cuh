// The merge of a segment's split partial states into its final out / lse, as one device function
// that the split merge kernel (merge_states.cu: one block per (segment, row)) and the decode
// kernel's fused merge (paged_attention_decode.cu: the segment's last split block to finish, all
// its rows) both call, so the two paths give the same bits. Internal to gpu/.
//
// States are (o normalised, lse natural log); a split with no keys has lse = -inf and o = 0.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "gpu/paged_attention_common.cuh"
#include "gpu/paged_attention_internal.cuh"

namespace sqkv::gpu::detail {

// Shared memory of MergeSplitRows for NR rows at once: per row the split weights, the column
// sums of each split group and the per-warp partials of the block reductions.
template <int D, int NR>
struct SplitMergeSmem {
  static constexpr int kCols = D / 4;               // float4 columns of a row
  static constexpr int kGroups = kThreads / kCols;  // splits handled side by side
  static constexpr int kWarps = kThreads / 32;
  float w[NR][kMaxSplits];
  float4 acc[NR][kGroups][kCols];
  float red[NR][kWarps];
};

// Merges the first `active` split states of rows 0 .. nrows - 1 (nrows <= NR) into out / lse.
// Every thread of a kThreads block calls it with the same arguments. The states of split i,
// row r are part_o[(base + r + i · split_stride) · D ..] (D floats) and part_lse[base + r +
// i · split_stride]; they were written by other blocks of the same or an earlier grid, so they
// are read from L2 (__ldcg). out: (nrows, D) row-major; lse: (nrows).
//
// Threads read the split lse values in parallel, then each owns a float4 column of the output and
// a share of the splits (split group g = tid / (D / 4)), so the partial rows are read with many
// loads in flight instead of one split after another. The NR rows are merged side by side (more
// loads in flight per thread), each with exactly the arithmetic of a lone row, so the result of a
// row does not depend on NR or on the rows beside it.
//
// Two calls in a row need no barrier between them: a call's last shared-memory reads (acc, by
// split group 0) come after its last barrier, and the next call writes acc only after its own
// first barrier; w and red are last read before that barrier.
template <int D, int NR>
__device__ __forceinline__ void MergeSplitRows(SplitMergeSmem<D, NR>& sm, const float* part_o,
                                               const float* part_lse, size_t base,
                                               size_t split_stride, int active, int nrows,
                                               float* out, float* lse) {
  using Smem = SplitMergeSmem<D, NR>;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  // Block-wide max of each row's lse values, then the weights e^(lse - max) and their sum.
  float mx[NR], sum[NR];
#pragma unroll
  for (int rr = 0; rr < NR; ++rr) mx[rr] = NegInf();
  for (int i = tid; i < active; i += kThreads) {
#pragma unroll
    for (int rr = 0; rr < NR; ++rr) {
      if (rr < nrows) {
        sm.w[rr][i] = __ldcg(part_lse + base + rr + i * split_stride);
        mx[rr] = fmaxf(mx[rr], sm.w[rr][i]);
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < NR; ++rr) {
#pragma unroll
    for (int x = 1; x < 32; x *= 2) mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], x));
    if (lane == 0) sm.red[rr][warp] = mx[rr];
  }
  __syncthreads();
#pragma unroll
  for (int rr = 0; rr < NR; ++rr) {
    mx[rr] = sm.red[rr][0];
#pragma unroll
    for (int w = 1; w < Smem::kWarps; ++w) mx[rr] = fmaxf(mx[rr], sm.red[rr][w]);
  }
  __syncthreads();  // red is reused for the sums
#pragma unroll
  for (int rr = 0; rr < NR; ++rr) sum[rr] = 0.f;
  for (int i = tid; i < active; i += kThreads) {
#pragma unroll
    for (int rr = 0; rr < NR; ++rr) {
      if (rr < nrows) {
        const float w = mx[rr] == NegInf() ? 0.f : expf(sm.w[rr][i] - mx[rr]);
        sm.w[rr][i] = w;
        sum[rr] += w;
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < NR; ++rr) {
#pragma unroll
    for (int x = 1; x < 32; x *= 2) sum[rr] += __shfl_xor_sync(0xffffffffu, sum[rr], x);
    if (lane == 0) sm.red[rr][warp] = sum[rr];
  }
  __syncthreads();
#pragma unroll
  for (int rr = 0; rr < NR; ++rr) {
    sum[rr] = 0.f;
#pragma unroll
    for (int w = 0; w < Smem::kWarps; ++w) sum[rr] += sm.red[rr][w];
  }

  // Every active split wrote its partial (o = 0 for an empty one), so o is always finite.
  const int col = tid % Smem::kCols, group = tid / Smem::kCols;
  float4 acc[NR];
#pragma unroll
  for (int rr = 0; rr < NR; ++rr) acc[rr] = make_float4(0.f, 0.f, 0.f, 0.f);
  // Loads in flight per thread: 4 splits of a lone row, or 2 splits of each of NR rows (which
  // keeps the decode kernel's fused merge within the registers its main loop needs).
  constexpr int kUnroll = NR == 1 ? 4 : 2;
#pragma unroll kUnroll
  for (int i = group; i < active; i += Smem::kGroups) {
#pragma unroll
    for (int rr = 0; rr < NR; ++rr) {
      if (rr < nrows) {
        const float w = sm.w[rr][i];
        const float4 v = __ldcg(
            reinterpret_cast<const float4*>(part_o + (base + rr + i * split_stride) * D) + col);
        acc[rr].x += w * v.x;
        acc[rr].y += w * v.y;
        acc[rr].z += w * v.z;
        acc[rr].w += w * v.w;
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < NR; ++rr) sm.acc[rr][group][col] = acc[rr];
  __syncthreads();
  if (group != 0) return;
#pragma unroll
  for (int rr = 0; rr < NR; ++rr) {
    if (rr >= nrows) break;
#pragma unroll
    for (int g = 1; g < Smem::kGroups; ++g) {
      const float4 v = sm.acc[rr][g][col];
      acc[rr].x += v.x;
      acc[rr].y += v.y;
      acc[rr].z += v.z;
      acc[rr].w += v.w;
    }
    const float inv = sum[rr] > 0.f ? 1.f / sum[rr] : 0.f;
    reinterpret_cast<float4*>(out + static_cast<size_t>(rr) * D)[col] =
        make_float4(acc[rr].x * inv, acc[rr].y * inv, acc[rr].z * inv, acc[rr].w * inv);
    if (col == 0) lse[rr] = sum[rr] > 0.f ? mx[rr] + logf(sum[rr]) : NegInf();
  }
}

}  // namespace sqkv::gpu::detail
