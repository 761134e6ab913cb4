#include "storage/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "tests/testing/testing.h"

namespace sqkv {
namespace {

using ::sqkv::testing::FreshSeed;
using ::sqkv::testing::RandomNormal;
using ::sqkv::testing::ReadBytes;
using ::sqkv::testing::ScratchDir;
using ::sqkv::testing::WriteBytes;

std::string LengthPrefix(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A file: the length of `header`, `header` itself, then `data_bytes` bytes of a running pattern.
std::string RawFile(const std::string& header, size_t data_bytes) {
  std::string s = LengthPrefix(header.size()) + header;
  for (size_t i = 0; i < data_bytes; ++i) s += static_cast<char>(i * 7 + 1);
  return s;
}

// Expects InvalidArgument whose message names the file and holds every one of `parts`.
void ExpectInvalid(const Status& st, const std::string& path,
                   const std::vector<std::string>& parts) {
  ASSERT_FALSE(st.ok());
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_NE(st.message().find(path), std::string::npos) << st.ToString();
  for (const std::string& p : parts) {
    EXPECT_NE(st.message().find(p), std::string::npos)
        << "missing '" << p << "' in " << st.ToString();
  }
}

template <typename T>
void ExpectInvalid(const Result<T>& r, const std::string& path,
                   const std::vector<std::string>& parts) {
  ExpectInvalid(r.status(), path, parts);
}

// Random tensor bytes of `dtype` and the float values they hold.
struct Sample {
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
  std::vector<float> values;
};

Sample MakeSample(DType dtype, std::vector<int64_t> shape, std::mt19937_64& rng) {
  Sample s{std::move(shape), {}, {}};
  size_t n = 1;
  for (int64_t d : s.shape) n *= static_cast<size_t>(d);
  if (n == 0) return s;  // FromFloat memcpys even for n == 0: keep null pointers away from it
  std::vector<float> x = RandomNormal(n, rng);
  s.bytes.resize(n * DTypeSize(dtype));
  FromFloat(dtype, x.data(), s.bytes.data(), n);
  s.values = testing::RoundTrip(dtype, x);
  return s;
}

class SafetensorsRoundTrip : public ::testing::TestWithParam<DType> {};

TEST_P(SafetensorsRoundTrip, KeepsEveryTensorAndTheMetadata) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(FreshSeed());
  std::uniform_int_distribution<int64_t> dim(1, 9);
  ScratchDir dir;
  const std::string path = dir.file("kv.safetensors");

  std::map<std::string, Sample> samples;
  samples["v.0"] = MakeSample(dtype, {dim(rng), dim(rng), dim(rng)}, rng);  // (heads, tokens, d)
  samples["k.0"] = MakeSample(dtype, {dim(rng), dim(rng), dim(rng)}, rng);
  samples["scale"] = MakeSample(dtype, {}, rng);
  samples["empty"] = MakeSample(dtype, {0, dim(rng)}, rng);
  samples["k.10"] = MakeSample(dtype, {dim(rng)}, rng);
  SafetensorsWriter writer;
  for (const auto& [name, s] : samples) writer.Add(name, dtype, s.shape, s.bytes.data());
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"model", "tiny ∑"}};
  writer.SetMetadata(metadata);
  ASSERT_TRUE(writer.Write(path).ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  EXPECT_EQ((*file)->path(), path);
  EXPECT_EQ((*file)->metadata(), metadata);
  ASSERT_EQ((*file)->tensors().size(), samples.size());
  auto expected = samples.begin();
  for (const TensorInfo& t : (*file)->tensors()) {  // sorted by name, like the map
    EXPECT_EQ(t.name, expected->first);
    ++expected;
  }
  for (const auto& [name, s] : samples) {
    SCOPED_TRACE(name);
    const TensorInfo* t = (*file)->Find(name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dtype, dtype);
    EXPECT_EQ(t->shape, s.shape);
    EXPECT_EQ(t->nbytes(), s.bytes.size());
    EXPECT_EQ(t->data_end - t->data_begin, s.bytes.size());
    std::vector<uint8_t> bytes(t->nbytes());
    ASSERT_TRUE((*file)->Read(*t, bytes.data()).ok());
    EXPECT_EQ(bytes, s.bytes);
    std::vector<float> got(t->num_elements());
    ASSERT_TRUE((*file)->ReadFloat(*t, got.data()).ok());
    EXPECT_EQ(got, s.values);
  }
  EXPECT_EQ((*file)->Find("k.1"), nullptr);
  EXPECT_EQ((*file)->Find(""), nullptr);
  EXPECT_EQ((*file)->Find("zzz"), nullptr);
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, SafetensorsRoundTrip,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

TEST(SafetensorsWriter, LaysTensorsOutContiguouslyInAddOrderAfterAPaddedHeader) {
  std::mt19937_64 rng(FreshSeed());
  ScratchDir dir;
  const std::string path = dir.file("layout.safetensors");
  Sample b = MakeSample(DType::kF16, {3, 5}, rng);
  Sample a = MakeSample(DType::kF32, {7}, rng);
  SafetensorsWriter writer;
  writer.Add("b", DType::kF16, b.shape, b.bytes.data());
  writer.Add("a", DType::kF32, a.shape, a.bytes.data(), a.bytes.size());
  ASSERT_TRUE(writer.Write(path).ok());

  const std::string bytes = ReadBytes(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  EXPECT_EQ(header_len % 8, 0u);
  ASSERT_EQ(bytes.size(), 8 + header_len + b.bytes.size() + a.bytes.size());
  const std::string header = bytes.substr(8, header_len);
  EXPECT_EQ(header.front(), '{');
  EXPECT_EQ(header.find_first_not_of(' ', header.rfind('}') + 1), std::string::npos);
  const auto json = nlohmann::json::parse(header);
  EXPECT_FALSE(json.contains("__metadata__"));
  EXPECT_EQ(json["b"]["dtype"], "F16");
  EXPECT_EQ(json["b"]["data_offsets"], nlohmann::json({0, 30}));
  EXPECT_EQ(json["a"]["data_offsets"], nlohmann::json({30, 58}));
  EXPECT_EQ(std::memcmp(bytes.data() + 8 + header_len, b.bytes.data(), 30), 0);
  EXPECT_EQ(std::memcmp(bytes.data() + 8 + header_len + 30, a.bytes.data(), 28), 0);
  // Nothing but the file itself is left in the directory.
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path()),
                          std::filesystem::directory_iterator()),
            1);
}

TEST(SafetensorsWriter, ReplacesAnExistingFile) {
  std::mt19937_64 rng(FreshSeed());
  ScratchDir dir;
  const std::string path = dir.file("x.safetensors");
  WriteBytes(path, "old contents");
  Sample s = MakeSample(DType::kBF16, {4, 2}, rng);
  SafetensorsWriter writer;
  writer.Add("x", DType::kBF16, s.shape, s.bytes.data());
  ASSERT_TRUE(writer.Write(path).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  EXPECT_EQ((*file)->tensors().size(), 1u);
}

TEST(SafetensorsWriter, RejectsBadTensorsAndLeavesThePathAlone) {
  ScratchDir dir;
  const std::string path = dir.file("bad.safetensors");
  WriteBytes(path, "keep me");
  const std::vector<uint8_t> buf(64, 1);
  struct Case {
    std::string label;
    std::function<void(SafetensorsWriter&)> add;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"duplicate",
       [&](SafetensorsWriter& w) {
         w.Add("k", DType::kF32, {2}, buf.data());
         w.Add("k", DType::kF32, {2}, buf.data());
       },
       "tensor k is added twice"},
      {"size mismatch",
       [&](SafetensorsWriter& w) {
         w.Add("k", DType::kF16, {2, 3}, buf.data(), 10);
       },
       "tensor k: 10 bytes of data but shape (2, 3) of F16 needs 12"},
      {"negative dim",
       [&](SafetensorsWriter& w) {
         w.Add("k", DType::kF32, {2, -1}, buf.data());
       },
       "tensor k: shape (2, -1)"},
      {"null data", [&](SafetensorsWriter& w) { w.Add("k", DType::kF32, {2}, nullptr); },
       "tensor k: 8 bytes of null data"},
      {"reserved",
       [&](SafetensorsWriter& w) { w.Add("__metadata__", DType::kF32, {1}, buf.data()); },
       "__metadata__ is reserved"},
      {"empty name", [&](SafetensorsWriter& w) { w.Add("", DType::kF32, {1}, buf.data()); },
       "empty name"},
      {"bad utf-8 name",
       [&](SafetensorsWriter& w) { w.Add("k\xff", DType::kF32, {1}, buf.data()); }, "header"},
      {"bad utf-8 metadata",
       [&](SafetensorsWriter& w) {
         w.Add("k", DType::kF32, {1}, buf.data());
         w.SetMetadata({{"a", "\xc3"}});
       },
       "header"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.label);
    SafetensorsWriter writer;
    c.add(writer);
    ExpectInvalid(writer.Write(path), path, {c.expect});
    EXPECT_EQ(ReadBytes(path), "keep me");
  }
}

TEST(SafetensorsFile, MissingFileIsNotFoundAndADirectoryIsRejected) {
  ScratchDir dir;
  auto missing = SafetensorsFile::Open(dir.file("nope.safetensors"));
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(missing.status().IsNotFound()) << missing.status().ToString();
  ExpectInvalid(SafetensorsFile::Open(dir.path().string()), dir.path().string(),
                {"not a regular file"});
}

TEST(SafetensorsFile, AcceptsAnEmptyHeaderGapsAndAnUnpaddedHeader) {
  ScratchDir dir;
  const std::string path = dir.file("ok.safetensors");
  WriteBytes(path, RawFile("{}", 0));
  auto empty = SafetensorsFile::Open(path);
  ASSERT_TRUE(empty.ok()) << empty.status().ToString();
  EXPECT_TRUE((*empty)->tensors().empty());

  // 5-byte header (unpadded), a gap before "a", an empty tensor inside "a"'s bytes, spare bytes.
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},)"
                             R"("z":{"dtype":"BF16","shape":[0,3],"data_offsets":[8,8]}})";
  WriteBytes(path, RawFile(header, 20));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  const TensorInfo* a = (*file)->Find("a");
  ASSERT_NE(a, nullptr);
  uint8_t a_bytes[8];
  ASSERT_TRUE((*file)->Read(*a, a_bytes).ok());
  EXPECT_EQ(a_bytes[0], static_cast<uint8_t>(4 * 7 + 1));
  EXPECT_EQ((*file)->Find("z")->num_elements(), 0u);

  // Brackets and escaped quotes inside names do not count as nesting.
  const std::string odd_name = std::string(40, '[') + "\"{{";
  WriteBytes(path, RawFile(R"({")" + std::string(40, '[') + R"(\"{{":)" +
                               R"({"dtype":"F16","shape":[],"data_offsets":[0,2]}})",
                           2));
  auto odd = SafetensorsFile::Open(path);
  ASSERT_TRUE(odd.ok()) << odd.status().ToString();
  EXPECT_NE((*odd)->Find(odd_name), nullptr);
}

struct Malformed {
  std::string label;
  std::string header;
  size_t data_bytes;
  std::vector<std::string> expect;  // substrings of the message
};

std::string Entry(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return R"({"dtype":)" + dtype + R"(,"shape":)" + shape + R"(,"data_offsets":)" + offsets + "}";
}

TEST(SafetensorsFile, RejectsEveryMalformedHeaderNamingTheTensor) {
  const std::string good = Entry(R"("F32")", "[2]", "[0,8]");
  const std::vector<Malformed> cases = {
      {"not json", R"({"k.1": )", 8, {"not valid JSON"}},
      {"invalid utf-8", "{\"k\xff\": " + good + "}", 8, {"not valid JSON"}},
      {"trailing garbage", R"({"k.1":)" + good + "}xyz", 8, {"not valid JSON"}},
      {"two objects", R"({"k.1":)" + good + "}{}", 8, {"not valid JSON"}},
      {"nul padding", R"({"k.1":)" + good + "}" + std::string(3, '\0'), 8, {"not valid JSON"}},
      {"nul then garbage",
       R"({"k.1":)" + good + "}" + std::string(1, '\0') + "xyz",
       8,
       {"NUL byte"}},
      {"array", "[1, 2]", 8, {"header is an array, not an object"}},
      {"duplicate tensor",
       R"({"k.1":)" + good + R"(,"k.1":)" + good + "}",
       8,
       {"tensor k.1 appears twice"}},
      {"duplicate tensor, spelt with an escape",
       R"({"k.1":)" + good + R"(,"k\u002e1":)" + good + "}",
       8,
       {"tensor k.1 appears twice"}},
      {"duplicate entry key",
       R"({"k.1":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
       8,
       {"tensor k.1: entry repeats the key \"dtype\""}},
      {"entry not object", R"({"k.1": 5})", 8, {"tensor k.1: entry is a number"}},
      {"missing key", R"({"k.1":{"dtype":"F32","shape":[2]}})", 8, {"tensor k.1", "exactly"}},
      {"extra key",
       R"({"k.1":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})",
       8,
       {"tensor k.1", "exactly"}},
      {"many extra keys (the error lists a few)",
       [] {
         std::string h = R"({"k.1":{"dtype":"F32","shape":[2],"data_offsets":[0,8])";
         for (int i = 0; i < 5000; ++i) h += ",\"x" + std::to_string(i) + "\":1";
         return h + "}}";
       }(),
       8,
       {"tensor k.1", "exactly", "... (5003 keys)"}},
      {"name too long",
       "{\"" + std::string(1025, 'n') + "\":" + good + "}",
       8,
       {"has 1025 bytes, more than 1024"}},
      {"rank too high",
       [] {
         std::string dims = "[1";
         for (int i = 1; i < 65; ++i) dims += ",1";
         return R"({"k.1":)" + Entry(R"("F32")", dims + "]", "[0,4]") + "}";
       }(),
       4,
       {"tensor k.1", "shape has 65 dims, more than 64"}},
      {"I64",
       R"({"k.1":)" + Entry(R"("I64")", "[1]", "[0,8]") + "}",
       8,
       {"tensor k.1", "dtype I64 is not supported"}},
      {"F64",
       R"({"k.1":)" + Entry(R"("F64")", "[1]", "[0,8]") + "}",
       8,
       {"tensor k.1", "dtype F64"}},
      {"alias",
       R"({"k.1":)" + Entry(R"("float32")", "[2]", "[0,8]") + "}",
       8,
       {"tensor k.1", "float32"}},
      {"dtype number",
       R"({"k.1":)" + Entry("3", "[2]", "[0,8]") + "}",
       8,
       {"tensor k.1", "dtype 3 is not a string"}},
      {"negative dim",
       R"({"k.1":)" + Entry(R"("F32")", "[2,-1]", "[0,8]") + "}",
       8,
       {"tensor k.1", "dim 1 is -1"}},
      {"fractional dim",
       R"({"k.1":)" + Entry(R"("F32")", "[2.5]", "[0,8]") + "}",
       8,
       {"tensor k.1", "dim 0 is 2.5"}},
      {"float dim",
       R"({"k.1":)" + Entry(R"("F32")", "[2.0]", "[0,8]") + "}",
       8,
       {"tensor k.1", "dim 0"}},
      {"string dim",
       R"({"k.1":)" + Entry(R"("F32")", R"(["2"])", "[0,8]") + "}",
       8,
       {"tensor k.1", "dim 0"}},
      {"nested dim",
       R"({"k.1":)" + Entry(R"("F32")", "[[2]]", "[0,8]") + "}",
       8,
       {"tensor k.1", "dim 0"}},
      {"shape not array",
       R"({"k.1":)" + Entry(R"("F32")", "2", "[0,8]") + "}",
       8,
       {"tensor k.1", "shape 2 is not an array"}},
      {"huge dim",
       R"({"k.1":)" + Entry(R"("F32")", "[18446744073709551615]", "[0,8]") + "}",
       8,
       {"tensor k.1", "dim 0"}},
      {"overflowing shape",
       R"({"k.1":)" + Entry(R"("F32")", "[4294967296,4294967296,16]", "[0,8]") + "}",
       8,
       {"tensor k.1", "too many elements"}},
      {"three offsets",
       R"({"k.1":)" + Entry(R"("F32")", "[2]", "[0,8,8]") + "}",
       8,
       {"tensor k.1", "data_offsets"}},
      {"one offset",
       R"({"k.1":)" + Entry(R"("F32")", "[2]", "[8]") + "}",
       8,
       {"tensor k.1", "data_offsets"}},
      {"negative offset",
       R"({"k.1":)" + Entry(R"("F32")", "[2]", "[-8,0]") + "}",
       8,
       {"tensor k.1", "data_offsets"}},
      {"float offset",
       R"({"k.1":)" + Entry(R"("F32")", "[2]", "[0,8.0]") + "}",
       8,
       {"tensor k.1", "data_offsets"}},
      {"offsets not array",
       R"({"k.1":)" + Entry(R"("F32")", "[2]", R"("0-8")") + "}",
       8,
       {"tensor k.1", "data_offsets"}},
      {"decreasing",
       R"({"k.1":)" + Entry(R"("F32")", "[0]", "[8,0]") + "}",
       8,
       {"tensor k.1", "data_offsets [8,0] decrease"}},
      {"size mismatch",
       R"({"k.3":)" + Entry(R"("F16")", "[2,4,8]", "[0,100]") + "}",
       128,
       {"tensor k.3: data_offsets [0, 100) hold 100 bytes but shape (2, 4, 8) of F16 needs 128"}},
      {"past the data",
       R"({"k.1":)" + Entry(R"("F32")", "[2]", "[4,12]") + "}",
       8,
       {"tensor k.1", "[4, 12) end past the data section of 8 bytes"}},
      {"overlap",
       R"({"a":)" + Entry(R"("F32")", "[4]", "[0,16]") + R"(,"b":)" +
           Entry(R"("F32")", "[4]", "[8,24]") + "}",
       24,
       {"tensor b", "[8, 24) overlap tensor a at [0, 16)"}},
      {"same range",
       R"({"a":)" + Entry(R"("F16")", "[2]", "[4,8]") + R"(,"b":)" +
           Entry(R"("BF16")", "[2]", "[4,8]") + "}",
       8,
       {"overlap"}},
      {"empty name", R"({"":)" + good + "}", 8, {"empty name"}},
      {"metadata not object",
       R"({"__metadata__":[1],"k.1":)" + good + "}",
       8,
       {"__metadata__ is an array"}},
      {"metadata repeats",
       R"({"__metadata__":{"a":"x","a":"y"}})",
       0,
       {"__metadata__ repeats the key \"a\""}},
      {"metadata value",
       R"({"__metadata__":{"a":1},"k.1":)" + good + "}",
       8,
       {"__metadata__ entry \"a\" is a number"}},
      {"deep nesting",
       R"({"k.1":)" + std::string(40, '[') + std::string(40, ']') + "}",
       8,
       {"nests deeper"}},
      {"deep unclosed nesting",
       R"({"k.1":)" + std::string(1 << 20, '[') + "}",
       8,
       {"nests deeper"}},
  };
  ScratchDir dir;
  const std::string path = dir.file("bad.safetensors");
  for (const Malformed& c : cases) {
    SCOPED_TRACE(c.label);
    WriteBytes(path, RawFile(c.header, c.data_bytes));
    ExpectInvalid(SafetensorsFile::Open(path), path, c.expect);
  }
}

TEST(SafetensorsFile, RejectsShortFilesAndAbsurdHeaderLengths) {
  ScratchDir dir;
  const std::string path = dir.file("short.safetensors");
  for (size_t n = 0; n < 8; ++n) {
    SCOPED_TRACE(n);
    WriteBytes(path, std::string(n, '\x01'));
    ExpectInvalid(SafetensorsFile::Open(path), path, {"shorter than the 8-byte header length"});
  }
  const std::string body = R"({"k":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  const std::string data(4, '\0');
  for (uint64_t len : {~uint64_t{0}, uint64_t{1} << 63, (uint64_t{32} << 20) + 1}) {
    SCOPED_TRACE(len);
    WriteBytes(path, LengthPrefix(len) + body + data);
    ExpectInvalid(SafetensorsFile::Open(path), path, {"exceeds the limit"});
  }
  WriteBytes(path, LengthPrefix(body.size() + data.size() + 1) + body + data);
  ExpectInvalid(SafetensorsFile::Open(path), path, {"runs past the end of the file"});
}

TEST(SafetensorsFile, EveryTruncationFailsCleanly) {
  std::mt19937_64 rng(FreshSeed());
  ScratchDir dir;
  const std::string full_path = dir.file("full.safetensors");
  const std::string path = dir.file("cut.safetensors");
  SafetensorsWriter writer;
  Sample k = MakeSample(DType::kF16, {2, 3, 4}, rng);
  Sample v = MakeSample(DType::kF32, {5}, rng);
  writer.Add("k.0", DType::kF16, k.shape, k.bytes.data());
  writer.Add("v.0", DType::kF32, v.shape, v.bytes.data());
  writer.SetMetadata({{"note", "truncate me"}});
  ASSERT_TRUE(writer.Write(full_path).ok());
  const std::string full = ReadBytes(full_path);
  ASSERT_TRUE(SafetensorsFile::Open(full_path).ok());
  for (size_t n = 0; n < full.size(); ++n) {
    SCOPED_TRACE(n);
    WriteBytes(path, full.substr(0, n));
    ExpectInvalid(SafetensorsFile::Open(path), path, {});
  }
}

// Another process shrinking the file between Open and a read: the read is IOError naming the
// file, the tensor and where the file now ends, not a signal; bytes before the cut still read.
TEST(SafetensorsFile, ShrunkAfterOpenIsAnIOErrorNamingTheTensorAndOffset) {
  std::mt19937_64 rng(FreshSeed());
  ScratchDir dir;
  const std::string path = dir.file("shrinks.safetensors");
  Sample a = MakeSample(DType::kF32, {64}, rng);      // data [0, 256)
  Sample b = MakeSample(DType::kF16, {2, 300}, rng);  // data [256, 1456)
  SafetensorsWriter writer;
  writer.Add("a", DType::kF32, a.shape, a.bytes.data());
  writer.Add("b", DType::kF16, b.shape, b.bytes.data());
  ASSERT_TRUE(writer.Write(path).ok());
  uint64_t header_len = 0;
  std::memcpy(&header_len, ReadBytes(path).data(), 8);
  const uint64_t b_at = 8 + header_len + 256;  // b's first byte in the file

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  const TensorInfo& ta = *(*file)->Find("a");
  const TensorInfo& tb = *(*file)->Find("b");
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(b_at + 100)), 0);

  std::vector<uint8_t> got_a(ta.nbytes());
  ASSERT_TRUE((*file)->Read(ta, got_a.data()).ok());
  EXPECT_EQ(got_a, a.bytes);
  std::vector<uint8_t> got_b(tb.nbytes());
  std::vector<float> floats_b(tb.num_elements());
  for (const Status& st :
       {(*file)->Read(tb, got_b.data()), (*file)->ReadFloat(tb, floats_b.data())}) {
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.code(), Status::Code::kIOError) << st.ToString();
    for (const std::string& part :
         {path, std::string("tensor b"), "at file offset " + std::to_string(b_at),
          "now has " + std::to_string(b_at + 100) + " bytes", std::string("truncated")}) {
      EXPECT_NE(st.message().find(part), std::string::npos)
          << "missing '" << part << "' in " << st.ToString();
    }
  }

  ASSERT_EQ(::truncate(path.c_str(), 0), 0);
  const Status st = (*file)->Read(ta, got_a.data());
  EXPECT_EQ(st.code(), Status::Code::kIOError) << st.ToString();
  EXPECT_NE(st.message().find("tensor a"), std::string::npos) << st.ToString();
}

// A file replaced by rename (as SafetensorsWriter does) after Open: reads still see the opened one.
TEST(SafetensorsFile, ReplacedAfterOpenKeepsReadingTheOpenedFile) {
  std::mt19937_64 rng(FreshSeed());
  ScratchDir dir;
  const std::string path = dir.file("replaced.safetensors");
  Sample old_x = MakeSample(DType::kBF16, {4, 8}, rng);
  Sample new_x = MakeSample(DType::kBF16, {4, 8}, rng);
  SafetensorsWriter first, second;
  first.Add("x", DType::kBF16, old_x.shape, old_x.bytes.data());
  second.Add("x", DType::kBF16, new_x.shape, new_x.bytes.data());
  ASSERT_TRUE(first.Write(path).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  ASSERT_TRUE(second.Write(path).ok());
  std::vector<float> got(32);
  ASSERT_TRUE((*file)->ReadFloat(*(*file)->Find("x"), got.data()).ok());
  EXPECT_EQ(got, old_x.values);
}

// ReadFloat converts halves through a bounded buffer: a tensor of several buffers' worth comes
// out whole, the boundaries included.
TEST(SafetensorsFile, ReadFloatOfATensorLargerThanTheStagingBuffer) {
  std::mt19937_64 rng(FreshSeed());
  ScratchDir dir;
  const std::string path = dir.file("large.safetensors");
  // 1.5 MiB + 6 bytes of F16 or BF16: one full staging buffer (1 MiB) and a ragged rest.
  const std::vector<int64_t> shape = {3, 262145};
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    Sample s = MakeSample(dtype, shape, rng);
    SafetensorsWriter writer;
    writer.Add("big", dtype, s.shape, s.bytes.data());
    ASSERT_TRUE(writer.Write(path).ok());
    auto file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status().ToString();
    std::vector<float> got(s.values.size());
    ASSERT_TRUE((*file)->ReadFloat(*(*file)->Find("big"), got.data()).ok());
    EXPECT_EQ(got, s.values);
  }
}

// Random byte corruption of a valid file must be answered with OK or InvalidArgument, and an
// accepted file must keep every tensor inside the file.
TEST(SafetensorsFile, SurvivesRandomCorruption) {
  std::mt19937_64 rng(FreshSeed());
  ScratchDir dir;
  const std::string full_path = dir.file("full.safetensors");
  const std::string path = dir.file("fuzz.safetensors");
  SafetensorsWriter writer;
  Sample a = MakeSample(DType::kBF16, {3, 4}, rng);
  Sample b = MakeSample(DType::kF32, {2, 2}, rng);
  writer.Add("a", DType::kBF16, a.shape, a.bytes.data());
  writer.Add("b", DType::kF32, b.shape, b.bytes.data());
  ASSERT_TRUE(writer.Write(full_path).ok());
  const std::string full = ReadBytes(full_path);
  std::uniform_int_distribution<size_t> pos(0, full.size() - 1);
  std::uniform_int_distribution<int> byte(0, 255);
  const std::string alphabet = "{}[],:\"0123456789-.eE FBI";
  std::uniform_int_distribution<size_t> pick(0, alphabet.size() - 1);
  for (int trial = 0; trial < 2000; ++trial) {
    std::string bytes = full;
    const int edits = 1 + trial % 4;
    for (int e = 0; e < edits; ++e) {
      bytes[pos(rng)] = trial % 2 ? alphabet[pick(rng)] : static_cast<char>(byte(rng));
    }
    WriteBytes(path, bytes);
    auto file = SafetensorsFile::Open(path);
    if (!file.ok()) {
      EXPECT_TRUE(file.status().IsInvalidArgument()) << file.status().ToString();
      continue;
    }
    uint64_t header_len = 0;
    std::memcpy(&header_len, bytes.data(), 8);
    for (const TensorInfo& t : (*file)->tensors()) {
      EXPECT_LE(8 + header_len + t.data_end, bytes.size()) << t.name;
      EXPECT_EQ(t.nbytes(), t.data_end - t.data_begin) << t.name;
    }
  }
}

}  // namespace
}  // namespace sqkv
