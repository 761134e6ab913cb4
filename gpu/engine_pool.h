// Page-granular bookkeeping of the engine's device page pool: which pool page holds which layer's
// page, free space, CLOCK eviction. Host side only (the bytes are one cudaMalloc the engine owns);
// plain C++, so it is tested without a device. Policy: "Paging" in gpu/engine.h.
//
// Memory is cut into slots of slot_bytes. A slot holds pages of one size (a size class): page
// position i of slot s has the pool page id s * (slot_bytes / page_bytes) + i, so the attention
// finds it at pool + id * page_bytes. A slot joins a class when the class needs room and leaves
// it when its last page is freed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <set>
#include <vector>

namespace sqkv::gpu {

// Who holds a pool page: an engine layer (its small id) and the layer's page (head-major index).
struct PoolOwner {
  uint32_t layer = 0;
  uint32_t page = 0;
};

class PagePool {
 public:
  PagePool(size_t num_slots, size_t slot_bytes);

  size_t num_slots() const { return slots_.size(); }
  size_t slot_bytes() const { return slot_bytes_; }
  size_t slots_used() const { return slots_.size() - free_slots_.size(); }
  uint64_t pages_used() const { return pages_used_; }
  uint64_t page_bytes_used() const { return page_bytes_used_; }
  // Pages evicted by Allocate since construction.
  uint64_t evictions() const { return evictions_; }
  // Steps of the CLOCK hands since construction: while it has not moved, no reference bit was
  // cleared.
  uint64_t hand_moves() const { return hand_moves_; }
  // Largest pool page id + 1 for pages of `page_bytes`.
  size_t PageIds(size_t page_bytes) const { return slots_.size() * (slot_bytes_ / page_bytes); }

  // One page of `page_bytes` (a divisor of slot_bytes) for `owner`, in use in `epoch`, reference
  // bit clear. Takes a free position of the class, else a free slot. With `evict`, then evicts:
  // CLOCK over the class's pages (pinned pages and pages in use in `epoch` are skipped; a set
  // reference bit is cleared and the page passed over), else a whole slot of another class whose
  // pages are all evictable. The owners of evicted pages are appended to *evicted (the caller
  // updates their tables). Returns the pool page id, or -1 when nothing can be had.
  int32_t Allocate(size_t page_bytes, PoolOwner owner, bool pinned, uint64_t epoch, bool evict,
                   std::vector<PoolOwner>* evicted);
  // Frees an allocated page; its slot returns to the free slots when it empties.
  void Free(size_t page_bytes, int32_t id);
  // A selection hit: sets the reference bit and marks the page in use in `epoch`.
  void Touch(size_t page_bytes, int32_t id, uint64_t epoch);
  // Sets the reference bit only.
  void Reference(size_t page_bytes, int32_t id);
  void SetPinned(size_t page_bytes, int32_t id, bool pinned);
  // The owner of an allocated page (for checks).
  PoolOwner OwnerOf(size_t page_bytes, int32_t id) const;

 private:
  struct Entry {
    PoolOwner owner;
    uint64_t epoch = 0;
    bool used = false;
    bool ref = false;
    bool pinned = false;
  };
  struct Slot {
    int32_t cls = -1;             // size class, -1 when free
    int32_t index_in_class = -1;  // position in Class::slots
    int32_t used = 0;
    std::vector<Entry> entries;    // (pages per slot of the class)
    std::vector<int32_t> free_pos;  // free positions, descending (pop_back gives the lowest)
  };
  struct Class {
    size_t page_bytes = 0;
    int32_t per_slot = 0;
    std::vector<int32_t> slots;  // slots of this class (the CLOCK's ring)
    std::set<int32_t> partial;   // slots of this class with a free position
    size_t hand_slot = 0;        // CLOCK hand: index into `slots`, position in that slot
    int32_t hand_pos = 0;
  };

  int ClassOf(size_t page_bytes);
  Entry& EntryOf(size_t page_bytes, int32_t id);
  int32_t TakeFree(int cls);
  void AssignSlot(int cls, int32_t slot);
  // Returns `slot` (all of whose pages are unused now) to the free slots.
  void ReleaseSlot(int32_t slot);
  int32_t Sweep(int cls, uint64_t epoch, std::vector<PoolOwner>* evicted);
  // Frees a slot of another class whose pages can all be evicted; false if none.
  bool Steal(int cls, uint64_t epoch, std::vector<PoolOwner>* evicted);
  static bool Evictable(const Entry& e, uint64_t epoch) {
    return !e.used || (!e.pinned && e.epoch != epoch);
  }

  size_t slot_bytes_;
  std::vector<Slot> slots_;
  std::vector<int32_t> free_slots_;  // descending: pop_back hands out the lowest slot
  std::vector<Class> classes_;
  uint64_t pages_used_ = 0;
  uint64_t page_bytes_used_ = 0;
  uint64_t evictions_ = 0;
  uint64_t hand_moves_ = 0;
};

}  // namespace sqkv::gpu
