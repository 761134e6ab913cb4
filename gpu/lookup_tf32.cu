// Large-path scoring passes on tensor cores in split precision ("3xTF32"): each float32 operand x
// is split into hi = tf32(x) and lo = tf32(x - hi), and a·b ≈ a_lo·b_hi + a_hi·b_lo + a_hi·b_hi
// with float32 accumulation (mma.sync m16n8k8), which keeps the logits at float32 accuracy (the
// dropped a_lo·b_lo term is ~2^-22 relative). Same tiles, workspace and outputs as TiledKernel in
// lookup_score.cu; see gpu/lookup.h.
#include <cuda_runtime.h>

#include <cmath>

#include "gpu/lookup_device.cuh"

namespace sqkv::gpu::lookup_detail {
namespace {

constexpr int kPad = 4;  // row stride kTileK + 4 floats: fragment loads hit 32 distinct banks
constexpr int kStride = kTileK + kPad;

__device__ inline uint32_t ToTf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ inline void Mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ inline float4 Load4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// Stores x split into hi and lo (tf32 bit patterns) at hi[i], lo[i].
__device__ inline void Split4(const float4 v, uint32_t* hi, uint32_t* lo) {
  const float x[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t h = ToTf32(x[j]);
    hi[j] = h;
    lo[j] = ToTf32(x[j] - __uint_as_float(h));
  }
}

// 8 warps: wm = warp / 4 takes rows wm*32 .. +32 (two m16 tiles), wn = warp % 4 takes entries
// wn*16 .. +16 (two n8 tiles). Fragment element (i, j, e): row wm*32 + i*16 + g + (e/2)*8,
// entry wn*16 + j*8 + 2*t + e%2, with g = lane / 4, t = lane % 4.
template <bool kStats>
__global__ void __launch_bounds__(kTileThreads)
    TiledTf32Kernel(const LookupSegment* segs, const int32_t* list, const float* q, float* floats,
                    const int32_t* ints, int d, float scale, int level) {
  const LookupSegment& s = segs[list[blockIdx.z]];
  if (!ScoredAtLevel(s, level)) return;
  const EntrySet e = GetEntrySet(s, level, ints);
  const int col0 = blockIdx.x * kTileCols;
  const int row0 = blockIdx.y * kTileRows;
  const int limit = kStats ? e.total : e.scored;
  if (col0 >= limit || row0 >= s.rows) return;

  __shared__ __align__(16) uint32_t a_hi[kTileRows][kStride], a_lo[kTileRows][kStride];
  __shared__ __align__(16) uint32_t b_hi[kTileCols][kStride], b_lo[kTileCols][kStride];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int wm = warp / 4, wn = warp % 4;
  const int g = lane / 4, tq = lane % 4;
  const int lr = t / 4, lc = (t % 4) * 4;  // staging: row / entry lr, dims lc .. lc+3
  const float* qrow =
      row0 + lr < s.rows ? q + static_cast<size_t>(s.q_row + row0 + lr) * d + lc : nullptr;
  const float* crow = col0 + lr < e.total ? EntryCentroid(e, col0 + lr, d) + lc : nullptr;

  float acc[2][2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

  for (int k0 = 0; k0 < d; k0 += kTileK) {
    const float4 av = qrow != nullptr ? Load4(qrow + k0) : make_float4(0.f, 0.f, 0.f, 0.f);
    const float4 bv = crow != nullptr ? Load4(crow + k0) : make_float4(0.f, 0.f, 0.f, 0.f);
    Split4(av, &a_hi[lr][lc], &a_lo[lr][lc]);
    Split4(bv, &b_hi[lr][lc], &b_lo[lr][lc]);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 8) {
      uint32_t ah[2][4], al[2][4], bh[2][2], bl[2][2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = wm * 32 + i * 16 + g;
        ah[i][0] = a_hi[r][kk + tq];
        ah[i][1] = a_hi[r + 8][kk + tq];
        ah[i][2] = a_hi[r][kk + tq + 4];
        ah[i][3] = a_hi[r + 8][kk + tq + 4];
        al[i][0] = a_lo[r][kk + tq];
        al[i][1] = a_lo[r + 8][kk + tq];
        al[i][2] = a_lo[r][kk + tq + 4];
        al[i][3] = a_lo[r + 8][kk + tq + 4];
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int c = wn * 16 + j * 8 + g;
        bh[j][0] = b_hi[c][kk + tq];
        bh[j][1] = b_hi[c][kk + tq + 4];
        bl[j][0] = b_lo[c][kk + tq];
        bl[j][1] = b_lo[c][kk + tq + 4];
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          Mma(acc[i][j], al[i], bh[j]);  // small terms first
          Mma(acc[i][j], ah[i], bl[j]);
          Mma(acc[i][j], ah[i], bh[j]);
        }
      }
    }
    __syncthreads();
  }

  // This thread's entries: (j, e%2) -> wn*16 + j*8 + 2*tq + e%2.
  bool col_ok[2][2];
  float col_n[2][2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = col0 + wn * 16 + j * 8 + 2 * tq + h;
      col_ok[j][h] = c < limit;
      col_n[j][h] = col_ok[j][h] ? static_cast<float>(EntrySize(e, c)) : 0.f;
    }
  }

  if constexpr (kStats) {
    // Per row: this warp's 16 entries -> (max, Σ n e^(l-max)), then the 4 column warps combined.
    __shared__ float red_m[kTileRows][4], red_z[kTileRows][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // rows g and g + 8
        float l[2][2];
        float m = -INFINITY;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            l[j][h] = acc[i][j][half * 2 + h] * scale;
            if (col_ok[j][h]) m = fmaxf(m, l[j][h]);
          }
        }
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        float z = 0.f;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (col_ok[j][h]) z += col_n[j][h] * expf(l[j][h] - m);
          }
        }
        z += __shfl_xor_sync(0xffffffffu, z, 1);
        z += __shfl_xor_sync(0xffffffffu, z, 2);
        if (tq == 0) {
          const int r = wm * 32 + i * 16 + half * 8 + g;
          red_m[r][wn] = m;  // -inf when none of this warp's entries is valid
          red_z[r][wn] = z;
        }
      }
    }
    __syncthreads();
    if (t < kTileRows && row0 + t < s.rows) {
      float m = -INFINITY;
#pragma unroll
      for (int w = 0; w < 4; ++w) m = fmaxf(m, red_m[t][w]);
      float z = 0.f;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        if (red_m[t][w] != -INFINITY) z += red_z[t][w] * expf(red_m[t][w] - m);
      }
      float* dst =
          floats + s.stat_offset + (static_cast<size_t>(row0 + t) * s.ctiles + blockIdx.x) * 2;
      dst[0] = m;
      dst[1] = z;
    }
  } else {
    const float* rowstat = floats + s.rowstat_offset;
    float col[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row0 + wm * 32 + i * 16 + half * 8 + g;
        if (row >= s.rows) continue;
        const float m = rowstat[2 * row], inv_z = rowstat[2 * row + 1];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int h = 0; h < 2; ++h)
            col[j][h] += expf(acc[i][j][half * 2 + h] * scale - m) * inv_z;
        }
      }
    }
    // Sum over g (lanes 4 apart), then over the two row warps.
    __shared__ float red[2][kTileCols];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v = col[j][h];
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        if (g == 0) red[wm][wn * 16 + j * 8 + 2 * tq + h] = v;
      }
    }
    __syncthreads();
    if (t < kTileCols && col0 + t < e.scored) {
      floats[s.part_offset + static_cast<int64_t>(blockIdx.y) * s.entry_capacity + col0 + t] =
          red[0][t] + red[1][t];
    }
  }
}

}  // namespace

cudaError_t LaunchTiledTf32(const LookupArgs& a, const LookupLayout& l, const Workspace& w,
                            int level, bool stats, float scale, cudaStream_t stream) {
  const dim3 tiles(l.max_large_ctiles, l.max_large_rtiles, static_cast<int>(l.large_list.size()));
  if (stats) {
    TiledTf32Kernel<true><<<tiles, kTileThreads, 0, stream>>>(
        a.segments, w.large_list, a.q, w.floats, w.ints, a.head_dim, scale, level);
  } else {
    TiledTf32Kernel<false><<<tiles, kTileThreads, 0, stream>>>(
        a.segments, w.large_list, a.q, w.floats, w.ints, a.head_dim, scale, level);
  }
  return cudaGetLastError();
}

}  // namespace sqkv::gpu::lookup_detail
