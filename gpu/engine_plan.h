// Internals of the GPU engine (gpu/engine.cc): resident layers and query plans. Plain C++;
// streams as cudaStream_t only in the .cc files.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "gpu/device_buffer.h"
#include "gpu/engine.h"
#include "gpu/lookup.h"
#include "gpu/paged_attention.h"
#include "index/head_index.h"

namespace sqkv::gpu {

// Wraps a cudaError_t (an int here, so that this header needs no CUDA) into a Status.
Status CudaStatus(int err, const char* what);

// One kv head of a resident layer: what planning needs on the host, and device pointers into the
// layer's index buffer.
struct ResidentHead {
  int32_t num_clusters = 0;
  int32_t num_l1 = 0;
  int32_t tokens = 0;
  int32_t num_pages = 0;
  std::vector<int32_t> sorted_sizes;            // cluster sizes ascending (page bound of a budget)
  // Centroids in the lookup's 16-bit storage (gpu/lookup.h): value = stored · centroid_scale.
  const uint16_t* centroids = nullptr;          // (num_clusters, head_dim)
  const int32_t* cluster_size = nullptr;        // (num_clusters)
  const int32_t* cluster_page_begin = nullptr;  // (num_clusters + 1)
  // (num_pages): pool page ids. Entries of pages not resident are undefined (the host's
  // ResidentLayer::pool_page is authoritative); QueryPaged patches them in its page lists.
  const int32_t* page_table = nullptr;
  const uint16_t* l1_centroids = nullptr;       // (num_l1, head_dim)
  const int32_t* l1_size = nullptr;             // (num_l1)
  const int32_t* l1_child_begin = nullptr;      // (num_l1 + 1)
  float centroid_scale = 1.f;                   // both levels
  std::vector<int32_t> page_begin;              // host copy of cluster_page_begin (num_clusters + 1)
};

struct ResidentLayer {
  DType dtype = DType::kBF16;
  int page_tokens = 0;
  int head_dim = 0;
  size_t page_bytes = 0;
  size_t total_pages = 0;
  // Changes when the layer is loaded and whenever one of its pages is evicted (plans check it).
  uint64_t generation = 0;
  // Paging (host side; see gpu/engine_pool.h).
  uint64_t key = 0;                      // the engine's layer key
  uint32_t id = 0;                       // PoolOwner::layer
  std::vector<int32_t> pool_page;        // (total_pages) head-major: pool page id, -1 if absent
  std::vector<int32_t> head_page_base;   // (kv_heads + 1): prefix sum of the heads' pages
  size_t resident_pages = 0;
  bool pinned = false;
  // PagePool::hand_moves() when every resident page last had its reference bit set; kNever after
  // a page joined.
  static constexpr uint64_t kNever = ~0ull;
  uint64_t referenced_at = kNever;
  std::vector<ResidentHead> heads;
  std::vector<const HeadIndex*> sources;  // valid during LoadLayer only
  DeviceBuffer index;                     // every head's index arrays and page table
};

// Checks the heads and fills the layer's shape and host-side head data (no device work). pages
// may be null (an index-only layer).
Status PrepareLayer(DType dtype, int page_tokens, const std::vector<HeadIndex>& heads,
                    const void* pages, size_t slot_bytes, ResidentLayer* layer);
// Uploads the index (with page tables from pool_ids: global page -> pool page) and copies the
// pages into the pool (none when pages is null); synchronises `stream` (a cudaStream_t) before
// returning.
Status UploadLayer(const std::vector<int32_t>& pool_ids, const void* pages, void* pool,
                   void* stream, ResidentLayer* layer);

class PlanImpl final : public QueryPlan {
 public:
  int num_requests() const override { return static_cast<int>(row_offsets_.size()); }
  int total_rows() const override { return total_rows_; }
  int head_dim() const override { return head_dim_; }
  int row_offset(int request) const override { return row_offsets_[request]; }
  size_t workspace_bytes() const override { return bytes_; }

  DType dtype_ = DType::kBF16;
  int head_dim_ = 0;
  int page_tokens_ = 0;
  int total_rows_ = 0;
  std::vector<int> row_offsets_;  // (requests)
  std::vector<int> kv_heads_;     // (requests)
  std::vector<uint64_t> layer_keys;
  std::vector<uint64_t> generations;
  std::vector<LookupSegment> segments;  // host copy of the device table
  LookupLayout layout;
  LookupArgs lookup;             // q filled per Run
  PagedAttentionArgs attention;  // q, out, lse filled per Run
  size_t bytes_ = 0;
  size_t attention_ws_bytes_ = 0;  // reserved for the attention's scratch
  DeviceBuffer owned_;             // the workspace, unless borrowed from Query's scratch
};

// InvalidArgument unless the request's buffers and shapes fit the layer and q is finite.
Status CheckHostRequest(const QueryRequest& q, const ResidentLayer& layer);
// Builds the host side of a plan: segments, lookup layout, attention shape.
Status FillPlan(const std::vector<DeviceQuery>& queries,
                const std::vector<const ResidentLayer*>& layers, const void* pool, PlanImpl* plan);
// Places the plan's device arrays in `scratch` (grown as needed) or in a buffer the plan owns
// (scratch == nullptr), and uploads its tables (synchronises `stream`, a cudaStream_t).
Status AllocatePlan(DeviceBuffer* scratch, void* stream, PlanImpl* plan);
// Enqueues lookup and attention. stream: cudaStream_t.
Status RunPlan(PlanImpl& plan, const DeviceIO& io, void* stream);
// The two halves of RunPlan, for the paged path (page lists patched in between).
Status RunPlanLookup(PlanImpl& plan, const DeviceIO& io, void* stream);
Status RunPlanAttention(PlanImpl& plan, void* stream);
// Copies the last run's selections back (the caller has synchronised).
Status ReadPlanSelections(const PlanImpl& plan, std::vector<std::vector<HeadSelection>>* out);

// The lookup's outputs lie together in the plan's workspace (page counts, cluster counts, tokens,
// centroids scored, page ids, page validity, cluster ids): one device range that a single copy
// brings back. Offsets are bytes from `device`.
struct SelectionRange {
  const void* device = nullptr;
  size_t bytes = 0;
  size_t page_count = 0, cluster_count = 0, tokens = 0, scored = 0, cluster_ids = 0;
};
SelectionRange PlanSelectionRange(const PlanImpl& plan);
// Selections from a host copy of PlanSelectionRange(plan): out[r][h] for request r, kv head h.
void SelectionsFromHost(const PlanImpl& plan, const uint8_t* host,
                        std::vector<std::vector<HeadSelection>>* out);

}  // namespace sqkv::gpu
