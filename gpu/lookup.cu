// Lookup planning (host) and the launch sequence. Kernels: lookup_score.cu, lookup_select.cu.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <string>

#include "gpu/lookup.h"
#include "gpu/lookup_device.cuh"

namespace sqkv::gpu {
namespace {

using lookup_detail::kSmallTile;
using lookup_detail::kTileCols;
using lookup_detail::kTileRows;

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

size_t TablesBytes(const LookupLayout& l) {
  return AlignUp((l.small_list.size() + l.large_list.size()) * sizeof(int32_t), kRegionAlign);
}

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

Status PlanLookup(int head_dim, std::vector<LookupSegment>* segments, LookupLayout* layout) {
  if (head_dim < lookup_detail::kTileK || head_dim % lookup_detail::kTileK != 0) {
    return Status::InvalidArgument("lookup: head_dim " + std::to_string(head_dim) +
                                   " is not a positive multiple of 16");
  }
  LookupLayout l;
  l.num_segments = static_cast<int>(segments->size());
  int64_t pages = 0, clusters = 0, floats = 0, ints = 0;
  for (int i = 0; i < l.num_segments; ++i) {
    LookupSegment& s = (*segments)[i];
    if (s.num_clusters < 1 || s.tokens < 1 || s.rows < 1 || s.q_row < 0 || s.num_l1 < 0 ||
        s.page_capacity < 0) {
      return Bad(i, "non-positive size");
    }
    if (s.centroids == nullptr || s.cluster_size == nullptr || s.cluster_page_begin == nullptr ||
        s.page_table == nullptr) {
      return Bad(i, "missing index array");
    }
    if (s.num_l1 > 0 &&
        (s.l1_centroids == nullptr || s.l1_size == nullptr || s.l1_child_begin == nullptr)) {
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
    if (s.run == LookupRun::kFixed) continue;
    if (s.run == LookupRun::kTwoLevel) {
      s.list_offset = Take(&ints, s.entry_capacity + 2);
      l.any_hierarchical = true;
    }
    s.score_offset = Take(&floats, s.entry_capacity);
    l.max_entries = std::max(l.max_entries, s.entry_capacity);
    if (s.rows <= kLookupSmallRows) {
      s.logit_offset = Take(&floats, static_cast<int64_t>(s.rows) * s.entry_capacity);
      l.small_list.push_back(i);
      l.max_small_tiles =
          std::max(l.max_small_tiles, (s.entry_capacity + kSmallTile - 1) / kSmallTile);
      l.max_small_rows = std::max(l.max_small_rows, s.rows);
    } else {
      s.large = 1;
      s.ctiles = (s.entry_capacity + kTileCols - 1) / kTileCols;
      const int rtiles = (s.rows + kTileRows - 1) / kTileRows;
      s.stat_offset = Take(&floats, static_cast<int64_t>(s.rows) * s.ctiles * 2);
      s.rowstat_offset = Take(&floats, static_cast<int64_t>(s.rows) * 2);
      s.part_offset = Take(&floats, static_cast<int64_t>(rtiles) * s.entry_capacity);
      l.large_list.push_back(i);
      l.max_large_ctiles = std::max(l.max_large_ctiles, s.ctiles);
      l.max_large_rtiles = std::max(l.max_large_rtiles, rtiles);
      l.max_large_rows = std::max(l.max_large_rows, s.rows);
    }
  }
  if (l.max_large_rtiles > 65535) return Status::InvalidArgument("lookup: too many query rows");
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
}

Status LaunchLookup(const LookupArgs& a, const LookupLayout& l, void* stream) {
  if (l.num_segments == 0) return Status::Ok();
  if (a.segments == nullptr || a.workspace == nullptr || a.q == nullptr) {
    return Status::InvalidArgument("lookup: missing segments, workspace or queries");
  }
  auto* base = static_cast<uint8_t*>(a.workspace);
  lookup_detail::Workspace w;
  w.small_list = reinterpret_cast<const int32_t*>(base);
  w.large_list = w.small_list + l.small_list.size();
  w.floats = reinterpret_cast<float*>(base + TablesBytes(l));
  w.ints = reinterpret_cast<int32_t*>(base + TablesBytes(l) +
                                      AlignUp(l.float_words * sizeof(float), kRegionAlign));
  auto s = static_cast<cudaStream_t>(stream);
  if (l.any_hierarchical) {
    SQKV_RETURN_IF_ERROR(FromCuda(lookup_detail::LaunchSmallLogits(a, l, w, 1, s), "logits L1"));
    SQKV_RETURN_IF_ERROR(FromCuda(lookup_detail::LaunchLargeScores(a, l, w, 1, s), "tiled L1"));
    SQKV_RETURN_IF_ERROR(FromCuda(lookup_detail::LaunchSelect(a, l, w, 1, s), "select L1"));
  }
  SQKV_RETURN_IF_ERROR(FromCuda(lookup_detail::LaunchSmallLogits(a, l, w, 2, s), "logits"));
  SQKV_RETURN_IF_ERROR(FromCuda(lookup_detail::LaunchLargeScores(a, l, w, 2, s), "tiled"));
  return FromCuda(lookup_detail::LaunchSelect(a, l, w, 2, s), "select");
}

}  // namespace sqkv::gpu
