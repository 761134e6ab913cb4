#include "index/serialize.h"

#include <gtest/gtest.h>
#include <xxhash.h>

#include <bit>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "index/build.h"
#include "tests/testing/synthetic_index.h"
#include "tests/testing/testing.h"

namespace sqkv {
namespace {

using testing::FreshSeed;
using testing::RandomNormal;
using testing::SyntheticIndex;

// Layout facts of the format (index/serialize.h), restated for the tests.
constexpr size_t kHeaderBytes = 24;   // magic, version, flags-or-count, body_bytes
constexpr size_t kChecksumBytes = 8;  // XXH3-64 of everything before it

// Bit patterns of floats, so that the comparison is exact (and NaN-proof).
std::vector<uint32_t> Bits(const std::vector<float>& v) {
  std::vector<uint32_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = std::bit_cast<uint32_t>(v[i]);
  return b;
}

void ExpectSameIndex(const HeadIndex& a, const HeadIndex& b) {
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.page_tokens, b.page_tokens);
  EXPECT_EQ(Bits(a.centroids), Bits(b.centroids));
  EXPECT_EQ(a.cluster_size, b.cluster_size);
  EXPECT_EQ(a.cluster_page_begin, b.cluster_page_begin);
  EXPECT_EQ(a.positions, b.positions);
  EXPECT_EQ(Bits(a.l1_centroids), Bits(b.l1_centroids));
  EXPECT_EQ(a.l1_size, b.l1_size);
  EXPECT_EQ(a.l1_child_begin, b.l1_child_begin);
}

// Rewrites the trailing checksum so that the blob passes the frame check.
void Reseal(std::string* blob) {
  const size_t n = blob->size() - kChecksumBytes;
  const uint64_t h = XXH3_64bits(blob->data(), n);
  for (size_t i = 0; i < kChecksumBytes; ++i) (*blob)[n + i] = static_cast<char>(h >> (8 * i));
}

HeadIndex Built(std::mt19937_64& rng, int tokens, int d, int levels) {
  const std::vector<float> keys = RandomNormal(static_cast<size_t>(tokens) * d, rng);
  IndexParams p;
  p.levels = levels;
  p.page_tokens = 4;
  p.centroid_fraction = 0.1f;
  p.l1_fraction = 0.05f;
  HeadIndex x;
  EXPECT_TRUE(BuildHeadIndex(keys.data(), tokens, d, p, &x).ok());
  return x;
}

TEST(SerializeHeadIndex, RoundTrip) {
  std::mt19937_64 rng(FreshSeed());
  for (int levels : {1, 2}) {
    const HeadIndex x = Built(rng, 900, 32, levels);
    const std::string blob = EncodeHeadIndex(x);
    HeadIndex y;
    ASSERT_TRUE(DecodeHeadIndex(blob, &y).ok());
    ExpectSameIndex(x, y);
    EXPECT_EQ(EncodeHeadIndex(y), blob);
  }
}

TEST(SerializeLayerIndex, RoundTrip) {
  std::mt19937_64 rng(FreshSeed());
  const std::vector<HeadIndex> heads = {Built(rng, 300, 16, 1), Built(rng, 300, 16, 2),
                                        SyntheticIndex(rng, 20, 16, 8, 9, 3)};
  std::vector<HeadIndex> got;
  ASSERT_TRUE(DecodeLayerIndex(EncodeLayerIndex(heads), &got).ok());
  ASSERT_EQ(got.size(), heads.size());
  for (size_t h = 0; h < heads.size(); ++h) ExpectSameIndex(heads[h], got[h]);
  ASSERT_TRUE(DecodeLayerIndex(EncodeLayerIndex({}), &got).ok());
  EXPECT_TRUE(got.empty());
}

// Every proper prefix and every single-bit flip must be refused as Corruption, with *out kept.
void ExpectEveryDamageRefused(const std::string& blob, bool layer) {
  auto decode = [&](std::string_view b) {
    if (layer) {
      std::vector<HeadIndex> heads(1);
      const Status s = DecodeLayerIndex(b, &heads);
      EXPECT_EQ(heads.size(), 1u);
      return s;
    }
    HeadIndex x;
    x.tokens = -7;
    const Status s = DecodeHeadIndex(b, &x);
    EXPECT_EQ(x.tokens, -7);
    return s;
  };
  for (size_t n = 0; n < blob.size(); ++n) {
    const Status s = decode(std::string_view(blob).substr(0, n));
    ASSERT_TRUE(s.IsCorruption()) << "prefix " << n << ": " << s.ToString();
  }
  std::string bad = blob;
  for (size_t bit = 0; bit < 8 * blob.size(); ++bit) {
    bad[bit / 8] ^= static_cast<char>(1 << (bit % 8));
    const Status s = decode(bad);
    ASSERT_TRUE(s.IsCorruption()) << "bit " << bit << ": " << s.ToString();
    bad[bit / 8] = blob[bit / 8];
  }
  std::string longer = blob + '\0';
  EXPECT_TRUE(decode(longer).IsCorruption());
}

TEST(SerializeHeadIndex, EveryTruncationAndBitFlipIsCorruption) {
  std::mt19937_64 rng(FreshSeed());
  ExpectEveryDamageRefused(EncodeHeadIndex(Built(rng, 40, 4, 1)), false);
  ExpectEveryDamageRefused(EncodeHeadIndex(SyntheticIndex(rng, 6, 3, 4, 7, 2)), false);
}

TEST(SerializeLayerIndex, EveryTruncationAndBitFlipIsCorruption) {
  std::mt19937_64 rng(FreshSeed());
  ExpectEveryDamageRefused(
      EncodeLayerIndex({SyntheticIndex(rng, 5, 4, 4, 6), SyntheticIndex(rng, 6, 4, 2, 5, 2)}),
      true);
}

TEST(SerializeHeadIndex, WrongKindOfBlobIsCorruption) {
  std::mt19937_64 rng(FreshSeed());
  const HeadIndex x = SyntheticIndex(rng, 5, 4, 4, 6);
  HeadIndex y;
  std::vector<HeadIndex> heads;
  EXPECT_TRUE(DecodeHeadIndex(EncodeLayerIndex({x}), &y).IsCorruption());
  EXPECT_TRUE(DecodeLayerIndex(EncodeHeadIndex(x), &heads).IsCorruption());
  EXPECT_TRUE(DecodeHeadIndex(std::string(100, '\xff'), &y).IsCorruption());
}

// A NaN or infinite centroid (level 1 or 2) would make every score of its head NaN: the
// structure checks refuse it even when the blob's checksum is right.
TEST(SerializeHeadIndex, NonFiniteCentroidIsCorruption) {
  std::mt19937_64 rng(FreshSeed());
  const HeadIndex x = Built(rng, 900, 32, 2);
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    for (bool level1 : {false, true}) {
      HeadIndex y = x;
      (level1 ? y.l1_centroids : y.centroids)[37] = bad;
      EXPECT_FALSE(ValidateHeadIndex(y).ok());
      HeadIndex z;
      const Status s = DecodeHeadIndex(EncodeHeadIndex(y), &z);
      EXPECT_TRUE(s.IsCorruption()) << s.ToString();
      EXPECT_NE(s.message().find("not finite"), std::string::npos) << s.ToString();
    }
  }
}

// Damage that keeps the frame valid (checksum recomputed): the structure checks alone must
// refuse it, never crash or allocate beyond the blob. Lengths, counts and values are hit.
TEST(SerializeHeadIndex, ResealedGarbageNeverCrashes) {
  std::mt19937_64 rng(FreshSeed());
  const std::string blob = EncodeHeadIndex(SyntheticIndex(rng, 12, 4, 4, 9, 3));
  std::uniform_int_distribution<size_t> where(kHeaderBytes, blob.size() - kChecksumBytes - 1);
  std::uniform_int_distribution<int> byte(0, 255), count(1, 4);
  int accepted = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::string bad = blob;
    for (int k = count(rng); k > 0; --k) bad[where(rng)] = static_cast<char>(byte(rng));
    Reseal(&bad);
    HeadIndex y;
    const Status s = DecodeHeadIndex(bad, &y);
    if (s.ok()) {
      ++accepted;  // e.g. a changed (finite) centroid value: still a valid index
      EXPECT_TRUE(ValidateHeadIndex(y).ok());
    } else {
      EXPECT_TRUE(s.IsCorruption()) << s.ToString();
    }
  }
  std::printf("[note] %d of 3000 resealed mutations decoded to a valid index\n", accepted);
  // Huge element counts (u64 max and just past the blob) in every array-length slot.
  for (uint64_t n :
       {std::numeric_limits<uint64_t>::max(), uint64_t{1} << 62, uint64_t{blob.size()}}) {
    for (size_t at = kHeaderBytes + 16; at + 8 <= blob.size() - kChecksumBytes; at += 4) {
      std::string bad = blob;
      for (int i = 0; i < 8; ++i) bad[at + i] = static_cast<char>(n >> (8 * i));
      Reseal(&bad);
      HeadIndex y;
      const Status s = DecodeHeadIndex(bad, &y);
      // Most slots are array counts; the rest hit values, which may still form a valid index.
      if (s.ok()) {
        EXPECT_TRUE(ValidateHeadIndex(y).ok());
      } else {
        EXPECT_TRUE(s.IsCorruption()) << s.ToString();
      }
      if (at == kHeaderBytes + 16) {
        EXPECT_TRUE(s.IsCorruption()) << "first array count " << n;
      }
    }
  }
}

}  // namespace
}  // namespace sqkv
