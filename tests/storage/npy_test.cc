#include "storage/npy.h"

#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <future>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "tests/testing/testing.h"

namespace sqkv {
namespace {

using ::sqkv::testing::FreshSeed;
using ::sqkv::testing::RandomNormal;
using ::sqkv::testing::ReadBytes;
using ::sqkv::testing::ScratchDir;
using ::sqkv::testing::WriteBytes;

template <typename T>
std::string AsBytes(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// A .npy file written by hand: magic, version major.0, the header length in 2 (v1) or 4 bytes,
// `dict` followed by '\n', then `data` verbatim.
std::string MakeNpy(const std::string& dict, const std::string& data, int major = 1) {
  const std::string header = dict + "\n";
  std::string s = "\x93NUMPY";
  s += static_cast<char>(major);
  s += '\0';
  const size_t len_bytes = major == 1 ? 2 : 4;
  for (size_t i = 0; i < len_bytes; ++i) s += static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return s + header + data;
}

std::string Dict(const std::string& descr, const std::string& shape, bool fortran = false) {
  return "{'descr': '" + descr + "', 'fortran_order': " + (fortran ? "True" : "False") +
         ", 'shape': " + shape + ", }";
}

// Expects InvalidArgument whose message names the file and holds `part`.
void ExpectInvalid(const Status& st, const std::string& path, const std::string& part) {
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_NE(st.message().find(path), std::string::npos) << st.ToString();
  EXPECT_NE(st.message().find(part), std::string::npos)
      << "missing '" << part << "' in " << st.ToString();
}

TEST(Npy, WriteThenReadKeepsShapeAndValues) {
  std::mt19937_64 rng(FreshSeed());
  ScratchDir dir;
  const std::vector<std::vector<int64_t>> shapes = {{}, {5}, {2, 3}, {2, 3, 4}, {0, 3}, {1, 1, 7}};
  for (const auto& shape : shapes) {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    SCOPED_TRACE(n);
    const std::vector<float> x = RandomNormal(n, rng);
    const std::string path = dir.file("a.npy");
    ASSERT_TRUE(WriteNpy(path, x.data(), shape).ok());
    auto got = ReadNpyAsFloat(path);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_EQ(got->shape, shape);
    EXPECT_EQ(got->data, x);
    EXPECT_EQ(got->source_dtype, "<f4");
  }
}

TEST(Npy, WrittenHeaderIsNumpysV1LayoutWithDataOn64Bytes) {
  std::mt19937_64 rng(FreshSeed());
  ScratchDir dir;
  const std::string path = dir.file("a.npy");
  struct Case {
    std::vector<int64_t> shape;
    std::string shape_text;
  };
  for (const Case& c : std::vector<Case>{{{2, 3}, "(2, 3)"}, {{5}, "(5,)"}, {{}, "()"}}) {
    SCOPED_TRACE(c.shape_text);
    size_t n = 1;
    for (int64_t d : c.shape) n *= static_cast<size_t>(d);
    const std::vector<float> x = RandomNormal(n, rng);
    ASSERT_TRUE(WriteNpy(path, x.data(), c.shape).ok());
    const std::string bytes = ReadBytes(path);
    ASSERT_GE(bytes.size(), 10u);
    EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
    const size_t header_len = static_cast<uint8_t>(bytes[8]) | static_cast<uint8_t>(bytes[9]) << 8;
    EXPECT_EQ((10 + header_len) % 64, 0u);
    ASSERT_EQ(bytes.size(), 10 + header_len + n * 4);
    const std::string header = bytes.substr(10, header_len);
    const std::string dict = Dict("<f4", c.shape_text);
    EXPECT_EQ(header.substr(0, dict.size()), dict);
    EXPECT_EQ(header.back(), '\n');
    EXPECT_EQ(header.find_first_not_of(' ', dict.size()), header_len - 1);
    EXPECT_EQ(bytes.substr(10 + header_len), AsBytes(x));
  }
}

TEST(Npy, WriteInt32IsReadableOnlyAsInts) {
  ScratchDir dir;
  const std::string path = dir.file("i.npy");
  const std::vector<int32_t> x = {7, -1, 0, 123456789, -2147483647 - 1, 42};
  ASSERT_TRUE(WriteNpyInt32(path, x.data(), {3, 2}).ok());
  const std::string bytes = ReadBytes(path);
  const size_t header_len = static_cast<uint8_t>(bytes[8]) | static_cast<uint8_t>(bytes[9]) << 8;
  EXPECT_EQ((10 + header_len) % 64, 0u);
  EXPECT_EQ(bytes.substr(10, Dict("<i4", "(3, 2)").size()), Dict("<i4", "(3, 2)"));
  EXPECT_EQ(bytes.substr(10 + header_len), AsBytes(x));
  ExpectInvalid(ReadNpyAsFloat(path).status(), path, "descr '<i4'");
}

TEST(Npy, WriteRejectsBadShapesAndNullData) {
  ScratchDir dir;
  const std::string path = dir.file("w.npy");
  const float x[4] = {1, 2, 3, 4};
  ExpectInvalid(WriteNpy(path, x, {2, -2}), path, "(2, -2)");
  ExpectInvalid(WriteNpy(path, nullptr, {4}), path, "null");
  ExpectInvalid(WriteNpyInt32(path, nullptr, {1}), path, "null");
  ExpectInvalid(WriteNpy(path, x, std::vector<int64_t>(30000, 1)), path, "v1.0 header");
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_TRUE(WriteNpy(path, nullptr, {0, 4}).ok());  // nothing to read from
}

TEST(Npy, ReadsHalfAndDoubleAndNarrowsToFloat) {
  std::mt19937_64 rng(FreshSeed());
  ScratchDir dir;
  const std::string path = dir.file("x.npy");
  const std::vector<float> x = RandomNormal(24, rng, 3.f);

  std::vector<uint16_t> half(x.size());
  FromFloat(DType::kF16, x.data(), half.data(), x.size());
  WriteBytes(path, MakeNpy(Dict("<f2", "(4, 6)"), AsBytes(half)));
  auto f2 = ReadNpyAsFloat(path);
  ASSERT_TRUE(f2.ok()) << f2.status().ToString();
  EXPECT_EQ(f2->shape, (std::vector<int64_t>{4, 6}));
  EXPECT_EQ(f2->source_dtype, "<f2");
  EXPECT_EQ(f2->data, testing::RoundTrip(DType::kF16, x));

  std::vector<double> wide(x.size());
  std::normal_distribution<double> normal(0.0, 1e3);
  for (double& d : wide) d = normal(rng);
  wide[0] = 1e300;   // beyond float: +inf
  wide[1] = -1e300;  // -inf
  wide[2] = 1e-300;  // below float: 0
  WriteBytes(path, MakeNpy(Dict("<f8", "(24,)"), AsBytes(wide)));
  auto f8 = ReadNpyAsFloat(path);
  ASSERT_TRUE(f8.ok()) << f8.status().ToString();
  ASSERT_EQ(f8->data.size(), wide.size());
  EXPECT_EQ(f8->data[0], std::numeric_limits<float>::infinity());
  EXPECT_EQ(f8->data[1], -std::numeric_limits<float>::infinity());
  EXPECT_EQ(f8->data[2], 0.f);
  for (size_t i = 3; i < wide.size(); ++i) EXPECT_EQ(f8->data[i], static_cast<float>(wide[i]));
}

TEST(Npy, AcceptsEveryHeaderSpellingNumpyCanRead) {
  std::mt19937_64 rng(FreshSeed());
  ScratchDir dir;
  const std::string path = dir.file("v.npy");
  const std::vector<float> x = RandomNormal(6, rng);
  struct Case {
    std::string dict;
    int major;
  };
  const std::vector<Case> cases = {
      {Dict("<f4", "(2, 3)"), 2},
      {Dict("<f4", "(2, 3)"), 3},
      {Dict("=f4", "(2, 3)"), 1},
      {Dict("|f4", "(2, 3)"), 1},
      {R"({"descr": "<f4", "fortran_order": False, "shape": (2, 3)})", 1},
      {"{'shape': (2,3), 'fortran_order': False, 'descr': '<f4'}", 1},
      {"{ 'descr' : '<f4' ,\t'fortran_order' : False , 'shape' : ( 2 , 3 , ) , }    ", 1},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.dict);
    WriteBytes(path, MakeNpy(c.dict, AsBytes(x), c.major));
    auto got = ReadNpyAsFloat(path);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_EQ(got->shape, (std::vector<int64_t>{2, 3}));
    EXPECT_EQ(got->data, x);
  }
}

TEST(Npy, RejectsWhatItCannotReadNamingTheFile) {
  ScratchDir dir;
  const std::string path = dir.file("bad.npy");
  const std::string data(24, '\x01');  // six float32
  struct Case {
    std::string dict;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {Dict(">f4", "(6,)"), "big-endian descr '>f4'"},
      {Dict("<f4", "(2, 3)", /*fortran=*/true), "fortran_order True"},
      {Dict("|O", "(3,)"), "descr '|O'"},
      {Dict("<i4", "(6,)"), "descr '<i4'"},
      {Dict("<i8", "(3,)"), "descr '<i8'"},
      {Dict("<c8", "(3,)"), "descr '<c8'"},
      {Dict("<f16", "(1,)"), "descr '<f16'"},
      {Dict("f4", "(6,)"), "descr 'f4'"},
      {"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (6,)}", "structured"},
      {"{'descr': '<f4', 'shape': (6,)}", "lacks"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'extra': 1}",
       "unknown key 'extra'"},
      {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (6,)}", "repeated key"},
      {Dict("<f4", "(6)"), "lacks its comma"},
      {Dict("<f4", "(2, -3)"), "negative"},
      {Dict("<f4", "(2,, 3)"), "not an integer"},
      {Dict("<f4", "(2.0, 3)"), "expected ')'"},
      {Dict("<f4", "[2, 3]"), "expected '('"},
      {Dict("<f4", "(99999999999999999999,)"), "too large"},
      {Dict("<f4", "(4294967296, 4294967296, 4294967296)"), "too many elements"},
      {"{'descr': '<f4', 'fortran_order': false, 'shape': (6,)}", "True or False"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (6,)", "expected '}'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (6,)} x", "after the closing brace"},
      {"{'descr': '<f4, 'fortran_order': False, 'shape': (6,)}", "malformed header"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (6,)}}", "after the closing brace"},
      {"", "expected '{'"},
      {Dict("<f4", "(7,)"),
       "truncated: shape (7,) of '<f4' needs 28 data bytes but the file holds 24"},
      {Dict("<f4", "(5,)"), "4 unexpected bytes after the data"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.dict);
    WriteBytes(path, MakeNpy(c.dict, data));
    ExpectInvalid(ReadNpyAsFloat(path).status(), path, c.expect);
  }
}

TEST(Npy, RejectsBadPreambles) {
  ScratchDir dir;
  const std::string path = dir.file("pre.npy");
  const std::string good = MakeNpy(Dict("<f4", "(1,)"), std::string(4, '\0'));
  std::string bad_magic = good;
  bad_magic[1] = 'M';
  WriteBytes(path, bad_magic);
  ExpectInvalid(ReadNpyAsFloat(path).status(), path, "bad magic");
  for (const auto& [major, minor] : std::vector<std::pair<int, int>>{{0, 0}, {4, 0}, {1, 1}}) {
    std::string v = good;
    v[6] = static_cast<char>(major);
    v[7] = static_cast<char>(minor);
    WriteBytes(path, v);
    ExpectInvalid(ReadNpyAsFloat(path).status(), path, "unsupported .npy version");
  }
  std::string long_header = good;
  long_header[8] = '\xff';
  WriteBytes(path, long_header);
  ExpectInvalid(ReadNpyAsFloat(path).status(), path, "runs past the end");

  auto missing = ReadNpyAsFloat(dir.file("missing.npy"));
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(missing.status().IsNotFound()) << missing.status().ToString();
  ExpectInvalid(ReadNpyAsFloat(dir.path().string()).status(), dir.path().string(),
                "not a regular file");
}

// A file whose size disagrees with its header is refused from the header and the file's size
// alone: a sparse terabyte costs nothing to reject.
TEST(Npy, HugeOrMismatchedFilesFailBeforeAnyLargeAllocation) {
  ScratchDir dir;
  const std::string path = dir.file("huge.npy");
  constexpr off_t kTiB = off_t{1} << 40;
  const std::string small = MakeNpy(Dict("<f4", "(6,)"), std::string(24, '\x01'));
  WriteBytes(path, small);
  ASSERT_EQ(::truncate(path.c_str(), kTiB), 0);
  ExpectInvalid(ReadNpyAsFloat(path).status(), path,
                std::to_string(kTiB - small.size()) + " unexpected bytes after the data");

  // The header claims far more data than the file holds.
  WriteBytes(path, MakeNpy(Dict("<f4", "(68719476736,)"), std::string(24, '\x01')));
  ExpectInvalid(ReadNpyAsFloat(path).status(), path,
                "needs 274877906944 data bytes but the file holds 24");
  WriteBytes(path, MakeNpy(Dict("<f8", "(2, 3)"), std::string(24, '\x01')));
  ExpectInvalid(ReadNpyAsFloat(path).status(), path, "needs 48 data bytes but the file holds 24");

  // A v2 header length of 4 GiB in a file that is (sparsely) long enough to hold it.
  std::string v2 = MakeNpy(Dict("<f4", "(1,)"), std::string(4, '\0'), /*major=*/2);
  for (int i = 8; i < 12; ++i) v2[i] = '\xff';
  WriteBytes(path, v2);
  ASSERT_EQ(::truncate(path.c_str(), kTiB), 0);
  ExpectInvalid(ReadNpyAsFloat(path).status(), path, "header length 4294967295 exceeds the limit");
}

// float16 and float64 data go through a staging buffer in chunks: a file of several chunks
// (with a partial last one) reads back every element.
TEST(Npy, ReadsDataLongerThanOneStagingChunk) {
  std::mt19937_64 rng(FreshSeed());
  ScratchDir dir;
  const std::string path = dir.file("long.npy");
  const size_t n = 3 * (size_t{1} << 17) + 12345;  // 1 MiB chunks of float64: 3 full + a part
  const std::vector<float> x = RandomNormal(n, rng);
  std::vector<double> wide(x.begin(), x.end());
  WriteBytes(path, MakeNpy(Dict("<f8", "(" + std::to_string(n) + ",)"), AsBytes(wide)));
  auto f8 = ReadNpyAsFloat(path);
  ASSERT_TRUE(f8.ok()) << f8.status().ToString();
  EXPECT_EQ(f8->data, x);
  std::vector<uint16_t> half(n);
  FromFloat(DType::kF16, x.data(), half.data(), n);
  WriteBytes(path, MakeNpy(Dict("<f2", "(" + std::to_string(n) + ",)"), AsBytes(half)));
  auto f2 = ReadNpyAsFloat(path);
  ASSERT_TRUE(f2.ok()) << f2.status().ToString();
  EXPECT_EQ(f2->data, testing::RoundTrip(DType::kF16, x));
}

TEST(Npy, AFifoIsRefusedWithoutBlocking) {
  ScratchDir dir;
  const std::string fifo = dir.file("f.npy");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto read = std::async(std::launch::async, [&] { return ReadNpyAsFloat(fifo).status(); });
  if (read.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    const int w = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);  // unblock it so the test ends
    read.wait();
    if (w >= 0) ::close(w);
    FAIL() << "ReadNpyAsFloat blocked on a FIFO";
  }
  ExpectInvalid(read.get(), fifo, "not a regular file");
}

TEST(Npy, EveryTruncationFailsCleanly) {
  std::mt19937_64 rng(FreshSeed());
  ScratchDir dir;
  const std::string full_path = dir.file("full.npy");
  const std::string path = dir.file("cut.npy");
  for (int major : {1, 2}) {
    SCOPED_TRACE(major);
    const std::vector<float> x = RandomNormal(12, rng);
    std::string full;
    if (major == 1) {
      ASSERT_TRUE(WriteNpy(full_path, x.data(), {3, 4}).ok());
      full = ReadBytes(full_path);
    } else {
      full = MakeNpy(Dict("<f4", "(3, 4)"), AsBytes(x), major);
    }
    for (size_t n = 0; n < full.size(); ++n) {
      SCOPED_TRACE(n);
      WriteBytes(path, full.substr(0, n));
      ExpectInvalid(ReadNpyAsFloat(path).status(), path, "");
    }
  }
}

}  // namespace
}  // namespace sqkv
