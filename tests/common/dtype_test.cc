#include "common/dtype.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "tests/testing/testing.h"

namespace sqkv {
namespace {

// Every one of the 65536 half bit patterns converts to float and back unchanged (NaN stays NaN).
TEST(DType, HalfRoundTripsEveryPattern) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = HalfToFloat(static_cast<uint16_t>(b));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f))));
      continue;
    }
    ASSERT_EQ(FloatToHalf(f), b) << "pattern " << b;
  }
}

// The bulk conversion (vectorised where the CPU has F16C) gives what the scalar one gives for
// every pattern, at every position of a vector (the vector loop and its scalar tail).
TEST(DType, BulkHalfConversionEqualsScalar) {
  std::vector<uint16_t> all(65536 + 5);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i * 40503u);
  for (size_t offset : {0, 1, 3}) {
    const size_t n = all.size() - offset;
    std::vector<float> got(n);
    ToFloat(DType::kF16, all.data() + offset, got.data(), n);
    for (size_t i = 0; i < n; ++i) {
      const float want = HalfToFloat(all[offset + i]);
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(got[i])) << "pattern " << all[offset + i];
      } else {
        ASSERT_EQ(std::memcmp(&got[i], &want, 4), 0) << "pattern " << all[offset + i];
      }
    }
  }
}

TEST(DType, HalfKnownValues) {
  EXPECT_EQ(FloatToHalf(1.f), 0x3c00);
  EXPECT_EQ(FloatToHalf(-2.f), 0xc000);
  EXPECT_EQ(FloatToHalf(65504.f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.f), 0x7c00);  // rounds to infinity
  EXPECT_EQ(FloatToHalf(5.960464477539063e-08f), 0x0001);  // smallest subnormal
  EXPECT_EQ(FloatToHalf(1.f + 1.f / 2048), 0x3c00);  // tie → even
  EXPECT_EQ(FloatToHalf(1.f + 3.f / 2048), 0x3c02);  // tie → even (up)
}

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.f), 0x3f80);
  uint32_t bits = 0x3f808000;  // exactly half way between 0x3f80 and 0x3f81
  float f;
  std::memcpy(&f, &bits, 4);
  EXPECT_EQ(FloatToBf16(f), 0x3f80);
  bits = 0x3f818000;
  std::memcpy(&f, &bits, 4);
  EXPECT_EQ(FloatToBf16(f), 0x3f82);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(DType, RoundingErrorIsWithinHalfAnUlp) {
  std::mt19937_64 rng(testing::FreshSeed());
  auto x = testing::RandomNormal(10000, rng, 10.f);
  for (DType t : {DType::kF16, DType::kBF16}) {
    auto y = testing::RoundTrip(t, x);
    const double rel = t == DType::kF16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
    for (size_t i = 0; i < x.size(); ++i) {
      ASSERT_LE(std::abs(y[i] - x[i]), rel * std::abs(x[i]) + 1e-7) << DTypeName(t) << " " << x[i];
    }
  }
}

TEST(DType, ParseNames) {
  EXPECT_EQ(ParseDType("BF16"), DType::kBF16);
  EXPECT_EQ(ParseDType("f16"), DType::kF16);
  EXPECT_EQ(ParseDType("float32"), DType::kF32);
  EXPECT_FALSE(ParseDType("I64").has_value());
}

}  // namespace
}  // namespace sqkv
