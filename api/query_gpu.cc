// The GPU query path: the layer is made resident in the device pool on first use (its pages come
// through the host tier), then lookup and attention run on the device.
#include <algorithm>
#include <cstring>

#include "api/store_impl.h"
#include "gpu/engine.h"

namespace sqkv {

// Caller holds engine_mu_.
Result<gpu::Engine*> StoreImpl::GetEngine() {
  if (!engine_) {
    std::unique_ptr<gpu::Engine> engine;
    SQKV_RETURN_IF_ERROR(gpu::Engine::Create(gpu::EngineOptions(), &engine));
    engine_ = std::move(engine);
  }
  return engine_.get();
}

// Caller holds engine_mu_. Loads every page of the layer into the device pool, evicting the least
// recently used unpinned layers when the pool is full. stats may be null.
Status StoreImpl::LoadLayerToDevice(const ContextRecord& r, int layer_id, const LayerData& layer,
                                    const SegmentReader& segment, QueryStats* stats) {
  SQKV_ASSIGN_OR_RETURN(gpu::Engine * engine, GetEngine());
  const uint64_t key = (r.version << 16) | static_cast<uint64_t>(layer_id);
  if (engine->HasLayer(key)) {
    gpu_lru_.remove(key);
    gpu_lru_.push_front(key);
    return Status::Ok();
  }
  const uint64_t first = layer.head_first_page[0];
  const uint64_t count = layer.head_first_page.back() - first;
  std::vector<uint64_t> pages(count);
  for (uint64_t i = 0; i < count; ++i) pages[i] = first + i;
  HostPages hp;
  SQKV_RETURN_IF_ERROR(AcquireHostPages(r, layer, segment, pages, &hp));
  // The engine takes the layer's pages as one head-major buffer.
  const size_t page_bytes = segment.header().page_bytes;
  std::vector<uint8_t> staged(count * page_bytes);
  for (uint64_t i = 0; i < count; ++i) std::memcpy(staged.data() + i * page_bytes, hp.data[i], page_bytes);
  host_cache_->Release(&hp.handles);
  if (stats != nullptr) {
    stats->pages_from_disk += hp.from_disk;
    stats->pages_from_host += hp.from_host;
    stats->disk_bytes_read += hp.from_disk * static_cast<int64_t>(page_bytes);
  }
  Status loaded = engine->LoadLayer(key, r.dtype, r.page_tokens, layer.heads, staged.data());
  // Pool full: evict the least recently used unpinned layers until this one fits.
  auto victim = gpu_lru_.rbegin();
  while (loaded.IsUnavailable()) {
    while (victim != gpu_lru_.rend() && gpu_pinned_versions_.count(*victim >> 16)) ++victim;
    if (victim == gpu_lru_.rend()) break;
    engine->EvictLayer(*victim);
    ++device_layers_evicted_;
    victim = std::make_reverse_iterator(gpu_lru_.erase(std::next(victim).base()));
    loaded = engine->LoadLayer(key, r.dtype, r.page_tokens, layer.heads, staged.data());
  }
  SQKV_RETURN_IF_ERROR(loaded);
  ++device_layers_loaded_;
  gpu_lru_.push_front(key);
  return Status::Ok();
}

Status StoreImpl::QueryGpu(const ContextRecord& r, int layer_id, const LayerData& layer,
                           const SegmentReader& segment, const float* q, int q_heads, int n,
                           const QueryOptions& options, QueryResult* result) {
  // The engine is not thread-safe: one query at a time uses it.
  std::lock_guard<std::mutex> lock(engine_mu_);
  SQKV_ASSIGN_OR_RETURN(gpu::Engine * engine, GetEngine());
  const uint64_t key = (r.version << 16) | static_cast<uint64_t>(layer_id);
  const bool resident = engine->HasLayer(key);
  SQKV_RETURN_IF_ERROR(LoadLayerToDevice(r, layer_id, layer, segment, &result->stats));
  std::vector<HeadSelection> selection;
  gpu::QueryRequest req;
  req.layer_key = key;
  req.q = q;
  req.q_heads = q_heads;
  req.n = n;
  req.select = options.select;
  req.out = result->output.data();
  req.lse = result->lse.data();
  req.selection = &selection;
  SQKV_RETURN_IF_ERROR(engine->Query({req}));
  for (const HeadSelection& hs : selection) {
    result->stats.tokens_selected += hs.tokens;
    result->stats.pages_selected += hs.pages;
    result->stats.centroids_scored += hs.centroids_scored;
  }
  if (resident) result->stats.pages_from_device = result->stats.pages_selected;
  if (options.want_selection) {
    result->selected_tokens.resize(r.kv_heads);
    for (int h = 0; h < r.kv_heads && h < static_cast<int>(selection.size()); ++h) {
      auto& out = result->selected_tokens[h];
      const HeadIndex& index = layer.heads[h];
      for (int32_t c : selection[h].clusters) {
        const size_t b = static_cast<size_t>(index.cluster_page_begin[c]) * index.page_tokens;
        for (int32_t i = 0; i < index.cluster_size[c]; ++i) out.push_back(index.positions[b + i]);
      }
      std::sort(out.begin(), out.end());
    }
  }
  result->stats.device = "gpu";
  return Status::Ok();
}

}  // namespace sqkv
