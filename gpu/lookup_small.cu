// The fused lookup kernel of small (decode) segments and of unscored (fixed) segments; see
// gpu/lookup.h. A tile = kSmallTile centroids of one segment, read once for all of the segment's
// rows: a half warp (or a warp, head_dim > 128) shares one centroid, each lane 8 of its
// components (one 16-byte load of binary16, two of float32) against the same components of every
// query row held in registers; the partial dot products are reduced by a butterfly that leaves
// one (centroid, row) logit per lane. A block writes the base-2 logits and per-row
// (max, Σ n·2^(l - max)) of its tiles: one tile per block, or (the engine's variant) a persistent
// grid of about two blocks per SM, each scoring every gridDim.x-th tile of its segment with the
// next tile's loads in flight. Then the staged selection kernel, or the last block of the segment
// to arrive, combines the tiles, computes the scores and selects.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "gpu/lookup_select.cuh"
#include "gpu/paged_attention_common.cuh"

namespace sqkv::gpu::lookup_detail {
namespace {

constexpr int kWarps = kSmallThreads / 32;
constexpr int kWarpEntries = kSmallTile / kWarps;  // centroids per warp
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kLookupSmallRows <= 2 * kWarps, "stats: two rows per warp at most");

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

// What a lane loads for one tile: the sizes of the entries it reduces in the statistics (lane +
// 32 j) and its 8 components of each centroid it multiplies.
template <typename C, int R, int kLpc>
struct TileLoads {
  float n[kSmallTile / 32];
  Components<C> raw[TileShape<C, R, kLpc>::kLoads];
};

// The query rows of a segment, this lane's 8 components of each (zero past the rows).
template <int R, int kLpc>
__device__ __forceinline__ void LoadQuery(const LookupArgs& a, const LookupSegment& s,
                                          float (&q)[R][8]) {
  const int lane = threadIdx.x % 32;
  const int d = a.head_dim;
  const int k = 8 * (lane % kLpc);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f), y = x;
    if (r < s.rows && k < d) {
      const float4* p =
          reinterpret_cast<const float4*>(a.q + static_cast<size_t>(s.q_row + r) * d + k);
      x = __ldg(p);
      y = __ldg(p + 1);
    }
    q[r][0] = x.x, q[r][1] = x.y, q[r][2] = x.z, q[r][3] = x.w;
    q[r][4] = y.x, q[r][5] = y.y, q[r][6] = y.z, q[r][7] = y.w;
  }
}

// Issues the loads of the tile at `base`.
template <typename C, int R, int kLpc>
__device__ __forceinline__ void LoadTile(const LookupArgs& a, const EntrySet& e, int base,
                                         TileLoads<C, R, kLpc>& ld) {
  using S = TileShape<C, R, kLpc>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int k = 8 * (lane % kLpc), gq = lane / kLpc;
  const bool k_in = k < a.head_dim;
#pragma unroll
  for (int j = 0; j < kSmallTile / 32; ++j) {
    const int i = base + lane + 32 * j;
    ld.n[j] = i < e.total ? static_cast<float>(EntrySize(e, i)) : 0.f;
  }
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

// Logits of tile `tile` (entries from base = tile · kSmallTile) from its loads into lgs, then to
// the workspace with the tile's per-row statistics. The caller separates two calls on the same lgs
// by a barrier.
template <typename C, int R, int kLpc>
__device__ __forceinline__ void ScoreTile(const LookupArgs& a, const Workspace& w,
                                          const LookupSegment& s, const EntrySet& e, int tile,
                                          const float (&q)[R][8],
                                          const TileLoads<C, R, kLpc>& ld,
                                          float (&lgs)[R][kSmallTile]) {
  using S = TileShape<C, R, kLpc>;
  const int base = tile * kSmallTile;
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int sub = lane % kLpc, gq = lane / kLpc;
  const int rows = s.rows;
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
  __syncthreads();

  // Per row: logits to the workspace (lane + 32 j, coalesced) and the tile's (max, normaliser).
  const size_t ldw = static_cast<size_t>(s.entry_capacity);
  float* lg = w.floats + s.logit_offset;
  float* ts = w.floats + s.tstat_offset;
  for (int r = warp; r < rows; r += kWarps) {
    float l[kSmallTile / 32];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < kSmallTile / 32; ++j) {
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
    for (int j = 0; j < kSmallTile / 32; ++j) {
      // past-the-end slots may lie above the max
      if (ld.n[j] > 0.f) z += ld.n[j] * exp2f(l[j] - m);
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
  const size_t ld = static_cast<size_t>(s.entry_capacity);
  const float* lg = w.floats + s.logit_offset;
  float* sc = w.floats + s.score_offset;
  const float inv_rows = 1.f / static_cast<float>(s.rows);
  for (int i = threadIdx.x; i < e.scored; i += kSmallThreads) {
    float sum = 0.f;
#pragma unroll 4
    for (int r = 0; r < s.rows; ++r) {
      // The staged selection (lookup_staged.cu) rounds the same way: explicit fma.
      sum = __fmaf_rn(exp2f(__ldcg(lg + r * ld + i) - row_max[r]), row_inv_z[r], sum);
    }
    sc[i] = sum * inv_rows;
  }
  __syncthreads();
}

// The engine's case (16-bit centroids, four rows, head_dim <= 128) runs a persistent grid: each block scores tiles
// blockIdx.x, + gridDim.x, ... of its segment with the next tile's loads in flight while it
// computes the current one (two blocks per SM fit the registers of both tiles' loads). Other
// variants run one tile per block.
template <typename C, int R, int kLpc>
constexpr bool SmallPrefetch() {
  return std::is_same_v<C, uint16_t> && R <= kSmallRowsNarrow && kLpc == 16;
}

// Resident blocks per SM the register budget aims at: two for four rows (the prefetching variant
// holds two tiles' loads; float32 components need the registers), one for sixteen.
template <typename C, int R>
constexpr int SmallMinBlocks() {
  return R > kSmallRowsNarrow ? 1 : 2;
}

template <typename C, int R, int kLpc>
__global__ void __launch_bounds__(kSmallThreads, (SmallMinBlocks<C, R>()))
    SmallKernel(LookupArgs a, Workspace w, int level, bool finish) {
  __shared__ float lgs[R][kSmallTile];
  __shared__ int last;
  constexpr bool kF16 = std::is_same_v<C, uint16_t>;
  // The staged selection kernel that follows waits for this grid's completion before it reads
  // what this grid writes; letting it launch now lets its blocks stage index data as SMs free up.
  if (!finish) detail::GridDependencyTrigger();
  const int seg = w.small_list[blockIdx.y];
  const LookupSegment& s = a.segments[seg];
  if (!AtLevel(s, level)) return;  // the whole grid row: its counter stays untouched
  const bool scoring = ScoredAtLevel(s, level);
  if (scoring) {
    const EntrySet e = GetEntrySet(s, level, w.ints, a.head_dim, kF16);
    const int tiles = (e.total + kSmallTile - 1) / kSmallTile;
    int tile = blockIdx.x;
    if (tile < tiles) {
      float q[R][8];
      LoadQuery<R, kLpc>(a, s, q);
      TileLoads<C, R, kLpc> cur;
      LoadTile<C, R, kLpc>(a, e, tile * kSmallTile, cur);
      if constexpr (SmallPrefetch<C, R, kLpc>()) {
        for (;;) {
          const int next = tile + static_cast<int>(gridDim.x);
          TileLoads<C, R, kLpc> nxt;
          if (next < tiles) LoadTile<C, R, kLpc>(a, e, next * kSmallTile, nxt);
          ScoreTile<C, R, kLpc>(a, w, s, e, tile, q, cur, lgs);
          if (next >= tiles) break;
          __syncthreads();  // lgs is rewritten by the next tile
          cur = nxt;
          tile = next;
        }
      } else {
        ScoreTile<C, R, kLpc>(a, w, s, e, tile, q, cur, lgs);  // gridDim.x covers the tiles
      }
    }
  }
  if (!finish) return;  // the staged selection kernel finishes the segment
  if (!ArriveLast(w.counters + seg, gridDim.x, &last)) return;
  __shared__ ArgsBuffer args;
  args.Fill(a, w);
  if (scoring) FinishScores(args.args(), args.ws(), seg, level, kF16);
  if (a.score_only) return;
  SelectSegment<kSmallThreads>(args.args(), args.ws(), seg, level, kF16);
}

// Blocks per segment of the persistent grid: about two per SM over the whole launch, at most one
// per tile.
int PersistentBlocks(const LookupLayout& l) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return l.max_small_tiles;
  }
  const int segs = static_cast<int>(l.small_list.size());
  return std::max(1, std::min(l.max_small_tiles, 2 * sms / std::max(1, segs)));
}

template <typename C, int R>
cudaError_t LaunchR(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                    bool finish, cudaStream_t stream) {
  const bool persistent = a.head_dim <= 128 && SmallPrefetch<C, R, 16>();
  const int bx = persistent ? PersistentBlocks(l) : l.max_small_tiles;
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(l.small_list.size()));
  if (a.head_dim <= 128) {
    SmallKernel<C, R, 16><<<grid, kSmallThreads, 0, stream>>>(a, w, level, finish);
  } else {
    SmallKernel<C, R, 32><<<grid, kSmallThreads, 0, stream>>>(a, w, level, finish);
  }
  return cudaGetLastError();
}

template <typename C>
cudaError_t LaunchC(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                    bool finish, cudaStream_t stream) {
  if (l.max_small_rows <= kSmallRowsNarrow)
    return LaunchR<C, kSmallRowsNarrow>(a, l, w, level, finish, stream);
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
