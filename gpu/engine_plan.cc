// Query plans of the GPU engine: segments, workspace placement, the launches, selection readback.
#include "gpu/engine_plan.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#include "index/select.h"

namespace sqkv::gpu {
namespace {

constexpr size_t kAlign = 256;

size_t AlignUp(size_t x, size_t a) { return (x + a - 1) / a * a; }

Status CheckOptions(const SelectOptions& o) {
  if (std::isnan(o.keep_fraction) || std::isnan(o.threshold) || std::isnan(o.l1_keep_fraction)) {
    return Status::InvalidArgument("NaN in select options");
  }
  return Status::Ok();
}

LookupMode ModeOf(SelectOptions::Mode m) {
  switch (m) {
    case SelectOptions::Mode::kThreshold:
      return LookupMode::kThreshold;
    case SelectOptions::Mode::kDense:
      return LookupMode::kDense;
    default:
      return LookupMode::kBudget;
  }
}

// Where each device array of a plan lies, in bytes from the start of its buffer.
struct Placement {
  size_t segments, q_row, rows, page_offset, tables_end;
  size_t page_count, cluster_count, tokens, scored, page_ids, page_valid, cluster_ids;
  size_t lookup_ws, attention_ws, total;
};

// PagedAttentionWorkspaceBytes checks the whole argument set (it answers 0 for arguments it
// rejects: null or misaligned pointers), so it is asked with aligned placeholders where the
// device pointers will go. They are never dereferenced.
size_t AttentionWorkspaceBytes(const PagedAttentionArgs& args) {
  alignas(256) static const int32_t kInts[4] = {};
  alignas(256) static float kFloats[4] = {};
  PagedAttentionArgs a = args;
  a.seg_q_row = a.seg_rows = a.seg_page_offset = a.seg_page_count = kInts;
  a.page_ids = a.page_valid = kInts;
  a.q = kFloats;
  a.out = a.lse = kFloats;
  return PagedAttentionWorkspaceBytes(a);
}

Placement Place(const PlanImpl& p) {
  const size_t s = p.segments.size();
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off = AlignUp(off + std::max<size_t>(bytes, 1), kAlign);
    return at;
  };
  Placement x;
  x.segments = take(s * sizeof(LookupSegment));
  x.q_row = take(s * sizeof(int32_t));
  x.rows = take(s * sizeof(int32_t));
  x.page_offset = take(s * sizeof(int32_t));
  x.tables_end = off;
  // The lookup's outputs, in the order PlanSelectionRange relies on (page_count .. cluster_ids).
  x.page_count = take(s * sizeof(int32_t));
  x.cluster_count = take(s * sizeof(int32_t));
  x.tokens = take(s * sizeof(int32_t));
  x.scored = take(s * sizeof(int32_t));
  x.page_ids = take(p.layout.total_page_capacity * sizeof(int32_t));
  x.page_valid = take(p.layout.total_page_capacity * sizeof(int32_t));
  x.cluster_ids = take(p.layout.total_cluster_capacity * sizeof(int32_t));
  x.lookup_ws = take(LookupWorkspaceBytes(p.layout));
  x.attention_ws = take(AttentionWorkspaceBytes(p.attention));
  x.total = off;
  return x;
}

}  // namespace

Status CheckHostRequest(const QueryRequest& q, const ResidentLayer& layer) {
  if (q.q == nullptr || q.out == nullptr || q.lse == nullptr) {
    return Status::InvalidArgument("null q, out or lse");
  }
  const int kv = static_cast<int>(layer.heads.size());
  if (q.q_heads < 1 || q.q_heads % kv != 0) {
    return Status::InvalidArgument("q_heads " + std::to_string(q.q_heads) +
                                   " is not a positive multiple of kv_heads " + std::to_string(kv));
  }
  if (q.n < 1) return Status::InvalidArgument("n " + std::to_string(q.n) + " < 1");
  const size_t count = static_cast<size_t>(q.q_heads) * q.n * layer.head_dim;
  for (size_t i = 0; i < count; ++i) {
    if (!std::isfinite(q.q[i])) {
      return Status::InvalidArgument("q element " + std::to_string(i) + " is not finite");
    }
  }
  return CheckOptions(q.select);
}

Status FillPlan(const std::vector<DeviceQuery>& queries,
                const std::vector<const ResidentLayer*>& layers, const void* pool, PlanImpl* plan) {
  plan->segments.clear();
  plan->row_offsets_.clear();
  plan->kv_heads_.clear();
  plan->layer_keys.clear();
  plan->generations.clear();
  if (queries.empty()) return Status::InvalidArgument("empty batch");
  const ResidentLayer& first = *layers[0];
  plan->dtype_ = first.dtype;
  plan->head_dim_ = first.head_dim;
  plan->page_tokens_ = first.page_tokens;
  int64_t rows = 0;
  int max_rows = 0, max_pages = 0;
  for (size_t r = 0; r < queries.size(); ++r) {
    const DeviceQuery& q = queries[r];
    const ResidentLayer& l = *layers[r];
    const std::string where = "request " + std::to_string(r);
    if (l.dtype != first.dtype || l.head_dim != first.head_dim ||
        l.page_tokens != first.page_tokens) {
      return Status::InvalidArgument(where +
                                     ": dtype, head_dim or page_tokens differ from request 0 "
                                     "(a plan holds one group)");
    }
    const int kv = static_cast<int>(l.heads.size());
    if (q.q_heads < 1 || q.q_heads % kv != 0 || q.n < 1) {
      return Status::InvalidArgument(where + ": q_heads " + std::to_string(q.q_heads) + ", n " +
                                     std::to_string(q.n) + " for kv_heads " + std::to_string(kv));
    }
    SQKV_RETURN_IF_ERROR(CheckOptions(q.select).WithContext(where));
    const int64_t seg_rows = static_cast<int64_t>(q.q_heads / kv) * q.n;
    if (rows + seg_rows * kv > INT32_MAX) return Status::InvalidArgument("batch too large");
    plan->row_offsets_.push_back(static_cast<int>(rows));
    plan->kv_heads_.push_back(kv);
    plan->layer_keys.push_back(q.layer_key);
    plan->generations.push_back(l.generation);
    const SelectOptions& o = q.select;
    const float f1 = Level1KeepFraction(o);
    for (int h = 0; h < kv; ++h) {
      const ResidentHead& x = l.heads[h];
      LookupSegment s;
      s.centroids_f16 = x.centroids;
      s.cluster_size = x.cluster_size;
      s.cluster_page_begin = x.cluster_page_begin;
      s.page_table = x.page_table;
      s.l1_centroids_f16 = x.l1_centroids;
      s.centroid_scale = x.centroid_scale;
      s.l1_size = x.l1_size;
      s.l1_child_begin = x.l1_child_begin;
      s.num_clusters = x.num_clusters;
      s.num_l1 = x.num_l1;
      s.tokens = x.tokens;
      s.q_row = static_cast<int32_t>(rows + h * seg_rows);
      s.rows = static_cast<int32_t>(seg_rows);
      s.mode = ModeOf(o.mode);
      s.budget = KeepTokenTarget(o.keep_fraction, x.tokens);
      s.threshold = o.threshold;
      s.l1_budget = x.num_l1 > 0 ? KeepTokenTarget(f1, x.tokens) : 0;
      s.page_capacity = s.mode == LookupMode::kBudget
                            ? BudgetPageBound(x.sorted_sizes, s.budget, l.page_tokens, x.num_pages)
                            : x.num_pages;
      max_pages = std::max(max_pages, s.page_capacity);
      plan->segments.push_back(s);
    }
    max_rows = std::max(max_rows, static_cast<int>(seg_rows));
    rows += seg_rows * kv;
  }
  plan->total_rows_ = static_cast<int>(rows);
  SQKV_RETURN_IF_ERROR(PlanLookup(plan->head_dim_, &plan->segments, &plan->layout));

  PagedAttentionArgs& a = plan->attention;
  a = PagedAttentionArgs();
  a.dtype = plan->dtype_;
  a.head_dim = plan->head_dim_;
  a.page_tokens = plan->page_tokens_;
  a.scale = 1.f / std::sqrt(static_cast<float>(plan->head_dim_));
  a.pool = pool;
  a.num_segments = static_cast<int>(plan->segments.size());
  a.max_pages_per_segment = max_pages;
  a.max_rows_per_segment = max_rows;
  // The kernel before the attention is the lookup (or, paged, the page gather): it writes page
  // lists, counts and pool pages, never q or the segment tables (uploaded with the plan).
  a.overlap_previous_kernel = true;
  return Status::Ok();
}

Status AllocatePlan(DeviceBuffer* scratch, void* stream_ptr, PlanImpl* plan) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const Placement x = Place(*plan);
  DeviceBuffer* buffer = scratch != nullptr ? scratch : &plan->owned_;
  if (buffer->size() < x.total) SQKV_RETURN_IF_ERROR(buffer->Allocate(x.total));
  plan->bytes_ = x.total;
  plan->attention_ws_bytes_ = x.total - x.attention_ws;
  auto* base = static_cast<uint8_t*>(buffer->get());
  auto at = [&](size_t off) { return reinterpret_cast<int32_t*>(base + off); };
  const int n = static_cast<int>(plan->segments.size());

  LookupArgs& l = plan->lookup;
  l = LookupArgs();
  l.head_dim = plan->head_dim_;
  l.page_tokens = plan->page_tokens_;
  l.num_segments = n;
  l.segments = reinterpret_cast<const LookupSegment*>(base + x.segments);
  l.seg_page_count = at(x.page_count);
  l.page_ids = at(x.page_ids);
  l.page_valid = at(x.page_valid);
  l.seg_cluster_count = at(x.cluster_count);
  l.cluster_ids = at(x.cluster_ids);
  l.seg_tokens = at(x.tokens);
  l.seg_scored = at(x.scored);
  l.workspace = base + x.lookup_ws;

  PagedAttentionArgs& a = plan->attention;
  a.seg_q_row = at(x.q_row);
  a.seg_rows = at(x.rows);
  a.seg_page_offset = at(x.page_offset);
  a.seg_page_count = at(x.page_count);
  a.page_ids = at(x.page_ids);
  a.page_valid = at(x.page_valid);
  a.workspace = base + x.attention_ws;

  std::vector<uint8_t> tables(x.tables_end, 0);
  std::memcpy(tables.data() + x.segments, plan->segments.data(), n * sizeof(LookupSegment));
  for (int i = 0; i < n; ++i) {
    const LookupSegment& s = plan->segments[i];
    std::memcpy(tables.data() + x.q_row + i * sizeof(int32_t), &s.q_row, sizeof(int32_t));
    std::memcpy(tables.data() + x.rows + i * sizeof(int32_t), &s.rows, sizeof(int32_t));
    std::memcpy(tables.data() + x.page_offset + i * sizeof(int32_t), &s.page_offset,
                sizeof(int32_t));
  }
  std::vector<uint8_t> lists;
  LookupWorkspaceTables(plan->layout, &lists);
  SQKV_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(base, tables.data(), tables.size(), cudaMemcpyHostToDevice, stream),
      "upload plan"));
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(base + x.lookup_ws, lists.data(), lists.size(),
                                                  cudaMemcpyHostToDevice, stream),
                                  "upload plan"));
  return CudaStatus(cudaStreamSynchronize(stream), "upload plan");
}

Status RunPlanLookup(PlanImpl& plan, const DeviceIO& io, void* stream) {
  if (plan.segments.empty()) return Status::Ok();
  if (io.q == nullptr || io.out == nullptr || io.lse == nullptr) {
    return Status::InvalidArgument("null device q, out or lse");
  }
  plan.lookup.q = io.q;
  plan.attention.q = io.q;
  plan.attention.out = io.out;
  plan.attention.lse = io.lse;
  return LaunchLookup(plan.lookup, plan.layout, stream);
}

Status RunPlanAttention(PlanImpl& plan, void* stream) {
  if (plan.segments.empty()) return Status::Ok();
  // The attention sizes its scratch from the arguments alone; a plan never launches it with less
  // than it asks for.
  if (PagedAttentionWorkspaceBytes(plan.attention) > plan.attention_ws_bytes_) {
    return Status::Internal("attention workspace larger than planned");
  }
  return LaunchPagedAttention(plan.attention, stream);
}

Status RunPlan(PlanImpl& plan, const DeviceIO& io, void* stream) {
  SQKV_RETURN_IF_ERROR(RunPlanLookup(plan, io, stream));
  return RunPlanAttention(plan, stream);
}

SelectionRange PlanSelectionRange(const PlanImpl& plan) {
  // Place() puts these arrays together in one buffer (page_count first, cluster_ids last); the
  // range covers them whatever their order.
  const LookupArgs& l = plan.lookup;
  const size_t n = plan.segments.size() * sizeof(int32_t);
  const std::pair<const void*, size_t> arrays[] = {
      {l.seg_page_count, n},
      {l.seg_cluster_count, n},
      {l.seg_tokens, n},
      {l.seg_scored, n},
      {l.cluster_ids, plan.layout.total_cluster_capacity * sizeof(int32_t)}};
  auto addr = [](const void* p) { return reinterpret_cast<uintptr_t>(p); };
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  for (const auto& [p, bytes] : arrays) {
    lo = std::min(lo, addr(p));
    hi = std::max(hi, addr(p) + bytes);
  }
  SelectionRange r;
  r.device = reinterpret_cast<const void*>(lo);
  r.bytes = hi - lo;
  r.page_count = addr(l.seg_page_count) - lo;
  r.cluster_count = addr(l.seg_cluster_count) - lo;
  r.tokens = addr(l.seg_tokens) - lo;
  r.scored = addr(l.seg_scored) - lo;
  r.cluster_ids = addr(l.cluster_ids) - lo;
  return r;
}

void SelectionsFromHost(const PlanImpl& plan, const uint8_t* host,
                        std::vector<std::vector<HeadSelection>>* out) {
  const SelectionRange x = PlanSelectionRange(plan);
  auto ints = [&](size_t off) { return reinterpret_cast<const int32_t*>(host + off); };
  const int32_t* clusters = ints(x.cluster_count);
  const int32_t* tokens = ints(x.tokens);
  const int32_t* pages = ints(x.page_count);
  const int32_t* scored = ints(x.scored);
  const int32_t* ids = ints(x.cluster_ids);
  out->assign(plan.row_offsets_.size(), {});
  size_t seg = 0;
  for (size_t r = 0; r < plan.row_offsets_.size(); ++r) {
    (*out)[r].resize(plan.kv_heads_[r]);
    for (int h = 0; h < plan.kv_heads_[r]; ++h, ++seg) {
      HeadSelection& s = (*out)[r][h];
      const int32_t off = plan.segments[seg].cluster_offset;
      s.clusters.assign(ids + off, ids + off + clusters[seg]);
      s.tokens = tokens[seg];
      s.pages = pages[seg];
      s.centroids_scored = scored[seg];
    }
  }
}

Status ReadPlanSelections(const PlanImpl& plan, std::vector<std::vector<HeadSelection>>* out) {
  const SelectionRange x = PlanSelectionRange(plan);
  std::vector<uint8_t> host(x.bytes);
  SQKV_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpy(host.data(), x.device, x.bytes, cudaMemcpyDeviceToHost), "read selections"));
  SelectionsFromHost(plan, host.data(), out);
  return Status::Ok();
}

}  // namespace sqkv::gpu
