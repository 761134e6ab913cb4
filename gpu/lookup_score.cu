// Large (prefill) segments with float32 centroids: two tiled fp32 FMA passes (per-row max and
// normaliser, then column sums), a combine and a column reduction into the scores; the selection
// kernel (lookup_select.cu) follows. See gpu/lookup.h for the formula.
#include <cuda_runtime.h>

#include <cmath>

#include "gpu/lookup_device.cuh"

namespace sqkv::gpu::lookup_detail {
namespace {

constexpr float kNegInf = -INFINITY;

__device__ inline float4 Load4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// ---------------------------------------------------------------------------------------------
// Large path. One block = kTileRows query rows x kTileCols entries of one segment, 256 threads,
// each a 4x4 register tile (rows ty*4.., entries tx*4..). kStats: per-row partial (max, Σ n
// e^(l-max)) over the tile's entries -> stats (rows, ctiles, 2). Otherwise: Σ over the tile's rows
// of e^(l - M_r) / Z_r per entry -> part (row tiles, entry_capacity).
template <bool kStats>
__global__ void __launch_bounds__(kTileThreads)
    TiledKernel(const LookupSegment* segs, const int32_t* list, const float* q, float* floats,
                const int32_t* ints, int d, float scale, int level) {
  const LookupSegment& s = segs[list[blockIdx.z]];
  if (!ScoredAtLevel(s, level)) return;
  const EntrySet e = GetEntrySet(s, level, ints, d, false);
  const int col0 = blockIdx.x * kTileCols;
  const int row0 = blockIdx.y * kTileRows;
  if (col0 >= (kStats ? e.total : e.scored) || row0 >= s.rows) return;

  __shared__ __align__(16) float as[kTileK][kTileRows + 4];
  __shared__ __align__(16) float bs[kTileK][kTileCols + 4];
  const int t = threadIdx.x;
  const int tx = t % 16, ty = t / 16;
  const int lr = t / 4, lc = (t % 4) * 4;  // this thread's staging row and quarter
  const float* qrow =
      row0 + lr < s.rows ? q + static_cast<size_t>(s.q_row + row0 + lr) * d + lc : nullptr;
  const float* crow = col0 + lr < e.total ? EntryCentroid(e, col0 + lr) + lc : nullptr;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < d; k0 += kTileK) {
    const float4 a = qrow != nullptr ? Load4(qrow + k0) : make_float4(0.f, 0.f, 0.f, 0.f);
    const float4 b = crow != nullptr ? Load4(crow + k0) : make_float4(0.f, 0.f, 0.f, 0.f);
    as[lc + 0][lr] = a.x;
    as[lc + 1][lr] = a.y;
    as[lc + 2][lr] = a.z;
    as[lc + 3][lr] = a.w;
    bs[lc + 0][lr] = b.x;
    bs[lc + 1][lr] = b.y;
    bs[lc + 2][lr] = b.z;
    bs[lc + 3][lr] = b.w;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      const float4 av = *reinterpret_cast<const float4*>(&as[k][ty * 4]);
      const float4 bv = *reinterpret_cast<const float4*>(&bs[k][tx * 4]);
      const float ar[4] = {av.x, av.y, av.z, av.w};
      const float br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
    }
    __syncthreads();
  }

  // Entries of this thread's 4 columns: valid mask and sizes.
  bool col_ok[4];
  float col_n[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c = col0 + tx * 4 + j;
    col_ok[j] = c < (kStats ? e.total : e.scored);
    col_n[j] = col_ok[j] ? static_cast<float>(EntrySize(e, c)) : 0.f;
  }

  if constexpr (kStats) {
    float* stats = floats + s.stat_offset;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float l[4];
      float m = kNegInf;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        l[j] = acc[i][j] * scale;
        if (col_ok[j]) m = fmaxf(m, l[j]);
      }
      // The 16 threads of one row group are lanes tx = 0..15 of a half warp.
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      float z = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (col_ok[j]) z += col_n[j] * expf(l[j] - m);
      }
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
      const int row = row0 + ty * 4 + i;
      if (tx == 0 && row < s.rows) {
        float* dst = stats + (static_cast<size_t>(row) * s.ctiles + blockIdx.x) * 2;
        dst[0] = m;
        dst[1] = z;
      }
    }
  } else {
    const float* rowstat = floats + s.rowstat_offset;
    float col[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + ty * 4 + i;
      if (row >= s.rows) continue;
      const float m = rowstat[2 * row], inv_z = rowstat[2 * row + 1];
#pragma unroll
      for (int j = 0; j < 4; ++j) col[j] += expf(acc[i][j] * scale - m) * inv_z;
    }
    __shared__ float red[kTileThreads / 32][kTileCols];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      col[j] += __shfl_xor_sync(0xffffffffu, col[j], 16);  // the warp's other row group
    }
    const int warp = t / 32, lane = t % 32;
    if (lane < 16) {
#pragma unroll
      for (int j = 0; j < 4; ++j) red[warp][tx * 4 + j] = col[j];
    }
    __syncthreads();
    if (t < kTileCols && col0 + t < e.scored) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kTileThreads / 32; ++w) sum += red[w][t];
      floats[s.part_offset + static_cast<int64_t>(blockIdx.y) * s.entry_capacity + col0 + t] = sum;
    }
  }
}

// Per row: M = max of the tile maxima, 1/Z with Z = Σ z_t e^(m_t - M). rowstat: (rows, 2).
__global__ void CombineRowStatsKernel(const LookupSegment* segs, const int32_t* list, float* floats,
                                      const int32_t* ints, int level) {
  const LookupSegment& s = segs[list[blockIdx.y]];
  if (!ScoredAtLevel(s, level)) return;
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= s.rows) return;
  const EntrySet e = GetEntrySet(s, level, ints, 0, false);
  const int tiles = (e.total + kTileCols - 1) / kTileCols;
  const float* st = floats + s.stat_offset + static_cast<size_t>(row) * s.ctiles * 2;
  float m = kNegInf;
  for (int c = 0; c < tiles; ++c) m = fmaxf(m, st[2 * c]);
  float z = 0.f;
  for (int c = 0; c < tiles; ++c) z += st[2 * c + 1] * expf(st[2 * c] - m);
  float* rs = floats + s.rowstat_offset + 2 * row;
  rs[0] = m;
  rs[1] = 1.f / z;  // z >= the size of the arg-max entry >= 1
}

// scores[i] = Σ over row tiles of the column partials / rows.
__global__ void ReduceColumnsKernel(const LookupSegment* segs, const int32_t* list, float* floats,
                                    const int32_t* ints, int level) {
  const LookupSegment& s = segs[list[blockIdx.y]];
  if (!ScoredAtLevel(s, level)) return;
  const EntrySet e = GetEntrySet(s, level, ints, 0, false);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= e.scored) return;
  const int rtiles = (s.rows + kTileRows - 1) / kTileRows;
  const float* part = floats + s.part_offset + i;
  float sum = 0.f;
  for (int r = 0; r < rtiles; ++r) sum += part[static_cast<size_t>(r) * s.entry_capacity];
  floats[s.score_offset + i] = sum / static_cast<float>(s.rows);
}

float LogitScale(int d) { return 1.f / std::sqrt(static_cast<float>(d)); }

}  // namespace

cudaError_t LaunchLargeScoresF32(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                                 int level, cudaStream_t stream) {
  const int n = static_cast<int>(l.large_list.size());
  if (n == 0) return cudaSuccess;
  const float scale = LogitScale(a.head_dim);
  const dim3 tiles(l.max_large_ctiles, l.max_large_rtiles, n);
  TiledKernel<true><<<tiles, kTileThreads, 0, stream>>>(a.segments, w.large_list, a.q, w.floats,
                                                        w.ints, a.head_dim, scale, level);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  constexpr int kThreads = 256;
  CombineRowStatsKernel<<<dim3((l.max_large_rows + kThreads - 1) / kThreads, n), kThreads, 0,
                          stream>>>(a.segments, w.large_list, w.floats, w.ints, level);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  TiledKernel<false><<<tiles, kTileThreads, 0, stream>>>(a.segments, w.large_list, a.q, w.floats,
                                                         w.ints, a.head_dim, scale, level);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  ReduceColumnsKernel<<<dim3((l.max_entries + kThreads - 1) / kThreads, n), kThreads, 0, stream>>>(
      a.segments, w.large_list, w.floats, w.ints, level);
  return cudaGetLastError();
}

}  // namespace sqkv::gpu::lookup_detail
