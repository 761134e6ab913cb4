// The engine's device tier (issue 4): the page pool's bookkeeping (no device needed), and
// QueryPaged on index-only and partly resident layers against Query on the same layers fully
// loaded (bit-identical outputs, lse and selections), the supplier asked for exactly the selected
// pages not resident, page-granular eviction in a tiny pool, pages in use never evicted, pins,
// preload, errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "gpu/device.h"
#include "gpu/device_buffer.h"
#include "gpu/engine.h"
#include "gpu/engine_pool.h"
#include "gpu/engine_upload.h"
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

// ---------------------------------------------------------------------------------------------
// PagePool (host bookkeeping only)

constexpr size_t kSlot = 64 << 10;

TEST(PagePool, AllocatesWithinSlotsAndReleasesEmptySlots) {
  PagePool pool(4, kSlot);  // 4 slots of 8 pages of 8 KiB
  std::set<int32_t> ids;
  for (uint32_t i = 0; i < 32; ++i) {
    const int32_t id = pool.Allocate(8 << 10, {1, i}, false, 1, false, nullptr);
    ASSERT_GE(id, 0);
    ASSERT_LT(id, 32);
    EXPECT_TRUE(ids.insert(id).second);
  }
  EXPECT_EQ(pool.Allocate(8 << 10, {1, 99}, false, 1, false, nullptr), -1);
  EXPECT_EQ(pool.slots_used(), 4u);
  EXPECT_EQ(pool.pages_used(), 32u);
  // The first 8 ids fill slot 0 in order (contiguous uploads).
  for (int32_t id = 0; id < 8; ++id)
    EXPECT_EQ(pool.OwnerOf(8 << 10, id).page, static_cast<uint32_t>(id));
  for (int32_t id = 8; id < 16; ++id) pool.Free(8 << 10, id);
  EXPECT_EQ(pool.slots_used(), 3u);
  // A 16 KiB page takes the freed slot (4 per slot).
  const int32_t big = pool.Allocate(16 << 10, {2, 0}, false, 1, false, nullptr);
  EXPECT_EQ(big / 4, 1);
  EXPECT_EQ(pool.page_bytes_used(), 24u * (8 << 10) + (16 << 10));
}

TEST(PagePool, ClockSkipsPinnedAndInUseAndGivesSecondChances) {
  PagePool pool(1, kSlot);  // 8 pages of 8 KiB
  const size_t pb = 8 << 10;
  for (uint32_t i = 0; i < 8; ++i) {
    ASSERT_EQ(pool.Allocate(pb, {0, i}, /*pinned=*/i == 0, /*epoch=*/1, false, nullptr),
              static_cast<int32_t>(i));
  }
  pool.Touch(pb, 2, 2);   // in use in epoch 2
  pool.Reference(pb, 3);  // referenced: passed over once
  std::vector<PoolOwner> evicted;
  const int32_t a = pool.Allocate(pb, {1, 0}, false, 2, true, &evicted);
  ASSERT_EQ(evicted.size(), 1u);
  EXPECT_EQ(a, 1);  // 0 pinned, then 1 (bit clear)
  EXPECT_EQ(evicted[0].page, 1u);
  evicted.clear();
  const int32_t b = pool.Allocate(pb, {1, 1}, false, 2, true, &evicted);
  EXPECT_EQ(b, 4);  // 2 in use, 3 referenced (bit cleared)
  // Everything but the pinned page and the pages in use in epoch 2 can go; ask for more than that.
  int got = 0;
  for (uint32_t i = 2; i < 20; ++i) {
    evicted.clear();
    if (pool.Allocate(pb, {1, i}, false, 2, true, &evicted) < 0) break;
    ++got;
  }
  // Pages 3, 5, 6, 7 were evictable: four more, then nothing (all pinned or in use).
  EXPECT_EQ(got, 4);
  EXPECT_EQ(pool.OwnerOf(pb, 0).layer, 0u);  // the pinned page stayed
  EXPECT_EQ(pool.OwnerOf(pb, 2).layer, 0u);  // the page in use stayed
  EXPECT_EQ(pool.evictions(), 6u);
}

TEST(PagePool, StealsWholeSlotsOfAnotherSize) {
  PagePool pool(2, kSlot);
  std::vector<PoolOwner> evicted;
  for (uint32_t i = 0; i < 16; ++i)
    ASSERT_GE(pool.Allocate(8 << 10, {0, i}, i < 8, 1, true, &evicted), 0);
  // No free slot: a 16 KiB page evicts the whole unpinned slot (8 pages) of the 8 KiB class.
  const int32_t id = pool.Allocate(16 << 10, {1, 0}, false, 2, true, &evicted);
  ASSERT_GE(id, 0);
  EXPECT_EQ(id / 4, 1);
  EXPECT_EQ(evicted.size(), 8u);
  for (const PoolOwner& o : evicted) EXPECT_GE(o.page, 8u);
  EXPECT_EQ(pool.pages_used(), 9u);
  // Both slots pinned or in use now: nothing more of either size.
  evicted.clear();
  EXPECT_EQ(pool.Allocate(32 << 10, {2, 0}, false, 2, true, &evicted), -1);
}

// ---------------------------------------------------------------------------------------------
// The engine

// The host tier as the test plays it: every layer's pages in pinned or pageable memory, and a
// record of what the engine asked for.
class HostTier {
 public:
  explicit HostTier(bool pinned) : pinned_(pinned) {}
  void Add(uint64_t key, const Context* c) {
    Layer& l = layers_[key];
    l.ctx = c;
    if (pinned_) {
      ASSERT_TRUE(l.pinned.Reserve(c->pages.size()).ok());
      std::memcpy(l.pinned.host(), c->pages.data(), c->pages.size());
      l.base = static_cast<const uint8_t*>(l.pinned.host());
    } else {
      l.base = c->pages.data();
    }
  }
  PageSupplier Supplier() {
    return [this](uint64_t key, int head, const std::vector<int32_t>& pages,
                  std::vector<const void*>* out) -> Status {
      ++calls;
      if (fail) return Status::IOError("injected");
      auto it = layers_.find(key);
      if (it == layers_.end()) return Status::NotFound("no such layer");
      const Context& c = *it->second.ctx;
      out->clear();
      for (size_t i = 0; i < pages.size(); ++i) {
        EXPECT_TRUE(i == 0 || pages[i] > pages[i - 1]) << "pages ascending and distinct";
        EXPECT_GE(pages[i], 0);
        EXPECT_LT(pages[i], c.heads[head].num_pages());
        ++asked[{key, head, pages[i]}];
        out->push_back(it->second.base + (c.head_page_base[head] + pages[i]) * c.page_bytes());
      }
      if (short_answer) out->pop_back();
      return Status::Ok();
    };
  }
  std::map<std::tuple<uint64_t, int, int32_t>, int> asked;
  int calls = 0;
  bool fail = false;
  bool short_answer = false;

 private:
  struct Layer {
    const Context* ctx = nullptr;
    const uint8_t* base = nullptr;
    PinnedBuffer pinned;
  };
  bool pinned_;
  std::map<uint64_t, Layer> layers_;
};

std::vector<QueryRequest> Requests(std::vector<Req>* reqs) {
  std::vector<QueryRequest> qs;
  for (Req& r : *reqs) {
    std::fill(r.out.begin(), r.out.end(), std::numeric_limits<float>::quiet_NaN());
    std::fill(r.lse.begin(), r.lse.end(), std::numeric_limits<float>::quiet_NaN());
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
  return qs;
}

// Bit-identical outputs, lse and selections.
void ExpectSame(const std::vector<Req>& got, const std::vector<Req>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t r = 0; r < got.size(); ++r) {
    SCOPED_TRACE("request " + std::to_string(r));
    ASSERT_EQ(got[r].out.size(), want[r].out.size());
    EXPECT_EQ(std::memcmp(got[r].out.data(), want[r].out.data(), got[r].out.size() * 4), 0);
    EXPECT_EQ(std::memcmp(got[r].lse.data(), want[r].lse.data(), got[r].lse.size() * 4), 0);
    ASSERT_EQ(got[r].selection.size(), want[r].selection.size());
    for (size_t h = 0; h < got[r].selection.size(); ++h) {
      EXPECT_EQ(got[r].selection[h].clusters, want[r].selection[h].clusters) << "head " << h;
      EXPECT_EQ(got[r].selection[h].pages, want[r].selection[h].pages) << "head " << h;
      EXPECT_EQ(got[r].selection[h].tokens, want[r].selection[h].tokens) << "head " << h;
    }
  }
}

// Pages selected by a batch, per (layer, head, page).
std::set<std::tuple<uint64_t, int, int32_t>> SelectedPages(const std::vector<Req>& reqs,
                                                           int64_t* total) {
  std::set<std::tuple<uint64_t, int, int32_t>> s;
  *total = 0;
  for (const Req& r : reqs) {
    for (size_t h = 0; h < r.selection.size(); ++h) {
      const HeadIndex& x = r.ctx->heads[h];
      *total += r.selection[h].pages;
      for (int32_t c : r.selection[h].clusters) {
        for (int32_t p = x.cluster_page_begin[c]; p < x.cluster_page_begin[c + 1]; ++p) {
          s.insert({r.key, static_cast<int>(h), p});
        }
      }
    }
  }
  return s;
}

// Copies of a batch with the same q (the paged engine's run) and its reference run.
std::vector<Req> Twin(const std::vector<Req>& reqs) { return reqs; }

struct Mode {
  const char* name;
  EngineOptions::Upload upload;
  bool pinned_host;
};

class PagedQuery : public ::testing::TestWithParam<Mode> {};

TEST_P(PagedQuery, EqualsQueryOnFullyLoadedLayersAndAsksOnlyForSelectedPages) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  const Mode mode = GetParam();
  auto ref = MakeEngine(256ull << 20);
  auto paged = MakeEngine(256ull << 20, mode.upload);
  ASSERT_NE(ref, nullptr);
  ASSERT_NE(paged, nullptr);
  const Context a = MakeContext(rng, 8, 300, 128, 16, DType::kBF16);
  const Context b = MakeContext(rng, 2, 600, 128, 16, DType::kBF16, /*num_l1=*/24);
  const Context c = MakeContext(rng, 4, 200, 64, 8, DType::kF32);
  HostTier host(mode.pinned_host);
  const std::vector<std::pair<uint64_t, const Context*>> layers = {{1, &a}, {2, &b}, {3, &c}};
  for (const auto& [key, ctx] : layers) {
    ASSERT_TRUE(
        ref->LoadLayer(key, ctx->dtype, ctx->page_tokens, ctx->heads, ctx->pages.data()).ok());
    ASSERT_TRUE(paged->LoadLayerIndex(key, ctx->dtype, ctx->page_tokens, ctx->heads).ok());
    host.Add(key, ctx);
    const LayerResidency res = paged->Residency(key);
    EXPECT_TRUE(res.indexed);
    EXPECT_EQ(res.pages_resident, 0u);
    EXPECT_GT(res.index_bytes, 0u);
  }
  EXPECT_EQ(paged->counters().pages_resident, 0u);
  EXPECT_EQ(paged->pool_used_bytes(), 0u);
  SelectOptions threshold;
  threshold.mode = SelectOptions::Mode::kThreshold;
  threshold.threshold = 1.f / 3000;

  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    std::vector<Req> want;
    want.push_back(MakeReq(rng, a, 1, 4, 1, Budget(0.1f)));   // decode
    want.push_back(MakeReq(rng, b, 2, 2, 3, Budget(0.05f)));  // two-level index
    want.push_back(MakeReq(rng, a, 1, 1, 40, Budget(0.2f)));  // tiled path, same layer again
    want.push_back(MakeReq(rng, c, 3, 2, 2, threshold));      // another group (f32, d 64)
    want.push_back(MakeReq(rng, a, 1, 4, 1, Budget(0.f)));    // selects nothing
    std::vector<Req> got = Twin(want);
    ASSERT_TRUE(ref->Query(Requests(&want)).ok());
    // Which pages the paged engine holds before this batch.
    std::set<std::tuple<uint64_t, int, int32_t>> before;
    for (const auto& [k, n] : host.asked) before.insert(k);
    const auto asked_before = host.asked;
    PagingStats stats;
    Status st = paged->QueryPaged(Requests(&got), host.Supplier(), &stats);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ExpectSame(got, want);

    int64_t selected = 0;
    const auto pages = SelectedPages(want, &selected);
    EXPECT_EQ(stats.pages_selected, selected);
    // Asked for exactly the selected pages not held before, each once ever (the pool is large).
    std::set<std::tuple<uint64_t, int, int32_t>> new_pages;
    for (const auto& p : pages) {
      if (before.count(p) == 0) new_pages.insert(p);
    }
    std::set<std::tuple<uint64_t, int, int32_t>> asked_now;
    for (const auto& [k, n] : host.asked) {
      EXPECT_EQ(n, 1) << "page asked for twice";
      if (asked_before.count(k) == 0) asked_now.insert(k);
    }
    EXPECT_EQ(asked_now, new_pages);
    EXPECT_EQ(stats.pages_uploaded, static_cast<int64_t>(new_pages.size()));
    int64_t new_bytes = 0;
    for (const auto& p : new_pages) {
      new_bytes += static_cast<int64_t>((std::get<0>(p) == 3 ? c : a).page_bytes());
    }
    EXPECT_EQ(stats.bytes_uploaded, new_bytes);
    EXPECT_EQ(stats.pages_evicted, 0);
    EXPECT_EQ(stats.round_trips, 2);  // neither group's layers are fully resident
    // Selected positions (duplicates across requests counted) whose page was held before.
    int64_t held = 0;
    for (const Req& r : want) {
      for (size_t h = 0; h < r.selection.size(); ++h) {
        const HeadIndex& x = r.ctx->heads[h];
        for (int32_t cl : r.selection[h].clusters) {
          for (int32_t p = x.cluster_page_begin[cl]; p < x.cluster_page_begin[cl + 1]; ++p) {
            held += before.count({r.key, static_cast<int>(h), p});
          }
        }
      }
    }
    EXPECT_EQ(stats.pages_from_device, held);
    if (!new_pages.empty()) {
      EXPECT_GT(stats.upload_us, 0.0);
    }

    // The same batch again: everything resident, the supplier is not called.
    const int calls = host.calls;
    std::vector<Req> again = Twin(want);
    ASSERT_TRUE(paged->QueryPaged(Requests(&again), host.Supplier(), &stats).ok());
    ExpectSame(again, want);
    EXPECT_EQ(host.calls, calls);
    EXPECT_EQ(stats.pages_uploaded, 0);
    EXPECT_EQ(stats.pages_from_device, selected);
  }
  const EngineCounters k = paged->counters();
  EXPECT_EQ(k.pages_evicted, 0u);
  EXPECT_EQ(k.pages_uploaded, host.asked.size());
  EXPECT_GT(k.hits, 0u);
  EXPECT_GE(k.misses, k.pages_uploaded);  // a page two requests miss is uploaded once
  EXPECT_EQ(k.layers, 3u);
}

INSTANTIATE_TEST_SUITE_P(
    Uploads, PagedQuery,
    ::testing::Values(Mode{"GatherFromPinned", EngineOptions::Upload::kAuto, true},
                      Mode{"CopyFromPageable", EngineOptions::Upload::kAuto, false},
                      Mode{"CopyEngineFromPinned", EngineOptions::Upload::kCopyEngine, true},
                      Mode{"BatchCopyFromPinned", EngineOptions::Upload::kBatchCopy, true}),
    [](const ::testing::TestParamInfo<Mode>& i) { return std::string(i.param.name); });

TEST(GpuEnginePaging, FullyResidentLayersTakeTheQueryPath) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  auto e = MakeEngine(64ull << 20);
  ASSERT_NE(e, nullptr);
  const Context a = MakeContext(rng, 4, 200, 128, 16, DType::kBF16);
  ASSERT_TRUE(e->LoadLayer(7, a.dtype, a.page_tokens, a.heads, a.pages.data()).ok());
  HostTier host(true);
  std::vector<Req> want = {MakeReq(rng, a, 7, 4, 1, Budget(0.1f)),
                           MakeReq(rng, a, 7, 2, 20, Budget(0.3f))};
  std::vector<Req> got = Twin(want);
  ASSERT_TRUE(e->Query(Requests(&want)).ok());
  PagingStats stats;
  ASSERT_TRUE(e->QueryPaged(Requests(&got), host.Supplier(), &stats).ok());
  ExpectSame(got, want);
  EXPECT_EQ(host.calls, 0);
  EXPECT_EQ(stats.round_trips, 0);
  int64_t selected = 0;
  SelectedPages(want, &selected);
  EXPECT_EQ(stats.pages_selected, selected);
  EXPECT_EQ(stats.pages_from_device, selected);
  // Pre-loaded through the supplier instead: the same.
  ASSERT_TRUE(e->LoadLayerIndex(8, a.dtype, a.page_tokens, a.heads).ok());
  host.Add(8, &a);
  ASSERT_TRUE(e->Query(Requests(&got)).ok());  // layer 7 still fully resident
  std::vector<Req> on8 = Twin(want);
  for (Req& r : on8) r.key = 8;
  EXPECT_TRUE(e->Query(Requests(&on8)).IsUnavailable());  // index only
  std::unique_ptr<QueryPlan> plan;
  EXPECT_TRUE(e->Plan({{8, 16, 1, Budget(0.1f)}}, &plan).IsUnavailable());
  ASSERT_TRUE(e->PreloadLayer(8, host.Supplier(), &stats).ok());
  EXPECT_EQ(host.calls, 4);  // one per kv head
  EXPECT_EQ(stats.pages_uploaded, static_cast<int64_t>(e->Residency(8).pages_total));
  EXPECT_EQ(e->Residency(8).pages_resident, e->Residency(8).pages_total);
  ASSERT_TRUE(e->Query(Requests(&on8)).ok());
  ExpectSame(on8, want);
}

TEST(GpuEnginePaging, TinyPoolEvictsPagesAcrossManyLayersAndStaysExact) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  auto ref = MakeEngine(256ull << 20);
  auto paged = MakeEngine(2ull << 20);  // 256 pages of 8 KiB; each layer has ~720
  ASSERT_NE(ref, nullptr);
  ASSERT_NE(paged, nullptr);
  constexpr int kLayers = 12;
  std::vector<Context> ctx;
  for (int i = 0; i < kLayers; ++i) ctx.push_back(MakeContext(rng, 4, 100, 128, 16, DType::kBF16));
  HostTier host(true);
  for (int i = 0; i < kLayers; ++i) {
    const Context& c = ctx[i];
    ASSERT_TRUE(ref->LoadLayer(100 + i, c.dtype, c.page_tokens, c.heads, c.pages.data()).ok());
    ASSERT_TRUE(paged->LoadLayerIndex(100 + i, c.dtype, c.page_tokens, c.heads).ok());
    host.Add(100 + i, &c);
  }
  std::uniform_int_distribution<int> pick(0, kLayers - 1);
  std::uniform_int_distribution<int> batch(1, 3);
  int64_t evicted = 0, from_device = 0;
  for (int it = 0; it < 60; ++it) {
    SCOPED_TRACE("iteration " + std::to_string(it));
    std::vector<Req> want;
    const int n = batch(rng);
    for (int j = 0; j < n; ++j) {
      const int l = it % 5 == 0 ? 0 : pick(rng);  // layer 0 comes back often
      want.push_back(MakeReq(rng, ctx[l], 100 + l, 2, 1 + j, Budget(0.04f)));
    }
    std::vector<Req> got = Twin(want);
    ASSERT_TRUE(ref->Query(Requests(&want)).ok());
    PagingStats stats;
    Status st = paged->QueryPaged(Requests(&got), host.Supplier(), &stats);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ExpectSame(got, want);
    evicted += stats.pages_evicted;
    from_device += stats.pages_from_device;
    const EngineCounters k = paged->counters();
    ASSERT_LE(k.pool_used_bytes, k.pool_bytes);
    ASSERT_LE(k.pages_resident, 256u);
  }
  EXPECT_GT(evicted, 0);
  EXPECT_GT(from_device, 0);
  EXPECT_EQ(paged->counters().pages_evicted, static_cast<uint64_t>(evicted));
  size_t resident = 0;
  for (int i = 0; i < kLayers; ++i) resident += paged->Residency(100 + i).pages_resident;
  EXPECT_EQ(resident, paged->counters().pages_resident);
  // No layer fits: every one is partly resident.
  for (int i = 0; i < kLayers; ++i) {
    EXPECT_LT(paged->Residency(100 + i).pages_resident, paged->Residency(100 + i).pages_total);
  }
}

TEST(GpuEnginePaging, PoolSmallerThanOneQueryAnswersUnavailableAndStaysConsistent) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  auto ref = MakeEngine(64ull << 20);
  auto paged = MakeEngine(512ull << 10);  // 64 pages of 8 KiB
  ASSERT_NE(ref, nullptr);
  ASSERT_NE(paged, nullptr);
  const Context a = MakeContext(rng, 4, 100, 128, 16, DType::kBF16);
  ASSERT_TRUE(ref->LoadLayer(1, a.dtype, a.page_tokens, a.heads, a.pages.data()).ok());
  ASSERT_TRUE(paged->LoadLayerIndex(1, a.dtype, a.page_tokens, a.heads).ok());
  HostTier host(true);
  host.Add(1, &a);
  // Fill the pool with a small query's pages first.
  std::vector<Req> small = {MakeReq(rng, a, 1, 1, 1, Budget(0.02f))};
  std::vector<Req> small_got = Twin(small);
  ASSERT_TRUE(ref->Query(Requests(&small)).ok());
  ASSERT_TRUE(paged->QueryPaged(Requests(&small_got), host.Supplier(), nullptr).ok());
  ExpectSame(small_got, small);
  const EngineCounters before = paged->counters();
  // Dense: every page of the layer (~720) at once.
  SelectOptions dense;
  dense.mode = SelectOptions::Mode::kDense;
  std::vector<Req> big = {MakeReq(rng, a, 1, 1, 1, dense)};
  Status st = paged->QueryPaged(Requests(&big), host.Supplier(), nullptr);
  EXPECT_TRUE(st.IsUnavailable()) << st.ToString();
  EXPECT_NE(st.message().find("device page pool"), std::string::npos) << st.message();
  const EngineCounters after = paged->counters();
  EXPECT_EQ(after.unavailable, before.unavailable + 1);
  EXPECT_EQ(after.pages_uploaded, before.pages_uploaded);
  // Resident pages may have been evicted on the way, never half-replaced: the small query and
  // others still answer exactly.
  EXPECT_EQ(paged->Residency(1).pages_resident, after.pages_resident);
  for (int i = 0; i < 5; ++i) {
    std::vector<Req> want = {MakeReq(rng, a, 1, 2, 1, Budget(0.03f))};
    std::vector<Req> got = Twin(want);
    ASSERT_TRUE(ref->Query(Requests(&want)).ok());
    st = paged->QueryPaged(Requests(&got), host.Supplier(), nullptr);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ExpectSame(got, want);
  }
}

TEST(GpuEnginePaging, PinnedLayersStayAndSupplierErrorsLeaveNoTrace) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  auto ref = MakeEngine(64ull << 20);
  auto paged = MakeEngine(2ull << 20);  // 256 pages of 8 KiB
  ASSERT_NE(ref, nullptr);
  ASSERT_NE(paged, nullptr);
  const Context pinned = MakeContext(rng, 2, 20, 128, 16, DType::kBF16);  // ~72 pages
  const Context other = MakeContext(rng, 4, 100, 128, 16, DType::kBF16);
  HostTier host(true);
  for (auto [key, c] : {std::pair<uint64_t, const Context*>{1, &pinned}, {2, &other}}) {
    ASSERT_TRUE(ref->LoadLayer(key, c->dtype, c->page_tokens, c->heads, c->pages.data()).ok());
    ASSERT_TRUE(paged->LoadLayerIndex(key, c->dtype, c->page_tokens, c->heads).ok());
    host.Add(key, c);
  }
  EXPECT_TRUE(paged->PinLayer(9).IsNotFound());
  ASSERT_TRUE(paged->PinLayer(1).ok());
  ASSERT_TRUE(paged->PreloadLayer(1, host.Supplier(), nullptr).ok());
  const size_t total = paged->Residency(1).pages_total;
  ASSERT_EQ(paged->Residency(1).pages_resident, total);
  EXPECT_TRUE(paged->Residency(1).pinned);
  std::unique_ptr<QueryPlan> plan;
  ASSERT_TRUE(paged->Plan({{1, 4, 1, Budget(0.2f)}}, &plan).ok());
  // Real device buffers, so a refused Run below can only be the stale plan.
  const size_t rows = plan->total_rows(), d = pinned.head_dim;
  DeviceBuffer q_dev, out_dev, lse_dev;
  ASSERT_TRUE(q_dev.Allocate(rows * d * sizeof(float)).ok());
  ASSERT_TRUE(out_dev.Allocate(rows * d * sizeof(float)).ok());
  ASSERT_TRUE(lse_dev.Allocate(rows * sizeof(float)).ok());
  const std::vector<float> q_host = testing::RandomNormal(rows * d, rng);
  ASSERT_TRUE(q_dev.CopyFromHost(q_host.data(), q_host.size() * sizeof(float), 0).ok());
  ASSERT_TRUE(Synchronize().ok());
  const DeviceIO io{q_dev.as<float>(), out_dev.as<float>(), lse_dev.as<float>()};
  Status ran = paged->Run(*plan, io, nullptr);
  ASSERT_TRUE(ran.ok()) << ran.ToString();
  ASSERT_TRUE(Synchronize().ok());
  // Many queries on the other layer cycle the rest of the pool; the pinned layer stays.
  for (int i = 0; i < 20; ++i) {
    std::vector<Req> want = {MakeReq(rng, other, 2, 2, 1, Budget(0.1f))};
    std::vector<Req> got = Twin(want);
    ASSERT_TRUE(ref->Query(Requests(&want)).ok());
    Status st = paged->QueryPaged(Requests(&got), host.Supplier(), nullptr);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ExpectSame(got, want);
  }
  EXPECT_GT(paged->counters().pages_evicted, 0u);
  EXPECT_EQ(paged->Residency(1).pages_resident, total);
  EXPECT_EQ(paged->counters().pinned_layers, 1u);
  std::vector<Req> want = {MakeReq(rng, pinned, 1, 2, 1, Budget(0.2f))};
  std::vector<Req> got = Twin(want);
  ASSERT_TRUE(ref->Query(Requests(&want)).ok());
  ASSERT_TRUE(paged->Query(Requests(&got)).ok());  // fully resident: the plain path
  ExpectSame(got, want);

  // A failing supplier: the error comes back, nothing is uploaded or leaked.
  const EngineCounters before = paged->counters();
  host.fail = true;
  std::vector<Req> bad = {MakeReq(rng, other, 2, 2, 1, Budget(0.1f))};
  Status st = paged->QueryPaged(Requests(&bad), host.Supplier(), nullptr);
  EXPECT_EQ(st.code(), Status::Code::kIOError) << st.ToString();
  EXPECT_NE(st.message().find("layer 2"), std::string::npos) << st.message();
  host.fail = false;
  host.short_answer = true;
  EXPECT_TRUE(paged->QueryPaged(Requests(&bad), host.Supplier(), nullptr).IsInvalidArgument());
  host.short_answer = false;
  const EngineCounters after = paged->counters();
  EXPECT_EQ(after.pages_uploaded, before.pages_uploaded);
  EXPECT_LE(after.pages_resident, before.pages_resident);  // evictions may have happened
  EXPECT_EQ(paged->Residency(2).pages_resident + total, after.pages_resident);

  // Unpinned, the layer's pages can go; its plan goes stale when one does.
  ASSERT_TRUE(paged->UnpinLayer(1).ok());
  for (int i = 0; i < 20 && paged->Residency(1).pages_resident == total; ++i) {
    std::vector<Req> w = {MakeReq(rng, other, 2, 2, 1, Budget(0.25f))};
    ASSERT_TRUE(paged->QueryPaged(Requests(&w), host.Supplier(), nullptr).ok());
  }
  EXPECT_LT(paged->Residency(1).pages_resident, total);
  ran = paged->Run(*plan, io, nullptr);
  EXPECT_TRUE(ran.IsInvalidArgument()) << ran.ToString();
  paged->EvictLayer(1);
  paged->EvictLayer(2);
  EXPECT_EQ(paged->counters().pages_resident, 0u);
  EXPECT_EQ(paged->pool_used_bytes(), 0u);
  EXPECT_EQ(paged->counters().index_bytes, 0u);
}

}  // namespace
}  // namespace sqkv::gpu
