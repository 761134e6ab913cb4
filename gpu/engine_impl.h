// The GPU engine's implementation class (gpu/engine.h): resident layers and the query paths in
// engine.cc, paging (page pool, QueryPaged, preload, pins) in engine_paging.cc. Internal; plain
// C++ (streams as void*).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "gpu/device_buffer.h"
#include "gpu/engine.h"
#include "gpu/engine_plan.h"
#include "gpu/engine_pool.h"
#include "gpu/engine_upload.h"

namespace sqkv::gpu {

// A page to upload: its owner, where it goes, where it comes from.
struct PendingPage {
  ResidentLayer* layer = nullptr;
  int head = 0;
  int32_t head_page = 0;  // page within the head
  int32_t pool_id = -1;
  const void* src = nullptr;
};

class EngineImpl final : public Engine {
 public:
  EngineImpl(const EngineOptions& o, void* pool, size_t slots, Stream stream);
  ~EngineImpl() override;

  Status LoadLayer(uint64_t layer_key, DType dtype, int page_tokens,
                   const std::vector<HeadIndex>& heads, const void* pages) override;
  Status LoadLayerIndex(uint64_t layer_key, DType dtype, int page_tokens,
                        const std::vector<HeadIndex>& heads) override;
  bool HasLayer(uint64_t layer_key) const override { return layers_.count(layer_key) > 0; }
  LayerResidency Residency(uint64_t layer_key) const override;
  void EvictLayer(uint64_t layer_key) override;
  Status PreloadLayer(uint64_t layer_key, const PageSupplier& supply, PagingStats* stats) override;
  Status PinLayer(uint64_t layer_key) override { return SetPinned(layer_key, true); }
  Status UnpinLayer(uint64_t layer_key) override { return SetPinned(layer_key, false); }
  size_t pool_used_bytes() const override { return pages_.slots_used() * options_.slot_bytes; }
  size_t pool_bytes() const override { return pages_.num_slots() * options_.slot_bytes; }
  EngineCounters counters() const override;

  Status Query(const std::vector<QueryRequest>& requests) override;
  Status QueryPaged(const std::vector<QueryRequest>& requests, const PageSupplier& supply,
                    PagingStats* stats) override;
  Status Plan(const std::vector<DeviceQuery>& queries, std::unique_ptr<QueryPlan>* plan) override;
  Status Run(QueryPlan& plan, const DeviceIO& io, void* stream) override;
  Status ReadSelections(const QueryPlan& plan, void* stream,
                        std::vector<std::vector<HeadSelection>>* out) override;

 private:
  using GroupKey = std::tuple<int, int, int>;  // dtype, head_dim, page_tokens

  void* stream() const { return stream_.get(); }
  static bool FullyResident(const ResidentLayer& l) { return l.resident_pages == l.total_pages; }

  // engine.cc
  // Adds a layer: index uploaded, pages from `pages` (null: none) into free pool pages only.
  Status AddLayer(uint64_t layer_key, DType dtype, int page_tokens,
                  const std::vector<HeadIndex>& heads, const void* pages);
  Status BuildPlan(const std::vector<DeviceQuery>& queries, bool need_resident,
                   DeviceBuffer* scratch, PlanImpl* plan);
  // Checks every request and groups them; need_resident: every layer fully resident.
  Status GroupRequests(const std::vector<QueryRequest>& requests, bool need_resident,
                       std::map<GroupKey, std::vector<int>>* groups);
  // One group: plan, q upload, lookup (+ paging when `supply` is set), attention, copies back.
  Status RunGroup(const std::vector<QueryRequest>& requests, const std::vector<int>& members,
                  const PageSupplier* supply, PagingStats* stats);

  // engine_paging.cc
  Status SetPinned(uint64_t layer_key, bool pinned);
  // Between the lookup and the attention of a paged group: reads the selection back (`host`
  // receives PlanSelectionRange), fetches and uploads the missing pages, patches the page lists.
  Status PageIn(PlanImpl& plan, const std::vector<ResidentLayer*>& layers,
                const PageSupplier& supply, std::vector<uint8_t>* host, PagingStats* stats);
  // Allocates pool pages for `pages` (pool_id filled), evicting when allowed; on failure frees
  // what it took and answers Unavailable.
  Status AllocatePages(size_t page_bytes, bool evict, std::vector<PendingPage>* pages,
                       PagingStats* stats);
  void ReleasePages(size_t page_bytes, const std::vector<PendingPage>& pages);
  // Asks `supply` for pages (grouped by layer and head, in order) and fills their src.
  Status Supply(const PageSupplier& supply, std::vector<PendingPage>* pages, PagingStats* stats);
  // Enqueues the copies of `pages` into the pool, their page-table entries and `extra` writes;
  // then publishes them in the layers' host tables.
  Status Upload(size_t page_bytes, const std::vector<PendingPage>& pages,
                const std::vector<DeviceWrite>& extra, PagingStats* stats);
  // A page of a layer left the pool (evicted by PagePool::Allocate).
  void OnEvicted(size_t page_bytes, const std::vector<PoolOwner>& owners);
  // Sets the reference bits of a fully resident layer's pages (Query path).
  void ReferenceLayer(ResidentLayer* layer);

  EngineOptions options_;
  void* pool_ = nullptr;
  PagePool pages_;
  Stream stream_;
  std::unordered_map<uint64_t, std::unique_ptr<ResidentLayer>> layers_;
  std::vector<ResidentLayer*> by_id_;  // PoolOwner::layer -> layer (null: free id)
  std::vector<uint32_t> free_ids_;
  uint64_t next_generation_ = 1;
  uint64_t epoch_ = 0;  // pages in use by the call in progress carry it
  EngineCounters counters_;
  // Reusable buffers (grow only): Query's device buffers, the pinned staging of uploads and the
  // selection readback, timing events.
  DeviceBuffer scratch_, q_dev_, out_dev_, lse_dev_;
  PinnedBuffer staging_, readback_;
  void* upload_start_ = nullptr;  // cudaEvent_t, around the last Upload's enqueued work
  void* upload_end_ = nullptr;
  bool upload_timed_ = false;  // the events hold an Upload not yet added to the stats
};

}  // namespace sqkv::gpu
