// Spherical K-means (cosine similarity) over a flat array of vectors, the clustering step of an
// index build. FAISS does the work; no FAISS type appears here.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"

namespace sqkv {

struct KMeansOptions {
  // Lloyd iterations. Default: 20.
  int niter = 20;
  // Seed of the k-means++ initialisation; a fixed seed makes index builds reproducible.
  // Default: 1234.
  uint64_t seed = 1234;
};

// Clusters the rows of x by direction: every row is L2-normalised, K-means (k-means++ seeding,
// then Lloyd iterations) is trained with centroids kept on the unit sphere, and each row is
// assigned to the centroid of largest inner
// product. Rows of norm zero carry no direction; they are left at zero and land on an arbitrary
// (deterministic) cluster. k is clamped to [1, n]; some of the k clusters may end up empty.
// x: (n, d) float32, finite; assign: (n), cluster ids in [0, k).
// InvalidArgument on bad shapes, Internal when FAISS fails.
Status SphericalKMeans(const float* x, int n, int d, int k, const KMeansOptions& options,
                       std::vector<int32_t>* assign);

}  // namespace sqkv
