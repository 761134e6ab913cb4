#include "storage/page_cache.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <future>
#include <list>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>
#include <unordered_map>

#include "storage/uring_reader.h"
#include "tests/testing/testing.h"

namespace sqkv {
namespace {

constexpr size_t kPage = 8192;

// The bytes of (version, page): random per run (salted by the seed), reproducible within it.
void FillPage(uint64_t salt, uint64_t version, uint64_t page, void* dst, size_t bytes) {
  std::mt19937_64 rng(salt ^ (version * 0x9e3779b97f4a7c15ull) ^ (page * 0xc2b2ae3d27d4eb4full));
  auto* p = static_cast<uint8_t*>(dst);
  size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    const uint64_t v = rng();
    std::memcpy(p + i, &v, 8);
  }
  for (; i < bytes; ++i) p[i] = static_cast<uint8_t>(rng());
}

bool PageIs(uint64_t salt, uint64_t version, uint64_t page, const void* data, size_t bytes) {
  std::vector<uint8_t> want(bytes);
  FillPage(salt, version, page, want.data(), bytes);
  return std::memcmp(want.data(), data, bytes) == 0;
}

// A loader over the synthetic store that counts calls and pages, and checks the run contract.
struct CountingLoader {
  CountingLoader(uint64_t salt, uint64_t version, size_t page_bytes)
      : salt(salt), version(version), page_bytes(page_bytes) {}
  uint64_t salt;
  uint64_t version;
  size_t page_bytes;
  std::atomic<int> calls{0};
  std::atomic<uint64_t> pages{0};
  std::vector<MissingRun> last_runs;  // written by the loading thread only (tests read after)

  PageLoader Fn() {
    return [this](const std::vector<MissingRun>& runs) {
      ++calls;
      uint64_t prev_end = 0;
      for (size_t r = 0; r < runs.size(); ++r) {
        const MissingRun& run = runs[r];
        EXPECT_EQ(run.slots.size(), run.count);
        EXPECT_GT(run.count, 0u);
        if (r > 0) {
          EXPECT_GT(run.first_page, prev_end);  // ascending, disjoint, not adjacent
        }
        prev_end = run.first_page + run.count;
        for (uint64_t i = 0; i < run.count; ++i) {
          EXPECT_EQ(reinterpret_cast<uintptr_t>(run.slots[i]) % kPageSlotAlignment, 0u);
          FillPage(salt, version, run.first_page + i, run.slots[i], page_bytes);
        }
        pages += run.count;
      }
      last_runs = runs;
      return Status::Ok();
    };
  }
};

PageLoader MustNotLoad() {
  return [](const std::vector<MissingRun>&) {
    ADD_FAILURE() << "loader called for resident pages";
    return Status::Internal("unexpected load");
  };
}

std::unique_ptr<PageCache> Open(size_t capacity, size_t chunk = 64 << 10) {
  PageCacheOptions options;
  options.capacity_bytes = capacity;
  options.chunk_bytes = chunk;
  std::unique_ptr<PageCache> cache;
  EXPECT_TRUE(PageCache::Open(options, &cache).ok());
  return cache;
}

// Runs `fn` on another thread; fails the test (and leaks the thread) if it takes over 30 s, so a
// deadlock shows up as a failure, not a hung suite.
template <typename Fn>
void WithTimeout(Fn fn) {
  auto done = std::async(std::launch::async, std::move(fn));
  if (done.wait_for(std::chrono::seconds(30)) != std::future_status::ready) {
    ADD_FAILURE() << "timed out: deadlock?";
    std::abort();
  }
  done.get();
}

TEST(PageCache, MissesLoadInRunsThenHit) {
  const uint64_t salt = testing::FreshSeed();
  auto cache = Open(1 << 20);
  CountingLoader loader{salt, 7, kPage};
  std::vector<PageHandle> h;
  AcquireStats st;
  const std::vector<uint64_t> pages = {10, 5, 6, 11, 7, 3, 6};
  ASSERT_TRUE(cache->Acquire(7, pages, kPage, loader.Fn(), &h, &st).ok());
  EXPECT_EQ(loader.calls, 1);
  ASSERT_EQ(loader.last_runs.size(), 3u);
  EXPECT_EQ(loader.last_runs[0].first_page, 3u);
  EXPECT_EQ(loader.last_runs[0].count, 1u);
  EXPECT_EQ(loader.last_runs[1].first_page, 5u);
  EXPECT_EQ(loader.last_runs[1].count, 3u);
  EXPECT_EQ(loader.last_runs[2].first_page, 10u);
  EXPECT_EQ(loader.last_runs[2].count, 2u);
  EXPECT_EQ(st.misses, 6u);
  EXPECT_EQ(st.hits, 0u);
  EXPECT_EQ(st.bytes_loaded, 6 * kPage);
  ASSERT_EQ(h.size(), pages.size());
  for (size_t i = 0; i < pages.size(); ++i) {
    EXPECT_TRUE(PageIs(salt, 7, pages[i], h[i].data(), kPage)) << i;
    EXPECT_EQ(h[i].size(), kPage);
  }
  EXPECT_EQ(h[2].data(), h[6].data());  // the duplicate shares the page
  EXPECT_EQ(cache->Snapshot().pinned_bytes, 6 * kPage);
  cache->Release(&h);
  EXPECT_TRUE(h.empty());
  EXPECT_EQ(cache->Snapshot().pinned_bytes, 0u);

  const std::vector<uint64_t> again = {3, 5, 6, 7, 10, 11};
  ASSERT_TRUE(cache->Acquire(7, again, kPage, MustNotLoad(), &h, &st).ok());
  EXPECT_EQ(st.hits, 6u);
  EXPECT_EQ(st.misses, 0u);
  for (size_t i = 0; i < h.size(); ++i) EXPECT_TRUE(PageIs(salt, 7, again[i], h[i].data(), kPage));
  h.clear();  // handle destructors release too
  const PageCacheCounters c = cache->Snapshot();
  EXPECT_EQ(c.pinned_bytes, 0u);
  EXPECT_EQ(c.pages_resident, 6u);
  EXPECT_EQ(c.hits, 6u);
  EXPECT_EQ(c.misses, 6u);
}

TEST(PageCache, InvalidArguments) {
  std::unique_ptr<PageCache> cache;
  PageCacheOptions options;
  options.capacity_bytes = 100;
  EXPECT_TRUE(PageCache::Open(options, &cache).IsInvalidArgument());
  options.capacity_bytes = 1 << 20;
  options.probation_fraction = 1.0;
  EXPECT_TRUE(PageCache::Open(options, &cache).IsInvalidArgument());
  cache = Open(1 << 20);
  CountingLoader loader{1, 1, kPage};
  std::vector<PageHandle> h;
  EXPECT_TRUE(cache->Acquire(1, {1}, 0, loader.Fn(), &h, nullptr).IsInvalidArgument());
  EXPECT_TRUE(cache->Acquire(1, {1}, 2 << 20, loader.Fn(), &h, nullptr).IsInvalidArgument());
  ASSERT_TRUE(cache->Acquire(1, {1}, kPage, loader.Fn(), &h, nullptr).ok());
  std::vector<PageHandle> h2;
  // A version's pages have one size.
  EXPECT_TRUE(cache->Acquire(1, {2}, 2 * kPage, loader.Fn(), &h2, nullptr).IsInvalidArgument());
  EXPECT_TRUE(h2.empty());
}

// A random stream over many versions with several page sizes, some handles held across calls:
// the allocator never holds more than the capacity, and every page read back is right.
TEST(PageCache, MemoryStaysBoundedUnderRandomStream) {
  const uint64_t salt = testing::FreshSeed();
  std::mt19937_64 rng(salt);
  constexpr size_t kCapacity = 1 << 20;
  size_t outstanding = 0, peak = 0;  // bytes the allocator hands out (single-threaded test)
  PageCacheOptions options;
  options.capacity_bytes = kCapacity;
  options.chunk_bytes = 96 << 10;
  options.alloc_chunk = [&](size_t bytes) {
    outstanding += bytes;
    peak = std::max(peak, outstanding);
    EXPECT_LE(outstanding, kCapacity);
    return std::aligned_alloc(kPageSlotAlignment, bytes);
  };
  options.free_chunk = [&](void* p, size_t bytes) {
    outstanding -= bytes;
    std::free(p);
  };
  std::unique_ptr<PageCache> cache;
  ASSERT_TRUE(PageCache::Open(options, &cache).ok());
  // Page size by version: 4 KiB, 6000 B (an 8 KiB slot), 8 KiB, 12 KiB.
  const size_t sizes[] = {4096, 6000, 8192, 12288};
  auto page_bytes_of = [&](uint64_t v) { return sizes[v % 4]; };
  std::vector<std::vector<PageHandle>> held;
  std::vector<std::pair<uint64_t, std::vector<uint64_t>>> held_keys;
  int unavailable = 0;
  for (int step = 0; step < 3000; ++step) {
    const uint64_t v = rng() % 60;
    const size_t pb = page_bytes_of(v);
    std::vector<uint64_t> pages(1 + rng() % 16);
    const uint64_t base = rng() % 200;
    for (auto& p : pages) p = base + rng() % 24;
    CountingLoader loader{salt, v, pb};
    std::vector<PageHandle> h;
    AcquireStats st;
    Status s = cache->Acquire(v, pages, pb, loader.Fn(), &h, &st);
    if (s.IsUnavailable()) {
      ++unavailable;
      EXPECT_NE(s.message().find("host cache full"), std::string::npos);
    } else {
      ASSERT_TRUE(s.ok()) << s.ToString();
      for (size_t i = 0; i < pages.size(); ++i) {
        ASSERT_TRUE(PageIs(salt, v, pages[i], h[i].data(), pb)) << "step " << step;
      }
      EXPECT_EQ(st.hits + st.misses, std::set<uint64_t>(pages.begin(), pages.end()).size());
    }
    const PageCacheCounters c = cache->Snapshot();
    ASSERT_LE(c.bytes_allocated, kCapacity);
    ASSERT_LE(c.bytes_in_use, c.bytes_allocated);
    ASSERT_EQ(c.bytes_allocated, outstanding);
    // Hold about one call in ten for a while.
    if (s.ok() && rng() % 10 == 0) {
      held.push_back(std::move(h));
      held_keys.push_back({v, pages});
    }
    if (held.size() > 4 || (!held.empty() && rng() % 8 == 0)) {
      const size_t k = rng() % held.size();
      for (size_t i = 0; i < held[k].size(); ++i) {  // still intact while held
        ASSERT_TRUE(PageIs(salt, held_keys[k].first, held_keys[k].second[i], held[k][i].data(),
                           page_bytes_of(held_keys[k].first)));
      }
      cache->Release(&held[k]);
      held.erase(held.begin() + static_cast<ptrdiff_t>(k));
      held_keys.erase(held_keys.begin() + static_cast<ptrdiff_t>(k));
    }
  }
  held.clear();
  const PageCacheCounters c = cache->Snapshot();
  EXPECT_EQ(c.pinned_bytes, 0u);
  EXPECT_GT(c.evictions, 0u);
  EXPECT_LE(peak, kCapacity);
  EXPECT_LT(unavailable, 100);  // rare: only when held pages crowd a size class out
  cache.reset();
  EXPECT_EQ(outstanding, 0u);
}

TEST(PageCache, HeldHandlesAreNeverEvicted) {
  const uint64_t salt = testing::FreshSeed();
  constexpr size_t kSlots = 64;
  auto cache = Open(kSlots * kPage);
  CountingLoader hold_loader{salt, 1, kPage};
  std::vector<PageHandle> held;
  std::vector<uint64_t> held_pages;
  for (uint64_t p = 0; p < kSlots / 2; ++p) held_pages.push_back(p * 3);
  ASSERT_TRUE(cache->Acquire(1, held_pages, kPage, hold_loader.Fn(), &held, nullptr).ok());
  std::vector<const void*> where;
  for (const PageHandle& h : held) where.push_back(h.data());

  // Ten times the capacity of other pages, through the other half of the cache.
  uint64_t evictions = 0;
  for (uint64_t v = 2; v < 22; ++v) {
    for (uint64_t first = 0; first < kSlots; first += 8) {
      std::vector<uint64_t> pages;
      for (uint64_t p = first; p < first + 8; ++p) pages.push_back(p);
      CountingLoader loader{salt, v, kPage};
      std::vector<PageHandle> h;
      AcquireStats st;
      ASSERT_TRUE(cache->Acquire(v, pages, kPage, loader.Fn(), &h, &st).ok());
      evictions += st.evictions;
    }
  }
  EXPECT_GT(evictions, 10 * kSlots / 2);
  for (size_t i = 0; i < held.size(); ++i) {
    EXPECT_EQ(held[i].data(), where[i]);
    EXPECT_TRUE(PageIs(salt, 1, held_pages[i], held[i].data(), kPage)) << "held page " << i;
  }
  // Still resident: hits.
  std::vector<PageHandle> again;
  AcquireStats st;
  ASSERT_TRUE(cache->Acquire(1, held_pages, kPage, MustNotLoad(), &again, &st).ok());
  EXPECT_EQ(st.hits, held_pages.size());
  EXPECT_LE(cache->Snapshot().bytes_allocated, kSlots * kPage);
}

TEST(PageCache, ConcurrentAcquiresLoadEachPageOnce) {
  const uint64_t salt = testing::FreshSeed();
  constexpr int kThreads = 8, kRounds = 20;
  constexpr uint64_t kPages = 48;
  // Room for every round's pages: with eviction, a page one thread loaded and released could be
  // evicted before a slower thread asks for it and be loaded again, legitimately; this test is
  // about concurrent Acquires of a missing page, not about eviction.
  auto cache = Open(2 * kRounds * kPages * kPage + (8 << 20));
  for (int round = 0; round < kRounds; ++round) {
    const uint64_t version = 100 + static_cast<uint64_t>(round);
    std::vector<std::atomic<int>> loads(kPages);
    std::atomic<int> loader_calls{0};
    PageLoader loader = [&](const std::vector<MissingRun>& runs) {
      ++loader_calls;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // let the others pile up
      for (const MissingRun& run : runs) {
        for (uint64_t i = 0; i < run.count; ++i) {
          ++loads[run.first_page + i];
          FillPage(salt, version, run.first_page + i, run.slots[i], kPage);
        }
      }
      return Status::Ok();
    };
    std::atomic<int> ready{0};
    std::vector<int> bad(kThreads, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        // Overlapping, differently ordered requests.
        std::vector<uint64_t> pages;
        for (uint64_t p = 0; p < kPages; ++p) {
          if ((p + static_cast<uint64_t>(t)) % 3 != 0) pages.push_back(p);
        }
        std::mt19937_64 rng(salt + static_cast<uint64_t>(t));
        std::shuffle(pages.begin(), pages.end(), rng);
        ++ready;
        while (ready.load() < kThreads) std::this_thread::yield();
        std::vector<PageHandle> h;
        if (!cache->Acquire(version, pages, kPage, loader, &h, nullptr).ok()) {
          ++bad[t];
          return;
        }
        for (size_t i = 0; i < pages.size(); ++i) {
          if (!PageIs(salt, version, pages[i], h[i].data(), kPage)) ++bad[t];
        }
      });
    }
    WithTimeout([&] {
      for (auto& th : threads) th.join();
    });
    for (int t = 0; t < kThreads; ++t) ASSERT_EQ(bad[t], 0) << "round " << round;
    for (uint64_t p = 0; p < kPages; ++p) ASSERT_EQ(loads[p].load(), 1) << "page " << p;
  }
  const PageCacheCounters c = cache->Snapshot();
  EXPECT_EQ(c.misses, kRounds * kPages);
  EXPECT_EQ(c.pinned_bytes, 0u);
}

TEST(PageCache, LoaderFailureReachesWaitersAndLeavesNoPage) {
  const uint64_t salt = testing::FreshSeed();
  auto cache = Open(1 << 20);
  std::atomic<bool> loading{false};
  PageLoader failing = [&](const std::vector<MissingRun>& runs) {
    // Half a page of real bytes, then the failure.
    FillPage(salt, 3, runs[0].first_page, runs[0].slots[0], kPage / 2);
    loading = true;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (cache->Snapshot().joined == 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::yield();
    }
    return Status::IOError("read seg at offset 4096: injected");
  };
  Status first, second;
  WithTimeout([&] {
    std::thread loader_thread([&] {
      std::vector<PageHandle> h;
      first = cache->Acquire(3, {4, 5, 6}, kPage, failing, &h, nullptr);
      EXPECT_TRUE(h.empty());
    });
    while (!loading) std::this_thread::yield();
    std::vector<PageHandle> h;
    second = cache->Acquire(3, {5}, kPage, MustNotLoad(), &h, nullptr);
    EXPECT_TRUE(h.empty());
    loader_thread.join();
  });
  EXPECT_EQ(first.code(), Status::Code::kIOError) << first.ToString();
  EXPECT_NE(first.message().find("injected"), std::string::npos);
  EXPECT_EQ(second.code(), Status::Code::kIOError) << second.ToString();
  PageCacheCounters c = cache->Snapshot();
  EXPECT_EQ(c.pages_resident, 0u);
  EXPECT_EQ(c.bytes_in_use, 0u);
  EXPECT_EQ(c.pinned_bytes, 0u);
  EXPECT_EQ(c.load_failures, 1u);
  // Nothing half loaded stayed: the next Acquire loads again, in full.
  CountingLoader good{salt, 3, kPage};
  std::vector<PageHandle> h;
  ASSERT_TRUE(cache->Acquire(3, {4, 5, 6}, kPage, good.Fn(), &h, nullptr).ok());
  EXPECT_EQ(good.pages, 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(PageIs(salt, 3, 4 + i, h[i].data(), kPage));
}

TEST(PageCache, LoaderExceptionBecomesStatus) {
  auto cache = Open(1 << 20);
  std::vector<PageHandle> h;
  Status s = cache->Acquire(
      1, {1}, kPage,
      [](const std::vector<MissingRun>&) -> Status { throw std::runtime_error("x"); }, &h, nullptr);
  EXPECT_EQ(s.code(), Status::Code::kInternal);
  EXPECT_EQ(cache->Snapshot().pages_resident, 0u);
}

// A hot set hit repeatedly survives a long one-time scan of cold pages. An LRU of the same size
// (modelled below on the same trace) loses all of it.
TEST(PageCache, HotSetSurvivesOneTimeScan) {
  const uint64_t salt = testing::FreshSeed();
  constexpr size_t kSlots = 128, kHot = 64, kScan = 4000;
  auto cache = Open(kSlots * kPage);
  std::list<uint64_t> lru;  // keys, most recent first
  std::unordered_map<uint64_t, std::list<uint64_t>::iterator> lru_at;
  auto lru_touch = [&](uint64_t key) {
    if (auto it = lru_at.find(key); it != lru_at.end()) lru.erase(it->second);
    lru.push_front(key);
    lru_at[key] = lru.begin();
    if (lru.size() > kSlots) {
      lru_at.erase(lru.back());
      lru.pop_back();
    }
  };
  constexpr uint64_t kHotVersion = 1, kScanVersion = 2;
  std::vector<uint64_t> hot;
  for (uint64_t p = 0; p < kHot; ++p) hot.push_back(p);
  CountingLoader hot_loader{salt, kHotVersion, kPage};
  for (int round = 0; round < 3; ++round) {
    std::vector<PageHandle> h;
    ASSERT_TRUE(cache->Acquire(kHotVersion, hot, kPage, hot_loader.Fn(), &h, nullptr).ok());
    for (uint64_t p : hot) lru_touch(p);
  }
  EXPECT_EQ(hot_loader.pages, kHot);
  CountingLoader scan_loader{salt, kScanVersion, kPage};
  for (uint64_t first = 0; first < kScan; first += 16) {
    std::vector<uint64_t> pages;
    for (uint64_t p = first; p < first + 16; ++p) {
      pages.push_back(p);
      lru_touch(1'000'000 + p);
    }
    std::vector<PageHandle> h;
    ASSERT_TRUE(cache->Acquire(kScanVersion, pages, kPage, scan_loader.Fn(), &h, nullptr).ok());
  }
  EXPECT_EQ(scan_loader.pages, kScan);
  size_t lru_hits = 0;
  for (uint64_t p : hot) lru_hits += lru_at.count(p);
  EXPECT_EQ(lru_hits, 0u);  // the LRU lost the hot set
  std::vector<PageHandle> h;
  AcquireStats st;
  ASSERT_TRUE(cache->Acquire(kHotVersion, hot, kPage, MustNotLoad(), &h, &st).ok());
  EXPECT_EQ(st.hits, kHot);
  for (size_t i = 0; i < kHot; ++i)
    EXPECT_TRUE(PageIs(salt, kHotVersion, hot[i], h[i].data(), kPage));
}

TEST(PageCache, AllPinnedIsUnavailableWithoutHanging) {
  const uint64_t salt = testing::FreshSeed();
  constexpr size_t kSlots = 16;
  auto cache = Open(kSlots * kPage);
  CountingLoader loader{salt, 1, kPage};
  std::vector<PageHandle> held;
  std::vector<uint64_t> all;
  for (uint64_t p = 0; p < kSlots; ++p) all.push_back(p);
  ASSERT_TRUE(cache->Acquire(1, all, kPage, loader.Fn(), &held, nullptr).ok());
  WithTimeout([&] {
    CountingLoader other{salt, 2, kPage};
    std::vector<PageHandle> h;
    Status s = cache->Acquire(2, {0}, kPage, other.Fn(), &h, nullptr);
    EXPECT_TRUE(s.IsUnavailable()) << s.ToString();
    EXPECT_NE(
        s.message().find("host cache full: " + std::to_string(kSlots * kPage) + " bytes pinned"),
        std::string::npos)
        << s.ToString();
    EXPECT_EQ(other.calls, 0);
    // Hits on the pinned pages still work meanwhile.
    EXPECT_TRUE(cache->Acquire(1, {3, 4}, kPage, MustNotLoad(), &h, nullptr).ok());
  });
  cache->Release(&held);
  // A request larger than the whole cache cannot fit either.
  std::vector<uint64_t> too_many;
  for (uint64_t p = 0; p < kSlots + 1; ++p) too_many.push_back(100 + p);
  std::vector<PageHandle> h;
  CountingLoader big{salt, 1, kPage};
  EXPECT_TRUE(cache->Acquire(1, too_many, kPage, big.Fn(), &h, nullptr).IsUnavailable());
  EXPECT_EQ(cache->Snapshot().pinned_bytes, 0u);
  // Once released, there is room again.
  CountingLoader other{salt, 2, kPage};
  EXPECT_TRUE(cache->Acquire(2, {0}, kPage, other.Fn(), &h, nullptr).ok());
}

TEST(PageCache, PinnedVersionStaysAndCountsAsPinned) {
  const uint64_t salt = testing::FreshSeed();
  constexpr size_t kSlots = 64;
  auto cache = Open(kSlots * kPage);
  ASSERT_TRUE(cache->PinVersion(1).ok());  // before any page of it is cached: future pages too
  EXPECT_TRUE(cache->IsVersionPinned(1));
  CountingLoader l1{salt, 1, kPage};
  std::vector<PageHandle> h;
  std::vector<uint64_t> pinned_pages;
  for (uint64_t p = 0; p < 16; ++p) pinned_pages.push_back(p);
  ASSERT_TRUE(cache->Acquire(1, pinned_pages, kPage, l1.Fn(), &h, nullptr).ok());
  cache->Release(&h);
  EXPECT_EQ(cache->Snapshot().pinned_bytes, 16 * kPage);
  // Version 3's pages: present before the pin.
  CountingLoader l3{salt, 3, kPage};
  ASSERT_TRUE(cache->Acquire(3, {0, 1, 2, 3}, kPage, l3.Fn(), &h, nullptr).ok());
  cache->Release(&h);
  ASSERT_TRUE(cache->PinVersion(3).ok());
  EXPECT_EQ(cache->Snapshot().pinned_bytes, 20 * kPage);
  // Stream far more than the cache through the rest.
  for (uint64_t first = 0; first < 20 * kSlots; first += 8) {
    std::vector<uint64_t> pages;
    for (uint64_t p = first; p < first + 8; ++p) pages.push_back(p);
    CountingLoader l2{salt, 2, kPage};
    ASSERT_TRUE(cache->Acquire(2, pages, kPage, l2.Fn(), &h, nullptr).ok());
    cache->Release(&h);
  }
  AcquireStats st;
  ASSERT_TRUE(cache->Acquire(1, pinned_pages, kPage, MustNotLoad(), &h, &st).ok());
  EXPECT_EQ(st.hits, 16u);
  for (size_t i = 0; i < 16; ++i) EXPECT_TRUE(PageIs(salt, 1, i, h[i].data(), kPage));
  cache->Release(&h);
  ASSERT_TRUE(cache->Acquire(3, {0, 1, 2, 3}, kPage, MustNotLoad(), &h, &st).ok());
  cache->Release(&h);

  // While pinned, a request for the whole cache cannot be met...
  std::vector<uint64_t> whole;
  for (uint64_t p = 0; p < kSlots; ++p) whole.push_back(9000 + p);
  CountingLoader l2{salt, 2, kPage};
  EXPECT_TRUE(cache->Acquire(2, whole, kPage, l2.Fn(), &h, nullptr).IsUnavailable());
  cache->UnpinVersion(1);
  cache->UnpinVersion(3);
  EXPECT_FALSE(cache->IsVersionPinned(1));
  EXPECT_EQ(cache->Snapshot().pinned_bytes, 0u);
  // ...once unpinned, the pages are evictable again (they keep their hit history, so a one-time
  // scan alone would not push them out).
  ASSERT_TRUE(cache->Acquire(2, whole, kPage, l2.Fn(), &h, nullptr).ok());
  cache->Release(&h);
  CountingLoader again{salt, 1, kPage};
  ASSERT_TRUE(cache->Acquire(1, pinned_pages, kPage, again.Fn(), &h, &st).ok());
  EXPECT_EQ(st.misses, 16u);
}

TEST(PageCache, EraseVersionDropsPagesHeldOnesWhenReleased) {
  const uint64_t salt = testing::FreshSeed();
  auto cache = Open(1 << 20);
  CountingLoader l{salt, 9, kPage};
  std::vector<PageHandle> h;
  ASSERT_TRUE(cache->Acquire(9, {0, 1, 2, 3, 4}, kPage, l.Fn(), &h, nullptr).ok());
  ASSERT_TRUE(cache->PinVersion(9).ok());
  PageHandle keep = std::move(h[2]);
  cache->Release(&h);
  cache->EraseVersion(9);
  EXPECT_FALSE(cache->IsVersionPinned(9));
  PageCacheCounters c = cache->Snapshot();
  EXPECT_EQ(c.pages_resident, 1u);  // the held one
  EXPECT_EQ(c.pinned_bytes, kPage);
  EXPECT_TRUE(PageIs(salt, 9, 2, keep.data(), kPage));
  // The index forgot it: a new Acquire loads (a rebuilt version may reuse nothing of the old).
  CountingLoader l2{salt, 9, kPage};
  ASSERT_TRUE(cache->Acquire(9, {2}, kPage, l2.Fn(), &h, nullptr).ok());
  EXPECT_EQ(l2.pages, 1u);
  EXPECT_NE(h[0].data(), keep.data());
  cache->Release(&h);
  keep.Reset();
  c = cache->Snapshot();
  EXPECT_EQ(c.pages_resident, 1u);  // only the reloaded page
  EXPECT_EQ(c.pinned_bytes, 0u);
}

TEST(PageCache, SizeClassesShareTheCapacity) {
  const uint64_t salt = testing::FreshSeed();
  constexpr size_t kCapacity = 512 << 10;
  auto cache = Open(kCapacity, 64 << 10);
  // Fill with 4 KiB pages, then switch to 16 KiB pages: the small class's chunks are emptied by
  // eviction and their memory goes to the large class.
  for (uint64_t first = 0; first < 1024; first += 32) {
    std::vector<uint64_t> pages;
    for (uint64_t p = first; p < first + 32; ++p) pages.push_back(p);
    CountingLoader l{salt, 1, 4096};
    std::vector<PageHandle> h;
    ASSERT_TRUE(cache->Acquire(1, pages, 4096, l.Fn(), &h, nullptr).ok());
  }
  EXPECT_EQ(cache->Snapshot().bytes_allocated, kCapacity);
  for (uint64_t first = 0; first < 256; first += 8) {
    std::vector<uint64_t> pages;
    for (uint64_t p = first; p < first + 8; ++p) pages.push_back(p);
    CountingLoader l{salt, 2, 16384};
    std::vector<PageHandle> h;
    Status s = cache->Acquire(2, pages, 16384, l.Fn(), &h, nullptr);
    ASSERT_TRUE(s.ok()) << s.ToString();
    for (size_t i = 0; i < 8; ++i) ASSERT_TRUE(PageIs(salt, 2, pages[i], h[i].data(), 16384));
    ASSERT_LE(cache->Snapshot().bytes_allocated, kCapacity);
  }
  EXPECT_EQ(cache->Snapshot().bytes_in_use, kCapacity);  // all 16 KiB pages now
}

// The intended use: a loader that reads each run with one scatter ReadOp straight into the slots,
// through O_DIRECT when pages are 4096-multiples.
TEST(PageCache, LoadsThroughBatchReaderDirectly) {
  const uint64_t salt = testing::FreshSeed();
  testing::ScratchDir dir;
  const std::string path = dir.file("seg");
  constexpr uint64_t kHeader = 4096, kPages = 200;
  std::vector<uint8_t> file(kHeader + kPages * kPage);
  for (uint64_t p = 0; p < kPages; ++p)
    FillPage(salt, 5, p, file.data() + kHeader + p * kPage, kPage);
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(file.data()), static_cast<std::streamsize>(file.size()));
  std::unique_ptr<BatchReader> reader;
  ASSERT_TRUE(BatchReader::Open(path, true, &reader).ok());
  PageLoader loader = [&](const std::vector<MissingRun>& runs) {
    std::vector<ReadOp> ops;
    for (const MissingRun& run : runs) {
      ReadOp op{kHeader + run.first_page * kPage, {}};
      for (void* slot : run.slots) op.iov.push_back({slot, kPage});
      ops.push_back(std::move(op));
    }
    return reader->Read(ops);
  };
  auto cache = Open(1 << 20);
  std::mt19937_64 rng(salt);
  std::vector<uint64_t> pages;
  for (int i = 0; i < 60; ++i) pages.push_back(rng() % kPages);
  std::vector<PageHandle> h;
  AcquireStats st;
  ASSERT_TRUE(cache->Acquire(5, pages, kPage, loader, &h, &st).ok());
  for (size_t i = 0; i < pages.size(); ++i)
    EXPECT_TRUE(PageIs(salt, 5, pages[i], h[i].data(), kPage));
  const BatchReaderCounters c = reader->counters();
  EXPECT_EQ(c.reads, 1u);
  EXPECT_EQ(c.bytes, st.misses * kPage);
  EXPECT_EQ(c.direct_bytes, c.bytes);
}

// Many threads, many versions, pins, erases and failing loads at once: for ThreadSanitizer, and
// for the invariants afterwards.
TEST(PageCache, ConcurrentMixedStress) {
  const uint64_t salt = testing::FreshSeed();
  constexpr size_t kCapacity = 2 << 20;
  auto cache = Open(kCapacity, 128 << 10);
  constexpr int kThreads = 6, kSteps = 400;
  const size_t sizes[] = {4096, 8192, 12288};
  std::vector<int> bad(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(salt + 31 * static_cast<uint64_t>(t));
      for (int step = 0; step < kSteps; ++step) {
        const uint64_t v = rng() % 24;
        const size_t pb = sizes[v % 3];
        const int action = static_cast<int>(rng() % 100);
        if (action < 3) {
          if (!cache->PinVersion(v).ok()) ++bad[t];
          continue;
        }
        if (action < 7) {
          cache->UnpinVersion(v);
          continue;
        }
        if (action < 9) {
          cache->EraseVersion(v);
          continue;
        }
        const bool fail = action < 14;
        PageLoader loader = [&, v, pb, fail](const std::vector<MissingRun>& runs) {
          if (fail) return Status::IOError("injected");
          for (const MissingRun& run : runs) {
            for (uint64_t i = 0; i < run.count; ++i) {
              FillPage(salt, v, run.first_page + i, run.slots[i], pb);
            }
          }
          return Status::Ok();
        };
        std::vector<uint64_t> pages(1 + rng() % 12);
        const uint64_t base = rng() % 64;
        for (auto& p : pages) p = base + rng() % 16;
        std::vector<PageHandle> h;
        Status s = cache->Acquire(v, pages, pb, loader, &h, nullptr);
        if (s.ok()) {
          for (size_t i = 0; i < pages.size(); ++i) {
            if (!PageIs(salt, v, pages[i], h[i].data(), pb)) ++bad[t];
          }
          if (rng() % 2 == 0) std::this_thread::yield();  // hold a little
        } else if (!s.IsUnavailable() && s.code() != Status::Code::kIOError) {
          ++bad[t];
        }
        const PageCacheCounters c = cache->Snapshot();
        if (c.bytes_allocated > kCapacity) ++bad[t];
      }
    });
  }
  WithTimeout([&] {
    for (auto& th : threads) th.join();
  });
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(bad[t], 0) << "thread " << t;
  for (uint64_t v = 0; v < 24; ++v) cache->UnpinVersion(v);
  const PageCacheCounters c = cache->Snapshot();
  EXPECT_EQ(c.pinned_bytes, 0u);
  EXPECT_LE(c.bytes_in_use, c.bytes_allocated);
  EXPECT_LE(c.bytes_allocated, kCapacity);
  for (uint64_t v = 0; v < 24; ++v) cache->EraseVersion(v);
  EXPECT_EQ(cache->Snapshot().pages_resident, 0u);
}

}  // namespace
}  // namespace sqkv
