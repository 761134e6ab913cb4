#include "storage/page_cache.h"

#include <algorithm>
#include <atomic>
#include <cassert>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>

namespace sqkv {

struct PageCacheChunk;
struct PageCacheSizeClass;

struct PageCacheEntry {
  enum class State : uint8_t { kLoading, kReady, kFailed };
  enum class Queue : uint8_t { kNone, kProbation, kProtected, kVersionPinned };

  uint64_t version = 0;
  uint64_t page = 0;
  size_t page_bytes = 0;
  // The slot; data == nullptr once it is freed (a failed load; an erased page waiting for its
  // last handle keeps its slot).
  PageCacheSizeClass* cls = nullptr;
  PageCacheChunk* chunk = nullptr;
  uint32_t slot = 0;
  void* data = nullptr;

  uint32_t pins = 0;  // handles, plus one per Acquire call holding it in flight
  State state = State::kLoading;
  Queue queue = Queue::kNone;
  bool referenced = false;         // the CLOCK bit: hit since it entered its queue or was passed
  bool version_pinned = false;     // its version is pinned (PinVersion)
  bool indexed = true;             // in the index; otherwise an orphan freed with its last pin
  Status error;                    // kFailed: why
  PageCacheEntry* prev = nullptr;  // queue links
  PageCacheEntry* next = nullptr;
};

namespace {

using Entry = PageCacheEntry;

// A doubly linked list threaded through the entries: a FIFO, or a CLOCK ring read from the front.
class EntryList {
 public:
  bool empty() const { return head_ == nullptr; }
  size_t count() const { return count_; }
  size_t bytes() const { return bytes_; }
  Entry* front() const { return head_; }
  void PushBack(Entry* e, size_t slot_bytes) {
    e->prev = tail_;
    e->next = nullptr;
    (tail_ != nullptr ? tail_->next : head_) = e;
    tail_ = e;
    ++count_;
    bytes_ += slot_bytes;
  }
  void Remove(Entry* e, size_t slot_bytes) {
    (e->prev != nullptr ? e->prev->next : head_) = e->next;
    (e->next != nullptr ? e->next->prev : tail_) = e->prev;
    e->prev = e->next = nullptr;
    --count_;
    bytes_ -= slot_bytes;
  }

 private:
  Entry* head_ = nullptr;
  Entry* tail_ = nullptr;
  size_t count_ = 0;
  size_t bytes_ = 0;
};

struct Key {
  uint64_t version;
  uint64_t page;
  bool operator==(const Key&) const = default;
};
struct KeyHash {
  size_t operator()(const Key& k) const {
    uint64_t x = k.version * 0x9e3779b97f4a7c15ull ^ k.page;
    x ^= x >> 31;
    x *= 0xbf58476d1ce4e5b9ull;
    return static_cast<size_t>(x ^ (x >> 29));
  }
};

size_t SlotBytes(size_t page_bytes) {
  return (page_bytes + kPageSlotAlignment - 1) / kPageSlotAlignment * kPageSlotAlignment;
}

}  // namespace

// A chunk from alloc_chunk, carved into `slots` slots of its class.
struct PageCacheChunk {
  void* base = nullptr;
  size_t bytes = 0;
  uint32_t slots = 0;
  uint32_t live = 0;                 // slots handed out
  std::vector<uint32_t> free_slots;  // indices of the others
};

struct PageCacheSizeClass {
  size_t slot_bytes = 0;
  size_t chunk_bytes = 0;
  std::vector<std::unique_ptr<PageCacheChunk>> chunks;
  std::vector<PageCacheChunk*> with_free;  // chunks with at least one free slot
};

class PageCacheImpl final : public PageCache {
 public:
  explicit PageCacheImpl(const PageCacheOptions& options) : options_(options) {
    if (!options_.alloc_chunk) {
      options_.alloc_chunk = [](size_t bytes) {
        return std::aligned_alloc(kPageSlotAlignment, bytes);
      };
    }
    if (!options_.free_chunk) options_.free_chunk = [](void* p, size_t) { std::free(p); };
  }
  ~PageCacheImpl() override;

  Status Acquire(uint64_t version, const std::vector<uint64_t>& pages, size_t page_bytes,
                 const PageLoader& loader, std::vector<PageHandle>* out,
                 AcquireStats* stats) override;
  void Release(std::vector<PageHandle>* handles) override;
  Status PinVersion(uint64_t version) override;
  void UnpinVersion(uint64_t version) override;
  bool IsVersionPinned(uint64_t version) const override;
  void EraseVersion(uint64_t version) override;
  PageCacheCounters Snapshot() const override;

 private:
  struct SlotRef {
    PageCacheChunk* chunk;
    uint32_t slot;
    void* data;
  };
  struct VersionInfo {
    size_t page_bytes = 0;
    std::unordered_set<Entry*> entries;  // its indexed entries
  };

  void ReleaseOne(Entry* entry) override;

  // All below run with mu_ held.
  PageCacheSizeClass* ClassFor(size_t slot_bytes);
  bool TakeSlot(PageCacheSizeClass* cls, SlotRef* ref);
  void ReturnSlot(PageCacheSizeClass* cls, const SlotRef& ref);
  bool AllocChunk(PageCacheSizeClass* cls);
  bool FreeOneEmptyChunk();
  Status Reserve(PageCacheSizeClass* cls, size_t n, std::vector<SlotRef>* slots,
                 uint64_t* evictions);
  Entry* FindVictim();
  Entry* SweepProbation();
  Entry* SweepProtected();
  EntryList* ListOf(Entry::Queue q);
  void Enqueue(Entry* e, Entry::Queue q);
  void Dequeue(Entry* e);
  void FreeEntrySlot(Entry* e);
  void Drop(Entry* e);    // an unpinned, indexed entry leaves: index, queue, slot, memory
  void Orphan(Entry* e);  // an indexed entry leaves the index but lives on until its last pin
  void AddPin(Entry* e);
  void Unpin(Entry* e);
  void SetVersionPinned(Entry* e, bool pinned);
  bool Unevictable(const Entry& e) const { return e.pins > 0 || e.version_pinned; }
  Status Full(size_t needed) const;

  PageCacheOptions options_;
  mutable std::mutex mu_;
  std::condition_variable loaded_;  // signalled when loads finish (ok or not)
  std::unordered_map<Key, std::unique_ptr<Entry>, KeyHash> index_;
  std::unordered_map<Entry*, std::unique_ptr<Entry>> orphans_;
  std::unordered_map<uint64_t, VersionInfo> versions_;
  std::unordered_set<uint64_t> pinned_versions_;
  std::map<size_t, std::unique_ptr<PageCacheSizeClass>> classes_;
  EntryList probation_, protected_, version_pinned_;
  size_t empty_chunks_ = 0;
  bool alloc_failed_ = false;  // alloc_chunk returned null since the last successful one

  std::atomic<uint64_t> hits_{0}, joined_{0}, misses_{0}, bytes_loaded_{0}, evictions_{0},
      load_failures_{0}, unavailable_{0}, pages_resident_{0}, bytes_in_use_{0}, bytes_allocated_{0},
      pinned_bytes_{0};
};

// ---- PageHandle --------------------------------------------------------------------------------

PageHandle& PageHandle::operator=(PageHandle&& o) noexcept {
  if (this == &o) return *this;
  Reset();
  cache_ = o.cache_;
  entry_ = o.entry_;
  data_ = o.data_;
  bytes_ = o.bytes_;
  o.cache_ = nullptr;
  o.entry_ = nullptr;
  o.data_ = nullptr;
  o.bytes_ = 0;
  return *this;
}

void PageHandle::Reset() {
  if (entry_ != nullptr) cache_->ReleaseOne(entry_);
  cache_ = nullptr;
  entry_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

// ---- PageCache ---------------------------------------------------------------------------------

Status PageCache::Open(const PageCacheOptions& options, std::unique_ptr<PageCache>* out) {
  if (options.capacity_bytes < kPageSlotAlignment) {
    return Status::InvalidArgument("page cache capacity " + std::to_string(options.capacity_bytes) +
                                   " bytes is below one slot (" +
                                   std::to_string(kPageSlotAlignment) + ")");
  }
  if (!(options.probation_fraction > 0.0 && options.probation_fraction < 1.0)) {
    return Status::InvalidArgument("page cache probation_fraction " +
                                   std::to_string(options.probation_fraction) +
                                   " is not in (0, 1)");
  }
  if (static_cast<bool>(options.alloc_chunk) != static_cast<bool>(options.free_chunk)) {
    return Status::InvalidArgument("page cache: alloc_chunk and free_chunk come as a pair");
  }
  *out = std::make_unique<PageCacheImpl>(options);
  return Status::Ok();
}

PageCacheImpl::~PageCacheImpl() {
  // Handles must not outlive the cache; their pages go with it.
  assert(orphans_.empty() && "a PageHandle outlived its PageCache");
  for (auto& [bytes, cls] : classes_) {
    for (auto& chunk : cls->chunks) options_.free_chunk(chunk->base, chunk->bytes);
  }
}

Status PageCacheImpl::Acquire(uint64_t version, const std::vector<uint64_t>& pages,
                              size_t page_bytes, const PageLoader& loader,
                              std::vector<PageHandle>* out, AcquireStats* stats) {
  out->clear();
  AcquireStats st;
  if (stats != nullptr) *stats = st;
  const size_t slot_bytes = SlotBytes(page_bytes);
  if (page_bytes == 0 || slot_bytes > options_.capacity_bytes) {
    return Status::InvalidArgument("page cache: page_bytes " + std::to_string(page_bytes) +
                                   " is 0 or larger than the capacity " +
                                   std::to_string(options_.capacity_bytes));
  }
  if (pages.empty()) return Status::Ok();

  // Distinct pages, ascending (the order of the runs); each gets one entry and one call pin.
  std::vector<uint64_t> uniq(pages);
  std::sort(uniq.begin(), uniq.end());
  uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
  std::vector<Entry*> entries(uniq.size(), nullptr);
  std::vector<size_t> missing;  // indices into uniq
  std::vector<Entry*> others;   // entries another Acquire is loading

  std::unique_lock lock(mu_);
  auto vit = versions_.find(version);
  if (vit != versions_.end() && vit->second.page_bytes != page_bytes) {
    return Status::InvalidArgument(
        "page cache: version " + std::to_string(version) + " is cached with page_bytes " +
        std::to_string(vit->second.page_bytes) + ", asked for " + std::to_string(page_bytes));
  }
  for (size_t u = 0; u < uniq.size(); ++u) {
    auto it = index_.find(Key{version, uniq[u]});
    if (it == index_.end()) {
      missing.push_back(u);
      continue;
    }
    Entry* e = it->second.get();
    AddPin(e);
    e->referenced = true;
    entries[u] = e;
    if (e->state == Entry::State::kLoading) {
      others.push_back(e);
      ++st.joined;
    } else {
      ++st.hits;
    }
  }
  // Counted now, so a joined wait is visible in Snapshot() while it lasts.
  hits_.fetch_add(st.hits, std::memory_order_relaxed);
  joined_.fetch_add(st.joined, std::memory_order_relaxed);
  // Pins held so far by this call, dropped on every error path.
  auto unpin_all = [&] {
    for (Entry* e : entries) {
      if (e != nullptr) Unpin(e);
    }
  };

  // Slots for the misses, then entries in the index, so later Acquires wait for this load.
  PageCacheSizeClass* cls = ClassFor(slot_bytes);
  std::vector<SlotRef> slots;
  Status s = Reserve(cls, missing.size(), &slots, &st.evictions);
  evictions_.fetch_add(st.evictions, std::memory_order_relaxed);
  if (!s.ok()) {
    unavailable_.fetch_add(1, std::memory_order_relaxed);
    unpin_all();
    if (stats != nullptr) *stats = st;
    return s;
  }
  std::vector<MissingRun> runs;
  std::vector<Entry*> mine;
  mine.reserve(missing.size());
  const bool version_pinned = pinned_versions_.count(version) > 0;
  VersionInfo* info = missing.empty() ? nullptr : &versions_[version];
  if (info != nullptr) info->page_bytes = page_bytes;
  for (size_t m = 0; m < missing.size(); ++m) {
    auto owned = std::make_unique<Entry>();
    Entry* e = owned.get();
    e->version = version;
    e->page = uniq[missing[m]];
    e->page_bytes = page_bytes;
    e->cls = cls;
    e->chunk = slots[m].chunk;
    e->slot = slots[m].slot;
    e->data = slots[m].data;
    e->version_pinned = version_pinned;
    if (version_pinned) pinned_bytes_.fetch_add(slot_bytes, std::memory_order_relaxed);
    AddPin(e);
    index_.emplace(Key{version, e->page}, std::move(owned));
    info->entries.insert(e);
    entries[missing[m]] = e;
    mine.push_back(e);
    if (runs.empty() || runs.back().first_page + runs.back().count != e->page) {
      runs.push_back(MissingRun{e->page, 0, {}});
    }
    ++runs.back().count;
    runs.back().slots.push_back(e->data);
  }

  if (!runs.empty()) {
    lock.unlock();
    Status load;
    // The loader is the caller's code; an exception escaping it would leave these pages loading
    // forever and their waiters hung, so it becomes a Status here.
    try {
      load = loader(runs);
    } catch (const std::exception& ex) {
      load = Status::Internal(std::string("page loader threw: ") + ex.what());
    } catch (...) {
      load = Status::Internal("page loader threw");
    }
    lock.lock();
    for (Entry* e : mine) {
      if (load.ok()) {
        e->state = Entry::State::kReady;
        if (e->indexed)
          Enqueue(e, e->version_pinned ? Entry::Queue::kVersionPinned : Entry::Queue::kProbation);
        continue;
      }
      // Waiters see the error; the page leaves the index and its slot is free at once, so no
      // half-loaded bytes are ever handed out.
      e->state = Entry::State::kFailed;
      e->error = load;
      if (e->indexed) Orphan(e);
      FreeEntrySlot(e);
    }
    loaded_.notify_all();
    if (!load.ok()) {
      load_failures_.fetch_add(1, std::memory_order_relaxed);
      unpin_all();
      return load;
    }
    st.misses = mine.size();
    st.bytes_loaded = st.misses * page_bytes;
  }

  if (!others.empty()) {
    loaded_.wait(lock, [&] {
      return std::all_of(others.begin(), others.end(),
                         [](const Entry* e) { return e->state != Entry::State::kLoading; });
    });
    for (const Entry* e : others) {
      if (e->state == Entry::State::kFailed) {
        Status failed = e->error;
        unpin_all();
        return failed;
      }
    }
  }

  // Handles in request order: the call pin of each distinct page goes to its first handle.
  out->reserve(pages.size());
  std::vector<bool> used(uniq.size(), false);
  for (uint64_t p : pages) {
    const size_t u =
        static_cast<size_t>(std::lower_bound(uniq.begin(), uniq.end(), p) - uniq.begin());
    Entry* e = entries[u];
    if (used[u]) AddPin(e);
    used[u] = true;
    out->push_back(PageHandle(this, e, e->data, e->page_bytes));
  }
  misses_.fetch_add(st.misses, std::memory_order_relaxed);
  bytes_loaded_.fetch_add(st.bytes_loaded, std::memory_order_relaxed);
  if (stats != nullptr) *stats = st;
  return Status::Ok();
}

void PageCacheImpl::Release(std::vector<PageHandle>* handles) {
  {
    std::lock_guard lock(mu_);
    for (PageHandle& h : *handles) {
      if (h.entry_ == nullptr) continue;
      Unpin(h.entry_);
      h.cache_ = nullptr;
      h.entry_ = nullptr;
      h.data_ = nullptr;
      h.bytes_ = 0;
    }
  }
  handles->clear();
}

void PageCacheImpl::ReleaseOne(Entry* entry) {
  std::lock_guard lock(mu_);
  Unpin(entry);
}

Status PageCacheImpl::PinVersion(uint64_t version) {
  std::lock_guard lock(mu_);
  if (!pinned_versions_.insert(version).second) return Status::Ok();
  auto it = versions_.find(version);
  if (it == versions_.end()) return Status::Ok();
  for (Entry* e : it->second.entries) SetVersionPinned(e, true);
  return Status::Ok();
}

void PageCacheImpl::UnpinVersion(uint64_t version) {
  std::lock_guard lock(mu_);
  if (pinned_versions_.erase(version) == 0) return;
  auto it = versions_.find(version);
  if (it == versions_.end()) return;
  for (Entry* e : it->second.entries) SetVersionPinned(e, false);
}

bool PageCacheImpl::IsVersionPinned(uint64_t version) const {
  std::lock_guard lock(mu_);
  return pinned_versions_.count(version) > 0;
}

void PageCacheImpl::EraseVersion(uint64_t version) {
  std::lock_guard lock(mu_);
  pinned_versions_.erase(version);
  auto it = versions_.find(version);
  if (it == versions_.end()) return;
  // Drop and Orphan edit the version's set; walk a copy.
  const std::vector<Entry*> entries(it->second.entries.begin(), it->second.entries.end());
  for (Entry* e : entries) {
    SetVersionPinned(e, false);
    if (e->pins == 0 && e->state == Entry::State::kReady) {
      Drop(e);
    } else {
      Orphan(e);
    }
  }
}

PageCacheCounters PageCacheImpl::Snapshot() const {
  constexpr auto kRelaxed = std::memory_order_relaxed;
  PageCacheCounters c;
  c.hits = hits_.load(kRelaxed);
  c.joined = joined_.load(kRelaxed);
  c.misses = misses_.load(kRelaxed);
  c.bytes_loaded = bytes_loaded_.load(kRelaxed);
  c.evictions = evictions_.load(kRelaxed);
  c.load_failures = load_failures_.load(kRelaxed);
  c.unavailable = unavailable_.load(kRelaxed);
  c.pages_resident = pages_resident_.load(kRelaxed);
  c.bytes_in_use = bytes_in_use_.load(kRelaxed);
  c.bytes_allocated = bytes_allocated_.load(kRelaxed);
  c.pinned_bytes = pinned_bytes_.load(kRelaxed);
  c.capacity_bytes = options_.capacity_bytes;
  return c;
}

// ---- slots and chunks
// ----------------------------------------------------------------------------

PageCacheSizeClass* PageCacheImpl::ClassFor(size_t slot_bytes) {
  auto& cls = classes_[slot_bytes];
  if (cls == nullptr) {
    cls = std::make_unique<PageCacheSizeClass>();
    cls->slot_bytes = slot_bytes;
    // As many whole slots as fit in a chunk (at least one), but never more than the capacity.
    const size_t per_chunk = std::max<size_t>(1, options_.chunk_bytes / slot_bytes);
    const size_t fit = options_.capacity_bytes / slot_bytes;
    cls->chunk_bytes = std::min(per_chunk, fit) * slot_bytes;
  }
  return cls.get();
}

bool PageCacheImpl::TakeSlot(PageCacheSizeClass* cls, SlotRef* ref) {
  if (cls->with_free.empty()) return false;
  PageCacheChunk* c = cls->with_free.back();
  const uint32_t slot = c->free_slots.back();
  c->free_slots.pop_back();
  if (c->free_slots.empty()) cls->with_free.pop_back();
  if (c->live++ == 0) --empty_chunks_;
  *ref = SlotRef{c, slot, static_cast<uint8_t*>(c->base) + slot * cls->slot_bytes};
  pages_resident_.fetch_add(1, std::memory_order_relaxed);
  bytes_in_use_.fetch_add(cls->slot_bytes, std::memory_order_relaxed);
  return true;
}

void PageCacheImpl::ReturnSlot(PageCacheSizeClass* cls, const SlotRef& ref) {
  PageCacheChunk* c = ref.chunk;
  if (c->free_slots.empty()) cls->with_free.push_back(c);
  c->free_slots.push_back(ref.slot);
  if (--c->live == 0) ++empty_chunks_;
  pages_resident_.fetch_sub(1, std::memory_order_relaxed);
  bytes_in_use_.fetch_sub(cls->slot_bytes, std::memory_order_relaxed);
}

bool PageCacheImpl::AllocChunk(PageCacheSizeClass* cls) {
  if (bytes_allocated_.load(std::memory_order_relaxed) + cls->chunk_bytes >
      options_.capacity_bytes) {
    return false;
  }
  void* base = options_.alloc_chunk(cls->chunk_bytes);
  if (base == nullptr) {
    alloc_failed_ = true;
    return false;
  }
  alloc_failed_ = false;
  auto chunk = std::make_unique<PageCacheChunk>();
  chunk->base = base;
  chunk->bytes = cls->chunk_bytes;
  chunk->slots = static_cast<uint32_t>(cls->chunk_bytes / cls->slot_bytes);
  chunk->free_slots.resize(chunk->slots);
  // Hand out low addresses first (free_slots is popped from the back).
  for (uint32_t i = 0; i < chunk->slots; ++i) chunk->free_slots[i] = chunk->slots - 1 - i;
  cls->with_free.push_back(chunk.get());
  cls->chunks.push_back(std::move(chunk));
  ++empty_chunks_;
  bytes_allocated_.fetch_add(cls->chunk_bytes, std::memory_order_relaxed);
  return true;
}

bool PageCacheImpl::FreeOneEmptyChunk() {
  if (empty_chunks_ == 0) return false;
  for (auto& [bytes, cls] : classes_) {
    for (size_t i = 0; i < cls->chunks.size(); ++i) {
      PageCacheChunk* c = cls->chunks[i].get();
      if (c->live != 0) continue;
      cls->with_free.erase(std::find(cls->with_free.begin(), cls->with_free.end(), c));
      options_.free_chunk(c->base, c->bytes);
      bytes_allocated_.fetch_sub(c->bytes, std::memory_order_relaxed);
      cls->chunks.erase(cls->chunks.begin() + static_cast<ptrdiff_t>(i));
      --empty_chunks_;
      return true;
    }
  }
  return false;
}

Status PageCacheImpl::Reserve(PageCacheSizeClass* cls, size_t n, std::vector<SlotRef>* slots,
                              uint64_t* evictions) {
  slots->reserve(n);
  while (slots->size() < n) {
    SlotRef ref;
    if (TakeSlot(cls, &ref)) {
      slots->push_back(ref);
      continue;
    }
    // No free slot of this class: new memory if the budget allows, else memory of an empty
    // chunk of another class, else a victim (whose slot, or emptied chunk, serves next round).
    if (AllocChunk(cls) || FreeOneEmptyChunk()) continue;
    Entry* victim = FindVictim();
    if (victim == nullptr) {
      const size_t needed = (n - slots->size()) * cls->slot_bytes;
      for (const SlotRef& r : *slots) ReturnSlot(cls, r);
      slots->clear();
      return Full(needed);
    }
    Drop(victim);
    ++*evictions;
  }
  return Status::Ok();
}

Status PageCacheImpl::Full(size_t needed) const {
  std::string msg =
      "host cache full: " + std::to_string(pinned_bytes_.load(std::memory_order_relaxed)) +
      " bytes pinned, " + std::to_string(needed) + " more bytes needed, capacity " +
      std::to_string(options_.capacity_bytes);
  if (alloc_failed_) msg += " (chunk allocation failed)";
  return Status::Unavailable(std::move(msg));
}

// ---- eviction ----------------------------------------------------------------------------------

Entry* PageCacheImpl::FindVictim() {
  const double evictable = static_cast<double>(probation_.bytes() + protected_.bytes());
  const bool probation_first =
      !probation_.empty() && (protected_.empty() || static_cast<double>(probation_.bytes()) >=
                                                        options_.probation_fraction * evictable);
  if (probation_first) {
    if (Entry* e = SweepProbation()) return e;
  }
  if (Entry* e = SweepProtected()) return e;
  return SweepProbation();
}

Entry* PageCacheImpl::SweepProbation() {
  for (size_t n = probation_.count(); n > 0; --n) {
    Entry* e = probation_.front();
    if (e->pins > 0) {
      Dequeue(e);
      Enqueue(e, Entry::Queue::kProbation);
    } else if (e->referenced) {
      // Seen again while on probation: promote (with the bit clear, as a fresh CLOCK entry).
      e->referenced = false;
      Dequeue(e);
      Enqueue(e, Entry::Queue::kProtected);
    } else {
      return e;
    }
  }
  return nullptr;
}

Entry* PageCacheImpl::SweepProtected() {
  // Two turns of the hand: the first may only clear bits.
  for (size_t n = 2 * protected_.count(); n > 0; --n) {
    Entry* e = protected_.front();
    if (e->pins == 0 && !e->referenced) return e;
    if (e->pins == 0) e->referenced = false;  // a page in use keeps its bit
    Dequeue(e);
    Enqueue(e, Entry::Queue::kProtected);
  }
  return nullptr;
}

EntryList* PageCacheImpl::ListOf(Entry::Queue q) {
  switch (q) {
    case Entry::Queue::kProbation:
      return &probation_;
    case Entry::Queue::kProtected:
      return &protected_;
    case Entry::Queue::kVersionPinned:
      return &version_pinned_;
    case Entry::Queue::kNone:
      break;
  }
  return nullptr;
}

void PageCacheImpl::Enqueue(Entry* e, Entry::Queue q) {
  ListOf(q)->PushBack(e, e->cls->slot_bytes);
  e->queue = q;
}

void PageCacheImpl::Dequeue(Entry* e) {
  if (EntryList* list = ListOf(e->queue)) list->Remove(e, e->cls->slot_bytes);
  e->queue = Entry::Queue::kNone;
}

void PageCacheImpl::FreeEntrySlot(Entry* e) {
  if (e->data == nullptr) return;
  if (Unevictable(*e)) pinned_bytes_.fetch_sub(e->cls->slot_bytes, std::memory_order_relaxed);
  ReturnSlot(e->cls, SlotRef{e->chunk, e->slot, e->data});
  e->data = nullptr;
}

void PageCacheImpl::Drop(Entry* e) {
  assert(e->pins == 0 && e->indexed);
  Dequeue(e);
  SetVersionPinned(e, false);
  FreeEntrySlot(e);
  auto vit = versions_.find(e->version);
  vit->second.entries.erase(e);
  if (vit->second.entries.empty()) versions_.erase(vit);
  index_.erase(Key{e->version, e->page});  // frees e
}

void PageCacheImpl::Orphan(Entry* e) {
  assert(e->indexed);
  Dequeue(e);
  SetVersionPinned(e, false);
  auto vit = versions_.find(e->version);
  vit->second.entries.erase(e);
  if (vit->second.entries.empty()) versions_.erase(vit);
  auto it = index_.find(Key{e->version, e->page});
  orphans_.emplace(e, std::move(it->second));
  index_.erase(it);
  e->indexed = false;
}

void PageCacheImpl::AddPin(Entry* e) {
  if (!Unevictable(*e) && e->data != nullptr) {
    pinned_bytes_.fetch_add(e->cls->slot_bytes, std::memory_order_relaxed);
  }
  ++e->pins;
}

void PageCacheImpl::Unpin(Entry* e) {
  assert(e->pins > 0);
  --e->pins;
  if (!Unevictable(*e) && e->data != nullptr) {
    pinned_bytes_.fetch_sub(e->cls->slot_bytes, std::memory_order_relaxed);
  }
  if (e->pins == 0 && !e->indexed) {
    FreeEntrySlot(e);
    orphans_.erase(e);  // frees e
  }
}

void PageCacheImpl::SetVersionPinned(Entry* e, bool pinned) {
  if (e->version_pinned == pinned) return;
  const bool before = Unevictable(*e);
  e->version_pinned = pinned;
  const bool after = Unevictable(*e);
  if (e->data != nullptr && before != after) {
    if (after) {
      pinned_bytes_.fetch_add(e->cls->slot_bytes, std::memory_order_relaxed);
    } else {
      pinned_bytes_.fetch_sub(e->cls->slot_bytes, std::memory_order_relaxed);
    }
  }
  if (e->state != Entry::State::kReady || !e->indexed) return;
  // Ready pages of a pinned version sit apart, where the eviction sweeps never look. Unpinned,
  // they go back on probation with their reference bit as their hits left it.
  Dequeue(e);
  Enqueue(e, pinned ? Entry::Queue::kVersionPinned : Entry::Queue::kProbation);
}

}  // namespace sqkv
