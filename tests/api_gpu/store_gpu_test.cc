// The Store on the GPU: the same contexts queried with --device gpu and --device cpu give the same
// selections (up to near-ties at the cut) and the same answers within bf16 tolerance, and each
// answer equals float64 attention over its own selection; device pins; the GPU K-means hook
// through import. Skips without a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <utility>

#include "api/store.h"
#include "api/synthetic.h"
#include "gpu/device.h"
#include "storage/safetensors.h"
#include "tests/testing/store_testing.h"
#include "tests/testing/testing.h"

namespace sqkv {
namespace {

class StoreGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu::DevicePresent()) GTEST_SKIP() << "no CUDA device";
    Reopen();
  }
  // Imports a synthetic context; returns its layer-0 user queries (q_heads, n, head_dim).
  std::vector<float> ImportSynthetic(const std::string& name, const SyntheticOptions& so,
                                     const ImportOptions& io = ImportOptions()) {
    return testing::ImportSyntheticContext(store_.get(), dir_.file(name + ".st"), name, so, io);
  }
  void Reopen() {
    store_.reset();  // the old store's device pool goes first
    StoreOptions o;
    o.data_dir = dir_.file("data");
    ASSERT_TRUE(Store::Open(o, &store_).ok());
  }
  testing::ScratchDir dir_;
  std::unique_ptr<Store> store_;
};

double RelErr(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (a[i] - b[i]) * double(a[i] - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

TEST_F(StoreGpuTest, GpuAndCpuAgreeAcrossDtypesAndModes) {
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    for (int head_dim : {64, 128}) {
      SyntheticOptions so;
      so.layers = 2;
      so.kv_heads = 4;
      so.q_heads = 16;
      so.tokens = 3000;  // not a multiple of the page size
      so.head_dim = head_dim;
      so.dtype = dtype;
      so.window = 32;
      so.n = 5;
      so.seed = testing::FreshSeed();
      std::vector<float> q;
      const std::string name = std::string("c") + DTypeName(dtype) + std::to_string(head_dim);
      ASSERT_TRUE(WriteSyntheticContext(so, dir_.file(name + ".st"), &q).ok());
      ImportOptions io;
      io.kmeans_device = Device::kGpu;  // the GPU K-means hook
      ASSERT_TRUE(store_->Import(name, dir_.file(name + ".st"), io, nullptr).ok());
      // Layer 1's keys and values as stored, for the float64 reference.
      std::vector<float> keys, values;
      {
        auto file = SafetensorsFile::Open(dir_.file(name + ".st"));
        ASSERT_TRUE(file.ok()) << file.status().ToString();
        for (auto [tensor, dst] : {std::pair{"k.1", &keys}, std::pair{"v.1", &values}}) {
          const TensorInfo* t = (*file)->Find(tensor);
          ASSERT_NE(t, nullptr) << tensor;
          dst->resize(t->num_elements());
          ASSERT_TRUE((*file)->ReadFloat(*t, dst->data()).ok()) << tensor;
        }
      }
      static constexpr const char* kModeNames[] = {"dense", "keep 0.1", "keep 0.3", "sparsity 0.9"};
      for (int mode = 0; mode < 4; ++mode) {
        QueryOptions qo;
        qo.want_selection = true;
        if (mode == 0) qo.select.mode = SelectOptions::Mode::kDense;
        if (mode == 1) qo.select.keep_fraction = 0.1f;
        if (mode == 2) qo.select.keep_fraction = 0.3f;
        if (mode == 3) qo.sparsity = 0.9f;
        QueryResult cpu, gpu;
        qo.device = Device::kCpu;
        ASSERT_TRUE(store_->Query(name, 1, q.data(), so.q_heads, so.n, head_dim, qo, &cpu).ok());
        qo.device = Device::kGpu;
        Status s = store_->Query(name, 1, q.data(), so.q_heads, so.n, head_dim, qo, &gpu);
        ASSERT_TRUE(s.ok()) << s.ToString();
        EXPECT_EQ(gpu.stats.device, "gpu");
        // Selections: equal, or differing by a few clusters at the cut (near-ties).
        size_t differ = 0, total = 0;
        for (int h = 0; h < so.kv_heads; ++h) {
          std::set<int32_t> a(cpu.selected_tokens[h].begin(), cpu.selected_tokens[h].end());
          std::set<int32_t> b(gpu.selected_tokens[h].begin(), gpu.selected_tokens[h].end());
          for (int32_t t : a) differ += !b.count(t);
          for (int32_t t : b) differ += !a.count(t);
          total += a.size();
        }
        const std::string what = std::string(DTypeName(dtype)) + " d" + std::to_string(head_dim) +
                                 " " + kModeNames[mode];
        std::fprintf(stderr, "%s: %zu of %zu selected tokens differ; ", what.c_str(), differ,
                     total);
        EXPECT_LE(differ, total / 50 + 64) << what;
        // Each answer against float64 attention over its own selection, equal or not.
        testing::ExpectMatchesReferenceOverSelection(cpu, q.data(), so.q_heads, so.n, head_dim,
                                                     keys.data(), values.data(), so.kv_heads,
                                                     so.tokens, {}, what + " cpu");
        testing::ExpectMatchesReferenceOverSelection(
            gpu, q.data(), so.q_heads, so.n, head_dim, keys.data(), values.data(), so.kv_heads,
            so.tokens, {dtype == DType::kBF16 ? 2e-2 : 5e-3, 0.05, 1e-3}, what + " gpu");
        if (differ == 0) {
          const double err = RelErr(gpu.output, cpu.output);
          std::fprintf(stderr, "rel err %.2e\n", err);
          EXPECT_LT(err, dtype == DType::kBF16 ? 2e-2 : 5e-3);
          for (size_t i = 0; i < cpu.lse.size(); ++i) {
            EXPECT_NEAR(gpu.lse[i], cpu.lse[i], 0.05 + 1e-3 * std::abs(cpu.lse[i]));
          }
        } else {
          std::fprintf(stderr, "(each output checked over its own selection only)\n");
        }
      }
    }
  }
}

TEST_F(StoreGpuTest, DevicePinKeepsLayersResident) {
  SyntheticOptions so;
  so.layers = 3;
  so.tokens = 2048;
  so.head_dim = 128;
  so.kv_heads = 8;
  so.q_heads = 32;
  so.window = 0;
  const std::vector<float> q = ImportSynthetic("p", so);
  ASSERT_TRUE(store_->Pin("p", Tier::kDevice).ok());
  QueryOptions qo;
  qo.device = Device::kGpu;
  QueryResult r;
  ASSERT_TRUE(store_->Query("p", 2, q.data(), 32, so.n, 128, qo, &r).ok());
  EXPECT_EQ(r.stats.pages_from_disk, 0);
  EXPECT_EQ(r.stats.pages_from_device, r.stats.pages_selected);
  TierStats ts;
  ASSERT_TRUE(store_->GetTierStats(&ts).ok());
  EXPECT_EQ(ts.device_layers_resident, 3u);
  EXPECT_EQ(ts.device_layers_pinned, 3u);
  EXPECT_GT(ts.device_pool_bytes_used, 0u);

  // The pin is persisted: after a reopen each layer is pinned again as a query brings it back.
  Reopen();
  ASSERT_TRUE(store_->Query("p", 1, q.data(), 32, so.n, 128, qo, &r).ok());
  EXPECT_EQ(r.stats.device, "gpu");
  ASSERT_TRUE(store_->GetTierStats(&ts).ok());
  EXPECT_EQ(ts.device_layers_resident, 1u);
  EXPECT_EQ(ts.device_layers_pinned, 1u);

  // A rebuild carries the pin to the new version and lets go of the old one's layers.
  ASSERT_TRUE(store_->Rebuild("p", {}, nullptr).ok());
  ASSERT_TRUE(store_->Query("p", 0, q.data(), 32, so.n, 128, qo, &r).ok());
  ASSERT_TRUE(store_->GetTierStats(&ts).ok());
  EXPECT_EQ(ts.device_layers_pinned, 1u);  // the new version's layer 0 only
  ASSERT_TRUE(store_->Unpin("p").ok());
  ASSERT_TRUE(store_->GetTierStats(&ts).ok());
  EXPECT_EQ(ts.device_layers_pinned, 0u);
}

// Finite queries whose scores overflow are an error on the GPU as on the CPU, never NaN.
TEST_F(StoreGpuTest, OverflowingQueriesAreAnError) {
  SyntheticOptions so;
  so.layers = 1;
  so.tokens = 1024;
  so.head_dim = 128;
  so.window = 0;
  std::vector<float> q = ImportSynthetic("h", so);
  ASSERT_FALSE(q.empty());
  for (float& x : q) x = std::copysign(3e38f, x);
  for (Device device : {Device::kGpu, Device::kCpu}) {
    QueryOptions qo;
    qo.device = device;
    QueryResult r;
    const Status s = store_->Query("h", 0, q.data(), so.q_heads, so.n, 128, qo, &r);
    EXPECT_TRUE(s.IsInvalidArgument())
        << (device == Device::kGpu ? "gpu: " : "cpu: ") << s.ToString();
  }
}

// Shapes the GPU kernels do not run (head_dim 16 here) are answered on the CPU under --device
// auto, and refused clearly under --device gpu (found by the Hugging Face export test on the
// H200: a tiny model's head_dim 16 failed under auto).
TEST_F(StoreGpuTest, AutoFallsBackToCpuForShapesTheGpuDoesNotRun) {
  SyntheticOptions so;
  so.layers = 1;
  so.tokens = 300;
  so.head_dim = 16;
  so.window = 0;
  std::vector<float> q = ImportSynthetic("s", so);
  ASSERT_FALSE(q.empty());
  QueryOptions qo;
  QueryResult r;
  ASSERT_TRUE(store_->Query("s", 0, q.data(), so.q_heads, so.n, 16, qo, &r).ok());
  EXPECT_EQ(r.stats.device, "cpu");
  qo.device = Device::kGpu;
  EXPECT_TRUE(store_->Query("s", 0, q.data(), so.q_heads, so.n, 16, qo, &r).IsInvalidArgument());
  EXPECT_TRUE(store_->Pin("s", Tier::kDevice).IsInvalidArgument());
  // Page sizes the attention kernels do not take (not a multiple of 8), or whose page does not
  // divide the pool slot (256 tokens of d128 bf16: 128 KiB): the same.
  so.head_dim = 128;
  ASSERT_TRUE(WriteSyntheticContext(so, dir_.file("p.st"), &q).ok());
  for (int page_tokens : {4, 12, 256}) {
    const std::string name = "p" + std::to_string(page_tokens);
    ImportOptions io;
    io.page_tokens = page_tokens;
    ASSERT_TRUE(store_->Import(name, dir_.file("p.st"), io, nullptr).ok());
    qo.device = Device::kAuto;
    Status s = store_->Query(name, 0, q.data(), so.q_heads, so.n, 128, qo, &r);
    ASSERT_TRUE(s.ok()) << name << ": " << s.ToString();
    EXPECT_EQ(r.stats.device, "cpu") << name;
    qo.device = Device::kGpu;
    s = store_->Query(name, 0, q.data(), so.q_heads, so.n, 128, qo, &r);
    EXPECT_TRUE(s.IsInvalidArgument()) << name << ": " << s.ToString();
    EXPECT_NE(s.message().find("page_tokens " + std::to_string(page_tokens)), std::string::npos)
        << s.ToString();
  }
}

}  // namespace
}  // namespace sqkv
