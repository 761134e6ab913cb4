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
// Centroid storage: float32 (`centroids`) or 16-bit (`centroids_f16`, IEEE binary16 of c·2^k with
// one power-of-two scale per head, see CentroidScaleF16). The engine stores the 16-bit copy (half
// the bytes to read); float32 stays for callers that keep it (tests, benchmarks). One batch holds
// one kind. With 16-bit centroids a logit is off by at most u·|q_r|·max_j|c_j|/√d (u = 2^-11,
// 2u where q is rounded to 16 bits too: the tensor-core paths, large and narrow small), so
// selections equal the reference's up to clusters whose scores lie within a factor e^(4E) of the
// cut (tests/gpu/lookup_testing.h).
//
// Pipeline (all on the device, one launch of each kernel for the whole batch, no host round trip):
//   rows <= kLookupSmallRows ("small" segments, decode) and unscored (fixed) segments: tiles of
//     128 centroids read each centroid once for all rows of the segment and write logits and
//     per-tile (max, normaliser). 16-bit centroids with at most kLookupNarrowRows rows and
//     head_dim <= 128 (the engine's decode): tensor cores (mma.sync m16n8k16, the centroids'
//     fragments loaded straight from global memory, q in binary16 with a per-row power-of-two
//     scale, fp32 accumulate) in a persistent grid (about two blocks per SM, the next tile's
//     loads in flight); the other variants fp32 FMA with q in registers (16-byte loads), one
//     tile per block. Staged selection (the default for single-level batches whose segments fit
//     in shared memory, see LookupArgs::staged_select): a second kernel, one block of 1,024
//     threads per segment, reads the segment's sizes, page offsets and logits with coalesced
//     loads into shared memory, finishes the scores there, runs the radix select over shared
//     memory and emits the page list with block scans. Otherwise (two-level batches, segments
//     too large for shared memory): the last block of a segment to finish (an arrival counter)
//     combines the tiles, computes the scores and selects from global memory.
//   rows > kLookupSmallRows ("large" segments, prefill), 16-bit centroids: q converted to 16 bits
//     (per-row power-of-two scale), then two tensor-core passes (fp32 accumulate): row tiles over
//     every centroid for the exact per-row max and normaliser (online), then centroid tiles over
//     every row for the column sums into the workspace. On compute capability 9.0 and head_dim
//     <= 128 the passes run on wgmma (lookup_wgmma_sm90a.cu, LookupArgs::wgmma), elsewhere on
//     mma.sync m16n8k16 (lookup_mma.cu).
//   rows > kLookupSmallRows, float32 centroids: two tiled fp32 FMA passes, combine, column
//     reduction into the workspace.
//   Large segments then select like small ones: the staged selection kernel where the batch
//   allows it (single level, shared memory enough; it reads the finished scores), otherwise the
//   column pass's last block of a segment (16-bit) or a selection kernel (float32) selects from
//   global memory.
//   Selection (one block per segment): a weighted radix select over the score bits (11-bit digits
//   below the highest bit in which the scores differ) finds the cut, block scans emit the page
//   list (clusters in ascending id order).
// Hierarchical segments run the scoring and selection twice (level 1, then the candidates).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/status.h"

namespace sqkv::gpu {

// Segments with at most this many query rows take the small (decode) path.
inline constexpr int kLookupSmallRows = 16;
// A launch whose scored small segments all have at most this many rows runs the narrow variant of
// the small path: on tensor cores, q rounded to binary16, for 16-bit centroids and head_dim <= 128.
inline constexpr int kLookupNarrowRows = 4;
// Large segments, 16-bit centroids: pass 1 cuts the entries into pieces, pass 2 the query rows, one
// block each; the last block of a tile to arrive combines the pieces in a fixed order
// (gpu/lookup_mma.cu). On sm_90 PlanLookup picks the pieces per launch so that the passes fill
// the device's block slots (gpu/lookup.cu: ChoosePiece for pass 1, ChooseColPieces for pass 2);
// these are the lengths it falls back to elsewhere.
inline constexpr int kLookupPieceEntries = 2048;
inline constexpr int kLookupPieceRows = 1024;

// 16-bit centroid storage: the largest |c| of a head (both levels) is scaled by a power of two into
// [2^14, 2^15), so nothing overflows and only components below ~2^-24 of the largest lose relative
// precision. Returns the factor that turns a stored value back into a centroid (2^-k; 1 when
// max_abs is 0). max_abs must be finite.
float CentroidScaleF16(float max_abs);
// dst[i] = binary16(src[i] / scale), rounded to nearest even. src, dst: (n).
void ToCentroidF16(const float* src, size_t n, float scale, uint16_t* dst);
// A head's centroids of both levels in the 16-bit storage under one scale (returned).
// c16: resized to centroids.size(); l1_16: to l1_centroids.size().
float CentroidsToF16(const std::vector<float>& centroids, const std::vector<float>& l1_centroids,
                     std::vector<uint16_t>* c16, std::vector<uint16_t>* l1_16);

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
  // --- the head's index; exactly one of centroids / centroids_f16 (and of the level-1 pair)
  const float* centroids = nullptr;             // (num_clusters, head_dim)
  const uint16_t* centroids_f16 = nullptr;      // (num_clusters, head_dim), see CentroidScaleF16
  const uint16_t* l1_centroids_f16 = nullptr;   // (num_l1, head_dim); hierarchical only
  float centroid_scale = 1.f;                   // 16-bit storage: centroid = stored · scale
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
  int32_t ctiles = 0;          // large fp32: column tiles over entry_capacity
  int32_t tiles = 0;           // small: tiles of the fused kernel over entry_capacity
  int64_t score_offset = 0;    // floats: (entry_capacity)
  int64_t logit_offset = 0;    // floats, small: (rows, tiles * 128), base-2 logits
  int64_t tstat_offset = 0;    // floats, small: (rows, tiles, 2) per-tile (max, normaliser)
  int64_t qh_offset = 0;       // floats, large 16-bit: (rows, head_dim) binary16 q (2 per float)
  int64_t info_offset =
      0;                   // floats, large 16-bit: (rows, 4) (logit factor, max, 1/Z, log2 Z + max)
  int32_t row_splits = 0;  // large 16-bit: pieces of the entries in pass 1 (>= 1)
  int32_t col_splits = 0;  // large 16-bit: pieces of the query rows in pass 2 (>= 1)
  // large 16-bit, wgmma pass 2: query rows of its first piece, the others sharing the rest equally
  // (a multiple of 64; 0: all pieces equal, as on the mma.sync pass)
  int32_t col_first = 0;
  int32_t tile_counter = 0;  // large 16-bit: first arrival counter (row tiles, then entry tiles)
  // floats, large fp32: (rows, ctiles, 2) partial (max, sum); large 16-bit, row_splits > 1:
  // (row_splits, rows, 2) partial (max, normaliser)
  int64_t stat_offset = 0;
  int64_t rowstat_offset = 0;  // floats, large fp32: (rows, 2) final (max, 1/normaliser)
  // floats, large fp32: (row tiles, entry_capacity) column partials; large 16-bit,
  // col_splits > 1: (col_splits, entry_capacity)
  int64_t part_offset = 0;
  int64_t list_offset = 0;  // ints: candidate list (entry_capacity) + 2 counts, hierarchical
};

// What the decode scorer reads of a small segment (16-bit centroids), from PlanLookup: handed to
// its blocks in the launch parameters where the small list is short enough, so a block issues its
// first centroid copies without a trip to memory for the segment (at 128K tokens that trip queued
// behind the other blocks' copies for up to 4 us). total 0: nothing to score (kFixed).
struct SmallScoreDesc {
  const void* centroids = nullptr;  // the segment's centroids_f16
  const int32_t* cluster_size = nullptr;
  int64_t logit_offset = 0;
  int64_t tstat_offset = 0;
  int32_t total = 0;  // entries scored: num_clusters of a kFlat segment
  int32_t rows = 0;
  int32_t q_row = 0;
  int32_t tiles = 0;
  float centroid_scale = 1.f;
};

// Sizes of the workspace regions and the grid bounds, from PlanLookup.
struct LookupLayout {
  int num_segments = 0;
  int total_page_capacity = 0;
  int total_cluster_capacity = 0;
  size_t float_words = 0;  // scores, logits, stats, partials
  size_t int_words = 0;    // candidate lists
  // Grid bounds.
  bool f16 = false;         // every segment has 16-bit centroids (else every one float32)
  int max_entries = 0;      // max entry_capacity over scored segments
  int max_small_tiles = 0;  // max tiles over small-list segments (>= 1 when the list is not empty)
  int max_small_rows = 0;   // max rows over scored small segments
  int max_small_clusters = 0;  // max num_clusters over small-list segments (fixed ones too)
  int max_large_ctiles = 0;    // max ctiles over large segments
  int max_large_rtiles = 0;    // max row tiles over large segments
  int max_large_rows = 0;
  int max_large_clusters = 0;  // max num_clusters over large segments
  int max_mma_row_blocks = 0;  // large 16-bit: max row tiles x row_splits (pass 1 grid)
  int max_mma_col_blocks = 0;  // large 16-bit: max entry tiles x col_splits (pass 2 grid)
  // The wgmma passes' grids: their blocks take kWgmmaRowPassTiles / kWgmmaColPassTiles tiles.
  int max_wgmma_row_blocks = 0;  // max ceil(row tiles / kWgmmaRowPassTiles) x row_splits
  int max_wgmma_col_tiles = 0;   // max ceil(entry tiles / kWgmmaColPassTiles): pass 2 grid x
  int max_col_splits = 0;        // max col_splits: pass 2 grid z (its pieces, longest first)
  int tile_counters = 0;         // large 16-bit: arrival counters after the segments'
  bool any_hierarchical = false;
  std::vector<int32_t> small_list;  // segment ids of the fused kernel: small and fixed (unscored)
  std::vector<SmallScoreDesc> small_descs;  // in small_list order (single-level launches only)
  std::vector<int32_t> large_list;          // segment ids on the large path (scored only)
};

// Fills the workspace offsets of `segments` (host) and the layout. InvalidArgument when a segment
// is malformed, the batch mixes float32 and 16-bit centroids, or head_dim is unsupported (a
// multiple of 16 in [16, 256]).
Status PlanLookup(int head_dim, std::vector<LookupSegment>* segments, LookupLayout* layout);

// Bytes of device workspace PlanLookup's layout needs (one buffer; LookupArgs takes it carved).
size_t LookupWorkspaceBytes(const LookupLayout& layout);

struct LookupArgs {
  int head_dim = 0;
  int page_tokens = 0;
  int num_segments = 0;
  const LookupSegment* segments = nullptr;  // device (num_segments), as PlanLookup filled them
  const float* q = nullptr;                 // device (total_rows, head_dim) float32, finite
  // Benchmarks only: compute the scores (workspace) and stop before the selection; the outputs
  // below are not written. Single-level indexes only (InvalidArgument otherwise). Default: false.
  bool score_only = false;
  // Benchmarks only, with score_only: large segments with 16-bit centroids stop after this many of
  // their steps (0: none, 1: the q conversion, 2: the row-statistics pass, 3: the column pass), so
  // a benchmark times each step as a difference. Ignored without score_only. Default: 3.
  int large_steps = 3;
  // The staged selection (shared memory, 1,024 threads per segment) where the batch allows it
  // (single level, the largest segment's 16 bytes per cluster within the device's shared-memory
  // limit; small and large lists decided apart); false: always the global-memory selection (the
  // last scoring block's, or the float32 large path's selection kernel). Both give the same
  // outputs. Default: true.
  bool staged_select = true;
  // Large segments with 16-bit centroids and head_dim <= 128 on a compute capability 9.0 device
  // (Hopper): the two tensor-core passes on wgmma; false: on mma.sync, as every other device runs
  // them. Same blocks, pieces and results up to float32 summation order. Default: true.
  bool wgmma = true;
  // Small segments scored on tensor cores (16-bit centroids, at most kLookupNarrowRows rows): the
  // centroid tiles come into shared memory by bulk copies (compute capability 9.0 and newer);
  // false: every lane loads its fragments into registers, as older devices do. Same products in
  // the same order, so the same outputs bit for bit. Default: true.
  bool bulk_scoring = true;

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

  // Device workspace of LookupWorkspaceBytes(layout) bytes. Its first bytes (the segment lists and
  // zeroed arrival counters) are uploaded by the caller from LookupWorkspaceTables before the first
  // launch; every launch leaves the counters at zero again.
  void* workspace = nullptr;
};

// Host bytes to upload at the start of the workspace before the first LaunchLookup with this
// layout (the segment lists and zeroed counters): appended to `table`. Offsets are fixed by the
// layout.
void LookupWorkspaceTables(const LookupLayout& layout, std::vector<uint8_t>* table);

// Enqueues the whole lookup for the batch on `stream` (cudaStream_t; nullptr = default).
// No host synchronisation; capturable in a CUDA graph.
Status LaunchLookup(const LookupArgs& args, const LookupLayout& layout, void* stream);

// Upper bound on the pages a keep-fraction selection with token target `budget` can take, from
// the head's cluster sizes sorted ascending (sorted_sizes) and page_tokens: the clusters before
// the last one hold < budget tokens. Never more than num_pages.
int32_t BudgetPageBound(const std::vector<int32_t>& sorted_sizes, int32_t budget,
                        int32_t page_tokens, int32_t num_pages);

// Pass 2's pieces on the wgmma path (sm_90). Its grid runs them longest first (grid z is the
// piece: every tile's first piece is dispatched before any second one), so a launch ends on short
// blocks that even out the block slots' loads. A segment of `stages` stages (64 query rows each)
// is cut into `splits` pieces: the first of ColFirstStages stages (ceil(stages · q / 64), at least
// an equal share, leaving every other piece a stage), the others sharing the rest equally
// (ColPieceStages, as the kernel's PieceRangeFirst). PlanLookup takes ChooseColPieces' (splits, q)
// for the launch: the candidate whose simulated pass ends first (ColPassEnd: blocks in grid order,
// each to the slot that frees first, costing its stages + 3; ties keep fewer pieces, then the
// shorter first piece). Candidates: up to kUnequalColSplits pieces with the first share in steps
// of 2/64, then equal pieces up to kMaxColSplits (few entry tiles over many query rows).
struct ColPassRun {    // consecutive large segments of one shape, in grid (large list) order
  int64_t tiles = 0;   // pass-2 blocks per piece (entry tiles)
  int64_t stages = 0;  // ceil(rows / 64)
  int64_t count = 0;   // segments
};
struct ColPieces {
  int64_t splits = 1;
  int64_t q = 64;  // the first piece's share of the stages, in 64ths
};
inline constexpr int64_t kMaxColSplits = 64;     // pieces of one segment considered, at most
inline constexpr int64_t kUnequalColSplits = 8;  // unequal cuts considered up to this many
int64_t ColFirstStages(int64_t stages, int64_t splits, int64_t q);
int64_t ColPieceStages(int64_t stages, int64_t splits, int64_t first, int64_t piece);
int64_t ColPassEnd(const std::vector<ColPassRun>& runs, int64_t slots, ColPieces pieces);
ColPieces ChooseColPieces(const std::vector<ColPassRun>& runs, int64_t slots);

}  // namespace sqkv::gpu
