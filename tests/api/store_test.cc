// The embedded store end to end: import validation (store unchanged on error), queries against a
// float64 reference over the reported selection, GQA, merging with the caller's own tokens,
// removal, reopen and orphan cleanup, corruption.
#include "api/store.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>
#include <set>

#include "compute/attention.h"
#include "gpu/device.h"
#include "storage/safetensors.h"
#include "tests/testing/store_testing.h"
#include "tests/testing/testing.h"

extern "C" int openblas_get_num_threads() __attribute__((weak));
extern "C" void openblas_set_num_threads(int threads) __attribute__((weak));

namespace sqkv {
namespace {

namespace fs = std::filesystem;
using testing::FreshSeed;
using testing::RandomNormal;

struct Context {
  int layers = 2, kv_heads = 2, tokens = 300, head_dim = 64;
  DType dtype = DType::kBF16;
  std::vector<std::vector<float>> k, v;  // per layer (kv_heads, tokens, d), rounded through dtype
};

// Writes a random context to `path`; keys come in a few clusters so selection matters.
Context WriteContext(const std::string& path, std::mt19937_64& rng, DType dtype, int tokens = 300,
                     int layers = 2, int kv_heads = 2, int head_dim = 64) {
  Context c;
  c.layers = layers;
  c.kv_heads = kv_heads;
  c.tokens = tokens;
  c.head_dim = head_dim;
  c.dtype = dtype;
  SafetensorsWriter w;
  const size_t n = static_cast<size_t>(kv_heads) * tokens * head_dim;
  for (int l = 0; l < layers; ++l) {
    auto centers = RandomNormal(8 * head_dim, rng, 2.f);
    auto k = RandomNormal(n, rng, 0.5f);
    for (size_t i = 0; i < n; ++i) k[i] += centers[((i / head_dim) % 8) * head_dim + i % head_dim];
    c.k.push_back(testing::RoundTrip(dtype, k));
    c.v.push_back(testing::RoundTrip(dtype, RandomNormal(n, rng)));
    for (const char* kind : {"k", "v"}) {
      const auto& src = kind[0] == 'k' ? c.k.back() : c.v.back();
      std::vector<uint8_t> bytes(n * DTypeSize(dtype));
      FromFloat(dtype, src.data(), bytes.data(), n);
      w.Add(std::string(kind) + "." + std::to_string(l), dtype, {kv_heads, tokens, head_dim},
            bytes.data());
    }
  }
  EXPECT_TRUE(w.Write(path).ok());
  return c;
}

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    StoreOptions o;
    o.data_dir = dir_.file("data");
    ASSERT_TRUE(Store::Open(o, &store_).ok());
  }
  void Reopen() {
    store_.reset();
    StoreOptions o;
    o.data_dir = dir_.file("data");
    ASSERT_TRUE(Store::Open(o, &store_).ok());
  }
  size_t SegmentFiles() const {
    size_t n = 0;
    for (const auto& e : fs::directory_iterator(dir_.path() / "data" / "segments")) {
      (void)e;
      ++n;
    }
    return n;
  }
  void ExpectEmptyStore() {
    std::vector<ContextInfo> all;
    ASSERT_TRUE(store_->List(&all).ok());
    EXPECT_TRUE(all.empty());
    EXPECT_EQ(SegmentFiles(), 0u);
  }
  testing::ScratchDir dir_;
  std::unique_ptr<Store> store_;
};

TEST_F(StoreTest, MalformedContextsAreRejectedAndLeaveTheStoreUnchanged) {
  std::mt19937_64 rng(FreshSeed());
  auto add = [](SafetensorsWriter& w, const std::string& name, std::vector<int64_t> shape,
                DType t = DType::kF32, float fill = 1.f) {
    size_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<float> x(n, fill);
    x[0] = 0.25f;
    std::vector<uint8_t> bytes(n * DTypeSize(t));
    FromFloat(t, x.data(), bytes.data(), n);
    w.Add(name, t, std::move(shape), bytes.data());
  };
  struct Case {
    const char* what;
    std::function<void(SafetensorsWriter&)> build;
    const char* must_mention;
  };
  std::vector<Case> cases = {
      {"missing v",
       [&](auto& w) {
         add(w, "k.0", {2, 20, 8});
       },
       "v.0"},
      {"missing layer",
       [&](auto& w) {
         add(w, "k.0", {2, 20, 8});
         add(w, "v.0", {2, 20, 8});
         add(w, "k.2", {2, 20, 8});
         add(w, "v.2", {2, 20, 8});
       },
       "k.1"},
      {"shape mismatch",
       [&](auto& w) {
         add(w, "k.0", {2, 20, 8});
         add(w, "v.0", {2, 21, 8});
       },
       "v.0"},
      {"dtype mismatch",
       [&](auto& w) {
         add(w, "k.0", {2, 20, 8});
         add(w, "v.0", {2, 20, 8}, DType::kF16);
       },
       "v.0"},
      {"not 3-D",
       [&](auto& w) {
         add(w, "k.0", {40, 8});
         add(w, "v.0", {40, 8});
       },
       "k.0"},
      {"stray tensor",
       [&](auto& w) {
         add(w, "k.0", {2, 20, 8});
         add(w, "v.0", {2, 20, 8});
         add(w, "bias", {8});
       },
       "bias"},
      {"bad q heads",
       [&](auto& w) {
         add(w, "k.0", {2, 20, 8});
         add(w, "v.0", {2, 20, 8});
         add(w, "q.0", {3, 4, 8});
       },
       "q.0"},
      {"non-finite key",
       [&](auto& w) {
         add(w, "k.0", {2, 20, 8}, DType::kF32, std::nanf(""));
         add(w, "v.0", {2, 20, 8});
       },
       "k.0"},
      {"one layer past the limit (the layer is 16 bits of the device tier's keys)",
       [&](auto& w) {
         for (int layer = 0; layer <= 65535; ++layer) {
           add(w, "k." + std::to_string(layer), {1, 1, 8});
           add(w, "v." + std::to_string(layer), {1, 1, 8});
         }
       },
       "at most 65535"},
  };
  for (const auto& c : cases) {
    SafetensorsWriter w;
    c.build(w);
    const std::string path =
        dir_.file(std::string("bad-") + std::to_string(&c - cases.data()) + ".safetensors");
    ASSERT_TRUE(w.Write(path).ok()) << c.what;
    Status s = store_->Import("ctx", path, ImportOptions(), nullptr);
    EXPECT_TRUE(s.IsInvalidArgument()) << c.what << ": " << s.ToString();
    EXPECT_NE(s.message().find(c.must_mention), std::string::npos) << c.what << ": " << s.message();
    ExpectEmptyStore();
  }
  // A truncated file.
  WriteContext(dir_.file("good.safetensors"), rng, DType::kF16, 40, 1);
  fs::copy_file(dir_.file("good.safetensors"), dir_.file("cut.safetensors"));
  fs::resize_file(dir_.file("cut.safetensors"), fs::file_size(dir_.file("cut.safetensors")) - 100);
  EXPECT_FALSE(store_->Import("ctx", dir_.file("cut.safetensors"), {}, nullptr).ok());
  ExpectEmptyStore();
  // Bad names and parameters.
  EXPECT_TRUE(
      store_->Import("../x", dir_.file("good.safetensors"), {}, nullptr).IsInvalidArgument());
  ImportOptions bad;
  bad.centroid_fraction = 0;
  EXPECT_TRUE(
      store_->Import("ok", dir_.file("good.safetensors"), bad, nullptr).IsInvalidArgument());
  ExpectEmptyStore();
  // Names are unique.
  ASSERT_TRUE(store_->Import("ok", dir_.file("good.safetensors"), {}, nullptr).ok());
  EXPECT_EQ(store_->Import("ok", dir_.file("good.safetensors"), {}, nullptr).code(),
            Status::Code::kAlreadyExists);
  EXPECT_EQ(SegmentFiles(), 1u);
}

class StoreQueryTest : public StoreTest, public ::testing::WithParamInterface<DType> {};

// Dense queries equal float64 attention over every key; sparse queries equal float64 attention
// over exactly the tokens the store reports as selected, which are at least keep * tokens.
TEST_P(StoreQueryTest, MatchesFloat64ReferenceOverTheSelection) {
  const DType dtype = GetParam();
  std::mt19937_64 rng(FreshSeed());
  Context c = WriteContext(dir_.file("c.safetensors"), rng, dtype, /*tokens=*/333);
  ImportOptions io;
  io.centroid_fraction = 0.1f;
  ASSERT_TRUE(store_->Import("c", dir_.file("c.safetensors"), io, nullptr).ok());
  const int group = 4, q_heads = c.kv_heads * group, n = 3, d = c.head_dim;
  // The defaults (float32 arithmetic) for every dtype: the reference reads the rounded values the
  // pages hold.
  const testing::ReferenceTolerance tol;
  for (int layer = 0; layer < c.layers; ++layer) {
    for (float keep : {1.0f, 0.3f, 0.05f}) {
      auto q = RandomNormal(static_cast<size_t>(q_heads) * n * d, rng);
      QueryOptions qo;
      qo.device = Device::kCpu;
      qo.want_selection = true;
      qo.select.mode =
          keep == 1.0f ? SelectOptions::Mode::kDense : SelectOptions::Mode::kKeepFraction;
      qo.select.keep_fraction = keep;
      QueryResult r;
      ASSERT_TRUE(store_->Query("c", layer, q.data(), q_heads, n, d, qo, &r).ok());
      ASSERT_EQ(r.selected_tokens.size(), static_cast<size_t>(c.kv_heads));
      for (int h = 0; h < c.kv_heads; ++h) {
        const auto& sel = r.selected_tokens[h];
        ASSERT_TRUE(std::is_sorted(sel.begin(), sel.end()));
        ASSERT_EQ(std::set<int32_t>(sel.begin(), sel.end()).size(), sel.size());
        if (keep == 1.0f) {
          ASSERT_EQ(sel.size(), static_cast<size_t>(c.tokens));
        }
        EXPECT_GE(sel.size(), std::ceil(keep * c.tokens));
      }
      testing::ExpectMatchesReferenceOverSelection(
          r, q.data(), q_heads, n, d, c.k[layer].data(), c.v[layer].data(), c.kv_heads, c.tokens,
          tol, "layer " + std::to_string(layer) + " keep " + std::to_string(keep));
      EXPECT_EQ(r.stats.device, "cpu");
      // Every selected page came from the disk or the host cache, none twice.
      EXPECT_EQ(r.stats.pages_from_disk + r.stats.pages_from_host, r.stats.pages_selected);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, StoreQueryTest,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

// The caller merges the store's answer with attention over its own tokens and gets attention
// over the union, as if computed in one pass.
TEST_F(StoreTest, CallerMergeEqualsAttentionOverTheUnion) {
  std::mt19937_64 rng(FreshSeed());
  Context c = WriteContext(dir_.file("c.safetensors"), rng, DType::kF32, 200, 1, 1, 64);
  ASSERT_TRUE(store_->Import("c", dir_.file("c.safetensors"), {}, nullptr).ok());
  const int rows = 2, d = 64, own = 5;
  auto q = RandomNormal(rows * d, rng);
  QueryOptions qo;
  qo.device = Device::kCpu;
  qo.select.mode = SelectOptions::Mode::kDense;
  QueryResult r;
  ASSERT_TRUE(store_->Query("c", 0, q.data(), rows, 1, d, qo, &r).ok());
  // The caller's own keys and values (e.g. its user tokens), in one page.
  auto own_k = RandomNormal(own * d, rng), own_v = RandomNormal(own * d, rng);
  std::vector<uint8_t> page(PageBytes(own, d, DType::kF32));
  std::memcpy(page.data(), own_k.data(), own * d * 4);
  std::memcpy(page.data() + own * d * 4, own_v.data(), own * d * 4);
  PageRef ref{page.data(), own};
  std::vector<float> o2(rows * d), l2(rows);
  const float scale = 1.f / 8.f;
  AttendPages(q.data(), rows, d, scale, DType::kF32, own, &ref, 1, o2.data(), l2.data());
  MergeStates(r.output.data(), r.lse.data(), o2.data(), l2.data(), rows, d);
  // Reference over all 205 keys.
  std::vector<float> all_k = c.k[0], all_v = c.v[0];
  all_k.insert(all_k.end(), own_k.begin(), own_k.end());
  all_v.insert(all_v.end(), own_v.begin(), own_v.end());
  std::vector<int32_t> use(205);
  std::iota(use.begin(), use.end(), 0);
  std::vector<double> ref_out, ref_lse;
  testing::ReferenceAttention(q.data(), rows, d, all_k.data(), all_v.data(), use, scale, &ref_out,
                              &ref_lse);
  EXPECT_LT(testing::RelativeError(r.output.data(), ref_out.data(), rows * d), 1e-5);
  for (int i = 0; i < rows; ++i) EXPECT_NEAR(r.lse[i], ref_lse[i], 1e-4);
}

// Open sets OpenBLAS's thread count from StoreOptions::blas_threads (0 leaves it alone; negative
// is refused).
TEST(StoreOptionsTest, BlasThreads) {
  if (openblas_get_num_threads == nullptr || openblas_set_num_threads == nullptr) {
    GTEST_SKIP() << "the BLAS linked in is not OpenBLAS";
  }
  testing::ScratchDir dir;
  openblas_set_num_threads(2);
  StoreOptions o;
  o.data_dir = dir.file("a");
  o.blas_threads = 0;
  std::unique_ptr<Store> store;
  ASSERT_TRUE(Store::Open(o, &store).ok());
  const int untouched = openblas_get_num_threads();  // 2, or fewer on a 1-core machine
  store.reset();
  o.blas_threads = 1;
  ASSERT_TRUE(Store::Open(o, &store).ok());
  EXPECT_EQ(openblas_get_num_threads(), 1);
  store.reset();
  openblas_set_num_threads(untouched);
  o.blas_threads = 0;
  ASSERT_TRUE(Store::Open(o, &store).ok());
  EXPECT_EQ(openblas_get_num_threads(), untouched);
  store.reset();
  o.blas_threads = -1;
  EXPECT_TRUE(Store::Open(o, &store).IsInvalidArgument());
}

// QueryOptions::cancelled: asked before the query starts, before each kv head and between blocks
// of 1,024 rows on the CPU; once it says true the query ends Cancelled. A predicate that stays
// false changes nothing.
TEST_F(StoreTest, QueriesStopWhenCancelled) {
  std::mt19937_64 rng(FreshSeed());
  WriteContext(dir_.file("c.safetensors"), rng, DType::kBF16, 300, 1, 2, 64);
  ASSERT_TRUE(store_->Import("c", dir_.file("c.safetensors"), {}, nullptr).ok());
  const int q_heads = 4, n = 1500;  // 3,000 rows a kv head: blocks of 1,024 and 1,976 rows
  auto q = RandomNormal(static_cast<size_t>(q_heads) * n * 64, rng);
  QueryOptions qo;
  qo.device = Device::kCpu;
  QueryResult plain, r;
  ASSERT_TRUE(store_->Query("c", 0, q.data(), q_heads, n, 64, qo, &plain).ok());

  std::atomic<int> asked{0};
  qo.cancelled = [&] {
    ++asked;
    return false;
  };
  ASSERT_TRUE(store_->Query("c", 0, q.data(), q_heads, n, 64, qo, &r).ok());
  EXPECT_EQ(r.output, plain.output);
  EXPECT_EQ(r.lse, plain.lse);
  // Once before, then per kv head (2) once before its pages and once between its two blocks (a
  // short last block joins the one before it).
  EXPECT_EQ(asked.load(), 1 + 2 * 2);

  for (int after : {0, 1, 2, 4}) {  // cancelled at the start, at a head, between blocks
    SCOPED_TRACE(after);
    std::atomic<int> left{after};
    qo.cancelled = [&] { return left.fetch_sub(1) <= 0; };
    const Status s = store_->Query("c", 0, q.data(), q_heads, n, 64, qo, &r);
    EXPECT_TRUE(s.IsCancelled()) << s.ToString();
    EXPECT_NE(s.message().find("query of context c layer 0 cancelled"), std::string::npos)
        << s.ToString();
  }
}

TEST_F(StoreTest, BadQueriesAreRejected) {
  std::mt19937_64 rng(FreshSeed());
  WriteContext(dir_.file("c.safetensors"), rng, DType::kF16, 64, 2, 2, 64);
  ASSERT_TRUE(store_->Import("c", dir_.file("c.safetensors"), {}, nullptr).ok());
  auto q = RandomNormal(4 * 2 * 64, rng);
  QueryOptions qo;
  qo.device = Device::kCpu;
  QueryResult r;
  EXPECT_TRUE(store_->Query("nope", 0, q.data(), 4, 2, 64, qo, &r).IsNotFound());
  EXPECT_TRUE(store_->Query("c", 2, q.data(), 4, 2, 64, qo, &r).IsInvalidArgument());
  EXPECT_TRUE(store_->Query("c", -1, q.data(), 4, 2, 64, qo, &r).IsInvalidArgument());
  EXPECT_TRUE(store_->Query("c", 0, q.data(), 4, 4, 32, qo, &r).IsInvalidArgument());
  EXPECT_TRUE(store_->Query("c", 0, q.data(), 3, 2, 64, qo, &r).IsInvalidArgument());
  EXPECT_TRUE(store_->Query("c", 0, q.data(), 4, 0, 64, qo, &r).IsInvalidArgument());
  q[77] = std::numeric_limits<float>::infinity();
  Status s = store_->Query("c", 0, q.data(), 4, 2, 64, qo, &r);
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("not finite"), std::string::npos);
  q[77] = 0.5f;
  // Finite, but q.k overflows float32: an error, not NaN.
  std::vector<float> huge(q.begin(), q.end());
  for (float& x : huge) x = std::copysign(1e38f, x);
  for (auto mode : {SelectOptions::Mode::kDense, SelectOptions::Mode::kKeepFraction}) {
    QueryOptions big = qo;
    big.select.mode = mode;
    s = store_->Query("c", 0, huge.data(), 4, 2, 64, big, &r);
    EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
    EXPECT_NE(s.message().find("overflows float32"), std::string::npos) << s.ToString();
    EXPECT_TRUE(r.output.empty());
  }
  qo.select.keep_fraction = 1.5f;
  EXPECT_TRUE(store_->Query("c", 0, q.data(), 4, 2, 64, qo, &r).IsInvalidArgument());
  if (!gpu::DevicePresent()) {
    qo.select.keep_fraction = 0.1f;
    qo.device = Device::kGpu;
    EXPECT_TRUE(store_->Query("c", 0, q.data(), 4, 2, 64, qo, &r).IsUnavailable());
  }
}

// A live context whose segment file is gone is damage (exit 5 in the CLI, as verify reports it),
// not an unknown context.
TEST_F(StoreTest, MissingSegmentIsCorruption) {
  std::mt19937_64 rng(FreshSeed());
  WriteContext(dir_.file("c.safetensors"), rng, DType::kBF16, 64, 1, 1, 64);
  ASSERT_TRUE(store_->Import("c", dir_.file("c.safetensors"), {}, nullptr).ok());
  Reopen();  // no segment reader cached
  for (const auto& e : fs::directory_iterator(dir_.path() / "data" / "segments")) {
    fs::remove(e.path());
  }
  auto q = RandomNormal(64, rng);
  QueryOptions qo;
  qo.device = Device::kCpu;
  QueryResult r;
  const Status s = store_->Query("c", 0, q.data(), 1, 1, 64, qo, &r);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("missing"), std::string::npos) << s.ToString();
}

TEST_F(StoreTest, RemoveReopenAndOrphanCleanup) {
  std::mt19937_64 rng(FreshSeed());
  WriteContext(dir_.file("c.safetensors"), rng, DType::kBF16, 64, 1, 1, 64);
  ASSERT_TRUE(store_->Import("a", dir_.file("c.safetensors"), {}, nullptr).ok());
  ASSERT_TRUE(store_->Import("b", dir_.file("c.safetensors"), {}, nullptr).ok());
  EXPECT_EQ(SegmentFiles(), 2u);
  ASSERT_TRUE(store_->Remove("a").ok());
  EXPECT_TRUE(store_->Remove("a").IsNotFound());
  EXPECT_EQ(SegmentFiles(), 1u);
  // Leftovers of a crashed import: a temporary and an unpublished segment.
  std::ofstream(dir_.path() / "data" / "segments" / "00000000000000ff.seg.tmp") << "x";
  std::ofstream(dir_.path() / "data" / "segments" / "00000000000000fe.seg") << "y";
  Reopen();
  EXPECT_EQ(SegmentFiles(), 1u);
  ContextInfo info;
  ASSERT_TRUE(store_->Info("b", &info).ok());
  EXPECT_EQ(info.tokens, 64);
  auto q = RandomNormal(64, rng);
  QueryOptions qo;
  qo.device = Device::kCpu;
  QueryResult r;
  EXPECT_TRUE(store_->Query("b", 0, q.data(), 1, 1, 64, qo, &r).ok());
}

TEST_F(StoreTest, FlippedSegmentByteIsReportedNotComputed) {
  std::mt19937_64 rng(FreshSeed());
  WriteContext(dir_.file("c.safetensors"), rng, DType::kBF16, 128, 1, 1, 64);
  ASSERT_TRUE(store_->Import("c", dir_.file("c.safetensors"), {}, nullptr).ok());
  ContextInfo info;
  ASSERT_TRUE(store_->Info("c", &info).ok());
  const fs::path seg = dir_.path() / "data" / "segments" / info.SegmentFileName();
  {
    std::fstream f(seg, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(4096 + 100);
    char c = 0;
    f.read(&c, 1);
    c ^= 0x01;
    f.seekp(4096 + 100);
    f.write(&c, 1);
  }
  Reopen();
  auto q = RandomNormal(64, rng);
  QueryOptions qo;
  qo.device = Device::kCpu;
  qo.select.mode = SelectOptions::Mode::kDense;
  QueryResult r;
  Status s = store_->Query("c", 0, q.data(), 1, 1, 64, qo, &r);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("context c"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace sqkv
