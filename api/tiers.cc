// The host and device tiers as the Store uses them: pages through the host page cache, pins,
// preloading and counters.
#include <chrono>
#include <cmath>

#include "api/store_impl.h"
#include "gpu/device.h"
#include "gpu/engine.h"

namespace sqkv {
namespace {

constexpr uint64_t kPreloadChunkPages = 4096;  // pages pinned at once while preloading

}  // namespace

const char* TierName(Tier t) { return t == Tier::kHost ? "host" : "device"; }

bool ParseTier(std::string_view s, Tier* out) {
  if (s == "host")
    *out = Tier::kHost;
  else if (s == "device")
    *out = Tier::kDevice;
  else
    return false;
  return true;
}

void StoreImpl::RecordDiskRead(uint64_t bytes, uint64_t direct_bytes, uint64_t micros) {
  disk_reads_.fetch_add(1, std::memory_order_relaxed);
  disk_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  disk_direct_bytes_.fetch_add(direct_bytes, std::memory_order_relaxed);
  int bucket = micros == 0 ? 0 : static_cast<int>(std::log2(static_cast<double>(micros)));
  if (bucket >= kLatencyBuckets) bucket = kLatencyBuckets - 1;
  disk_latency_[bucket].fetch_add(1, std::memory_order_relaxed);
}

Status StoreImpl::AcquireHostPages(const ContextRecord& r, const LayerData& layer,
                                   const SegmentReader& segment, const std::vector<uint64_t>& pages,
                                   HostPages* out) {
  const size_t page_bytes = segment.header().page_bytes;
  const uint64_t layer_first = layer.head_first_page[0];
  auto expected = [&layer, layer_first](uint64_t page) {
    return layer.checksums[page - layer_first];
  };
  auto loader = [&](const std::vector<MissingRun>& runs) {
    std::vector<SegmentReader::Run> rr;
    rr.reserve(runs.size());
    for (const MissingRun& m : runs) rr.push_back({m.first_page, m.slots});
    const auto t0 = std::chrono::steady_clock::now();
    uint64_t bytes = 0, direct = 0;
    Status s = segment.ReadRuns(rr, expected, &bytes, &direct);
    RecordDiskRead(
        bytes, direct,
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0)
            .count());
    return s.WithContext("context " + r.name);
  };
  AcquireStats st;
  Status s = host_cache_->Acquire(r.version, pages, page_bytes, loader, &out->handles, &st);
  if (s.ok()) {
    out->data.resize(pages.size());
    for (size_t i = 0; i < pages.size(); ++i) out->data[i] = out->handles[i].data();
    out->from_disk = static_cast<int64_t>(st.misses);
    out->from_host = static_cast<int64_t>(pages.size() - st.misses);
    return Status::Ok();
  }
  if (!s.IsUnavailable()) return s;
  // The cache cannot hold this query's pages next to what is pinned: read them privately.
  out->private_copy.resize(pages.size() * page_bytes);
  std::vector<SegmentReader::Run> runs;
  for (size_t i = 0; i < pages.size(); ++i) {
    void* dst = out->private_copy.data() + i * page_bytes;
    if (!runs.empty() && runs.back().first_page + runs.back().dst.size() == pages[i]) {
      runs.back().dst.push_back(dst);
    } else {
      runs.push_back({pages[i], {dst}});
    }
  }
  uint64_t bytes = 0;
  SQKV_RETURN_IF_ERROR(
      segment.ReadRuns(runs, expected, &bytes, nullptr).WithContext("context " + r.name));
  RecordDiskRead(bytes, 0, 0);
  out->data.resize(pages.size());
  for (size_t i = 0; i < pages.size(); ++i)
    out->data[i] = out->private_copy.data() + i * page_bytes;
  out->from_disk = static_cast<int64_t>(pages.size());
  return Status::Ok();
}

Status StoreImpl::Preload(const std::string& name, Tier tier) {
  SQKV_RETURN_IF_ERROR(ValidateContextName(name));
  ContextRecord r;
  SQKV_RETURN_IF_ERROR(catalog_->GetContext(name, &r));
  if (!PinVersion(r.version)) return Status::Unavailable("context " + name + " is being replaced");
  VersionPin pin(this, r.version);
  SQKV_ASSIGN_OR_RETURN(auto segment, GetSegment(r));
  for (int l = 0; l < r.layers; ++l) {
    SQKV_ASSIGN_OR_RETURN(auto layer, GetLayer(r, l));
    if (tier == Tier::kDevice) {
      std::lock_guard<std::mutex> lock(engine_mu_);
      SQKV_RETURN_IF_ERROR(LoadLayerToDevice(r, l, *layer, *segment,
                                             /*pin=*/gpu_pinned_versions_.count(r.version) > 0));
      continue;
    }
    const uint64_t first = layer->head_first_page[0], end = layer->head_first_page.back();
    for (uint64_t p = first; p < end; p += kPreloadChunkPages) {
      std::vector<uint64_t> pages;
      for (uint64_t q = p; q < std::min(end, p + kPreloadChunkPages); ++q) pages.push_back(q);
      HostPages hp;
      SQKV_RETURN_IF_ERROR(AcquireHostPages(r, *layer, *segment, pages, &hp));
      if (!hp.private_copy.empty()) {
        return Status::Unavailable("context " + name + " does not fit in the host cache (" +
                                   std::to_string(r.segment_bytes) + " bytes, capacity " +
                                   std::to_string(options_.host_cache_bytes) + ")");
      }
      host_cache_->Release(&hp.handles);
    }
  }
  return Status::Ok();
}

Status StoreImpl::Pin(const std::string& name, Tier tier) {
  SQKV_RETURN_IF_ERROR(ValidateContextName(name));
  ContextRecord r;
  SQKV_RETURN_IF_ERROR(catalog_->GetContext(name, &r));
  if (tier == Tier::kDevice && !gpu::DevicePresent()) {
    return Status::Unavailable("--tier device: no CUDA device");
  }
  if (tier == Tier::kDevice && !GpuRunsShape(r)) {
    return Status::InvalidArgument("--tier device: " + GpuShapeError(r));
  }
  if (tier == Tier::kHost) {
    SQKV_RETURN_IF_ERROR(host_cache_->PinVersion(r.version));
  } else {
    std::lock_guard<std::mutex> lock(engine_mu_);
    gpu_pinned_versions_.insert(r.version);
  }
  Status s = Preload(name, tier);
  if (s.ok()) s = catalog_->PutPin(name, TierName(tier));
  if (!s.ok()) {
    if (tier == Tier::kHost) {
      host_cache_->UnpinVersion(r.version);
    } else {
      std::lock_guard<std::mutex> lock(engine_mu_);
      UnpinDeviceLocked(r);
    }
  }
  return s;
}

// Caller holds engine_mu_.
void StoreImpl::UnpinDeviceLocked(const ContextRecord& r) {
  gpu_pinned_versions_.erase(r.version);
  if (!engine_) return;
  for (int l = 0; l < r.layers; ++l) {
    const uint64_t key = DeviceKey(r.version, l);
    if (engine_->HasLayer(key)) engine_->UnpinLayer(key).PermitUncheckedError();
  }
}

Status StoreImpl::Unpin(const std::string& name) {
  SQKV_RETURN_IF_ERROR(ValidateContextName(name));
  ContextRecord r;
  SQKV_RETURN_IF_ERROR(catalog_->GetContext(name, &r));
  host_cache_->UnpinVersion(r.version);
  {
    std::lock_guard<std::mutex> lock(engine_mu_);
    UnpinDeviceLocked(r);
  }
  return catalog_->DeletePin(name);
}

Status StoreImpl::ListPins(std::vector<std::pair<std::string, Tier>>* out) {
  std::vector<std::pair<std::string, std::string>> raw;
  SQKV_RETURN_IF_ERROR(catalog_->ListPins(&raw));
  out->clear();
  for (const auto& [name, tier] : raw) {
    Tier t;
    if (!ParseTier(tier, &t)) return Status::Corruption("pin of " + name + ": tier '" + tier + "'");
    out->emplace_back(name, t);
  }
  return Status::Ok();
}

// Pins are restored lazily: the flag now, the pages on first use (or `sqkv preload`), so opening
// a store with many pinned contexts stays fast. A damaged pin (an unknown tier, or a record that
// does not decode) is skipped, not restored: failing the open would keep `sqkv verify`, which
// reports it, and `sqkv unpin` or `rm`, which repair it, from running at all.
Status StoreImpl::RestorePins() {
  std::vector<std::pair<std::string, std::string>> pins;
  SQKV_RETURN_IF_ERROR(catalog_->ListPins(&pins));
  for (const auto& [name, tier_name] : pins) {
    Tier tier;
    if (!ParseTier(tier_name, &tier)) continue;
    ContextRecord r;
    Status s = catalog_->GetContext(name, &r);
    if (s.IsNotFound() || s.IsCorruption()) continue;  // removed by an older build, or damaged
    SQKV_RETURN_IF_ERROR(s);
    if (tier == Tier::kHost) {
      SQKV_RETURN_IF_ERROR(host_cache_->PinVersion(r.version));
    } else {
      std::lock_guard<std::mutex> lock(engine_mu_);
      gpu_pinned_versions_.insert(r.version);
    }
  }
  return Status::Ok();
}

Status StoreImpl::GetTierStats(TierStats* out) {
  *out = TierStats();
  const PageCacheCounters c = host_cache_->Snapshot();
  out->host_hits = c.hits + c.joined;
  out->host_misses = c.misses;
  out->host_evictions = c.evictions;
  out->host_bytes_in_use = c.bytes_in_use;
  out->host_pinned_bytes = c.pinned_bytes;
  out->host_capacity_bytes = c.capacity_bytes;
  out->disk_reads = disk_reads_.load();
  out->disk_bytes = disk_bytes_.load();
  out->disk_direct_bytes = disk_direct_bytes_.load();
  out->disk_read_us_log2.resize(kLatencyBuckets);
  for (int i = 0; i < kLatencyBuckets; ++i) out->disk_read_us_log2[i] = disk_latency_[i].load();
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    out->index_layers_cached = layers_.size();
    out->index_bytes_cached = layer_bytes_;
    out->index_capacity_bytes = options_.index_cache_bytes;
    out->index_layers_decoded = layers_decoded_;
    out->index_layers_evicted = layers_evicted_;
  }
  std::lock_guard<std::mutex> lock(engine_mu_);
  out->device_layers_resident = gpu_lru_.size();
  out->device_layers_loaded = device_layers_loaded_.load();
  out->device_layers_evicted = device_layers_evicted_.load();
  if (engine_) {
    const gpu::EngineCounters c = engine_->counters();
    out->device_layers_pinned = c.pinned_layers;
    out->device_pool_bytes_used = c.pool_used_bytes;
    out->device_pool_bytes = c.pool_bytes;
    out->device_hits = c.hits;
    out->device_misses = c.misses;
    out->device_pages_uploaded = c.pages_uploaded;
    out->device_bytes_uploaded = c.bytes_uploaded;
    out->device_pages_evicted = c.pages_evicted;
  }
  return Status::Ok();
}

}  // namespace sqkv
