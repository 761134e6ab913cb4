// Paging of the GPU engine: QueryPaged's page-in, preload, pins, page allocation with eviction,
// uploads (see "Paging" in gpu/engine.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <string>

#include "gpu/engine_impl.h"

namespace sqkv::gpu {
namespace {

std::string Key(uint64_t k) { return "layer " + std::to_string(k); }

// A page of a layer: layer id in the high half, head-major page in the low half.
uint64_t PageKey(const ResidentLayer& l, int head, int32_t page) {
  return (static_cast<uint64_t>(l.id) << 32) | static_cast<uint32_t>(l.head_page_base[head] + page);
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

Status EngineImpl::SetPinned(uint64_t layer_key, bool pinned) {
  auto it = layers_.find(layer_key);
  if (it == layers_.end()) return Status::NotFound(Key(layer_key) + " is not resident");
  ResidentLayer& l = *it->second;
  l.pinned = pinned;
  for (int32_t id : l.pool_page) {
    if (id >= 0) pages_.SetPinned(l.page_bytes, id, pinned);
  }
  return Status::Ok();
}

void EngineImpl::ReferenceLayer(ResidentLayer* l) {
  if (l->referenced_at == pages_.hand_moves()) return;  // no bit cleared since
  for (int32_t id : l->pool_page) {
    if (id >= 0) pages_.Reference(l->page_bytes, id);
  }
  l->referenced_at = pages_.hand_moves();
}

void EngineImpl::OnEvicted(size_t page_bytes, const std::vector<PoolOwner>& owners) {
  for (const PoolOwner& o : owners) {
    ResidentLayer* l = by_id_[o.layer];
    l->pool_page[o.page] = -1;
    --l->resident_pages;
    l->generation = next_generation_++;
    ++counters_.pages_evicted;
  }
  (void)page_bytes;
}

Status EngineImpl::AllocatePages(size_t page_bytes, bool evict, std::vector<PendingPage>* pages,
                                 PagingStats* stats) {
  std::vector<PoolOwner> evicted;
  for (size_t i = 0; i < pages->size(); ++i) {
    PendingPage& p = (*pages)[i];
    const PoolOwner owner{p.layer->id,
                          static_cast<uint32_t>(p.layer->head_page_base[p.head] + p.head_page)};
    const int32_t id = pages_.Allocate(page_bytes, owner, p.layer->pinned, epoch_, evict, &evicted);
    if (!evicted.empty()) {
      OnEvicted(page_bytes, evicted);
      if (stats != nullptr) stats->pages_evicted += static_cast<int64_t>(evicted.size());
      evicted.clear();
    }
    if (id < 0) {
      ReleasePages(page_bytes, std::vector<PendingPage>(pages->begin(), pages->begin() + i));
      for (size_t j = 0; j < i; ++j) (*pages)[j].pool_id = -1;
      ++counters_.unavailable;
      return Status::Unavailable(
          "device page pool: " + std::to_string(pages->size()) + " pages of " +
          std::to_string(page_bytes) + " bytes needed at once, only " + std::to_string(i) +
          (evict ? " could be freed next to pinned pages and pages in use by this call"
                 : " free (nothing is evicted for a whole-layer load)") +
          " (pool " + std::to_string(pool_bytes()) + " bytes)");
    }
    p.pool_id = id;
  }
  return Status::Ok();
}

void EngineImpl::ReleasePages(size_t page_bytes, const std::vector<PendingPage>& pages) {
  for (const PendingPage& p : pages) {
    if (p.pool_id >= 0) pages_.Free(page_bytes, p.pool_id);
  }
}

Status EngineImpl::Supply(const PageSupplier& supply, std::vector<PendingPage>* pages,
                          PagingStats* stats) {
  std::vector<int32_t> head_pages;
  std::vector<const void*> ptrs;
  size_t i = 0;
  while (i < pages->size()) {
    const ResidentLayer* l = (*pages)[i].layer;
    const int head = (*pages)[i].head;
    size_t j = i;
    head_pages.clear();
    while (j < pages->size() && (*pages)[j].layer == l && (*pages)[j].head == head) {
      head_pages.push_back((*pages)[j].head_page);
      ++j;
    }
    ptrs.clear();
    const auto t0 = std::chrono::steady_clock::now();
    Status st = supply(l->key, head, head_pages, &ptrs);
    const auto t1 = std::chrono::steady_clock::now();
    const std::string where = "page supplier, " + Key(l->key) + " head " + std::to_string(head);
    if (stats != nullptr) {
      stats->supply_us += std::chrono::duration<double, std::micro>(t1 - t0).count();
      ++stats->supplier_calls;
    }
    if (!st.ok()) return st.WithContext(where);
    if (ptrs.size() != head_pages.size()) {
      return Status::InvalidArgument(where + ": answered " + std::to_string(ptrs.size()) +
                                     " pages for " + std::to_string(head_pages.size()));
    }
    for (size_t k = 0; k < ptrs.size(); ++k) {
      if (ptrs[k] == nullptr) {
        return Status::InvalidArgument(where + ": null pointer for page " +
                                       std::to_string(head_pages[k]));
      }
      (*pages)[i + k].src = ptrs[k];
    }
    i = j;
  }
  return Status::Ok();
}

Status EngineImpl::Upload(size_t page_bytes, const std::vector<PendingPage>& pages,
                          const std::vector<DeviceWrite>& extra, PagingStats* stats) {
  if (pages.empty() && extra.empty()) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream());
  if (upload_start_ == nullptr || upload_end_ == nullptr) {
    // Both or neither: a failure leaves none behind, so the next upload tries again.
    cudaEvent_t a = nullptr, b = nullptr;
    SQKV_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&a), "cudaEventCreate"));
    if (Status made = CudaStatus(cudaEventCreate(&b), "cudaEventCreate"); !made.ok()) {
      cudaEventDestroy(a);
      return made;
    }
    if (upload_start_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(upload_start_));
    if (upload_end_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(upload_end_));
    upload_start_ = a;
    upload_end_ = b;
  }
  // Which pages the gather kernel reads (mapped page-locked memory) and which go by copy.
  std::vector<PageGather> gathers;
  std::vector<size_t> copies;  // indices into pages
  for (size_t i = 0; i < pages.size(); ++i) {
    const void* dev =
        options_.upload == EngineOptions::Upload::kAuto ? DeviceAddressOf(pages[i].src) : nullptr;
    if (dev != nullptr && Aligned16(dev)) {
      gathers.push_back({dev, static_cast<uint64_t>(pages[i].pool_id) * page_bytes});
    } else {
      copies.push_back(i);
    }
  }
  // Staging (mapped, read by the kernel in place): gathers, then page-table writes and `extra`.
  const size_t n_writes = pages.size() + extra.size();
  const size_t gather_bytes = (gathers.size() * sizeof(PageGather) + 255) / 256 * 256;
  SQKV_RETURN_IF_ERROR(staging_.Reserve(gather_bytes + n_writes * sizeof(DeviceWrite)));
  auto* host = static_cast<uint8_t*>(staging_.host());
  auto* dev = static_cast<uint8_t*>(staging_.device());
  if (!gathers.empty()) std::memcpy(host, gathers.data(), gathers.size() * sizeof(PageGather));
  auto* writes = reinterpret_cast<DeviceWrite*>(host + gather_bytes);
  for (size_t i = 0; i < pages.size(); ++i) {
    const PendingPage& p = pages[i];
    writes[i] = DeviceWrite{const_cast<int32_t*>(p.layer->heads[p.head].page_table) + p.head_page,
                            p.pool_id, 0};
  }
  if (!extra.empty()) {
    std::memcpy(writes + pages.size(), extra.data(), extra.size() * sizeof(DeviceWrite));
  }

  SQKV_RETURN_IF_ERROR(
      CudaStatus(cudaEventRecord(static_cast<cudaEvent_t>(upload_start_), s), "cudaEventRecord"));
  // Copies: one per run of pages adjacent in host memory and in the pool.
  auto* pool = static_cast<uint8_t*>(pool_);
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  size_t k = 0;
  while (k < copies.size()) {
    const PendingPage& first = pages[copies[k]];
    size_t run = 1;
    while (k + run < copies.size()) {
      const PendingPage& next = pages[copies[k + run]];
      if (next.pool_id != first.pool_id + static_cast<int32_t>(run) ||
          static_cast<const uint8_t*>(next.src) !=
              static_cast<const uint8_t*>(first.src) + run * page_bytes) {
        break;
      }
      ++run;
    }
    dsts.push_back(pool + static_cast<size_t>(first.pool_id) * page_bytes);
    srcs.push_back(first.src);
    sizes.push_back(run * page_bytes);
    k += run;
  }
  if (options_.upload == EngineOptions::Upload::kBatchCopy && !dsts.empty()) {
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t attr_index = 0;
    SQKV_RETURN_IF_ERROR(CudaStatus(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(),
                                                         dsts.size(), &attr, &attr_index, 1, s),
                                    "upload pages (batch)"));
  } else {
    for (size_t i = 0; i < dsts.size(); ++i) {
      SQKV_RETURN_IF_ERROR(CudaStatus(
          cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, s), "upload pages"));
    }
  }
  SQKV_RETURN_IF_ERROR(LaunchPageGather(reinterpret_cast<const PageGather*>(dev),
                                        static_cast<int>(gathers.size()), page_bytes, pool_,
                                        reinterpret_cast<const DeviceWrite*>(dev + gather_bytes),
                                        static_cast<int>(n_writes), stream()));
  SQKV_RETURN_IF_ERROR(
      CudaStatus(cudaEventRecord(static_cast<cudaEvent_t>(upload_end_), s), "cudaEventRecord"));
  upload_timed_ = true;
  // Enqueued: the pages are resident for every later call on this stream.
  for (const PendingPage& p : pages) {
    ResidentLayer* l = p.layer;
    l->pool_page[l->head_page_base[p.head] + p.head_page] = p.pool_id;
    ++l->resident_pages;
    l->referenced_at = ResidentLayer::kNever;
  }
  counters_.pages_uploaded += pages.size();
  counters_.bytes_uploaded += pages.size() * page_bytes;
  if (stats != nullptr) {
    stats->pages_uploaded += static_cast<int64_t>(pages.size());
    stats->bytes_uploaded += static_cast<int64_t>(pages.size() * page_bytes);
  }
  return Status::Ok();
}

Status EngineImpl::PageIn(PlanImpl& plan, const std::vector<ResidentLayer*>& layers,
                          const PageSupplier& supply, std::vector<uint8_t>* host,
                          PagingStats* stats) {
  auto s = static_cast<cudaStream_t>(stream());
  // The one round trip: the selection, before the attention.
  const SelectionRange x = PlanSelectionRange(plan);
  SQKV_RETURN_IF_ERROR(readback_.Reserve(x.bytes));
  SQKV_RETURN_IF_ERROR(
      CudaStatus(cudaMemcpyAsync(readback_.host(), x.device, x.bytes, cudaMemcpyDeviceToHost, s),
                 "read selection"));
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(s), "read selection"));
  host->assign(static_cast<const uint8_t*>(readback_.host()),
               static_cast<const uint8_t*>(readback_.host()) + x.bytes);
  if (stats != nullptr) ++stats->round_trips;
  const auto* page_count = reinterpret_cast<const int32_t*>(host->data() + x.page_count);
  const auto* cluster_count = reinterpret_cast<const int32_t*>(host->data() + x.cluster_count);
  const auto* cluster_ids = reinterpret_cast<const int32_t*>(host->data() + x.cluster_ids);

  // Walk every segment's page list as the lookup wrote it (clusters ascending, each cluster's
  // pages in order, capped at the segment's count): hits are marked in use, misses collected.
  ++epoch_;
  const size_t pb = layers[0]->page_bytes;
  std::map<uint64_t, int32_t> missing;                // page key -> pool id (once allocated)
  std::vector<std::pair<int32_t, uint64_t>> patches;  // (position in page_ids, page key)
  int64_t selected = 0, hits = 0;
  size_t seg = 0;
  for (ResidentLayer* l : layers) {
    for (size_t h = 0; h < l->heads.size(); ++h, ++seg) {
      const LookupSegment& sg = plan.segments[seg];
      const std::vector<int32_t>& begin = l->heads[h].page_begin;
      const int32_t count = page_count[seg];
      int32_t pos = 0;
      for (int32_t c = 0; c < cluster_count[seg] && pos < count; ++c) {
        const int32_t cl = cluster_ids[sg.cluster_offset + c];
        for (int32_t p = begin[cl]; p < begin[cl + 1] && pos < count; ++p, ++pos) {
          const int32_t id = l->pool_page[l->head_page_base[h] + p];
          if (id >= 0) {
            pages_.Touch(pb, id, epoch_);
            ++hits;
          } else {
            const uint64_t key = PageKey(*l, static_cast<int>(h), p);
            missing.emplace(key, -1);
            patches.emplace_back(sg.page_offset + pos, key);
          }
        }
      }
      selected += count;
    }
  }
  counters_.hits += static_cast<uint64_t>(hits);
  counters_.misses += static_cast<uint64_t>(missing.size());
  if (stats != nullptr) {
    stats->pages_selected += selected;
    stats->pages_from_device += hits;
  }
  if (missing.empty()) return Status::Ok();

  // Misses in (layer, head, page) order: one supplier call per (layer, head).
  std::vector<PendingPage> pending;
  pending.reserve(missing.size());
  for (const auto& [key, unused] : missing) {
    ResidentLayer* l = by_id_[key >> 32];
    const int32_t g = static_cast<int32_t>(key & 0xffffffffu);
    const auto it = std::upper_bound(l->head_page_base.begin(), l->head_page_base.end(), g);
    const int h = static_cast<int>(it - l->head_page_base.begin()) - 1;
    PendingPage p;
    p.layer = l;
    p.head = h;
    p.head_page = g - l->head_page_base[h];
    pending.push_back(p);
  }
  SQKV_RETURN_IF_ERROR(AllocatePages(pb, /*evict=*/true, &pending, stats));
  Status st = Supply(supply, &pending, stats);
  std::vector<DeviceWrite> extra;
  if (st.ok()) {
    size_t i = 0;
    for (auto& [key, id] : missing) id = pending[i++].pool_id;
    extra.reserve(patches.size());
    for (const auto& [position, key] : patches) {
      extra.push_back(DeviceWrite{plan.lookup.page_ids + position, missing[key], 0});
    }
    st = Upload(pb, pending, extra, stats);
  }
  if (!st.ok()) ReleasePages(pb, pending);
  return st;
}

Status EngineImpl::PreloadLayer(uint64_t layer_key, const PageSupplier& supply,
                                PagingStats* stats) {
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options_.device), "cudaSetDevice"));
  PagingStats local;
  PagingStats* ps = stats != nullptr ? stats : &local;
  *ps = PagingStats();
  auto it = layers_.find(layer_key);
  if (it == layers_.end()) return Status::NotFound(Key(layer_key) + " is not resident");
  ResidentLayer* l = it->second.get();
  // The layer's own pages are in use for the whole call: a preload never evicts itself.
  ++epoch_;
  for (int32_t id : l->pool_page) {
    if (id >= 0) pages_.Touch(l->page_bytes, id, epoch_);
  }
  // One head at a time: the supplier holds at most one head's pages for us.
  for (size_t h = 0; h < l->heads.size(); ++h) {
    std::vector<PendingPage> pending;
    for (int32_t p = 0; p < l->heads[h].num_pages; ++p) {
      if (l->pool_page[l->head_page_base[h] + p] >= 0) continue;
      PendingPage x;
      x.layer = l;
      x.head = static_cast<int>(h);
      x.head_page = p;
      pending.push_back(x);
    }
    if (pending.empty()) continue;
    SQKV_RETURN_IF_ERROR(AllocatePages(l->page_bytes, /*evict=*/true, &pending, ps)
                             .WithContext("preload " + Key(layer_key)));
    Status st = Supply(supply, &pending, ps);
    if (st.ok()) st = Upload(l->page_bytes, pending, {}, ps);
    if (!st.ok()) {
      ReleasePages(l->page_bytes, pending);  // not published: Upload publishes last
      return st.WithContext("preload " + Key(layer_key));
    }
    SQKV_RETURN_IF_ERROR(
        CudaStatus(cudaStreamSynchronize(static_cast<cudaStream_t>(stream())), "preload"));
    float ms = 0.f;
    if (cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(upload_start_),
                             static_cast<cudaEvent_t>(upload_end_)) == cudaSuccess) {
      ps->upload_us += 1e3 * ms;
    }
    upload_timed_ = false;
  }
  return Status::Ok();
}

}  // namespace sqkv::gpu
