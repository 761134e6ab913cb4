// The embedded SqueezeKV store: the C++ API that the CLI and the server call.
//
//   std::unique_ptr<Store> store;
//   SQKV_RETURN_IF_ERROR(Store::Open(StoreOptions{.data_dir = "./sqkv-data"}, &store));
//   SQKV_RETURN_IF_ERROR(store->Import("doc", "doc.safetensors", ImportOptions(), nullptr));
//   QueryResult r;
//   SQKV_RETURN_IF_ERROR(store->Query("doc", /*layer=*/0, q, q_heads, n, head_dim, {}, &r));
//
// A Store is safe to use from several threads at once. One process owns a data directory at a
// time (the catalog is locked); other processes go through a server.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "index/select.h"
#include "storage/catalog.h"

namespace sqkv {

enum class Device : uint8_t {
  kAuto,  // the GPU when one is present, else the CPU
  kCpu,
  kGpu,   // Unavailable on a machine (or build) without a CUDA device
};
const char* DeviceName(Device d);
bool ParseDevice(std::string_view s, Device* out);

struct StoreOptions {
  // Directory holding the catalog and the segment files; created when missing.
  // Default: "./sqkv-data".
  std::string data_dir = "./sqkv-data";
  // When false, Open fails with NotFound instead of creating a store where none is (commands
  // that only read, so a mistyped directory is an error). Default: true.
  bool create_if_missing = true;
  // Decoded layer indexes kept in memory (centroids, sizes, token positions and page checksums of
  // one layer of one context version), bounded both in layers and in bytes; the least recently
  // used go first, and the layer a query is using always stays. Defaults: 256 layers, 1 GiB (a
  // 128K-token layer of 8 kv heads at 5% centroids, head_dim 128, is about 31 MB).
  size_t index_cache_layers = 256;
  size_t index_cache_bytes = 1ull << 30;
  // Bytes of the host page cache between the segment files and the queries (pinned memory when
  // a GPU is present). Default: 1 GiB.
  size_t host_cache_bytes = 1ull << 30;
  // Segment files kept open (three descriptors each). Default: 256.
  size_t open_segments = 256;
  // Threads OpenBLAS may use, set for the whole process at Open when the BLAS is OpenBLAS (0:
  // leave the process's setting alone). The store already runs its CPU work on OpenMP threads
  // (kv heads of a query, K-means); BLAS threads on top oversubscribe the cores. Measured on a
  // 2-core VM: 512-query CPU queries 1.5x and imports 1.3x faster with 1 than with 2. Default: 1.
  int blas_threads = 1;
};

// Where `sqkv pin` keeps a context resident.
enum class Tier : uint8_t { kHost, kDevice };
const char* TierName(Tier t);
bool ParseTier(std::string_view s, Tier* out);

struct ImportOptions {
  // Level-2 centroids per kv head, as a fraction of the tokens. Default: 0.05.
  float centroid_fraction = 0.05f;
  // Token slots per page. Default: 16.
  int page_tokens = 16;
  // 1 or 2 index levels; with 2, level-1 parents = l1_fraction * tokens. Default: 1, 0.01.
  int levels = 1;
  float l1_fraction = 0.01f;
  // K-means iterations. Default: 20.
  int kmeans_iterations = 20;
  // Where K-means runs: kAuto = the GPU when one is present (falling back to the CPU per call),
  // kCpu = FAISS, kGpu = the GPU or Unavailable. Default: kAuto.
  Device kmeans_device = Device::kAuto;
  // Recorded as the context's source (ContextInfo::source) instead of the imported path; the
  // server sets the client's file name here for uploads. Not carried over the wire. Default:
  // empty (the path).
  std::string source;
  // Called after each (layer, kv head) is indexed and written: (done, total).
  std::function<void(int, int)> progress;
  // Asked before each (layer, kv head) and once more before publishing: when it answers true the
  // import (or rebuild) stops with Status::Cancelled and the store is as before. The CLI sets it
  // on Ctrl-C, the server when the client goes away or the call's deadline passes. Default: none.
  std::function<bool()> cancelled;
  // Test hook: called at named points of the import ("head_written" after each (layer, kv head),
  // "segment_written", "segment_published", "published"), e.g. to simulate a crash.
  std::function<void(std::string_view)> on_stage;
};

using ContextInfo = ContextRecord;

struct QueryOptions {
  // Which clusters to attend to. Default: keep 10% of the keys.
  SelectOptions select;
  // When >= 0: ignore `select`'s mode and keep every cluster whose score reaches the layer's
  // calibrated threshold for this sparsity (see Calibrate); kept counts then differ per head.
  // InvalidArgument when the context has no calibration. Default: -1 (off).
  float sparsity = -1.f;
  Device device = Device::kAuto;
  // Fill QueryResult::selected_tokens. Default: false.
  bool want_selection = false;
  // Asked (from any thread) before the query starts, before each kv head's attention and between
  // blocks of 1,024 query rows on the CPU, and before the GPU launch; once it says true the query
  // ends with Cancelled. The server sets it for a query abandoned at its deadline.
  // Default: none.
  std::function<bool()> cancelled;
};

// Target sparsities calibrated by default (import with window queries, rebuild, calibrate).
inline const std::vector<float>& DefaultSparsities() {
  static const std::vector<float> levels = {0.5f, 0.6f, 0.7f, 0.75f, 0.8f, 0.85f, 0.9f, 0.95f};
  return levels;
}

struct VerifyReport {
  int contexts_checked = 0;
  int64_t pages_checked = 0;
  int64_t bytes_checked = 0;
  // One line per problem found: "context doc layer 3: page 17 checksum mismatch".
  std::vector<std::string> problems;
};

struct CompactReport {
  int versions_reclaimed = 0;       // removed or superseded versions whose files/keys went
  int versions_in_use = 0;          // garbage versions kept because a reader still uses them
  int orphan_files_removed = 0;     // crash leftovers
  uint64_t segment_bytes_reclaimed = 0;
  uint64_t catalog_bytes_before = 0;
  uint64_t catalog_bytes_after = 0;
};

struct StoreStats {
  int contexts = 0;
  int64_t tokens = 0;                 // Σ tokens over contexts (per layer and head)
  int64_t keys = 0;                   // Σ layers × kv_heads × tokens
  uint64_t segment_bytes = 0;         // live versions' segment files
  uint64_t index_bytes = 0;           // live versions' encoded indexes and checksums
  uint64_t garbage_segment_bytes = 0;  // removed/superseded versions awaiting compact
  uint64_t catalog_bytes = 0;         // the RocksDB directory
  int live_versions = 0;
  int garbage_versions = 0;
  int calibrated_contexts = 0;
};

using ProgressFn = std::function<void(int, int)>;

struct QueryStats {
  std::string device;             // "cpu" or "gpu"
  int64_t tokens_selected = 0;    // summed over kv heads
  int64_t pages_selected = 0;
  int64_t centroids_scored = 0;
  int64_t pages_from_disk = 0;    // read from the segment file for this query
  int64_t pages_from_host = 0;    // found in the host page cache
  int64_t pages_from_device = 0;  // already resident in the device pool
  int64_t disk_bytes_read = 0;
  double total_ms = 0;
};

// Counters of the tiers since the store opened (gauges are current values).
struct TierStats {
  // Host page cache.
  uint64_t host_hits = 0, host_misses = 0, host_evictions = 0;
  uint64_t host_bytes_in_use = 0, host_pinned_bytes = 0, host_capacity_bytes = 0;
  // Disk reads into the host tier.
  uint64_t disk_reads = 0, disk_bytes = 0, disk_direct_bytes = 0;
  // Read latency histogram: bucket i counts reads of [2^i, 2^(i+1)) microseconds.
  std::vector<uint64_t> disk_read_us_log2;
  // Device tier.
  uint64_t device_layers_resident = 0, device_pool_bytes_used = 0, device_pool_bytes = 0;
  uint64_t device_layers_pinned = 0;  // of the resident layers, those pinned
  uint64_t device_layers_loaded = 0, device_layers_evicted = 0;  // layer indexes
  uint64_t device_hits = 0, device_misses = 0;  // pages
  uint64_t device_pages_uploaded = 0, device_bytes_uploaded = 0, device_pages_evicted = 0;
  // Decoded layer indexes in host memory (StoreOptions::index_cache_layers / _bytes).
  uint64_t index_layers_cached = 0, index_bytes_cached = 0, index_capacity_bytes = 0;
  uint64_t index_layers_decoded = 0, index_layers_evicted = 0;  // counters
};

struct QueryResult {
  std::vector<float> output;  // (q_heads, n, head_dim) float32
  std::vector<float> lse;     // (q_heads, n) natural-log log-sum-exp of the scaled scores
  // (kv_heads) sorted original token positions attended to; filled when want_selection.
  std::vector<std::vector<int32_t>> selected_tokens;
  QueryStats stats;
};

class Store {
 public:
  static Status Open(const StoreOptions& options, std::unique_ptr<Store>* out);
  virtual ~Store() = default;

  // Imports a context from a safetensors file (tensors k.<layer>, v.<layer> of shape
  // (kv_heads, tokens, head_dim) and optional q.<layer> of shape (q_heads, window, head_dim)).
  // Atomic: on any error or crash the store is as before. `info` may be null.
  virtual Status Import(const std::string& name, const std::string& safetensors_path,
                        const ImportOptions& options, ContextInfo* info) = 0;

  // Attention of n query tokens of one layer over the context.
  // q: (q_heads, n, head_dim) float32; q_heads a multiple of the context's kv_heads.
  virtual Status Query(const std::string& name, int layer, const float* q, int q_heads, int n,
                       int head_dim, const QueryOptions& options, QueryResult* result) = 0;

  virtual Status List(std::vector<ContextInfo>* out) = 0;
  virtual Status Info(const std::string& name, ContextInfo* out) = 0;
  // Removes the context at once for new queries; its files are reclaimed as soon as no query in
  // flight uses them (right away when none does, else by Compact).
  virtual Status Remove(const std::string& name) = 0;

  // Re-clusters an existing context with new parameters (options.progress reports) as a new
  // version, swapped in atomically: queries in flight finish on the old version.
  virtual Status Rebuild(const std::string& name, const ImportOptions& options,
                         ContextInfo* info) = 0;
  // Calibrates per-layer thresholds for `sparsities` from `queries` (layers) of shape
  // (q_heads, window, head_dim), or, when `queries` is null, from the window queries stored at
  // import. InvalidArgument when there is no calibration data.
  virtual Status Calibrate(const std::string& name, const std::vector<WindowQueries>* queries,
                           const std::vector<float>& sparsities) = 0;
  // Calibrated (sparsity, threshold) pairs of one layer; NotFound if not calibrated.
  virtual Status GetThresholds(const std::string& name, int layer, Thresholds* out) = 0;

  // Checks every page checksum and index invariant of `name` (all contexts when empty), and the
  // catalog's own checksums. Problems go to the report; the Status is an error only when the
  // check itself could not run.
  virtual Status Verify(const std::string& name, const ProgressFn& progress,
                        VerifyReport* report) = 0;
  // Reclaims removed and superseded versions no reader uses, removes crash leftovers and
  // compacts the catalog.
  virtual Status Compact(CompactReport* report) = 0;
  virtual Status Stats(StoreStats* out) = 0;

  // Tiers. A store that has none (a client of an older server) answers Unavailable.
  // Keeps the context resident in `tier` (its pages never evicted), persisted across restarts;
  // loads it now. Unavailable when it does not fit (or, for kDevice, without a GPU).
  virtual Status Pin(const std::string& name, Tier tier);
  virtual Status Unpin(const std::string& name);
  // Warms the context into `tier` without pinning it (it may be evicted later).
  virtual Status Preload(const std::string& name, Tier tier);
  // Pinned contexts and their tiers.
  virtual Status ListPins(std::vector<std::pair<std::string, Tier>>* out);
  virtual Status GetTierStats(TierStats* out);

  const std::string& data_dir() const { return data_dir_; }

 protected:
  explicit Store(std::string data_dir) : data_dir_(std::move(data_dir)) {}

 private:
  std::string data_dir_;
};

// Names are 1-128 characters of [A-Za-z0-9._-], not starting with '.' or '-'.
Status ValidateContextName(std::string_view name);

}  // namespace sqkv
