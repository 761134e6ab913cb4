// Helpers for the GPU lookup and engine tests: clustered head indexes (over SyntheticIndex of
// tests/testing/synthetic_index.h) and a float64 reference of the selection rule of
// index/select.h, written independently of the code under test.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "index/head_index.h"
#include "tests/testing/synthetic_index.h"
#include "tests/testing/testing.h"

namespace sqkv::testing {

// A "clustered" index: the centroids gather around `topics` random directions (each centroid its
// topic plus noise of standard deviation `spread`), so many clusters of a topic score nearly alike.
// queries: (rows, d) near one of the topics (noise 0.3), drawn by QueriesNearTopic.
inline HeadIndex MakeClusteredIndex(std::mt19937_64& rng, int clusters, int d, int page_tokens,
                                    int max_size, int topics, float spread,
                                    std::vector<float>* topic_centres) {
  HeadIndex x = SyntheticIndex(rng, clusters, d, page_tokens, max_size);
  *topic_centres = RandomNormal(static_cast<size_t>(topics) * d, rng);
  std::uniform_int_distribution<int> pick(0, topics - 1);
  std::normal_distribution<float> noise(0.f, spread);
  for (int c = 0; c < clusters; ++c) {
    const float* t = topic_centres->data() + static_cast<size_t>(pick(rng)) * d;
    for (int i = 0; i < d; ++i) x.centroids[static_cast<size_t>(c) * d + i] = t[i] + noise(rng);
  }
  return x;
}

inline std::vector<float> QueriesNearTopic(std::mt19937_64& rng, const std::vector<float>& topics,
                                           int d, int rows) {
  const int n = static_cast<int>(topics.size()) / d;
  const float* t =
      topics.data() + static_cast<size_t>(std::uniform_int_distribution<int>(0, n - 1)(rng)) * d;
  std::normal_distribution<float> noise(0.f, 0.3f);
  std::vector<float> q(static_cast<size_t>(rows) * d);
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < d; ++i) q[static_cast<size_t>(r) * d + i] = t[i] + noise(rng);
  }
  return q;
}

// Scores of entries 0..scored-1, normaliser over every entry. cents: (entries) pointers to d
// floats; sizes: (entries). q: (rows, d).
inline std::vector<double> RefScores(const float* q, int rows, int d,
                                     const std::vector<const float*>& cents,
                                     const std::vector<int32_t>& sizes, int scored) {
  const size_t n = cents.size();
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> acc(scored, 0.0), l(n);
  for (int r = 0; r < rows; ++r) {
    const float* qr = q + static_cast<size_t>(r) * d;
    double m = -std::numeric_limits<double>::infinity();
    for (size_t j = 0; j < n; ++j) {
      double dot = 0;
      for (int i = 0; i < d; ++i) dot += static_cast<double>(qr[i]) * cents[j][i];
      l[j] = dot * scale;
      m = std::max(m, l[j]);
    }
    double z = 0;
    for (size_t j = 0; j < n; ++j) z += sizes[j] * std::exp(l[j] - m);
    for (int j = 0; j < scored; ++j) acc[j] += std::exp(l[j] - m) / z;
  }
  for (double& a : acc) a /= rows;
  return acc;
}

// Descending score, ties by ascending index.
inline std::vector<int32_t> RefRank(const std::vector<double>& s) {
  std::vector<int32_t> r(s.size());
  std::iota(r.begin(), r.end(), 0);
  std::sort(r.begin(), r.end(),
            [&](int32_t a, int32_t b) { return s[a] != s[b] ? s[a] > s[b] : a < b; });
  return r;
}

enum class RefMode { kBudget, kThreshold, kDense };

struct RefSelection {
  std::vector<int32_t> clusters;  // ascending
  int32_t scored = 0;             // centroids scored (level 1 + level 2)
  std::vector<double> score;      // by cluster id; NaN where not scored
  double cut = 0;                 // score at the cut (budget: last taken; threshold: t)
  bool l1_near_tie = false;       // level-1 cut within tol of another parent's score
  int32_t kept_children = -1;     // two-level runs: children scored
};

// Picks by the rule among entries `ids` (cluster ids ascending) with scores s (by entry).
inline void RefPick(const HeadIndex& x, const std::vector<int32_t>& ids,
                    const std::vector<double>& s, RefMode mode, int budget, double threshold,
                    RefSelection* out) {
  out->clusters.clear();
  if (mode == RefMode::kDense) {
    out->clusters = ids;
    return;
  }
  if (mode == RefMode::kThreshold) {
    for (size_t i = 0; i < ids.size(); ++i) {
      if (s[i] >= threshold) out->clusters.push_back(ids[i]);
    }
    out->cut = threshold;
    return;
  }
  int64_t kept = 0;
  for (int32_t i : RefRank(s)) {
    if (kept >= budget) break;
    out->clusters.push_back(ids[i]);
    kept += x.cluster_size[ids[i]];
    out->cut = s[i];
  }
  std::sort(out->clusters.begin(), out->clusters.end());
}

// The selection of index/select.h in float64. budget, l1_budget: token targets.
inline RefSelection RefSelect(const HeadIndex& x, const float* q, int rows, RefMode mode,
                              int budget, double threshold, int l1_budget, double tol) {
  RefSelection out;
  const int d = x.head_dim, nc = x.num_clusters(), n1 = x.num_l1();
  out.score.assign(nc, std::numeric_limits<double>::quiet_NaN());
  std::vector<int32_t> all(nc);
  std::iota(all.begin(), all.end(), 0);
  auto flat = [&]() {
    std::vector<const float*> cents(nc);
    for (int c = 0; c < nc; ++c) cents[c] = x.centroids.data() + static_cast<size_t>(c) * d;
    std::vector<double> s = RefScores(q, rows, d, cents, x.cluster_size, nc);
    for (int c = 0; c < nc; ++c) out.score[c] = s[c];
    RefPick(x, all, s, mode, budget, threshold, &out);
    out.scored += nc;
  };
  if (!x.hierarchical() || mode == RefMode::kDense) {
    if (x.hierarchical()) out.scored = n1;
    flat();
    return out;
  }
  out.scored = n1;
  if (l1_budget <= 0) return out;
  std::vector<const float*> pc(n1);
  for (int p = 0; p < n1; ++p) pc[p] = x.l1_centroids.data() + static_cast<size_t>(p) * d;
  const std::vector<double> ps = RefScores(q, rows, d, pc, x.l1_size, n1);
  std::vector<uint8_t> kept(n1, 0);
  int n_kept = 0;
  int64_t keys = 0;
  double pcut = 0;
  for (int32_t p : RefRank(ps)) {
    if (keys >= l1_budget) break;
    kept[p] = 1;
    ++n_kept;
    keys += x.l1_size[p];
    pcut = ps[p];
  }
  for (int p = 0; p < n1; ++p) {
    if (std::abs(ps[p] - pcut) <= tol * pcut && ps[p] != pcut) out.l1_near_tie = true;
  }
  if (n_kept == n1) {
    flat();
    return out;
  }
  std::vector<int32_t> ids;
  std::vector<const float*> cents;
  std::vector<int32_t> sizes;
  for (int p = 0; p < n1; ++p) {
    if (!kept[p]) continue;
    for (int c = x.l1_child_begin[p]; c < x.l1_child_begin[p + 1]; ++c) {
      ids.push_back(c);
      cents.push_back(x.centroids.data() + static_cast<size_t>(c) * d);
      sizes.push_back(x.cluster_size[c]);
    }
  }
  const int scored = static_cast<int>(ids.size());
  for (int p = 0; p < n1; ++p) {
    if (kept[p]) continue;
    cents.push_back(pc[p]);
    sizes.push_back(x.l1_size[p]);
  }
  const std::vector<double> s = RefScores(q, rows, d, cents, sizes, scored);
  for (int i = 0; i < scored; ++i) out.score[ids[i]] = s[i];
  RefPick(x, ids, s, mode, budget, threshold, &out);
  out.scored += scored;
  out.kept_children = scored;
  return out;
}

// Relative tolerance at the cut for the device lookup (gpu/lookup.h) over index x and query rows
// q: (rows, head_dim). Every logit q_r·c_j/√d is off by at most
//   E_r = (u_c + u_q + d·2^-24) · |q_r| · max_j |c_j| / √d,
// u = 2^-11 for an operand rounded to binary16 (centroids: f16_centroids; q: q_rounded, the
// tensor-core paths: large segments and the narrow small variant), d·2^-24 for float32
// accumulation (and the scaled binary16 subnormals, far below it).
// A score is a mean over rows of softmax terms, each off by a factor within e^(±2E) (numerator
// and normaliser), so two clusters can change places in the ranking only when their scores lie
// within a factor e^(4E) of each other, E = max_r E_r: a budget selection can then differ from the
// reference only in clusters within that factor of the cut (and a threshold selection only within
// e^(2E) of the threshold). `base` is added for float32 scores and exponentials.
inline double LookupTolerance(const HeadIndex& x, const float* q, int rows, bool f16_centroids,
                              bool q_rounded, double base) {
  const int d = x.head_dim;
  auto max_norm = [d](const std::vector<float>& v) {
    double m = 0;
    for (size_t r = 0; r + d <= v.size(); r += d) {
      double n = 0;
      for (int i = 0; i < d; ++i) n += static_cast<double>(v[r + i]) * v[r + i];
      m = std::max(m, n);
    }
    return std::sqrt(m);
  };
  const double c = std::max(max_norm(x.centroids), max_norm(x.l1_centroids));
  double qn = 0;
  for (int r = 0; r < rows; ++r) {
    double n = 0;
    for (int i = 0; i < d; ++i) n += static_cast<double>(q[r * d + i]) * q[r * d + i];
    qn = std::max(qn, n);
  }
  const double u = (f16_centroids ? std::ldexp(1.0, -11) : 0.0) +
                   (q_rounded ? std::ldexp(1.0, -11) : 0.0) + d * std::ldexp(1.0, -24);
  const double e = u * std::sqrt(qn) * c / std::sqrt(static_cast<double>(d));
  return base + std::expm1(4 * e);
}

// Empty when `got` equals the reference up to clusters whose score is within tol (relative) of
// the cut; else a message naming the first disagreement. near_ties counts the tolerated ones;
// max_gap (optional) the largest |score - cut| / cut among them.
inline std::string CompareSelection(const RefSelection& ref, const std::vector<int32_t>& got,
                                    double tol, int* near_ties, double* max_gap = nullptr) {
  std::vector<int32_t> diff;
  std::set_symmetric_difference(ref.clusters.begin(), ref.clusters.end(), got.begin(), got.end(),
                                std::back_inserter(diff));
  for (int32_t c : diff) {
    const double s = ref.score[c];
    if (max_gap != nullptr && !std::isnan(s) && ref.cut != 0) {
      *max_gap = std::max(*max_gap, std::abs(s - ref.cut) / std::abs(ref.cut));
    }
    if (std::isnan(s) || std::abs(s - ref.cut) > tol * std::abs(ref.cut)) {
      return "cluster " + std::to_string(c) + " (score " + std::to_string(s) + ", cut " +
             std::to_string(ref.cut) + ") " +
             (std::binary_search(got.begin(), got.end(), c) ? "selected" : "missed") +
             " by the device";
    }
    ++*near_ties;
  }
  return "";
}

}  // namespace sqkv::testing
