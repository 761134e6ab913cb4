#include "index/head_index.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace sqkv {
namespace {

Status Bad(const std::string& what) { return Status::Corruption("head index: " + what); }

}  // namespace

std::vector<int32_t> SortedPositions(const HeadIndex& index, const std::vector<int32_t>& clusters) {
  std::vector<int32_t> out;
  for (int32_t c : clusters) {
    const size_t b = static_cast<size_t>(index.cluster_page_begin[c]) * index.page_tokens;
    out.insert(out.end(), index.positions.begin() + b,
               index.positions.begin() + b + index.cluster_size[c]);
  }
  std::sort(out.begin(), out.end());
  return out;
}

Status ValidateHeadIndex(const HeadIndex& x) {
  if (x.head_dim <= 0 || x.page_tokens <= 0 || x.tokens <= 0) return Bad("non-positive shape");
  const int32_t nc = x.num_clusters();
  if (nc <= 0) return Bad("no clusters");
  if (x.centroids.size() != static_cast<size_t>(nc) * x.head_dim) return Bad("centroid count");
  // A NaN or infinite centroid makes every score of its head NaN: selection would be arbitrary.
  for (size_t i = 0; i < x.centroids.size(); ++i) {
    if (!std::isfinite(x.centroids[i])) {
      return Bad("centroid " + std::to_string(i / x.head_dim) + " is not finite");
    }
  }
  if (x.cluster_page_begin.size() != static_cast<size_t>(nc) + 1) return Bad("page table size");
  if (x.cluster_page_begin[0] != 0) return Bad("first cluster does not start at page 0");
  int64_t total = 0;
  for (int32_t c = 0; c < nc; ++c) {
    const int32_t n = x.cluster_size[c];
    if (n <= 0) return Bad("empty cluster " + std::to_string(c));
    // int64: stored (untrusted) values must not overflow the arithmetic.
    const int64_t pages =
        static_cast<int64_t>(x.cluster_page_begin[c + 1]) - x.cluster_page_begin[c];
    if (pages != (static_cast<int64_t>(n) + x.page_tokens - 1) / x.page_tokens) {
      return Bad("cluster " + std::to_string(c) + " spans " + std::to_string(pages) +
                 " pages for " + std::to_string(n) + " tokens");
    }
    total += n;
  }
  if (total != x.tokens) return Bad("cluster sizes sum to " + std::to_string(total));
  if (x.positions.size() != static_cast<size_t>(x.num_pages()) * x.page_tokens) {
    return Bad("positions size");
  }
  std::vector<uint8_t> seen(x.tokens, 0);
  for (int32_t c = 0; c < nc; ++c) {
    const size_t begin = static_cast<size_t>(x.cluster_page_begin[c]) * x.page_tokens;
    const size_t end = static_cast<size_t>(x.cluster_page_begin[c + 1]) * x.page_tokens;
    for (size_t s = begin; s < end; ++s) {
      const int32_t pos = x.positions[s];
      const bool is_pad = s >= begin + static_cast<size_t>(x.cluster_size[c]);
      if (is_pad) {
        if (pos != -1) return Bad("padding slot holds a position in cluster " + std::to_string(c));
        continue;
      }
      if (pos < 0 || pos >= x.tokens) return Bad("position out of range: " + std::to_string(pos));
      if (seen[pos]) return Bad("token " + std::to_string(pos) + " stored twice");
      seen[pos] = 1;
    }
  }
  if (!x.hierarchical()) {
    if (!x.l1_centroids.empty() || !x.l1_child_begin.empty()) return Bad("stray level-1 data");
    return Status::Ok();
  }
  const int32_t n1 = x.num_l1();
  if (x.l1_centroids.size() != static_cast<size_t>(n1) * x.head_dim) return Bad("l1 centroids");
  for (size_t i = 0; i < x.l1_centroids.size(); ++i) {
    if (!std::isfinite(x.l1_centroids[i])) {
      return Bad("level-1 centroid " + std::to_string(i / x.head_dim) + " is not finite");
    }
  }
  if (x.l1_child_begin.size() != static_cast<size_t>(n1) + 1) return Bad("l1 child table size");
  if (x.l1_child_begin[0] != 0 || x.l1_child_begin[n1] != nc) return Bad("l1 children cover");
  for (int32_t p = 0; p < n1; ++p) {
    const int32_t b = x.l1_child_begin[p], e = x.l1_child_begin[p + 1];
    if (e <= b) return Bad("level-1 parent " + std::to_string(p) + " has no children");
    if (e > nc) return Bad("level-1 parent " + std::to_string(p) + " children out of range");
    int64_t sum = 0;
    for (int32_t c = b; c < e; ++c) sum += x.cluster_size[c];
    if (sum != x.l1_size[p]) return Bad("level-1 size of parent " + std::to_string(p));
  }
  return Status::Ok();
}

}  // namespace sqkv
