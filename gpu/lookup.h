// Centroid lookup on the device: scores the clusters of each segment's head index against the
// segment's query rows and writes the page lists that gpu/paged_attention.h reads. Internal to
// gpu/; plain C++, streams as void*.
//
// Semantics are those of index/select.h (SelectClusters), reproduced on the device:
//   s_j = mean_r [ exp(l_rj - m_r) / Σ_i n_i exp(l_ri - m_r) ],  l_rj = q_r·c_j / √d,
//   m_r = max_i l_ri (float32 logits, max subtracted per row);
//   keep-fraction: descending score, ties by ascending id, until the kept tokens reach the target
//   (KeepTokenTarget); threshold: s_j >= t; dense: every cluster.
//   Hierarchical: level-1 parents are scored the same way, kept by the level-1 target; then only
//   the children of kept parents are scored, the pruned parents joining the normaliser (their
//   logits alongside the children's, max over both).
//
// Pipeline (all on the device, one launch of each kernel for the whole batch):
//   rows <= kSmallRows ("small" segments, decode): logits (rows, K) into workspace, then the
//     selection kernel takes the per-row max and normaliser and the mean itself;
//   rows >  kSmallRows ("large" segments, prefill): a tiled fp32 GEMM pass for per-row max and
//     normaliser, a combine, a second tiled pass for per-tile column sums, a column reduction;
//   then one selection block per segment: a weighted radix select finds the cut, a block scan
//   emits the page list (clusters in ascending id order).
// Hierarchical segments run the scoring and selection twice (level 1, then the candidates).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/status.h"

namespace sqkv::gpu {

// Segments with at most this many query rows take the small (decode) path.
inline constexpr int kLookupSmallRows = 16;

// Large path arithmetic: false = float32 FMA tiles; true = tensor cores in split precision
// (3xTF32, float32-level logits; both pass the same reference tests). The default of
// LookupArgs::split_tf32. Measured on an H200 (BENCHMARKS.md): 128K prefill lookup 3.95 ms with
// FMA tiles, 4.31 ms with 3xTF32 (three mma.sync per product and the split do not pay off in
// this tile shape), so FMA is the default.
inline constexpr bool kLookupSplitTf32Default = false;

enum class LookupMode : int32_t {
  kBudget = 0,     // keep-fraction: whole clusters until `budget` tokens (0: none)
  kThreshold = 1,  // score >= threshold
  kDense = 2,      // every cluster
};

// How a segment is run (PlanLookup decides from the mode and the index).
enum class LookupRun : int32_t {
  kFixed =
      0,  // nothing to score: dense (all clusters) or budget 0 (none); seg_scored = scored_fixed
  kFlat = 1,      // score every level-2 cluster (also a hierarchical index whose parents all stay)
  kTwoLevel = 2,  // score level 1, keep parents, score the candidates
};

// One segment: the query rows of one (request, kv head) and one head's index. Host fills the
// inputs; PlanLookup fills the workspace offsets. Every pointer is a device pointer.
struct LookupSegment {
  // --- the head's index
  const float* centroids = nullptr;             // (num_clusters, head_dim)
  const int32_t* cluster_size = nullptr;        // (num_clusters), each >= 1
  const int32_t* cluster_page_begin = nullptr;  // (num_clusters + 1)
  const int32_t* page_table = nullptr;          // (num_pages): head-local page -> pool page id
  const float* l1_centroids = nullptr;          // (num_l1, head_dim); hierarchical only
  const int32_t* l1_size = nullptr;             // (num_l1)
  const int32_t* l1_child_begin = nullptr;      // (num_l1 + 1)
  int32_t num_clusters = 0;
  int32_t num_l1 = 0;  // 0: single level
  int32_t tokens = 0;
  // --- the queries: rows [q_row, q_row + rows) of LookupArgs::q
  int32_t q_row = 0;
  int32_t rows = 0;
  // --- selection
  LookupMode mode = LookupMode::kBudget;
  int32_t budget = 0;         // kBudget: target tokens, 1..tokens (KeepTokenTarget)
  float threshold = 0.f;      // kThreshold
  int32_t l1_budget = 0;      // hierarchical, kBudget/kThreshold: level-1 target tokens, 0..tokens
  int32_t page_capacity = 0;  // upper bound on the pages this segment can select
  // --- filled by PlanLookup
  LookupRun run = LookupRun::kFlat;
  int32_t scored_fixed = 0;    // kFixed: centroids the CPU reference reports as scored
  int32_t scored_extra = 0;    // kFlat: added to num_clusters (level-1 parents of a flat-run index)
  int32_t large = 0;           // 1: tiled (prefill) path
  int32_t page_offset = 0;     // into page_ids / page_valid (page_capacity entries)
  int32_t cluster_offset = 0;  // into cluster_ids (num_clusters entries)
  int32_t entry_capacity = 0;  // scoring entries: num_clusters + num_l1
  int32_t ctiles = 0;          // large: column tiles over entry_capacity
  int64_t score_offset = 0;    // floats: (entry_capacity)
  int64_t logit_offset = 0;    // floats, small: (rows, entry_capacity)
  int64_t stat_offset = 0;     // floats, large: (rows, ctiles, 2) partial (max, sum)
  int64_t rowstat_offset = 0;  // floats, large: (rows, 2) final (max, 1/normaliser)
  int64_t part_offset = 0;     // floats, large: (row tiles, entry_capacity) column partials
  int64_t list_offset = 0;     // ints: candidate list (entry_capacity) + 2 counts, hierarchical
};

// Sizes of the workspace regions and the grid bounds, from PlanLookup.
struct LookupLayout {
  int num_segments = 0;
  int total_page_capacity = 0;
  int total_cluster_capacity = 0;
  size_t float_words = 0;  // scores, logits, stats, partials
  size_t int_words = 0;    // candidate lists
  // Grid bounds.
  int max_entries = 0;       // max entry_capacity over scored segments
  int max_small_tiles = 0;   // max ceil(entry_capacity / small tile) over small segments
  int max_small_rows = 0;    // max rows over small segments
  int max_large_ctiles = 0;  // max ctiles over large segments
  int max_large_rtiles = 0;  // max row tiles over large segments
  int max_large_rows = 0;
  bool any_hierarchical = false;
  std::vector<int32_t> small_list;  // segment ids on the small path (scored only)
  std::vector<int32_t> large_list;  // segment ids on the large path (scored only)
};

// Fills the workspace offsets of `segments` (host) and the layout. InvalidArgument when a segment
// is malformed or head_dim is unsupported (a multiple of 16 in [16, 256]).
Status PlanLookup(int head_dim, std::vector<LookupSegment>* segments, LookupLayout* layout);

// Bytes of device workspace PlanLookup's layout needs (one buffer; LookupArgs takes it carved).
size_t LookupWorkspaceBytes(const LookupLayout& layout);

struct LookupArgs {
  int head_dim = 0;
  int page_tokens = 0;
  int num_segments = 0;
  const LookupSegment* segments = nullptr;    // device (num_segments), as PlanLookup filled them
  const float* q = nullptr;                   // device (total_rows, head_dim) float32
  bool split_tf32 = kLookupSplitTf32Default;  // large path on tensor cores (see above)

  // Outputs, device. Per segment s: seg_page_count[s] pages at page_ids/page_valid
  // [segments[s].page_offset ...]; seg_cluster_count[s] cluster ids (ascending) at
  // cluster_ids[segments[s].cluster_offset ...]; seg_tokens[s] keys under them;
  // seg_scored[s] centroids scored (level 1 plus level 2).
  int32_t* seg_page_count = nullptr;     // (num_segments)
  int32_t* page_ids = nullptr;           // (total_page_capacity): pool page
  int32_t* page_valid = nullptr;         // (total_page_capacity): 1..page_tokens
  int32_t* seg_cluster_count = nullptr;  // (num_segments)
  int32_t* cluster_ids = nullptr;        // (total_cluster_capacity)
  int32_t* seg_tokens = nullptr;         // (num_segments)
  int32_t* seg_scored = nullptr;         // (num_segments)

  // Device workspace of LookupWorkspaceBytes(layout) bytes; small_list and large_list are copied
  // into it by the caller through LookupWorkspaceTables (they are part of the plan).
  void* workspace = nullptr;
};

// Host bytes to upload at the start of the workspace before the first LaunchLookup with this
// layout (the segment lists): append to `table`. Offsets are fixed by the layout.
void LookupWorkspaceTables(const LookupLayout& layout, std::vector<uint8_t>* table);

// Enqueues the whole lookup for the batch on `stream` (cudaStream_t; nullptr = default).
// No host synchronisation; capturable in a CUDA graph.
Status LaunchLookup(const LookupArgs& args, const LookupLayout& layout, void* stream);

// Upper bound on the pages a keep-fraction selection with token target `budget` can take, from
// the head's cluster sizes sorted ascending (sorted_sizes) and page_tokens: the clusters before
// the last one hold < budget tokens. Never more than num_pages.
int32_t BudgetPageBound(const std::vector<int32_t>& sorted_sizes, int32_t budget,
                        int32_t page_tokens, int32_t num_pages);

}  // namespace sqkv::gpu
