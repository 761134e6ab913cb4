#include "index/build.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "tests/testing/testing.h"

namespace sqkv {
namespace {

using testing::FreshSeed;
using testing::RandomNormal;

// The tokens of cluster c in storage order. index: valid.
std::vector<int32_t> Members(const HeadIndex& x, int c) {
  const size_t begin = static_cast<size_t>(x.cluster_page_begin[c]) * x.page_tokens;
  return {x.positions.begin() + begin, x.positions.begin() + begin + x.cluster_size[c]};
}

// Float64 mean of the listed keys. keys: (tokens, d).
std::vector<double> MeanOf(const std::vector<float>& keys, int d, const std::vector<int32_t>& use) {
  std::vector<double> m(d, 0.0);
  for (int32_t t : use) {
    for (int i = 0; i < d; ++i) m[i] += keys[static_cast<size_t>(t) * d + i];
  }
  for (double& v : m) v /= static_cast<double>(use.size());
  return m;
}

void ExpectNear(const float* got, const std::vector<double>& want, const std::string& what) {
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], 1e-5 * (1.0 + std::abs(want[i]))) << what << " element " << i;
  }
}

// Every property BuildHeadIndex promises. keys: (tokens, d).
void CheckIndex(const HeadIndex& x, const std::vector<float>& keys, int tokens, int d,
                const IndexParams& p) {
  ASSERT_TRUE(ValidateHeadIndex(x).ok()) << ValidateHeadIndex(x).ToString();
  EXPECT_EQ(x.tokens, tokens);
  EXPECT_EQ(x.head_dim, d);
  EXPECT_EQ(x.page_tokens, p.page_tokens);
  const int want_clusters =
      std::max(1L, std::lround(static_cast<double>(p.centroid_fraction) * tokens));
  EXPECT_LE(x.num_clusters(), want_clusters);
  std::vector<int32_t> first(x.num_clusters());
  for (int c = 0; c < x.num_clusters(); ++c) {
    const std::vector<int32_t> m = Members(x, c);
    ASSERT_FALSE(m.empty());
    EXPECT_TRUE(std::is_sorted(m.begin(), m.end())) << "cluster " << c;
    first[c] = m.front();
    ExpectNear(x.centroids.data() + static_cast<size_t>(c) * d, MeanOf(keys, d, m),
               "centroid " + std::to_string(c));
  }
  if (p.levels == 1) {
    EXPECT_FALSE(x.hierarchical());
    EXPECT_TRUE(std::is_sorted(first.begin(), first.end()));
    return;
  }
  ASSERT_TRUE(x.hierarchical());
  const int want_l1 = std::min<int>(
      x.num_clusters(), std::max(1L, std::lround(static_cast<double>(p.l1_fraction) * tokens)));
  EXPECT_LE(x.num_l1(), want_l1);
  std::vector<int32_t> parent_first;
  for (int q = 0; q < x.num_l1(); ++q) {
    const int b = x.l1_child_begin[q], e = x.l1_child_begin[q + 1];
    EXPECT_TRUE(std::is_sorted(first.begin() + b, first.begin() + e)) << "children of " << q;
    std::vector<int32_t> under;
    for (int c = b; c < e; ++c) {
      const std::vector<int32_t> m = Members(x, c);
      under.insert(under.end(), m.begin(), m.end());
    }
    EXPECT_EQ(x.l1_size[q], static_cast<int32_t>(under.size()));
    parent_first.push_back(*std::min_element(under.begin(), under.end()));
    ExpectNear(x.l1_centroids.data() + static_cast<size_t>(q) * d, MeanOf(keys, d, under),
               "parent " + std::to_string(q));
  }
  EXPECT_TRUE(std::is_sorted(parent_first.begin(), parent_first.end()));
}

struct Shape {
  int tokens, page_tokens;
  float fraction;
};

TEST(BuildHeadIndex, InvariantsOnRandomKeys) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int kDim = 32;
  for (const Shape& s : std::vector<Shape>{{1000, 16, 0.05f},
                                           {1001, 16, 0.05f},  // not a multiple of the page
                                           {10, 16, 0.2f},     // fewer tokens than a page
                                           {1, 16, 0.05f},
                                           {500, 7, 0.1f},
                                           {300, 1, 0.05f},
                                           {200, 16, 0.001f},  // rounds to one cluster
                                           {64, 4, 1.f}}) {    // as many clusters as keys
    SCOPED_TRACE("tokens " + std::to_string(s.tokens) + " page " + std::to_string(s.page_tokens) +
                 " fraction " + std::to_string(s.fraction));
    const std::vector<float> keys =
        RandomNormal(static_cast<size_t>(s.tokens) * kDim, rng, 2.f, 0.3f);
    IndexParams p;
    p.page_tokens = s.page_tokens;
    p.centroid_fraction = s.fraction;
    HeadIndex x;
    ASSERT_TRUE(BuildHeadIndex(keys.data(), s.tokens, kDim, p, &x).ok());
    CheckIndex(x, keys, s.tokens, kDim, p);
    if (s.fraction == 0.001f) {
      EXPECT_EQ(x.num_clusters(), 1);
    }
  }
}

// Keys that take only a few distinct directions (exact duplicates and positive multiples): K-means
// asked for many more clusters leaves most of them empty; the index must drop them.
TEST(BuildHeadIndex, DuplicateKeysLeaveNoEmptyCluster) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int kTokens = 800, kDim = 16, kDistinct = 5;
  const std::vector<float> protos = RandomNormal(kDistinct * kDim, rng);
  std::uniform_int_distribution<int> pick(0, kDistinct - 1);
  std::uniform_int_distribution<int> mult(1, 3);
  std::vector<float> keys;
  std::vector<int> proto_of;  // -1: a zero key
  for (int t = 0; t < kTokens; ++t) {
    const int j = pick(rng);
    proto_of.push_back(j);
    const float m = static_cast<float>(mult(rng));
    for (int c = 0; c < kDim; ++c) keys.push_back(m * protos[j * kDim + c]);
  }
  // A few all-zero keys too: no direction, must not produce NaN.
  for (int t : {0, 17, 555}) {
    std::fill_n(keys.begin() + t * kDim, kDim, 0.f);
    proto_of[t] = -1;
  }
  for (int levels : {1, 2}) {
    IndexParams p;
    p.centroid_fraction = 0.1f;  // 80 clusters asked for
    p.levels = levels;
    p.l1_fraction = 0.05f;
    HeadIndex x;
    ASSERT_TRUE(BuildHeadIndex(keys.data(), kTokens, kDim, p, &x).ok());
    CheckIndex(x, keys, kTokens, kDim, p);
    for (float v : x.centroids) EXPECT_TRUE(std::isfinite(v));
    // No cluster mixes directions (a direction may be split: its normalised multiples differ
    // in the last bits, and FAISS splits big clusters into empty ones).
    for (int c = 0; c < x.num_clusters(); ++c) {
      std::set<int> dirs;
      for (int32_t t : Members(x, c)) {
        if (proto_of[t] >= 0) dirs.insert(proto_of[t]);
      }
      EXPECT_LE(dirs.size(), 1u) << "cluster " << c;
    }
  }
}

TEST(BuildHeadIndex, TwoLevelInvariants) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int kDim = 32;
  for (const Shape& s : std::vector<Shape>{{2000, 16, 0.05f}, {333, 5, 0.1f}, {100, 16, 0.02f}}) {
    SCOPED_TRACE("tokens " + std::to_string(s.tokens));
    const std::vector<float> keys = RandomNormal(static_cast<size_t>(s.tokens) * kDim, rng);
    IndexParams p;
    p.levels = 2;
    p.page_tokens = s.page_tokens;
    p.centroid_fraction = s.fraction;
    p.l1_fraction = s.tokens == 100 ? 0.5f : 0.01f;  // 100: more parents asked than clusters
    HeadIndex x;
    ASSERT_TRUE(BuildHeadIndex(keys.data(), s.tokens, kDim, p, &x).ok());
    CheckIndex(x, keys, s.tokens, kDim, p);
    EXPECT_LT(x.num_l1(), x.num_clusters() + 1);
  }
}

TEST(BuildHeadIndex, Reproducible) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int kTokens = 700, kDim = 24;
  const std::vector<float> keys = RandomNormal(kTokens * kDim, rng);
  IndexParams p;
  p.levels = 2;
  HeadIndex a, b;
  ASSERT_TRUE(BuildHeadIndex(keys.data(), kTokens, kDim, p, &a).ok());
  ASSERT_TRUE(BuildHeadIndex(keys.data(), kTokens, kDim, p, &b).ok());
  EXPECT_EQ(a.centroids, b.centroids);
  EXPECT_EQ(a.positions, b.positions);
  EXPECT_EQ(a.l1_child_begin, b.l1_child_begin);
}

TEST(BuildHeadIndex, RejectsBadInput) {
  std::vector<float> keys(40 * 4, 0.5f);
  HeadIndex x;
  auto build = [&](int tokens, int d, IndexParams p) {
    return BuildHeadIndex(keys.data(), tokens, d, p, &x);
  };
  EXPECT_TRUE(build(0, 4, {}).IsInvalidArgument());
  EXPECT_TRUE(build(40, 0, {}).IsInvalidArgument());
  for (float f : {0.f, -0.1f, 1.5f, std::numeric_limits<float>::quiet_NaN()}) {
    IndexParams p;
    p.centroid_fraction = f;
    EXPECT_TRUE(build(40, 4, p).IsInvalidArgument()) << f;
    p = {};
    p.levels = 2;
    p.l1_fraction = f;
    EXPECT_TRUE(build(40, 4, p).IsInvalidArgument()) << f;
  }
  IndexParams p;
  p.page_tokens = 0;
  EXPECT_TRUE(build(40, 4, p).IsInvalidArgument());
  p = {};
  p.levels = 3;
  EXPECT_TRUE(build(40, 4, p).IsInvalidArgument());
  keys[13 * 4 + 2] = std::numeric_limits<float>::infinity();
  const Status s = build(40, 4, {});
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("(13, 2)"), std::string::npos) << s.ToString();
}

}  // namespace
}  // namespace sqkv
