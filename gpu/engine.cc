// The GPU engine: layers, the query paths and the factory (see gpu/engine.h). Paging (the page
// pool, QueryPaged's page-in, preload, pins) is in engine_paging.cc.
#include "gpu/engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <string>

#include "gpu/device.h"
#include "gpu/engine_impl.h"
#include "gpu/lookup.h"
#include "gpu/paged_attention.h"

namespace sqkv::gpu {
namespace {

// Share of the free device memory the pool takes when EngineOptions::pool_bytes is 0.
constexpr double kDefaultPoolShare = 0.4;

Status Grow(DeviceBuffer* b, size_t bytes) {
  if (b->size() >= bytes) return Status::Ok();
  return b->Allocate(bytes);
}

std::string Key(uint64_t k) { return "layer " + std::to_string(k); }

}  // namespace

EngineImpl::EngineImpl(const EngineOptions& o, void* pool, size_t slots, Stream stream)
    : options_(o), pool_(pool), pages_(slots, o.slot_bytes), stream_(std::move(stream)) {}

EngineImpl::~EngineImpl() {
  cudaSetDevice(options_.device);
  cudaStreamSynchronize(static_cast<cudaStream_t>(stream_.get()));
  if (upload_start_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(upload_start_));
  if (upload_end_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(upload_end_));
  layers_.clear();
  cudaFree(pool_);
}

Status EngineImpl::AddLayer(uint64_t layer_key, DType dtype, int page_tokens,
                            const std::vector<HeadIndex>& heads, const void* pages) {
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options_.device), "cudaSetDevice"));
  if (layers_.count(layer_key) > 0) {
    return Status::AlreadyExists(Key(layer_key) + " is resident");
  }
  auto layer = std::make_unique<ResidentLayer>();
  SQKV_RETURN_IF_ERROR(
      PrepareLayer(dtype, page_tokens, heads, pages, options_.slot_bytes, layer.get()));
  const size_t pb = layer->page_bytes;
  if (pages_.PageIds(pb) > static_cast<size_t>(INT32_MAX)) {
    return Status::InvalidArgument("pool too large for 32-bit ids of " + std::to_string(pb) +
                                   "-byte pages");
  }
  layer->key = layer_key;
  layer->head_page_base.assign(1, 0);
  for (size_t h = 0; h < heads.size(); ++h) {
    layer->head_page_base.push_back(layer->head_page_base.back() + heads[h].num_pages());
    layer->heads[h].page_begin = heads[h].cluster_page_begin;
  }
  if (free_ids_.empty()) {
    free_ids_.push_back(static_cast<uint32_t>(by_id_.size()));
    by_id_.push_back(nullptr);
  }
  layer->id = free_ids_.back();
  layer->pool_page.assign(layer->total_pages, -1);

  std::vector<PendingPage> all;
  if (pages != nullptr) {
    // Free pool space only: a whole-layer load evicts nothing (see LoadLayer).
    ++epoch_;
    all.resize(layer->total_pages);
    for (size_t h = 0; h < heads.size(); ++h) {
      for (int32_t p = 0; p < heads[h].num_pages(); ++p) {
        PendingPage& x = all[layer->head_page_base[h] + p];
        x.layer = layer.get();
        x.head = static_cast<int>(h);
        x.head_page = p;
      }
    }
    Status st = AllocatePages(pb, /*evict=*/false, &all, nullptr);
    if (!st.ok()) return st.WithContext("load " + Key(layer_key));
    for (size_t g = 0; g < all.size(); ++g) layer->pool_page[g] = all[g].pool_id;
  }
  Status st = UploadLayer(layer->pool_page, pages, pool_, stream(), layer.get());
  if (!st.ok()) {
    ReleasePages(pb, all);
    return st.WithContext("load " + Key(layer_key));
  }
  if (pages != nullptr) {
    layer->resident_pages = layer->total_pages;
    counters_.pages_uploaded += layer->total_pages;
    counters_.bytes_uploaded += layer->total_pages * pb;
  }
  layer->generation = next_generation_++;
  free_ids_.pop_back();
  by_id_[layer->id] = layer.get();
  layers_[layer_key] = std::move(layer);
  return Status::Ok();
}

Status EngineImpl::LoadLayer(uint64_t layer_key, DType dtype, int page_tokens,
                             const std::vector<HeadIndex>& heads, const void* pages) {
  if (pages == nullptr) return Status::InvalidArgument("null pages");
  return AddLayer(layer_key, dtype, page_tokens, heads, pages);
}

Status EngineImpl::LoadLayerIndex(uint64_t layer_key, DType dtype, int page_tokens,
                                  const std::vector<HeadIndex>& heads) {
  return AddLayer(layer_key, dtype, page_tokens, heads, nullptr);
}

LayerResidency EngineImpl::Residency(uint64_t layer_key) const {
  LayerResidency r;
  auto it = layers_.find(layer_key);
  if (it == layers_.end()) return r;
  const ResidentLayer& l = *it->second;
  r.indexed = true;
  r.pinned = l.pinned;
  r.pages_resident = l.resident_pages;
  r.pages_total = l.total_pages;
  r.index_bytes = l.index.size();
  r.page_bytes = l.page_bytes;
  return r;
}

void EngineImpl::EvictLayer(uint64_t layer_key) {
  auto it = layers_.find(layer_key);
  if (it == layers_.end()) return;
  cudaSetDevice(options_.device);
  cudaStreamSynchronize(static_cast<cudaStream_t>(stream()));
  ResidentLayer& l = *it->second;
  for (int32_t id : l.pool_page) {
    if (id >= 0) pages_.Free(l.page_bytes, id);
  }
  by_id_[l.id] = nullptr;
  free_ids_.push_back(l.id);
  layers_.erase(it);
}

EngineCounters EngineImpl::counters() const {
  EngineCounters c = counters_;
  c.pool_bytes = pool_bytes();
  c.pool_used_bytes = pool_used_bytes();
  c.page_bytes_resident = pages_.page_bytes_used();
  c.pages_resident = pages_.pages_used();
  c.index_bytes = 0;
  c.layers = layers_.size();
  c.pinned_layers = 0;
  for (const auto& [key, l] : layers_) {
    c.index_bytes += l->index.size();
    c.pinned_layers += l->pinned ? 1 : 0;
  }
  return c;
}

Status EngineImpl::BuildPlan(const std::vector<DeviceQuery>& queries, bool need_resident,
                             DeviceBuffer* scratch, PlanImpl* plan) {
  std::vector<const ResidentLayer*> layers;
  for (size_t r = 0; r < queries.size(); ++r) {
    auto it = layers_.find(queries[r].layer_key);
    if (it == layers_.end()) {
      return Status::NotFound("request " + std::to_string(r) + ": " +
                              Key(queries[r].layer_key) + " is not resident");
    }
    if (need_resident && !FullyResident(*it->second)) {
      return Status::Unavailable("request " + std::to_string(r) + ": " +
                                 Key(queries[r].layer_key) + " has " +
                                 std::to_string(it->second->resident_pages) + " of " +
                                 std::to_string(it->second->total_pages) +
                                 " pages resident (QueryPaged fetches the rest)");
    }
    layers.push_back(it->second.get());
  }
  SQKV_RETURN_IF_ERROR(FillPlan(queries, layers, pool_, plan));
  return AllocatePlan(scratch, stream(), plan);
}

Status EngineImpl::Plan(const std::vector<DeviceQuery>& queries, std::unique_ptr<QueryPlan>* out) {
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options_.device), "cudaSetDevice"));
  auto plan = std::make_unique<PlanImpl>();
  SQKV_RETURN_IF_ERROR(BuildPlan(queries, /*need_resident=*/true, nullptr, plan.get()));
  *out = std::move(plan);
  return Status::Ok();
}

Status EngineImpl::Run(QueryPlan& base, const DeviceIO& io, void* stream) {
  auto& plan = static_cast<PlanImpl&>(base);
  for (size_t r = 0; r < plan.layer_keys.size(); ++r) {
    auto it = layers_.find(plan.layer_keys[r]);
    if (it == layers_.end() || it->second->generation != plan.generations[r]) {
      return Status::InvalidArgument("plan is stale: " + Key(plan.layer_keys[r]) +
                                     " or one of its pages was evicted");
    }
  }
  return RunPlan(plan, io, stream);
}

Status EngineImpl::ReadSelections(const QueryPlan& base, void* stream,
                                  std::vector<std::vector<HeadSelection>>* out) {
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options_.device), "cudaSetDevice"));
  SQKV_RETURN_IF_ERROR(
      CudaStatus(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "sync"));
  return ReadPlanSelections(static_cast<const PlanImpl&>(base), out);
}

Status EngineImpl::GroupRequests(const std::vector<QueryRequest>& requests, bool need_resident,
                                 std::map<GroupKey, std::vector<int>>* groups) {
  for (size_t r = 0; r < requests.size(); ++r) {
    const QueryRequest& q = requests[r];
    const std::string where = "request " + std::to_string(r);
    auto it = layers_.find(q.layer_key);
    if (it == layers_.end()) {
      return Status::NotFound(where + ": " + Key(q.layer_key) + " is not resident");
    }
    const ResidentLayer& l = *it->second;
    if (need_resident && !FullyResident(l)) {
      return Status::Unavailable(where + ": " + Key(q.layer_key) + " has " +
                                 std::to_string(l.resident_pages) + " of " +
                                 std::to_string(l.total_pages) +
                                 " pages resident (QueryPaged fetches the rest)");
    }
    SQKV_RETURN_IF_ERROR(CheckHostRequest(q, l).WithContext(where));
    (*groups)[{static_cast<int>(l.dtype), l.head_dim, l.page_tokens}].push_back(
        static_cast<int>(r));
  }
  return Status::Ok();
}

Status EngineImpl::Query(const std::vector<QueryRequest>& requests) {
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options_.device), "cudaSetDevice"));
  // Group by (dtype, head_dim, page_tokens): one lookup and one attention launch per group.
  std::map<GroupKey, std::vector<int>> groups;
  SQKV_RETURN_IF_ERROR(GroupRequests(requests, /*need_resident=*/true, &groups));
  for (const auto& [key, members] : groups) {
    SQKV_RETURN_IF_ERROR(RunGroup(requests, members, nullptr, nullptr));
  }
  return Status::Ok();
}

Status EngineImpl::QueryPaged(const std::vector<QueryRequest>& requests,
                              const PageSupplier& supply, PagingStats* stats) {
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options_.device), "cudaSetDevice"));
  if (stats != nullptr) *stats = PagingStats();
  std::map<GroupKey, std::vector<int>> groups;
  SQKV_RETURN_IF_ERROR(GroupRequests(requests, /*need_resident=*/false, &groups));
  for (const auto& [key, members] : groups) {
    bool resident = true;
    for (int r : members) resident = resident && FullyResident(*layers_[requests[r].layer_key]);
    // A resident group without stats is exactly Query's path.
    SQKV_RETURN_IF_ERROR(RunGroup(requests, members, resident ? nullptr : &supply, stats));
  }
  return Status::Ok();
}

Status EngineImpl::RunGroup(const std::vector<QueryRequest>& requests,
                            const std::vector<int>& members, const PageSupplier* supply,
                            PagingStats* stats) {
  std::vector<DeviceQuery> dq;
  std::vector<ResidentLayer*> layers;
  for (int r : members) {
    const QueryRequest& q = requests[r];
    dq.push_back(DeviceQuery{q.layer_key, q.q_heads, q.n, q.select});
    layers.push_back(layers_[q.layer_key].get());
  }
  PlanImpl plan;
  SQKV_RETURN_IF_ERROR(BuildPlan(dq, /*need_resident=*/supply == nullptr, &scratch_, &plan));
  const size_t d = static_cast<size_t>(plan.head_dim_);
  const size_t rows = static_cast<size_t>(plan.total_rows_);
  SQKV_RETURN_IF_ERROR(Grow(&q_dev_, rows * d * sizeof(float)));
  SQKV_RETURN_IF_ERROR(Grow(&out_dev_, rows * d * sizeof(float)));
  SQKV_RETURN_IF_ERROR(Grow(&lse_dev_, rows * sizeof(float)));
  auto s = static_cast<cudaStream_t>(stream());
  for (size_t i = 0; i < members.size(); ++i) {
    const QueryRequest& q = requests[members[i]];
    const size_t n_rows = static_cast<size_t>(q.q_heads) * q.n;
    SQKV_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(q_dev_.as<float>() + plan.row_offsets_[i] * d, q.q,
                                   n_rows * d * sizeof(float), cudaMemcpyHostToDevice, s),
                   "upload q"));
  }
  const DeviceIO io{q_dev_.as<float>(), out_dev_.as<float>(), lse_dev_.as<float>()};
  std::vector<uint8_t> selection;  // paged: the selection read back before the attention
  if (supply != nullptr) {
    SQKV_RETURN_IF_ERROR(RunPlanLookup(plan, io, stream()));
    SQKV_RETURN_IF_ERROR(PageIn(plan, layers, *supply, &selection, stats));
    SQKV_RETURN_IF_ERROR(RunPlanAttention(plan, stream()));
  } else {
    SQKV_RETURN_IF_ERROR(RunPlan(plan, io, stream()));
    for (ResidentLayer* l : layers) ReferenceLayer(l);
  }
  for (size_t i = 0; i < members.size(); ++i) {
    const QueryRequest& q = requests[members[i]];
    const size_t n_rows = static_cast<size_t>(q.q_heads) * q.n;
    SQKV_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(q.out, out_dev_.as<float>() + plan.row_offsets_[i] * d,
                                   n_rows * d * sizeof(float), cudaMemcpyDeviceToHost, s),
                   "download out"));
    SQKV_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(q.lse, lse_dev_.as<float>() + plan.row_offsets_[i],
                                   n_rows * sizeof(float), cudaMemcpyDeviceToHost, s),
                   "download lse"));
  }
  // A resident group under QueryPaged with stats: its page counts ride along with the outputs
  // (one more small device->host copy before the same synchronisation).
  const size_t n_seg = plan.segments.size();
  const bool count_resident = supply == nullptr && stats != nullptr;
  if (count_resident) {
    SQKV_RETURN_IF_ERROR(readback_.Reserve(n_seg * sizeof(int32_t)));
    SQKV_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(readback_.host(), plan.lookup.seg_page_count,
                                                    n_seg * sizeof(int32_t),
                                                    cudaMemcpyDeviceToHost, s),
                                    "download page counts"));
  }
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(s), "query"));
  if (upload_timed_ && stats != nullptr) {
    float ms = 0.f;
    SQKV_RETURN_IF_ERROR(CudaStatus(cudaEventElapsedTime(&ms,
                                                         static_cast<cudaEvent_t>(upload_start_),
                                                         static_cast<cudaEvent_t>(upload_end_)),
                                    "upload time"));
    stats->upload_us += 1e3 * ms;
  }
  upload_timed_ = false;
  if (count_resident) {
    const auto* counts = static_cast<const int32_t*>(readback_.host());
    int64_t pages = 0;
    for (size_t i = 0; i < n_seg; ++i) pages += counts[i];
    stats->pages_selected += pages;
    stats->pages_from_device += pages;
    counters_.hits += static_cast<uint64_t>(pages);
  }
  bool want = false;
  for (int r : members) want |= requests[r].selection != nullptr;
  if (!want) return Status::Ok();
  std::vector<std::vector<HeadSelection>> sel;
  if (supply != nullptr) {
    SelectionsFromHost(plan, selection.data(), &sel);
  } else {
    SQKV_RETURN_IF_ERROR(ReadPlanSelections(plan, &sel));
  }
  for (size_t i = 0; i < members.size(); ++i) {
    if (requests[members[i]].selection != nullptr) {
      *requests[members[i]].selection = std::move(sel[i]);
    }
  }
  return Status::Ok();
}

Status Engine::Create(const EngineOptions& options, std::unique_ptr<Engine>* out) {
  if (!DevicePresent()) return Status::Unavailable("no CUDA device found");
  if (options.slot_bytes == 0 || options.slot_bytes % 256 != 0) {
    return Status::InvalidArgument("slot_bytes must be a positive multiple of 256");
  }
  SQKV_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options.device), "cudaSetDevice"));
  size_t bytes = options.pool_bytes;
  if (bytes == 0) {
    size_t free_bytes = 0, total = 0;
    SQKV_RETURN_IF_ERROR(CudaStatus(cudaMemGetInfo(&free_bytes, &total), "cudaMemGetInfo"));
    bytes = static_cast<size_t>(kDefaultPoolShare * static_cast<double>(free_bytes));
  }
  const size_t slots = bytes / options.slot_bytes;
  if (slots == 0) return Status::InvalidArgument("pool_bytes holds no slot");
  if (slots > static_cast<size_t>(INT32_MAX)) {
    return Status::InvalidArgument("pool_bytes holds more than 2^31 slots");
  }
  void* pool = nullptr;
  cudaError_t err = cudaMalloc(&pool, slots * options.slot_bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return Status::Unavailable("page pool of " + std::to_string(slots * options.slot_bytes) +
                               " bytes: " + cudaGetErrorString(err));
  }
  Stream stream;
  Status st = Stream::Create(&stream);
  if (!st.ok()) {
    cudaFree(pool);
    return st;
  }
  *out = std::make_unique<EngineImpl>(options, pool, slots, std::move(stream));
  return Status::Ok();
}

}  // namespace sqkv::gpu
