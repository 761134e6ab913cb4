#include "index/build.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "index/kmeans.h"

namespace sqkv {
namespace {

Status CheckParams(const float* keys, int tokens, int head_dim, const IndexParams& p) {
  if (keys == nullptr) return Status::InvalidArgument("build index: keys is null");
  if (tokens < 1) return Status::InvalidArgument("build index: tokens " + std::to_string(tokens));
  if (head_dim < 1) {
    return Status::InvalidArgument("build index: head_dim " + std::to_string(head_dim));
  }
  // Written so that NaN fails too.
  if (!(p.centroid_fraction > 0.f && p.centroid_fraction <= 1.f)) {
    return Status::InvalidArgument("build index: centroid_fraction " +
                                   std::to_string(p.centroid_fraction) + " not in (0, 1]");
  }
  if (p.page_tokens < 1 || p.page_tokens > kMaxPageTokens) {
    return Status::InvalidArgument("build index: page_tokens " + std::to_string(p.page_tokens) +
                                   " not in [1, " + std::to_string(kMaxPageTokens) + "]");
  }
  if (p.levels != 1 && p.levels != 2) {
    return Status::InvalidArgument("build index: levels " + std::to_string(p.levels) +
                                   " is neither 1 nor 2");
  }
  if (p.levels == 2 && !(p.l1_fraction > 0.f && p.l1_fraction <= 1.f)) {
    return Status::InvalidArgument("build index: l1_fraction " + std::to_string(p.l1_fraction) +
                                   " not in (0, 1]");
  }
  if (p.niter < 1) return Status::InvalidArgument("build index: niter " + std::to_string(p.niter));
  const size_t count = static_cast<size_t>(tokens) * head_dim;
  for (size_t i = 0; i < count; ++i) {
    if (!std::isfinite(keys[i])) {
      return Status::InvalidArgument("build index: key element (" + std::to_string(i / head_dim) +
                                     ", " + std::to_string(i % head_dim) + ") is not finite");
    }
  }
  return Status::Ok();
}

// max(1, round(fraction * tokens)).
int CountFor(float fraction, int tokens) {
  const long c = std::lround(static_cast<double>(fraction) * tokens);
  return c < 1 ? 1 : static_cast<int>(std::min<long>(c, tokens));
}

// Renumbers labels in order of first appearance, so that group g is the g-th to appear in
// `label` order. Unused labels get no number. label: (n); returns (n) new ids, *groups = count.
std::vector<int32_t> RenumberByFirstAppearance(const std::vector<int32_t>& label, int num_labels,
                                               int* groups) {
  std::vector<int32_t> remap(num_labels, -1);
  std::vector<int32_t> out(label.size());
  int next = 0;
  for (size_t i = 0; i < label.size(); ++i) {
    int32_t& r = remap[label[i]];
    if (r < 0) r = next++;
    out[i] = r;
  }
  *groups = next;
  return out;
}

// A cluster being built: its tokens (ascending) and the float64 sum of their raw keys.
struct Group {
  std::vector<int32_t> tokens;
  std::vector<double> key_sum;  // (head_dim)
};

// sum: (head_dim) float64 of `count` keys; mean: (head_dim) float32, appended.
void AppendMean(const std::vector<double>& sum, int64_t count, std::vector<float>* mean) {
  for (double s : sum) mean->push_back(static_cast<float>(s / static_cast<double>(count)));
}

// Runs params.kmeans when set, else the CPU SphericalKMeans, and checks what a hook returned so
// that a faulty one cannot index out of range below. x: (n, d); assign: (n), ids in [0, k).
Status RunKMeans(const IndexParams& params, const float* x, int n, int d, int k,
                 const KMeansOptions& options, std::vector<int32_t>* assign) {
  if (!params.kmeans) return SphericalKMeans(x, n, d, k, options, assign);
  assign->clear();
  SQKV_RETURN_IF_ERROR(params.kmeans(x, n, d, k, options, assign));
  if (assign->size() != static_cast<size_t>(n)) {
    return Status::Internal("kmeans hook returned " + std::to_string(assign->size()) +
                            " labels for " + std::to_string(n) + " rows");
  }
  for (int i = 0; i < n; ++i) {
    const int32_t l = (*assign)[i];
    if (l < 0 || l >= k) {
      return Status::Internal("kmeans hook put row " + std::to_string(i) + " in cluster " +
                              std::to_string(l) + ", not in [0, " + std::to_string(k) + ")");
    }
  }
  return Status::Ok();
}

}  // namespace

Status BuildHeadIndex(const float* keys, int tokens, int head_dim, const IndexParams& params,
                      HeadIndex* out) {
  if (out == nullptr) return Status::InvalidArgument("build index: out is null");
  SQKV_RETURN_IF_ERROR(CheckParams(keys, tokens, head_dim, params));
  const KMeansOptions km{.niter = params.niter, .seed = params.seed};

  // Level 2: cluster the keys; number the non-empty clusters by their smallest position (tokens
  // are visited in ascending position, so first appearance is the smallest position).
  const int k2 = CountFor(params.centroid_fraction, tokens);
  std::vector<int32_t> assign;
  SQKV_RETURN_IF_ERROR(
      RunKMeans(params, keys, tokens, head_dim, k2, km, &assign).WithContext("build index"));
  int nc = 0;
  const std::vector<int32_t> cluster_of = RenumberByFirstAppearance(assign, k2, &nc);
  std::vector<Group> groups(nc);
  for (auto& g : groups) g.key_sum.assign(head_dim, 0.0);
  for (int t = 0; t < tokens; ++t) {
    Group& g = groups[cluster_of[t]];
    g.tokens.push_back(t);
    const float* k = keys + static_cast<size_t>(t) * head_dim;
    for (int c = 0; c < head_dim; ++c) g.key_sum[c] += k[c];
  }

  HeadIndex x;
  x.head_dim = head_dim;
  x.tokens = tokens;
  x.page_tokens = params.page_tokens;

  // Storage order of the level-2 clusters: identity for one level, grouped by parent for two.
  std::vector<int32_t> order(nc);
  for (int c = 0; c < nc; ++c) order[c] = c;
  if (params.levels == 2) {
    std::vector<float> centroids;
    centroids.reserve(static_cast<size_t>(nc) * head_dim);
    for (const Group& g : groups) AppendMean(g.key_sum, g.tokens.size(), &centroids);
    const int k1 = std::min(CountFor(params.l1_fraction, tokens), nc);
    std::vector<int32_t> parent_assign;
    SQKV_RETURN_IF_ERROR(RunKMeans(params, centroids.data(), nc, head_dim, k1, km, &parent_assign)
                             .WithContext("build index, level 1"));
    // Clusters are already ordered by smallest position, so parents numbered by first
    // appearance are ordered by the smallest position under them.
    int n1 = 0;
    const std::vector<int32_t> parent_of = RenumberByFirstAppearance(parent_assign, k1, &n1);
    std::vector<std::vector<int32_t>> children(n1);
    for (int c = 0; c < nc; ++c) children[parent_of[c]].push_back(c);
    order.clear();
    x.l1_child_begin.push_back(0);
    for (int p = 0; p < n1; ++p) {
      std::vector<double> sum(head_dim, 0.0);
      int64_t size = 0;
      for (int32_t c : children[p]) {
        order.push_back(c);
        for (int i = 0; i < head_dim; ++i) sum[i] += groups[c].key_sum[i];
        size += static_cast<int64_t>(groups[c].tokens.size());
      }
      AppendMean(sum, size, &x.l1_centroids);
      x.l1_size.push_back(static_cast<int32_t>(size));
      x.l1_child_begin.push_back(static_cast<int32_t>(order.size()));
    }
  }

  // Page layout in storage order.
  x.centroids.reserve(static_cast<size_t>(nc) * head_dim);
  x.cluster_page_begin.push_back(0);
  for (int32_t c : order) {
    const Group& g = groups[c];
    const int32_t size = static_cast<int32_t>(g.tokens.size());
    AppendMean(g.key_sum, size, &x.centroids);
    x.cluster_size.push_back(size);
    const int32_t pages = (size + params.page_tokens - 1) / params.page_tokens;
    x.cluster_page_begin.push_back(x.cluster_page_begin.back() + pages);
  }
  x.positions.assign(static_cast<size_t>(x.num_pages()) * params.page_tokens, -1);
  for (int s = 0; s < nc; ++s) {
    const std::vector<int32_t>& members = groups[order[s]].tokens;
    const size_t begin = static_cast<size_t>(x.cluster_page_begin[s]) * params.page_tokens;
    std::copy(members.begin(), members.end(), x.positions.begin() + begin);
  }

  const Status valid = ValidateHeadIndex(x);
  if (!valid.ok())
    return Status::Internal("build index produced an invalid index: " + valid.ToString());
  *out = std::move(x);
  return Status::Ok();
}

}  // namespace sqkv
