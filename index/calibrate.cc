#include "index/calibrate.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "index/select.h"

namespace sqkv {

Status CalibrateThresholds(const std::vector<HeadIndex>& heads, const float* queries, int q_heads,
                           int window, const std::vector<float>& sparsities,
                           std::vector<float>* thresholds) {
  const int kv_heads = static_cast<int>(heads.size());
  if (kv_heads == 0 || q_heads <= 0 || q_heads % kv_heads != 0 || window <= 0) {
    return Status::InvalidArgument("calibration queries: q_heads " + std::to_string(q_heads) +
                                   " is not a positive multiple of kv_heads " +
                                   std::to_string(kv_heads) + " or the window is empty");
  }
  for (float s : sparsities) {
    if (!(s > 0.f && s < 1.f)) return Status::InvalidArgument("sparsity must be in (0, 1)");
  }
  const int group = q_heads / kv_heads;
  const int d = heads[0].head_dim;
  const double requests = static_cast<double>(kv_heads) * window;
  // (score, weight) of every cluster of every request.
  std::vector<std::pair<float, double>> entries;
  std::vector<float> rows(static_cast<size_t>(group) * d), scores;
  for (int h = 0; h < kv_heads; ++h) {
    const HeadIndex& index = heads[h];
    scores.resize(index.num_clusters());
    for (int t = 0; t < window; ++t) {
      for (int j = 0; j < group; ++j) {
        const float* src = queries + (static_cast<size_t>(h * group + j) * window + t) * d;
        std::copy(src, src + d, rows.begin() + static_cast<size_t>(j) * d);
      }
      for (float x : rows) {
        if (!std::isfinite(x)) return Status::InvalidArgument("calibration query is not finite");
      }
      ScoreClusters(index, rows.data(), group, scores.data());
      for (int c = 0; c < index.num_clusters(); ++c) {
        entries.push_back({scores[c], index.cluster_size[c] / (double{1} * index.tokens * requests)});
      }
    }
  }
  std::sort(entries.begin(), entries.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  thresholds->assign(sparsities.size(), 0.f);
  for (size_t i = 0; i < sparsities.size(); ++i) {
    const double keep = 1.0 - sparsities[i];
    double acc = 0;
    float t = entries.empty() ? 0.f : entries.back().first;
    for (const auto& [score, weight] : entries) {
      acc += weight;
      if (acc >= keep) {
        t = score;
        break;
      }
    }
    (*thresholds)[i] = t;
  }
  return Status::Ok();
}

Status InterpolateThreshold(const std::vector<float>& sparsities,
                            const std::vector<float>& thresholds, float sparsity, float* out) {
  if (sparsities.empty() || sparsities.size() != thresholds.size()) {
    return Status::InvalidArgument("no calibrated thresholds");
  }
  constexpr float kExact = 1e-6f;
  for (size_t i = 0; i < sparsities.size(); ++i) {
    if (std::abs(sparsities[i] - sparsity) < kExact) {
      *out = thresholds[i];
      return Status::Ok();
    }
  }
  if (sparsity < sparsities.front() || sparsity > sparsities.back()) {
    return Status::InvalidArgument("sparsity " + std::to_string(sparsity) +
                                   " is outside the calibrated range [" +
                                   std::to_string(sparsities.front()) + ", " +
                                   std::to_string(sparsities.back()) + "]");
  }
  size_t hi = 1;
  while (sparsities[hi] < sparsity) ++hi;
  const size_t lo = hi - 1;
  const double f = (sparsity - sparsities[lo]) / (sparsities[hi] - sparsities[lo]);
  const double a = std::log(std::max(thresholds[lo], 1e-30f));
  const double b = std::log(std::max(thresholds[hi], 1e-30f));
  *out = static_cast<float>(std::exp(a + f * (b - a)));
  return Status::Ok();
}

}  // namespace sqkv
