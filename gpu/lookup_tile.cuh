// The scoring tile of the small (decode) lookup kernels, shared by the two-kernel path
// (lookup_small.cu) and the cluster path (lookup_cluster.cu): kSmallTile centroids of one segment
// read once for all of the segment's rows. A half warp (or a warp, head_dim > 128) shares one
// centroid, each lane 8 of its components (one 16-byte load of binary16, two of float32) against
// the same components of every query row held in registers; the partial dot products are reduced
// by a butterfly that leaves one (centroid, row) logit per lane. Device code, internal.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

#include "gpu/lookup_device.cuh"

namespace sqkv::gpu::lookup_detail {

inline constexpr int kSmallWarps = kSmallThreads / 32;
inline constexpr int kSmallWarpEntries = kSmallTile / kSmallWarps;  // centroids per warp
inline constexpr float kLog2e = 1.4426950408889634f;

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
  __device__ __forceinline__ void LoadStaged(const void* row, int k) {  // shared memory
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(row) + k);
    a = p[0];
    b = p[1];
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
  __device__ __forceinline__ void LoadStaged(const void* row, int k) {  // shared memory
    v = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(row) + k);
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
//   lg: where the logit of (row 0, entry `base`) goes; row r at lg + r * ld (global or shared)
//   ts: where the (max, normaliser) pair of row 0 goes; row r at ts + r * ts_ld
//   staged: null, or the tile's centroid rows already copied to shared memory (entry i at
//     staged + (i - base) * e.row_bytes; a flat entry set)
// The caller separates two calls on the same lgs by a barrier.
template <typename C, int R, int kLpc>
__device__ __forceinline__ void ScoreTile(const LookupArgs& a, const LookupSegment& s,
                                          const EntrySet& e, int base,
                                          float (&lgs)[R][kSmallTile], float* lg, size_t ld,
                                          float* ts, size_t ts_ld,
                                          const uint8_t* staged = nullptr) {
  constexpr int kPerLoad = 32 / kLpc;              // centroids per warp load
  constexpr int kLoads = kSmallWarpEntries / kPerLoad;  // warp loads per tile
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
    const int i = base + warp * kSmallWarpEntries + p * kPerLoad + gq;
    if (k_in && i < e.total) {
      if (staged != nullptr) {
        raw[p].LoadStaged(staged + static_cast<size_t>(i - base) * e.row_bytes, k);
      } else {
        raw[p].Load(EntryRow(e, i), k);
      }
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
    lgs[r][warp * kSmallWarpEntries + (grp * kU + u) * kPerLoad + gq] = val[0] * scale;
  }
  __syncthreads();

  // Per row: logits out (lane + 32 j, coalesced) and the tile's (max, normaliser).
  for (int r = warp; r < rows; r += kSmallWarps) {
    float l[kSmallTile / 32];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < kSmallTile / 32; ++j) {
      const int i = base + lane + 32 * j;
      l[j] = lgs[r][lane + 32 * j];
      if (i < e.total) {
        m = fmaxf(m, l[j]);
        lg[r * ld + lane + 32 * j] = l[j];
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
      float* dst = ts + r * ts_ld;
      dst[0] = m;
      dst[1] = z;
    }
  }
}

}  // namespace sqkv::gpu::lookup_detail
