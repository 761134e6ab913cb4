#include "index/kmeans.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <set>
#include <vector>

#include "tests/testing/testing.h"

namespace sqkv {
namespace {

using testing::FreshSeed;
using testing::RandomNormal;

TEST(SphericalKMeans, SeparatedBlobsStayTogether) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int kBlobs = 4, kPerBlob = 60, kDim = 16;
  // Blob b points along its own random direction (scaled by a random positive norm, which a
  // spherical clustering ignores), plus small noise. Points are interleaved across blobs.
  const std::vector<float> dirs = RandomNormal(kBlobs * kDim, rng);
  std::uniform_real_distribution<float> norm(0.5f, 5.f);
  std::normal_distribution<float> noise(0.f, 0.02f);
  std::vector<float> x;
  std::vector<int> truth;
  for (int i = 0; i < kBlobs * kPerBlob; ++i) {
    const int b = i % kBlobs;
    const float s = norm(rng);
    for (int c = 0; c < kDim; ++c) x.push_back(s * (dirs[b * kDim + c] + noise(rng)));
    truth.push_back(b);
  }
  std::vector<int32_t> assign;
  ASSERT_TRUE(
      SphericalKMeans(x.data(), static_cast<int>(truth.size()), kDim, kBlobs, {}, &assign).ok());
  ASSERT_EQ(assign.size(), truth.size());
  std::vector<int32_t> label_of_blob(kBlobs, -1);
  for (size_t i = 0; i < truth.size(); ++i) {
    if (label_of_blob[truth[i]] < 0) label_of_blob[truth[i]] = assign[i];
    EXPECT_EQ(assign[i], label_of_blob[truth[i]]) << "point " << i << " of blob " << truth[i];
  }
  EXPECT_EQ(std::set<int32_t>(label_of_blob.begin(), label_of_blob.end()).size(), kBlobs);
}

TEST(SphericalKMeans, ClampsKAndHandlesZeroRows) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int kN = 12, kDim = 8;
  std::vector<float> x = RandomNormal(kN * kDim, rng);
  for (int c = 0; c < kDim; ++c) x[3 * kDim + c] = x[7 * kDim + c] = 0.f;  // rows 3, 7: zero
  std::vector<int32_t> assign;
  for (int k : {-3, 0, 1, 5, kN, 100}) {
    ASSERT_TRUE(SphericalKMeans(x.data(), kN, kDim, k, {}, &assign).ok()) << "k=" << k;
    ASSERT_EQ(assign.size(), static_cast<size_t>(kN));
    const int k_eff = std::clamp(k, 1, kN);
    for (int32_t a : assign) {
      EXPECT_GE(a, 0);
      EXPECT_LT(a, k_eff);
    }
  }
}

TEST(SphericalKMeans, SameSeedSameAssignment) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int kN = 500, kDim = 32, kK = 25;
  const std::vector<float> x = RandomNormal(kN * kDim, rng);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(SphericalKMeans(x.data(), kN, kDim, kK, {}, &a).ok());
  ASSERT_TRUE(SphericalKMeans(x.data(), kN, kDim, kK, {}, &b).ok());
  EXPECT_EQ(a, b);
}

TEST(SphericalKMeans, RejectsBadInput) {
  std::vector<float> x(8, 1.f);
  std::vector<int32_t> assign;
  EXPECT_TRUE(SphericalKMeans(x.data(), 0, 4, 1, {}, &assign).IsInvalidArgument());
  EXPECT_TRUE(SphericalKMeans(x.data(), 2, 0, 1, {}, &assign).IsInvalidArgument());
  EXPECT_TRUE(SphericalKMeans(nullptr, 2, 4, 1, {}, &assign).IsInvalidArgument());
  KMeansOptions no_iter;
  no_iter.niter = 0;
  EXPECT_TRUE(SphericalKMeans(x.data(), 2, 4, 2, no_iter, &assign).IsInvalidArgument());
  x[5] = std::numeric_limits<float>::quiet_NaN();
  const Status s = SphericalKMeans(x.data(), 2, 4, 2, {}, &assign);
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("x[1, 1]"), std::string::npos) << s.ToString();
}

// The scale of one real head: 4096 keys, head_dim 128, 5% centroids. Reports the time.
TEST(SphericalKMeans, HeadScaleTiming) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int kN = 4096, kDim = 128, kK = 205;
  const std::vector<float> x = RandomNormal(static_cast<size_t>(kN) * kDim, rng);
  std::vector<int32_t> assign;
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(SphericalKMeans(x.data(), kN, kDim, kK, {}, &assign).ok());
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[timing] spherical k-means %d x %d -> %d centroids, 20 iterations: %.1f ms\n", kN,
              kDim, kK, ms);
  std::set<int32_t> used(assign.begin(), assign.end());
  EXPECT_GT(used.size(), static_cast<size_t>(kK / 2));
}

}  // namespace
}  // namespace sqkv
