#include "storage/catalog.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <thread>
#include <vector>

#include "tests/testing/testing.h"

namespace sqkv {
namespace {

ContextPublication Pub(const std::string& name, uint64_t version, int layers) {
  ContextPublication p;
  p.record.name = name;
  p.record.version = version;
  p.record.layers = layers;
  p.record.kv_heads = 2;
  p.record.tokens = 64;
  p.record.head_dim = 8;
  p.record.page_tokens = 16;
  p.record.dtype = DType::kF16;
  for (int l = 0; l <= layers; ++l) p.record.layer_first_page.push_back(10 * l);
  for (int l = 0; l < layers; ++l) {
    p.layer_index.push_back("index-" + std::to_string(l));
    p.page_checksums.push_back(std::vector<uint64_t>(10, 1000 + l));
  }
  return p;
}

TEST(Catalog, PublishListGetRemove) {
  testing::ScratchDir dir;
  std::unique_ptr<Catalog> c;
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  auto v1 = c->AllocateVersion();
  auto v2 = c->AllocateVersion();
  ASSERT_TRUE(v1.ok() && v2.ok());
  EXPECT_LT(*v1, *v2);
  ASSERT_TRUE(c->Publish(Pub("a", *v1, 3), false).ok());
  ASSERT_TRUE(c->Publish(Pub("b", *v2, 1), false).ok());
  EXPECT_EQ(c->Publish(Pub("a", *v2, 1), false).code(), Status::Code::kAlreadyExists);

  std::vector<ContextRecord> all;
  ASSERT_TRUE(c->ListContexts(&all).ok());
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].name, "a");
  EXPECT_EQ(all[0].dtype, DType::kF16);
  EXPECT_EQ(all[0].layer_first_page.size(), 4u);

  std::string blob;
  ASSERT_TRUE(c->GetLayerIndex(*v1, 2, &blob).ok());
  EXPECT_EQ(blob, "index-2");
  std::vector<uint64_t> sums;
  ASSERT_TRUE(c->GetPageChecksums(*v1, 1, &sums).ok());
  EXPECT_EQ(sums, std::vector<uint64_t>(10, 1001));
  WindowQueries w;
  EXPECT_TRUE(c->GetWindowQueries(*v1, 0, &w).IsNotFound());

  ContextRecord removed;
  ASSERT_TRUE(c->RemoveContext("a", &removed).ok());
  EXPECT_EQ(removed.version, *v1);
  EXPECT_TRUE(c->RemoveContext("a", &removed).IsNotFound());
  // The removed version waits as garbage until reclaimed.
  std::vector<uint64_t> garbage;
  ASSERT_TRUE(c->ListGarbage(&garbage).ok());
  EXPECT_EQ(garbage, std::vector<uint64_t>{*v1});
  EXPECT_TRUE(c->GetLayerIndex(*v1, 0, &blob).ok());
  ASSERT_TRUE(c->DropVersion(*v1).ok());
  EXPECT_TRUE(c->GetLayerIndex(*v1, 0, &blob).IsNotFound());
  ASSERT_TRUE(c->ListGarbage(&garbage).ok());
  EXPECT_TRUE(garbage.empty());
  EXPECT_TRUE(c->VerifyChecksums().ok());
  std::vector<uint64_t> versions;
  ASSERT_TRUE(c->ListStoredVersions(&versions).ok());
  EXPECT_EQ(versions, std::vector<uint64_t>{*v2});
}

TEST(Catalog, VersionsSurviveReopenAndAreNeverReused) {
  testing::ScratchDir dir;
  uint64_t last = 0;
  for (int round = 0; round < 3; ++round) {
    std::unique_ptr<Catalog> c;
    ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
    auto v = c->AllocateVersion();
    ASSERT_TRUE(v.ok());
    EXPECT_GT(*v, last);
    last = *v;
  }
}

TEST(Catalog, SecondOpenOfTheSameDirectoryIsRefused) {
  testing::ScratchDir dir;
  std::unique_ptr<Catalog> a, b;
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &a).ok());
  Status s = Catalog::Open(dir.file("cat"), &b);
  EXPECT_FALSE(s.ok());
}

TEST(Catalog, ReplaceMarksTheOldVersionGarbage) {
  testing::ScratchDir dir;
  std::unique_ptr<Catalog> c;
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  auto p1 = Pub("a", 1, 2);
  p1.thresholds.assign(2, Thresholds{{0.5f, 0.9f}, {1e-3f, 1e-2f}});
  ASSERT_TRUE(c->Publish(p1, false).ok());
  ASSERT_TRUE(c->Publish(Pub("a", 2, 1), /*replace=*/true).ok());
  ContextRecord r;
  ASSERT_TRUE(c->GetContext("a", &r).ok());
  EXPECT_EQ(r.version, 2u);
  std::vector<uint64_t> garbage;
  ASSERT_TRUE(c->ListGarbage(&garbage).ok());
  EXPECT_EQ(garbage, std::vector<uint64_t>{1});
  Thresholds t;
  ASSERT_TRUE(c->GetThresholds(1, 1, &t).ok());
  EXPECT_EQ(t.threshold, (std::vector<float>{1e-3f, 1e-2f}));
  EXPECT_TRUE(c->GetThresholds(2, 0, &t).IsNotFound());
}

// GetContext keeps decoded records in memory: every way a record changes must show in the next
// read (the cache is warmed before each change).
TEST(Catalog, RecordReadsFollowEveryWrite) {
  testing::ScratchDir dir;
  std::unique_ptr<Catalog> c;
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  ContextRecord r;
  EXPECT_TRUE(c->GetContext("a", &r).IsNotFound());
  ASSERT_TRUE(c->Publish(Pub("a", 1, 2), false).ok());
  ASSERT_TRUE(c->GetContext("a", &r).ok());  // warm
  EXPECT_EQ(r.version, 1u);
  ASSERT_TRUE(c->Publish(Pub("a", 2, 3), /*replace=*/true).ok());
  ASSERT_TRUE(c->GetContext("a", &r).ok());
  EXPECT_EQ(r.version, 2u);
  EXPECT_EQ(r.layers, 3);
  // A raw write of the record key (what corruption tests do) shows too.
  std::string raw;
  ASSERT_TRUE(c->GetRaw("c/a", &raw).ok());
  ASSERT_TRUE(c->PutRaw("c/a", "{not json").ok());
  EXPECT_FALSE(c->GetContext("a", &r).ok());
  ASSERT_TRUE(c->PutRaw("c/a", raw).ok());
  ASSERT_TRUE(c->GetContext("a", &r).ok());
  EXPECT_EQ(r.version, 2u);
  ContextRecord removed;
  ASSERT_TRUE(c->RemoveContext("a", &removed).ok());
  EXPECT_TRUE(c->GetContext("a", &r).IsNotFound());
  ASSERT_TRUE(c->Publish(Pub("a", 3, 1), false).ok());
  ASSERT_TRUE(c->GetContext("a", &r).ok());
  EXPECT_EQ(r.version, 3u);
  // A reopened catalog starts empty and reads the same.
  c.reset();
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  ASSERT_TRUE(c->GetContext("a", &r).ok());
  EXPECT_EQ(r.version, 3u);
}

// Readers racing a writer that republishes one name with growing versions: once Publish has
// returned version v, no later read returns an older one, and versions never go backwards in
// one reader's sequence of reads.
TEST(Catalog, CachedRecordsNeverGoBackInTime) {
  testing::ScratchDir dir;
  std::unique_ptr<Catalog> c;
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  ASSERT_TRUE(c->Publish(Pub("a", 1, 1), false).ok());
  constexpr uint64_t kLast = 60;
  std::atomic<uint64_t> published{1};
  std::atomic<bool> done{false};
  std::atomic<int> failed{0}, below_floor{0}, went_back{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&] {
      uint64_t seen = 0;
      while (!done.load()) {
        const uint64_t floor = published.load();
        ContextRecord r;
        if (!c->GetContext("a", &r).ok()) {
          ++failed;
          continue;
        }
        if (r.version < floor) ++below_floor;
        if (r.version < seen) ++went_back;
        seen = r.version;
      }
    });
  }
  for (uint64_t v = 2; v <= kLast; ++v) {
    ASSERT_TRUE(c->Publish(Pub("a", v, 1), /*replace=*/true).ok());
    published.store(v);
  }
  done.store(true);
  for (auto& th : readers) th.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(below_floor.load(), 0) << "a read older than a finished Publish";
  EXPECT_EQ(went_back.load(), 0) << "a reader's versions went back";
  ContextRecord r;
  ASSERT_TRUE(c->GetContext("a", &r).ok());
  EXPECT_EQ(r.version, kLast);
}

std::string U64Bytes(uint64_t v) { return std::string(reinterpret_cast<const char*>(&v), 8); }

TEST(Catalog, NextVersionOfTheWrongSizeIsCorruption) {
  testing::ScratchDir dir;
  std::unique_ptr<Catalog> c;
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  ASSERT_TRUE(c->AllocateVersion().ok());
  for (const std::string bad : {std::string(), std::string("abc"), std::string(16, '\x01')}) {
    ASSERT_TRUE(c->PutRaw("m/next_version", bad).ok());
    auto v = c->AllocateVersion();
    ASSERT_FALSE(v.ok()) << "handed out " << *v;
    EXPECT_TRUE(v.status().IsCorruption()) << v.status().ToString();
    EXPECT_NE(v.status().message().find("m/next_version"), std::string::npos)
        << v.status().ToString();
  }
}

// A counter set back must not hand out a version that keys still name: the next import's segment
// would be renamed over that version's file.
TEST(Catalog, AllocateVersionStaysAboveEveryStoredVersion) {
  testing::ScratchDir dir;
  std::unique_ptr<Catalog> c;
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  uint64_t last = 0;
  for (int i = 0; i < 3; ++i) {
    auto v = c->AllocateVersion();
    ASSERT_TRUE(v.ok());
    last = *v;
  }
  ASSERT_TRUE(c->Publish(Pub("a", last, 2), false).ok());
  ASSERT_TRUE(c->PutRaw("m/next_version", U64Bytes(1)).ok());
  auto v = c->AllocateVersion();
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, last + 1);
  // A garbage mark names a version too (its keys may already be gone).
  ASSERT_TRUE(c->PutRaw("g/0000000000000064", "").ok());  // 100
  ASSERT_TRUE(c->PutRaw("m/next_version", U64Bytes(0)).ok());
  v = c->AllocateVersion();
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, 101u);
  // The counter is persisted past the net, and keys that name no version are ignored by it.
  ASSERT_TRUE(c->PutRaw("v/not-a-version", "x").ok());
  v = c->AllocateVersion();
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, 102u);
  // Nothing above the largest version is left to hand out.
  ASSERT_TRUE(c->PutRaw(Catalog::LayerKey(UINT64_MAX, 'i', 0), "x").ok());
  EXPECT_TRUE(c->AllocateVersion().status().IsCorruption());
}

// One record that does not decode must not stop the store from listing or removing the others,
// and removing it must be possible.
TEST(Catalog, UndecodableRecordsAreReportedAndRemovable) {
  testing::ScratchDir dir;
  std::unique_ptr<Catalog> c;
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  ASSERT_TRUE(c->Publish(Pub("a", 1, 1), false).ok());
  ASSERT_TRUE(c->Publish(Pub("b", 2, 1), false).ok());
  ASSERT_TRUE(c->Publish(Pub("c", 3, 1), false).ok());
  ASSERT_TRUE(c->PutPin("b", "host").ok());
  ASSERT_TRUE(c->PutRaw("c/b", R"({"name": "b", "version": 2})").ok());  // fields missing
  ASSERT_TRUE(c->PutRaw("c/c", "{not json").ok());
  ASSERT_TRUE(c->PutRaw("c/d", R"({"name": "d", "version": 1})").ok());  // names a's version

  std::vector<ContextRecord> all;
  Status strict = c->ListContexts(&all);
  EXPECT_TRUE(strict.IsCorruption()) << strict.ToString();
  EXPECT_NE(strict.message().find("'b'"), std::string::npos) << strict.ToString();
  std::vector<UndecodableContext> bad;
  ASSERT_TRUE(c->ListContexts(&all, &bad).ok());
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].name, "a");
  ASSERT_EQ(bad.size(), 3u);
  const std::vector<std::pair<std::string, uint64_t>> want = {{"b", 2}, {"c", 0}, {"d", 1}};
  for (size_t i = 0; i < bad.size(); ++i) {
    EXPECT_EQ(bad[i].name, want[i].first);
    EXPECT_EQ(bad[i].version, want[i].second);
    EXPECT_TRUE(bad[i].error.IsCorruption()) << bad[i].error.ToString();
  }

  ContextRecord removed;
  Status s = c->RemoveContext("b", &removed);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(removed.name, "b");
  EXPECT_EQ(removed.version, 2u);  // still named by the record: marked garbage
  ASSERT_TRUE(c->RemoveContext("c", &removed).ok());
  EXPECT_EQ(removed.version, 0u);  // names none
  ASSERT_TRUE(c->RemoveContext("d", &removed).ok());
  EXPECT_EQ(removed.version, 0u);  // a's version: not marked garbage
  std::vector<uint64_t> garbage;
  ASSERT_TRUE(c->ListGarbage(&garbage).ok());
  EXPECT_EQ(garbage, std::vector<uint64_t>{2});
  std::vector<std::pair<std::string, std::string>> pins;
  ASSERT_TRUE(c->ListPins(&pins).ok());
  EXPECT_TRUE(pins.empty());
  ASSERT_TRUE(c->ListContexts(&all).ok());
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].name, "a");
  EXPECT_TRUE(c->RemoveContext("c", &removed).IsNotFound());
  ContextRecord r;
  EXPECT_TRUE(c->GetContext("b", &r).IsNotFound());
}

TEST(Catalog, TheLargestVersionIsListedAndDropped) {
  testing::ScratchDir dir;
  std::unique_ptr<Catalog> c;
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  ASSERT_TRUE(c->Publish(Pub("a", 5, 2), false).ok());
  ASSERT_TRUE(c->PutRaw(Catalog::LayerKey(UINT64_MAX, 'i', 0), "x").ok());
  ASSERT_TRUE(c->PutRaw(Catalog::LayerKey(UINT64_MAX, 's', 0), "x").ok());
  ASSERT_TRUE(c->PutRaw("g/ffffffffffffffff", "").ok());
  std::vector<uint64_t> versions;
  ASSERT_TRUE(c->ListStoredVersions(&versions).ok());
  EXPECT_EQ(versions, (std::vector<uint64_t>{5, UINT64_MAX}));
  std::vector<uint64_t> garbage;
  ASSERT_TRUE(c->ListGarbage(&garbage).ok());
  EXPECT_EQ(garbage, std::vector<uint64_t>{UINT64_MAX});
  ASSERT_TRUE(c->DropVersion(UINT64_MAX).ok());
  ASSERT_TRUE(c->ListStoredVersions(&versions).ok());
  EXPECT_EQ(versions, std::vector<uint64_t>{5});
  ASSERT_TRUE(c->ListGarbage(&garbage).ok());
  EXPECT_TRUE(garbage.empty());
  std::string blob;
  EXPECT_TRUE(c->GetLayerIndex(5, 1, &blob).ok());
}

TEST(Catalog, MalformedVersionKeysAreCorruption) {
  testing::ScratchDir dir;
  std::unique_ptr<Catalog> c;
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  ASSERT_TRUE(c->Publish(Pub("a", 5, 1), false).ok());
  std::vector<uint64_t> out;
  for (const std::string key : {"v/zzzzzzzzzzzzzzzz/i/00000", "v/000000000000000G/i/00000",
                                "v/0000000000000005x", "v/12/i/00000"}) {
    SCOPED_TRACE(key);
    ASSERT_TRUE(c->PutRaw(key, "x").ok());
    const Status s = c->ListStoredVersions(&out);
    EXPECT_TRUE(s.IsCorruption()) << s.ToString();
    EXPECT_NE(s.message().find(key), std::string::npos) << s.ToString();
    c.reset();  // PutRaw cannot delete: start again from a clean catalog
    std::filesystem::remove_all(dir.file("cat"));
    ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  }
  for (const std::string key :
       {"g/zzzzzzzzzzzzzzzz", "g/-000000000000001", "g/12", "g/00000000000000010"}) {
    SCOPED_TRACE(key);
    ASSERT_TRUE(c->PutRaw(key, "").ok());
    const Status s = c->ListGarbage(&out);
    EXPECT_TRUE(s.IsCorruption()) << s.ToString();
    c.reset();
    std::filesystem::remove_all(dir.file("cat"));
    ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  }
}

TEST(Catalog, WindowQueriesRoundTrip) {
  testing::ScratchDir dir;
  std::unique_ptr<Catalog> c;
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  auto p = Pub("w", 7, 2);
  std::mt19937_64 rng(testing::FreshSeed());
  for (int l = 0; l < 2; ++l) {
    WindowQueries w;
    w.q_heads = 4;
    w.window = 3;
    w.head_dim = 8;
    w.data = testing::RandomNormal(4 * 3 * 8, rng);
    p.window_queries.push_back(w);
  }
  ASSERT_TRUE(c->Publish(p, false).ok());
  WindowQueries back;
  ASSERT_TRUE(c->GetWindowQueries(7, 1, &back).ok());
  EXPECT_EQ(back.data, p.window_queries[1].data);
  EXPECT_EQ(back.window, 3);
}

// Damaged window-query and threshold records are Corruption: not an abort (a shape whose product
// wrapped 64 bits to the record's size passed, and sizing the data threw std::length_error) nor
// an error blamed on the caller (a threshold of 1e300, which is inf as a float, read as "NaN in
// options"; sparsities out of order as "outside the calibrated range [0.9, 0.5]").
TEST(Catalog, DamagedWindowQueryAndThresholdRecordsAreCorruption) {
  testing::ScratchDir dir;
  std::unique_ptr<Catalog> c;
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  ASSERT_TRUE(c->Publish(Pub("w", 7, 2), false).ok());
  const int32_t wrap[3] = {1 << 21, 1 << 21, 1 << 20};  // 2^62 floats: 2^64 bytes wrap to 0
  ASSERT_TRUE(
      c->PutRaw(Catalog::LayerKey(7, 'q', 0), std::string(reinterpret_cast<const char*>(wrap), 12))
          .ok());
  WindowQueries w;
  Status s = c->GetWindowQueries(7, 0, &w);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  ASSERT_TRUE(c->PutRaw(Catalog::LayerKey(7, 'q', 0), std::string(13, '\0')).ok());
  s = c->GetWindowQueries(7, 0, &w);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();

  Thresholds t;
  ASSERT_TRUE(
      c->PutRaw(Catalog::LayerKey(7, 't', 0), R"({"sparsity":[0.5,0.9],"threshold":[1,2]})").ok());
  ASSERT_TRUE(c->GetThresholds(7, 0, &t).ok());
  for (const char* bad : {R"({"sparsity":[0.5,0.9],"threshold":[1e300,1e300]})",
                          R"({"sparsity":[0.9,0.5],"threshold":[1,2]})",
                          R"({"sparsity":[0.5,0.5],"threshold":[1,2]})",
                          R"({"sparsity":[0.5,1.5],"threshold":[1,2]})",
                          R"({"sparsity":[],"threshold":[]})"}) {
    SCOPED_TRACE(bad);
    ASSERT_TRUE(c->PutRaw(Catalog::LayerKey(7, 't', 0), bad).ok());
    s = c->GetThresholds(7, 0, &t);
    EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  }
}

// PutCalibration writes the thresholds and, when given, the queries with the record's window
// shape, in one batch, and only while the name still holds the calibrated version.
TEST(Catalog, CalibrationIsStoredOnlyOnTheVersionTheNameHolds) {
  testing::ScratchDir dir;
  std::unique_ptr<Catalog> c;
  ASSERT_TRUE(Catalog::Open(dir.file("cat"), &c).ok());
  ASSERT_TRUE(c->Publish(Pub("w", 7, 2), false).ok());
  ContextRecord r;
  ASSERT_TRUE(c->GetContext("w", &r).ok());
  EXPECT_EQ(r.window_q_heads, 0);
  std::mt19937_64 rng(testing::FreshSeed());
  std::vector<WindowQueries> q(2);
  for (auto& w : q) {
    w.q_heads = 4;
    w.window = 5;
    w.head_dim = 8;
    w.data = testing::RandomNormal(4 * 5 * 8, rng);
  }
  std::vector<Thresholds> t(2);
  for (auto& x : t) x = Thresholds{{0.3f, 0.97f}, {1e-3f, 1e-5f}};
  ASSERT_TRUE(c->PutCalibration(r, t, &q).ok());
  ContextRecord after;
  ASSERT_TRUE(c->GetContext("w", &after).ok());
  EXPECT_EQ(after.window_q_heads, 4);
  EXPECT_EQ(after.window, 5);
  WindowQueries back;
  ASSERT_TRUE(c->GetWindowQueries(7, 1, &back).ok());
  EXPECT_EQ(back.data, q[1].data);
  Thresholds tb;
  ASSERT_TRUE(c->GetThresholds(7, 1, &tb).ok());
  EXPECT_EQ(tb.sparsity, t[1].sparsity);
  // Thresholds alone leave the queries and the record as they are.
  t[0].threshold = {2e-3f, 2e-5f};
  ASSERT_TRUE(c->PutCalibration(after, t, nullptr).ok());
  ASSERT_TRUE(c->GetThresholds(7, 0, &tb).ok());
  EXPECT_EQ(tb.threshold, t[0].threshold);
  ASSERT_TRUE(c->GetWindowQueries(7, 0, &back).ok());
  EXPECT_EQ(back.data, q[0].data);

  // Replaced by version 8 (no calibration): a calibration of version 7 is refused, 8 untouched.
  ASSERT_TRUE(c->Publish(Pub("w", 8, 2), true).ok());
  Status s = c->PutCalibration(after, t, &q);
  EXPECT_TRUE(s.IsUnavailable()) << s.ToString();
  EXPECT_TRUE(c->GetThresholds(8, 0, &tb).IsNotFound());
  EXPECT_TRUE(c->GetWindowQueries(8, 0, &back).IsNotFound());
  ContextRecord removed;
  ASSERT_TRUE(c->RemoveContext("w", &removed).ok());
  s = c->PutCalibration(removed, t, nullptr);
  EXPECT_TRUE(s.IsUnavailable()) << s.ToString();
  t.pop_back();
  EXPECT_TRUE(c->PutCalibration(removed, t, nullptr).IsInvalidArgument());
}

}  // namespace
}  // namespace sqkv
