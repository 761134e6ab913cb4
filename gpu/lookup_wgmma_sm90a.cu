// Large (prefill) segments with 16-bit centroids on Hopper's warpgroup products (wgmma, sm_90a):
// the same two passes as lookup_mma.cu (same blocks, pieces, workspace and finish; see there), at
// head_dim <= 128. A block is two warpgroups; each holds 64 of the block's 128 A rows (query rows
// in pass 1, entries in pass 2) as register fragments and multiplies them with the streamed rows
// (entries in pass 1, query rows in pass 2), 64 per stage, staged by cp.async into 128-byte
// swizzled shared memory four stages deep: per stage one m64n64 product of head_dim / 16 k-steps
// per warpgroup, then the stage's exp2 work on the accumulators. Two blocks per SM, so one
// warpgroup's products run while another's exp2 work issues.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "gpu/lookup_mma.cuh"
#include "gpu/wgmma.cuh"

namespace sqkv::gpu::lookup_detail {
namespace {

using detail::CpAsync16;
using detail::CpAsyncCommit;
using detail::CpAsyncWait;
using detail::F16;
using detail::FastExp2;
using detail::FenceProxyAsyncShared;
using detail::SmemAddr;
using detail::Sw128Desc;
using detail::Sw128Offset;
using detail::WgmmaCommit;
using detail::WgmmaFence;
using detail::WgmmaM64N64RS;
using detail::WgmmaWait;

constexpr int kThreads = 256;  // two warpgroups
constexpr int kStageRows = 64;  // streamed rows per stage: the n64 of the product
constexpr int kStages = 4;
static_assert(kMmaRowTile == 128 && kMmaColTile == 128, "two warpgroups of 64 A rows");

// Shared memory of a block: the stages' tiles (1,024-byte aligned), then per stage 64 sizes (pass
// 1) or 64 row infos (pass 2).
template <int KS>
constexpr int TileBytes() {
  return kStageRows * KS * 32;  // KS k-steps of 16 halves per row
}
template <int KS>
constexpr int SmemBytes() {
  return 1024 + kStages * (TileBytes<KS>() + kStageRows * 16);
}

// An exact float of a non-negative int below 2^23, on the FMA pipe (no conversion unit).
__device__ __forceinline__ float SmallIntToFloat(int v) {
  return __int_as_float(v | 0x4B000000) - 8388608.f;
}

// Streamed rows [row0, row0 + 64) of the stage into `tile` (KS / 4 panels of 64 × 128 bytes,
// swizzled): row r's chunk ch from src(r) + 16 ch, zero past `valid` rows or head_dim.
template <int KS, class Src>
__device__ __forceinline__ void StageTile(uint32_t tile, int valid, int d, const Src& src) {
  constexpr int kChunks = KS * 2;
  for (int idx = threadIdx.x; idx < kStageRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, ch = idx % kChunks;
    const bool ok = r < valid && ch * 8 < d;
    const uint8_t* p = src(ok ? r : 0) + ch * 16;
    CpAsync16(tile + (ch >> 3) * (kStageRows * 128) + Sw128Offset(r, ch & 7), p, ok ? 16 : 0);
  }
}

// One stage's product: acc (the warpgroup's 64 A rows × the stage's 64 rows) = frag · tile^T.
template <int KS>
__device__ __forceinline__ void StageProduct(const uint32_t (&frag)[KS][4], uint32_t tile,
                                             float (&acc)[32]) {
  WgmmaFence();
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    WgmmaM64N64RS<F16>(acc, frag[ks], Sw128Desc(tile, kStageRows, ks), ks > 0);
  }
  WgmmaCommit();
  WgmmaWait<0>();
}

// Pass 1 on one stage: rows h (g, g + 8) take the logits acc · f of the thread's 16 entries
// (columns 8j + 2tq + c) into their running max and normaliser. kTail: entries past `valid` (size
// 0) are left out.
template <bool kTail>
__device__ __forceinline__ void RowUpdate(const float (&acc)[32], const int32_t* sizes, int tq,
                                          int valid, const float (&f)[2], float (&m_run)[2],
                                          float (&z_run)[2]) {
  float n[8][2];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int2 v = *reinterpret_cast<const int2*>(sizes + 8 * j + 2 * tq);
    n[j][0] = SmallIntToFloat(v.x);
    n[j][1] = SmallIntToFloat(v.y);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float amax = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float v = acc[4 * j + 2 * h + c];
        amax = fmaxf(amax, !kTail || 8 * j + 2 * tq + c < valid ? v : -INFINITY);
      }
    }
    // f > 0 and rounding is monotone: max(acc) · f = max(acc · f).
    const float tmax = amax * f[h];
    if (tmax > m_run[h]) {
      z_run[h] *= FastExp2(m_run[h] - tmax);  // from -inf: 2^-inf = 0
      m_run[h] = tmax;
    }
    float z = z_run[h];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        // Past-the-end entries hold logit 0, which may lie far above the max: size 0 and skipped.
        const float term = n[j][c] * FastExp2(fmaf(acc[4 * j + 2 * h + c], f[h], -m_run[h]));
        z += !kTail || 8 * j + 2 * tq + c < valid ? term : 0.f;
      }
    }
    z_run[h] = z;
  }
}

template <int KS>
__global__ void __launch_bounds__(kThreads, 2)
    RowStatsWgmmaKernel(LookupArgs a, Workspace w, int level) {
  extern __shared__ uint8_t smem_raw[];
  __shared__ int last;
  const int seg = w.large_list[blockIdx.y];
  const LookupSegment& s = a.segments[seg];
  if (!ScoredAtLevel(s, level)) return;
  const int splits = s.row_splits;
  const int rtile = blockIdx.x / splits, piece = blockIdx.x % splits;
  const int row0 = rtile * kMmaRowTile;
  if (row0 >= s.rows) return;
  const int d = a.head_dim;
  const EntrySet e = GetEntrySet(s, level, w.ints, d, true);
  const int2 range = PieceRange(e.total, splits, piece, kStageRows);
  const int begin = range.x, end = range.y;
  const int t = threadIdx.x, lane = t % 32, warp = t / 32, g = lane / 4, tq = lane % 4;
  const uint16_t* qh = reinterpret_cast<const uint16_t*>(w.floats + s.qh_offset);
  float4* info = reinterpret_cast<float4*>(w.floats + s.info_offset);

  const uint32_t tiles = (SmemAddr(smem_raw) + 1023u) & ~1023u;
  int32_t* sizes = reinterpret_cast<int32_t*>(smem_raw + (tiles - SmemAddr(smem_raw)) +
                                              kStages * TileBytes<KS>());  // (kStages, 64)

  uint32_t frag[KS][4];
  float f[2];
  const int ra = row0 + warp * 16 + g, rb = ra + 8;  // warp w: rows 16w .. 16w + 15 of the tile
  LoadFragments<KS>(ra < s.rows ? qh + static_cast<size_t>(ra) * d : nullptr,
                    rb < s.rows ? qh + static_cast<size_t>(rb) * d : nullptr, d, tq, frag);
  f[0] = ra < s.rows ? info[ra].x : 0.f;
  f[1] = rb < s.rows ? info[rb].x : 0.f;

  const int ntiles = CeilDiv(end - begin, kStageRows);
  auto stage = [&](int it) {
    if (it < ntiles) {
      const int i0 = begin + it * kStageRows, buf = it % kStages;
      const int valid = min(kStageRows, end - i0);
      if (e.list == nullptr) {
        const uint8_t* rows = e.prim + static_cast<size_t>(i0) * e.row_bytes;
        StageTile<KS>(tiles + buf * TileBytes<KS>(), valid, d,
                      [&](int r) { return rows + static_cast<size_t>(r) * e.row_bytes; });
      } else {
        StageTile<KS>(tiles + buf * TileBytes<KS>(), valid, d, [&](int r) {
          return static_cast<const uint8_t*>(EntryRow(e, i0 + r));
        });
      }
      if (t < kStageRows) {
        const bool ok = t < valid;
        CpAsync4(SmemAddr(sizes + buf * kStageRows + t), ok ? EntrySizePtr(e, i0 + t) : e.prim_size,
                 ok ? 4 : 0);
      }
    }
    CpAsyncCommit();  // empty past the end: the group count stays uniform
  };

  float m_run[2] = {-INFINITY, -INFINITY}, z_run[2] = {0.f, 0.f};
#pragma unroll
  for (int p = 0; p < kStages - 1; ++p) stage(p);
  for (int it = 0; it < ntiles; ++it) {
    CpAsyncWait<kStages - 2>();
    FenceProxyAsyncShared();
    __syncthreads();  // stage it landed for every thread; stage it - 1's buffer is free again
    stage(it + kStages - 1);
    const int buf = it % kStages;
    float acc[32];
    StageProduct<KS>(frag, tiles + buf * TileBytes<KS>(), acc);
    const int valid = end - (begin + it * kStageRows);
    if (valid < kStageRows) {
      RowUpdate<true>(acc, sizes + buf * kStageRows, tq, valid, f, m_run, z_run);
    } else {
      RowUpdate<false>(acc, sizes + buf * kStageRows, tq, valid, f, m_run, z_run);
    }
  }
  CpAsyncWait<0>();
  float2* part = reinterpret_cast<float2*>(w.floats + s.stat_offset);  // (splits, rows)
  FinishRowStat(s, info, part, piece, splits, ra, tq, f[0], m_run[0], z_run[0]);
  FinishRowStat(s, info, part, piece, splits, rb, tq, f[1], m_run[1], z_run[1]);
  if (splits > 1) CombineRowPieces<kThreads>(s, w, info, part, rtile, &last);
}

template <int KS>
__global__ void __launch_bounds__(kThreads, 2)
    ColumnWgmmaKernel(LookupArgs a, Workspace w, int level, bool finish) {
  extern __shared__ uint8_t smem_raw[];
  __shared__ int last;
  const int seg = w.large_list[blockIdx.y];
  const LookupSegment& s = a.segments[seg];
  if (!ScoredAtLevel(s, level)) return;  // the whole grid row: its counters stay untouched
  const int d = a.head_dim;
  const EntrySet e = GetEntrySet(s, level, w.ints, d, true);
  const int splits = s.col_splits;
  const int etile = blockIdx.x / splits, piece = blockIdx.x % splits;
  const int col0 = etile * kMmaColTile;
  if (col0 < e.scored) {
    const int t = threadIdx.x, lane = t % 32, warp = t / 32, g = lane / 4, tq = lane % 4;
    const uint16_t* qh = reinterpret_cast<const uint16_t*>(w.floats + s.qh_offset);
    const float4* info = reinterpret_cast<const float4*>(w.floats + s.info_offset);
    const int2 range = PieceRange(s.rows, splits, piece, kStageRows);
    const int begin = range.x, end = range.y;
    const uint32_t tiles = (SmemAddr(smem_raw) + 1023u) & ~1023u;
    float4* row_info = reinterpret_cast<float4*>(smem_raw + (tiles - SmemAddr(smem_raw)) +
                                                 kStages * TileBytes<KS>());  // (kStages, 64)

    uint32_t frag[KS][4];
    const int ea = col0 + warp * 16 + g, eb = ea + 8;
    LoadFragments<KS>(ea < e.scored ? static_cast<const uint16_t*>(EntryRow(e, ea)) : nullptr,
                      eb < e.scored ? static_cast<const uint16_t*>(EntryRow(e, eb)) : nullptr, d, tq,
                      frag);
    const int ntiles = CeilDiv(end - begin, kStageRows);
    auto stage = [&](int it) {
      if (it < ntiles) {
        const int r0 = begin + it * kStageRows, buf = it % kStages;
        const int valid = min(kStageRows, end - r0);
        const uint8_t* rows = reinterpret_cast<const uint8_t*>(qh + static_cast<size_t>(r0) * d);
        StageTile<KS>(tiles + buf * TileBytes<KS>(), valid, d,
                      [&](int r) { return rows + static_cast<size_t>(r) * d * 2; });
        if (t < kStageRows) {
          // Rows past the end read as (0, 0, 0): they add 2^0 · 0.
          const bool ok = t < valid;
          CpAsync16(SmemAddr(row_info + buf * kStageRows + t), ok ? info + r0 + t : info,
                    ok ? 16 : 0);
        }
      }
      CpAsyncCommit();
    };
    float col[2] = {0.f, 0.f};  // entries g and g + 8 of the warp's 16
#pragma unroll
    for (int p = 0; p < kStages - 1; ++p) stage(p);
    for (int it = 0; it < ntiles; ++it) {
      CpAsyncWait<kStages - 2>();
      FenceProxyAsyncShared();
      __syncthreads();
      stage(it + kStages - 1);
      const int buf = it % kStages;
      float acc[32];
      StageProduct<KS>(frag, tiles + buf * TileBytes<KS>(), acc);
      const float4* ri = row_info + buf * kStageRows;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float4 i = ri[8 * j + 2 * tq + c];  // query row 8j + 2tq + c of the stage
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            col[h] = fmaf(FastExp2(fmaf(acc[4 * j + 2 * h + c], i.x, -i.y)), i.z, col[h]);
          }
        }
      }
    }
    CpAsyncWait<0>();
    FinishColumn(s, e, w, piece, splits, ea, tq, col[0]);
    FinishColumn(s, e, w, piece, splits, eb, tq, col[1]);
  }
  FinishColumns<kThreads>(a, w, seg, s, e, etile, level, finish, &last);
}

template <int KS>
cudaError_t LaunchKS(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                     cudaStream_t stream) {
  const unsigned n = static_cast<unsigned>(l.large_list.size());
  const int steps = a.score_only ? a.large_steps : 3;  // LookupArgs::large_steps
  if (steps < 2) return cudaSuccess;
  constexpr int kSmem = SmemBytes<KS>();
  static const cudaError_t attr = [] {
    cudaError_t e1 = cudaFuncSetAttribute(RowStatsWgmmaKernel<KS>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    cudaError_t e2 = cudaFuncSetAttribute(ColumnWgmmaKernel<KS>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    return e1 != cudaSuccess ? e1 : e2;
  }();
  if (attr != cudaSuccess) return attr;
  RowStatsWgmmaKernel<KS><<<dim3(l.max_mma_row_blocks, n), kThreads, kSmem, stream>>>(a, w, level);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || steps < 3) return err;
  const bool staged = level == 2 && UseStagedSelect(a, l, SegmentList::kLarge);
  ColumnWgmmaKernel<KS>
      <<<dim3(l.max_mma_col_blocks, n), kThreads, kSmem, stream>>>(a, w, level, !staged);
  err = cudaGetLastError();
  if (err != cudaSuccess || !staged || a.score_only) return err;
  return LaunchStagedSelect(a, l, w, SegmentList::kLarge, stream);
}

}  // namespace

cudaError_t LaunchLargeWgmma(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                             int level, cudaStream_t stream) {
  if (a.head_dim <= 64) return LaunchKS<4>(a, l, w, level, stream);
  return LaunchKS<8>(a, l, w, level, stream);
}

}  // namespace sqkv::gpu::lookup_detail
