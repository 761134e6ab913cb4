#include "index/calibrate.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "index/select.h"
#include "tests/testing/synthetic_index.h"
#include "tests/testing/testing.h"

namespace sqkv {
namespace {

using testing::FreshSeed;
using testing::RandomNormal;
using testing::SyntheticIndex;

TEST(InterpolateThreshold, ExactAtLevelsLogLinearBetweenRangeChecked) {
  const std::vector<float> s = {0.5f, 0.7f, 0.9f}, t = {1e-4f, 1e-3f, 1e-1f};
  float out = 0;
  ASSERT_TRUE(InterpolateThreshold(s, t, 0.7f, &out).ok());
  EXPECT_EQ(out, 1e-3f);
  ASSERT_TRUE(InterpolateThreshold(s, t, 0.6f, &out).ok());
  EXPECT_NEAR(std::log10(out), -3.5, 1e-5);  // halfway in log(threshold)
  ASSERT_TRUE(InterpolateThreshold(s, t, 0.85f, &out).ok());
  EXPECT_NEAR(std::log10(out), -1.5, 1e-5);  // three quarters of the way from 1e-3 to 1e-1
  EXPECT_TRUE(InterpolateThreshold(s, t, 0.45f, &out).IsInvalidArgument());
  EXPECT_TRUE(InterpolateThreshold(s, t, 0.95f, &out).IsInvalidArgument());
  EXPECT_TRUE(InterpolateThreshold({}, {}, 0.7f, &out).IsInvalidArgument());
  EXPECT_TRUE(InterpolateThreshold(s, {1e-3f}, 0.7f, &out).IsInvalidArgument());
}

// The calibrated threshold is the largest T at which the mean kept fraction over the requests
// (every window position of every kv head, its GQA group's rows together) still reaches
// 1 - sparsity: checked by brute force over every distinct score.
TEST(CalibrateThresholds, LargestThresholdKeepingTheTargetOnAverage) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int kKvHeads = 2, kGroup = 3, kWindow = 7, kDim = 32;
  std::vector<HeadIndex> heads;
  for (int h = 0; h < kKvHeads; ++h) heads.push_back(SyntheticIndex(rng, 60 + 9 * h, kDim, 8, 20));
  const int q_heads = kKvHeads * kGroup;
  const std::vector<float> q =
      RandomNormal(static_cast<size_t>(q_heads) * kWindow * kDim, rng, 1.5f);
  const std::vector<float> sparsities = {0.5f, 0.8f, 0.95f};
  std::vector<float> thresholds;
  ASSERT_TRUE(CalibrateThresholds(heads, q.data(), q_heads, kWindow, sparsities, &thresholds).ok());
  ASSERT_EQ(thresholds.size(), sparsities.size());

  // Every request's scores, with its clusters' sizes.
  struct Request {
    std::vector<float> scores;
    const HeadIndex* index;
  };
  std::vector<Request> requests;
  std::vector<float> candidates;
  for (int h = 0; h < kKvHeads; ++h) {
    for (int t = 0; t < kWindow; ++t) {
      std::vector<float> rows;  // (kGroup, kDim): the group's query rows at position t
      for (int g = 0; g < kGroup; ++g) {
        const float* row = q.data() + (static_cast<size_t>(h * kGroup + g) * kWindow + t) * kDim;
        rows.insert(rows.end(), row, row + kDim);
      }
      Request r{std::vector<float>(heads[h].num_clusters()), &heads[h]};
      ScoreClusters(heads[h], rows.data(), kGroup, r.scores.data());
      candidates.insert(candidates.end(), r.scores.begin(), r.scores.end());
      requests.push_back(std::move(r));
    }
  }
  auto mean_kept = [&](float threshold) {
    double sum = 0;
    for (const Request& r : requests) {
      double kept = 0;
      for (size_t c = 0; c < r.scores.size(); ++c) {
        if (r.scores[c] >= threshold) kept += r.index->cluster_size[c];
      }
      sum += kept / r.index->tokens;
    }
    return sum / requests.size();
  };
  std::sort(candidates.begin(), candidates.end());
  candidates.erase(std::unique(candidates.begin(), candidates.end()), candidates.end());
  for (size_t i = 0; i < sparsities.size(); ++i) {
    const double keep = 1.0 - sparsities[i];
    float best = candidates.front();
    for (float c : candidates) {
      if (mean_kept(c) >= keep - 1e-9) best = c;
    }
    EXPECT_EQ(thresholds[i], best) << "sparsity " << sparsities[i];
    EXPECT_GE(mean_kept(thresholds[i]), keep - 1e-6) << "sparsity " << sparsities[i];
  }
  EXPECT_LE(thresholds[0], thresholds[1]);
  EXPECT_LE(thresholds[1], thresholds[2]);
  // Bad input is refused.
  EXPECT_TRUE(CalibrateThresholds(heads, q.data(), q_heads, kWindow, {1.5f}, &thresholds)
                  .IsInvalidArgument());
  EXPECT_FALSE(
      CalibrateThresholds(heads, q.data(), q_heads + 1, kWindow, sparsities, &thresholds).ok());
}

}  // namespace
}  // namespace sqkv
