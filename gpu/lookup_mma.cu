// Large (prefill) segments with 16-bit centroids, on tensor cores (mma.sync m16n8k16, binary16
// operands, float32 accumulation); see gpu/lookup.h.
//   ConvertQKernel: each query row to binary16 after a power-of-two scale that puts its largest
//     |component| in [2^14, 2^15); the row's logit factor (undoing both scales, times log2 e/√d)
//     goes to info.x.
//   RowStatsKernel (pass 1): a block holds 128 query rows as A fragments in registers and streams
//     every centroid of the level through shared memory (cp.async, two stages): the exact per-row
//     max and normaliser, kept online, to info.y / info.z.
//   ColumnKernel (pass 2): a block holds 64 centroids as A fragments and streams every query row
//     (with its info) through shared memory: S^T tiles, so each thread sums its two centroids'
//     2^(l - max) / Z over the rows in registers. Scores go to the workspace; then the staged
//     selection kernel (lookup_staged.cu) selects, or (finish) the last block of the segment to
//     arrive.
// head_dim up to 64, 128 and 256 runs as 4, 8 and 16 k-steps (components past head_dim read as 0).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "gpu/lookup_select.cuh"
#include "gpu/paged_attention_common.cuh"

namespace sqkv::gpu::lookup_detail {
namespace {

using detail::CpAsync16;
using detail::CpAsyncCommit;
using detail::CpAsyncWait;
using detail::FastExp2;
using detail::LdMatrixX4;
using detail::QuadMax;
using detail::QuadSum;
using detail::SmemAddr;
using Mma16 = detail::Half16<__half>;

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarpRows = 16;  // A rows per warp (one m16 tile)
static_assert(kMmaRowTile == kWarpRows * kMmaRowThreads / 32, "pass 1: 16 rows per warp");
static_assert(kMmaColTile == kWarpRows * kMmaColThreads / 32, "pass 2: 16 entries per warp");

// Streamed tile rows (entries in pass 1, query rows in pass 2) per stage: 64, or 32 at 16 k-steps
// (keeps two stages under the 48 KB static limit).
template <int KS>
constexpr int StageRows() {
  return KS == 16 ? 32 : 64;
}
// Shared-memory row pitch in halves: 16 bytes of padding, so the 8 rows of an ldmatrix hit 8
// different 16-byte bank groups.
template <int KS>
constexpr int Pitch() {
  return KS * 16 + 8;
}

// A fragments (m16 x k16 per k-step, row-major) of rows a and b = a + 8, straight from global
// memory (binary16 rows of d halves; nullptr: a zero row). Components >= d are zero.
template <int KS>
__device__ __forceinline__ void LoadFragments(const uint16_t* row_a, const uint16_t* row_b, int d,
                                              int tq, uint32_t (&f)[KS][4]) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int k0 = ks * 16 + 2 * tq;
    const bool in = k0 < d;  // d is a multiple of 16: then k0 + 8 < d too
    f[ks][0] = in && row_a != nullptr ? *reinterpret_cast<const uint32_t*>(row_a + k0) : 0u;
    f[ks][1] = in && row_b != nullptr ? *reinterpret_cast<const uint32_t*>(row_b + k0) : 0u;
    f[ks][2] = in && row_a != nullptr ? *reinterpret_cast<const uint32_t*>(row_a + k0 + 8) : 0u;
    f[ks][3] = in && row_b != nullptr ? *reinterpret_cast<const uint32_t*>(row_b + k0 + 8) : 0u;
  }
}

// acc[n] (n8 tiles of the stage's rows) += frag · tile^T over all k-steps; tile: StageRows<KS>()
// rows of Pitch<KS>() halves at shared address `tile`.
template <int KS>
__device__ __forceinline__ void TileProduct(const uint32_t (&frag)[KS][4], uint32_t tile, int lane,
                                            float (&acc)[StageRows<KS>() / 8][4]) {
  constexpr int kNT = StageRows<KS>() / 8;
#pragma unroll
  for (int n = 0; n < kNT; ++n) {
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[n][v] = 0.f;
  }
  const int mi = lane / 8, r8 = lane % 8;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      const int row = np * 16 + (mi >> 1) * 8 + r8;
      const int col = ks * 16 + (mi & 1) * 8;
      uint32_t b[4];
      LdMatrixX4(b, tile + static_cast<uint32_t>(row * Pitch<KS>() + col) * 2);
      Mma16::Mma(acc[2 * np], frag[ks], b[0], b[1]);
      Mma16::Mma(acc[2 * np + 1], frag[ks], b[2], b[3]);
    }
  }
}

__global__ void __launch_bounds__(256) ConvertQKernel(LookupArgs a, Workspace w) {
  const int seg = w.large_list[blockIdx.y];
  const LookupSegment& s = a.segments[seg];
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * 8 + threadIdx.x / 32;
  if (row >= s.rows) return;
  const int d = a.head_dim;
  const float* src = a.q + static_cast<size_t>(s.q_row + row) * d;
  float m = 0.f;
  for (int k = lane * 4; k < d; k += 128) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(src + k));
    m = fmaxf(m, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  int ex = 0;
  frexpf(m, &ex);                        // m = f · 2^ex, f in [0.5, 1)
  const int e2 = m > 0.f ? 15 - ex : 0;  // max |q| · 2^e2 in [2^14, 2^15)
  auto* dst = reinterpret_cast<__half2*>(reinterpret_cast<uint16_t*>(w.floats + s.qh_offset) +
                                         static_cast<size_t>(row) * d);
  for (int k = lane * 4; k < d; k += 128) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(src + k));
    dst[k / 2] = __floats2half2_rn(ldexpf(v.x, e2), ldexpf(v.y, e2));
    dst[k / 2 + 1] = __floats2half2_rn(ldexpf(v.z, e2), ldexpf(v.w, e2));
  }
  if (lane == 0) {
    const float f = ldexpf(s.centroid_scale * (kLog2e / sqrtf(static_cast<float>(d))), -e2);
    reinterpret_cast<float4*>(w.floats + s.info_offset)[row] = make_float4(f, 0.f, 0.f, 0.f);
  }
}

template <int KS>
__global__ void __launch_bounds__(kMmaRowThreads)
    RowStatsKernel(LookupArgs a, Workspace w, int level) {
  constexpr int kRows = StageRows<KS>();
  constexpr int kChunks = KS * 2;  // 16-byte chunks per streamed row
  constexpr int kNT = kRows / 8;
  __shared__ __align__(16) uint16_t tile[2][kRows * Pitch<KS>()];
  __shared__ __align__(16) float sizes[2][kRows];
  const int seg = w.large_list[blockIdx.y];
  const LookupSegment& s = a.segments[seg];
  if (!ScoredAtLevel(s, level)) return;
  const int row0 = blockIdx.x * kMmaRowTile;
  if (row0 >= s.rows) return;
  const int d = a.head_dim;
  const EntrySet e = GetEntrySet(s, level, w.ints, d, true);
  const int t = threadIdx.x, lane = t % 32, warp = t / 32, g = lane / 4, tq = lane % 4;
  const uint16_t* qh = reinterpret_cast<const uint16_t*>(w.floats + s.qh_offset);
  float4* info = reinterpret_cast<float4*>(w.floats + s.info_offset);
  const int ra = row0 + warp * kWarpRows + g, rb = ra + 8;
  uint32_t frag[KS][4];
  LoadFragments<KS>(ra < s.rows ? qh + static_cast<size_t>(ra) * d : nullptr,
                    rb < s.rows ? qh + static_cast<size_t>(rb) * d : nullptr, d, tq, frag);
  const float f[2] = {ra < s.rows ? info[ra].x : 0.f, rb < s.rows ? info[rb].x : 0.f};

  const int ntiles = (e.total + kRows - 1) / kRows;
  auto stage = [&](int it, int buf) {
    for (int idx = t; idx < kRows * kChunks; idx += kMmaRowThreads) {
      const int r = idx / kChunks, ch = idx % kChunks;
      const int i = it * kRows + r;
      const bool ok = i < e.total && ch * 8 < d;
      const void* src =
          ok ? static_cast<const uint8_t*>(EntryRow(e, i)) + ch * 16 : static_cast<const void*>(qh);
      CpAsync16(SmemAddr(&tile[buf][r * Pitch<KS>() + ch * 8]), src, ok ? 16 : 0);
    }
    if (t < kRows) {
      const int i = it * kRows + t;
      sizes[buf][t] = i < e.total ? static_cast<float>(EntrySize(e, i)) : 0.f;
    }
    CpAsyncCommit();
  };

  float m_run[2] = {-INFINITY, -INFINITY}, z_run[2] = {0.f, 0.f};
  stage(0, 0);
  for (int it = 0; it < ntiles; ++it) {
    const int buf = it & 1;
    if (it + 1 < ntiles) {
      stage(it + 1, buf ^ 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    float acc[kNT][4];
    TileProduct<KS>(frag, SmemAddr(tile[buf]), lane, acc);
    float n[kNT][2];
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const float2 v = *reinterpret_cast<const float2*>(&sizes[buf][j * 8 + 2 * tq]);
      n[j][0] = v.x;
      n[j][1] = v.y;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows g (c0, c1) and g + 8 (c2, c3)
      float l[kNT][2];
      float tmax = -INFINITY;
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          l[j][c] = acc[j][2 * h + c] * f[h];
          if (n[j][c] > 0.f) tmax = fmaxf(tmax, l[j][c]);
        }
      }
      tmax = QuadMax(tmax);  // finite: every streamed tile holds a valid entry
      const float m_new = fmaxf(m_run[h], tmax);
      float z = z_run[h] * FastExp2(m_run[h] - m_new);  // -inf - finite: 2^-inf = 0
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          // Past-the-end entries (size 0) hold logit 0, which may lie far above the max.
          if (n[j][c] > 0.f) z += n[j][c] * FastExp2(l[j][c] - m_new);
        }
      }
      m_run[h] = m_new;
      z_run[h] = z;
    }
    __syncthreads();  // the buffer is staged again next iteration
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float z = QuadSum(z_run[h]);
    const int row = h == 0 ? ra : rb;
    if (tq == 0 && row < s.rows) info[row] = make_float4(f[h], m_run[h], 1.f / z, 0.f);
  }
}

template <int KS>
__global__ void __launch_bounds__(kMmaColThreads)
    ColumnKernel(LookupArgs a, Workspace w, int level, bool finish) {
  constexpr int kRows = StageRows<KS>();
  constexpr int kChunks = KS * 2;
  constexpr int kNT = kRows / 8;
  __shared__ __align__(16) uint16_t tile[2][kRows * Pitch<KS>()];
  __shared__ __align__(16) float4 row_info[2][kRows];
  __shared__ int last;
  const int seg = w.large_list[blockIdx.y];
  const LookupSegment& s = a.segments[seg];
  if (!ScoredAtLevel(s, level)) return;  // the whole grid row: its counter stays untouched
  const int d = a.head_dim;
  const EntrySet e = GetEntrySet(s, level, w.ints, d, true);
  const int col0 = blockIdx.x * kMmaColTile;
  if (col0 < e.scored) {
    const int t = threadIdx.x, lane = t % 32, warp = t / 32, g = lane / 4, tq = lane % 4;
    const uint16_t* qh = reinterpret_cast<const uint16_t*>(w.floats + s.qh_offset);
    const float4* info = reinterpret_cast<const float4*>(w.floats + s.info_offset);
    const int ea = col0 + warp * kWarpRows + g, eb = ea + 8;
    uint32_t frag[KS][4];
    LoadFragments<KS>(ea < e.scored ? static_cast<const uint16_t*>(EntryRow(e, ea)) : nullptr,
                      eb < e.scored ? static_cast<const uint16_t*>(EntryRow(e, eb)) : nullptr, d,
                      tq, frag);
    const int rows = s.rows;
    const int ntiles = (rows + kRows - 1) / kRows;
    auto stage = [&](int it, int buf) {
      for (int idx = t; idx < kRows * kChunks; idx += kMmaColThreads) {
        const int r = idx / kChunks, ch = idx % kChunks;
        const int row = it * kRows + r;
        const bool ok = row < rows && ch * 8 < d;
        const uint16_t* src = ok ? qh + static_cast<size_t>(row) * d + ch * 8 : qh;
        CpAsync16(SmemAddr(&tile[buf][r * Pitch<KS>() + ch * 8]), src, ok ? 16 : 0);
      }
      if (t < kRows) {
        const int row = it * kRows + t;
        // Rows past the end read as (0, 0, 0): they add 2^0 · 0.
        CpAsync16(SmemAddr(&row_info[buf][t]), row < rows ? info + row : info, row < rows ? 16 : 0);
      }
      CpAsyncCommit();
    };
    float col[2] = {0.f, 0.f};  // entries g and g + 8
    stage(0, 0);
    for (int it = 0; it < ntiles; ++it) {
      const int buf = it & 1;
      if (it + 1 < ntiles) {
        stage(it + 1, buf ^ 1);
        CpAsyncWait<1>();
      } else {
        CpAsyncWait<0>();
      }
      __syncthreads();
      float acc[kNT][4];
      TileProduct<KS>(frag, SmemAddr(tile[buf]), lane, acc);
#pragma unroll
      for (int j = 0; j < kNT; ++j) {  // query rows j*8 + 2tq (c0, c2) and + 1 (c1, c3)
        const float4 i0 = row_info[buf][j * 8 + 2 * tq];
        const float4 i1 = row_info[buf][j * 8 + 2 * tq + 1];
        col[0] += FastExp2(fmaf(acc[j][0], i0.x, -i0.y)) * i0.z +
                  FastExp2(fmaf(acc[j][1], i1.x, -i1.y)) * i1.z;
        col[1] += FastExp2(fmaf(acc[j][2], i0.x, -i0.y)) * i0.z +
                  FastExp2(fmaf(acc[j][3], i1.x, -i1.y)) * i1.z;
      }
      __syncthreads();
    }
    float* sc = w.floats + s.score_offset;
    const float inv_rows = 1.f / static_cast<float>(rows);
    const float c0 = QuadSum(col[0]), c1 = QuadSum(col[1]);
    if (tq == 0 && ea < e.scored) sc[ea] = c0 * inv_rows;
    if (tq == 0 && eb < e.scored) sc[eb] = c1 * inv_rows;
  }
  if (!finish) return;  // the staged selection kernel selects
  if (!ArriveLast(w.counters + seg, gridDim.x, &last)) return;
  if (a.score_only) return;
  __shared__ ArgsBuffer args;
  args.Fill(a, w);
  SelectSegment<kMmaColThreads>(args.args(), args.ws(), seg, level, true);
}

template <int KS>
cudaError_t LaunchKS(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                     cudaStream_t stream) {
  const unsigned n = static_cast<unsigned>(l.large_list.size());
  const int steps = a.score_only ? a.large_steps : 3;  // LookupArgs::large_steps
  if (steps < 2) return cudaSuccess;
  const dim3 rows((l.max_large_rows + kMmaRowTile - 1) / kMmaRowTile, n);
  RowStatsKernel<KS><<<rows, kMmaRowThreads, 0, stream>>>(a, w, level);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || steps < 3) return err;
  const bool staged = level == 2 && UseStagedSelect(a, l, SegmentList::kLarge);
  const dim3 cols((l.max_entries + kMmaColTile - 1) / kMmaColTile, n);
  ColumnKernel<KS><<<cols, kMmaColThreads, 0, stream>>>(a, w, level, !staged);
  err = cudaGetLastError();
  if (err != cudaSuccess || !staged || a.score_only) return err;
  return LaunchStagedSelect(a, l, w, SegmentList::kLarge, stream);
}

}  // namespace

cudaError_t LaunchConvertQ(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                           cudaStream_t stream) {
  if (l.large_list.empty()) return cudaSuccess;
  const dim3 grid((l.max_large_rows + 7) / 8, static_cast<unsigned>(l.large_list.size()));
  ConvertQKernel<<<grid, 256, 0, stream>>>(a, w);
  return cudaGetLastError();
}

cudaError_t LaunchLargeF16(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                           int level, cudaStream_t stream) {
  if (l.large_list.empty()) return cudaSuccess;
  if (a.head_dim <= 64) return LaunchKS<4>(a, l, w, level, stream);
  if (a.head_dim <= 128) return LaunchKS<8>(a, l, w, level, stream);
  return LaunchKS<16>(a, l, w, level, stream);
}

}  // namespace sqkv::gpu::lookup_detail
