// Building the clustered index of one (layer, kv head) from its keys.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "common/status.h"
#include "index/head_index.h"
#include "index/kmeans.h"

namespace sqkv {

// Upper bound on IndexParams::page_tokens: keeps page arithmetic far from int32 overflow and the
// padding of a partial page bounded.
inline constexpr int kMaxPageTokens = 1 << 16;

// A spherical K-means with the contract of SphericalKMeans (index/kmeans.h): k is clamped to
// [1, n]; *assign gets n cluster ids in [0, clamped k). Lets a caller put the clustering on
// another device (gpu/kmeans.h: GpuKMeansFn) without index/ depending on it.
// x: (n, d) float32, finite; assign: (n).
using KMeansFn = std::function<Status(const float* x, int n, int d, int k,
                                      const KMeansOptions& options, std::vector<int32_t>* assign)>;

struct IndexParams {
  // Level-2 clusters = max(1, round(centroid_fraction * tokens)), in (0, 1]. Default: 0.05.
  float centroid_fraction = 0.05f;
  // Token slots per page (see the page layout in index/head_index.h), in [1, kMaxPageTokens].
  // Default: 16.
  int page_tokens = 16;
  // 1: single-level index; 2: level-1 parents over the level-2 clusters. Default: 1.
  int levels = 1;
  // Levels == 2 only: level-1 parents = max(1, round(l1_fraction * tokens)), clamped to the
  // number of level-2 clusters; in (0, 1]. Default: 0.01.
  float l1_fraction = 0.01f;
  // K-means iterations at each level. Default: 20.
  int niter = 20;
  // K-means seed; the same keys and params always give the same index. Default: 1234.
  uint64_t seed = 1234;
  // The clustering used at both levels; its output is checked (size, ids in range). The same
  // keys, params and function give the same index. Default: empty = SphericalKMeans (FAISS, CPU).
  KMeansFn kmeans;
};

// Clusters the keys with spherical K-means and lays the clusters out in pages.
//   - Empty clusters are dropped; a centroid is the mean of the raw (not normalised) keys.
//   - Single level: clusters are stored in order of their smallest token position.
//   - Two levels: the level-2 centroids are clustered again (spherical K-means); parents are
//     stored in order of their smallest token position, each parent's children contiguously in
//     the same order; a parent's centroid is the mean of the raw keys under it.
//   - Inside a cluster tokens keep ascending position; a cluster's last page is padded with -1.
// keys: (tokens, head_dim) float32, raw post-RoPE keys, finite.
// InvalidArgument names the offending parameter or the first non-finite key element.
Status BuildHeadIndex(const float* keys, int tokens, int head_dim, const IndexParams& params,
                      HeadIndex* out);

}  // namespace sqkv
