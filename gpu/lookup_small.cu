// The fused lookup kernel of small (decode) segments and of unscored (fixed) segments; see
// gpu/lookup.h. A tile = kSmallTile centroids of one segment, read once for all of the segment's
// rows, 16 centroids per warp. Two ways to score it:
//   Tensor cores (the engine's decode: 16-bit centroids, every small segment of the launch with
//     at most kLookupNarrowRows rows, head_dim <= 128). A warp's 16 centroids are the A operand
//     of mma.sync m16n8k16 (binary16, float32 accumulation), the query rows the columns of B
//     (n = 8, columns past the rows zero). A dot
//     product does not depend on the order of its components, so the k order is the one in which
//     every lane loads its A fragments straight from global memory, 16 bytes at a time, with no
//     shared-memory staging: lane 4g + c reads 16-byte chunks c, c + 4, c + 8, c + 12 of centroid
//     rows g and g + 8, components 0-3 of a chunk being one k-step and 4-7 the next; its B
//     fragments hold the same components of query row g. q is rounded to binary16 after a per-row
//     power-of-two scale (as the large path's, gpu/lookup_mma.cu), once per block; the logit
//     factor undoes it. A persistent grid of about two blocks per SM, each scoring every
//     gridDim.x-th tile of its segment with the next tile's loads in flight (in registers).
//     On sm_90 (BulkMmaScorer) the tiles come by bulk copies into shared memory instead (one tile
//     per block in flight; the next copied once the current one is read), and a single-level launch
//     followed by the staged selection takes its segments' descriptors in the launch parameters
//     (ParamScoreKernel), so no block waits on memory before its first copies.
//   float32 FMA (every other variant: float32 centroids, launches with more rows, head_dim
//     > 128). A half warp (or a warp, head_dim > 128) shares one centroid, each lane 8 of its
//     components (one 16-byte load of binary16, two of float32) against the same components of
//     every query row held in registers; a butterfly reduces the partial dot products to one
//     (centroid, row) logit per lane. One tile per block.
// Either way the tile's base-2 logits go to shared memory; the block writes them and the tile's
// per-row (max, Σ n·2^(l - max)) to the workspace. Then the staged selection kernel, or the last
// block of the segment to arrive, combines the tiles, computes the scores and selects.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "gpu/device.h"
#include "gpu/device_cache.h"
#include "gpu/kernel_trace.cuh"
#include "gpu/lookup_select.cuh"
#include "gpu/mbarrier.cuh"
#include "gpu/paged_attention_common.cuh"

SQKV_TRACE_UNIT(lookup_small)

namespace sqkv::gpu::lookup_detail {
namespace {

using detail::QuadMax;
using Mma16 = detail::Half16<__half>;

constexpr int kWarps = kSmallThreads / 32;
constexpr int kWarpEntries = kSmallTile / kWarps;  // centroids per warp
constexpr int kLaneEntries = kSmallTile / 32;      // entries per lane in the tile statistics
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kLookupSmallRows <= 2 * kWarps, "stats: two rows per warp at most");
static_assert(kWarpEntries == 16, "tensor cores: a warp's centroids are one m16 tile");
static_assert(kLookupNarrowRows % 2 == 0 && kLookupNarrowRows <= 8,
              "tensor cores: the rows are n8 columns, two per lane");

// The sizes of the entries a lane takes in the tile statistics (base + lane + 32 j; 0 past the
// end).
__device__ __forceinline__ void LoadSizes(const EntrySet& e, int base, float (&n)[kLaneEntries]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < kLaneEntries; ++j) {
    const int i = base + lane + 32 * j;
    n[j] = i < e.total ? static_cast<float>(EntrySize(e, i)) : 0.f;
  }
}

// The tile's logits (lgs, written by the whole block before the call) to the workspace, with the
// tile's per-row statistics; n: LoadSizes of the tile. The caller separates two calls on the same
// lgs by a barrier. kSynced: the caller has synchronised the block since lgs was written.
template <int R, bool kSynced = false, class Segment>
__device__ __forceinline__ void TileStats(const Workspace& w, const Segment& s, const EntrySet& e,
                                          int tile, const float (&n)[kLaneEntries],
                                          const float (&lgs)[R][kSmallTile]) {
  if constexpr (!kSynced) __syncthreads();
  const int base = tile * kSmallTile;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Per row: logits to the workspace (lane + 32 j, coalesced) and the tile's (max, normaliser).
  const size_t ldw = static_cast<size_t>(LogitStride(s));
  float* lg = w.floats + s.logit_offset;
  float* ts = w.floats + s.tstat_offset;
  for (int r = warp; r < s.rows; r += kWarps) {
    float l[kLaneEntries];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < kLaneEntries; ++j) {
      const int i = base + lane + 32 * j;
      l[j] = lgs[r][lane + 32 * j];
      if (i < e.total) {
        m = fmaxf(m, l[j]);
        lg[r * ldw + i] = l[j];
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float z = 0.f;
#pragma unroll
    for (int j = 0; j < kLaneEntries; ++j) {
      // past-the-end slots may lie above the max
      if (n[j] > 0.f) z += n[j] * exp2f(l[j] - m);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
    if (lane == 0) {
      float* dst = ts + (static_cast<size_t>(r) * s.tiles + tile) * 2;
      dst[0] = m;
      dst[1] = z;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor cores. Lane = 4g + c; KS k-steps (4: head_dim <= 64, 8: <= 128), two per 16-byte chunk,
// so a lane reads KS / 2 chunks (c + 4 j) of each of its two centroid rows. In k-step 2j + t the
// quad's logical k = 2c + {0, 1} is component 8 (c + 4j) + 4t + {0, 1} and k = 2c + 8 + {0, 1} is
// component 8 (c + 4j) + 4t + {2, 3}: a function of k alone (as the product needs, A and B
// holding each k in different lanes), and each of the d components exactly once.

// The query side, built once per block. b[k]: the B fragment of k-step k, column g = query row g
// (zero past the segment's rows), components as above; f[h]: the logit factor of query row
// 2c + h, the accumulator columns of this lane (unused for c >= kLookupNarrowRows / 2).
template <int KS>
struct MmaQuery {
  uint32_t b[KS][2];
  float f[2];
};

// Components k..k+7 of the segment's query row r as floats (zero past its rows or head_dim).
template <class Segment>  // LookupSegment or SmallScoreDesc
__device__ __forceinline__ void LoadQuery8(const LookupArgs& a, const Segment& s, int r, int k,
                                           float (&x)[8]) {
  float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
  if (r < s.rows && k < a.head_dim) {
    const float4* p =
        reinterpret_cast<const float4*>(a.q + static_cast<size_t>(s.q_row + r) * a.head_dim + k);
    lo = __ldg(p);
    hi = __ldg(p + 1);
  }
  x[0] = lo.x, x[1] = lo.y, x[2] = lo.z, x[3] = lo.w;
  x[4] = hi.x, x[5] = hi.y, x[6] = hi.z, x[7] = hi.w;
}

template <int KS, class Segment>
__device__ __forceinline__ void LoadMmaQuery(const LookupArgs& a, const Segment& s,
                                             MmaQuery<KS>& mq) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int d = a.head_dim;
  float x[KS / 2][8];
  float m = 0.f;
#pragma unroll
  for (int j = 0; j < KS / 2; ++j) {
    LoadQuery8(a, s, g, 8 * (c + 4 * j), x[j]);
#pragma unroll
    for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(x[j][i]));
  }
  // The quad holds the whole row; scaled as the large path's rows (QRowExponent).
  const int e2 = QRowExponent(QuadMax(m));
#pragma unroll
  for (int j = 0; j < KS / 2; ++j) {
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const float* v = x[j] + 4 * t;
      mq.b[2 * j + t][0] = Mma16::Pack(ldexpf(v[0], e2), ldexpf(v[1], e2));
      mq.b[2 * j + t][1] = Mma16::Pack(ldexpf(v[2], e2), ldexpf(v[3], e2));
    }
  }
  // Row g's factor: undoes both power-of-two scales and turns q·c into a base-2 logit. Row r's
  // lives in lanes 4r .. 4r + 3.
  const float f = ldexpf(s.centroid_scale * (kLog2e / sqrtf(static_cast<float>(d))), -e2);
  mq.f[0] = __shfl_sync(0xffffffffu, f, 4 * (2 * c));
  mq.f[1] = __shfl_sync(0xffffffffu, f, 4 * (2 * c + 1));
}

// What a lane loads for one tile: LoadSizes, and chunks c + 4j of centroid rows g (v[0]) and
// g + 8 (v[1]) of its warp's 16 (zero past the entries and past head_dim).
template <int KS>
struct MmaLoads {
  float n[kLaneEntries];
  uint4 v[2][KS / 2];
};

template <int KS>
__device__ __forceinline__ void LoadMmaTile(const LookupArgs& a, const EntrySet& e, int base,
                                            MmaLoads<KS>& ld) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
  LoadSizes(e, base, ld.n);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = base + warp * kWarpEntries + g + 8 * h;
    const uint4* row = i < e.total ? static_cast<const uint4*>(EntryRow(e, i)) : nullptr;
#pragma unroll
    for (int j = 0; j < KS / 2; ++j) {
      const int ch = c + 4 * j;
      ld.v[h][j] =
          row != nullptr && 8 * ch < a.head_dim ? __ldg(row + ch) : make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// The warp's 16 logits of each query row into lgs.
template <int KS>
__device__ __forceinline__ void MmaLogits(const MmaQuery<KS>& mq, const MmaLoads<KS>& ld,
                                          float (&lgs)[kLookupNarrowRows][kSmallTile]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int j = 0; j < KS / 2; ++j) {
    const uint4 ra = ld.v[0][j], rb = ld.v[1][j];
    // (row g, k 2c..), (row g + 8, k 2c..), (row g, k 2c + 8..), (row g + 8, k 2c + 8..):
    // components 0-3 of the chunk, then 4-7.
    const uint32_t lo[4] = {ra.x, rb.x, ra.y, rb.y};
    const uint32_t hi[4] = {ra.z, rb.z, ra.w, rb.w};
    Mma16::Mma(acc, lo, mq.b[2 * j][0], mq.b[2 * j][1]);
    Mma16::Mma(acc, hi, mq.b[2 * j + 1][0], mq.b[2 * j + 1][1]);
  }
  // acc: centroids g (0, 1) and g + 8 (2, 3) against query rows 2c (0, 2) and 2c + 1 (1, 3).
  if (2 * c >= kLookupNarrowRows) return;  // the zero columns
  const int i = warp * kWarpEntries + g;
  lgs[2 * c][i] = acc[0] * mq.f[0];
  lgs[2 * c + 1][i] = acc[1] * mq.f[1];
  lgs[2 * c][i + 8] = acc[2] * mq.f[0];
  lgs[2 * c + 1][i + 8] = acc[3] * mq.f[1];
}

// Scores tiles blockIdx.x, + gridDim.x, ... of the segment, the next tile's loads in flight while
// the current one is computed (two blocks per SM fit the registers of both tiles' loads).
template <int KS>
struct MmaScorer {
  static constexpr bool kF16 = true;
  static constexpr int kRows = kLookupNarrowRows;
  static constexpr int kMinBlocks = 2;
  __device__ __forceinline__ static void Score(const LookupArgs& a, const Workspace& w,
                                               const LookupSegment& s, const EntrySet& e,
                                               float (&lgs)[kRows][kSmallTile]) {
    const int tiles = (e.total + kSmallTile - 1) / kSmallTile;
    int tile = blockIdx.x;
    if (tile >= tiles) return;
    // The two tiles' loads alternate between ld0 and ld1 (no copy from one to the other: a copy
    // would wait for the loads in flight before the next ones could be issued).
    MmaLoads<KS> ld0, ld1;
    // The first tile's loads go out before the query's, whose conversion then overlaps them.
    LoadMmaTile<KS>(a, e, tile * kSmallTile, ld0);
    MmaQuery<KS> mq;
    LoadMmaQuery<KS>(a, s, mq);
    // Scores `tile` from cur with the next tile's loads into nxt; false after the last tile.
    auto step = [&](const MmaLoads<KS>& cur, MmaLoads<KS>& nxt) {
      const int next = tile + static_cast<int>(gridDim.x);
      if (next < tiles) LoadMmaTile<KS>(a, e, next * kSmallTile, nxt);
      MmaLogits<KS>(mq, cur, lgs);
      if (tile == static_cast<int>(blockIdx.x)) SQKV_TRACE_WAIT(TraceKernel::kSmallFirstTile);
      TileStats<kRows>(w, s, e, tile, cur.n, lgs);
      if (next >= tiles) return false;
      __syncthreads();  // lgs is rewritten by the next tile
      tile = next;
      return true;
    };
    while (step(ld0, ld1) && step(ld1, ld0)) {
    }
  }
};

// The same products with the centroid rows brought in by the copy engine (sm_90): kStages tiles
// of a block are in flight as bulk copies into shared memory (one copy per tile when the entries
// are contiguous rows, else one per row), each completing on its own mbarrier, so no register
// holds a load in flight and the query's loads and conversion overlap the first tile's copy.
// A lane then reads its A fragments from shared memory with MmaScorer's layout. The next copy
// into a stage is issued once every warp's products have consumed what it read there. Measured on
// the H200: bench/NOTES-gpu-lookup.md (v19).
template <int KS>
struct BulkMmaScorer {
  static constexpr bool kF16 = true;
  static constexpr int kRows = kLookupNarrowRows;
  static constexpr int kMinBlocks = 2;
  // One tile in flight per block: measured against two on the H200 (same-call A/B, graph us, whole
  // path), 128K decode b1 42.6 -> 41.9 and b8 156.0 -> 154.3, 32K b8 57.3 -> 56.9, 32K b1 25.4 ->
  // 25.5. Likely why: a staged selection block (1,024 threads at 64 registers) needs an SM's whole
  // register file, so it starts (and loads its index data) only on an SM no scoring block holds;
  // with one stage the blocks that score a single tile leave theirs early. Two stages with three
  // blocks per SM also lost (bench/NOTES-gpu-lookup.md, v20).
  static constexpr int kStages = 1;
  // A stage holds a tile of rows of up to KS * 16 binary16 components (head_dim <= that).
  static constexpr int kStageBytes = kSmallTile * KS * 32;
  static constexpr int kDynamicBytes = kStages * kStageBytes;
  template <class Segment>  // LookupSegment or SmallScoreDesc
  __device__ __forceinline__ static void Score(const LookupArgs& a, const Workspace& w,
                                               const Segment& s, const EntrySet& e,
                                               float (&lgs)[kRows][kSmallTile]) {
    extern __shared__ __align__(detail::kSmemAlign) unsigned char stage_mem[];
    __shared__ __align__(8) uint64_t full[kStages];
    const int tiles = (e.total + kSmallTile - 1) / kSmallTile;
    int tile = blockIdx.x;
    if (tile >= tiles) return;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
    const int row_bytes = e.row_bytes;  // head_dim * 2, a multiple of 16
    const uint32_t bar0 = detail::SmemAddr(full);
    const uint32_t stage0 = detail::SmemAddr(stage_mem);
    const int step = static_cast<int>(gridDim.x);
    // Warp 0: tile t (if any) into stage st.
    auto issue = [&](int t, int st) {
      if (t >= tiles) return;
      const int first = t * kSmallTile;
      const int rows = min(kSmallTile, e.total - first);
      const uint32_t bar = bar0 + 8 * st;
      const uint32_t dst = stage0 + st * kStageBytes;
      if (lane == 0) detail::MbarArriveExpectTx(bar, static_cast<uint32_t>(rows * row_bytes));
      if (e.list == nullptr) {
        if (lane == 0) {
          detail::BulkCopyToShared(dst, e.prim + static_cast<size_t>(first) * row_bytes,
                                   static_cast<uint32_t>(rows * row_bytes), bar);
        }
      } else {
        __syncwarp();  // the bytes are announced before any lands
        for (int r = lane; r < rows; r += 32) {
          detail::BulkCopyToShared(dst + r * row_bytes, EntryRow(e, first + r),
                                   static_cast<uint32_t>(row_bytes), bar);
        }
      }
    };
    if (threadIdx.x == 0) {
      for (int st = 0; st < kStages; ++st) detail::MbarInit(bar0 + 8 * st, 1);
      detail::FenceMbarInit();
    }
    __syncthreads();
    if (warp == 0) {
      for (int k = 0; k < kStages; ++k) issue(tile + k * step, k);
      SQKV_TRACE_WAIT(TraceKernel::kSmallIssued);
    }
    MmaQuery<KS> mq;
    LoadMmaQuery<KS>(a, s, mq);
    float n_next[kLaneEntries];
    LoadSizes(e, tile * kSmallTile, n_next);
    for (int k = 0;; ++k) {
      const int st = k % kStages;
      const int next = tile + step;
      MmaLoads<KS> ld;
#pragma unroll
      for (int j = 0; j < kLaneEntries; ++j) ld.n[j] = n_next[j];
      if (next < tiles) LoadSizes(e, next * kSmallTile, n_next);
      detail::MbarWait(bar0 + 8 * st, static_cast<uint32_t>((k / kStages) & 1));
      const unsigned char* src = stage_mem + st * kStageBytes;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = warp * kWarpEntries + g + 8 * h;
        const bool row_in = tile * kSmallTile + r < e.total;
#pragma unroll
        for (int j = 0; j < KS / 2; ++j) {
          const int ch = c + 4 * j;
          ld.v[h][j] = row_in && 8 * ch < a.head_dim
                           ? *reinterpret_cast<const uint4*>(src + r * row_bytes + 16 * ch)
                           : make_uint4(0u, 0u, 0u, 0u);
        }
      }
      // The products consume the fragments, so once every warp is past them, every read of the
      // stage has returned: only then may the copy engine overwrite it (a barrier alone does not
      // wait for a shared-memory load still in flight, and the copy is not ordered behind it).
      MmaLogits<KS>(mq, ld, lgs);
      if (k == 0) SQKV_TRACE_WAIT(TraceKernel::kSmallFirstTile);
      __syncthreads();
      if (warp == 0) issue(tile + kStages * step, st);  // kStages tiles ahead
      TileStats<kRows, /*kSynced=*/true>(w, s, e, tile, ld.n, lgs);
      if (next >= tiles) return;
      __syncthreads();  // lgs is rewritten by the next tile
      tile = next;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// float32 FMA.

// 8 consecutive centroid components, as loaded and as floats.
template <typename C>
struct Components;
template <>
struct Components<float> {
  float4 a, b;
  __device__ __forceinline__ void Load(const void* row, int k) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(row) + k);
    a = __ldg(p);
    b = __ldg(p + 1);
  }
  __device__ __forceinline__ void Zero() { a = b = make_float4(0.f, 0.f, 0.f, 0.f); }
  __device__ __forceinline__ void ToFloat(float (&x)[8]) const {
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w;
    x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
  }
};
template <>
struct Components<uint16_t> {
  uint4 v;
  __device__ __forceinline__ void Load(const void* row, int k) {
    v = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(row) + k));
  }
  __device__ __forceinline__ void Zero() { v = make_uint4(0, 0, 0, 0); }
  __device__ __forceinline__ void ToFloat(float (&x)[8]) const {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
};

// Butterfly reduce-scatter over groups of 2H lanes: each of the N values is summed over the
// group; afterwards val[0] of lane l holds the sum of value (l % N) (N = 2H at the first call).
template <int H, int N>
__device__ __forceinline__ void ReduceScatter(float (&val)[N], int lane) {
  const bool upper = (lane & H) != 0;
#pragma unroll
  for (int i = 0; i < H; ++i) {
    const float send = upper ? val[i] : val[i + H];
    const float keep = upper ? val[i + H] : val[i];
    val[i] = keep + __shfl_xor_sync(0xffffffffu, send, H);
  }
  if constexpr (H > 1) ReduceScatter<H / 2, N>(val, lane);
}

// The layout of a tile's work over a block (R rows at most, lpc lanes per centroid): a warp load
// reads kPerLoad centroids (kLpc lanes each, 8 components a lane); kU loads are reduced together
// by one butterfly, which leaves one (centroid, row) logit per lane.
template <typename C, int R, int kLpc>
struct TileShape {
  static constexpr int kPerLoad = 32 / kLpc;              // centroids per warp load
  static constexpr int kLoads = kWarpEntries / kPerLoad;  // warp loads per tile
  static constexpr int kU = kLpc / R > 1 ? kLpc / R : 1;  // loads reduced together
  static_assert(kU * R == kLpc, "one value per lane after the butterfly");
  static constexpr int kGroups = kLoads / kU;
};

// What a lane loads for one tile: LoadSizes and its 8 components of each centroid it multiplies.
template <typename C, int R, int kLpc>
struct TileLoads {
  float n[kLaneEntries];
  Components<C> raw[TileShape<C, R, kLpc>::kLoads];
};

// The query rows of a segment, this lane's 8 components of each (zero past the rows).
template <int R, int kLpc>
__device__ __forceinline__ void LoadQuery(const LookupArgs& a, const LookupSegment& s,
                                          float (&q)[R][8]) {
  const int k = 8 * (threadIdx.x % 32 % kLpc);
#pragma unroll
  for (int r = 0; r < R; ++r) LoadQuery8(a, s, r, k, q[r]);
}

// Issues the loads of the tile at `base`.
template <typename C, int R, int kLpc>
__device__ __forceinline__ void LoadTile(const LookupArgs& a, const EntrySet& e, int base,
                                         TileLoads<C, R, kLpc>& ld) {
  using S = TileShape<C, R, kLpc>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int k = 8 * (lane % kLpc), gq = lane / kLpc;
  const bool k_in = k < a.head_dim;
  LoadSizes(e, base, ld.n);
#pragma unroll
  for (int p = 0; p < S::kLoads; ++p) {
    const int i = base + warp * kWarpEntries + p * S::kPerLoad + gq;
    if (k_in && i < e.total) {
      ld.raw[p].Load(EntryRow(e, i), k);
    } else {
      ld.raw[p].Zero();
    }
  }
}

// The logits of the tile from its loads into lgs.
template <typename C, int R, int kLpc>
__device__ __forceinline__ void FmaLogits(const LookupArgs& a, const LookupSegment& s,
                                          const float (&q)[R][8], const TileLoads<C, R, kLpc>& ld,
                                          float (&lgs)[R][kSmallTile]) {
  using S = TileShape<C, R, kLpc>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int sub = lane % kLpc, gq = lane / kLpc;
  const float scale = (std::is_same_v<C, uint16_t> ? s.centroid_scale : 1.f) * kLog2e *
                      rsqrtf(static_cast<float>(a.head_dim));
#pragma unroll
  for (int grp = 0; grp < S::kGroups; ++grp) {
    float val[kLpc];
#pragma unroll
    for (int u = 0; u < S::kU; ++u) {
      float c[8];
      ld.raw[grp * S::kU + u].ToFloat(c);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc = fmaf(q[r][j], c[j], acc);
        val[u * R + r] = acc;
      }
    }
    ReduceScatter<kLpc / 2, kLpc>(val, lane);
    const int u = sub / R, r = sub % R;
    lgs[r][warp * kWarpEntries + (grp * S::kU + u) * S::kPerLoad + gq] = val[0] * scale;
  }
}

// Scores tile blockIdx.x of the segment (gridDim.x covers the tiles).
template <typename C, int R, int kLpc>
struct FmaScorer {
  static constexpr bool kF16 = std::is_same_v<C, uint16_t>;
  static constexpr int kRows = R;
  // Resident blocks per SM the register budget aims at: two for four rows, one for sixteen.
  static constexpr int kMinBlocks = R > kLookupNarrowRows ? 1 : 2;
  __device__ __forceinline__ static void Score(const LookupArgs& a, const Workspace& w,
                                               const LookupSegment& s, const EntrySet& e,
                                               float (&lgs)[R][kSmallTile]) {
    const int tile = blockIdx.x;
    if (tile * kSmallTile >= e.total) return;
    float q[R][8];
    LoadQuery<R, kLpc>(a, s, q);
    TileLoads<C, R, kLpc> ld;
    LoadTile<C, R, kLpc>(a, e, tile * kSmallTile, ld);
    FmaLogits<C, R, kLpc>(a, s, q, ld, lgs);
    TileStats<R>(w, s, e, tile, ld.n, lgs);
  }
};

// ---------------------------------------------------------------------------------------------

// The last block: per-row max and 1/normaliser over the tiles, then the scores of the scored
// entries into the workspace (visible to the whole block on return).
__device__ __noinline__ void FinishScores(const LookupArgs& a, const Workspace& w, int seg,
                                          int level, bool f16) {
  __shared__ float row_max[kLookupSmallRows];
  __shared__ float row_inv_z[kLookupSmallRows];
  const LookupSegment& s = a.segments[seg];
  const EntrySet e = GetEntrySet(s, level, w.ints, a.head_dim, f16);
  const int tiles = (e.total + kSmallTile - 1) / kSmallTile;
  CombineTileStats(s, w.floats, tiles, kWarps, row_max, row_inv_z);
  __syncthreads();
  const size_t ld = static_cast<size_t>(LogitStride(s));
  const float* lg = w.floats + s.logit_offset;
  float* sc = w.floats + s.score_offset;
  const float inv_rows = 1.f / static_cast<float>(s.rows);
  for (int i = threadIdx.x; i < e.scored; i += kSmallThreads) {
    float sum = 0.f;
#pragma unroll 4
    for (int r = 0; r < s.rows; ++r) {
      sum = AddRowScore(sum, __ldcg(lg + r * ld + i), row_max[r], row_inv_z[r]);
    }
    sc[i] = sum * inv_rows;
  }
  __syncthreads();
}

// Sc: MmaScorer or FmaScorer, how the block scores its tiles of the segment.
template <class Sc>
__global__ void __launch_bounds__(kSmallThreads, Sc::kMinBlocks)
    SmallKernel(LookupArgs a, Workspace w, int level, bool finish) {
  __shared__ float lgs[Sc::kRows][kSmallTile];
  __shared__ int last;
  SQKV_TRACE_START(TraceKernel::kSmall);
  SQKV_TRACE_WAIT(TraceKernel::kSmallStarted);
  // The staged selection kernel that follows waits for this grid's completion before it reads
  // what this grid writes; letting it launch now lets its blocks stage index data as SMs free up.
  if (!finish) detail::GridDependencyTrigger();
  const int seg = SmallSegment(w, blockIdx.y);
  const LookupSegment& s = a.segments[seg];
  if (!AtLevel(s, level)) return;  // the whole grid row: its counter stays untouched
  const bool scoring = ScoredAtLevel(s, level);
  if (scoring) Sc::Score(a, w, s, GetEntrySet(s, level, w.ints, a.head_dim, Sc::kF16), lgs);
  SQKV_TRACE_END(TraceKernel::kSmall);
  if (!finish) return;  // the staged selection kernel finishes the segment
  if (!ArriveLast(w.counters + seg, gridDim.x, &last)) return;
  __shared__ ArgsBuffer args;
  args.Fill(a, w);
  if (scoring) FinishScores(args.args(), args.ws(), seg, level, Sc::kF16);
  if (a.score_only) return;
  SelectSegment<kSmallThreads>(args.args(), args.ws(), seg, level, Sc::kF16);
}

// The small list's descriptors in the launch parameters (4 KB with LookupArgs and Workspace).
inline constexpr int kParamSegments = 64;
struct SmallScoreDescs {
  SmallScoreDesc seg[kParamSegments];
};
static_assert(sizeof(LookupArgs) + sizeof(Workspace) + sizeof(SmallScoreDescs) <= 4096,
              "kernel parameters");

// Blocks of ParamScoreKernel an SM can hold (64 registers a thread; 34 KB of shared memory each).
inline constexpr int kParamBlocksPerSm = 3;
// Launches of at least this many segments put kParamBlocksPerSm blocks per SM in the grid, fewer
// segments two (see ParamBlocks).
inline constexpr int kParamManySegments = 16;

// The decode launch's scoring where the staged selection follows and the small list fits the
// parameters: BulkMmaScorer over the segment described in d (entry y of the small list), so
// nothing is read from memory before the first copies are issued.
template <int KS>
__global__ void __launch_bounds__(kSmallThreads, kParamBlocksPerSm)
    ParamScoreKernel(LookupArgs a, Workspace w, const __grid_constant__ SmallScoreDescs d) {
  __shared__ float lgs[kLookupNarrowRows][kSmallTile];
  SQKV_TRACE_START(TraceKernel::kSmall);
  SQKV_TRACE_WAIT(TraceKernel::kSmallStarted);
  detail::GridDependencyTrigger();  // see SmallKernel
  const SmallScoreDesc& s = d.seg[blockIdx.y];
  if (s.total > 0) {
    EntrySet e;
    e.prim = static_cast<const uint8_t*>(s.centroids);
    e.prim_size = s.cluster_size;
    e.row_bytes = a.head_dim * 2;
    e.scored = e.total = s.total;
    BulkMmaScorer<KS>::Score(a, w, s, e, lgs);
  }
  SQKV_TRACE_END(TraceKernel::kSmall);
}

// Blocks per segment of a persistent grid of about `per_sm` blocks per SM over the whole launch,
// at most one per tile. The register-loaded and bulk scorers take two.
int PersistentBlocks(const LookupLayout& l, int per_sm = 2) {
  const int sms = CurrentDeviceSmCount();
  if (sms == 0) return l.max_small_tiles;
  const int segs = static_cast<int>(l.small_list.size());
  return std::max(1, std::min(l.max_small_tiles, per_sm * sms / std::max(1, segs)));
}

// Blocks per segment of ParamScoreKernel's grid: the persistent grid's, with three blocks per SM
// from kParamManySegments segments on, else two. Measured on the H200
// (same-call A/B, graph us, whole path): 128K decode b8 155.8 -> 154.0 (in another call with three
// at every size, 155.7 -> 154.1), 32K b8 -0.1; at batch 1 three per SM made 128K 41.2 -> 41.8 (its
// selection blocks need an SM to themselves: with two, the blocks holding one tile empty theirs
// early), so it keeps two, and the 64-register bound left it unchanged (41.1 -> 41.1).
int ParamBlocks(const LookupLayout& l) {
  const bool many = l.small_list.size() >= static_cast<size_t>(kParamManySegments);
  return PersistentBlocks(l, many ? kParamBlocksPerSm : 2);
}

template <class Sc>
cudaError_t Launch(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                   bool finish, int blocks, cudaStream_t stream, size_t dynamic_bytes = 0) {
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(l.small_list.size()));
  SmallKernel<Sc><<<grid, kSmallThreads, dynamic_bytes, stream>>>(a, w, level, finish);
  return cudaGetLastError();
}

// Whether kKernel (a BulkMmaScorer kernel) runs on the current device: this binary's code for
// the device is for compute capability 9.0 or newer (so the device is too), and the kernel's
// dynamic shared memory limit is raised to kBytes. Decided once per device (outside any graph
// capture in practice: the first lookup of a process runs before captures).
template <auto kKernel, int kBytes>
bool BulkReady() {
  static detail::DeviceCache cache;
  return detail::PerDevice(cache, [](int) {
           cudaFuncAttributes attr;
           const bool ok =
               cudaFuncGetAttributes(&attr, kKernel) == cudaSuccess && attr.binaryVersion >= 90 &&
               cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes) ==
                   cudaSuccess;
           cudaGetLastError();  // a failed query leaves the register path, not an error
           return ok ? 1 : 0;
         }) == 1;
}

// The tensor-core scorer for head_dim <= KS * 16: the bulk copies where the device has them,
// with the segments in the launch parameters where the staged selection follows (single level)
// and they fit.
template <int KS>
cudaError_t LaunchMma(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                      bool finish, cudaStream_t stream) {
  constexpr int kBytes = BulkMmaScorer<KS>::kDynamicBytes;
  // PlanLookup makes the descriptors for single-level plans only (so level 2), one per small
  // segment.
  if (a.bulk_scoring && !finish && !l.small_descs.empty() &&
      l.small_descs.size() <= static_cast<size_t>(kParamSegments) &&
      BulkReady<ParamScoreKernel<KS>, kBytes>()) {
    SmallScoreDescs d;
    std::copy(l.small_descs.begin(), l.small_descs.end(), d.seg);
    const dim3 grid(static_cast<unsigned>(ParamBlocks(l)),
                    static_cast<unsigned>(l.small_list.size()));
    ParamScoreKernel<KS><<<grid, kSmallThreads, kBytes, stream>>>(a, w, d);
    return cudaGetLastError();
  }
  const int blocks = PersistentBlocks(l);
  if (a.bulk_scoring && BulkReady<SmallKernel<BulkMmaScorer<KS>>, kBytes>()) {
    return Launch<BulkMmaScorer<KS>>(a, l, w, level, finish, blocks, stream, kBytes);
  }
  return Launch<MmaScorer<KS>>(a, l, w, level, finish, blocks, stream);
}

template <typename C, int R>
cudaError_t LaunchR(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                    bool finish, cudaStream_t stream) {
  if (a.head_dim > 128) {
    return Launch<FmaScorer<C, R, 32>>(a, l, w, level, finish, l.max_small_tiles, stream);
  }
  if constexpr (std::is_same_v<C, uint16_t> && R <= kLookupNarrowRows) {
    if (a.head_dim <= 64) return LaunchMma<4>(a, l, w, level, finish, stream);
    return LaunchMma<8>(a, l, w, level, finish, stream);
  } else {
    return Launch<FmaScorer<C, R, 16>>(a, l, w, level, finish, l.max_small_tiles, stream);
  }
}

template <typename C>
cudaError_t LaunchC(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                    bool finish, cudaStream_t stream) {
  if (l.max_small_rows <= kLookupNarrowRows)
    return LaunchR<C, kLookupNarrowRows>(a, l, w, level, finish, stream);
  return LaunchR<C, kLookupSmallRows>(a, l, w, level, finish, stream);
}

}  // namespace

cudaError_t LaunchSmall(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                        cudaStream_t stream) {
  if (l.small_list.empty()) return cudaSuccess;
  const bool staged = level == 2 && UseStagedSelect(a, l, SegmentList::kSmall);
  const cudaError_t err = l.f16 ? LaunchC<uint16_t>(a, l, w, level, !staged, stream)
                                : LaunchC<float>(a, l, w, level, !staged, stream);
  if (err != cudaSuccess || !staged) return err;
  return LaunchStagedSelect(a, l, w, SegmentList::kSmall, stream);
}

}  // namespace sqkv::gpu::lookup_detail
