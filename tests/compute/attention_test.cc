// The CPU attention reference against an independent float64 computation, and state merging.
#include "compute/attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <numeric>

#include "index/head_index.h"
#include "tests/testing/testing.h"

namespace sqkv {
namespace {

using testing::FreshSeed;
using testing::RandomNormal;
using testing::ReferenceAttention;
using testing::RelativeError;

// Random keys/values laid out in pages; returns the page refs and the list of token ids (into
// keys/values) that the refs cover, in order.
struct PagedInput {
  std::vector<float> keys, values;  // (tokens, d), already rounded through the dtype
  std::vector<uint8_t> pool;        // (num_pages, page_bytes)
  std::vector<PageRef> refs;
  std::vector<int32_t> used;
};

PagedInput MakePages(int tokens, int d, int page_tokens, DType dtype, std::mt19937_64& rng,
                     float key_scale = 1.f) {
  PagedInput in;
  in.keys =
      testing::RoundTrip(dtype, RandomNormal(static_cast<size_t>(tokens) * d, rng, key_scale));
  in.values = testing::RoundTrip(dtype, RandomNormal(static_cast<size_t>(tokens) * d, rng));
  // Pages of random fill (1..page_tokens valid), tokens in shuffled order.
  std::vector<int32_t> order(tokens);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  const size_t page_bytes = PageBytes(page_tokens, d, dtype);
  const size_t row = static_cast<size_t>(d) * DTypeSize(dtype);
  std::vector<std::pair<size_t, int>> pages;  // (first index into order, valid)
  std::uniform_int_distribution<int> fill(1, page_tokens);
  for (size_t i = 0; i < order.size();) {
    int valid = std::min<int>(fill(rng), static_cast<int>(order.size() - i));
    pages.push_back({i, valid});
    i += valid;
  }
  in.pool.assign(pages.size() * page_bytes, 0xAB);  // padding garbage must be ignored
  for (size_t p = 0; p < pages.size(); ++p) {
    uint8_t* base = in.pool.data() + p * page_bytes;
    for (int t = 0; t < pages[p].second; ++t) {
      const int tok = order[pages[p].first + t];
      FromFloat(dtype, in.keys.data() + static_cast<size_t>(tok) * d, base + t * row, d);
      FromFloat(dtype, in.values.data() + static_cast<size_t>(tok) * d,
                base + page_bytes / 2 + t * row, d);
      in.used.push_back(tok);
    }
  }
  for (size_t p = 0; p < pages.size(); ++p) {
    in.refs.push_back({in.pool.data() + p * page_bytes, pages[p].second});
  }
  return in;
}

class AttendPagesTest : public ::testing::TestWithParam<DType> {};

TEST_P(AttendPagesTest, MatchesFloat64Reference) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(FreshSeed());
  for (int d : {64, 128}) {
    for (int tokens : {1, 15, 300, 1500}) {
      // 64 and 600 rows take the BLAS-tiled path (600: three passes of at most 256 rows, the
      // last short); 1500 tokens span key tiles.
      for (int rows : {7, 64, 600}) {
        const int page_tokens = 16;
        PagedInput in = MakePages(tokens, d, page_tokens, dtype, rng);
        auto q = RandomNormal(static_cast<size_t>(rows) * d, rng);
        std::vector<float> out(rows * d, std::nanf("")), lse(rows, std::nanf(""));
        const float scale = 1.f / std::sqrt(static_cast<float>(d));
        AttendPages(q.data(), rows, d, scale, dtype, page_tokens, in.refs.data(),
                    static_cast<int>(in.refs.size()), out.data(), lse.data());
        std::vector<double> ref_out, ref_lse;
        ReferenceAttention(q.data(), rows, d, in.keys.data(), in.values.data(), in.used, scale,
                           &ref_out, &ref_lse);
        const double err = RelativeError(out.data(), ref_out.data(), out.size());
        EXPECT_LT(err, 1e-5) << "d=" << d << " tokens=" << tokens << " rows=" << rows;
        for (int r = 0; r < rows; ++r)
          EXPECT_NEAR(lse[r], ref_lse[r], 1e-4 * std::abs(ref_lse[r]) + 1e-4);
        for (float x : out) ASSERT_FALSE(std::isnan(x));
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, AttendPagesTest,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

TEST(AttendPages, LargeLogitsStayFinite) {
  std::mt19937_64 rng(FreshSeed());
  for (const int rows : {3, 48}) {  // the loop path and the tiled path
    const int d = 64;
    PagedInput in = MakePages(200, d, 16, DType::kF32, rng, /*key_scale=*/300.f);
    auto q = RandomNormal(static_cast<size_t>(rows) * d, rng, 30.f);
    std::vector<float> out(rows * d), lse(rows);
    AttendPages(q.data(), rows, d, 0.125f, DType::kF32, 16, in.refs.data(),
                static_cast<int>(in.refs.size()), out.data(), lse.data());
    std::vector<double> ref_out, ref_lse;
    ReferenceAttention(q.data(), rows, d, in.keys.data(), in.values.data(), in.used, 0.125,
                       &ref_out, &ref_lse);
    for (float x : out) ASSERT_TRUE(std::isfinite(x));
    // Logits here reach ~10^4: a float32 logit is off by about u·|l| (u = 2^-24) from its final
    // rounding alone, and the output's relative error follows the logits' absolute error, so the
    // bound scales with the largest |logit| (a fixed 1e-4 failed for some seeds at 1.9e-4).
    double max_logit = 0;
    for (int r = 0; r < rows; ++r) {
      for (int32_t tok : in.used) {
        double l = 0;
        for (int i = 0; i < d; ++i) {
          l += static_cast<double>(q[static_cast<size_t>(r) * d + i]) *
               in.keys[static_cast<size_t>(tok) * d + i];
        }
        max_logit = std::max(max_logit, std::abs(l * 0.125));
      }
    }
    const double tol = 1e-4 + 8 * std::ldexp(1.0, -24) * max_logit;
    EXPECT_LT(RelativeError(out.data(), ref_out.data(), out.size()), tol)
        << "max |logit| " << max_logit;
    for (int r = 0; r < rows; ++r)
      EXPECT_NEAR(lse[r], ref_lse[r], 1e-5 * std::abs(ref_lse[r]) + 1e-3);
  }
}

TEST(AttendPages, NoPagesIsTheEmptyState) {
  const int d = 64, rows = 2;
  std::vector<float> q(rows * d, 0.5f), out(rows * d, 7.f), lse(rows, 7.f);
  AttendPages(q.data(), rows, d, 0.125f, DType::kBF16, 16, nullptr, 0, out.data(), lse.data());
  for (float x : out) EXPECT_EQ(x, 0.f);
  for (float x : lse) EXPECT_EQ(x, -std::numeric_limits<float>::infinity());
}

// Attention over A ∪ B equals the merge of attention over A and over B.
TEST(MergeStates, SplitThenMergeEqualsWhole) {
  std::mt19937_64 rng(FreshSeed());
  for (const int rows : {5, 40}) {
    const int d = 128;
    PagedInput in = MakePages(500, d, 16, DType::kF32, rng);
    auto q = RandomNormal(static_cast<size_t>(rows) * d, rng);
    const float scale = 1.f / std::sqrt(128.f);
    const int split = static_cast<int>(in.refs.size()) / 3;
    std::vector<float> oa(rows * d), la(rows), ob(rows * d), lb(rows);
    AttendPages(q.data(), rows, d, scale, DType::kF32, 16, in.refs.data(), split, oa.data(),
                la.data());
    AttendPages(q.data(), rows, d, scale, DType::kF32, 16, in.refs.data() + split,
                static_cast<int>(in.refs.size()) - split, ob.data(), lb.data());
    MergeStates(oa.data(), la.data(), ob.data(), lb.data(), rows, d);
    std::vector<double> ref_out, ref_lse;
    ReferenceAttention(q.data(), rows, d, in.keys.data(), in.values.data(), in.used, scale,
                       &ref_out, &ref_lse);
    EXPECT_LT(RelativeError(oa.data(), ref_out.data(), oa.size()), 1e-5);
    for (int r = 0; r < rows; ++r) EXPECT_NEAR(la[r], ref_lse[r], 1e-4);
  }
}

TEST(MergeStates, EmptyStatesAreNeutral) {
  const float inf = std::numeric_limits<float>::infinity();
  const int d = 4;
  std::vector<float> a = {1, 2, 3, 4}, la = {0.5f};
  std::vector<float> b = {9, 9, 9, 9}, lb = {-inf};
  MergeStates(a.data(), la.data(), b.data(), lb.data(), 1, d);
  EXPECT_EQ(a, (std::vector<float>{1, 2, 3, 4}));
  EXPECT_EQ(la[0], 0.5f);
  std::vector<float> e = {0, 0, 0, 0}, le = {-inf};
  MergeStates(e.data(), le.data(), a.data(), la.data(), 1, d);
  EXPECT_EQ(e, a);
  EXPECT_EQ(le[0], 0.5f);
  std::vector<float> z = {0, 0, 0, 0}, lz = {-inf};
  MergeStates(z.data(), lz.data(), b.data(), lb.data(), 1, d);
  EXPECT_EQ(lz[0], -inf);
  for (float x : z) EXPECT_FALSE(std::isnan(x));
}

}  // namespace
}  // namespace sqkv
