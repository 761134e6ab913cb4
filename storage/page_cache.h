// The host page cache: a bounded set of KV pages shared by every context, between the segment
// files on disk and the device page pool.
//
// Keys are (version, page): a context version and a page number of its segment (the segment's
// page order). All pages of one version have one size, page_bytes; versions may differ. A page
// lives in a slot of its size class (page_bytes rounded up to kPageSlotAlignment); slots are
// carved from chunks of one class, 4096-aligned, so O_DIRECT reads land in them directly.
//
// Memory: the chunks allocated never exceed capacity_bytes in total (so neither do the slots in
// use). When a slot is needed and no memory is left, an unpinned page is evicted: a 2Q-like CLOCK.
// New pages enter a probationary FIFO with the reference bit clear; a hit sets the bit; a page
// that reaches the FIFO's head with its bit set moves to the protected CLOCK ring instead of
// leaving. Eviction takes from probation while it holds at least probation_fraction of the
// evictable bytes, else from the protected ring (bit set: clear and pass; clear: evict). So a
// one-time scan of cold pages cycles through probation and leaves a hot set (up to
// 1 - probation_fraction of the cache) alone.
//
// A page is never evicted while a PageHandle pins it or while its version is pinned (PinVersion).
// When nothing can be evicted, Acquire answers Unavailable at once; it never waits for space.
//
// Thread safety: every method may be called from any thread. Handles may be released on any
// thread. The cache must outlive its handles.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "common/status.h"

namespace sqkv {

// Slot sizes and addresses are multiples of this (the direct-I/O alignment).
inline constexpr size_t kPageSlotAlignment = 4096;

struct PageCacheOptions {
  // Bound on the memory the cache allocates for pages (whole chunks).
  // Default: 1 GiB.
  size_t capacity_bytes = 1ull << 30;
  // Size of one allocation; a chunk holds floor(chunk_bytes / slot) slots of one size class (one
  // slot when a slot is larger). Large chunks suit pinned memory, whose allocation is slow.
  // Default: 4 MiB.
  size_t chunk_bytes = 4ull << 20;
  // Share of the evictable bytes kept for probationary (seen once) pages, in (0, 1).
  // Default: 0.25.
  double probation_fraction = 0.25;
  // Allocates a chunk of `bytes` (a multiple of kPageSlotAlignment) aligned to
  // kPageSlotAlignment, or returns null. Called with the cache's lock held.
  // Default (empty): std::aligned_alloc. The GPU build passes cudaHostAlloc-backed pinned memory.
  std::function<void*(size_t bytes)> alloc_chunk;
  // Frees a chunk from alloc_chunk. Default (empty): std::free.
  std::function<void(void* chunk, size_t bytes)> free_chunk;
};

// A run of consecutive missing pages, for one coalesced read.
struct MissingRun {
  uint64_t first_page = 0;
  uint64_t count = 0;
  std::vector<void*> slots;  // (count) destinations, each page_bytes long, 4096-aligned
};

// Fills every slot of every run (all runs of one Acquire call, ascending and disjoint) with its
// page's bytes, checked; returns OK only when all are complete. Called at most once per Acquire,
// without the cache's lock. It must not call back into the cache.
using PageLoader = std::function<Status(const std::vector<MissingRun>& runs)>;

// What one Acquire did. Pages counted once each, however often they appear in the request.
struct AcquireStats {
  uint64_t hits = 0;          // resident pages
  uint64_t joined = 0;        // pages another Acquire was loading; waited for, not loaded again
  uint64_t misses = 0;        // pages this call loaded
  uint64_t bytes_loaded = 0;  // misses * page_bytes
  uint64_t evictions = 0;     // pages evicted to make room
};

// Totals and gauges of the cache. Read from relaxed atomics: each field is exact, the set is not
// one instant.
struct PageCacheCounters {
  uint64_t hits = 0, joined = 0, misses = 0, bytes_loaded = 0, evictions = 0;
  uint64_t load_failures = 0;    // loader calls that failed
  uint64_t unavailable = 0;      // Acquires refused for lack of space
  uint64_t pages_resident = 0;   // pages held in slots (loading, ready, or released late)
  uint64_t bytes_in_use = 0;     // slot bytes of those pages
  uint64_t bytes_allocated = 0;  // chunk bytes allocated (>= bytes_in_use, <= capacity_bytes)
  uint64_t pinned_bytes = 0;     // slot bytes that cannot be evicted now (handles, pinned versions)
  uint64_t capacity_bytes = 0;
};

class PageCache;
struct PageCacheEntry;  // private to page_cache.cc

// A pin on one cached page: while it lives the page stays in its slot and its bytes do not change.
// Move-only. Releasing takes the cache's lock; release many at once with PageCache::Release.
class PageHandle {
 public:
  PageHandle() = default;
  ~PageHandle() { Reset(); }
  PageHandle(PageHandle&& o) noexcept { *this = std::move(o); }
  PageHandle& operator=(PageHandle&& o) noexcept;
  PageHandle(const PageHandle&) = delete;
  PageHandle& operator=(const PageHandle&) = delete;

  bool valid() const { return entry_ != nullptr; }
  // The page: (page_bytes) bytes, 4096-aligned.
  const void* data() const { return data_; }
  size_t size() const { return bytes_; }
  // Drops the pin now.
  void Reset();

 private:
  friend class PageCacheImpl;
  PageHandle(PageCache* cache, PageCacheEntry* entry, const void* data, size_t bytes)
      : cache_(cache), entry_(entry), data_(data), bytes_(bytes) {}
  PageCache* cache_ = nullptr;
  PageCacheEntry* entry_ = nullptr;
  const void* data_ = nullptr;
  size_t bytes_ = 0;
};

class PageCache {
 public:
  // InvalidArgument when capacity_bytes is below one slot or probation_fraction is not in (0, 1).
  static Status Open(const PageCacheOptions& options, std::unique_ptr<PageCache>* out);
  virtual ~PageCache() = default;

  // Pins pages [pages...] of `version`; out receives (pages.size()) handles in request order
  // (duplicates allowed). Missing pages get slots (evicting unpinned pages as needed) and are
  // loaded by one call to `loader`, then published; pages another Acquire is loading are waited
  // for. Errors, with no pins held afterwards and no page left half loaded:
  //   InvalidArgument: page_bytes 0, larger than the capacity, or different from the page_bytes
  //     this version's pages were cached with;
  //   Unavailable: "host cache full: N bytes pinned" when the misses do not fit next to pinned
  //     pages (nothing is waited for);
  //   the loader's Status (also given to every Acquire waiting for those pages).
  // stats (may be null) receives what this call did.
  virtual Status Acquire(uint64_t version, const std::vector<uint64_t>& pages, size_t page_bytes,
                         const PageLoader& loader, std::vector<PageHandle>* out,
                         AcquireStats* stats) = 0;

  // Releases every handle in `handles` under one lock and clears the vector.
  virtual void Release(std::vector<PageHandle>* handles) = 0;

  // Long-lived pin (`sqkv pin`): the version's cached pages, present and future, are not evicted
  // until UnpinVersion. Not counted: pinning twice then unpinning once unpins.
  virtual Status PinVersion(uint64_t version) = 0;
  virtual void UnpinVersion(uint64_t version) = 0;
  virtual bool IsVersionPinned(uint64_t version) const = 0;

  // Drops the version (after rm or rebuild): its version pin, and every page of it from the index,
  // so no later Acquire finds them. Slots not held by a handle are freed now; held ones when their
  // last handle goes. Pages being loaded right now are published to their waiters but not kept.
  virtual void EraseVersion(uint64_t version) = 0;

  virtual PageCacheCounters Snapshot() const = 0;

 private:
  friend class PageHandle;
  virtual void ReleaseOne(PageCacheEntry* entry) = 0;
};

}  // namespace sqkv
