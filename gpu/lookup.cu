// Lookup planning (host), the 16-bit centroid storage, and the launch sequence. Kernels:
// lookup_small.cu (decode, fused), lookup_mma.cu (prefill, 16-bit), lookup_score.cu and
// lookup_select.cu (prefill, float32).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gpu/device.h"
#include "gpu/lookup.h"
#include "gpu/lookup_device.cuh"

namespace sqkv::gpu {
namespace {

using lookup_detail::kMmaColTile;
using lookup_detail::kMmaRowTile;
using lookup_detail::kSmallTile;
using lookup_detail::kTileCols;
using lookup_detail::kTileRows;
using lookup_detail::kWgmmaColPassTiles;
using lookup_detail::kWgmmaRowPassTiles;
using lookup_detail::WgmmaPassBlocksPerSm;

// Largest head_dim the kernels take (16-byte loads by 32 lanes; 16 k-steps of the tensor cores).
constexpr int kMaxHeadDim = 256;

// Regions of the workspace start on this boundary (bytes).
constexpr size_t kRegionAlign = 256;
// Offsets inside the float and int regions are multiples of this many words (128 bytes).
constexpr int64_t kWordAlign = 32;

size_t AlignUp(size_t x, size_t a) { return (x + a - 1) / a * a; }

int64_t Take(int64_t* cursor, int64_t words) {
  const int64_t at = *cursor;
  *cursor += (words + kWordAlign - 1) / kWordAlign * kWordAlign;
  return at;
}

// Tables region: small list, large list, then one arrival counter per segment and the tile
// counters of the 16-bit large path.
size_t TablesBytes(const LookupLayout& l) {
  return AlignUp((l.small_list.size() + l.large_list.size() + l.num_segments + l.tile_counters) *
                     sizeof(int32_t),
                 kRegionAlign);
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

Status Bad(int i, const std::string& what) {
  return Status::InvalidArgument("lookup segment " + std::to_string(i) + ": " + what);
}

Status FromCuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Status::Internal(std::string("lookup: ") + what + ": " + cudaGetErrorString(err));
}

// Decides how a segment runs, mirroring index/select.cc (SelectClusters): which cases need no
// scoring, and which hierarchical cases reduce to a single-level scan.
void ChooseRun(LookupSegment* s) {
  const bool two_level = s->num_l1 > 0;
  s->scored_fixed = 0;
  s->scored_extra = 0;
  if (s->mode == LookupMode::kDense) {
    // Every parent stays; the reference scores every cluster (and every parent).
    s->run = LookupRun::kFixed;
    s->scored_fixed = s->num_clusters + s->num_l1;
    return;
  }
  if (!two_level) {
    if (s->mode == LookupMode::kBudget && s->budget <= 0) {
      s->run = LookupRun::kFixed;  // keeps nothing; the reference still scored every cluster
      s->scored_fixed = s->num_clusters;
    } else {
      s->run = LookupRun::kFlat;
    }
    return;
  }
  if (s->l1_budget <= 0) {
    s->run = LookupRun::kFixed;  // no parent stays: nothing at level 2
    s->scored_fixed = s->num_l1;
    return;
  }
  if (s->l1_budget >= s->tokens) {
    // Every parent must stay (each holds >= 1 token): exactly the single-level selection.
    s->scored_extra = s->num_l1;
    if (s->mode == LookupMode::kBudget && s->budget <= 0) {
      s->run = LookupRun::kFixed;
      s->scored_fixed = s->num_clusters + s->num_l1;
    } else {
      s->run = LookupRun::kFlat;
    }
    return;
  }
  s->run = LookupRun::kTwoLevel;
}

}  // namespace

float CentroidScaleF16(float max_abs) {
  if (!(max_abs > 0.f) || !std::isfinite(max_abs)) return 1.f;
  int ex = 0;
  std::frexp(max_abs, &ex);  // max_abs = f · 2^ex, f in [0.5, 1)
  // Stored max = max_abs / scale = f · 2^15 in [2^14, 2^15).
  return std::ldexp(1.f, ex - 15);
}

void ToCentroidF16(const float* src, size_t n, float scale, uint16_t* dst) {
  for (size_t i = 0; i < n; ++i) dst[i] = FloatToHalf(src[i] / scale);
}

float CentroidsToF16(const std::vector<float>& centroids, const std::vector<float>& l1_centroids,
                     std::vector<uint16_t>* c16, std::vector<uint16_t>* l1_16) {
  float max_abs = 0.f;
  for (float v : centroids) max_abs = std::max(max_abs, std::abs(v));
  for (float v : l1_centroids) max_abs = std::max(max_abs, std::abs(v));
  const float scale = CentroidScaleF16(max_abs);
  c16->resize(centroids.size());
  l1_16->resize(l1_centroids.size());
  ToCentroidF16(centroids.data(), centroids.size(), scale, c16->data());
  ToCentroidF16(l1_centroids.data(), l1_centroids.size(), scale, l1_16->data());
  return scale;
}

int32_t BudgetPageBound(const std::vector<int32_t>& sorted_sizes, int32_t budget,
                        int32_t page_tokens, int32_t num_pages) {
  if (budget <= 0 || sorted_sizes.empty()) return 0;
  // Every cluster but the last taken was taken while the kept tokens were < budget: at most
  // `before` clusters holding <= budget - 1 tokens, then one more of at most max_size tokens.
  int64_t sum = 0, before = 0;
  for (int32_t n : sorted_sizes) {
    if (sum + n > budget - 1) break;
    sum += n;
    ++before;
  }
  const int64_t clusters = before + 1;
  const int64_t tokens = static_cast<int64_t>(budget) - 1 + sorted_sizes.back();
  // ceil(n / pt) <= (n + pt - 1) / pt for each cluster.
  const int64_t bound = (tokens + clusters * (page_tokens - 1)) / page_tokens;
  return static_cast<int32_t>(std::min<int64_t>(bound, num_pages));
}

namespace {

// The two tensor passes of large 16-bit segments (gpu/lookup_mma.cu, lookup_wgmma_sm90a.cu) give
// each block one tile (kMmaRowTile rows, kMmaColTile entries) and one piece of the streamed
// dimension (pass 1: entries, pass 2: query rows), walked in stages of kPassStage. Blocks of a
// pass all cost about the same, so the pass takes whole waves of the device's block slots: the
// piece length is chosen per launch to minimise waves × (stages per block + kPieceOverhead),
// the overhead being a block's start (its tile's copy) and end (statistics, combine), in stages.
// Fitted on the H200 at 128K (pass 2, pieces of 512 against 1,024 rows: 13 against 7 waves,
// 172 against 160 µs), the overhead is about three stages. There it gives pass 1 one piece per
// tile at 128K (4 before): NOTES-gpu-lookup.md v15. The wgmma pass-1 blocks take two row tiles at
// one block per SM (v16), which the model sees as half the blocks over half the slots; at 128K it
// still gives one piece. Pass 2 on sm_90 takes unequal pieces, longest first (ChooseColPieces,
// v17); without a device answering, both passes keep the fixed lengths.
constexpr int64_t kPassStage = 64;
constexpr int64_t kPieceOverhead = 3;
constexpr int64_t kMaxPieces = 64;  // pieces of one segment considered, at most

struct PassShape {
  int64_t tiles;   // blocks per piece
  int64_t length;  // the streamed dimension
};

// The device's block slots for a tensor pass; 0 (the fixed lengths) when no device answers or the
// device is not sm_90. The model was fitted to, and measured on, the wgmma passes that sm_90 runs
// by default; the mma.sync passes did worse with its pieces on the H200 (pass 1 at 128K: 243 →
// 335 µs, a single piece per tile), so other devices keep the fixed lengths, and so do the
// mma.sync passes there. On sm_90, LookupArgs::wgmma = false (tests, benchmarks) runs the
// mma.sync passes on the pieces chosen here.
int64_t TensorPassSlots(int64_t blocks_per_sm) {
  return CurrentDeviceIsSm90() ? blocks_per_sm * CurrentDeviceSmCount() : 0;
}

// The piece length (a multiple of kPassStage) for one pass over `shapes`; `fallback` without slots.
// A segment of length n takes ceil(n / piece) pieces of ceil(ceil(n / pieces) / kPassStage) stages
// (the kernels' PieceRange). Ties keep the longer pieces: fewer partial results to combine.
int64_t ChoosePiece(const std::vector<PassShape>& shapes, int64_t slots, int64_t fallback) {
  int64_t longest = 0;
  for (const PassShape& p : shapes) longest = std::max(longest, p.length);
  if (slots <= 0 || longest == 0) return fallback;
  int64_t best = longest, best_cost = std::numeric_limits<int64_t>::max();
  for (int64_t k = 1; k <= kMaxPieces; ++k) {
    const int64_t piece = CeilDiv(CeilDiv(longest, k), kPassStage) * kPassStage;
    int64_t blocks = 0, stages = 0;
    for (const PassShape& p : shapes) {
      const int64_t pieces = CeilDiv(p.length, piece);
      blocks += p.tiles * pieces;
      stages = std::max(stages, CeilDiv(CeilDiv(p.length, pieces), kPassStage));
    }
    const int64_t cost = CeilDiv(blocks, slots) * (stages + kPieceOverhead);
    if (cost < best_cost) {
      best_cost = cost;
      best = piece;
    }
    if (piece == kPassStage) break;
  }
  return best;
}

}  // namespace

int64_t ColPieceStages(int64_t stages, int64_t splits, int64_t first, int64_t piece) {
  if (splits <= 1) return piece == 0 ? stages : 0;
  if (piece == 0) return first;
  const int64_t per = CeilDiv(stages - first, splits - 1);
  return std::clamp<int64_t>(stages - first - (piece - 1) * per, 0, per);
}

int64_t ColFirstStages(int64_t stages, int64_t splits, int64_t q) {
  if (splits <= 1) return stages;
  return std::clamp<int64_t>(CeilDiv(stages * q, 64), CeilDiv(stages, splits),
                             stages - (splits - 1));
}

int64_t ColPassEnd(const std::vector<ColPassRun>& runs, int64_t slots, ColPieces pieces) {
  std::map<int64_t, int64_t> free_at{{0, slots}};  // time -> slots free from then
  for (int64_t p = 0; p < pieces.splits; ++p) {
    for (const ColPassRun& r : runs) {
      const int64_t k = std::min(pieces.splits, r.stages);
      if (p >= k) continue;
      const int64_t cost =
          ColPieceStages(r.stages, k, ColFirstStages(r.stages, k, pieces.q), p) + kPieceOverhead;
      for (int64_t n = r.tiles * r.count; n > 0;) {  // equal blocks to the earliest slots
        auto it = free_at.begin();
        const int64_t t = it->first, take = std::min(it->second, n);
        if ((it->second -= take) == 0) free_at.erase(it);
        free_at[t + cost] += take;
        n -= take;
      }
    }
  }
  return free_at.rbegin()->first;
}

ColPieces ChooseColPieces(const std::vector<ColPassRun>& runs, int64_t slots) {
  ColPieces best;
  int64_t best_end = std::numeric_limits<int64_t>::max();
  for (int64_t k = 1; k <= kMaxColSplits; ++k) {
    // No cut into k pieces ends before the slots' even share of its work: skip the simulations
    // where that bound cannot beat the best so far (most k, for launches of many tiles).
    int64_t work = 0;
    for (const ColPassRun& r : runs) {
      work += r.tiles * r.count * (r.stages + std::min(k, r.stages) * kPieceOverhead);
    }
    if (CeilDiv(work, slots) >= best_end) continue;
    // k = 1: the one piece; up to kUnequalColSplits pieces, first shares from equal (64 / k) up
    // in steps of 2/64; beyond, equal pieces only (for few tiles over many rows).
    const int64_t q_last = k == 1 || k > kUnequalColSplits ? CeilDiv(int64_t{64}, k) : 64;
    for (int64_t q = CeilDiv(int64_t{64}, k); q <= q_last; q += 2) {
      const int64_t end = ColPassEnd(runs, slots, {k, q});
      if (end < best_end) {
        best_end = end;
        best = {k, q};
      }
    }
  }
  return best;
}

Status PlanLookup(int head_dim, std::vector<LookupSegment>* segments, LookupLayout* layout) {
  if (head_dim < lookup_detail::kTileK || head_dim % lookup_detail::kTileK != 0 ||
      head_dim > kMaxHeadDim) {
    return Status::InvalidArgument("lookup: head_dim " + std::to_string(head_dim) +
                                   " is not a multiple of 16 in [16, 256]");
  }
  LookupLayout l;
  l.num_segments = static_cast<int>(segments->size());
  int64_t pages = 0, clusters = 0, floats = 0, ints = 0, tile_counters = 0;
  int64_t mma_row_blocks = 0, mma_col_blocks = 0, wgmma_row_blocks = 0, wgmma_col_tiles = 0;
  int64_t col_splits = 0;
  std::vector<int> tensor_segs;  // large segments of 16-bit centroids: the two tensor passes
  for (int i = 0; i < l.num_segments; ++i) {
    LookupSegment& s = (*segments)[i];
    if (s.num_clusters < 1 || s.tokens < 1 || s.rows < 1 || s.q_row < 0 || s.num_l1 < 0 ||
        s.page_capacity < 0) {
      return Bad(i, "non-positive size");
    }
    const bool f16 = s.centroids_f16 != nullptr;
    if ((s.centroids == nullptr) == !f16) return Bad(i, "needs exactly one centroid array");
    if (i == 0) l.f16 = f16;
    if (f16 != l.f16) return Bad(i, "float32 and 16-bit centroids in one batch");
    if (f16 && !(s.centroid_scale > 0.f && std::isfinite(s.centroid_scale))) {
      return Bad(i, "centroid_scale not positive");
    }
    if (s.cluster_size == nullptr || s.cluster_page_begin == nullptr || s.page_table == nullptr) {
      return Bad(i, "missing index array");
    }
    const void* l1 = f16 ? static_cast<const void*>(s.l1_centroids_f16) : s.l1_centroids;
    if (s.num_l1 > 0 && (l1 == nullptr || s.l1_size == nullptr || s.l1_child_begin == nullptr)) {
      return Bad(i, "missing level-1 array");
    }
    if (s.mode == LookupMode::kBudget && (s.budget < 0 || s.budget > s.tokens)) {
      return Bad(i, "budget outside [0, tokens]");
    }
    ChooseRun(&s);
    s.page_offset = static_cast<int32_t>(pages);
    s.cluster_offset = static_cast<int32_t>(clusters);
    pages += s.page_capacity;
    clusters += s.num_clusters;
    if (pages > INT32_MAX || clusters > INT32_MAX) return Bad(i, "batch too large");
    s.entry_capacity = s.num_clusters + (s.run == LookupRun::kTwoLevel ? s.num_l1 : 0);
    s.large = 0;
    s.ctiles = 0;
    s.tiles = 0;
    if (s.run == LookupRun::kFixed) {
      // Nothing to score: the fused kernel's grid row only selects.
      l.small_list.push_back(i);
      l.max_small_tiles = std::max(l.max_small_tiles, 1);
      l.max_small_clusters = std::max(l.max_small_clusters, s.num_clusters);
      continue;
    }
    if (s.run == LookupRun::kTwoLevel) {
      s.list_offset = Take(&ints, s.entry_capacity + 2);
      l.any_hierarchical = true;
    }
    s.score_offset = Take(&floats, s.entry_capacity);
    l.max_entries = std::max(l.max_entries, s.entry_capacity);
    if (s.rows <= kLookupSmallRows) {
      s.tiles = (s.entry_capacity + kSmallTile - 1) / kSmallTile;
      s.logit_offset = Take(&floats, s.rows * lookup_detail::LogitStride(s));
      s.tstat_offset = Take(&floats, static_cast<int64_t>(s.rows) * s.tiles * 2);
      l.small_list.push_back(i);
      l.max_small_tiles = std::max(l.max_small_tiles, s.tiles);
      l.max_small_rows = std::max(l.max_small_rows, s.rows);
      l.max_small_clusters = std::max(l.max_small_clusters, s.num_clusters);
      continue;
    }
    s.large = 1;
    l.large_list.push_back(i);
    l.max_large_rows = std::max(l.max_large_rows, s.rows);
    l.max_large_clusters = std::max(l.max_large_clusters, s.num_clusters);
    if (f16) {
      // binary16 q rows: head_dim / 2 floats each (head_dim is even).
      s.qh_offset = Take(&floats, static_cast<int64_t>(s.rows) * head_dim / 2);
      s.info_offset = Take(&floats, static_cast<int64_t>(s.rows) * 4);
      tensor_segs.push_back(i);  // pieces below, once the whole launch is known
      continue;
    }
    s.ctiles = (s.entry_capacity + kTileCols - 1) / kTileCols;
    const int rtiles = (s.rows + kTileRows - 1) / kTileRows;
    s.stat_offset = Take(&floats, static_cast<int64_t>(s.rows) * s.ctiles * 2);
    s.rowstat_offset = Take(&floats, static_cast<int64_t>(s.rows) * 2);
    s.part_offset = Take(&floats, static_cast<int64_t>(rtiles) * s.entry_capacity);
    l.max_large_ctiles = std::max(l.max_large_ctiles, s.ctiles);
    l.max_large_rtiles = std::max(l.max_large_rtiles, rtiles);
  }
  // The tensor passes' pieces for the whole launch: pass 1 one length (ChoosePiece), pass 2 a
  // longest-first cut on sm_90 (ChooseColPieces), both from the wgmma passes' blocks per piece.
  std::vector<PassShape> row_pass;
  std::vector<ColPassRun> col_runs;
  for (int i : tensor_segs) {
    const LookupSegment& s = (*segments)[i];
    row_pass.push_back(
        {CeilDiv(CeilDiv(s.rows, kMmaRowTile), kWgmmaRowPassTiles), s.entry_capacity});
    const int64_t tiles = CeilDiv(CeilDiv(s.entry_capacity, kMmaColTile), kWgmmaColPassTiles);
    const int64_t stages = CeilDiv(s.rows, kPassStage);
    if (!col_runs.empty() && col_runs.back().tiles == tiles && col_runs.back().stages == stages) {
      ++col_runs.back().count;
    } else {
      col_runs.push_back({tiles, stages, 1});
    }
  }
  const int64_t piece_entries = ChoosePiece(
      row_pass, TensorPassSlots(WgmmaPassBlocksPerSm(kWgmmaRowPassTiles)), kLookupPieceEntries);
  const int64_t col_slots = TensorPassSlots(WgmmaPassBlocksPerSm(kWgmmaColPassTiles));
  const ColPieces col_pieces = col_slots > 0 ? ChooseColPieces(col_runs, col_slots) : ColPieces{};
  for (int i : tensor_segs) {
    LookupSegment& s = (*segments)[i];
    const int64_t rtiles = CeilDiv(s.rows, kMmaRowTile);
    const int64_t etiles = CeilDiv(s.entry_capacity, kMmaColTile);
    s.row_splits = static_cast<int32_t>(CeilDiv(s.entry_capacity, piece_entries));
    if (col_slots > 0) {
      const int64_t stages = CeilDiv(s.rows, kPassStage);
      const int64_t k = std::min(col_pieces.splits, stages);
      s.col_splits = static_cast<int32_t>(k);
      s.col_first =
          k > 1 ? static_cast<int32_t>(ColFirstStages(stages, k, col_pieces.q) * kPassStage) : 0;
    } else {
      s.col_splits = static_cast<int32_t>(CeilDiv(s.rows, kLookupPieceRows));
      s.col_first = 0;
    }
    if (s.row_splits > 1) {
      s.stat_offset = Take(&floats, static_cast<int64_t>(s.row_splits) * s.rows * 2);
    }
    if (s.col_splits > 1) {
      s.part_offset = Take(&floats, static_cast<int64_t>(s.col_splits) * s.entry_capacity);
    }
    s.tile_counter = static_cast<int32_t>(l.num_segments + tile_counters);
    tile_counters += rtiles + etiles;
    mma_row_blocks = std::max(mma_row_blocks, rtiles * s.row_splits);
    mma_col_blocks = std::max(mma_col_blocks, etiles * s.col_splits);
    wgmma_row_blocks =
        std::max(wgmma_row_blocks, CeilDiv(rtiles, kWgmmaRowPassTiles) * s.row_splits);
    wgmma_col_tiles = std::max(wgmma_col_tiles, CeilDiv(etiles, kWgmmaColPassTiles));
    col_splits = std::max<int64_t>(col_splits, s.col_splits);
    if (l.num_segments + tile_counters > INT32_MAX) return Bad(i, "batch too large");
  }
  if (l.max_large_rtiles > 65535 || mma_row_blocks > INT32_MAX || mma_col_blocks > INT32_MAX) {
    return Status::InvalidArgument("lookup: too many query rows");
  }
  l.max_mma_row_blocks = static_cast<int>(mma_row_blocks);
  l.max_mma_col_blocks = static_cast<int>(mma_col_blocks);
  l.max_wgmma_row_blocks = static_cast<int>(wgmma_row_blocks);
  l.max_wgmma_col_tiles = static_cast<int>(wgmma_col_tiles);
  l.max_col_splits = static_cast<int>(col_splits);
  l.tile_counters = static_cast<int>(tile_counters);
  if (l.small_list.size() > 65535 || l.large_list.size() > 65535) {
    return Status::InvalidArgument("lookup: more than 65535 segments on one path");
  }
  if (!l.any_hierarchical) {
    for (int32_t i : l.small_list) {
      const LookupSegment& s = (*segments)[i];
      SmallScoreDesc d;
      d.centroids = s.centroids_f16;
      d.cluster_size = s.cluster_size;
      d.logit_offset = s.logit_offset;
      d.tstat_offset = s.tstat_offset;
      d.total = s.run == LookupRun::kFlat ? s.num_clusters : 0;
      d.rows = s.rows;
      d.q_row = s.q_row;
      d.tiles = s.tiles;
      d.centroid_scale = s.centroid_scale;
      l.small_descs.push_back(d);
    }
  }
  l.total_page_capacity = static_cast<int>(pages);
  l.total_cluster_capacity = static_cast<int>(clusters);
  l.float_words = static_cast<size_t>(floats);
  l.int_words = static_cast<size_t>(ints);
  *layout = std::move(l);
  return Status::Ok();
}

size_t LookupWorkspaceBytes(const LookupLayout& l) {
  return TablesBytes(l) + AlignUp(l.float_words * sizeof(float), kRegionAlign) +
         AlignUp(l.int_words * sizeof(int32_t), kRegionAlign);
}

void LookupWorkspaceTables(const LookupLayout& l, std::vector<uint8_t>* table) {
  const size_t at = table->size();
  table->resize(at + TablesBytes(l), 0);
  uint8_t* p = table->data() + at;
  std::memcpy(p, l.small_list.data(), l.small_list.size() * sizeof(int32_t));
  std::memcpy(p + l.small_list.size() * sizeof(int32_t), l.large_list.data(),
              l.large_list.size() * sizeof(int32_t));
  // The arrival counters after the lists start at zero (resize filled them).
}

Status LaunchLookup(const LookupArgs& a, const LookupLayout& l, void* stream) {
  if (l.num_segments == 0) return Status::Ok();
  if (a.segments == nullptr || a.workspace == nullptr || a.q == nullptr) {
    return Status::InvalidArgument("lookup: missing segments, workspace or queries");
  }
  if (a.score_only && l.any_hierarchical) {
    return Status::InvalidArgument("lookup: score_only needs single-level indexes");
  }
  auto* base = static_cast<uint8_t*>(a.workspace);
  lookup_detail::Workspace w;
  auto* lists = reinterpret_cast<int32_t*>(base);
  // PlanLookup lists segments in ascending order, so a small list holding every segment is the
  // identity (passed as null).
  const bool identity = l.small_list.size() == static_cast<size_t>(l.num_segments);
  w.small_list = identity ? nullptr : lists;
  w.large_list = lists + l.small_list.size();
  w.counters = lists + l.small_list.size() + l.large_list.size();
  w.floats = reinterpret_cast<float*>(base + TablesBytes(l));
  w.ints = reinterpret_cast<int32_t*>(base + TablesBytes(l) +
                                      AlignUp(l.float_words * sizeof(float), kRegionAlign));
  auto s = static_cast<cudaStream_t>(stream);
  if (l.f16 && (!a.score_only || a.large_steps >= 1)) {
    SQKV_RETURN_IF_ERROR(FromCuda(lookup_detail::LaunchConvertQ(a, l, w, s), "convert q"));
  }
  for (int level = l.any_hierarchical ? 1 : 2; level <= 2; ++level) {
    SQKV_RETURN_IF_ERROR(FromCuda(lookup_detail::LaunchSmall(a, l, w, level, s), "small"));
    if (l.f16) {
      SQKV_RETURN_IF_ERROR(FromCuda(lookup_detail::LaunchLargeF16(a, l, w, level, s), "large"));
    } else {
      SQKV_RETURN_IF_ERROR(
          FromCuda(lookup_detail::LaunchLargeScoresF32(a, l, w, level, s), "tiled"));
      SQKV_RETURN_IF_ERROR(FromCuda(lookup_detail::LaunchSelectLarge(a, l, w, level, s), "select"));
    }
  }
  return Status::Ok();
}

}  // namespace sqkv::gpu
