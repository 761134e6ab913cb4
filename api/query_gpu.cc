// The GPU query path. A layer becomes resident on the device as its index only; a query's lookup
// runs on the device and only the selected pages that are not resident yet travel, from the host
// page cache (pinned slots, read from disk in one batched direct read when missing) to the
// device pool, which evicts page by page.
#include <algorithm>
#include <deque>

#include "api/store_impl.h"
#include "gpu/engine.h"

namespace sqkv {
namespace {

constexpr size_t kMaxDeviceLayers = 4096;  // device-resident layer indexes (LRU beyond)

}  // namespace

// Caller holds engine_mu_.
Result<gpu::Engine*> StoreImpl::GetEngine() {
  if (!engine_) {
    std::unique_ptr<gpu::Engine> engine;
    SQKV_RETURN_IF_ERROR(gpu::Engine::Create(gpu::EngineOptions(), &engine));
    engine_ = std::move(engine);
  }
  return engine_.get();
}

// Caller holds engine_mu_. Makes the layer's index resident (not its pages).
Status StoreImpl::EnsureDeviceIndex(const ContextRecord& r, int layer_id, const LayerData& layer) {
  SQKV_ASSIGN_OR_RETURN(gpu::Engine * engine, GetEngine());
  const uint64_t key = DeviceKey(r.version, layer_id);
  if (engine->HasLayer(key)) {
    gpu_lru_.remove(key);
    gpu_lru_.push_front(key);
    return Status::Ok();
  }
  // Bound the indexes kept on the device: drop the least recently used unpinned layers.
  for (auto it = gpu_lru_.rbegin(); gpu_lru_.size() >= kMaxDeviceLayers && it != gpu_lru_.rend();) {
    if (gpu_pinned_versions_.count(*it >> 16) || engine->Residency(*it).pinned) {
      ++it;
      continue;
    }
    engine->EvictLayer(*it);
    ++device_layers_evicted_;
    it = std::make_reverse_iterator(gpu_lru_.erase(std::next(it).base()));
  }
  SQKV_RETURN_IF_ERROR(engine->LoadLayerIndex(key, r.dtype, r.page_tokens, layer.heads));
  ++device_layers_loaded_;
  gpu_lru_.push_front(key);
  // A version pinned in the device tier (restored at Open, or carried over by a rebuild) pins
  // each layer as it comes back; its pages then stay once they arrive.
  if (gpu_pinned_versions_.count(r.version)) SQKV_RETURN_IF_ERROR(engine->PinLayer(key));
  return Status::Ok();
}

// A PageSupplier answering from the host tier. The handles stay pinned in `held` until the
// caller releases them, after the engine has copied the pages.
gpu::PageSupplier StoreImpl::HostSupplier(const ContextRecord& r, const LayerData& layer,
                                          const SegmentReader& segment, std::deque<HostPages>* held,
                                          QueryStats* stats) {
  return [this, &r, &layer, &segment, held, stats](uint64_t, int head,
                                                   const std::vector<int32_t>& head_pages,
                                                   std::vector<const void*>* host_pages) {
    std::vector<uint64_t> pages(head_pages.size());
    for (size_t i = 0; i < pages.size(); ++i)
      pages[i] = layer.head_first_page[head] + head_pages[i];
    held->emplace_back();
    HostPages& hp = held->back();
    SQKV_RETURN_IF_ERROR(AcquireHostPages(r, layer, segment, pages, &hp));
    *host_pages = hp.data;
    if (stats != nullptr) {
      stats->pages_from_disk += hp.from_disk;
      stats->pages_from_host += hp.from_host;
      stats->disk_bytes_read += hp.from_disk * static_cast<int64_t>(segment.header().page_bytes);
    }
    return Status::Ok();
  };
}

void StoreImpl::ReleaseHeld(std::deque<HostPages>* held) {
  for (HostPages& hp : *held) host_cache_->Release(&hp.handles);
  held->clear();
}

// Caller holds engine_mu_. Index plus every page resident (preload / pin).
Status StoreImpl::LoadLayerToDevice(const ContextRecord& r, int layer_id, const LayerData& layer,
                                    const SegmentReader& segment, bool pin) {
  SQKV_RETURN_IF_ERROR(EnsureDeviceIndex(r, layer_id, layer));
  gpu::Engine* engine = engine_.get();
  const uint64_t key = DeviceKey(r.version, layer_id);
  if (pin) SQKV_RETURN_IF_ERROR(engine->PinLayer(key));
  std::deque<HostPages> held;
  gpu::PagingStats ps;
  Status s = engine->PreloadLayer(key, HostSupplier(r, layer, segment, &held, nullptr), &ps);
  ReleaseHeld(&held);
  if (!s.ok() && pin) engine->UnpinLayer(key).PermitUncheckedError();
  return s;
}

Status StoreImpl::QueryGpu(const ContextRecord& r, int layer_id, const LayerData& layer,
                           const SegmentReader& segment, const float* q, int q_heads, int n,
                           const QueryOptions& options, QueryResult* result) {
  std::vector<HeadSelection> selection;
  {
    // The engine is not thread-safe: one query at a time uses it.
    std::lock_guard<std::mutex> lock(engine_mu_);
    if (Status s = EnsureDeviceIndex(r, layer_id, layer); !s.ok()) {
      if (!s.IsUnavailable()) return s;
      // No device memory for the index: answer on the CPU.
      result->stats = QueryStats();
      SQKV_RETURN_IF_ERROR(QueryCpu(r, layer, segment, q, q_heads, n, options, result));
      result->stats.device = "cpu (device memory full)";
      return Status::Ok();
    }
    gpu::QueryRequest req;
    req.layer_key = DeviceKey(r.version, layer_id);
    req.q = q;
    req.q_heads = q_heads;
    req.n = n;
    req.select = options.select;
    req.out = result->output.data();
    req.lse = result->lse.data();
    req.selection = &selection;
    std::deque<HostPages> held;
    gpu::PagingStats ps;
    Status s =
        engine_->QueryPaged({req}, HostSupplier(r, layer, segment, &held, &result->stats), &ps);
    ReleaseHeld(&held);
    if (s.IsUnavailable()) {
      // The device pool cannot hold this query's pages next to the pinned ones: answer on the CPU.
      result->stats = QueryStats();
      SQKV_RETURN_IF_ERROR(QueryCpu(r, layer, segment, q, q_heads, n, options, result));
      result->stats.device = "cpu (device pool full)";
      return Status::Ok();
    }
    SQKV_RETURN_IF_ERROR(s);
    result->stats.pages_from_device = static_cast<int64_t>(ps.pages_from_device);
  }
  for (const HeadSelection& hs : selection) {
    result->stats.tokens_selected += hs.tokens;
    result->stats.pages_selected += hs.pages;
    result->stats.centroids_scored += hs.centroids_scored;
  }
  if (options.want_selection) {
    result->selected_tokens.resize(r.kv_heads);
    for (int h = 0; h < r.kv_heads && h < static_cast<int>(selection.size()); ++h) {
      result->selected_tokens[h] = SortedPositions(layer.heads[h], selection[h].clusters);
    }
  }
  result->stats.device = "gpu";
  return Status::Ok();
}

}  // namespace sqkv
