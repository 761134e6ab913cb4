// The fused lookup kernel of small (decode) segments and of unscored (fixed) segments; see
// gpu/lookup.h. One block = kSmallTile centroids of one segment, read once for all of the
// segment's rows: a half warp (or a warp, head_dim > 128) shares one centroid, each lane 8 of its
// components (one 16-byte load of binary16, two of float32) against the same components of every
// query row held in registers; the partial dot products are reduced by a butterfly that leaves
// one (centroid, row) logit per lane. The block writes its base-2 logits and per-row
// (max, Σ n·2^(l - max)) of its tile; the last block of the segment to arrive combines the tiles,
// computes the scores and selects.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

#include "gpu/lookup_select.cuh"

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

// Logits of the tile at `base` (R rows at most, lpc lanes per centroid) into lgs, then to the
// workspace with the tile's per-row statistics.
template <typename C, int R, int kLpc>
__device__ __forceinline__ void ScoreTile(const LookupArgs& a, const Workspace& w,
                                          const LookupSegment& s, const EntrySet& e, int base,
                                          float (&lgs)[R][kSmallTile]) {
  constexpr int kPerLoad = 32 / kLpc;              // centroids per warp load
  constexpr int kLoads = kWarpEntries / kPerLoad;  // warp loads per tile
  constexpr int kU = kLpc / R > 1 ? kLpc / R : 1;  // loads reduced together
  static_assert(kU * R == kLpc, "one value per lane after the butterfly");
  constexpr int kGroups = kLoads / kU;
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int sub = lane % kLpc, gq = lane / kLpc;
  const int d = a.head_dim;
  const int k = 8 * sub;
  const bool k_in = k < d;
  const int rows = s.rows;

  float q[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f), y = x;
    if (r < rows && k_in) {
      const float4* p =
          reinterpret_cast<const float4*>(a.q + static_cast<size_t>(s.q_row + r) * d + k);
      x = __ldg(p);
      y = __ldg(p + 1);
    }
    q[r][0] = x.x, q[r][1] = x.y, q[r][2] = x.z, q[r][3] = x.w;
    q[r][4] = y.x, q[r][5] = y.y, q[r][6] = y.z, q[r][7] = y.w;
  }
  const float scale = (std::is_same_v<C, uint16_t> ? s.centroid_scale : 1.f) * kLog2e *
                      rsqrtf(static_cast<float>(d));

  // Sizes of the entries this lane reduces in the statistics below (lane + 32 j), early.
  float n[kSmallTile / 32];
#pragma unroll
  for (int j = 0; j < kSmallTile / 32; ++j) {
    const int i = base + lane + 32 * j;
    n[j] = i < e.total ? static_cast<float>(EntrySize(e, i)) : 0.f;
  }
  Components<C> raw[kLoads];
#pragma unroll
  for (int p = 0; p < kLoads; ++p) {
    const int i = base + warp * kWarpEntries + p * kPerLoad + gq;
    if (k_in && i < e.total) {
      raw[p].Load(EntryRow(e, i), k);
    } else {
      raw[p].Zero();
    }
  }
#pragma unroll
  for (int grp = 0; grp < kGroups; ++grp) {
    float val[kLpc];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      float c[8];
      raw[grp * kU + u].ToFloat(c);
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
    lgs[r][warp * kWarpEntries + (grp * kU + u) * kPerLoad + gq] = val[0] * scale;
  }
  __syncthreads();

  // Per row: logits to the workspace (lane + 32 j, coalesced) and the tile's (max, normaliser).
  const size_t ld = static_cast<size_t>(s.entry_capacity);
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
        lg[r * ld + i] = l[j];
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float z = 0.f;
#pragma unroll
    for (int j = 0; j < kSmallTile / 32; ++j) {
      if (n[j] > 0.f) z += n[j] * exp2f(l[j] - m);  // past-the-end slots may lie above the max
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
    if (lane == 0) {
      float* dst = ts + (static_cast<size_t>(r) * s.tiles + blockIdx.x) * 2;
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
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int tiles = (e.total + kSmallTile - 1) / kSmallTile;
  const float* ts = w.floats + s.tstat_offset;
  for (int r = warp; r < s.rows; r += kWarps) {
    const float* row = ts + static_cast<size_t>(r) * s.tiles * 2;
    float m = -INFINITY;
    for (int c = lane; c < tiles; c += 32) m = fmaxf(m, __ldcg(row + 2 * c));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float z = 0.f;
    for (int c = lane; c < tiles; c += 32)
      z += __ldcg(row + 2 * c + 1) * exp2f(__ldcg(row + 2 * c) - m);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
    if (lane == 0) {
      row_max[r] = m;
      row_inv_z[r] = 1.f / z;  // z >= the size of the arg-max entry >= 1
    }
  }
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

// Resident blocks per SM the register budget aims at: three for the engine's case (16-bit, four
// rows: more loads in flight across block turnovers), two or one where q or float32 components
// need the registers.
template <typename C, int R>
constexpr int SmallMinBlocks() {
  return R > kSmallRowsNarrow ? 1 : std::is_same_v<C, uint16_t> ? 3 : 2;
}

template <typename C, int R, int kLpc>
__global__ void __launch_bounds__(kSmallThreads, (SmallMinBlocks<C, R>()))
    SmallKernel(LookupArgs a, Workspace w, int level, bool finish) {
  __shared__ float lgs[R][kSmallTile];
  __shared__ int last;
  constexpr bool kF16 = std::is_same_v<C, uint16_t>;
  const int seg = w.small_list[blockIdx.y];
  const LookupSegment& s = a.segments[seg];
  if (!AtLevel(s, level)) return;  // the whole grid row: its counter stays untouched
  const bool scoring = ScoredAtLevel(s, level);
  if (scoring) {
    const EntrySet e = GetEntrySet(s, level, w.ints, a.head_dim, kF16);
    const int base = blockIdx.x * kSmallTile;
    if (base < e.total) ScoreTile<C, R, kLpc>(a, w, s, e, base, lgs);
  }
  if (!finish) return;  // the staged selection kernel finishes the segment
  if (!ArriveLast(w.counters + seg, gridDim.x, &last)) return;
  __shared__ ArgsBuffer args;
  args.Fill(a, w);
  if (scoring) FinishScores(args.args(), args.ws(), seg, level, kF16);
  if (a.score_only) return;
  SelectSegment<kSmallThreads>(args.args(), args.ws(), seg, level, kF16);
}

template <typename C, int R>
cudaError_t LaunchR(const LookupArgs& a, const LookupLayout& l, const Workspace& w, int level,
                    bool finish, cudaStream_t stream) {
  const dim3 grid(l.max_small_tiles, static_cast<unsigned>(l.small_list.size()));
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
