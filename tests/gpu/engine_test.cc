// The GPU engine end to end against the CPU path: SelectClusters for the selection, AttendPages
// over the selected pages for the output; plus the embedding form (Plan/Run, graph replay), pool
// accounting and argument checks.
#include "gpu/engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "compute/attention.h"
#include "gpu/device.h"
#include "gpu/device_buffer.h"
#include "gpu/engine_timing.h"
#include "index/select.h"
#include "tests/gpu/engine_testing.h"
#include "tests/gpu/gpu_testing.h"
#include "tests/gpu/lookup_testing.h"
#include "tests/testing/testing.h"

namespace sqkv::gpu {
namespace {

using engine_testing::Budget;
using engine_testing::Context;
using engine_testing::MakeContext;
using engine_testing::MakeEngine;
using engine_testing::MakeReq;
using engine_testing::Req;

constexpr double kTieTol = 1e-5;

Status Load(Engine* e, uint64_t key, const Context& c) {
  return e->LoadLayer(key, c.dtype, c.page_tokens, c.heads, c.pages.data());
}

Status QueryAll(Engine* e, std::vector<Req>* reqs) {
  std::vector<QueryRequest> qs;
  for (Req& r : *reqs) {
    QueryRequest q;
    q.layer_key = r.key;
    q.q = r.q.data();
    q.q_heads = r.q_heads;
    q.n = r.n;
    q.select = r.select;
    q.out = r.out.data();
    q.lse = r.lse.data();
    q.selection = &r.selection;
    qs.push_back(q);
  }
  return e->Query(qs);
}

// Per kv head: the selection against SelectClusters (near-ties at the cut tolerated, judged by
// float64 scores), the output against AttendPages over the pages the device selected.
void CheckRequest(const Req& r, int index) {
  const Context& c = *r.ctx;
  const int kv = static_cast<int>(c.heads.size());
  const int g = r.q_heads / kv, d = c.head_dim;
  const int rows = g * r.n;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const size_t pb = PageBytes(c.page_tokens, d, c.dtype);
  // The attention kernels' bounds (tests/gpu/paged_attention_test.cc): 16-bit pages go through
  // 16-bit tensor-core products.
  const double tol = c.dtype == DType::kF32 ? 1e-4 : 1e-2;
  const double lse_tol = c.dtype == DType::kF32 ? 1e-4 : 3e-2;
  ASSERT_EQ(static_cast<int>(r.selection.size()), kv) << "request " << index;
  for (int h = 0; h < kv; ++h) {
    SCOPED_TRACE("request " + std::to_string(index) + " kv head " + std::to_string(h));
    const HeadIndex& x = c.heads[h];
    const float* q = r.q.data() + static_cast<size_t>(h) * rows * d;
    HeadSelection cpu;
    Status st = SelectClusters(x, q, rows, r.select, &cpu);
    ASSERT_TRUE(st.ok()) << st.ToString();
    const HeadSelection& gpu = r.selection[h];
    // Judge disagreements by float64 scores around the cut.
    const testing::RefMode mode =
        r.select.mode == SelectOptions::Mode::kDense       ? testing::RefMode::kDense
        : r.select.mode == SelectOptions::Mode::kThreshold ? testing::RefMode::kThreshold
                                                           : testing::RefMode::kBudget;
    const float f1 = Level1KeepFraction(r.select);
    // The engine scores with 16-bit centroids (gpu/lookup.h): disagreements with the float32
    // CPU path are allowed within both arithmetics' bounds of the cut.
    const double sel_tol = testing::LookupTolerance(x, q, rows, true, true, kTieTol) +
                           testing::LookupTolerance(x, q, rows, false, false, 0.0);
    testing::RefSelection ref =
        testing::RefSelect(x, q, rows, mode, KeepTokenTarget(r.select.keep_fraction, x.tokens),
                           r.select.threshold, KeepTokenTarget(f1, x.tokens), sel_tol);
    if (gpu.centroids_scored != cpu.centroids_scored && ref.l1_near_tie) {
      std::fprintf(stderr, "level-1 near-tie; selection comparison skipped\n");
    } else {
      EXPECT_EQ(gpu.centroids_scored, cpu.centroids_scored);
      ref.clusters = cpu.clusters;
      int near = 0;
      EXPECT_EQ(testing::CompareSelection(ref, gpu.clusters, sel_tol, &near), "");
      if (near == 0) {
        EXPECT_EQ(gpu.tokens, cpu.tokens);
        EXPECT_EQ(gpu.pages, cpu.pages);
      }
    }
    std::vector<PageRef> refs;
    for (int32_t cl : gpu.clusters) {
      ASSERT_GE(cl, 0);
      ASSERT_LT(cl, x.num_clusters());
      for (int p = x.cluster_page_begin[cl]; p < x.cluster_page_begin[cl + 1]; ++p) {
        refs.push_back({c.pages.data() + (c.head_page_base[h] + p) * pb, x.PageValidTokens(cl, p)});
      }
    }
    EXPECT_EQ(static_cast<int>(refs.size()), gpu.pages);
    std::vector<float> out(static_cast<size_t>(rows) * d), lse(rows);
    AttendPages(q, rows, d, scale, c.dtype, c.page_tokens, refs.data(),
                static_cast<int>(refs.size()), out.data(), lse.data());
    const float* got = r.out.data() + static_cast<size_t>(h) * rows * d;
    const float* got_lse = r.lse.data() + static_cast<size_t>(h) * rows;
    if (refs.empty()) {
      for (int i = 0; i < rows; ++i) EXPECT_EQ(got_lse[i], -std::numeric_limits<float>::infinity());
      for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(got[i], 0.f) << "element " << i;
      continue;
    }
    std::vector<double> ref_out(out.begin(), out.end());
    EXPECT_LE(testing::RelativeError(got, ref_out.data(), out.size()), tol);
    for (int i = 0; i < rows; ++i) {
      ASSERT_NEAR(got_lse[i], lse[i], lse_tol * std::max(1.f, std::abs(lse[i]))) << "row " << i;
    }
  }
}

TEST(GpuEngine, QueryMatchesCpuPathAcrossContextsAndGroups) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  const Context a = MakeContext(rng, 8, 300, 128, 16, DType::kBF16);
  const Context b = MakeContext(rng, 2, 900, 128, 16, DType::kBF16);
  ASSERT_TRUE(Load(engine.get(), 11, a).ok());
  ASSERT_TRUE(Load(engine.get(), 22, b).ok());
  SelectOptions threshold;
  threshold.mode = SelectOptions::Mode::kThreshold;
  threshold.threshold = 1.f / 4000;
  SelectOptions dense;
  dense.mode = SelectOptions::Mode::kDense;
  std::vector<Req> reqs;
  reqs.push_back(MakeReq(rng, a, 11, 4, 1, Budget(0.1f)));  // decode, 32 query heads
  reqs.push_back(MakeReq(rng, b, 22, 1, 3, Budget(0.05f)));
  reqs.push_back(MakeReq(rng, a, 11, 8, 2, Budget(0.2f)));
  reqs.push_back(MakeReq(rng, b, 22, 4, 40, Budget(0.1f)));  // 160 rows: the tiled path
  reqs.push_back(MakeReq(rng, a, 11, 1, 1, threshold));
  reqs.push_back(MakeReq(rng, b, 22, 4, 1, dense));
  reqs.push_back(MakeReq(rng, a, 11, 4, 1, Budget(0.f)));  // keeps nothing
  Status st = QueryAll(engine.get(), &reqs);
  ASSERT_TRUE(st.ok()) << st.ToString();
  for (size_t i = 0; i < reqs.size(); ++i) CheckRequest(reqs[i], static_cast<int>(i));
}

// An engine on another device (EngineOptions::device) answers exactly as one on device 0: every
// kernel raises its shared-memory limit on the device it runs on (a per-device attribute). Decode,
// the tiled prefill and the two-level lookup all run. Skips with fewer than two devices.
TEST(GpuEngine, SecondDeviceGivesTheSameAnswers) {
  SKIP_WITHOUT_DEVICE();
  if (DeviceCount() < 2) GTEST_SKIP() << "one CUDA device";
  std::mt19937_64 rng(testing::FreshSeed());
  const Context a = MakeContext(rng, 8, 300, 128, 16, DType::kBF16);
  const Context b = MakeContext(rng, 2, 900, 64, 16, DType::kF16, /*num_l1=*/12);
  std::vector<Req> first;
  first.push_back(MakeReq(rng, a, 1, 4, 1, Budget(0.1f)));    // decode
  first.push_back(MakeReq(rng, a, 1, 4, 300, Budget(0.2f)));  // 1,200 rows: prefill passes
  first.push_back(MakeReq(rng, b, 2, 2, 5, Budget(0.1f)));    // two-level lookup
  std::vector<Req> second = first;
  for (int device : {0, 1}) {
    EngineOptions o;
    o.pool_bytes = 128ull << 20;
    o.device = device;
    std::unique_ptr<Engine> engine;
    Status st = Engine::Create(o, &engine);
    ASSERT_TRUE(st.ok()) << "device " << device << ": " << st.ToString();
    ASSERT_TRUE(Load(engine.get(), 1, a).ok());
    ASSERT_TRUE(Load(engine.get(), 2, b).ok());
    std::vector<Req>* reqs = device == 0 ? &first : &second;
    st = QueryAll(engine.get(), reqs);
    ASSERT_TRUE(st.ok()) << "device " << device << ": " << st.ToString();
  }
  for (size_t r = 0; r < first.size(); ++r) {
    // The same kernels on the same inputs: equal up to reduction order, if any.
    const std::vector<double> want(first[r].out.begin(), first[r].out.end());
    EXPECT_LE(testing::RelativeError(second[r].out.data(), want.data(), want.size()), 1e-6)
        << "request " << r;
    for (size_t i = 0; i < first[r].lse.size(); ++i) {
      ASSERT_NEAR(second[r].lse[i], first[r].lse[i],
                  1e-5f * std::max(1.f, std::abs(first[r].lse[i])))
          << "request " << r << " row " << i;
    }
    for (size_t h = 0; h < first[r].selection.size(); ++h) {
      EXPECT_EQ(first[r].selection[h].clusters, second[r].selection[h].clusters);
    }
  }
}

TEST(GpuEngine, QueryGroupsMixedDtypesAndHeadDims) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  const Context a = MakeContext(rng, 4, 250, 64, 8, DType::kF32);
  const Context b = MakeContext(rng, 2, 400, 128, 16, DType::kF16);
  const Context c = MakeContext(rng, 2, 500, 128, 16, DType::kBF16, /*num_l1=*/20);
  ASSERT_TRUE(Load(engine.get(), 1, a).ok());
  ASSERT_TRUE(Load(engine.get(), 2, b).ok());
  ASSERT_TRUE(Load(engine.get(), 3, c).ok());
  std::vector<Req> reqs;
  reqs.push_back(MakeReq(rng, a, 1, 2, 2, Budget(0.1f)));
  reqs.push_back(MakeReq(rng, b, 2, 8, 1, Budget(0.15f)));
  reqs.push_back(MakeReq(rng, c, 3, 4, 1, Budget(0.1f)));  // two-level index
  reqs.push_back(MakeReq(rng, a, 1, 1, 30, Budget(0.3f)));
  reqs.push_back(MakeReq(rng, c, 3, 2, 50, Budget(0.05f)));
  Status st = QueryAll(engine.get(), &reqs);
  ASSERT_TRUE(st.ok()) << st.ToString();
  for (size_t i = 0; i < reqs.size(); ++i) CheckRequest(reqs[i], static_cast<int>(i));
}

TEST(GpuEngine, PlanRunAndGraphReplayMatchQuery) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  auto engine = MakeEngine(256ull << 20);
  ASSERT_NE(engine, nullptr);
  const Context a = MakeContext(rng, 8, 400, 128, 16, DType::kBF16);
  const Context b = MakeContext(rng, 8, 200, 128, 16, DType::kBF16);
  ASSERT_TRUE(Load(engine.get(), 5, a).ok());
  ASSERT_TRUE(Load(engine.get(), 6, b).ok());
  std::vector<DeviceQuery> dq = {
      {5, 32, 1, Budget(0.1f)}, {6, 32, 1, Budget(0.05f)}, {5, 32, 20, Budget(0.1f)}};
  std::unique_ptr<QueryPlan> plan;
  Status st = engine->Plan(dq, &plan);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(plan->num_requests(), 3);
  ASSERT_EQ(plan->total_rows(), 32 + 32 + 640);
  Stream stream;
  ASSERT_TRUE(Stream::Create(&stream).ok());
  const size_t rows = plan->total_rows(), d = 128;
  DeviceBuffer q, out, lse;
  ASSERT_TRUE(q.Allocate(rows * d * 4).ok());
  ASSERT_TRUE(out.Allocate(rows * d * 4).ok());
  ASSERT_TRUE(lse.Allocate(rows * 4).ok());
  const DeviceIO io{q.as<float>(), out.as<float>(), lse.as<float>()};
  std::unique_ptr<CapturedGraph> graph;

  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    // Fresh queries through the host path, the same queries through Run (or its graph).
    std::vector<Req> reqs;
    for (const DeviceQuery& x : dq) {
      reqs.push_back(MakeReq(rng, x.layer_key == 5 ? a : b, x.layer_key, 4, x.n, x.select));
    }
    ASSERT_TRUE(QueryAll(engine.get(), &reqs).ok());
    for (size_t r = 0; r < reqs.size(); ++r) {
      ASSERT_TRUE(q.CopyFromHost(reqs[r].q.data(), reqs[r].q.size() * 4,
                                 plan->row_offset(static_cast<int>(r)) * d * 4)
                      .ok());
    }
    ASSERT_TRUE(out.Fill(0xff).ok());
    ASSERT_TRUE(lse.Fill(0xff).ok());
    // Copies and fills ran on the legacy stream; `stream` does not wait for it.
    ASSERT_TRUE(Synchronize().ok());
    if (round == 0) {
      st = engine->Run(*plan, io, stream.get());
    } else {
      if (graph == nullptr) {
        st = CapturedGraph::Capture(
            stream.get(), [&] { return engine->Run(*plan, io, stream.get()); }, &graph);
        ASSERT_TRUE(st.ok()) << st.ToString();
      }
      st = graph->Replay(stream.get());
    }
    ASSERT_TRUE(st.ok()) << st.ToString();
    ASSERT_TRUE(stream.Sync().ok());
    std::vector<float> got_out(rows * d), got_lse(rows);
    ASSERT_TRUE(out.CopyToHost(got_out.data(), got_out.size() * 4).ok());
    ASSERT_TRUE(lse.CopyToHost(got_lse.data(), got_lse.size() * 4).ok());
    std::vector<std::vector<HeadSelection>> sel;
    ASSERT_TRUE(engine->ReadSelections(*plan, stream.get(), &sel).ok());
    ASSERT_EQ(sel.size(), reqs.size());
    for (size_t r = 0; r < reqs.size(); ++r) {
      const size_t at = plan->row_offset(static_cast<int>(r));
      // The same kernels on the same inputs: equal up to reduction order, if any.
      std::vector<double> want(reqs[r].out.begin(), reqs[r].out.end());
      EXPECT_LE(testing::RelativeError(got_out.data() + at * d, want.data(), want.size()), 1e-6)
          << "request " << r;
      for (size_t i = 0; i < reqs[r].lse.size(); ++i) {
        ASSERT_NEAR(got_lse[at + i], reqs[r].lse[i],
                    1e-5f * std::max(1.f, std::abs(reqs[r].lse[i])))
            << "request " << r << " row " << i;
      }
      ASSERT_EQ(sel[r].size(), reqs[r].selection.size());
      for (size_t h = 0; h < sel[r].size(); ++h) {
        EXPECT_EQ(sel[r][h].clusters, reqs[r].selection[h].clusters);
      }
    }
  }
  // Evicting a layer makes the plan stale.
  engine->EvictLayer(6);
  EXPECT_TRUE(engine->Run(*plan, io, stream.get()).IsInvalidArgument());
}

TEST(GpuEngine, PoolFillsEvictsAndReloads) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  auto engine = MakeEngine(32ull << 20);  // 512 slots of 64 KiB
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->pool_bytes(), 32ull << 20);
  // About 4 x 100 x 1.8 pages of 8 KiB: ~6 MB, so a handful of layers fill the pool.
  const Context c = MakeContext(rng, 4, 100, 128, 16, DType::kBF16);
  int loaded = 0;
  Status st;
  while ((st = Load(engine.get(), 100 + loaded, c)).ok()) ++loaded;
  EXPECT_TRUE(st.IsUnavailable()) << st.ToString();
  ASSERT_GE(loaded, 2);
  EXPECT_FALSE(engine->HasLayer(100 + loaded));
  const size_t used = engine->pool_used_bytes();
  EXPECT_LE(used, engine->pool_bytes());
  EXPECT_TRUE(Load(engine.get(), 100, c).code() == Status::Code::kAlreadyExists);
  engine->EvictLayer(100);
  EXPECT_FALSE(engine->HasLayer(100));
  EXPECT_LT(engine->pool_used_bytes(), used);
  ASSERT_TRUE(Load(engine.get(), 999, c).ok());
  // The reloaded layer (in recycled slots) answers like the CPU path.
  std::vector<Req> reqs;
  reqs.push_back(MakeReq(rng, c, 999, 4, 1, Budget(0.2f)));
  reqs.push_back(MakeReq(rng, c, 101, 4, 1, Budget(0.2f)));
  ASSERT_TRUE(QueryAll(engine.get(), &reqs).ok());
  for (size_t i = 0; i < reqs.size(); ++i) CheckRequest(reqs[i], static_cast<int>(i));
}

TEST(GpuEngine, RejectsBadRequests) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  const Context c = MakeContext(rng, 4, 100, 128, 16, DType::kBF16);
  ASSERT_TRUE(Load(engine.get(), 7, c).ok());
  auto one = [&](Req r) {
    std::vector<Req> v = {std::move(r)};
    return QueryAll(engine.get(), &v);
  };
  Req bad_heads = MakeReq(rng, c, 7, 1, 1, Budget(0.1f));
  bad_heads.q_heads = 6;  // not a multiple of 4 kv heads
  EXPECT_TRUE(one(bad_heads).IsInvalidArgument());
  Req bad_n = MakeReq(rng, c, 7, 1, 1, Budget(0.1f));
  bad_n.n = 0;
  EXPECT_TRUE(one(bad_n).IsInvalidArgument());
  Req nan_q = MakeReq(rng, c, 7, 1, 1, Budget(0.1f));
  nan_q.q[5] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(one(nan_q).IsInvalidArgument());
  Req missing = MakeReq(rng, c, 8, 1, 1, Budget(0.1f));
  EXPECT_TRUE(one(missing).IsNotFound());
  // A malformed index and a page size that does not divide the slot.
  std::vector<HeadIndex> broken = c.heads;
  broken[1].cluster_size[0] += 1;
  EXPECT_TRUE(engine->LoadLayer(9, DType::kBF16, 16, broken, c.pages.data()).IsInvalidArgument());
  const Context odd = MakeContext(rng, 1, 10, 128, 24, DType::kBF16);
  EXPECT_TRUE(Load(engine.get(), 10, odd).IsInvalidArgument());
  EXPECT_FALSE(engine->HasLayer(9));
}

}  // namespace
}  // namespace sqkv::gpu
