// Kernels of the GPU K-means (see gpu/kmeans_internal.cuh for each one's contract). Every
// reduction has a fixed order, so results do not depend on scheduling.
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>

#include "gpu/kmeans_internal.cuh"

namespace sqkv::gpu::kmeans_detail {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kRowThreads = 256;       // normalise and arg-max: one warp per row
constexpr int kUpdateThreads = 256;    // seed update: kSeedChunk / kUpdateThreads rows each
constexpr int kCentroidThreads = 128;  // one block per cluster, one thread per dimension
constexpr int kCentroidUnroll = 8;     // member rows loaded ahead (independent loads in flight)
constexpr int kSimpleThreads = 256;

// Butterfly sums: every lane ends with the same bits (IEEE addition commutes).
__device__ inline double WarpSum(double v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ inline float WarpSum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// (value, index) maximum, ties to the smaller index.
__device__ inline bool Better(float v, int i, float best, int best_i) {
  return v > best || (v == best && i < best_i);
}
__device__ inline void WarpArgmax(float* best, int* idx) {
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const float v = __shfl_xor_sync(kFullMask, *best, o);
    const int i = __shfl_xor_sync(kFullMask, *idx, o);
    if (Better(v, i, *best, *idx)) {
      *best = v;
      *idx = i;
    }
  }
}

// floor(u * n) for u in [0, 1), kept in [0, n).
__device__ inline int RowOf(double u, int n) { return min(n - 1, static_cast<int>(u * n)); }

// Sums blockDim.x (a power of two) doubles held one per thread in part[], fixed tree order.
// Returns the sum to every thread.
__device__ double BlockSum(double v, double* part) {
  const int t = threadIdx.x;
  part[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (t < s) part[t] += part[t + s];
    __syncthreads();
  }
  const double total = part[0];
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(kRowThreads)
    NormaliseKernel(float* x, float* norm2, int n, int d) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= n) return;  // uniform per warp
  float* r = x + row * d;
  double ss = 0;
  for (int c = lane; c < d; c += kWarp) ss += static_cast<double>(r[c]) * r[c];
  ss = WarpSum(ss);
  const double inv = ss > 0 ? 1.0 / sqrt(ss) : 0.0;
  float q = 0.f;
  for (int c = lane; c < d; c += kWarp) {
    const float v = static_cast<float>(r[c] * inv);
    r[c] = v;
    q += v * v;
  }
  q = WarpSum(q);
  if (lane == 0) norm2[row] = q;
}

__global__ void __launch_bounds__(kUpdateThreads)
    SeedUpdateKernel(const float* s, int count, const int32_t* picks, const float* norm2,
                     float* d2, double* chunk_sum, int row0, int rows, bool init) {
  __shared__ double part[kUpdateThreads];
  const int base = blockIdx.x * kSeedChunk;  // relative to row0
  double local = 0;
  for (int q = 0; q < kSeedChunk / kUpdateThreads; ++q) {
    const int r = base + q * kUpdateThreads + threadIdx.x;
    if (r >= rows) break;
    const int i = row0 + r;
    const float ui = norm2[i];
    float m = init ? FLT_MAX : d2[i];
    const float* sr = s + static_cast<int64_t>(r) * count;
    for (int b = 0; b < count; ++b) {
      const int p = picks[b];
      // |u - c|² = |u|² + |c|² - 2 u·c, kept from going negative; a pick is at distance 0.
      const float v = p == i ? 0.f : fmaxf(0.f, ui + norm2[p] - 2.f * sr[b]);
      m = fminf(m, v);
    }
    d2[i] = m;
    local += m;
  }
  const double sum = BlockSum(local, part);
  if (threadIdx.x == 0) chunk_sum[row0 / kSeedChunk + blockIdx.x] = sum;
}

// Warp-collective: the first row whose running d2 sum (rows in order) exceeds r; every lane
// returns it. prefix: (nchunks) inclusive sums of the chunks. Rounding between the chunk sums
// and this running sum can leave r past the chunk's end: then its last row with d2 > 0.
__device__ int FindRow(const float* d2, const double* prefix, int nchunks, int n, double r) {
  const int lane = threadIdx.x % kWarp;
  int lo = 0, hi = nchunks - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (prefix[mid] > r) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  double run = lo > 0 ? prefix[lo - 1] : 0.0;
  const int begin = lo * kSeedChunk;
  const int end = min(n, begin + kSeedChunk);
  int last_positive = -1;
  for (int r0 = begin; r0 < end; r0 += kWarp) {
    const int i = r0 + lane;
    const double v = i < end ? d2[i] : 0.0;
    double incl = v;
    for (int o = 1; o < kWarp; o *= 2) {
      const double y = __shfl_up_sync(kFullMask, incl, o);
      if (lane >= o) incl += y;
    }
    const unsigned hit = __ballot_sync(kFullMask, v > 0 && run + incl > r);
    if (hit != 0) return r0 + __ffs(hit) - 1;
    const unsigned positive = __ballot_sync(kFullMask, v > 0);
    if (positive != 0) last_positive = r0 + kWarp - 1 - __clz(positive);
    run += __shfl_sync(kFullMask, incl, kWarp - 1);
  }
  return last_positive >= 0 ? last_positive : end - 1;
}

// d2 and picks are read after other threads of the block wrote them (ordered by barriers), so
// they are plain pointers: no read-only cache path.
__global__ void __launch_bounds__(kPickThreads)
    SeedPickKernel(float* d2, const double* chunk_sum, double* chunk_prefix, int n,
                   const double* uniform, int count, bool first, const float* unit, int d,
                   int32_t* picks, float* centroids) {
  __shared__ double s_total;
  __shared__ float s_best[kPickThreads / kWarp];
  __shared__ int s_idx[kPickThreads / kWarp];
  const int t = threadIdx.x, lane = t % kWarp, warp = t / kWarp;
  if (first) {
    if (t == 0) picks[0] = RowOf(uniform[0], n);
  } else {
    const int nchunks = (n + kSeedChunk - 1) / kSeedChunk;
    if (t == 0) {
      double acc = 0;
      for (int c = 0; c < nchunks; ++c) {
        acc += chunk_sum[c];
        chunk_prefix[c] = acc;
      }
      s_total = acc;
    }
    __syncthreads();
    const double total = s_total;
    // Systematic sampling: targets (u + b) / count of the way through the D² mass.
    for (int b = warp; b < count; b += kPickThreads / kWarp) {
      const int pick = total > 0 ? FindRow(d2, chunk_prefix, nchunks, n,
                                           (uniform[0] + b) / count * total)
                                 : RowOf(uniform[1 + b], n);
      if (lane == 0) picks[b] = pick;
    }
    __syncthreads();
    // In pick order: a row picked twice is replaced by the row of largest d2 left (smallest
    // index on ties); each kept pick's d2 becomes 0, so it cannot be chosen again.
    for (int b = 0; b < count; ++b) {
      const int pb = picks[b];
      bool dup = false;
      for (int j = t; j < b; j += kPickThreads) dup |= picks[j] == pb;
      if (__syncthreads_or(dup)) {
        float best = -1.f;
        int idx = INT_MAX;
        for (int i = t; i < n; i += kPickThreads) {
          const float v = d2[i];
          if (v > best) {
            best = v;
            idx = i;
          }
        }
        WarpArgmax(&best, &idx);
        if (lane == 0) {
          s_best[warp] = best;
          s_idx[warp] = idx;
        }
        __syncthreads();
        if (warp == 0) {
          best = s_best[lane];
          idx = s_idx[lane];
          WarpArgmax(&best, &idx);
          // Every row at a centroid: any row will do, as on the CPU.
          if (lane == 0) picks[b] = best > 0.f ? idx : RowOf(uniform[1 + b], n);
        }
      }
      __syncthreads();
      if (t == 0) d2[picks[b]] = 0.f;
      __syncthreads();
    }
  }
  __syncthreads();
  const int64_t total_elems = static_cast<int64_t>(count) * d;
  for (int64_t e = t; e < total_elems; e += kPickThreads) {
    const int64_t b = e / d, c = e % d;
    centroids[e] = unit[static_cast<int64_t>(picks[b]) * d + c];
  }
}

__global__ void __launch_bounds__(kRowThreads)
    ArgmaxKernel(const float* s, int rows, int k, int lds, int32_t* labels) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // uniform per warp
  const float4* r = reinterpret_cast<const float4*>(s + row * lds);
  float best = -FLT_MAX;
  int idx = INT_MAX;
  // Within a lane j ascends, so a strict > keeps the smallest j of equal values.
  for (int q = lane; q < lds / 4; q += kWarp) {
    const float4 v = __ldcs(r + q);  // read once: stream through the cache
    const int j = 4 * q;
    if (j < k && v.x > best) best = v.x, idx = j;
    if (j + 1 < k && v.y > best) best = v.y, idx = j + 1;
    if (j + 2 < k && v.z > best) best = v.z, idx = j + 2;
    if (j + 3 < k && v.w > best) best = v.w, idx = j + 3;
  }
  WarpArgmax(&best, &idx);
  if (lane == 0) labels[row] = idx == INT_MAX ? 0 : idx;  // a row of NaN only (never expected)
}

__global__ void IotaKernel(int32_t* idx, int n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) idx[i] = static_cast<int32_t>(i);
}

__global__ void ClusterRangesKernel(const int32_t* sorted, int n, int32_t* begin, int32_t* end) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int32_t l = sorted[i];
  if (i == 0 || sorted[i - 1] != l) begin[l] = static_cast<int32_t>(i);
  if (i == n - 1 || sorted[i + 1] != l) end[l] = static_cast<int32_t>(i + 1);
}

__global__ void __launch_bounds__(kCentroidThreads)
    CentroidKernel(const float* unit, const int32_t* order, const int32_t* begin,
                   const int32_t* end, int d, float* centroids) {
  extern __shared__ float sums[];  // (d)
  __shared__ double part[kCentroidThreads];
  const int j = blockIdx.x;
  const int b = begin[j], e = end[j];
  if (b >= e) return;  // empty: keeps its centroid (uniform per block)
  double q = 0;
  for (int c = threadIdx.x; c < d; c += kCentroidThreads) {
    float acc = 0.f;
    int m = b;
    for (; m + kCentroidUnroll <= e; m += kCentroidUnroll) {
      float v[kCentroidUnroll];
#pragma unroll
      for (int u = 0; u < kCentroidUnroll; ++u) {
        v[u] = unit[static_cast<int64_t>(order[m + u]) * d + c];
      }
#pragma unroll
      for (int u = 0; u < kCentroidUnroll; ++u) acc += v[u];
    }
    for (; m < e; ++m) acc += unit[static_cast<int64_t>(order[m]) * d + c];
    sums[c] = acc;
    q += static_cast<double>(acc) * acc;
  }
  const double norm2 = BlockSum(q, part);
  if (!(norm2 > 0)) return;  // rows of norm zero only: keeps its centroid
  const double inv = 1.0 / sqrt(norm2);
  for (int c = threadIdx.x; c < d; c += kCentroidThreads) {
    centroids[static_cast<int64_t>(j) * d + c] = static_cast<float>(sums[c] * inv);
  }
}

unsigned Blocks(int64_t threads, int per_block) {
  return static_cast<unsigned>((threads + per_block - 1) / per_block);
}

Status Launched(const char* what) { return CudaStatus(cudaGetLastError(), what); }

}  // namespace

Status LaunchNormalise(float* x, float* norm2, int n, int d, cudaStream_t stream) {
  NormaliseKernel<<<Blocks(static_cast<int64_t>(n) * kWarp, kRowThreads), kRowThreads, 0,
                    stream>>>(x, norm2, n, d);
  return Launched("normalise kernel");
}

Status LaunchSeedUpdate(const float* s, int count, const int32_t* picks, const float* norm2,
                        float* d2, double* chunk_sum, int row0, int rows, bool init,
                        cudaStream_t stream) {
  SeedUpdateKernel<<<Blocks(rows, kSeedChunk), kUpdateThreads, 0, stream>>>(
      s, count, picks, norm2, d2, chunk_sum, row0, rows, init);
  return Launched("seed update kernel");
}

Status LaunchSeedPick(float* d2, const double* chunk_sum, double* chunk_prefix, int n,
                      const double* uniform, int count, bool first, const float* unit, int d,
                      int32_t* picks, float* centroids, cudaStream_t stream) {
  SeedPickKernel<<<1, kPickThreads, 0, stream>>>(d2, chunk_sum, chunk_prefix, n, uniform, count,
                                                 first, unit, d, picks, centroids);
  return Launched("seed pick kernel");
}

Status LaunchArgmax(const float* s, int rows, int k, int lds, int32_t* labels,
                    cudaStream_t stream) {
  if (lds % 4 != 0) return Status::Internal("kmeans: arg-max stride not a multiple of 4");
  ArgmaxKernel<<<Blocks(static_cast<int64_t>(rows) * kWarp, kRowThreads), kRowThreads, 0,
                 stream>>>(s, rows, k, lds, labels);
  return Launched("arg-max kernel");
}

Status LaunchIota(int32_t* idx, int n, cudaStream_t stream) {
  IotaKernel<<<Blocks(n, kSimpleThreads), kSimpleThreads, 0, stream>>>(idx, n);
  return Launched("iota kernel");
}

Status LaunchClusterRanges(const int32_t* sorted_labels, int n, int32_t* begin, int32_t* end,
                           cudaStream_t stream) {
  ClusterRangesKernel<<<Blocks(n, kSimpleThreads), kSimpleThreads, 0, stream>>>(sorted_labels, n,
                                                                               begin, end);
  return Launched("cluster ranges kernel");
}

Status LaunchCentroids(const float* unit, const int32_t* order, const int32_t* begin,
                       const int32_t* end, int k, int d, float* centroids, cudaStream_t stream) {
  if (d > kMaxDim) return Status::Internal("kmeans: d above kMaxDim reached the centroid kernel");
  const size_t smem = static_cast<size_t>(d) * sizeof(float);
  CentroidKernel<<<k, kCentroidThreads, smem, stream>>>(unit, order, begin, end, d, centroids);
  return Launched("centroid kernel");
}

}  // namespace sqkv::gpu::kmeans_detail
