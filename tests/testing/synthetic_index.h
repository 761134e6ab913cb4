// A structurally valid HeadIndex with random centroids and sizes, built without K-means, for the
// selection, serialisation, GPU lookup and engine tests.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "index/head_index.h"
#include "tests/testing/testing.h"

namespace sqkv::testing {

// Centroids from RandomNormal, sizes uniform in [1, max_cluster_size] (so partial pages), a random
// token permutation in `positions`. num_l1 > 0 makes it hierarchical: children are split into
// num_l1 contiguous non-empty runs and each parent centroid is the size-weighted mean of its
// children's centroids.
// Requires 1 <= num_l1 <= num_clusters when num_l1 > 0.
inline HeadIndex SyntheticIndex(std::mt19937_64& rng, int num_clusters, int head_dim,
                                int page_tokens, int max_cluster_size, int num_l1 = 0) {
  HeadIndex x;
  x.head_dim = head_dim;
  x.page_tokens = page_tokens;
  x.centroids = RandomNormal(static_cast<size_t>(num_clusters) * head_dim, rng);
  std::uniform_int_distribution<int> size_dist(1, max_cluster_size);
  x.cluster_page_begin.push_back(0);
  for (int c = 0; c < num_clusters; ++c) {
    const int n = size_dist(rng);
    x.cluster_size.push_back(n);
    x.tokens += n;
    x.cluster_page_begin.push_back(x.cluster_page_begin.back() +
                                   (n + page_tokens - 1) / page_tokens);
  }
  std::vector<int32_t> perm(x.tokens);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  x.positions.assign(static_cast<size_t>(x.num_pages()) * page_tokens, -1);
  size_t next = 0;
  for (int c = 0; c < num_clusters; ++c) {
    const size_t begin = static_cast<size_t>(x.cluster_page_begin[c]) * page_tokens;
    for (int i = 0; i < x.cluster_size[c]; ++i) x.positions[begin + i] = perm[next++];
  }
  if (num_l1 <= 0) return x;
  // Cut points: num_l1 - 1 distinct values in [1, num_clusters).
  std::vector<int32_t> cuts(num_clusters - 1);
  std::iota(cuts.begin(), cuts.end(), 1);
  std::shuffle(cuts.begin(), cuts.end(), rng);
  cuts.resize(num_l1 - 1);
  std::sort(cuts.begin(), cuts.end());
  x.l1_child_begin.push_back(0);
  x.l1_child_begin.insert(x.l1_child_begin.end(), cuts.begin(), cuts.end());
  x.l1_child_begin.push_back(num_clusters);
  for (int p = 0; p < num_l1; ++p) {
    std::vector<double> sum(head_dim, 0.0);
    int32_t size = 0;
    for (int c = x.l1_child_begin[p]; c < x.l1_child_begin[p + 1]; ++c) {
      size += x.cluster_size[c];
      for (int i = 0; i < head_dim; ++i) {
        sum[i] += static_cast<double>(x.cluster_size[c]) *
                  x.centroids[static_cast<size_t>(c) * head_dim + i];
      }
    }
    x.l1_size.push_back(size);
    for (int i = 0; i < head_dim; ++i) x.l1_centroids.push_back(static_cast<float>(sum[i] / size));
  }
  return x;
}

}  // namespace sqkv::testing
