// Spherical K-means on the GPU, the fast path of an index build; the CPU one (FAISS) is
// sqkv::SphericalKMeans in index/kmeans.h. Plain C++: no CUDA types.
//
// Same contract as the CPU path: rows are L2-normalised, centroids are seeded by D² sampling and
// kept on the unit sphere (centroid = normalised mean of its unit rows), and each row goes to the
// centroid of largest inner product. Differences that the tests bound:
//   - Seeding draws the centroids in rounds (1, 2, 4, ... up to k / 32 at a time, each round by
//     systematic D² sampling over the distances to all earlier rounds), so that it costs ~40
//     passes over the rows instead of k; for k <= 33 it is plain k-means++.
//   - The Lloyd assignments use TF32 tensor cores by default (GpuKMeansOptions::tf32); the
//     seeding distances are FP32.
//   - An empty cluster (or one whose rows sum to zero) keeps its last centroid; FAISS splits a
//     large cluster instead.
// Deterministic: the same inputs, options and seed give the same labels on the same GPU model
// and library versions (no floating-point atomics; fixed reduction orders).
//
// Work runs on a stream and workspace owned by the calling thread (kept between calls, grown as
// needed, freed at thread exit), on the thread's current device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/status.h"
#include "index/build.h"
#include "index/kmeans.h"

namespace sqkv::gpu {

// How the row-centroid inner products are computed.
enum class KMeansGemm {
  kAuto,     // cuBLAS when libcublas.so.<major> loads (dlopen), else the built-in kernel
  kCublas,   // cuBLAS only: Unavailable when the library cannot be loaded
  kBuiltin,  // the built-in FP32 kernel, no cuBLAS
};

struct GpuKMeansOptions {
  // Default: kAuto.
  KMeansGemm gemm = KMeansGemm::kAuto;
  // Lloyd assignments on TF32 tensor cores (cuBLAS only; the built-in kernel is FP32).
  // Default: true.
  bool tf32 = true;
  // Bytes of one tile of row-centroid products (float32), the largest scratch of a call; the
  // default stays in an H200's 60 MB L2 between the product and the arg-max. Smaller tiles
  // (>= 128 rows or 1024 seeding rows each) only cost speed. Default: 32 MiB.
  size_t tile_bytes = size_t{32} << 20;
};

// Where one call spent its time (CUDA events on its stream), and which product ran.
struct GpuKMeansStats {
  bool cublas = false;     // true: cuBLAS did the products; false: the built-in kernel
  double upload_ms = 0;    // host rows → device, normalisation
  double seed_ms = 0;      // D² seeding
  double lloyd_ms = 0;     // iterations and the final assignment
  double download_ms = 0;  // labels → host
};

// Call it qualified (gpu::SphericalKMeans): with a KMeansOptions argument, an unqualified call
// also finds sqkv::SphericalKMeans by argument-dependent lookup.
// x: (n, d) float32, finite, host memory; assign: (n), cluster ids in [0, clamped k).
// k is clamped to [1, n]. InvalidArgument on bad shapes or non-finite input; Unavailable without
// a device (or with kCublas and no cuBLAS); Internal when CUDA or cuBLAS fails.
Status SphericalKMeans(const float* x, int n, int d, int k, const KMeansOptions& options,
                       std::vector<int32_t>* assign);
Status SphericalKMeans(const float* x, int n, int d, int k, const KMeansOptions& options,
                       const GpuKMeansOptions& gpu_options, std::vector<int32_t>* assign,
                       GpuKMeansStats* stats = nullptr);

// The GPU K-means as an IndexParams::kmeans hook. Errors (no device included) are returned.
KMeansFn GpuKMeansFn(const GpuKMeansOptions& gpu_options = {});

// Like GpuKMeansFn, but an Unavailable answer (no device, no CUDA build) runs the CPU path
// (sqkv::SphericalKMeans) instead. Other errors are returned.
KMeansFn GpuOrCpuKMeansFn(const GpuKMeansOptions& gpu_options = {});

}  // namespace sqkv::gpu
