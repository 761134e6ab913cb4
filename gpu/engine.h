// The GPU engine: a device page pool of KV pages plus per-head indexes, and sparse attention
// over them (centroid lookup, then paged attention, all on the device). Public; plain C++, no CUDA
// types (streams are void*, a cudaStream_t).
//
// Three ways to query:
//   Query(requests)   host buffers in and out; one lookup launch and one attention launch for each
//                     (dtype, head_dim, page_tokens) group of the batch, then copies back. Every
//                     layer named must be fully resident.
//   QueryPaged(requests, supply, stats)
//                     the device tier of the tiered store: layers may be index-only or partly
//                     resident; only the pages the lookup selects are fetched (see "Paging").
//   Plan(...) + Run(...)
//                     the embedding form for an inference engine: device buffers, the caller's
//                     stream, no host synchronisation and no allocation in Run, so Run can be
//                     captured in a CUDA graph and replayed. Plan (host, synchronous) fixes the
//                     batch shape (layers, heads, rows, selection options) and owns the workspace.
//                     Every layer named must be fully resident (pin it to keep the plan valid).
//
// Paging (issue 4). The pool is page-granular: a layer's index (centroids, cluster tables and a
// device page table) is made resident on its own (LoadLayerIndex, outside the pool), and its pages
// come and go one by one. A page lives in a slot of EngineOptions::slot_bytes; a slot holds pages
// of one size only (slot_bytes / page_bytes of them) and returns to the free slots when its last
// page leaves. When a page is needed and no slot has room, a resident page is evicted by CLOCK
// (second chance) within its size class: a page enters with its reference bit clear and a later
// selection sets it, so pages seen once by a cold query go before pages selected again. Failing
// that, a whole slot of another size class whose pages can all go is taken. Never evicted: pages
// of a pinned layer (PinLayer) and pages selected by the query in progress. A query whose pages do
// not fit next to those answers Unavailable and leaves every layer consistent.
//
// QueryPaged, per (dtype, head_dim, page_tokens) group of the batch:
//   - every layer fully resident: exactly the Query path (no extra host round trip);
//   - otherwise: the lookup runs on the device; the selected clusters come back to the host (one
//     device->host round trip); for each (layer, kv head) with selected pages not resident,
//     `supply` is called once with all of them (ascending, distinct); the engine allocates pool
//     pages (evicting as above), copies the supplied pages host->device on its stream, patches
//     the layer's device page table and the query's page lists, then runs the attention on the
//     same stream. Supplied pages become resident (reference bit clear) for later queries.
// Uploads: pages whose supplier pointer is page-locked host memory mapped for the device
// (cudaHostAlloc / cudaMallocHost, or cudaHostRegister on a UVA system) and 16-byte aligned are
// gathered by one kernel that reads host memory over PCIe, one block per page; any other pointer
// (pageable memory) goes through cudaMemcpyAsync, one copy per run of pages adjacent in both host
// and pool memory (EngineOptions::upload selects).
//
// Device: every call other than Run sets EngineOptions::device current; Run and its graph
// replays enqueue on the calling thread's current device, which must be the engine's.
// Hierarchical (two-level) indexes are selected on the device too (level 1, then candidates).
//
// Thread safety: none. Calls on one Engine must be serialised by the caller; a QueryPlan must not
// be Run on two streams at once (its workspace is shared between runs).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "index/head_index.h"
#include "index/select.h"

namespace sqkv::gpu {

struct EngineOptions {
  // CUDA device ordinal. Default: 0.
  int device = 0;
  // Bytes of the page pool (one cudaMalloc at Create). Default: 0 = 40% of the device's free
  // memory at Create. The per-head indexes (centroids, page tables) are allocated outside it.
  size_t pool_bytes = 0;
  // The pool's unit of memory: a slot holds slot_bytes / PageBytes pages of one size (of any
  // layers), so every page size used must divide it. Default: 64 KiB (pages of 16 tokens and
  // head_dim 128 in f32 are 16 KiB).
  size_t slot_bytes = 64 << 10;

  enum class Upload : uint8_t {
    kAuto,        // the gather kernel for device-mapped pinned pages, copies for the rest
    kCopyEngine,  // cudaMemcpyAsync per run of pages adjacent in host and pool memory
    kBatchCopy,   // one cudaMemcpyBatchAsync over those runs (the driver's batched copy)
  };
  // How QueryPaged and PreloadLayer copy supplied pages to the device. Default: kAuto.
  Upload upload = Upload::kAuto;
};

struct QueryRequest {
  uint64_t layer_key = 0;    // a layer made resident with LoadLayer (or LoadLayerIndex: QueryPaged)
  const float* q = nullptr;  // host (q_heads, n, head_dim) float32, finite
  int q_heads = 0;           // a multiple of the layer's kv heads (GQA group = q_heads / kv_heads)
  int n = 0;                 // queries per head, >= 1
  SelectOptions select;
  float* out = nullptr;  // host (q_heads, n, head_dim): attention output
  float* lse = nullptr;  // host (q_heads, n): natural-log sum of exp over the keys attended;
                         // -inf (out 0) where nothing was selected
  std::vector<HeadSelection>* selection = nullptr;  // optional: resized to kv_heads
};

// Answers the pages of one (layer, kv head) that a paged query needs and the device lacks.
// head_pages: (m) head-local page numbers (page p of head `head` is the p-th page of that head in
// the layout of index/head_index.h), ascending and distinct. host_pages: resized by the supplier to
// (m) pointers, each to page_bytes bytes of the page's K then V (PageBytes of the layer); they
// must stay valid and unchanged until QueryPaged (or PreloadLayer) returns. Page-locked, mapped,
// 16-byte aligned memory takes the fast path (see "Uploads" above); any host memory is accepted.
// A non-OK Status fails the query with that Status (context added) and nothing is uploaded.
using PageSupplier = std::function<Status(uint64_t layer_key, int head,
                                          const std::vector<int32_t>& head_pages,
                                          std::vector<const void*>* host_pages)>;

// What one QueryPaged (or PreloadLayer) did. Set, not accumulated, by each call.
struct PagingStats {
  int64_t pages_selected = 0;     // pages in the selected lists, summed over requests and heads
  int64_t pages_from_device = 0;  // of those, resident before this call
  int64_t pages_uploaded = 0;     // distinct pages copied host->device
  int64_t bytes_uploaded = 0;
  int64_t pages_evicted = 0;      // other pages evicted to make room
  int64_t supplier_calls = 0;     // one per (layer, kv head) with missing pages
  int64_t round_trips = 0;        // groups that read their selection back before the attention
  double supply_us = 0;           // host time inside the supplier
  double upload_us = 0;           // device time of the uploads (event to event), all groups
};

// Engine-wide counters since Create (paging counts QueryPaged and PreloadLayer).
struct EngineCounters {
  uint64_t hits = 0;              // selected pages found resident (the pages of fully resident
                                  // groups only when QueryPaged was given stats)
  uint64_t misses = 0;            // distinct selected pages that had to be supplied
  uint64_t pages_uploaded = 0;    // by LoadLayer, QueryPaged and PreloadLayer
  uint64_t bytes_uploaded = 0;
  uint64_t pages_evicted = 0;     // evicted to make room (EvictLayer not counted)
  uint64_t unavailable = 0;       // calls refused for lack of evictable pages
  uint64_t pool_bytes = 0;        // the pool
  uint64_t pool_used_bytes = 0;   // slots holding at least one page
  uint64_t page_bytes_resident = 0;  // bytes of resident pages (<= pool_used_bytes)
  uint64_t pages_resident = 0;
  uint64_t index_bytes = 0;       // device bytes of the layers' indexes (outside the pool)
  uint64_t layers = 0;            // layers with a resident index
  uint64_t pinned_layers = 0;
};

// Residency of one layer.
struct LayerResidency {
  bool indexed = false;   // the index is resident (HasLayer)
  bool pinned = false;
  size_t pages_resident = 0;
  size_t pages_total = 0;
  size_t index_bytes = 0;
  size_t page_bytes = 0;  // PageBytes of the layer
};

// One request of a device batch. Rows are stacked in plan order: request r's q, out and lse rows
// start at QueryPlan::row_offset(r), laid out (q_heads, n, ...).
struct DeviceQuery {
  uint64_t layer_key = 0;
  int q_heads = 0;
  int n = 0;
  SelectOptions select;
};

// Device buffers of one Run, every request's rows stacked (see DeviceQuery).
struct DeviceIO {
  const float* q = nullptr;  // device (total_rows, head_dim) float32, finite (not checked)
  float* out = nullptr;      // device (total_rows, head_dim)
  float* lse = nullptr;      // device (total_rows)
};

// A planned batch: the segment tables and the workspace for one fixed batch shape. Valid until a
// layer it names, or one of its pages, is evicted (Run then fails; a graph captured from it must
// not be replayed).
class QueryPlan {
 public:
  virtual ~QueryPlan() = default;
  virtual int num_requests() const = 0;
  virtual int total_rows() const = 0;  // rows of q / out (and entries of lse)
  virtual int head_dim() const = 0;
  virtual int row_offset(int request) const = 0;
  virtual size_t workspace_bytes() const = 0;  // device bytes the plan holds
};

class Engine {
 public:
  // Unavailable when the build has no CUDA or no device answers, or the pool cannot be allocated.
  static Status Create(const EngineOptions& options, std::unique_ptr<Engine>* out);
  virtual ~Engine() = default;

  // Makes one layer of one context resident: its per-kv-head index and all its pages.
  // heads: (kv_heads), each valid (ValidateHeadIndex), one head_dim and page_tokens.
  // pages: host, head-major: head h's page p at pages + (head_page_base[h] + p) * PageBytes(...),
  // head_page_base = prefix sum of heads[h].num_pages().
  // Takes free pool space only: it evicts no page of another layer. Unavailable if the pool has
  // no room (the caller may EvictLayer and retry, or use LoadLayerIndex + PreloadLayer, which
  // evict); nothing stays resident then. AlreadyExists if the key is resident; InvalidArgument
  // for a malformed index or a page size that does not divide EngineOptions::slot_bytes.
  virtual Status LoadLayer(uint64_t layer_key, DType dtype, int page_tokens,
                           const std::vector<HeadIndex>& heads, const void* pages) = 0;
  // Makes the layer's index resident with no page resident (for QueryPaged). Same arguments and
  // errors as LoadLayer without the pages; the index lives outside the pool (its bytes in
  // LayerResidency::index_bytes and EngineCounters::index_bytes).
  virtual Status LoadLayerIndex(uint64_t layer_key, DType dtype, int page_tokens,
                                const std::vector<HeadIndex>& heads) = 0;
  // Whether the layer's index is resident (its pages may not be: see Residency).
  virtual bool HasLayer(uint64_t layer_key) const = 0;
  virtual LayerResidency Residency(uint64_t layer_key) const = 0;
  // Frees the layer's pages and index (pinned or not). Waits for work queued by Query; Run work on
  // the caller's streams must be finished by the caller first.
  virtual void EvictLayer(uint64_t layer_key) = 0;
  // Uploads every page of the layer not resident, asking `supply` once per kv head, evicting
  // other layers' unpinned pages as needed. Unavailable when the pool cannot hold the layer next
  // to pinned pages (pages uploaded until then stay); NotFound without the index. stats may be
  // null. With PinLayer first, the layer then stays fully resident (`sqkv pin --tier device`).
  // Like EvictLayer, the evictions here (and in QueryPaged) reuse pool slots at once: Run work
  // still executing on the caller's streams over unpinned pages must be finished first.
  virtual Status PreloadLayer(uint64_t layer_key, const PageSupplier& supply,
                              PagingStats* stats) = 0;
  // A pinned layer's pages are never evicted (EvictLayer still frees them). NotFound without the
  // index. Pins do not nest: one UnpinLayer undoes any number of PinLayer.
  virtual Status PinLayer(uint64_t layer_key) = 0;
  virtual Status UnpinLayer(uint64_t layer_key) = 0;
  // Bytes of the pool in use (slots holding a page) and in all.
  virtual size_t pool_used_bytes() const = 0;
  virtual size_t pool_bytes() const = 0;
  virtual EngineCounters counters() const = 0;

  // A batch of requests (possibly on different layers/contexts) in one pass: one lookup launch and
  // one attention launch per (dtype, head_dim, page_tokens) group, then copies back. Synchronous.
  // InvalidArgument for shapes (q_heads not a multiple of kv_heads, n < 1), a non-finite q, or
  // null buffers; NotFound for a layer not resident; Unavailable for a layer whose pages are not
  // all resident (use QueryPaged).
  virtual Status Query(const std::vector<QueryRequest>& requests) = 0;

  // Query over layers that may be index-only or partly resident (see "Paging" above): the missing
  // selected pages come from `supply`. Synchronous. Results equal Query's on the same layers
  // fully resident (the same kernels on the same page lists). The pages of one group's requests
  // must fit in the pool together, next to pinned pages: Unavailable otherwise (nothing of that
  // group is uploaded; the request outputs are unspecified). Errors of Query, plus the supplier's
  // (with the layer and head as context) and InvalidArgument for a supplier answer of the wrong
  // size or with a null pointer. stats may be null: a group whose layers are all fully resident
  // then runs exactly as Query (with stats, one small extra copy reads its page counts).
  // Evicts like PreloadLayer: finish Run work over unpinned pages on other streams first.
  virtual Status QueryPaged(const std::vector<QueryRequest>& requests, const PageSupplier& supply,
                            PagingStats* stats) = 0;

  // Plans a device batch. Every request must share dtype, head_dim and page_tokens (one group);
  // allocates the plan's workspace. Same errors as Query (layers fully resident). A plan goes
  // stale when a page of one of its layers is evicted (pin the layers to prevent that).
  virtual Status Plan(const std::vector<DeviceQuery>& queries,
                      std::unique_ptr<QueryPlan>* plan) = 0;
  // Enqueues the lookup and the attention of `plan` on `stream` (cudaStream_t; nullptr = default
  // stream). Only kernel launches: no allocation, no copy, no synchronisation.
  virtual Status Run(QueryPlan& plan, const DeviceIO& io, void* stream) = 0;
  // The selections of the plan's last Run, after synchronising `stream`: out[r][h] for request r,
  // kv head h.
  virtual Status ReadSelections(const QueryPlan& plan, void* stream,
                                std::vector<std::vector<HeadSelection>>* out) = 0;
};

}  // namespace sqkv::gpu
