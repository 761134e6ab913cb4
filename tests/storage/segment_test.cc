#include "storage/segment.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "storage/file_util.h"
#include "tests/testing/testing.h"

namespace sqkv {
namespace {

SegmentHeader Header() {
  SegmentHeader h;
  h.version = 42;
  h.layers = 2;
  h.kv_heads = 3;
  h.tokens = 100;
  h.head_dim = 64;
  h.page_tokens = 16;
  h.dtype = DType::kBF16;
  h.page_bytes = 2 * 16 * 64 * 2;
  return h;
}

std::vector<uint8_t> RandomBytes(size_t n, std::mt19937_64& rng) {
  std::vector<uint8_t> b(n);
  for (auto& x : b) x = static_cast<uint8_t>(rng());
  return b;
}

TEST(Segment, WriteThenReadBackWithChecksums) {
  testing::ScratchDir dir;
  std::mt19937_64 rng(testing::FreshSeed());
  const SegmentHeader h = Header();
  const std::string path = dir.file("a.seg");
  auto data = RandomBytes(37 * h.page_bytes, rng);
  std::vector<uint64_t> sums(37);
  {
    std::unique_ptr<SegmentWriter> w;
    ASSERT_TRUE(SegmentWriter::Create(path, h, &w).ok());
    ASSERT_TRUE(w->AppendPages(data.data(), 10, sums.data()).ok());
    ASSERT_TRUE(w->AppendPages(data.data() + 10 * h.page_bytes, 27, sums.data() + 10).ok());
    EXPECT_FALSE(std::filesystem::exists(path));  // not published before Finish
    ASSERT_TRUE(w->Finish().ok());
  }
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  std::unique_ptr<SegmentReader> r;
  ASSERT_TRUE(SegmentReader::Open(path, &r).ok());
  EXPECT_EQ(r->header().num_pages, 37u);
  EXPECT_EQ(r->header().version, 42u);
  EXPECT_EQ(r->header().dtype, DType::kBF16);
  std::vector<uint8_t> back(5 * h.page_bytes);
  ASSERT_TRUE(r->ReadPages(11, 5, back.data(), sums.data() + 11).ok());
  EXPECT_TRUE(std::equal(back.begin(), back.end(), data.begin() + 11 * h.page_bytes));
  // Reading past the end is an error, not garbage.
  EXPECT_FALSE(r->ReadPages(35, 5, back.data(), nullptr).ok());
}

TEST(Segment, AbandonedWriterLeavesNothing) {
  testing::ScratchDir dir;
  const std::string path = dir.file("b.seg");
  {
    std::unique_ptr<SegmentWriter> w;
    ASSERT_TRUE(SegmentWriter::Create(path, Header(), &w).ok());
    std::vector<uint8_t> page(Header().page_bytes, 1);
    uint64_t sum;
    ASSERT_TRUE(w->AppendPages(page.data(), 1, &sum).ok());
  }
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

TEST(Segment, FlippedByteIsDetected) {
  testing::ScratchDir dir;
  std::mt19937_64 rng(testing::FreshSeed());
  const SegmentHeader h = Header();
  const std::string path = dir.file("c.seg");
  auto data = RandomBytes(4 * h.page_bytes, rng);
  std::vector<uint64_t> sums(4);
  {
    std::unique_ptr<SegmentWriter> w;
    ASSERT_TRUE(SegmentWriter::Create(path, h, &w).ok());
    ASSERT_TRUE(w->AppendPages(data.data(), 4, sums.data()).ok());
    ASSERT_TRUE(w->Finish().ok());
  }
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(kSegmentHeaderBytes + 2 * h.page_bytes + 17);
    char c = static_cast<char>(data[2 * h.page_bytes + 17] ^ 0x20);
    f.write(&c, 1);
  }
  std::unique_ptr<SegmentReader> r;
  ASSERT_TRUE(SegmentReader::Open(path, &r).ok());
  std::vector<uint8_t> back(4 * h.page_bytes);
  Status s = r->ReadPages(0, 4, back.data(), sums.data());
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("page 2"), std::string::npos) << s.message();
  EXPECT_TRUE(r->ReadPages(0, 2, back.data(), sums.data()).ok());
}

TEST(Segment, DamagedHeaderOrLengthIsCorruption) {
  testing::ScratchDir dir;
  const SegmentHeader h = Header();
  const std::string path = dir.file("d.seg");
  std::vector<uint8_t> page(h.page_bytes, 3);
  uint64_t sum;
  {
    std::unique_ptr<SegmentWriter> w;
    ASSERT_TRUE(SegmentWriter::Create(path, h, &w).ok());
    ASSERT_TRUE(w->AppendPages(page.data(), 1, &sum).ok());
    ASSERT_TRUE(w->Finish().ok());
  }
  std::unique_ptr<SegmentReader> r;
  const uint64_t full = kSegmentHeaderBytes + h.page_bytes;
  std::filesystem::resize_file(path, full - 1);
  Status s = SegmentReader::Open(path, &r);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("header says " + std::to_string(full)), std::string::npos)
      << s.ToString();
  // Back to its length (the page's last byte is not checked at open), then damage the header:
  // only the header checksum can catch that.
  std::filesystem::resize_file(path, full);
  ASSERT_TRUE(SegmentReader::Open(path, &r).ok());
  r.reset();
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(20);
    const char c = static_cast<char>(f.get() ^ 0x40);
    f.seekp(20);
    f.put(c);
  }
  s = SegmentReader::Open(path, &r);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("header checksum"), std::string::npos) << s.ToString();
  EXPECT_TRUE(SegmentReader::Open(dir.file("missing.seg"), &r).IsNotFound());
  // Shorter than the header block: the header read itself ends early.
  std::filesystem::resize_file(path, kSegmentHeaderBytes - 1);
  s = SegmentReader::Open(path, &r);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("is shorter than its header says"), std::string::npos) << s.ToString();
}

// Headers with a valid checksum but impossible sizes: a page size that does not match the page
// shape, and a page count whose bytes overflow 64 bits (which wrapped to a plausible file size and
// passed the length check, then sized buffers by the bogus page size).
TEST(Segment, ImpossibleHeaderSizesAreCorruption) {
  testing::ScratchDir dir;
  const SegmentHeader good = Header();
  const std::string path = dir.file("h.seg");
  std::vector<uint8_t> pages(6 * good.page_bytes, 5);
  uint64_t sums[6];
  {
    std::unique_ptr<SegmentWriter> w;
    ASSERT_TRUE(SegmentWriter::Create(path, good, &w).ok());
    ASSERT_TRUE(w->AppendPages(pages.data(), 6, sums).ok());
    ASSERT_TRUE(w->Finish().ok());
  }
  auto rewrite = [&](const SegmentHeader& h) {
    std::vector<uint8_t> block(kSegmentHeaderBytes);
    EncodeSegmentHeader(h, block.data());
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.write(reinterpret_cast<const char*>(block.data()), static_cast<std::streamsize>(block.size()));
  };
  std::unique_ptr<SegmentReader> r;
  SegmentHeader h = good;
  h.num_pages = 6;
  rewrite(h);
  ASSERT_TRUE(SegmentReader::Open(path, &r).ok());  // the rewrite itself is sound
  r.reset();

  // 6 * (2^63 + 512) wraps to 3,072 = 6 pages of 512 bytes, but 512 is not this shape's page.
  h.page_bytes = (uint64_t{1} << 63) + 512;
  rewrite(h);
  Status s = SegmentReader::Open(path, &r);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("does not match page_tokens 16, head_dim 64"), std::string::npos)
      << s.ToString();

  // The right page size, with a page count whose bytes overflow.
  h.page_bytes = good.page_bytes;
  h.num_pages = (uint64_t{1} << 62) + 6;
  rewrite(h);
  s = SegmentReader::Open(path, &r);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("more than a file can hold"), std::string::npos) << s.ToString();

  // A writer refuses a header whose page size does not match its shape.
  SegmentHeader bad = good;
  bad.page_bytes = 512;
  std::unique_ptr<SegmentWriter> w;
  EXPECT_TRUE(SegmentWriter::Create(dir.file("w.seg"), bad, &w).IsInvalidArgument());
}

}  // namespace
}  // namespace sqkv
