// Large (prefill) segments with 16-bit centroids, on tensor cores (mma.sync m16n8k16, binary16
// operands, float32 accumulation); see gpu/lookup.h.
//   ConvertQKernel: each query row to binary16 after a power-of-two scale that puts its largest
//     |component| in [2^14, 2^15); the row's logit factor (undoing both scales, times log2 e/√d)
//     goes to info.x. Pass 1 (either family) is its programmatic dependent where it directly
//     follows it: pass 1's blocks start copying entries while the conversion finishes.
//   RowStatsKernel (pass 1): a block holds 128 query rows as A fragments in registers (two m16
//     tiles per warp) and streams one piece of the level's entries (row_splits pieces) through
//     shared memory (cp.async, two stages) in groups of 16 entries: the exact per-row max and
//     normaliser of the piece, kept online per lane and combined over the quad at the end. One
//     piece: to info.y / info.z; several: to the workspace, and the last block of the row tile to
//     arrive combines them in piece order.
//   ColumnKernel (pass 2): a block holds 128 entries as A fragments and streams one piece of the
//     query rows (col_splits pieces, each row with its info): S^T tiles, so each thread sums its
//     entries' 2^(l - max) / Z over the rows in registers. Scores (several pieces: their sums in
//     piece order, by the last block of the entry tile to arrive) go to the workspace; then the
//     staged selection kernel (lookup_staged.cu) selects, or (finish) the last block of the
//     segment to arrive.
// Two m16 tiles per warp: each ldmatrix.x4 of the streamed operand feeds four mma (one tile, and
// two mma, at head_dim > 128, where two tiles' fragments would not fit in registers).
// head_dim up to 64, 128 and 256 runs as 4, 8 and 16 k-steps (components past head_dim read as 0).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

#include "gpu/device.h"
#include "gpu/kernel_trace.cuh"
#include "gpu/lookup_mma.cuh"

SQKV_TRACE_UNIT(lookup_mma)

namespace sqkv::gpu::lookup_detail {
namespace {

using detail::CpAsync16;
using detail::CpAsyncCommit;
using detail::CpAsyncWait;
using detail::FastExp2;
using detail::LdMatrixX4;
using detail::SmemAddr;
using Mma16 = detail::Half16<__half>;

constexpr float kLog2e = 1.4426950408889634f;
// Streamed rows (entries in pass 1, query rows in pass 2) per group: two n8 tiles, one ldmatrix.x4
// per k-step. A stage's groups are software-pipelined: the mma of group p + 1 are issued before
// the exp2 work of group p, so a warp's tensor and special-function work overlap.
constexpr int kGroup = 16;

// m16 tiles per warp: two where their A fragments fit in registers (KS <= 8: 64 registers).
template <int KS>
constexpr int WarpTiles() {
  return KS == 16 ? 1 : 2;
}
// Threads of a block of either pass (128 A rows).
template <int KS>
constexpr int BlockThreads() {
  return 32 * kMmaRowTile / (16 * WarpTiles<KS>());
}
static_assert(kMmaRowTile == kMmaColTile, "both passes: one block shape");
// Blocks per SM the launch bounds ask for: 12 warps of up to 168 registers (two m16 tiles: 64
// registers of A fragments, 32 of accumulators, the B fragments in flight; at 128 registers the
// compiler spills in the product loop), or 16 warps of 128 registers (one tile, 8 warps a block).
template <int KS>
constexpr int MinBlocks() {
  return WarpTiles<KS>() == 2 ? 3 : 2;
}

// Streamed rows per stage: 64, or 32 at 16 k-steps (keeps two stages under the 48 KB static
// limit).
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

// No work between a group's k-steps.
struct NoWork {
  __device__ __forceinline__ void operator()(int) const {}
};

// acc[m][n] = frag[m] · (rows row0 + 8n .. row0 + 8n + 7 of the stage tile)^T over all k-steps;
// tile: StageRows<KS>() rows of Pitch<KS>() halves at shared address `tile`. between(ks) runs
// after the mma of k-step ks: the exp2 work of the previous group, so that the warp's instruction
// stream alternates tensor and special-function work (each in flight while the other issues).
template <int KS, int MT, class Between>
__device__ __forceinline__ void GroupProduct(const uint32_t (&frag)[MT][KS][4], uint32_t tile,
                                             int row0, int lane, float (&acc)[MT][2][4],
                                             const Between& between) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[m][n][v] = 0.f;
    }
  }
  const int mi = lane / 8, r8 = lane % 8;
  const int row = row0 + (mi >> 1) * 8 + r8;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int col = ks * 16 + (mi & 1) * 8;
    uint32_t b[4];
    LdMatrixX4(b, tile + static_cast<uint32_t>(row * Pitch<KS>() + col) * 2);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      Mma16::Mma(acc[m][0], frag[m][ks], b[0], b[1]);
      Mma16::Mma(acc[m][1], frag[m][ks], b[2], b[3]);
    }
    between(ks);
  }
}

// 2^e as a float, e in [-126, 127] (a normal number).
__device__ __forceinline__ float Pow2(int e) { return __int_as_float((e + 127) << 23); }

// A row's scaling by 2^e2 (e2 in [-113, 164]: max |q| · 2^e2 in [2^14, 2^15)) as two multiplies,
// each by a normal power of two: x · lo is exact (lo = 1, or 2^64 where e2 > 126, i.e.
// |x| < 2^-111), so x · lo · hi is rounded once, exactly as ldexpf(x, e2), without ldexpf's range
// handling per component.
struct QScale {
  float lo, hi;
  __device__ explicit QScale(int e2) {
    const int a = e2 > 126 ? 64 : 0;
    lo = Pow2(a);
    hi = Pow2(e2 - a);
  }
  __device__ float operator()(float x) const { return x * lo * hi; }
};

// Query rows per warp in ConvertQKernel (their loads issued together, their chains interleaved).
constexpr int kConvertRows = 4;

// Each query row to binary16 after a power-of-two scale that puts its largest |component| in
// [2^14, 2^15); the row's logit factor (undoing both scales, times log2 e/√d) goes to info.x.
// Pass 1, a programmatic dependent where it directly follows, may launch at once.
__global__ void __launch_bounds__(256) ConvertQKernel(LookupArgs a, Workspace w) {
  SQKV_TRACE_START(TraceKernel::kConvertQ);
  detail::GridDependencyTrigger();
  constexpr int R = kConvertRows;
  constexpr int kChunks = 2;  // float4 per lane and row: head_dim <= 256
  const int seg = w.large_list[blockIdx.y];
  const LookupSegment& s = a.segments[seg];
  const int lane = threadIdx.x % 32;
  const int row0 = (blockIdx.x * 8 + threadIdx.x / 32) * R;
  if (row0 >= s.rows) return;
  const int d = a.head_dim;
  const float* src = a.q + static_cast<size_t>(s.q_row + row0) * d;
  float4 v[R][kChunks];
  float m[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int k = lane * 4 + 128 * c;
      v[r][c] = k < d && row0 + r < s.rows
                    ? __ldg(reinterpret_cast<const float4*>(src + static_cast<size_t>(r) * d + k))
                    : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      m[r] = fmaxf(m[r], fmaxf(fmaxf(fabsf(v[r][c].x), fabsf(v[r][c].y)),
                               fmaxf(fabsf(v[r][c].z), fabsf(v[r][c].w))));
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) m[r] = fmaxf(m[r], __shfl_xor_sync(0xffffffffu, m[r], o));
  }
  const float base = s.centroid_scale * (kLog2e / sqrtf(static_cast<float>(d)));
  auto* qh = reinterpret_cast<__half2*>(w.floats + s.qh_offset);
  auto* info = reinterpret_cast<float4*>(w.floats + s.info_offset);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = row0 + r;
    if (row >= s.rows) break;
    const int e2 = QRowExponent(m[r]);
    const QScale sc(e2);
    __half2* dst = qh + static_cast<size_t>(row) * d / 2;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int k = lane * 4 + 128 * c;
      if (k >= d) break;
      // One 8-byte store of the four halves (rows are 16-byte aligned: d is a multiple of 16).
      const __half2 lo = __floats2half2_rn(sc(v[r][c].x), sc(v[r][c].y));
      const __half2 hi = __floats2half2_rn(sc(v[r][c].z), sc(v[r][c].w));
      *reinterpret_cast<uint2*>(dst + k / 2) = make_uint2(
          *reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
    }
    if (lane == 0) {
      // base · 2^-e2 rounds once, as ldexpf does, where 2^-e2 is a normal float
      const float f = e2 <= 126 ? base * Pow2(-e2) : ldexpf(base, -e2);
      info[row] = make_float4(f, 0.f, 0.f, 0.f);
    }
  }
  SQKV_TRACE_END(TraceKernel::kConvertQ);
}

// Pass 1's online update by one group, in three parts: the thread's rows (m, h) (m16 tile m, row
// g or g + 8) take the logits l = acc · f of the thread's four entries of the group into their
// running max (GroupMax, RaiseMax) and normaliser (AddTerm, one entry of one row each). Each lane
// keeps its own max (no shuffles per group; the quad combines at the end); a rescale runs only
// where a max grew (one vote per group). n: the entries' sizes (kTail: 0 past the end of the
// piece, those entries left out).
template <int MT>
constexpr int RowTerms() {
  return MT * 8;  // (m, h, j, c)
}

template <bool kTail, int MT>
__device__ __forceinline__ void GroupMax(const float (&acc)[MT][2][4], const float (&n)[2][2],
                                         const float (&f)[MT][2], float (&tmax)[MT][2]) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows g (c0, c1) and g + 8 (c2, c3)
      float a[2][2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          a[j][c] = !kTail || n[j][c] > 0.f ? acc[m][j][2 * h + c] : -INFINITY;
        }
      }
      const float amax = fmaxf(fmaxf(a[0][0], a[0][1]), fmaxf(a[1][0], a[1][1]));
      // The largest logit: f > 0 and rounding is monotone, so max(acc) · f = max(acc · f).
      tmax[m][h] = !kTail || amax > -INFINITY ? amax * f[m][h] : -INFINITY;
    }
  }
}

template <int MT>
__device__ __forceinline__ void RaiseMax(const float (&tmax)[MT][2], float (&m_run)[MT][2],
                                         float (&z_run)[MT][2]) {
  bool grow = false;
#pragma unroll
  for (int m = 0; m < MT; ++m) grow |= tmax[m][0] > m_run[m][0] || tmax[m][1] > m_run[m][1];
  if (!__any_sync(0xffffffffu, grow)) return;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (tmax[m][h] > m_run[m][h]) {
        z_run[m][h] *= FastExp2(m_run[m][h] - tmax[m][h]);  // from -inf: 2^-inf = 0
        m_run[m][h] = tmax[m][h];
      }
    }
  }
}

// Term e of RowTerms: row (m, h) takes entry (j, c). Consecutive terms go to different rows.
template <bool kTail, int MT>
__device__ __forceinline__ void AddTerm(const float (&acc)[MT][2][4], const float (&n)[2][2],
                                        const float (&f)[MT][2], const float (&m_run)[MT][2],
                                        float (&z_run)[MT][2], int e) {
  const int h = e % 2, m = e / 2 % MT, j = e / (2 * MT) / 2, c = e / (2 * MT) % 2;
  // Past-the-end entries (size 0) hold logit 0, which may lie far above the max.
  if (!kTail || n[j][c] > 0.f) {
    z_run[m][h] =
        fmaf(n[j][c], FastExp2(fmaf(acc[m][j][2 * h + c], f[m][h], -m_run[m][h])), z_run[m][h]);
  }
}

template <bool kTail, int MT>
__device__ __forceinline__ void UpdateRowStats(const float (&acc)[MT][2][4], const float (&n)[2][2],
                                               const float (&f)[MT][2], float (&m_run)[MT][2],
                                               float (&z_run)[MT][2]) {
  float tmax[MT][2];
  GroupMax<kTail, MT>(acc, n, f, tmax);
  RaiseMax<MT>(tmax, m_run, z_run);
#pragma unroll
  for (int e = 0; e < RowTerms<MT>(); ++e) AddTerm<kTail, MT>(acc, n, f, m_run, z_run, e);
}

template <int KS>
__global__ void __launch_bounds__(BlockThreads<KS>(), MinBlocks<KS>())
    RowStatsKernel(LookupArgs a, Workspace w, int level) {
  constexpr int MT = WarpTiles<KS>();
  constexpr int kThreads = BlockThreads<KS>();
  constexpr int kRows = StageRows<KS>();
  constexpr int kChunks = KS * 2;  // 16-byte chunks per streamed row
  __shared__ __align__(16) uint16_t tile[2][kRows * Pitch<KS>()];
  __shared__ __align__(16) int32_t sizes[2][kRows];
  __shared__ int last;
  PassBlock b;
  // (Every block waits for the conversion before it ends, so this grid's completion implies the
  // conversion's.)
  if (!GetPassBlock(a, w, level, /*row_pass=*/true, &b)) return detail::GridDependencyWait();
  const LookupSegment& s = *b.s;
  const EntrySet& e = b.e;
  const int splits = b.splits, rtile = b.tile, piece = b.piece, row0 = rtile * kMmaRowTile;
  if (row0 >= s.rows) return detail::GridDependencyWait();
  const int d = a.head_dim;
  const int2 range = PieceRange(e.total, splits, piece, kGroup);
  const int begin = range.x, end = range.y;
  const int t = threadIdx.x, lane = t % 32, warp = t / 32, g = lane / 4, tq = lane % 4;
  const uint16_t* qh = b.qh;
  float4* info = b.info;
  // The piece's remainder of kRows entries is its first stage, so the stage loop below runs the
  // full stages' code alone (the short stage's checks cost a copy of the update per group).
  const StageSpans<ShortStage::kFirst, kRows> spans(begin, end);
  const int ntiles = spans.ntiles;
  auto stage = [&](int it, int buf) {
    const int i0 = spans.Begin(it), n = spans.Count(it);
    for (int idx = t; idx < kRows * kChunks; idx += kThreads) {
      const int r = idx / kChunks, ch = idx % kChunks;
      const int i = i0 + r;
      const bool ok = r < n && ch * 8 < d;
      const void* src =
          ok ? static_cast<const uint8_t*>(EntryRow(e, i)) + ch * 16 : static_cast<const void*>(qh);
      CpAsync16(SmemAddr(&tile[buf][r * Pitch<KS>() + ch * 8]), src, ok ? 16 : 0);
    }
    if (t < kRows) {
      const int i = i0 + t;
      const bool ok = t < n;
      CpAsync4(SmemAddr(&sizes[buf][t]), ok ? EntrySizePtr(e, i) : e.prim_size, ok ? 4 : 0);
    }
    CpAsyncCommit();
  };

  float m_run[MT][2], z_run[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    m_run[m][0] = m_run[m][1] = -INFINITY;
    z_run[m][0] = z_run[m][1] = 0.f;
  }
  // The first entries (index data) are copied before waiting for the q conversion, which this
  // kernel may follow as a programmatic dependent; the q rows and factors after.
  if (ntiles > 0) stage(0, 0);
  detail::GridDependencyWait();
  uint32_t frag[MT][KS][4];
  float f[MT][2];
  int rows_of[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int ra = row0 + (warp * MT + m) * 16 + g, rb = ra + 8;
    rows_of[m][0] = ra;
    rows_of[m][1] = rb;
    LoadFragments<KS>(ra < s.rows ? qh + static_cast<size_t>(ra) * d : nullptr,
                      rb < s.rows ? qh + static_cast<size_t>(rb) * d : nullptr, d, tq, frag[m]);
    f[m][0] = ra < s.rows ? info[ra].x : 0.f;
    f[m][1] = rb < s.rows ? info[rb].x : 0.f;
  }
  // Stage it (kFull: not stage 0, so all kRows entries are there).
  auto run_stage = [&](int it, auto full_tag) {
    constexpr bool kFull = decltype(full_tag)::value;
    const int buf = it & 1;
    if (it + 1 < ntiles) {
      stage(it + 1, buf ^ 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    // Entries of the stage from group p on (uniform over the block).
    const int left = kFull ? kRows : spans.short_n;
    const uint32_t base = SmemAddr(tile[buf]);
    float acc[2][MT][2][4];
    GroupProduct<KS, MT>(frag, base, 0, lane, acc[0], NoWork());
#pragma unroll
    for (int p = 0; p < kRows / kGroup; ++p) {
      const int valid = left - p * kGroup;
      if (!kFull && valid <= 0) break;
      float n[2][2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int2 v = *reinterpret_cast<const int2*>(&sizes[buf][p * kGroup + j * 8 + 2 * tq]);
        n[j][0] = static_cast<float>(v.x);
        n[j][1] = static_cast<float>(v.y);
      }
      const float(&a)[MT][2][4] = acc[p & 1];
      if (!kFull && valid < kGroup) {  // the piece's short group: nothing of the stage follows it
        UpdateRowStats<true, MT>(a, n, f, m_run, z_run);
      } else if (p + 1 < kRows / kGroup && (kFull || valid > kGroup)) {
        // Group p's update runs between group p + 1's k-steps: its max (k-step 0), the rescale
        // (1), then its terms over the remaining k-steps.
        float tmax[MT][2];
        GroupProduct<KS, MT>(frag, base, (p + 1) * kGroup, lane, acc[(p + 1) & 1], [&](int ks) {
          if (ks == 0) GroupMax<false, MT>(a, n, f, tmax);
          if (ks == 1) RaiseMax<MT>(tmax, m_run, z_run);
          if (ks < 2) return;
#pragma unroll
          for (int e = ks - 2; e < RowTerms<MT>(); e += KS - 2) {
            AddTerm<false, MT>(a, n, f, m_run, z_run, e);
          }
        });
      } else {
        UpdateRowStats<false, MT>(a, n, f, m_run, z_run);
      }
    }
    __syncthreads();  // the buffer is staged again next iteration
  };
  if (ntiles > 0) run_stage(0, std::false_type());
  for (int it = 1; it < ntiles; ++it) run_stage(it, std::true_type());
  float2* part = reinterpret_cast<float2*>(w.floats + s.stat_offset);  // (splits, rows)
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      FinishRowStat(s, info, part, piece, splits, rows_of[m][h], tq, f[m][h], m_run[m][h],
                    z_run[m][h]);
    }
  }
  if (splits > 1) CombineRowPieces<kThreads>(s, w, info, part, rtile, &last);
}

template <int KS>
__global__ void __launch_bounds__(BlockThreads<KS>(), MinBlocks<KS>())
    ColumnKernel(LookupArgs a, Workspace w, int level, bool finish) {
  constexpr int MT = WarpTiles<KS>();
  constexpr int kThreads = BlockThreads<KS>();
  constexpr int kRows = StageRows<KS>();
  constexpr int kChunks = KS * 2;
  __shared__ __align__(16) uint16_t tile[2][kRows * Pitch<KS>()];
  __shared__ __align__(16) float4 row_info[2][kRows];
  __shared__ int last;
  // The staged selection that follows (without finish) waits for this grid's completion before it
  // reads the scores; letting it launch now lets its blocks stage index data as SMs free up.
  if (!finish) detail::GridDependencyTrigger();
  PassBlock b;
  if (!GetPassBlock(a, w, level, /*row_pass=*/false, &b)) return;
  const LookupSegment& s = *b.s;
  const EntrySet& e = b.e;
  const int seg = b.seg, d = a.head_dim;
  const int splits = b.splits, etile = b.tile, piece = b.piece, col0 = etile * kMmaColTile;
  if (col0 < e.scored) {
    const int t = threadIdx.x, lane = t % 32, warp = t / 32, g = lane / 4, tq = lane % 4;
    const uint16_t* qh = b.qh;
    const float4* info = b.info;
    const int rows = s.rows;
    const int2 range = PieceRange(rows, splits, piece, kGroup);
    const int begin = range.x, end = range.y;
    uint32_t frag[MT][KS][4];
    int ent[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int ea = col0 + (warp * MT + m) * 16 + g, eb = ea + 8;
      ent[m][0] = ea;
      ent[m][1] = eb;
      LoadFragments<KS>(ea < e.scored ? static_cast<const uint16_t*>(EntryRow(e, ea)) : nullptr,
                        eb < e.scored ? static_cast<const uint16_t*>(EntryRow(e, eb)) : nullptr, d,
                        tq, frag[m]);
    }
    const int ntiles = CeilDiv(end - begin, kRows);
    auto stage = [&](int it, int buf) {
      for (int idx = t; idx < kRows * kChunks; idx += kThreads) {
        const int r = idx / kChunks, ch = idx % kChunks;
        const int row = begin + it * kRows + r;
        const bool ok = row < end && ch * 8 < d;
        const uint16_t* src = ok ? qh + static_cast<size_t>(row) * d + ch * 8 : qh;
        CpAsync16(SmemAddr(&tile[buf][r * Pitch<KS>() + ch * 8]), src, ok ? 16 : 0);
      }
      if (t < kRows) {
        const int row = begin + it * kRows + t;
        // Rows past the end read as (0, 0, 0): they add 2^0 · 0.
        CpAsync16(SmemAddr(&row_info[buf][t]), row < end ? info + row : info, row < end ? 16 : 0);
      }
      CpAsyncCommit();
    };
    float col[MT][2];  // entries g and g + 8 of each m16 tile
#pragma unroll
    for (int m = 0; m < MT; ++m) col[m][0] = col[m][1] = 0.f;
    if (ntiles > 0) stage(0, 0);
    for (int it = 0; it < ntiles; ++it) {
      const int buf = it & 1;
      if (it + 1 < ntiles) {
        stage(it + 1, buf ^ 1);
        CpAsyncWait<1>();
      } else {
        CpAsyncWait<0>();
      }
      __syncthreads();
      const int left = end - (begin + it * kRows);  // rows of the stage (uniform)
      const uint32_t base = SmemAddr(tile[buf]);
      float acc[2][MT][2][4];
      GroupProduct<KS, MT>(frag, base, 0, lane, acc[0], NoWork());
#pragma unroll
      for (int p = 0; p < kRows / kGroup; ++p) {
        if (left <= p * kGroup) break;
        // Query rows j*8 + 2tq (c0, c2: info i[j][0]) and + 1 (c1, c3: i[j][1]) of the group.
        float4 i[2][2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          i[j][0] = row_info[buf][p * kGroup + j * 8 + 2 * tq];
          i[j][1] = row_info[buf][p * kGroup + j * 8 + 2 * tq + 1];
        }
        const float(&a)[MT][2][4] = acc[p & 1];
        // Term e: entry (m, h) takes query rows (j, 0) and (j, 1).
        auto term = [&](int e) {
          const int h = e % 2, m = e / 2 % MT, j = e / (2 * MT);
          col[m][h] += FastExp2(fmaf(a[m][j][2 * h], i[j][0].x, -i[j][0].y)) * i[j][0].z +
                       FastExp2(fmaf(a[m][j][2 * h + 1], i[j][1].x, -i[j][1].y)) * i[j][1].z;
        };
        constexpr int kTerms = MT * 4;  // (m, h, j)
        if (p + 1 < kRows / kGroup && left > (p + 1) * kGroup) {
          // Group p's terms run between group p + 1's k-steps.
          GroupProduct<KS, MT>(frag, base, (p + 1) * kGroup, lane, acc[(p + 1) & 1], [&](int ks) {
#pragma unroll
            for (int e = ks; e < kTerms; e += KS) term(e);
          });
        } else {
#pragma unroll
          for (int e = 0; e < kTerms; ++e) term(e);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int h = 0; h < 2; ++h) FinishColumn(s, e, w, piece, splits, ent[m][h], tq, col[m][h]);
    }
  }
  FinishColumns<kThreads>(a, w, seg, s, e, etile, level, finish, &last);
}

template <int KS>
cudaError_t LaunchKS(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                     cudaStream_t stream) {
  const unsigned n = static_cast<unsigned>(l.large_list.size());
  const int steps = a.score_only ? a.large_steps : 3;  // LookupArgs::large_steps
  if (steps < 2) return cudaSuccess;
  cudaError_t err =
      LaunchPass(RowStatsKernel<KS>, dim3(l.max_mma_row_blocks, n), BlockThreads<KS>(), 0, stream,
                 Pass1FollowsConversion(l, level), a, w, level);
  if (err != cudaSuccess || steps < 3) return err;
  const bool staged = level == 2 && UseStagedSelect(a, l, SegmentList::kLarge);
  ColumnKernel<KS>
      <<<dim3(l.max_mma_col_blocks, n), BlockThreads<KS>(), 0, stream>>>(a, w, level, !staged);
  err = cudaGetLastError();
  if (err != cudaSuccess || !staged || a.score_only) return err;
  return LaunchStagedSelect(a, l, w, SegmentList::kLarge, stream);
}

}  // namespace

cudaError_t LaunchConvertQ(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                           cudaStream_t stream) {
  if (l.large_list.empty()) return cudaSuccess;
  constexpr int kRowsPerBlock = 8 * kConvertRows;
  const dim3 grid((l.max_large_rows + kRowsPerBlock - 1) / kRowsPerBlock,
                  static_cast<unsigned>(l.large_list.size()));
  ConvertQKernel<<<grid, 256, 0, stream>>>(a, w);
  return cudaGetLastError();
}

cudaError_t LaunchLargeF16(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                           int level, cudaStream_t stream) {
  if (l.large_list.empty()) return cudaSuccess;
  if (a.wgmma && a.head_dim <= 128 && CurrentDeviceIsSm90())
    return LaunchLargeWgmma(a, l, w, level, stream);
  if (a.head_dim <= 64) return LaunchKS<4>(a, l, w, level, stream);
  if (a.head_dim <= 128) return LaunchKS<8>(a, l, w, level, stream);
  return LaunchKS<16>(a, l, w, level, stream);
}

}  // namespace sqkv::gpu::lookup_detail
