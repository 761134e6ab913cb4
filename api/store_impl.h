// Private: the Store implementation shared by store.cc, import.cc and query.cc.
#pragma once

#include <array>
#include <atomic>
#include <deque>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "api/store.h"
#include "gpu/engine.h"
#include "index/head_index.h"
#include "storage/catalog.h"
#include "storage/page_cache.h"
#include "storage/segment.h"

namespace sqkv {

namespace gpu {
class Engine;
}

// One layer of one context version, decoded and ready to query.
struct LayerData {
  std::vector<HeadIndex> heads;           // (kv_heads)
  std::vector<uint64_t> checksums;        // (pages of the layer), head-major
  std::vector<uint64_t> head_first_page;  // (kv_heads + 1) segment page of each head's page 0
  size_t bytes = 0;                       // heap bytes of the above (the index cache's charge)
};

// What a new version of a context is built from (import or rebuild).
struct VersionSpec {
  std::string name;
  int layers = 0, kv_heads = 0, tokens = 0, head_dim = 0;
  DType dtype = DType::kBF16;
  std::string source;
  std::vector<WindowQueries> window_queries;  // (layers) or empty
  std::vector<float> sparsities;              // calibrated with window_queries; empty: defaults
  uint64_t replaces_version = 0;              // a rebuild's source version (ContextPublication)
};

// One layer's keys and values in original token order: k, v (kv_heads, tokens, head_dim) in the
// context's dtype, owned by the caller of the layer source (or by k_own/v_own).
struct LayerBytes {
  const uint8_t* k = nullptr;
  const uint8_t* v = nullptr;
  std::string k_name, v_name;  // for error messages
  std::vector<uint8_t> k_own, v_own;
};

Status ValidateBuildOptions(const ImportOptions& options);

// Layers of one context at most: the device tier keys a layer by (version << 16 | layer).
inline constexpr size_t kMaxContextLayers = 65535;

class StoreImpl : public Store {
 public:
  StoreImpl(const StoreOptions& options, std::unique_ptr<Catalog> catalog,
            std::unique_ptr<PageCache> host_cache);
  ~StoreImpl() override;

  Status Import(const std::string& name, const std::string& safetensors_path,
                const ImportOptions& options, ContextInfo* info) override;
  Status Query(const std::string& name, int layer, const float* q, int q_heads, int n, int head_dim,
               const QueryOptions& options, QueryResult* result) override;
  Status List(std::vector<ContextInfo>* out) override;
  Status Info(const std::string& name, ContextInfo* out) override;
  Status Remove(const std::string& name) override;
  Status Rebuild(const std::string& name, const ImportOptions& options, ContextInfo* info) override;
  Status Calibrate(const std::string& name, const std::vector<WindowQueries>* queries,
                   const std::vector<float>& sparsities) override;
  Status GetThresholds(const std::string& name, int layer, Thresholds* out) override;
  Status Verify(const std::string& name, const ProgressFn& progress, VerifyReport* report) override;
  Status Compact(CompactReport* report) override;
  Status Stats(StoreStats* out) override;
  Status Pin(const std::string& name, Tier tier) override;
  Status Unpin(const std::string& name) override;
  Status Preload(const std::string& name, Tier tier) override;
  Status ListPins(std::vector<std::pair<std::string, Tier>>* out) override;
  Status GetTierStats(TierStats* out) override;
  // Restores the pins recorded in the catalog (called by Open).
  Status RestorePins();

  // Reclaims garbage versions that no query pins: segment file, catalog keys, caches.
  // report may be null.
  Status ReclaimGarbage(CompactReport* report);
  // Removes temporary files and segment files that no record or garbage mark references.
  // `opening`: called by Open before any build can start, so nothing races it.
  Status RemoveOrphans(CompactReport* report, bool opening = false);

  // A query pins the version it reads so that reclaiming waits for it. False when the version
  // was already reclaimed (the caller re-reads the context record).
  bool PinVersion(uint64_t version);
  void UnpinVersion(uint64_t version);

  std::string SegmentPath(const ContextRecord& r) const;
  std::string segments_dir() const { return data_dir() + "/segments"; }

  Result<std::shared_ptr<const LayerData>> GetLayer(const ContextRecord& r, int layer);
  // The record's open segment; Corruption when its header disagrees with the record (a page
  // size or dtype the record does not have would decode the pages wrongly, and silently).
  Result<std::shared_ptr<SegmentReader>> GetSegment(const ContextRecord& r);

 private:
  Status QueryCpu(const ContextRecord& r, const LayerData& layer, const SegmentReader& segment,
                  const float* q, int q_heads, int n, const QueryOptions& options,
                  QueryResult* result);
  Status QueryGpu(const ContextRecord& r, int layer_id, const LayerData& layer,
                  const SegmentReader& segment, const float* q, int q_heads, int n,
                  const QueryOptions& options, QueryResult* result);
  Result<gpu::Engine*> GetEngine();
  Status RebuildPinned(const ContextRecord& old, const ImportOptions& options, ContextInfo* info);
  // Pins `pages` (global page numbers of one layer) of a version in the host cache, reading the
  // missing ones from the segment in one batched read. Falls back to a private buffer when the
  // cache cannot hold them (Unavailable), so a query larger than the cache still runs.
  struct HostPages {
    std::vector<PageHandle> handles;    // from the cache, or
    std::vector<uint8_t> private_copy;  // (pages, page_bytes) when the cache was bypassed
    std::vector<const void*> data;      // (pages)
    int64_t from_disk = 0, from_host = 0;
  };
  Status AcquireHostPages(const ContextRecord& r, const LayerData& layer,
                          const SegmentReader& segment, const std::vector<uint64_t>& pages,
                          HostPages* out);
  // Device tier (caller holds engine_mu_).
  // kMaxContextLayers keeps the layer in the key's low 16 bits.
  static uint64_t DeviceKey(uint64_t version, int layer) {
    return (version << 16) | static_cast<uint64_t>(layer);
  }
  Status EnsureDeviceIndex(const ContextRecord& r, int layer_id, const LayerData& layer);
  Status LoadLayerToDevice(const ContextRecord& r, int layer_id, const LayerData& layer,
                           const SegmentReader& segment, bool pin);
  gpu::PageSupplier HostSupplier(const ContextRecord& r, const LayerData& layer,
                                 const SegmentReader& segment, std::deque<HostPages>* held,
                                 QueryStats* stats);
  void ReleaseHeld(std::deque<HostPages>* held);
  // Lets the version's layers be evicted from the device again.
  void UnpinDeviceLocked(const ContextRecord& r);
  void RecordDiskRead(uint64_t bytes, uint64_t direct_bytes, uint64_t micros);
  // Indexes every layer from `layer_source`, writes a segment and publishes the version
  // (replacing the record of spec.name when `replace`).
  Status BuildVersion(const VersionSpec& spec, const ImportOptions& options,
                      const std::function<Status(int, LayerBytes*)>& layer_source, bool replace,
                      ContextInfo* info);

  StoreOptions options_;
  std::unique_ptr<Catalog> catalog_;
  std::unique_ptr<PageCache> host_cache_;

  // Disk counters (TierStats).
  static constexpr int kLatencyBuckets = 32;
  std::atomic<uint64_t> disk_reads_{0}, disk_bytes_{0}, disk_direct_bytes_{0};
  std::array<std::atomic<uint64_t>, kLatencyBuckets> disk_latency_{};
  std::atomic<uint64_t> device_layers_loaded_{0}, device_layers_evicted_{0};

  std::mutex cache_mu_;
  using LayerKey = std::pair<uint64_t, int>;  // (version, layer)
  std::list<LayerKey> layer_lru_;             // front = most recent
  std::map<LayerKey, std::pair<std::shared_ptr<const LayerData>, std::list<LayerKey>::iterator>>
      layers_;
  size_t layer_bytes_ = 0;  // sum of LayerData::bytes over layers_
  uint64_t layers_decoded_ = 0, layers_evicted_ = 0;
  std::unordered_map<uint64_t, std::shared_ptr<SegmentReader>> segments_;
  std::map<uint64_t, int> pins_;  // version → queries using it
  std::set<uint64_t> reclaimed_;  // versions whose files are gone

  // Allocating a build's version and entering it in building_ happen together under build_mu_,
  // so a compaction's snapshot (RemoveOrphans) sees every build whose version is below the
  // watermark it allocates itself.
  std::mutex build_mu_;
  std::set<uint64_t> building_;  // versions whose segment an import/rebuild is writing

  std::mutex engine_mu_;
  std::unique_ptr<gpu::Engine> engine_;
  std::list<uint64_t> gpu_lru_;             // resident layer keys, most recently used first
  std::set<uint64_t> gpu_pinned_versions_;  // versions pinned in the device tier
};

// Pins a version for the lifetime of the object (see StoreImpl::PinVersion).
class VersionPin {
 public:
  VersionPin(StoreImpl* store, uint64_t version) : store_(store), version_(version) {}
  ~VersionPin() { store_->UnpinVersion(version_); }
  VersionPin(const VersionPin&) = delete;
  VersionPin& operator=(const VersionPin&) = delete;

 private:
  StoreImpl* store_;
  uint64_t version_;
};

// Whether the GPU backend's kernels run this context's shape (head_dim 64 or 128); --device
// auto answers on the CPU otherwise.
bool GpuRunsShape(const ContextRecord& r);
std::string GpuShapeError(const ContextRecord& r);  // why GpuRunsShape(r) is false

// Corruption unless the segment's header describes the record's pages (version, shape, page
// size, dtype, page count): GetSegment and verify.
Status SegmentMatchesRecord(const SegmentHeader& h, const ContextRecord& r);

// Query input checks shared by every device. q: (q_heads, n, head_dim).

Status ValidateQuery(const ContextRecord& r, int layer, const float* q, int q_heads, int n,
                     int head_dim);

}  // namespace sqkv
