// Query: select clusters per kv head, read only their pages, exact attention over them.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "api/store_impl.h"
#include "compute/attention.h"
#include "gpu/device.h"
#include "gpu/engine.h"
#include "gpu/shapes.h"
#include "index/calibrate.h"

namespace sqkv {
namespace {

// Query rows attended between two looks at QueryOptions::cancelled on the CPU.
constexpr int kCancelRows = 1024;

bool QueryCancelled(const QueryOptions& o) { return o.cancelled && o.cancelled(); }

Status CancelledQuery(const std::string& name, int layer) {
  return Status::Cancelled("query of context " + name + " layer " + std::to_string(layer) +
                           " cancelled");
}

}  // namespace

bool GpuRunsShape(const ContextRecord& r) {
  // The store's engine runs with the default pool slot; a page must divide it.
  const size_t page_bytes = PageBytes(r.page_tokens, r.head_dim, r.dtype);
  return gpu::AttentionRunsHeadDim(r.head_dim) && gpu::AttentionRunsPageTokens(r.page_tokens) &&
         page_bytes > 0 && gpu::EngineOptions().slot_bytes % page_bytes == 0;
}

std::string GpuShapeError(const ContextRecord& r) {
  return "the GPU backend runs head_dim 64 and 128 with page_tokens a multiple of 8 up to " +
         std::to_string(gpu::kMaxPageTokens) + " whose page divides " +
         std::to_string(gpu::EngineOptions().slot_bytes) + " bytes; context " + r.name +
         " has head_dim " + std::to_string(r.head_dim) + ", page_tokens " +
         std::to_string(r.page_tokens);
}

Status ValidateQuery(const ContextRecord& r, int layer, const float* q, int q_heads, int n,
                     int head_dim) {
  if (layer < 0 || layer >= r.layers) {
    return Status::InvalidArgument("layer " + std::to_string(layer) + " out of range: context " +
                                   r.name + " has layers 0.." + std::to_string(r.layers - 1));
  }
  if (head_dim != r.head_dim) {
    return Status::InvalidArgument("queries have head_dim " + std::to_string(head_dim) +
                                   ", context " + r.name + " has " + std::to_string(r.head_dim));
  }
  if (q_heads <= 0 || q_heads % r.kv_heads != 0) {
    return Status::InvalidArgument("queries have " + std::to_string(q_heads) +
                                   " heads, not a positive multiple of the context's " +
                                   std::to_string(r.kv_heads) + " kv heads");
  }
  if (n <= 0) return Status::InvalidArgument("no query tokens");
  const size_t total = static_cast<size_t>(q_heads) * n * head_dim;
  for (size_t i = 0; i < total; ++i) {
    if (!std::isfinite(q[i])) {
      const size_t per_head = static_cast<size_t>(n) * head_dim;
      return Status::InvalidArgument("query element [head " + std::to_string(i / per_head) +
                                     ", token " + std::to_string(i % per_head / head_dim) +
                                     ", dim " + std::to_string(i % head_dim) + "] is not finite");
    }
  }
  return Status::Ok();
}

Status StoreImpl::Query(const std::string& name, int layer, const float* q, int q_heads, int n,
                        int head_dim, const QueryOptions& options, QueryResult* result) {
  const auto started = std::chrono::steady_clock::now();
  SQKV_RETURN_IF_ERROR(ValidateContextName(name));
  // Read the record and pin its version; a rebuild or rm that retires the version between the
  // two steps makes the pin fail, and the record is read again.
  ContextRecord r;
  constexpr int kMaxAttempts = 8;
  bool pinned = false;
  for (int attempt = 0; attempt < kMaxAttempts && !pinned; ++attempt) {
    SQKV_RETURN_IF_ERROR(catalog_->GetContext(name, &r));
    pinned = PinVersion(r.version);
  }
  if (!pinned) return Status::Unavailable("context " + name + " is being replaced; try again");
  VersionPin pin(this, r.version);
  SQKV_RETURN_IF_ERROR(ValidateQuery(r, layer, q, q_heads, n, head_dim));
  QueryOptions effective = options;
  if (options.sparsity >= 0.f) {
    Thresholds t;
    Status s = catalog_->GetThresholds(r.version, layer, &t);
    if (s.IsNotFound()) {
      return Status::InvalidArgument("context " + name +
                                     " has no calibrated thresholds: import it "
                                     "with window queries (q.<layer>) or run `sqkv calibrate " +
                                     name + " --queries FILE`");
    }
    SQKV_RETURN_IF_ERROR(s);
    effective.select.mode = SelectOptions::Mode::kThreshold;
    SQKV_RETURN_IF_ERROR(InterpolateThreshold(t.sparsity, t.threshold, options.sparsity,
                                              &effective.select.threshold));
  }
  const auto& sel = effective.select;
  if (sel.mode == SelectOptions::Mode::kKeepFraction &&
      !(sel.keep_fraction >= 0.f && sel.keep_fraction <= 1.f)) {
    return Status::InvalidArgument("keep fraction must be in [0, 1]");
  }
  if (!(sel.l1_keep_fraction >= 0.f && sel.l1_keep_fraction <= 1.f)) {
    return Status::InvalidArgument("level-1 keep fraction must be in [0, 1] (0 = automatic)");
  }
  Device device = options.device;
  if (device == Device::kAuto) {
    device = gpu::DevicePresent() && GpuRunsShape(r) ? Device::kGpu : Device::kCpu;
  }
  if (device == Device::kGpu) {
    if (!gpu::DevicePresent()) {
      auto why = gpu::DeviceDescription();
      return Status::Unavailable("--device gpu: " + why.status().message());
    }
    if (!GpuRunsShape(r)) {
      return Status::InvalidArgument("--device gpu: " + GpuShapeError(r) +
                                     " (use --device cpu or auto)");
    }
  }
  SQKV_ASSIGN_OR_RETURN(auto layer_data, GetLayer(r, layer));
  SQKV_ASSIGN_OR_RETURN(auto segment, GetSegment(r));
  if (QueryCancelled(options)) return CancelledQuery(name, layer);
  *result = QueryResult();
  result->output.resize(static_cast<size_t>(q_heads) * n * head_dim);
  result->lse.resize(static_cast<size_t>(q_heads) * n);
  Status s = device == Device::kGpu
                 ? QueryGpu(r, layer, *layer_data, *segment, q, q_heads, n, effective, result)
                 : QueryCpu(r, *layer_data, *segment, q, q_heads, n, effective, result);
  if (s.IsCancelled()) return CancelledQuery(name, layer);
  SQKV_RETURN_IF_ERROR(
      s.WithContext("query of context " + name + " layer " + std::to_string(layer)));
  // Finite queries can still overflow float32 in q.k (elements near 1e37 and up; the GPU's
  // 16-bit q earlier): no answer then, rather than NaN. An empty selection's lse is -inf with a
  // zero output, which is an answer.
  for (size_t i = 0; i < result->lse.size(); ++i) {
    const float lse = result->lse[i];
    const float* row = result->output.data() + i * static_cast<size_t>(head_dim);
    const bool row_finite =
        std::all_of(row, row + head_dim, [](float x) { return std::isfinite(x); });
    if (std::isnan(lse) || lse == std::numeric_limits<float>::infinity() || !row_finite) {
      const size_t head = i / n, token = i % n;
      *result = QueryResult();
      return Status::InvalidArgument(
          "query of context " + name + " layer " + std::to_string(layer) + ": head " +
          std::to_string(head) + " token " + std::to_string(token) +
          " overflows float32 attention scores (q.k/sqrt(d) beyond 3.4e38): scale the query down");
    }
  }
  result->stats.total_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
  return Status::Ok();
}

Status StoreImpl::QueryCpu(const ContextRecord& r, const LayerData& layer,
                           const SegmentReader& segment, const float* q, int q_heads, int n,
                           const QueryOptions& options, QueryResult* result) {
  const int kv_heads = r.kv_heads, d = r.head_dim;
  const int group = q_heads / kv_heads;
  const int rows = group * n;  // rows of one kv head: contiguous in (q_heads, n, d)
  const size_t page_bytes = segment.header().page_bytes;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  std::vector<Status> statuses(kv_heads);
  std::vector<HeadSelection> selections(kv_heads);
  std::vector<int64_t> disk_pages(kv_heads, 0);
  if (options.want_selection) result->selected_tokens.resize(kv_heads);

  std::vector<int64_t> host_pages(kv_heads, 0);
#pragma omp parallel for schedule(dynamic, 1)
  for (int h = 0; h < kv_heads; ++h) {
    const HeadIndex& index = layer.heads[h];
    const float* qh = q + static_cast<size_t>(h) * rows * d;
    Status s = SelectClusters(index, qh, rows, options.select, &selections[h]);
    // The selected pages, cluster by cluster, through the host tier.
    std::vector<uint64_t> pages;
    std::vector<int32_t> valid;
    if (s.ok()) {
      pages.reserve(selections[h].pages);
      for (int32_t c : selections[h].clusters) {
        for (int32_t p = index.cluster_page_begin[c]; p < index.cluster_page_begin[c + 1]; ++p) {
          pages.push_back(layer.head_first_page[h] + p);
          valid.push_back(index.PageValidTokens(c, p));
        }
      }
    }
    HostPages hp;
    if (s.ok() && QueryCancelled(options)) s = Status::Cancelled("cancelled");
    if (s.ok() && !pages.empty()) s = AcquireHostPages(r, layer, segment, pages, &hp);
    if (s.ok()) {
      std::vector<PageRef> refs(pages.size());
      for (size_t i = 0; i < pages.size(); ++i) refs[i] = {hp.data[i], valid[i]};
      // Blocks of rows, so a cancelled query stops within one (rows are independent; a short
      // last block joins the one before it, keeping every block on the same code path).
      for (int r0 = 0; r0 < rows && s.ok();) {
        const int block = rows - r0 < 2 * kCancelRows ? rows - r0 : kCancelRows;
        AttendPages(qh + static_cast<size_t>(r0) * d, block, d, scale, r.dtype, r.page_tokens,
                    refs.data(), static_cast<int>(refs.size()),
                    result->output.data() + (static_cast<size_t>(h) * rows + r0) * d,
                    result->lse.data() + static_cast<size_t>(h) * rows + r0);
        r0 += block;
        if (r0 < rows && QueryCancelled(options)) s = Status::Cancelled("cancelled");
      }
      if (options.want_selection) {
        result->selected_tokens[h] = SortedPositions(index, selections[h].clusters);
      }
      disk_pages[h] = hp.from_disk;
      host_pages[h] = hp.from_host;
    }
    host_cache_->Release(&hp.handles);
    statuses[h] = s;
  }
  for (int h = 0; h < kv_heads; ++h) {
    SQKV_RETURN_IF_ERROR(statuses[h].WithContext("kv head " + std::to_string(h)));
    result->stats.tokens_selected += selections[h].tokens;
    result->stats.pages_selected += selections[h].pages;
    result->stats.centroids_scored += selections[h].centroids_scored;
    result->stats.pages_from_disk += disk_pages[h];
    result->stats.pages_from_host += host_pages[h];
  }
  result->stats.disk_bytes_read = result->stats.pages_from_disk * static_cast<int64_t>(page_bytes);
  result->stats.device = "cpu";
  return Status::Ok();
}

}  // namespace sqkv
