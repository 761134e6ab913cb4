// The clustered index of one (layer, kv head) and the page layout it implies.
//
// Page layout (shared by the segment file, the host cache and the device pool):
//   a page holds `page_tokens` token slots of one (layer, kv head):
//     K: (page_tokens, head_dim) in the context's dtype, then
//     V: (page_tokens, head_dim) in the context's dtype.
//   page_bytes = 2 * page_tokens * head_dim * DTypeSize(dtype).
// Clusters are stored one after another, each a contiguous run of whole pages; the last page of
// a cluster may be partial: its trailing slots are padding (position -1, zero bytes) and are never
// attended to. A cluster of `n` tokens spans ceil(n / page_tokens) pages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/dtype.h"

namespace sqkv {

struct HeadIndex {
  int32_t head_dim = 0;
  int32_t tokens = 0;       // real tokens of this head (= context tokens)
  int32_t page_tokens = 0;  // token slots per page

  // Level 2 (the leaf clusters; "the" clusters when single level), in storage order.
  // centroids: (num_clusters, head_dim), the mean of the raw keys of each cluster.
  std::vector<float> centroids;
  // cluster_size: (num_clusters), tokens in each cluster; every entry >= 1 (empty clusters are
  // dropped when the index is built, so none can score).
  std::vector<int32_t> cluster_size;
  // cluster_page_begin: (num_clusters + 1). Cluster c spans this head's pages
  // [cluster_page_begin[c], cluster_page_begin[c + 1]); the last entry is num_pages().
  std::vector<int32_t> cluster_page_begin;
  // positions: (num_pages * page_tokens), the original token position held by each slot, in
  // storage order; -1 marks padding.
  std::vector<int32_t> positions;

  // Level 1 (hierarchical indexes only; empty otherwise): parents over the level-2 clusters.
  // Children of parent p are the contiguous level-2 clusters [l1_child_begin[p], l1_child_begin[p+1]).
  std::vector<float> l1_centroids;     // (num_l1, head_dim), mean of the raw keys under p
  std::vector<int32_t> l1_size;        // (num_l1), tokens under p
  std::vector<int32_t> l1_child_begin;  // (num_l1 + 1)

  int32_t num_clusters() const { return static_cast<int32_t>(cluster_size.size()); }
  int32_t num_pages() const {
    return cluster_page_begin.empty() ? 0 : cluster_page_begin.back();
  }
  int32_t num_l1() const { return static_cast<int32_t>(l1_size.size()); }
  bool hierarchical() const { return !l1_size.empty(); }

  // Tokens actually held by page p of cluster c (the last page of a cluster may be partial).
  int32_t PageValidTokens(int32_t c, int32_t p) const {
    const int32_t first = cluster_page_begin[c];
    const int32_t rest = cluster_size[c] - (p - first) * page_tokens;
    return rest < page_tokens ? rest : page_tokens;
  }
};

}  // namespace sqkv

#include "common/status.h"

namespace sqkv {

// Checks every structural invariant of an index: sizes agree, clusters non-empty, pages exactly
// cover each cluster, positions hold each token in [0, tokens) exactly once (padding -1 only in
// the tail of a cluster's last page), level-1 children contiguous and covering all clusters with
// consistent sizes. Corruption naming the first violation otherwise.
Status ValidateHeadIndex(const HeadIndex& index);

// The original token positions held by `clusters`, sorted ascending (padding excluded).
std::vector<int32_t> SortedPositions(const HeadIndex& index, const std::vector<int32_t>& clusters);

}  // namespace sqkv
