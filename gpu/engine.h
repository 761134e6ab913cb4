// The GPU engine: a device-resident pool of KV pages plus per-head indexes, and sparse attention
// over them (centroid lookup, then paged attention, all on the device). Public; plain C++, no CUDA
// types (streams are void*, a cudaStream_t).
//
// Two ways to query:
//   Query(requests)   host buffers in and out; one lookup launch and one attention launch for each
//                     (dtype, head_dim, page_tokens) group of the batch, then copies back.
//   Plan(...) + Run(...)
//                     the embedding form for an inference engine: device buffers, the caller's
//                     stream, no host synchronisation and no allocation in Run, so Run can be
//                     captured in a CUDA graph and replayed. Plan (host, synchronous) fixes the
//                     batch shape (layers, heads, rows, selection options) and owns the workspace.
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
  // The pool's unit of allocation: a layer takes whole slots, each holding slot_bytes / PageBytes
  // of its pages, so every page size used must divide it. Default: 64 KiB (pages of 16 tokens and
  // head_dim 128 in f32 are 16 KiB).
  size_t slot_bytes = 64 << 10;
};

struct QueryRequest {
  uint64_t layer_key = 0;    // a layer made resident with LoadLayer
  const float* q = nullptr;  // host (q_heads, n, head_dim) float32, finite
  int q_heads = 0;           // a multiple of the layer's kv heads (GQA group = q_heads / kv_heads)
  int n = 0;                 // queries per head, >= 1
  SelectOptions select;
  float* out = nullptr;  // host (q_heads, n, head_dim): attention output
  float* lse = nullptr;  // host (q_heads, n): natural-log sum of exp over the keys attended;
                         // -inf (out 0) where nothing was selected
  std::vector<HeadSelection>* selection = nullptr;  // optional: resized to kv_heads
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
// layer it names is evicted (Run then fails; a graph captured from it must not be replayed).
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
  // Unavailable if the pool is full (the caller may EvictLayer and retry); AlreadyExists if the
  // key is resident; InvalidArgument for a malformed index or a page size that does not divide
  // EngineOptions::slot_bytes.
  virtual Status LoadLayer(uint64_t layer_key, DType dtype, int page_tokens,
                           const std::vector<HeadIndex>& heads, const void* pages) = 0;
  virtual bool HasLayer(uint64_t layer_key) const = 0;
  // Frees the layer's pages and index. Waits for work queued by Query; Run work on the caller's
  // streams must be finished by the caller first.
  virtual void EvictLayer(uint64_t layer_key) = 0;
  // Bytes of the pool in use and in all.
  virtual size_t pool_used_bytes() const = 0;
  virtual size_t pool_bytes() const = 0;

  // A batch of requests (possibly on different layers/contexts) in one pass: one lookup launch and
  // one attention launch per (dtype, head_dim, page_tokens) group, then copies back. Synchronous.
  // InvalidArgument for shapes (q_heads not a multiple of kv_heads, n < 1), a non-finite q, or
  // null buffers; NotFound for a layer not resident.
  virtual Status Query(const std::vector<QueryRequest>& requests) = 0;

  // Plans a device batch. Every request must share dtype, head_dim and page_tokens (one group);
  // allocates the plan's workspace. Same errors as Query.
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
