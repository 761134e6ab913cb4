// Page-granular bookkeeping of the device page pool (see gpu/engine_pool.h).
#include "gpu/engine_pool.h"

namespace sqkv::gpu {

PagePool::PagePool(size_t num_slots, size_t slot_bytes) : slot_bytes_(slot_bytes) {
  slots_.resize(num_slots);
  free_slots_.reserve(num_slots);
  for (size_t i = num_slots; i > 0; --i) free_slots_.push_back(static_cast<int32_t>(i - 1));
}

int PagePool::ClassOf(size_t page_bytes) {
  for (size_t c = 0; c < classes_.size(); ++c) {
    if (classes_[c].page_bytes == page_bytes) return static_cast<int>(c);
  }
  Class c;
  c.page_bytes = page_bytes;
  c.per_slot = static_cast<int32_t>(slot_bytes_ / page_bytes);
  classes_.push_back(std::move(c));
  return static_cast<int>(classes_.size() - 1);
}

PagePool::Entry& PagePool::EntryOf(size_t page_bytes, int32_t id) {
  const int32_t per = static_cast<int32_t>(slot_bytes_ / page_bytes);
  return slots_[id / per].entries[id % per];
}

PoolOwner PagePool::OwnerOf(size_t page_bytes, int32_t id) const {
  const int32_t per = static_cast<int32_t>(slot_bytes_ / page_bytes);
  return slots_[id / per].entries[id % per].owner;
}

void PagePool::AssignSlot(int cls, int32_t slot) {
  Class& c = classes_[cls];
  Slot& s = slots_[slot];
  s.cls = cls;
  s.used = 0;
  s.entries.assign(c.per_slot, Entry());
  s.free_pos.resize(c.per_slot);
  for (int32_t i = 0; i < c.per_slot; ++i) s.free_pos[i] = c.per_slot - 1 - i;
  s.index_in_class = static_cast<int32_t>(c.slots.size());
  c.slots.push_back(slot);
  c.partial.insert(slot);
}

void PagePool::ReleaseSlot(int32_t slot) {
  Slot& s = slots_[slot];
  Class& c = classes_[s.cls];
  const size_t at = static_cast<size_t>(s.index_in_class);
  const int32_t last = c.slots.back();
  c.slots[at] = last;
  slots_[last].index_in_class = static_cast<int32_t>(at);
  c.slots.pop_back();
  c.partial.erase(slot);
  if (c.hand_slot >= c.slots.size()) {
    c.hand_slot = 0;
    c.hand_pos = 0;
  }
  s.cls = -1;
  s.index_in_class = -1;
  s.used = 0;
  s.free_pos.clear();
  free_slots_.push_back(slot);
}

int32_t PagePool::TakeFree(int cls) {
  Class& c = classes_[cls];
  if (c.partial.empty()) return -1;
  const int32_t slot = *c.partial.begin();
  Slot& s = slots_[slot];
  const int32_t pos = s.free_pos.back();
  s.free_pos.pop_back();
  ++s.used;
  if (s.free_pos.empty()) c.partial.erase(slot);
  return slot * c.per_slot + pos;
}

int32_t PagePool::Sweep(int cls, uint64_t epoch, std::vector<PoolOwner>* evicted) {
  Class& c = classes_[cls];
  // Two laps: the first may only clear reference bits.
  const size_t steps = 2 * c.slots.size() * static_cast<size_t>(c.per_slot);
  for (size_t step = 0; step < steps; ++step) {
    if (c.hand_slot >= c.slots.size()) {
      c.hand_slot = 0;
      c.hand_pos = 0;
    }
    const int32_t slot = c.slots[c.hand_slot];
    const int32_t pos = c.hand_pos;
    if (++c.hand_pos == c.per_slot) {
      c.hand_pos = 0;
      ++c.hand_slot;
    }
    ++hand_moves_;
    Entry& e = slots_[slot].entries[pos];
    if (!e.used || e.pinned || e.epoch == epoch) continue;
    if (e.ref) {
      e.ref = false;
      continue;
    }
    evicted->push_back(e.owner);
    ++evictions_;
    return slot * c.per_slot + pos;
  }
  return -1;
}

bool PagePool::Steal(int cls, uint64_t epoch, std::vector<PoolOwner>* evicted) {
  for (size_t d = 0; d < classes_.size(); ++d) {
    if (static_cast<int>(d) == cls) continue;
    Class& c = classes_[d];
    const size_t n = c.slots.size();
    for (size_t k = 0; k < n; ++k) {
      const int32_t slot = c.slots[(c.hand_slot + k) % n];
      Slot& s = slots_[slot];
      bool ok = true;
      for (const Entry& e : s.entries) ok = ok && Evictable(e, epoch);
      if (!ok) continue;
      for (Entry& e : s.entries) {
        if (!e.used) continue;
        evicted->push_back(e.owner);
        ++evictions_;
        --pages_used_;
        page_bytes_used_ -= c.page_bytes;
        e.used = false;
      }
      ReleaseSlot(slot);
      return true;
    }
  }
  return false;
}

int32_t PagePool::Allocate(size_t page_bytes, PoolOwner owner, bool pinned, uint64_t epoch,
                           bool evict, std::vector<PoolOwner>* evicted) {
  const int cls = ClassOf(page_bytes);
  int32_t id = TakeFree(cls);
  if (id < 0 && !free_slots_.empty()) {
    AssignSlot(cls, free_slots_.back());
    free_slots_.pop_back();
    id = TakeFree(cls);
  }
  if (id < 0 && evict) {
    id = Sweep(cls, epoch, evicted);
    if (id >= 0) {
      // The victim's position is reused in place: counts unchanged.
      EntryOf(page_bytes, id) = Entry{owner, epoch, /*used=*/true, /*ref=*/false, pinned};
      return id;
    }
    if (Steal(cls, epoch, evicted)) {
      AssignSlot(cls, free_slots_.back());
      free_slots_.pop_back();
      id = TakeFree(cls);
    }
  }
  if (id < 0) return -1;
  EntryOf(page_bytes, id) = Entry{owner, epoch, /*used=*/true, /*ref=*/false, pinned};
  ++pages_used_;
  page_bytes_used_ += page_bytes;
  return id;
}

void PagePool::Free(size_t page_bytes, int32_t id) {
  const int32_t per = static_cast<int32_t>(slot_bytes_ / page_bytes);
  const int32_t slot = id / per;
  Slot& s = slots_[slot];
  Entry& e = s.entries[id % per];
  if (!e.used) return;
  e = Entry();
  --pages_used_;
  page_bytes_used_ -= page_bytes;
  s.free_pos.push_back(id % per);
  if (--s.used == 0) {
    ReleaseSlot(slot);
    return;
  }
  classes_[s.cls].partial.insert(slot);
}

void PagePool::Touch(size_t page_bytes, int32_t id, uint64_t epoch) {
  Entry& e = EntryOf(page_bytes, id);
  e.ref = true;
  e.epoch = epoch;
}

void PagePool::Reference(size_t page_bytes, int32_t id) { EntryOf(page_bytes, id).ref = true; }

void PagePool::SetPinned(size_t page_bytes, int32_t id, bool pinned) {
  EntryOf(page_bytes, id).pinned = pinned;
}

}  // namespace sqkv::gpu
