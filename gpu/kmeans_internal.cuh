// Internal to the GPU K-means (gpu/kmeans*.cu): the inner-product step (cuBLAS or built-in) and
// the kernel launchers. Every launcher enqueues on `stream` and returns the launch error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"

namespace sqkv::gpu::kmeans_detail {

// Rows per seeding chunk: the unit of the D² partial sums (kSeedChunk rows, one block).
inline constexpr int kSeedChunk = 1024;
// Threads of the one-block pick kernel.
inline constexpr int kPickThreads = 1024;
// Largest row length: a cluster's sum is staged in 48 KB of shared memory.
inline constexpr int kMaxDim = 48 * 1024 / 4;

inline Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Status::Internal(std::string("kmeans: ") + what + ": " + cudaGetErrorString(err));
}

// The inner products s[i * lds + j] = a_i · b_j, i < rows, j < cols. a: (rows, d), b: (cols, d),
// both row-major; s: (rows, lds), lds >= cols. One per thread's workspace, bound to its stream.
class Gemm {
 public:
  virtual ~Gemm() = default;
  // tf32: tensor cores in TF32 (ignored where unsupported, i.e. by the built-in kernel).
  virtual Status Run(const float* a, int rows, const float* b, int cols, int d, float* s, int lds,
                     bool tf32) = 0;
  virtual bool cublas() const = 0;
};

// cuBLAS through dlopen (so that no binary needs libcublas to start): Unavailable with the reason
// when the library or a symbol is missing.
Status MakeCublasGemm(cudaStream_t stream, std::unique_ptr<Gemm>* out);
// The built-in FP32 kernel: always available.
std::unique_ptr<Gemm> MakeBuiltinGemm(cudaStream_t stream);

// x: (n, d) in place → unit rows (rows of norm zero stay zero); norm2: (n) squared norms of the
// unit rows (1 or 0, up to rounding).
Status LaunchNormalise(float* x, float* norm2, int n, int d, cudaStream_t stream);

// Seeding, the D² update after a round: s: (rows, count) = unit rows [row0, row0 + rows) · the
// round's new centroids; picks: (count) their row ids. d2[i] = min(d2[i], |u_i - c|²) (init:
// d2[i] = the min over this round alone); chunk_sum[row0 / kSeedChunk + b] = the float64 sum of
// d2 over each kSeedChunk rows. row0 is a multiple of kSeedChunk.
Status LaunchSeedUpdate(const float* s, int count, const int32_t* picks, const float* norm2,
                        float* d2, double* chunk_sum, int row0, int rows, bool init,
                        cudaStream_t stream);

// Seeding, one round's picks (one block): count rows by systematic D² sampling, duplicates
// replaced by the row of largest remaining d2; picked rows get d2 = 0; the unit rows are copied
// to centroids. first: pick the row floor(uniform[0] * n) alone (d2 unused).
// uniform: (1 + count) doubles in [0, 1): the systematic offset, then one per pick for the case
// of all d2 == 0. chunk_sum: (ceil(n / kSeedChunk)); chunk_prefix: scratch of that size.
// picks: (count) out; centroids: (count, d) out.
Status LaunchSeedPick(float* d2, const double* chunk_sum, double* chunk_prefix, int n,
                      const double* uniform, int count, bool first, const float* unit, int d,
                      int32_t* picks, float* centroids, cudaStream_t stream);

// labels[i] = arg max_j s[i * lds + j] over j < k, ties to the smallest j. s: (rows, lds), lds a
// multiple of 4 and s 16-byte aligned.
Status LaunchArgmax(const float* s, int rows, int k, int lds, int32_t* labels,
                    cudaStream_t stream);

// idx[i] = i, i < n.
Status LaunchIota(int32_t* idx, int n, cudaStream_t stream);

// From labels sorted ascending (n): begin[j], end[j] = the range of label j (both must be zeroed
// before, so that empty labels read [0, 0)).
Status LaunchClusterRanges(const int32_t* sorted_labels, int n, int32_t* begin, int32_t* end,
                           cudaStream_t stream);

// centroids[j] = normalised sum of unit[order[begin[j] .. end[j])], in that order; a cluster that
// is empty or sums to zero keeps its centroid. unit: (n, d); centroids: (k, d).
Status LaunchCentroids(const float* unit, const int32_t* order, const int32_t* begin,
                       const int32_t* end, int k, int d, float* centroids, cudaStream_t stream);

}  // namespace sqkv::gpu::kmeans_detail
