// The host tier through the Store: cold queries read only the selected pages, warm ones none;
// memory stays bounded over many contexts; results equal the uncached path; pins persist.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "api/store.h"
#include "api/synthetic.h"
#include "tests/testing/testing.h"

namespace sqkv {
namespace {

class TiersTest : public ::testing::Test {
 protected:
  void Open(size_t cache_bytes, size_t index_bytes = size_t{1} << 30) {
    store_.reset();
    StoreOptions o;
    o.data_dir = dir_.file("data");
    o.host_cache_bytes = cache_bytes;
    o.index_cache_bytes = index_bytes;
    ASSERT_TRUE(Store::Open(o, &store_).ok());
  }
  std::vector<float> Import(const std::string& name, int tokens, uint64_t seed) {
    SyntheticOptions so;
    so.layers = 2;
    so.kv_heads = 2;
    so.q_heads = 8;
    so.tokens = tokens;
    so.head_dim = 64;
    so.window = 0;
    so.seed = seed;
    std::vector<float> q;
    EXPECT_TRUE(WriteSyntheticContext(so, dir_.file(name + ".st"), &q).ok());
    EXPECT_TRUE(store_->Import(name, dir_.file(name + ".st"), {}, nullptr).ok());
    return q;
  }
  QueryResult Query(const std::string& name, const std::vector<float>& q, float keep,
                    int layer = 1) {
    QueryOptions qo;
    qo.device = Device::kCpu;
    qo.select.keep_fraction = keep;
    QueryResult r;
    Status s = store_->Query(name, layer, q.data(), 8, 4, 64, qo, &r);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return r;
  }
  testing::ScratchDir dir_;
  std::unique_ptr<Store> store_;
};

TEST_F(TiersTest, ColdQueryReadsOnlySelectedPagesWarmQueryReadsNone) {
  Open(64 << 20);
  auto q = Import("c", 4096, testing::FreshSeed());
  ContextInfo info;
  ASSERT_TRUE(store_->Info("c", &info).ok());
  QueryResult cold = Query("c", q, 0.1f);
  const int64_t layer_pages = static_cast<int64_t>(info.layer_first_page[2] - info.layer_first_page[1]);
  EXPECT_EQ(cold.stats.pages_from_disk, cold.stats.pages_selected);
  EXPECT_LE(cold.stats.pages_from_disk * 5, layer_pages);  // ~10% of the layer's pages, not all
  QueryResult warm = Query("c", q, 0.1f);
  EXPECT_EQ(warm.stats.pages_from_disk, 0);
  EXPECT_EQ(warm.stats.disk_bytes_read, 0);
  EXPECT_EQ(warm.stats.pages_from_host, warm.stats.pages_selected);
  EXPECT_EQ(cold.output, warm.output);
  EXPECT_EQ(cold.lse, warm.lse);
  TierStats ts;
  ASSERT_TRUE(store_->GetTierStats(&ts).ok());
  EXPECT_EQ(ts.host_misses, static_cast<uint64_t>(cold.stats.pages_selected));
  EXPECT_GE(ts.host_hits, static_cast<uint64_t>(warm.stats.pages_selected));
  EXPECT_GT(ts.disk_reads, 0u);
}

// The decoded layer indexes stay within their byte bound (one layer's worth here: every query
// decodes again), answers equal those of a store that keeps every index, and the stats count
// what happened.
TEST_F(TiersTest, LayerIndexCacheStaysWithinItsByteBound) {
  Open(64 << 20);
  std::mt19937_64 rng(testing::FreshSeed());
  std::vector<std::vector<float>> queries;
  for (int i = 0; i < 3; ++i) queries.push_back(Import("c" + std::to_string(i), 2048, rng()));
  std::vector<QueryResult> want;
  for (int i = 0; i < 3; ++i) {
    for (int layer = 0; layer < 2; ++layer) {
      want.push_back(Query("c" + std::to_string(i), queries[i], 0.2f, layer));
    }
  }
  TierStats big;
  ASSERT_TRUE(store_->GetTierStats(&big).ok());
  EXPECT_EQ(big.index_layers_cached, 6u);
  EXPECT_EQ(big.index_layers_decoded, 6u);
  EXPECT_EQ(big.index_layers_evicted, 0u);
  const uint64_t per_layer = big.index_bytes_cached / 6;
  ASSERT_GT(per_layer, 0u);

  // A bound of about 2.5 layers: at most two stay.
  const size_t bound = static_cast<size_t>(per_layer * 5 / 2);
  Open(64 << 20, bound);
  size_t k = 0;
  for (int round = 0; round < 2; ++round) {
    k = 0;
    for (int i = 0; i < 3; ++i) {
      for (int layer = 0; layer < 2; ++layer, ++k) {
        QueryResult got = Query("c" + std::to_string(i), queries[i], 0.2f, layer);
        EXPECT_EQ(got.output, want[k].output) << "context " << i << " layer " << layer;
        EXPECT_EQ(got.lse, want[k].lse);
        TierStats ts;
        ASSERT_TRUE(store_->GetTierStats(&ts).ok());
        EXPECT_LE(ts.index_bytes_cached, bound);
        EXPECT_LE(ts.index_layers_cached, 2u);
        EXPECT_EQ(ts.index_capacity_bytes, bound);
      }
    }
  }
  TierStats small;
  ASSERT_TRUE(store_->GetTierStats(&small).ok());
  EXPECT_EQ(small.index_layers_decoded, 12u);  // 6 layers cycled twice through room for 2
  EXPECT_EQ(small.index_layers_evicted, 10u);

  // A bound below one layer still answers: the layer in use stays, alone.
  Open(64 << 20, 1);
  QueryResult got = Query("c0", queries[0], 0.2f, 0);
  EXPECT_EQ(got.output, want[0].output);
  TierStats one;
  ASSERT_TRUE(store_->GetTierStats(&one).ok());
  EXPECT_EQ(one.index_layers_cached, 1u);
}

// Many contexts through a cache far smaller than their total: memory never exceeds the bound, and
// every answer equals the one from a store whose cache holds everything.
TEST_F(TiersTest, BoundedMemoryOverManyContextsAndSameAnswers) {
  const size_t small = 2 << 20;  // 2 MiB against ~1 MiB per context x 12
  Open(small);
  std::mt19937_64 rng(testing::FreshSeed());
  std::vector<std::vector<float>> queries;
  for (int i = 0; i < 12; ++i) queries.push_back(Import("c" + std::to_string(i), 2048, rng()));
  std::vector<QueryResult> first;
  std::uniform_int_distribution<int> pick(0, 11);
  std::vector<int> order;
  for (int i = 0; i < 60; ++i) order.push_back(pick(rng));
  for (int i : order) {
    first.push_back(Query("c" + std::to_string(i), queries[i], 0.3f));
    TierStats ts;
    ASSERT_TRUE(store_->GetTierStats(&ts).ok());
    ASSERT_LE(ts.host_bytes_in_use, small);
  }
  TierStats ts;
  ASSERT_TRUE(store_->GetTierStats(&ts).ok());
  EXPECT_GT(ts.host_evictions, 0u);
  Open(1ull << 30);
  for (size_t k = 0; k < order.size(); ++k) {
    QueryResult again = Query("c" + std::to_string(order[k]), queries[order[k]], 0.3f);
    ASSERT_EQ(again.output, first[k].output) << "query " << k;
    ASSERT_EQ(again.lse, first[k].lse);
  }
}

TEST_F(TiersTest, PinSurvivesRestartAndKeepsPagesResident) {
  Open(4 << 20);
  auto q = Import("hot", 2048, testing::FreshSeed());
  ASSERT_TRUE(store_->Pin("hot", Tier::kHost).ok());
  std::vector<std::pair<std::string, Tier>> pins;
  ASSERT_TRUE(store_->ListPins(&pins).ok());
  ASSERT_EQ(pins.size(), 1u);
  // The pin loaded everything: the first query reads nothing from disk.
  EXPECT_EQ(Query("hot", q, 0.5f).stats.pages_from_disk, 0);
  Open(4 << 20);  // restart
  ASSERT_TRUE(store_->ListPins(&pins).ok());
  ASSERT_EQ(pins.size(), 1u);
  EXPECT_EQ(pins[0].first, "hot");
  EXPECT_EQ(pins[0].second, Tier::kHost);
  Query("hot", q, 1.0f);  // pages come in once and stay: other traffic cannot evict them
  for (int i = 0; i < 3; ++i) {
    auto other = Import("cold" + std::to_string(i), 2048, 100 + i);
    Query("cold" + std::to_string(i), other, 1.0f);
  }
  EXPECT_EQ(Query("hot", q, 1.0f).stats.pages_from_disk, 0);
  ASSERT_TRUE(store_->Unpin("hot").ok());
  ASSERT_TRUE(store_->ListPins(&pins).ok());
  EXPECT_TRUE(pins.empty());
  // A context too big for the cache cannot be pinned; nothing stays half pinned.
  Open(1 << 20);
  auto big = Import("big", 8192, 7);
  EXPECT_TRUE(store_->Pin("big", Tier::kHost).IsUnavailable());
  ASSERT_TRUE(store_->ListPins(&pins).ok());
  EXPECT_TRUE(pins.empty());
  // Queries larger than the cache still run (read around the cache).
  QueryResult r = Query("big", big, 1.0f);
  EXPECT_EQ(r.stats.pages_from_disk, r.stats.pages_selected);
}

// Several threads query different contexts through a cache too small for them all (evictions
// while other threads hold pages), each answer checked against the one computed alone first.
// Run under ThreadSanitizer with -DSQKV_SANITIZE=thread (see README).
TEST_F(TiersTest, ConcurrentQueriesOnManyContexts) {
  Open(1 << 20);
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kContexts = 6, kThreads = 4, kRounds = 12;
  std::vector<std::vector<float>> queries;
  std::vector<QueryResult> alone;
  for (int i = 0; i < kContexts; ++i) {
    queries.push_back(Import("c" + std::to_string(i), 1024, rng()));
    alone.push_back(Query("c" + std::to_string(i), queries.back(), 0.5f));
  }
  std::atomic<int> mismatches{0}, failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < kRounds; ++round) {
        const int c = (t * 7 + round * 3) % kContexts;
        QueryOptions qo;
        qo.device = Device::kCpu;
        qo.select.keep_fraction = 0.5f;
        QueryResult r;
        Status s = store_->Query("c" + std::to_string(c), 1, queries[c].data(), 8, 4, 64, qo, &r);
        if (!s.ok()) {
          ++failures;
          continue;
        }
        if (r.output != alone[c].output || r.lse != alone[c].lse) ++mismatches;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(mismatches.load(), 0);
  TierStats ts;
  ASSERT_TRUE(store_->GetTierStats(&ts).ok());
  EXPECT_GT(ts.host_evictions, 0u);
  EXPECT_LE(ts.host_bytes_in_use, 1u << 20);
}

}  // namespace
}  // namespace sqkv
